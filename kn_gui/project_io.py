"""Saving and opening projects through kn_core.store. Runs in a worker thread on a `ProjectSnapshot`: a copy of
everything to save, taken in the main thread (the worker never reads live GUI state)."""

from __future__ import annotations

import base64
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from kn_core.attribution import PromptScores
from kn_core.facts import Fact, FactSet, Prompt, Relation
from kn_core.selection import DEFAULT_P, DEFAULT_T
from kn_core.report.document import FLAGS_SETTING, GUI_SETTING, place_runs, run_state  # noqa: F401 - one reading

from .session import CANCELLED, COMPLETE, FAILED, INTERRUPTED, RUNNING, NeuronSet, Run, Session, TooCoarse

_STORE_STATUS = {COMPLETE: "done", CANCELLED: "cancelled", FAILED: "failed", INTERRUPTED: "cancelled"}


@dataclass
class ProjectSnapshot:
    """A whole project: what is saved, and what opening a file gives back."""

    factset: FactSet
    runs: list[Run] = field(default_factory=list)  # every kept run: complete ones and partial ones
    sets: list[NeuronSet] = field(default_factory=list)
    edit_state: dict | None = None  # EditStack.to_dict(), each entry with its evaluation report
    model: dict | None = None  # the un-edited model the edits apply to
    edit_sha: str | None = None
    t: float = DEFAULT_T
    p: float = DEFAULT_P
    causal_templates: str = "prefix"  # the window's choice for new runs (each run records its own in its params)
    prompt_format: str = "plain"  # the window's prompt format (kn_core.encoding), as causal_templates
    checks: dict = field(default_factory=dict)  # (fact key, template) -> answer check
    checks_sha256: str | None = None  # the weights the checks were made on (None: a file saved before it was kept)
    path: str = ""
    autosave_of: str | None = None  # set in autosave files: the project they are the unsaved state of
    score_storage: dict | None = None  # the project's Project.score_storage(); saving keeps it (None: full)
    flags: dict | None = None  # Session.flags_record(): restored on open, so sets never include a flagged neuron
    # what the app does not show but other front ends stored (kn edit --project evaluations, kn trace, settings of
    # other tools): read on open and written back on save, since saving rewrites the whole file
    kept_records: dict = field(default_factory=dict)  # {"evaluations": [...], "settings": {...}}
    traces: list = field(default_factory=list)  # causal traces, stored as evaluations of kind "trace"


def snapshot(session: Session, edit_state: dict | None, model_info: dict | None) -> ProjectSnapshot:
    """Copies the session (lists copied, so later appends by a running job do not leak into the save)."""
    runs = [replace(run, prompts=list(run.prompts), scores=list(run.scores), params=dict(run.params),
                    model=dict(run.model), edits=list(run.edits))
            for run in session.all_runs()]
    return ProjectSnapshot(factset=session.factset, runs=runs,
                           sets=[NeuronSet(s.name, s.kind, list(s.neurons), s.source)
                                 for s in session.neuron_sets.values()],
                           edit_state=edit_state, model=model_info, t=session.t, p=session.p,
                           causal_templates=session.causal_templates, checks=dict(session.checks),
                           checks_sha256=getattr(session.lm, "sha256", None),
                           prompt_format=session.prompt_format,
                           score_storage=session.score_storage, flags=session.flags_record(),
                           kept_records=session.kept_records, traces=list(session.traces))


def save_project(path: str, snap: ProjectSnapshot, task=None) -> str:
    """Writes the snapshot to a temporary file beside `path` and renames it into place (never half a file). The
    temporary file is written in one transaction: one commit (one wait for the disk) instead of one per prompt of
    every run; a failure rolls all of it back and leaves `path` as it was."""
    from kn_core.store import create_project

    path = str(Path(path).expanduser())
    folder = os.path.dirname(os.path.abspath(path)) or "."
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.{int(time.time() * 1000)}.saving.knproj")
    project = create_project(tmp, name=Path(path).stem)
    try:
        try:
            with project.atomic(f"saving {Path(path).name}"):
                _write_snapshot(project, snap, task)
        finally:
            project.close()
    except BaseException:
        _remove_partial(tmp)  # a copy of what the app still holds in memory: nothing is lost with it
        raise
    os.replace(tmp, path)
    return path


