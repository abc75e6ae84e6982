"""A project as the report reads it: plain data, no Qt, no model. `read_project` reads it from a .knproj file
(`kn report`); the app builds the same `ProjectDocument` from its open session (kn_gui/report_export.py), so
both front ends report the same numbers through one builder (`kn_core.report.build`).

Every run keeps its finished prompts' scores as `TopScores` (a full array is one keeping everything), so a
compactly stored run and a full one go through the same selection (`run_neurons`), and a t at which a compact
run's kept scores do not decide its sets is reported as such, never as a smaller set.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from pathlib import Path

from .. import neurons as kn_neurons
from ..facts import Fact
from ..selection import DEFAULT_P, DEFAULT_T  # a project no app saved has no thresholds of its own
from ..specificity import template_left_out

# where the app keeps its state in a project's settings (kn_gui/project_io.py writes them)
GUI_SETTING = "gui.state"  # {"t", "p", "causal_templates", "checks", "autosave_of"}
FLAGS_SETTING = "gui.flags"  # the massive / unspecific flags the sets left out, with the weights they describe

COMPLETE, CANCELLED, FAILED, INTERRUPTED = "complete", "cancelled", "failed", "interrupted"


@dataclass
class RunRecord:
    """One attribution run: its fact, its prompts (texts, all of them) and each finished prompt's scores."""

    fact: Fact
    prompts: list[str]
    tops: list  # kn_core.store.topscores.TopScores per finished prompt, in prompt order (read_project: drawn runs)
    done: int  # finished prompts
    params: dict = field(default_factory=dict)
    model: dict = field(default_factory=dict)
    started: float = 0.0  # seconds since the epoch
    seconds: float = 0.0
    state: str = COMPLETE
    edits: list[str] = field(default_factory=list)  # the edits active while it ran (empty: the model's own weights)
    name: str = ""
    current: bool = False  # the run its fact's sets come from (the newest complete one; place_runs)
    selection: tuple | None = None  # run_neurons at the document's t, p, exclusions, when computed while reading

    @property
    def complete(self) -> bool:
        return self.state == COMPLETE


@dataclass
class ProjectDocument:
    path: str | None
    factset_name: str
    facts: int
    relations: int
    runs: list[RunRecord]  # oldest first
    neuron_sets: list[dict]  # {"name", "kind", "source", "neurons"}
    edit_state: dict | None  # kn_core.edit_stack.EditStack.to_dict(): entries (each with its report), cursor
    edit_sha256: str | None = None  # the un-edited weights the edits were made on
    t: float = DEFAULT_T
    p: float = DEFAULT_P
    flags: object = None  # kn_core.neurons.NeuronFlags the sets leave out (None: none measured)
    keep_flagged: bool = False  # True: flagged neurons stay in the sets (the paper's method)
    flags_note: str = ""  # what the flags describe (the weights, the prompts they were measured on)
    left_out: list[dict] = field(default_factory=list)  # {"what", "reason"}: stored items the report cannot show
    evaluations: list = field(default_factory=list)  # the store's EvaluationRecords (`kn edit --project`, ...)

    @property
    def excluded(self) -> frozenset:
        return frozenset() if self.flags is None or self.keep_flagged else self.flags.excluded


def run_state(status: str, info: dict, finished: int, prompts: int) -> str:
    """A stored run's state from its store status and the app's info; files from before states were saved have
    only `complete` (a stopped run was 'running'); a complete run missing prompts was interrupted."""
    state = info.get("state")
    if state not in (COMPLETE, CANCELLED, FAILED, INTERRUPTED):
        if info.get("complete", status == "done"):
            state = COMPLETE
        else:
            state = {"cancelled": CANCELLED, "failed": FAILED}.get(status, INTERRUPTED)
    return INTERRUPTED if state == COMPLETE and finished < prompts else state


def place_runs(runs: list) -> tuple[dict, dict, dict]:
    """(current run per fact, partial run kept beside it, earlier runs), for runs oldest first with `.fact` and
    `.complete`: the newest complete run of each fact is current and a later partial one is kept beside it; a
    fact with no complete run shows its newest partial run; every run these replace is an earlier run."""
    current: dict[tuple, object] = {}
    partial: dict[tuple, object] = {}
    earlier: dict[tuple, list] = {}

    def retire(run):
        if run is not None:
            earlier.setdefault(_key(run.fact), []).append(run)

    for run in runs:
        key = _key(run.fact)
        if run.complete:
            retire(partial.pop(key, None))
            retire(current.get(key))
            current[key] = run
        elif key in current and current[key].complete:
            retire(partial.get(key))
            partial[key] = run
        else:
            retire(current.get(key))
            current[key] = run
    return current, partial, earlier


def _key(fact: Fact) -> tuple[str, str, str]:
    return (fact.relation, fact.subject, fact.object)


def run_neurons(run: RunRecord, t: float, p: float, exclude=frozenset()) -> tuple[list | None, str, str]:
    """(refined neurons or None, the rule applied, why None): the paper's refined set over the finished prompts
    (coarse in >= max(p x n, 3) of them); with fewer than 3 prompts in the run, the neurons coarse in every
    finished one (kn_core.neurons.case_neurons' rule), without the neurons its subject control left out (as the app
    and `kn neurons --subject-control` select them). None when a compact run's kept scores do not decide it."""
    from ..store.topscores import ScoresTooCoarseError, coarse_counts

    n = len(run.tops)
    if not n:
        return [], "no finished prompt", ""
    exclude = frozenset(exclude) | template_left_out(run.params)
    try:
        counts = coarse_counts(run.tops, t, exclude)
    except ScoresTooCoarseError as exc:
        return None, "", str(exc)
    if len(run.prompts) < kn_neurons.REFINE_MIN_PROMPTS:
        return kn_neurons.few_prompt_neurons(counts, n), f"coarse (t={t:g}) in all {n} prompt(s)", ""
    need = kn_neurons.refine_threshold(n, p)
    return ([tuple(x) for x in kn_neurons.refined_from_counts(counts, n, p, exclude)],
            f"coarse (t={t:g}) in >= max(p x n, 3) = {need:g} of {n} prompts", "")


