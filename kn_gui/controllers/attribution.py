"""Attribution runs and answer checks: worker jobs that fill the session, reported as typed events.

A re-run never loses the run it replaces: while it runs it is the fact's current run (the plots stream it); if
it stops early, the earlier complete run comes back and the stopped one is kept beside it as a partial run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from PySide6.QtCore import QObject, Signal

from kn_core.facts import Fact

from ..session import CANCELLED, COMPLETE, FAILED, NeuronSet, Run, Session, TooCoarse, fact_key, fact_label
from ..worker import JobRunner
from . import UserError

AUTO_CHECK_PROMPTS = 400  # beyond this many prompts a check is left to the user (it takes a while)


@dataclass(frozen=True)
class ChunkReady:
    """A layer chunk of the prompt being attributed, before the prompt is complete."""
    run: Run
    prompt: int
    layers: tuple[int, int]
    scores: np.ndarray


@dataclass(frozen=True)
class PromptScored:
    """Sent by the job (worker thread); the controller appends the result to the run in the main thread."""
    run: Run
    prompt: int
    result: object  # kn_core.attribution.PromptScores


@dataclass(frozen=True)
class PromptDone:
    run: Run
    prompt: int


@dataclass(frozen=True)
class RunFinished:
    run: Run


@dataclass(frozen=True)
class RunsStopped:
    """The job ended early (cancelled or failed): `kept` finished prompts of `total` are kept as partial runs."""
    runs: list[Run]
    outcome: str  # "cancelled" | "failed"
    kept: int
    total: int


@dataclass(frozen=True)
class AllDone:
    runs: list[Run]
    prompts: int


@dataclass(frozen=True)
class ChecksDone:
    facts: list[Fact]
    prompts: int
    correct: int


@dataclass(frozen=True)
class ChecksCleared:
    """The model changed and the answer checks of `facts` facts were dropped, too many to measure again at once."""
    facts: int


@dataclass(frozen=True)
class FlagsMeasured:
    """Massive / unspecific neurons and activation statistics of the loaded model, now in the session."""
    flags: object  # kn_core.neurons.NeuronFlags
    prompts: int  # run prompts measured (besides the neutral sentences)
    left_out: str = ""  # compactly stored facts left out of the unspecific flag, and why ("" when none)


@dataclass(frozen=True)
class SubjectControlled:
    """A run's subject control (kn_core.specificity), now in `run.params["subject_control"]`."""
    run: Run
    control: dict  # SubjectControl.to_dict()


def no_prompts_fix(kind: str, prefix_helps: bool) -> str:
    """What to change when no template of a fact gives a prompt (kn_core.facts.render_prompts' rules);
    `prefix_helps`: end-only templates are in use and prefix ones would give prompts."""
    if kind != "causal":
        return "Fix the relation's templates (each needs [X] and [Y]) or the facts."
    if prefix_helps:
        return ("Set templates to prefix (beside Run) to use templates with text after [Y], or add templates "
                "that end with [Y].")
    return "Add templates that name [X] before [Y]: a causal model continues the text before [Y]."


def decided_scores(by_relation: dict, t: float, massive) -> tuple[dict, str]:
    """Session.flag_inputs' stored scores (`Run.stored`) as arrays for neurons.scored_flags: a compact fact is
    kept when its coarse sets at t with the massive neurons excluded are decided by the kept scores (its unkept
    ones at -inf), else left out and counted in the returned note."""
    out, dropped, reason = {}, 0, ""
    for relation, facts in by_relation.items():
        for stored in facts:
            try:
                arrays = stored.decided_arrays(t, massive)
            except TooCoarse as exc:
                dropped, reason = dropped + 1, str(exc)
                continue
            out.setdefault(relation, []).append(arrays)
    return out, (f"{dropped} compactly stored fact(s) left out of the unspecific flag: {reason}" if dropped else "")