def _remove_partial(tmp: str) -> None:
    for leftover in (tmp, tmp + "-wal", tmp + "-shm", tmp + "-journal"):
        try:
            os.remove(leftover)
        except OSError:
            pass


def _write_snapshot(project, snap: ProjectSnapshot, task) -> None:
    if snap.score_storage and snap.score_storage.get("form", "full") != "full":
        project.set_score_storage(**snap.score_storage)  # the project's choice, for the runs made since
    fs = snap.factset
    _write_kept_records(project, snap.kept_records)  # first, so the app's own settings below win
    project.set_setting("factset.name", fs.name)
    for relation in fs.relations.values():
        project.add_relation(relation)
    project.add_facts(fs.facts, fs.relations)
    n = max(1, len(snap.runs))
    for i, run in enumerate(snap.runs):
        if task is not None:
            task.progress(i / n, f"saving run {i + 1}/{n}")
        state = INTERRUPTED if run.state == RUNNING else run.state
        run_id = project.start_run(fact=run.fact, prompts=run.prompts, params=run.params,
                                   model=run.model or None, info={"state": state, "edits": run.edits,
                                                                  "started": run.started, "name": run.name})
        for k, ps in enumerate(run.scores):  # a compact run's kept scores go back as they were read
            project.add_prompt_result(run_id, k, ps, scores=run.compact[k] if run.compact is not None else None)
        project.finish_run(run_id, _STORE_STATUS[state], elapsed_s=run.seconds)
    for s in snap.sets:
        project.add_neuron_set(s.kind if s.kind in ("coarse", "refined", "relation", "user") else "user",
                               s.neurons, params={"source": s.source}, name=s.name)
    if snap.edit_state is not None and snap.edit_state.get("entries"):
        project.save_edit_history(snap.edit_state, model=snap.model)
    for trace in snap.traces:  # as `kn trace --project` stores them
        _add_evaluation(project, dict(trace, kind="trace"))
    if snap.flags is not None:
        project.set_setting(FLAGS_SETTING, flags_to_json(snap.flags))
    project.set_setting(GUI_SETTING, {"t": snap.t, "p": snap.p, "autosave_of": snap.autosave_of,
                                      "causal_templates": snap.causal_templates, "prompt_format": snap.prompt_format,
                                      "checks": [[list(k[0]), k[1], v] for k, v in snap.checks.items()],
                                      "checks_sha256": snap.checks_sha256})


def _read_evaluations(project) -> list[dict]:
    """Every stored evaluation as plain data, each with its model's description (saving re-adds the model)."""
    models = {m.id: {"source": m.source, "sha256": m.sha256, "dtype": m.dtype, "family": m.family, "kind": m.kind,
                     "layers": m.layers, "neurons": m.neurons} for m in project.list_models()}
    return [{"kind": e.kind, "name": e.name, "model": models.get(e.model_id), "params": e.params, "report": e.report,
             "library_versions": e.library_versions, "status": e.status, "started_at": e.started_at,
             "elapsed_s": e.elapsed_s} for e in project.list_evaluations()]


def _add_evaluation(project, e: dict) -> None:
    """One evaluation as `_read_evaluations` reads it (one the app ran itself has only kind, name, report, params)."""
    project.add_evaluation(e["kind"], e["report"], params=e.get("params") or {}, model=e.get("model"),
                           name=e.get("name", ""), status=e.get("status", "done"), started_at=e.get("started_at"),
                           elapsed_s=e.get("elapsed_s"), library_versions=e.get("library_versions"))


def _read_kept_records(project, evaluations: list[dict]) -> dict:
    """What the app does not show: the evaluations other than traces (kn edit --project and the like) and the
    settings it does not write from its own state on every save (its view, the edit history's, the score
    storage's)."""
    from kn_core.store import EDIT_STATE_SETTING, SCORE_STORAGE

    written_by_the_app = {GUI_SETTING, FLAGS_SETTING, "factset.name", SCORE_STORAGE, EDIT_STATE_SETTING}
    return {"evaluations": [e for e in evaluations if e["kind"] != "trace"],
            "settings": {k: v for k, v in project.settings().items() if k not in written_by_the_app}}


