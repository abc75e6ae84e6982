"""File -> Export -> Report: the project's report (kn_core.report, the same builder as `kn report`) written by a
worker job into a folder: report.html (self-contained), report.md, report.json and the run figures.

The main thread only copies what the report shows (`report_snapshot`: lists copied, arrays shared, no store
import); the worker turns the copy into a kn_core `ProjectDocument`, draws the figures and writes the folder,
all or nothing."""

from __future__ import annotations

from pathlib import Path

from .session import RUNNING, Session, fact_key

EXPORT_COMMAND = "Knowledge Neuron Studio: File > Export > Report"


def _flags_note(session: Session) -> str:
    """What the flags the sets leave out describe (kn_core.report.document.read_project words it alike)."""
    if session.flags is None:
        return "not measured: the sets keep every neuron"
    sha = getattr(session.lm, "sha256", None)
    return f"measured on {session.flags_measured_on} run prompts of the weights sha256 {str(sha)[:16]}"


def report_snapshot(session: Session, edit_state: tuple, project_path: str | None) -> dict:
    """Main thread: a copy of what the report shows (runs with their scores so far, sets, the edit history with
    each entry's report, thresholds and flags), so a job still running cannot change it under the worker."""
    state, model = edit_state
    runs = [(run, list(run.scores), None if run.compact is None else list(run.compact),
             session.runs.get(fact_key(run.fact)) is run) for run in session.all_runs()]
    fs = session.factset
    return {"path": str(Path(project_path).expanduser().absolute()) if project_path else None,
            "factset": (fs.name, len(fs.facts), len(fs.relations)), "runs": runs,
            "sets": [s.to_dict() for s in session.neuron_sets.values()],
            "edit_state": state if state and state.get("entries") else None,
            "edit_sha256": (model or {}).get("sha256") if state else None,
            "t": session.t, "p": session.p, "flags": session.flags, "keep_flagged": session.keep_massive,
            "flags_note": _flags_note(session)}


def document_of(snap: dict):
    """The kn_core ProjectDocument of a `report_snapshot` (worker thread: builds the TopScores)."""
    from kn_core.report.document import ProjectDocument, RunRecord
    from kn_core.store.topscores import TopScores

    runs = []
    for run, scores, compact, current in snap["runs"]:
        tops = compact[:len(scores)] if compact is not None else [TopScores.keep_all(ps.scores) for ps in scores]
        runs.append(RunRecord(fact=run.fact, prompts=[p.text for p in run.prompts], tops=tops, done=len(tops),
                              params=dict(run.params), model=dict(run.model), started=run.started,
                              seconds=run.seconds, state="running" if run.state == RUNNING else run.state,
                              edits=list(run.edits), name=run.name, current=current))
    name, facts, relations = snap["factset"]
    return ProjectDocument(path=snap["path"], factset_name=name, facts=facts, relations=relations, runs=runs,
                           neuron_sets=[{**s, "neurons": [tuple(n) for n in s["neurons"]]} for s in snap["sets"]],
                           edit_state=snap["edit_state"], edit_sha256=snap["edit_sha256"], t=snap["t"],
                           p=snap["p"], flags=snap["flags"], keep_flagged=snap["keep_flagged"],
                           flags_note=snap["flags_note"])


def project_report_job(folder: str | Path, session: Session, edit_state: tuple, project_path: str | None = None):
    """Main thread: the snapshot; returns the job (a function of a Task, for the worker) that writes the report
    into `folder` and returns the folder (kn_core.report.write.ReportError, one line, when it cannot)."""
    snap = report_snapshot(session, edit_state, project_path)

    def job(task) -> Path:
        from kn_core.report.write import write_report

        return Path(write_report(document_of(snap), folder, EXPORT_COMMAND, task=task)["out"])

    return job