def read_project(path, task=None) -> ProjectDocument:
    """The project file at `path` (opened read-only; ProjectError when it cannot be). Runs are read one at a time:
    each run's refined set is selected as it is read (`RunRecord.selection`) and only the runs the report draws
    keep their scores, so a 27,600-fact project is reported in the memory of a dozen runs."""
    from ..neurons import NeuronFlags
    from ..store import open_project

    with open_project(path, read_only=True) as project:
        gui = project.get_setting(GUI_SETTING, {}) or {}
        saved_flags = project.get_setting(FLAGS_SETTING) or None
        flags, note = None, "not measured: the sets keep every neuron"
        if saved_flags:
            flags = NeuronFlags.from_dict(saved_flags.get("flags") or {})
            note = (f"measured on {saved_flags.get('run_prompts', '?')} run prompts of the weights sha256 "
                    f"{str(saved_flags.get('sha256'))[:16]}")
        doc = ProjectDocument(path=str(Path(path).expanduser().absolute()),
                              factset_name=str(project.get_setting("factset.name", Path(path).stem)), facts=0,
                              relations=len(project.list_relations()), runs=[], neuron_sets=[], edit_state=None,
                              t=float(gui.get("t", DEFAULT_T)), p=float(gui.get("p", DEFAULT_P)), flags=flags,
                              flags_note=note)
        fact_records = project.list_facts()
        doc.facts = len(fact_records)
        doc.runs = _read_runs(project, {f.id: Fact(f.relation, f.subject, f.object) for f in fact_records}, doc,
                              task)
        doc.neuron_sets = [{"name": r.name or f"set {r.id}", "kind": r.kind,
                            "source": (r.params or {}).get("source", ""), "neurons": [tuple(n) for n in r.neurons]}
                           for r in project.list_neuron_sets()]
        edit_state, doc.edit_sha256 = project.load_edit_history()
        doc.edit_state = edit_state if edit_state.get("entries") else None
        doc.evaluations = project.list_evaluations()
    return doc


def drawn_runs(runs: list[RunRecord]) -> list[RunRecord]:
    """The runs whose figures the report draws: each fact's current run, the first FIGURE_RUNS of them."""
    from .figures import FIGURE_RUNS

    return [run for run in runs if run.current][:FIGURE_RUNS]


def _read_runs(project, facts: dict, doc: ProjectDocument, task) -> list[RunRecord]:
    """Every fact run, oldest first: placed from the store's records (no scores read), then each run's scores read,
    its neurons selected, and its scores kept only when the report draws it. Runs with no fact are left out."""
    models = {m.id: dict(m.info) or {"source": m.source, "sha256": m.sha256} for m in project.list_models()}
    runs, sources = [], {}
    for rec in project.list_runs():
        if rec.fact_id not in facts:
            doc.left_out.append({"what": f"stored run {rec.id}", "reason": "it has no fact of the project's fact "
                                 "set (a relation-level or deleted fact's run): the report lists fact runs only"})
            continue
        full = project.get_run(rec.id)
        finished = []
        for prompt in full.prompts:  # the finished prompts, in order, up to the first missing one
            if "scores" not in prompt.arrays:
                break
            finished.append(prompt.prompt_index)
        started = rec.info.get("started") or _epoch(rec.started_at)
        state = run_state(rec.status, rec.info, len(finished), len(full.prompts))
        run = RunRecord(fact=facts[rec.fact_id], prompts=[p.prompt.get("text", "") for p in full.prompts],
                        tops=[], done=len(finished), params=dict(rec.params), model=models.get(rec.model_id, {}),
                        started=float(started), seconds=rec.elapsed_s or 0.0, state=state,
                        edits=list(rec.info.get("edits", [])), name=str(rec.info.get("name", "")))
        runs.append(run)
        sources[id(run)] = (rec.id, finished)
    runs = mark_current(sorted(runs, key=lambda r: r.started))
    drawn = {id(run) for run in drawn_runs(runs)}
    for i, run in enumerate(runs):
        if task is not None:
            task.check()
            task.progress(i / max(1, len(runs)), f"reading run {i + 1}/{len(runs)}")
        run_id, finished = sources[id(run)]
        tops = project.load_top_scores(run_id, "scores")
        run.tops = [tops[k] for k in finished]
        run.selection = run_neurons(run, doc.t, doc.p, doc.excluded)
        if id(run) not in drawn:
            run.tops = run.tops[:0]  # selected: the scores are not needed again
    return runs


def mark_current(runs: list[RunRecord]) -> list[RunRecord]:
    """Sets `current` on the run each fact's sets come from (`place_runs`); returns `runs`."""

    current, _, _ = place_runs(runs)
    chosen = {id(run) for run in current.values()}
    for run in runs:
        run.current = id(run) in chosen
    return runs


def _epoch(iso: str | None) -> float:
    """The store's ISO start time as seconds (runs saved before the app recorded its own start time)."""
    try:
        return datetime.datetime.fromisoformat(iso).timestamp() if iso else 0.0
    except ValueError:
        return 0.0
