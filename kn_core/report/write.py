"""Writing the project's report: report.json (strict JSON), report.md, report.html (self-contained: the figures
embedded as PNG data, no network) and the figures' PNG files, into one folder, all or nothing: everything is
written into a temporary folder beside it and renamed into place (kn_core.store.export's folder swap), so a
full disk, a cancel or a bad path leaves no half report and an earlier report whole."""

from __future__ import annotations

import datetime
import os
import re
import shutil
from pathlib import Path

from ..jsonio import dumps
from ..reproduce.html import provenance_rows, read_figures, render_html
from .build import build_report, render_markdown
from .document import ProjectDocument
from .figures import render_figure

FIGURE_DPI = 110  # a page figure: about 770 x 385 pixels
REPORT_FILES = ("report.json", "report.md", "report.html")
_FIGURE_FILE = re.compile(r"^run\d+-(layers|heatmap|prompts)\.png$")  # build.plan_figures' names


class ReportError(ValueError):
    """The report cannot be written there: one line naming the folder, the problem and the fix."""


def _check_target(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ReportError(f"{out} is a file, not a folder; choose a new or empty folder for the report")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ReportError(f"{parent} is a file, so the report folder {out} cannot be made in it; choose "
                                  "another folder")
            break
    if out.is_dir():
        extra = sorted(e.name for e in out.iterdir() if e.name not in REPORT_FILES and not _FIGURE_FILE.match(e.name))
        if extra:
            raise ReportError(f"{out} already holds other files ({', '.join(extra[:3])}"
                              f"{', ...' if len(extra) > 3 else ''}); choose a new or empty folder (an earlier "
                              "report there is replaced)")


def _provenance(command: str) -> dict:
    from ..store import library_versions

    written = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    return {"written": written, "command": command, "versions": library_versions()}


def _provenance_rows(data: dict) -> list[tuple[str, str]]:
    """What produced the numbers, for the page's provenance table: the first run's model, the thresholds, the
    newest run's attribution parameters (each run's are in its section), the libraries, when and how."""
    runs = data["runs"]
    model = data["models"][0] if data["models"] else {}
    params = {"t": data["selection"]["t"], "p": data["selection"]["p"],
              "keep_flagged": data["selection"]["keep_flagged"]}
    if runs:
        params["attribution"] = runs[-1]["params"]
    prov = data["provenance"]
    return provenance_rows({"model": model, "parameters": params, "versions": prov["versions"],
                            "status": f"{len(runs)} runs, {data['edits']['in_force']} edits in force",
                            "provenance": {"written": prov["written"], "command": prov["command"],
                                           "started": runs[0]["started"] if runs else "no run"}})


def write_report(doc: ProjectDocument, out_dir, command: str, task=None) -> dict:
    """Writes the report of `doc` into the folder `out_dir` (created if needed; an earlier report there is
    replaced, a folder holding anything else is refused: ReportError). `command`: what asked for it, for the
    provenance. Returns {"out", "files", "runs", "figures", "left_out"}. `task` (kn_core.tasks.Task): progress
    per figure, cancel between them (nothing is written then)."""
    data, figures = build_report(doc)
    data["provenance"] = _provenance(command)
    markdown = render_markdown(data)
    out = Path(out_dir).expanduser().absolute()
    _check_target(out)
    made = [p for p in [out.parent, *out.parent.parents] if not p.exists()]
    tmp = out.with_name(f".{out.name}.writing-{os.getpid()}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        for k, figure in enumerate(figures):
            if task is not None:
                task.check()
                task.progress(k / (len(figures) + 1), f"drawing {figure['file']}")
            render_figure(figure["data"], tmp / figure["file"], dpi=FIGURE_DPI)
        (tmp / "report.json").write_text(dumps(data, indent=2) + "\n", encoding="utf-8")
        (tmp / "report.md").write_text(markdown, encoding="utf-8")
        page = render_html(markdown, read_figures(tmp, markdown), _provenance_rows(data))
        (tmp / "report.html").write_text(page, encoding="utf-8")
        from ..store.export import move_into_place

        move_into_place(tmp, out)
    except OSError as exc:
        raise ReportError(f"could not write the report to {out} ({exc.strerror or exc}); nothing was written: "
                          "choose a folder you can write to, on a drive with room") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if not out.exists():
            for folder in made:  # innermost first: only the folders this call made, and only if still empty
                try:
                    folder.rmdir()
                except OSError:
                    break
    return {"out": str(out), "files": [*REPORT_FILES, *(f["file"] for f in figures)], "runs": len(data["runs"]),
            "figures": len(figures), "left_out": data["left_out"]}