class AttributionController(QObject):
    event = Signal(object)

    def __init__(self, session: Session, runner: JobRunner, active_edits: Callable[[], list[str]], parent=None):
        super().__init__(parent)
        self.session = session
        self.runner = runner
        self.active_edits = active_edits  # descriptions of the model edits in force now
        self.running: list[Run] = []
        self._replaced: dict = {}  # fact key -> the run a running one replaces once it completes
        self._stale: list[Fact] = []  # facts whose answer checks a model change dropped

    # ----------------------------------------------------------------------------------------- attribution
    def start(self, facts: list[Fact], params, hold_out: int = 0) -> list[Run]:
        """Queues one job attributing every prompt of `facts`, but for `hold_out` templates of each fact kept for
        measuring generality (kn_core.metrics.held_out_templates, drawn with the params' seed, recorded in the
        run's params); raises UserError when none has usable prompts or too few would be left."""
        s = self.session
        if s.lm is None:
            raise UserError("No model loaded", "Load a model first: Model panel \u2192 Load model (Ctrl+L). The "
                            "embedded default works offline.")
        lm = s.lm
        edits = list(self.active_edits())
        runs, skipped, prefix_helps = [], [], False
        for fact in facts:
            prompts, skips = s.prompts_for(fact)
            if not prompts:
                reasons = "; ".join(sk.reason for sk in skips[:2]) or "the relation has no templates"
                skipped.append(f"{fact_label(fact)} ({reasons})")
                prefix_helps |= bool(lm.kind == "causal" and s.prompts_for(fact, "prefix")[0])
                continue
            held = self._held_out(fact, prompts, hold_out, params.seed)
            # held-out templates recorded only when there are some: a run of every template keeps the params that
            # `kn attribute --facts` resumes from
            runs.append(Run(fact=fact, prompts=[p for p in prompts if p.template not in held], model=lm.describe(),
                            params={**params.to_dict(), **s.prompt_params(),
                                    **({"held_out_templates": list(held)} if held else {})}, edits=edits))
        if not runs:
            raise UserError("Nothing to attribute", "No usable prompts for: " + "; ".join(skipped) + ". "
                            + no_prompts_fix(lm.kind, prefix_helps))
        previous = {fact_key(r.fact): s.runs.get(fact_key(r.fact)) for r in runs}
        self._replaced = dict(previous)
        for run in runs:
            s.runs[fact_key(run.fact)] = run
        self.running = runs
        total = sum(len(r.prompts) for r in runs)
        from kn_core.runner import attribute_each

        def job(task):  # the runner's loop (kn attribute --facts), with its throughput and ETA, into the session
            attribute_each(lm, [(r.fact, r.prompts) for r in runs], params, task=task,
                           on_prompt=lambda i, k, result: task.partial(PromptScored(runs[i], k, result)),
                           on_chunk=lambda i, c: task.partial(ChunkReady(runs[i], c["prompt"], tuple(c["layers"]),
                                                                         c["scores"])))
            return len(runs)

        def stopped(outcome):
            self.running = []
            for run in runs:
                if run.state != COMPLETE:
                    self._keep_stopped(run, previous.get(fact_key(run.fact)), outcome)
            self.event.emit(RunsStopped(runs, outcome, sum(len(r.scores) for r in runs if not r.complete), total))

        def finished(_):
            self.running = []
            self.event.emit(AllDone(runs, total))

        self.runner.submit(f"Attribution ({total} prompts)", job, on_done=finished, on_partial=self._partial,
                           on_cancel=lambda: stopped("cancelled"), on_error=lambda m, tb: stopped("failed"),
                           uses=("model", "session"))
        return runs

    @staticmethod
    def _held_out(fact: Fact, prompts, hold_out: int, seed) -> tuple[str, ...]:
        from kn_core.metrics import held_out_templates

        try:
            return held_out_templates([p.template for p in prompts], hold_out, int(seed or 0))
        except ValueError as exc:
            raise UserError("Cannot hold out templates", f"{fact_label(fact)}: {exc}.") from exc

    def _partial(self, item):
        if isinstance(item, ChunkReady):
            self.event.emit(item)
            return
        run = item.run
        run.scores.append(item.result)
        run.seconds += item.result.seconds
        self.session.results_dirty = True
        if len(run.scores) == len(run.prompts):
            run.state = COMPLETE
            key = fact_key(run.fact)  # the runs it supersedes stay in the project as earlier runs
            self.session.keep_earlier(self.session.partial_runs.pop(key, None))
            self.session.keep_earlier(self._replaced.pop(key, None))
        self.event.emit(PromptDone(run, item.prompt))
        if run.complete:
            self.event.emit(RunFinished(run))

    def _keep_stopped(self, run: Run, previous: Run | None, outcome: str):
        """A run that stopped early never replaces a complete one: the complete one comes back and the stopped
        one, if it finished any prompt, is kept beside it marked partial."""
        s, key = self.session, fact_key(run.fact)
        run.state = CANCELLED if outcome == "cancelled" else FAILED
        if previous is not None and (previous.complete or not run.scores):
            s.runs[key] = previous
            if run.scores:
                s.keep_earlier(s.partial_runs.get(key))
                s.partial_runs[key] = run
        elif run.scores:
            s.keep_earlier(previous)  # an earlier partial run: kept too
            s.runs[key] = run
        else:
            s.runs.pop(key, None)

    # ----------------------------------------------------------------------------------------- flags
    def measure_flags(self) -> bool:
        """Queues a job measuring the loaded model's activation statistics (the runs' prompts plus neutral
        sentences) and flagging massive / unspecific neurons (kn_core.neurons); FlagsMeasured follows. False when
        there is no model or no run to measure on."""
        s = self.session
        lm = s.lm
        activations, by_relation = s.flag_inputs()
        if lm is None or not (activations or by_relation):
            return False
        t = s.t
        from kn_core.neurons import flag_massive, run_stats, scored_flags

        def job(task):  # run_flags(lm, activations, by_relation, t), keeping the statistics for mean ablation
            stats = run_stats(lm, activations, task)
            scores, left_out = decided_scores(by_relation, t, flag_massive(stats))
            return stats, scored_flags(stats, scores, t), left_out

        def done(result):
            if s.lm is not lm:  # the model changed meanwhile: these describe the old one
                return
            s.activation_stats, s.flags, left_out = result
            s.flags_measured_on = len(activations)
            self.event.emit(FlagsMeasured(s.flags, len(activations), left_out))

        self.runner.submit("Flagging massive / unspecific neurons", job, on_done=done)
        return True

    # ----------------------------------------------------------------------------------------- the model
    def set_model(self, lm):
        """`lm` is the session's model: the old one's answer checks and flags never describe it (the opened
        project's checks come back when they were made on these weights)."""
        s = self.session
        s.lm = lm
        s.checks.clear()
        s.restore_checks()  # the opened project's, when they were made on these weights
        s.reset_flags()

    def set_prompt_format(self, mode: str) -> bool:
        """The loaded model encodes prompts in `mode` from now on (kn_core.encoding); True when that changed its
        inputs (the answer checks and flags are dropped). A model that cannot (no chat template, a masked model)
        is set back to plain: UserError saying why. False without a model."""
        from kn_core.encoding import PromptError, set_prompt_format

        self.session.prompt_format = mode  # the window's choice, saved with the project
        lm = self.session.lm
        if lm is None:
            return False
        before = lm.prompt_format
        try:
            set_prompt_format(lm, mode)
        except PromptError as exc:
            set_prompt_format(lm, "plain")
            self.session.prompt_format = "plain"
            raise UserError("Prompts stay plain", f"Prompts stay plain: {exc}") from exc
        if lm.prompt_format == before:
            return False
        self.session.checks.clear()
        self.session.reset_flags()
        return True

    # ----------------------------------------------------------------------------------------- the selection rule
    def change_selection(self, run: Run | None, **change) -> str:
        """Applies t, p or keep_massive to the session when the shown `run`'s stored scores decide its sets with
        them (full scores always do); a compactly stored run that cannot keeps the last valid values, and the
        returned line says why ("" when applied)."""
        s = self.session
        before = {key: getattr(s, key) for key in change}
        for key, value in change.items():
            setattr(s, key, value)
        if run is None or not run.scores:
            return ""
        try:
            s.refined(run)
        except TooCoarse as exc:
            for key, value in before.items():
                setattr(s, key, value)
            return f"Kept t = {s.t:.2f}: {exc}"
        return ""

    def set_causal_templates(self, mode: str):
        """Causal models' prompts from now on: every template cut before [Y], or only those ending in it."""
        self.session.causal_templates = mode

    # ----------------------------------------------------------------------------------------- neuron sets
    def update_auto_sets(self, run: Run) -> bool:
        """The fact's refined neurons and the union of its coarse ones as named sets, in step with t and p."""
        if not run.scores:
            return False
        s, label = self.session, fact_label(run.fact)
        try:
            refined = s.refined(run)
            coarse = sorted({n for i in range(len(run.scores)) for n in s.coarse(run, i)})
        except TooCoarse:  # the sets stay as they were; the attribution panel says why
            return False
        s.put_set(NeuronSet(f"refined: {label}", "refined", refined, f"{run.fact.relation}, t={s.t:.2f} p={s.p:.2f}"))
        s.put_set(NeuronSet(f"coarse: {label}", "coarse", coarse, f"{run.fact.relation}, t={s.t:.2f}"))
        return True

    def adapt_p(self, fact: Fact | None):
        """The paper's adaptive p for the fact's relation (kn_core.neurons.adapt_p over its runs)."""
        if fact is None:
            raise UserError("No fact selected", "Pick a fact of the relation whose p should be adapted.")
        try:
            return self.session.adapt_p(fact.relation)
        except ValueError as exc:  # TooCoarse included: a compact run's kept scores do not decide the sets
            raise UserError("Cannot adapt p", str(exc)) from exc

    def subject_control(self, run: Run | None) -> None:
        """The subject-specificity control of a complete run's refined neurons (kn_core.specificity.subject_control,
        as `kn neurons --subject-control`: the fact's templates with 3 other subjects of its relation, scored as
        the run was, on the candidates' layers only), as a worker job. The result goes into the run's params, so
        it is saved with the run; the flagged ("template") neurons leave its refined set (Session.refined) and are
        marked on the map. UserError before any work when there is nothing to control."""
        from kn_core.attribution import AttributionParams
        from kn_core.specificity import subject_control

        s, lm = self.session, self.session.lm
        if lm is None:
            raise UserError("No model", "Load a model first.")
        if run is None or run.state != COMPLETE:
            raise UserError("No complete run", "Run attribution on the fact first: the control re-scores its "
                            "refined neurons.")
        try:
            candidates = run.stored().refined(s.t, s.p, s.excluded())
        except TooCoarse as exc:
            raise UserError("Cannot control this run", str(exc)) from exc
        if not candidates:
            raise UserError("No refined neurons", "The run has no refined neurons at this t and p to control.")
        now = list(self.active_edits())
        if now != list(run.edits):  # the control re-scores the run's own prompts: on other weights it compares apples
            made = f"{len(run.edits)} active edit(s)" if run.edits else "the model's own weights"
            raise UserError("Not the run's weights", f"The run was made on {made}; the model has {len(now)} active "
                            "edit(s) now. Go back in the edit history to the run's weights, or run the fact again.")
        params = AttributionParams.from_dict(run.params)
        fact, prompts, factset = run.fact, list(run.prompts), s.factset
        templates = run.params.get("causal_templates", s.causal_templates)

        def job(task):
            return subject_control(lm, factset, fact, prompts, candidates, params, causal_templates=templates,
                                   task=task)

        def done(control):
            record = {**control.to_dict(), "t": s.t, "p": s.p}
            run.params = {**run.params, "subject_control": record}
            s.results_dirty = True
            self.event.emit(SubjectControlled(run, record))

        self.runner.submit(f"Subject control of {fact_label(fact)}", job, on_done=done, uses=("model",))

    def relation_set(self, fact: Fact | None) -> NeuronSet:
        """The relation's neurons: refined for at least 10% of its attributed facts."""
        if fact is None:
            raise UserError("No fact selected", "Pick a fact of the relation first.")
        runs = self.session.relation_runs(fact.relation)
        if not runs:
            raise UserError("No runs", f"Run attribution on some facts of {fact.relation} first.")
        try:
            neurons = self.session.relation_level(fact.relation)
        except TooCoarse as exc:
            raise UserError("Cannot make the relation's neurons", str(exc)) from exc
        rel = self.session.factset.relations.get(fact.relation)
        name = f"relation: {fact.relation} {rel.name if rel else ''}".strip()
        return NeuronSet(name, "relation", [n for n, _ in neurons], f"{len(runs)} facts, \u2265 10%")

    # ----------------------------------------------------------------------------------------- answer checks
    def check(self, facts: list[Fact]) -> bool:
        """Queues a job asking the model for each prompt's answer; False when there is nothing to check."""
        s = self.session
        if s.lm is None:
            raise UserError("No model loaded", "Load a model first: Model panel \u2192 Load model (Ctrl+L).")
        lm = s.lm
        items = [p for fact in facts for p in s.prompts_for(fact)[0]]
        if not items:
            return False
        edits = list(self.active_edits())  # the weights answering: a run's note reads only checks of its weights
        from kn_core.evaluation import answer_probabilities

        def job(task):
            results = answer_probabilities(lm, items, task=task)
            return list(zip(items, results))

        def done(pairs):
            if s.lm is not lm:
                return
            touched = []
            for prompt, result in pairs:
                s.checks[(fact_key(prompt.fact), prompt.template)] = {
                    "correct": bool(result["correct"]), "prob": float(result["prob"]),
                    "top1_token": result["top1_token"], "edits": edits}
                if prompt.fact not in touched:
                    touched.append(prompt.fact)
            self.event.emit(ChecksDone(touched, len(pairs), sum(r["correct"] for _, r in pairs)))

        # one fact's prompts (what picking a fact checks) take about a second: a run may queue behind them
        self.runner.submit(f"Checking {len(items)} prompts", job, on_done=done, quick=len(facts) == 1)
        return True

    def prompt_count(self, facts: list[Fact]) -> int:
        fs = self.session.factset
        return sum(len(fs.relations[f.relation].templates) for f in facts if f.relation in fs.relations)

    def model_changed(self):
        """The weights changed (edit, undo, redo): the answer checks describe the old weights. They are dropped
        at once (never shown for the wrong weights); `recheck()` measures the same facts again."""
        s = self.session
        checked = {key[0] for key in s.checks}
        self._stale += [f for f in s.factset.facts if fact_key(f) in checked and f not in self._stale]
        s.checks.clear()

    def recheck(self):
        """Measures again the facts whose checks the last model changes dropped, when that is quick."""
        facts, self._stale = self._stale, []
        facts = [f for f in facts if f in set(self.session.factset.facts)]
        again = self.session.lm is not None and 0 < self.prompt_count(facts) <= AUTO_CHECK_PROMPTS
        if again:
            self.check(facts)
        elif facts:
            self.event.emit(ChecksCleared(len(facts)))