def _write_kept_records(project, kept: dict) -> None:
    for key, value in (kept.get("settings") or {}).items():
        project.set_setting(key, value)
    for e in kept.get("evaluations") or ():
        _add_evaluation(project, e)


def _prompt_from(d: dict, fact: Fact) -> Prompt:
    return Prompt(text=d.get("text", ""), answer=d.get("answer", ""), answer_ids=tuple(d.get("answer_ids", ())),
                  template=d.get("template", ""), fact=fact, kind=d.get("kind", ""))


def _read_run(project, rec, fact: Fact, models: dict) -> Run:
    """One stored run. Scores stored in the compact "top" form come back as `Run.compact` (TopScores), with
    arrays that hold NaN where a score was not kept (the map shows what is stored, never a made-up value)."""
    full = project.get_run(rec.id)
    tops = project.load_top_scores(rec.id, "scores")  # full arrays too, as TopScores keeping every score
    acts = project.load_scores(rec.id, "activations")
    compact = any(not top.exact_everywhere for top in tops.values())
    results, kept = [], []
    for p in full.prompts:
        if p.prompt_index not in tops:
            break
        top = tops[p.prompt_index]
        scores = top.dense(np.nan).astype(np.float32) if compact else top.dense()
        act = acts.get(p.prompt_index)
        d = p.prompt
        kept.append(top)
        results.append(PromptScores(
            prompt=d.get("text", ""), answer=d.get("answer", ""), answer_ids=tuple(d.get("answer_ids", ())),
            # NaN, never 0, where the activations were not stored (a compact run): shown as "not stored"
            scores=scores, activations=(np.full_like(scores, np.nan, dtype=np.float32) if act is None
                                        else act.astype(np.float32, copy=False)),
            prob=p.prob if p.prob is not None else float("nan"), token_probs=[],
            completeness=p.completeness or [], seconds=p.seconds or 0.0, params=dict(rec.params)))
    state = run_state(rec.status, rec.info, len(results), len(full.prompts))
    return Run(fact=fact, prompts=[_prompt_from(p.prompt, fact) for p in full.prompts], scores=results,
               params=dict(rec.params), model=models.get(rec.model_id, {}), seconds=rec.elapsed_s or 0.0,
               state=state, edits=list(rec.info.get("edits", [])), store_id=rec.id, compact=kept if compact else None,
               started=float(rec.info.get("started") or _epoch(rec.started_at)), name=str(rec.info.get("name", "")))


def _epoch(iso: str | None) -> float:
    """The store's ISO start time as seconds (runs saved before the app recorded its own start time)."""
    from datetime import datetime

    try:
        return datetime.fromisoformat(iso).timestamp() if iso else 0.0
    except ValueError:
        return 0.0


def open_project_file(path: str, task=None) -> ProjectSnapshot:
    from kn_core.store import open_project

    project = open_project(path, read_only=True)
    try:
        relations = {r.key: Relation(r.key, r.name, tuple(r.templates)) for r in project.list_relations()}
        fact_records = project.list_facts()
        facts_by_id = {f.id: Fact(f.relation, f.subject, f.object) for f in fact_records}
        name = project.get_setting("factset.name", Path(path).stem)
        factset = FactSet(name, relations, [facts_by_id[f.id] for f in fact_records])
        models = {m.id: dict(m.info) or {"source": m.source, "sha256": m.sha256} for m in project.list_models()}
        records = [r for r in project.list_runs() if r.fact_id in facts_by_id]
        runs = []
        for i, rec in enumerate(records):
            if task is not None:
                task.progress(i / max(1, len(records)), f"reading run {i + 1}/{len(records)}")
            runs.append(_read_run(project, rec, facts_by_id[rec.fact_id], models))
        sets = [NeuronSet(r.name or f"set {r.id}", r.kind, [tuple(n) for n in r.neurons],
                          (r.params or {}).get("source", "")) for r in project.list_neuron_sets()]
        edit_state, edit_sha = project.load_edit_history()
        gui = project.get_setting(GUI_SETTING, {}) or {}
        flags = flags_from_json(project.get_setting(FLAGS_SETTING))
        storage = project.score_storage()
        evaluations = _read_evaluations(project)
        traces = [e for e in evaluations if e["kind"] == "trace"]  # the trace tab lists and reopens them
        kept = _read_kept_records(project, evaluations)
    finally:
        project.close()
    checks = {(tuple(key), template): value for key, template, value in gui.get("checks", [])}
    return ProjectSnapshot(factset=factset, runs=runs, sets=sets, edit_state=edit_state, edit_sha=edit_sha,
                           t=gui.get("t", DEFAULT_T), p=gui.get("p", DEFAULT_P), checks=checks, path=path,
                           checks_sha256=gui.get("checks_sha256"),
                           causal_templates=gui.get("causal_templates", "prefix"), score_storage=storage,
                           prompt_format=gui.get("prompt_format", "plain"),
                           autosave_of=gui.get("autosave_of"), flags=flags, kept_records=kept, traces=traces)


