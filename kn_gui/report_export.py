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

from .session import Run, Session, fact_label

GROUP_ORDER = ("fact", "relation", "other relations", "new object")  # edit_plan.summarize_plan's groups


def _cell(value) -> str:
    """A table cell: pipes escaped and no line breaks (either would split the Markdown row)."""
    return str(value).replace("|", "\\|").replace("\n", " ")


def _num(value, fmt="{:.4f}") -> str:
    return fmt.format(value) if isinstance(value, (int, float)) and math.isfinite(value) else "n/a"


def _pct(value) -> str:
    return f"{100 * value:+.2f}%" if isinstance(value, (int, float)) and math.isfinite(value) else "n/a"


def _neurons(neurons, limit=12) -> str:
    text = ", ".join(f"L{l}#{n}" for l, n in list(neurons)[:limit])
    return text + (f" and {len(neurons) - limit} more" if len(neurons) > limit else "") if neurons else "none"


def _runs_section(session: Session) -> list[str]:
    runs = [r for r in [*session.runs.values(), *session.partial_runs.values()] if r.scores]
    lines = ["## Attribution runs", "",
             f"Refined neurons at t = {session.t}, p = {session.p}"
             + ("" if session.keep_massive or session.flags is None else
                ", flagged (massive/unspecific) neurons left out") + ".", ""]
    if not runs:
        return lines + ["No attribution run yet.", ""]
    lines += ["| relation | fact | prompts | state | refined neurons | count | seconds | weights |",
              "|---|---|---|---|---|---|---|---|"]
    for run in runs:
        refined = session.refined(run)
        lines.append(f"| {run.fact.relation} | {_cell(fact_label(run.fact))} | {len(run.scores)} of "
                     f"{len(run.prompts)} | {run.state} | {_neurons(refined)} | {len(refined)} | "
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
    lines = [f"### {k}. {_cell(report.get('title') or command.text())}", ""]
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


def project_provenance(session: Session, run: Run | None) -> list[tuple[str, str]]:
    from kn_core.store import library_versions

    model = session.lm.describe() if session.lm is not None else (run.model if run is not None else {})
    started = (datetime.datetime.fromtimestamp(run.started, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
               if run is not None else None)
    params = {"t": session.t, "p": session.p, "keep_massive": session.keep_massive}
    if run is not None:
        params["attribution"] = run.params
    return provenance_rows({"model": model, "versions": library_versions(), "parameters": params,
                            "status": "exported from the app",
                            "provenance": {"started": started,
                                           "command": "Knowledge Neuron Studio: File > Export > Report (HTML)"}})


def write_project_report(path: str | Path, session: Session, edit_commands: list, run: Run | None, panel,
                         project_path: str | None = None) -> Path:
    """Writes the page to ``path``; the current run's figures are drawn from the attribution ``panel``."""
    from .panels.figures import NothingToPlot, export_figures

    with tempfile.TemporaryDirectory() as folder:
        names, note = [], ""
        if run is not None:
            try:
                written, refused = export_figures(panel, folder, "png", dpi=110)
                names = [p.name for p in written]
                note = "; ".join(refused)
            except NothingToPlot as exc:
                note = f"No figure: {exc}"
        markdown = project_markdown(session, edit_commands, run, names, note, project_path)
        page = render_html(markdown, read_figures(Path(folder), markdown), project_provenance(session, run))
    path = Path(path)
    tmp = path.with_name(f".{path.name}.writing")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(path)  # never half a file where the old report was
    return path
