"""Attributing a whole fact set into a project: every fact's prompts attributed, its scores and refined neurons
stored per fact, resumable (`attribute_factset`, behind `kn attribute --facts` and the GUI's "Run selected
facts" through `attribute_each`).

- Resume: a fact whose run finished `done` on the same weights (sha256, dtype) with the same attribution
  parameters and the same causal templates (`run_params`: what the GUI records too) is skipped (`Project.completed_runs`), so a killed run, started again, goes on where it stopped
  and never stores a fact's run twice. A fact is stored in one transaction (its run, every prompt's scores,
  its refined set), so a run cut off mid-fact leaves nothing of that fact and it is attributed again.
- Facts with no usable prompt are listed with the reason (`SkippedFact`), never dropped silently; so is a fact
  whose attribution gave NaN or infinite scores (`RunnerReport.failed`: not stored, tried again on resume). If
  the first NON_FINITE_LIMIT facts all do, the run stops (`NonFiniteRunError`): then it is the model's dtype.
- Where the work runs is a backend: `SerialBackend` (this process) or `cluster.RayBackend` (Ray workers). Both
  attribute with the same `FactAttributor`, so results are bitwise equal; only this process writes to the
  project (SQLite keeps one writer), and an outcome that arrives twice (a retried worker) is stored once.
- Progress (with throughput and ETA) and cancel go through `kn_core.tasks.Task`.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Sequence

from .facts import CAUSAL_TEMPLATES, Fact, FactSet, Prompt, render_prompts
from .encoding import prompt_format
from .tasks import Task, as_task
from .selection import NeuronSelection
from .validation import ValidationError, check_choice


NON_FINITE_LIMIT = 3  # facts in a row with NaN scores before any stored one: the model's dtype, not the facts


class NonFiniteRunError(ArithmeticError):
    """Every fact so far gave NaN or infinite scores: the run stops instead of listing the whole fact set."""


@dataclass(frozen=True)
class FactWork:
    """One fact to attribute: `index` is its place in the plan (how a worker's answer finds its fact)."""
    index: int
    fact: Fact
    prompts: tuple[Prompt, ...]


@dataclass(frozen=True)
class SkippedFact:
    fact: Fact
    reason: str

    def to_dict(self) -> dict:
        return {"relation": self.fact.relation, "subject": self.fact.subject, "object": self.fact.object,
                "reason": self.reason}


@dataclass
class FactOutcome:
    """What attributing one fact gives, wherever it ran."""
    index: int
    results: list  # attribution.PromptScores, one per prompt
    refined: list  # [(layer, neuron)]
    massive: list  # the fact's massive neurons (left out of `refined` unless keep_massive)
    seconds: float
    worker: str  # host:pid that computed it
    device: str
    error: str | None = None  # the fact could not be attributed (NaN or infinite scores): listed, not stored


def select_relations(factset: FactSet, relations: str | Iterable[str] | None = "all") -> list[str]:
    """The relation ids to run: "all" (or None) -> every relation; else a list or "R1,R2"; unknown ones are a
    KeyError naming what the fact set has; a selection naming none ("", ",,", []) is a ValidationError."""
    if relations is None:
        return list(factset.relations)
    given = relations
    if isinstance(relations, str):
        relations = relations.split(",")
    relations = list(relations) if isinstance(relations, Iterable) else relations
    if not isinstance(relations, list) or not all(isinstance(r, str) for r in relations):
        raise ValidationError(f"relations = {given!r} is not allowed: expected 'all', 'R1,R2' or a list of "
                              f"relation ids")
    chosen = list(dict.fromkeys(r.strip() for r in relations if r.strip()))
    if not chosen:  # ",," or [] is a slip, not a request for every relation
        raise ValidationError(f"relations = {given!r} names no relation: give 'all' or relation ids R1,R2")
    if [r.lower() for r in chosen] == ["all"]:
        return list(factset.relations)
    missing = [r for r in chosen if r not in factset.relations]
    if missing:
        raise KeyError(f"no relation {', '.join(missing)} in fact set {factset.name!r}; "
                       f"it has {', '.join(sorted(factset.relations))}")
    return chosen


def plan_facts(factset: FactSet, relations, tokenizer, kind: str,
               causal_templates: str = "prefix") -> tuple[list[FactWork], list[SkippedFact]]:
    """Every fact of the chosen relations with its usable prompts (`facts.render_prompts` with
    `causal_templates`); a fact without any is a SkippedFact whose reason gives each template's."""
    chosen = set(select_relations(factset, relations))
    work, skipped = [], []
    for fact in factset.facts:
        if fact.relation not in chosen:
            continue
        relation = factset.relation(fact.relation)
        prompts, skips = render_prompts(fact, relation, tokenizer, kind, causal_templates)
        if prompts:
            work.append(FactWork(len(work), fact, tuple(prompts)))
        else:
            reasons = "; ".join(f"{s.template!r}: {s.reason}" for s in skips) or "its relation has no templates"
            skipped.append(SkippedFact(fact, f"no usable prompt ({reasons})"))
    return work, skipped


def prompt_params(kind: str, causal_templates: str, prompt_format: str = "plain") -> dict:
    """How a run's prompts were rendered, recorded in its params by the runner and the GUI alike: the causal
    templates choice for a causal model, None for a masked one (its templates are used whole); and
    "prompt_format": "chat" for chat-rendered prompts (absent: plain, as every run before the option)."""
    return {"causal_templates": causal_templates if kind == "causal" else None,
            **({"prompt_format": "chat"} if prompt_format == "chat" else {})}


def run_params(params, kind: str, causal_templates: str = "prefix", prompt_format: str = "plain") -> dict:
    """A run's recorded params: the attribution parameters and how its prompts were rendered (what resume
    matches on)."""
    return {**params.to_dict(), **prompt_params(kind, causal_templates, prompt_format)}


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class FactAttributor:
    """Attributes one fact at a time on a loaded model: its prompts, then its refined neurons with the fact's
    massive neurons flagged as `kn neurons` does (its prompts' activations plus the neutral sentences, which are
    measured once). The same code runs in this process and in every Ray worker."""

    def __init__(self, lm, params, selection: NeuronSelection):
        self.lm, self.params, self.selection = lm, params, selection
        self._neutral: list | None = None

    def __call__(self, work: FactWork, task: Task | None = None,
                 on_prompt: Callable[[int, object], None] | None = None) -> FactOutcome:
        from .attribution import attribute_fact
        from .neurons import ActivationStats, answer_activations, neutral_sentences, refined_neurons, scored_flags

        from .attribution import NonFiniteScoresError

        started = time.perf_counter()
        try:
            results = attribute_fact(self.lm, work.prompts, self.params, task=task, on_prompt=on_prompt)
        except NonFiniteScoresError as exc:  # this fact only: the driver lists it and goes on (see NON_FINITE_LIMIT)
            return FactOutcome(work.index, [], [], [], time.perf_counter() - started, worker_name(),
                               str(self.lm.device), error=str(exc))
        if self._neutral is None:
            self._neutral = answer_activations(self.lm, neutral_sentences())
        activations = [r.activations for r in results]
        stats = ActivationStats.from_activations(  # = neurons.run_stats without measuring the neutral set again
            activations + self._neutral, source=f"{len(activations)} run prompts + {len(self._neutral)} neutral sentences")
        massive = sorted(scored_flags(stats).excluded)
        sel = self.selection
        refined = refined_neurons([r.scores for r in results], sel.t, sel.p, exclude=() if sel.keep_massive else massive)
        return FactOutcome(work.index, results, refined, massive, time.perf_counter() - started, worker_name(),
                           str(self.lm.device))


class Progress:
    """Throughput and ETA over the facts attributed in this session (facts stored before are not counted)."""

    def __init__(self, task: Task, works: Sequence[FactWork], already: int):
        self.task, self.already = task, already
        self.total_facts = len(works)
        self.total_prompts = sum(len(w.prompts) for w in works) or 1
        self.facts = self.prompts = 0
        self.started = time.perf_counter()

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def facts_per_hour(self) -> float | None:
        return 3600 * self.facts / self.elapsed if self.facts and self.elapsed > 0 else None

    def message(self) -> str:
        if self.total_facts == 1 and not self.already:
            return ""  # one fact: its own progress says it all
        parts = [f"{self.facts}/{self.total_facts} facts"]
        if self.already:
            parts.append(f"{self.already} stored before")
        rate = self.facts_per_hour()
        if rate is not None:
            left = (self.total_prompts - self.prompts) * self.elapsed / max(self.prompts, 1)
            parts += [f"{rate:.3g} facts/h", f"ETA {format_seconds(left)}"]
        return ", ".join(parts)

    def within(self, work: FactWork, fraction: float, detail: str = "") -> None:
        """Part of one fact done (the serial backend reports inside a fact)."""
        done = (self.prompts + fraction * len(work.prompts)) / self.total_prompts
        label = f"attributing {work.fact.relation} {work.fact.subject}" + (f": {detail}" if detail else "")
        summary = self.message()
        self.task.progress(done, f"{label}; {summary}" if summary else label)

    def fact_done(self, work: FactWork) -> None:
        self.facts += 1
        self.prompts += len(work.prompts)
        self.task.progress(self.prompts / self.total_prompts, self.message())


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 3600:
        return f"{seconds // 60}:{seconds % 60:02d}"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class SerialBackend:
    """Every fact in this process, one after another, on the driver's loaded model."""
    name = "serial"

    def describe(self) -> dict:
        return {"backend": self.name, "workers": 1}

    def outcomes(self, lm, works: Sequence[FactWork], params, selection: NeuronSelection, progress: Progress,
                 task: Task) -> Iterator[FactOutcome]:
        yield from (outcome for _, outcome in one_by_one(works, progress, task, FactAttributor(lm, params, selection)))


def one_by_one(works: Sequence[FactWork], progress: Progress, task: Task, attribute_one: Callable,
               on_partial: Callable[[int, object], None] | None = None) -> Iterator[tuple[FactWork, object]]:
    """The one fact-by-fact loop in this process (the serial backend's and `attribute_each`'s): (work,
    `attribute_one(work, task)`) for each fact in turn, cancel checked between facts, each fact's progress
    relayed as part of the run's (`Progress.within`) and its partial results to `on_partial(work.index, ...)`."""
    for work in works:
        task.check()
        partial = None if on_partial is None else (lambda result, i=work.index: on_partial(i, result))
        inner = task.relay(lambda fraction, message, work=work: progress.within(work, fraction or 0.0, message),
                           partial)
        yield work, attribute_one(work, inner)


@dataclass
class RunnerReport:
    facts: int  # of the chosen relations
    attributed: int = 0  # in this session
    already_stored: int = 0
    skipped: list[SkippedFact] = field(default_factory=list)  # no usable prompt
    failed: list[SkippedFact] = field(default_factory=list)  # attributed, but NaN or infinite scores: not stored
    prompts: int = 0
    seconds: float = 0.0
    facts_per_hour: float | None = None
    backend: dict = field(default_factory=dict)
    run_ids: list[int] = field(default_factory=list)
    duplicates_ignored: int = 0

    def to_dict(self) -> dict:
        return {"facts": self.facts, "attributed": self.attributed, "already_stored": self.already_stored,
                "skipped": [s.to_dict() for s in self.skipped], "failed": [s.to_dict() for s in self.failed],
                "prompts": self.prompts, "seconds": self.seconds,
                "facts_per_hour": self.facts_per_hour,
                "prompts_per_hour": 3600 * self.prompts / self.seconds if self.prompts and self.seconds > 0 else None,
                "backend": self.backend, "run_ids": self.run_ids, "duplicates_ignored": self.duplicates_ignored}


def _store(project, lm, work: FactWork, outcome: FactOutcome, recorded: dict, selection: NeuronSelection) -> int:
    """One fact's run (every prompt's scores, status `done`) and its refined set in one transaction: a driver
    killed while storing leaves nothing of the fact, and it is attributed again when the run resumes. One commit
    per fact (not one per prompt), so a cluster's driver is not held up by the disk."""
    info = {"runner": {"worker": outcome.worker, "seconds": outcome.seconds}}
    # the compact "top" form is for fact sets the size of PARAREL: activations (float16, 85 kB a prompt, 15x its top
    # scores) would make it ~20 GB, so there it keeps scores only; the fact's massive neurons are in its refined set
    compact = project.score_storage()["form"] == "top"
    fact = work.fact
    with project.atomic(f"storing {fact.relation} {fact.subject!r}"):
        run_id = project.start_run(fact=fact, prompts=work.prompts, params=recorded, model=lm, device=outcome.device,
                                   info=info)
        for k, r in enumerate(outcome.results):
            project.add_prompt_result(run_id, k, scores=r.scores, activations=None if compact else r.activations,
                                      prob=r.prob, completeness=r.completeness, seconds=r.seconds)
        project.finish_run(run_id, "done", elapsed_s=outcome.seconds)  # the attribution's time, not the storing's
        project.add_neuron_set("refined", outcome.refined, fact=fact, run_ids=[run_id], model=lm,
                               params={**selection.to_dict(), **recorded,
                                       "massive": [list(n) for n in outcome.massive]})
    return run_id


def attribute_factset(project, lm, factset: FactSet, params=None, *, relations="all",
                      selection: NeuronSelection | None = None, backend=None, task: Task | None = None,
                      on_fact: Callable[[FactWork, int], None] | None = None,
                      causal_templates: str = "prefix",
                      before_first_store: Callable[[], None] | None = None) -> RunnerReport:
    """Attributes every fact of `relations` into `project` (see the module's doc); returns what it did.
    `causal_templates` ("prefix" or "end-only", facts.CAUSAL_TEMPLATES) renders a causal model's prompts.

    `lm` is the driver's model: it renders the prompts and names the weights (its sha256) that resume matches
    on; `backend` (default `SerialBackend()`) also uses it to compute. `on_fact(work, run_id)` is called after
    each fact is stored. Cancelling the task raises tasks.Cancelled; every fact stored before stays.

    Nothing is written before the first fact is stored: the model, the fact set and `before_first_store()` (e.g.
    a score-storage setting) commit with it, so a run that stores no fact leaves the project as it was."""
    from .attribution import AttributionParams

    params = params or AttributionParams()
    check_choice("causal_templates", causal_templates, CAUSAL_TEMPLATES)
    selection = selection or NeuronSelection()
    if not isinstance(params, AttributionParams) or not isinstance(selection, NeuronSelection):
        raise ValidationError(f"expected AttributionParams and a NeuronSelection, got {type(params).__name__} and "
                              f"{type(selection).__name__}")
    backend = backend or SerialBackend()
    task = as_task(task)
    works, skipped = plan_facts(factset, relations, lm.tokenizer, lm.kind, causal_templates)
    chosen = select_relations(factset, relations)
    report = RunnerReport(facts=len(works) + len(skipped), skipped=skipped, backend=backend.describe())
    known = {(f.relation, f.subject, f.object): f.id for f in project.list_facts()}  # reads only
    fact_ids = [known.get((w.fact.relation, w.fact.subject, w.fact.object)) for w in works]

    def setup() -> None:  # in the first stored fact's transaction
        project.add_model(lm)
        project.add_facts([w.fact for w in works], [factset.relation(r) for r in chosen])
        if before_first_store is not None:
            before_first_store()

    recorded = run_params(params, lm.kind, causal_templates, prompt_format(lm))
    completed = project.completed_runs(lm, recorded)
    if (lm.kind != "causal" or causal_templates == "prefix") and prompt_format(lm) == "plain":  # runs stored before the choice was recorded
        completed = {**project.completed_runs(lm, params.to_dict()), **completed}  # rendered these prompts
    pending = [w for w, fid in zip(works, fact_ids) if fid is None or fid not in completed]
    report.already_stored = len(works) - len(pending)
    progress = Progress(task, pending, report.already_stored)
    task.progress(0.0, progress.message())
    stored: set[int] = set()
    by_index = {w.index: w for w in pending}
    outcomes = backend.outcomes(lm, pending, params, selection, progress, task) if pending else (o for o in ())
    with contextlib.closing(outcomes):  # a stop here (cancel, Ctrl-C, an error) lets the backend end its workers
        for outcome in outcomes:
            work = by_index[outcome.index]
            if outcome.index in stored:  # a retried worker answered twice: the fact is stored once
                report.duplicates_ignored += 1
                continue
            if outcome.error is not None:
                stored.add(outcome.index)
                report.failed.append(SkippedFact(work.fact, outcome.error))
                progress.fact_done(work)
                if not report.attributed and len(report.failed) >= NON_FINITE_LIMIT:
                    raise NonFiniteRunError(f"the first {len(report.failed)} facts all gave NaN or infinite scores, "
                                            f"e.g. {outcome.error}")
                continue
            with project.atomic("storing the run's first fact") if not report.attributed else contextlib.nullcontext():
                if not report.attributed:
                    setup()
                run_id = _store(project, lm, work, outcome, recorded, selection)
            stored.add(outcome.index)
            report.run_ids.append(run_id)
            report.attributed += 1
            report.prompts += len(work.prompts)
            progress.fact_done(work)
            if on_fact is not None:
                on_fact(work, run_id)
    missing = [w for w in pending if w.index not in stored]
    if missing:  # a backend that ended early without saying why must not pass for a finished run
        raise RuntimeError(f"the {report.backend['backend']} backend returned no result for {len(missing)} fact(s), "
                           f"e.g. {missing[0].fact.relation} {missing[0].fact.subject!r}; run again to resume")
    report.seconds = progress.elapsed
    report.facts_per_hour = progress.facts_per_hour()
    return report


def attribute_each(lm, items: Sequence[tuple[Fact, Sequence[Prompt]]], params, *, task: Task | None = None,
                   on_prompt: Callable[[int, int, object], None] | None = None,
                   on_chunk: Callable[[int, dict], None] | None = None) -> list[list]:
    """The facts' prompts in this process, one fact after another, with the runner's progress (throughput,
    ETA) and without a project: what the GUI's "Run selected facts" runs. `on_prompt(i, k, result)` as prompt k
    of fact i is ready; `on_chunk(i, partial)` for each chunk of layers (`attribute`'s partial results)."""
    from .attribution import attribute_fact

    task = as_task(task)
    works = [FactWork(i, fact, tuple(prompts)) for i, (fact, prompts) in enumerate(items)]
    progress = Progress(task, works, 0)

    def attribute_one(work: FactWork, inner: Task) -> list:
        return attribute_fact(lm, work.prompts, params, task=inner, on_prompt=None if on_prompt is None else
                              (lambda k, r, i=work.index: on_prompt(i, k, r)))

    out = []
    for work, results in one_by_one(works, progress, task, attribute_one, on_chunk):
        out.append(results)
        progress.fact_done(work)
    return out
