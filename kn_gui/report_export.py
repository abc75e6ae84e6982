"""File -> Export -> Report (HTML): the project as one self-contained page, through the same renderer as
`kn reproduce`'s report.html (kn_core.reproduce.html): every run with its refined neurons, the neuron sets,
every edit with its before/after summary and metrics, the current run's figures embedded, and the provenance
(model sha256, library versions, parameters, time)."""

from __future__ import annotations

import datetime
import math
import tempfile
from pathlib import Path

from kn_core.reproduce.html import provenance_rows, read_figures, render_html

from .session import Run, Session, TooCoarse, fact_label, neuron_name

GROUP_ORDER = ("fact", "relation", "other relations", "new object")  # edit_plan.summarize_plan's groups


def _cell(value) -> str:
    """A table cell: pipes escaped and no line breaks (either would split the Markdown row)."""
    return str(value).replace("|", "\\|").replace("\n", " ")


def _num(value, fmt="{:.4f}") -> str:
    return fmt.format(value) if isinstance(value, (int, float)) and math.isfinite(value) else "n/a"


def _pct(value) -> str:
    return f"{100 * value:+.2f}%" if isinstance(value, (int, float)) and math.isfinite(value) else "n/a"


def _neurons(neurons, limit=12) -> str:
    text = ", ".join(neuron_name(l, n) for l, n in list(neurons)[:limit])
    return text + (f" and {len(neurons) - limit} more" if len(neurons) > limit else "") if neurons else "none"


def _runs_section(session: Session) -> list[str]:
    runs = session.all_runs()
    lines = ["## Attribution runs", "",
             f"Refined neurons at t = {session.t}, p = {session.p}"
             + ("" if session.keep_massive or session.flags is None else
                ", flagged (massive/unspecific) neurons left out") + ".", ""]
    if not runs:
        return lines + ["No attribution run yet.", ""]
    lines += ["| relation | fact | prompts | state | refined neurons | count | seconds | weights |",
              "|---|---|---|---|---|---|---|---|"]
    for run in runs:
        try:
            refined = session.refined(run)
            neurons, count = _neurons(refined), len(refined)
        except TooCoarse as exc:  # a compact run at a t its kept scores do not decide: say so, never a smaller set
            neurons, count = _cell(f"not decided: {exc}"), "n/a"
        lines.append(f"| {run.fact.relation} | {_cell(fact_label(run.fact))} | {len(run.scores)} of "
                     f"{len(run.prompts)} | {run.state} | {neurons} | {count} | "
                     f"{run.seconds:.1f} | {'edited (' + str(len(run.edits)) + ')' if run.edits else 'original'} |")
    return lines + [""]


def _sets_section(session: Session) -> list[str]:
    sets = list(session.neuron_sets.values())
    if not sets:
        return []
    lines = ["## Neuron sets", "", "| name | kind | from | neurons | count |", "|---|---|---|---|---|"]
    lines += [f"| {_cell(s.name)} | {s.kind} | {_cell(s.source) or '-'} | {_neurons(s.neurons)} | "
              f"{len(s.neurons)} |" for s in sets]
    return lines + [""]


def _edit_section(k: int, command) -> list[str]:
    report = command.report or {}
    lines = [f"### {k}. {_cell(report.get('title') or command.text)}", ""]
    summary = report.get("summary") or {}
    groups = [g for g in GROUP_ORDER if g in summary] + [g for g in summary if g not in GROUP_ORDER
                                                          and isinstance(summary[g], dict)]
    if groups:
        lines += ["| prompts | n | p before | p after | mean(Δp)/mean(p) | top-1 flips | accuracy before | "
                  "accuracy after |", "|---|---|---|---|---|---|---|---|"]
        for g in groups:
            s = summary[g]
            lines.append(f"| {g} | {s.get('n', '-')} | {_num(s.get('p_before'))} | {_num(s.get('p_after'))} | "
                         f"{_pct(s.get('relative_change'))} | {_num(s.get('flip_rate'), '{:.2f}')} | "
                         f"{_num(s.get('accuracy_before'), '{:.2f}')} | {_num(s.get('accuracy_after'), '{:.2f}')} |")
        if "success_rate" in summary:
            lines += ["", f"Update success rate (o' is the answer): {_pct(summary['success_rate'])}."]
        lines.append("")
    metrics = report.get("metrics")
    if metrics:  # the field's metrics beside the random-neuron control (docs/METRICS.md)
        from kn_core.metrics import metrics_rows

        lines += ["| metric (docs/METRICS.md) | this edit | random neurons |", "|---|---|---|"]
        lines += [f"| {name} | {_cell(edit)} | {_cell(control)} |" for name, edit, control in metrics_rows(metrics)]
        lines.append("")
    skipped = report.get("skipped") or []
    if skipped:
        lines += ["Left out of this edit:", ""] + [f"- {_cell(' '.join(map(str, item)))}" for item in skipped] + [""]
    if not report:
        lines += ["Not evaluated (no before/after report).", ""]
    return lines