def _array_to_json(a: np.ndarray) -> dict:
    a = np.ascontiguousarray(a, dtype=np.float32)
    return {"shape": list(a.shape), "float32_base64": base64.b64encode(a.tobytes()).decode("ascii")}


def _array_from_json(d: dict) -> np.ndarray:
    return np.frombuffer(base64.b64decode(d["float32_base64"]), dtype=np.float32).reshape(d["shape"]).copy()


STATS_ARRAYS = ("mean", "mean_abs", "median_abs", "layer_median_abs")


def flags_to_json(record: dict) -> dict:
    """Session.flags_record() as JSON: the statistics' arrays as base64 float32 (bit-exact, a quarter of the size
    of decimal lists: 46k neurons x 4 arrays for the default model)."""
    stats = record["stats"]
    return {"sha256": record["sha256"], "run_prompts": record["run_prompts"], "flags": record["flags"].to_dict(),
            "stats": {**{k: _array_to_json(getattr(stats, k)) for k in STATS_ARRAYS},
                      "n_prompts": stats.n_prompts, "source": stats.source}}


def flags_from_json(d: dict | None) -> dict | None:
    """The saved flags record, or None (none saved, or unreadable: then they are measured again)."""
    from kn_core.neurons import ActivationStats, NeuronFlags

    if not d:
        return None
    try:
        s = d["stats"]
        stats = ActivationStats(**{k: _array_from_json(s[k]) for k in STATS_ARRAYS}, n_prompts=int(s["n_prompts"]),
                                source=str(s.get("source", "")))
        return {"sha256": d["sha256"], "run_prompts": int(d["run_prompts"]),
                "flags": NeuronFlags.from_dict(d["flags"]), "stats": stats}
    except (KeyError, TypeError, ValueError):
        return None


def results_dict(session: Session, edit_commands: list) -> dict:
    """Runs (with each prompt's coarse set and the refined set at the current t, p), neuron sets and edits with
    their reports, for `Export results (JSON)`. A compactly stored run whose kept scores do not decide the sets
    at this t has null sets and `sets_not_decided` saying why (never a smaller set)."""
    s = session
    runs = []
    for run in s.all_runs():
        try:
            coarse = [[list(n) for n in s.coarse(run, i)] for i in range(len(run.scores))]
            refined, note = [list(n) for n in s.refined(run)], None
        except TooCoarse as exc:
            coarse, refined, note = [None] * len(run.scores), None, str(exc)
        runs.append({"fact": {"relation": run.fact.relation, "subject": run.fact.subject, "object": run.fact.object},
                     "params": run.params, "model": run.model, "seconds": run.seconds, "complete": run.complete,
                     "state": run.state, "edits_active": run.edits,
                     "prompts": [{"text": p.text, "answer": p.answer, "prob": ps.prob, "coarse": c}
                                 for p, ps, c in zip(run.prompts, run.scores, coarse)],
                     "refined": refined, **({"sets_not_decided": note} if note else {})})
    edits = [{"edit": c.edit.to_dict(), "description": c.text, "report": c.report} for c in edit_commands]
    return {"t": s.t, "p": s.p, "model": s.lm.describe() if s.lm else None, "runs": runs,
            "neuron_sets": [ns.to_dict() for ns in s.neuron_sets.values()], "edits": edits}