def _edits_section(commands: list) -> list[str]:
    if not commands:
        return []
    lines = ["## Edits in force", "", "In the order applied; each with its evaluation before and after.", ""]
    for k, command in enumerate(commands, 1):
        lines += _edit_section(k, command)
    return lines


def project_markdown(session: Session, edit_commands: list, run: Run | None, figures: list[str],
                     figure_note: str = "", project_path: str | None = None) -> str:
    model = session.lm.describe() if session.lm is not None else (run.model if run is not None else {})
    lines = ["# Knowledge Neuron Studio: project report", "",
             f"Project: `{project_path or 'untitled (not saved)'}`.  ",
             f"Facts: `{session.factset.name}`, {len(session.factset.facts)} facts in "
             f"{len(session.factset.relations)} relations.  ",
             f"Model: **{model.get('name') or model.get('source') or 'none loaded'}**"
             + (f", weights sha256 `{model['sha256'][:16]}...`" if model.get("sha256") else "") + ".", ""]
    lines += _runs_section(session)
    if run is not None:
        lines += [f"## Current run: {_cell(fact_label(run.fact))}", "",
                  f"{len(run.scores)} of {len(run.prompts)} prompts ({run.state}); parameters: "
                  + ", ".join(f"{k} {v}" for k, v in run.params.items() if v is not None) + ".", ""]
        lines += [f"![{name}]({name})" for name in figures] + ([""] if figures else [])
        if figure_note:
            lines += [figure_note, ""]
    lines += _sets_section(session) + _edits_section(edit_commands)
    return "\n".join(lines)


def provenance_of(session: Session, run: Run | None) -> dict:
    """What produced the numbers, as plain data (main thread); ``provenance_rows`` of it in the worker (reading
    the library versions imports the store)."""
    model = session.lm.describe() if session.lm is not None else (run.model if run is not None else {})
    started = (datetime.datetime.fromtimestamp(run.started, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
               if run is not None else None)
    params = {"t": session.t, "p": session.p, "keep_massive": session.keep_massive}
    if run is not None:
        params["attribution"] = dict(run.params)
    return {"model": dict(model), "parameters": params, "status": "exported from the app",
            "provenance": {"started": started, "command": "Knowledge Neuron Studio: File > Export > Report (HTML)"}}


def project_report_job(path: str | Path, session: Session, edit_commands: list, run: Run | None, panel,
                       project_path: str | None = None):
    """Main thread: takes what the page shows (the current run's figure data from the attribution ``panel``, the
    Markdown, the provenance); returns the job (a function of a Task, for the worker) that draws the figures and
    writes the page to ``path``, never half a file."""
    import numpy as np

    from .panels.figures import FIGURES, NothingToPlot, figure_data

    datas, refused = {}, []
    if run is not None:
        for which in FIGURES:
            try:
                if which == "prompts":
                    panel._draw_prompts(force=True)  # as export_figure does: the lines follow the current sets
                data = figure_data(panel, which)
            except (NothingToPlot, TooCoarse) as exc:
                refused.append(f"{FIGURES[which]}: {exc}")
                continue
            datas[which] = {k: v.copy() if isinstance(v, np.ndarray) else v for k, v in data.items()}
    note = ("No figure: " if not datas else "Not drawn: ") + "; ".join(refused) if refused else ""
    markdown = project_markdown(session, edit_commands, run, [f"{w}.png" for w in datas], note, project_path)
    provenance = provenance_of(session, run)
    path = Path(path)

    def job(task) -> Path:
        from kn_core.store import library_versions

        from .panels.figures import render_figure

        with tempfile.TemporaryDirectory() as folder:
            for k, (which, data) in enumerate(datas.items()):
                task.check()
                task.progress(k / (len(datas) + 1), f"drawing {FIGURES[which].lower()}")
                render_figure(data, Path(folder) / f"{which}.png", dpi=110)
            rows = provenance_rows({**provenance, "versions": library_versions()})
            page = render_html(markdown, read_figures(Path(folder), markdown), rows)
        tmp = path.with_name(f".{path.name}.writing")
        try:
            tmp.write_text(page, encoding="utf-8")
            tmp.replace(path)
        except OSError as exc:  # the window shows this one line as the job's failure
            tmp.unlink(missing_ok=True)
            raise OSError(f"could not write {path} ({exc.strerror or exc}); choose a folder you can write "
                          "to") from None
        return path

    return job
