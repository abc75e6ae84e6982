"""The document behind the window: fact set, per-prompt checks, attribution runs, thresholds, neuron sets.

Plain Python (no widgets) so it is easy to test and to save. Coarse and refined sets are views over the stored
scores recomputed from t and p through the engine's pure functions. Runs read from a project that stores its
scores compactly (kn_core/store/topscores.py) keep them as `Run.compact`; their arrays hold NaN where a score was
not kept, and a t or exclusion for which the kept scores do not decide the sets raises TooCoarse (the store's
ScoresTooCoarseError).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kn_core import neurons as kn_neurons
from kn_core.facts import Fact, FactSet, Prompt, Skipped, render_prompts
from kn_core.neurons import neuron_name  # noqa: F401 - the app's panels take it from here
from kn_core.selection import DEFAULT_P, DEFAULT_T, Neuron
from kn_core.specificity import template_left_out



def fact_key(fact: Fact) -> tuple[str, str, str]:
    return (fact.relation, fact.subject, fact.object)


def fact_label(fact: Fact) -> str:
    return f"{fact.subject} \u2192 {fact.object}"


def empty_factset(name: str = "untitled") -> FactSet:
    return FactSet(name, {}, [])


def starter_factset() -> FactSet:
    """The engine's built-in fact set; an empty one if the package data is missing."""
    try:
        from kn_core.fact_files import builtin_facts

        return builtin_facts()
    except Exception:  # noqa: BLE001 - the app starts without it and says so in the status bar
        return empty_factset("built-in facts unavailable")


class TooCoarse(ValueError):
    """A compact run's kept scores do not decide the sets at this t or with these exclusions; the message is the
    store's one-line ScoresTooCoarseError (kn_core/store/topscores.py), naming the t and exclusions that work."""


def compact_call(call):
    """call(the topscores module), its ScoresTooCoarseError raised as TooCoarse. The store (SQLAlchemy, slow to
    import) loads here, with the first compact run: only an opened project has those."""
    from kn_core.store import topscores

    try:
        return call(topscores)
    except topscores.ScoresTooCoarseError as exc:
        raise TooCoarse(str(exc)) from exc


class FullScores:
    """A run's full score arrays: the engine's set functions read them directly."""

    def __init__(self, arrays: list[np.ndarray]):
        self.arrays = arrays

    def coarse(self, prompt_index: int, t: float, exclude) -> list[Neuron]:
        return kn_neurons.coarse_neurons(self.arrays[prompt_index], t, exclude)

    def counts(self, t: float, exclude):
        return kn_neurons.coarse_counts(self.arrays, t, exclude)

    def refined(self, t: float, p: float, exclude):
        return kn_neurons.refined_neurons(self.arrays, t, p, exclude)

    def decided_arrays(self, t: float, exclude) -> list[np.ndarray]:
        return self.arrays


class CompactScores:
    """A run's compactly stored top scores (kn_core/store/topscores.py): each call raises TooCoarse when the kept
    scores do not decide the answer at t with these exclusions."""

    def __init__(self, tops: list):
        self.tops = tops

    def coarse(self, prompt_index: int, t: float, exclude) -> list[Neuron]:
        return compact_call(lambda _: self.tops[prompt_index].coarse(t, exclude))

    def counts(self, t: float, exclude):
        return compact_call(lambda ts: ts.coarse_counts(self.tops, t, exclude))

    def refined(self, t: float, p: float, exclude):
        return compact_call(lambda ts: ts.refined_neurons(self.tops, t, p, exclude))

    def decided_arrays(self, t: float, exclude) -> list[np.ndarray]:
        """The kept scores with the rest at -inf, once the check passed: their coarse sets at t are the true ones."""
        self.counts(t, exclude)
        return [top.dense() for top in self.tops]


RUNNING, COMPLETE = "running", "complete"
CANCELLED, FAILED, INTERRUPTED = "cancelled", "failed", "interrupted"  # stopped early: a partial run


@dataclass(eq=False)  # a run is itself: compared by identity (its scores are arrays)
class Run:
    """One attribution run over the prompts of one fact. `state`: running, complete, or (stopped early, with the
    prompts finished so far) cancelled / failed / interrupted (the app ended while it ran). `edits`: the model
    edits active while it ran (empty: the model's own weights)."""

    fact: Fact
    prompts: list[Prompt]
    scores: list[Any] = field(default_factory=list)  # kn_core.attribution.PromptScores, in prompt order
    params: dict = field(default_factory=dict)
    model: dict = field(default_factory=dict)
    started: float = field(default_factory=time.time)
    seconds: float = 0.0
    state: str = RUNNING
    edits: list[str] = field(default_factory=list)
    store_id: Any = None
    compact: list | None = None  # per prompt a topscores.TopScores: the run was stored with its top scores only
    name: str = ""  # the user's name for the run (runs browser); "" shows its fact and date

    @property
    def complete(self) -> bool:
        return self.state == COMPLETE

    def header_note(self) -> str:
        """What the run's header must say beside the fact: still running, partial, on edited weights."""
        done, n = len(self.scores), len(self.prompts)
        parts = []
        if self.state == RUNNING:
            parts.append(f"running: {done}/{n} prompts done")
        elif self.state != COMPLETE:
            parts.append(f"partial run ({self.state}): {done}/{n} prompts")
        held = self.params.get("held_out_templates") or []
        if held:
            parts.append(f"{len(held)} template{'s' if len(held) > 1 else ''} held out for generality")
        if self.edits:
            parts.append(f"on edited weights ({len(self.edits)} active edit{'s' if len(self.edits) > 1 else ''})")
        return "".join(f"  \u2014 {p}" for p in parts)

    def score_arrays(self) -> list[np.ndarray]:
        return [s.scores for s in self.scores]

    def stored(self) -> FullScores | CompactScores:
        """The finished prompts' scores as the set functions read them: the one place that tells a compactly
        stored run from a full one."""
        if self.compact is not None:
            return CompactScores(self.compact[:len(self.scores)])
        return FullScores(self.score_arrays())

    def mean_scores(self) -> np.ndarray | None:
        if not self.scores:
            return None
        return np.mean(np.stack(self.score_arrays()), axis=0)

    def mean_activations(self) -> np.ndarray | None:
        if not self.scores:
            return None
        return np.mean(np.stack([s.activations for s in self.scores]), axis=0)


def activations_stored(run: Run) -> bool:
    """False for a run read from a file that kept no activations (NaN arrays): left out of the statistics."""
    return not run.scores or not np.isnan(run.scores[0].activations).all()


def merge_factsets(fs, imported):
    """(fs with the imported relations' new templates and the new facts, number of facts added)."""
    merged = fs
    for relation in imported.relations.values():
        if relation.id in merged.relations:
            old = merged.relation(relation.id)
            templates = old.templates + tuple(t for t in relation.templates if t not in old.templates)
            merged = merged.with_relation(type(old)(old.id, old.name or relation.name, templates))
        else:
            merged = merged.with_relation(relation)
    present, new = set(merged.facts), []
    for fact in imported.facts:
        if fact not in present:
            new.append(fact)
            present.add(fact)
    return merged.with_facts(new), len(new)  # one check of the set, not one per fact


@dataclass
class NeuronSet:
    name: str
    kind: str  # "coarse" | "refined" | "relation" | "user"
    neurons: list[Neuron]
    source: str = ""  # the fact or relation it came from

    def to_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "source": self.source,
                "neurons": [[int(l), int(n)] for l, n in self.neurons]}


class Session:
    def __init__(self, factset: FactSet | None = None):
        self.factset: FactSet = factset if factset is not None else empty_factset()
        self.lm = None
        self.checks: dict[tuple, dict] = {}  # (fact key, template) -> answer_probabilities item
        self.runs: dict[tuple, Run] = {}  # fact key -> latest complete run (or the running / only partial one)
        self.partial_runs: dict[tuple, Run] = {}  # fact key -> a stopped re-run kept beside its complete run
        self.earlier_runs: dict[tuple, list[Run]] = {}  # fact key -> runs a newer one replaced (never dropped)
        self.t = DEFAULT_T
        self.p = DEFAULT_P
        self.flags = None  # kn_core.neurons.NeuronFlags of the loaded model (run_flags), once measured
        self.keep_massive = False  # True: flagged neurons stay in the sets (the paper's method)
        self.causal_templates = "prefix"  # causal models: templates cut before [Y], or only those ending in [Y]
        self.prompt_format = "plain"  # the window's choice (kn_core.encoding), saved with the project
        self.activation_stats = None  # kn_core.neurons.ActivationStats measured with the flags (mean ablation)
        self.flags_measured_on = 0  # how many run prompts the flags were measured on (with the neutral sentences)
        self.saved_flags: dict | None = None  # the opened project's flags_record(), used when its model is loaded
        self.saved_checks: tuple[str | None, dict] | None = None  # (weights sha256, the opened project's checks)
        self.neuron_sets: dict[str, NeuronSet] = {}
        self.traces: list[dict] = []  # causal traces run here or opened: {"name", "report", "params"} (project_io)
        self.results_dirty = False
        self.path: str | None = None
        self.score_storage: dict | None = None  # the opened project's Project.score_storage(), kept when saving
        self.kept_records: dict = {}  # what the app does not show but must save again (project_io.KeptRecords)
        self.generation = 0  # which project is open: +1 at each open / new (a job's result is kept only for its own)

    def known_note(self, fact: Fact, edits=()) -> str:
        """A line for when the answer checks (F6) say the model does not know `fact` (KNOWN_RULE: top-1 on more
        than half of its prompts) or its answer is part of its subject's name; "" when it knows it or it was not
        checked. Only checks made with the model edits `edits` active count (a run's): an edit that suppressed the
        fact made the checks after it say "does not know" beside a run on the model's own weights."""
        from kn_core.experiments import answer_in_name, is_known, known_verdict

        checked = [v["correct"] for (key, _), v in self.checks.items()
                   if key == fact_key(fact) and list(v.get("edits", [])) == list(edits)]
        verdict = known_verdict(answer_in_name(fact), is_known(sum(checked) / len(checked)) if checked else None)
        if not verdict.lead:
            return ""
        counted = (f" (top-1 on {sum(checked)} of {len(checked)} checked prompts)"
                   if verdict.label == "not known" else "")
        return f"\n\u26a0 {verdict.lead[0].upper()}{verdict.lead[1:]}{counted}: {verdict.why}."

    # ----------------------------------------------------------------- prompts
    def prompts_for(self, fact: Fact, causal_templates: str | None = None) -> tuple[list[Prompt], list[Skipped]]:
        if self.lm is None:
            return [], []
        relation = self.factset.relations.get(fact.relation)
        if relation is None:
            return [], [Skipped("", f"unknown relation {fact.relation}")]
        return render_prompts(fact, relation, self.lm.tokenizer, self.lm.kind,
                              causal_templates or self.causal_templates)

    def keep_earlier(self, run: Run | None):
        """A run a newer one replaces stays in the project (the runs browser lists it, the file keeps it)."""
        if run is None or not run.scores:
            return
        kept = self.earlier_runs.setdefault(fact_key(run.fact), [])
        if all(r is not run for r in kept):
            kept.append(run)

    def all_runs(self) -> list[Run]:
        """Every run of the project with scores: current, partial beside them, earlier ones (oldest first)."""
        found = [*self.runs.values(), *self.partial_runs.values(), *(r for runs in self.earlier_runs.values()
                                                                     for r in runs)]
        unique = list({id(r): r for r in found if r.scores}.values())
        return sorted(unique, key=lambda r: r.started)

    def run_maps(self) -> tuple[dict, dict, dict]:
        """Which runs the project keeps and where (copies of the maps, the runs shared): for undo."""
        return dict(self.runs), dict(self.partial_runs), {k: list(v) for k, v in self.earlier_runs.items()}

    def set_run_maps(self, maps: tuple[dict, dict, dict]):
        runs, partial, earlier = maps
        self.runs, self.partial_runs = dict(runs), dict(partial)
        self.earlier_runs = {k: list(v) for k, v in earlier.items()}
        self.results_dirty = True

    def _take_out(self, run: Run):
        key = fact_key(run.fact)
        if self.runs.get(key) is run:
            del self.runs[key]
        if self.partial_runs.get(key) is run:
            del self.partial_runs[key]
        self.earlier_runs[key] = [r for r in self.earlier_runs.get(key, []) if r is not run]
        if not self.earlier_runs[key]:
            del self.earlier_runs[key]

    def make_current(self, run: Run):
        """`run` becomes its fact's run (the one the plots show and the sets come from); the one it replaces is
        kept as an earlier run."""
        key = fact_key(run.fact)
        self._take_out(run)
        self.keep_earlier(self.runs.get(key))
        self.runs[key] = run

    def delete_run(self, run: Run):
        """Drops `run`; if it was its fact's run, the newest complete one left (else the newest) takes its place."""
        key = fact_key(run.fact)
        was_current = self.runs.get(key) is run
        self._take_out(run)
        if was_current:
            left = sorted([*self.earlier_runs.get(key, []), *([self.partial_runs[key]] if key in self.partial_runs
                                                              else [])], key=lambda r: (r.complete, r.started))
            if left:
                self._take_out(left[-1])
                self.runs[key] = left[-1]

    def prompt_params(self) -> dict:
        """How the prompts were made, recorded in every run's params as `kn attribute --facts` records it, so
        that its resume recognises the GUI's runs (None: masked)."""
        from kn_core.runner import prompt_params

        from kn_core.encoding import prompt_format

        return prompt_params(self.lm.kind if self.lm is not None else "", self.causal_templates,
                             prompt_format(self.lm))

    def check_for(self, fact: Fact, template: str) -> dict | None:
        return self.checks.get((fact_key(fact), template))

    def reset_flags(self):
        """The model changed: its flags and activation statistics no longer describe it."""
        self.flags = None
        self.activation_stats = None
        self.flags_measured_on = 0

    def flags_record(self) -> dict | None:
        """The flags as saved with the project: with the weights and the number of run prompts they describe."""
        if self.flags is None or self.activation_stats is None or self.lm is None:
            return None
        return {"sha256": getattr(self.lm, "sha256", None), "run_prompts": self.flags_measured_on, "flags": self.flags,
                "stats": self.activation_stats}

    def keep_saved_checks(self, sha256: str | None, checks: dict) -> None:
        """The opened project's answer checks, made on the weights `sha256`: in force now if those weights are
        loaded, else when they are (`restore_checks`). Checks made on edited weights are dropped: opening a project
        reverts its edits."""
        self.saved_checks = (sha256, {key: value for key, value in checks.items() if not value.get("edits")})
        self.checks = {}
        self.restore_checks(opening=True)

    def restore_checks(self, opening: bool = False) -> bool:
        """The opened project's checks, when they were made on the loaded weights. A file saved before the weights
        were recorded (sha256 None) keeps the old rule: its checks stand for the model loaded when it is opened."""
        if self.saved_checks is None or self.lm is None:
            return False
        sha256, checks = self.saved_checks
        if sha256 != getattr(self.lm, "sha256", None) and not (sha256 is None and opening):
            return False
        self.checks = dict(checks)
        return True

    def restore_flags(self) -> bool:
        """The saved flags, when they describe the loaded weights and exactly the runs measured now (a run added
        or removed since, or other weights: False, they are measured again)."""
        saved = self.saved_flags
        if (saved is None or self.lm is None or saved["sha256"] != getattr(self.lm, "sha256", None)
                or saved["run_prompts"] != len(self.flag_inputs()[0])):
            return False
        self.flags, self.activation_stats = saved["flags"], saved["stats"]
        self.flags_measured_on = saved["run_prompts"]
        return True

    def flag_inputs(self) -> tuple[list[np.ndarray], dict[str, list[list]]]:
        """What `run_flags` measures on: the answer-position activations of every prompt attributed on the loaded
        model's own weights (runs on edited weights or another model are left out), and those runs' stored scores
        (`Run.stored`) grouped by relation (a compact run's are checked by the flags job)."""
        sha = getattr(self.lm, "sha256", None)
        activations, by_relation = [], {}
        for run in list(self.runs.values()):
            if not run.scores or run.edits or run.model.get("sha256") != sha:
                continue
            if activations_stored(run):  # a compact run kept no activations: only its scores count
                activations += [ps.activations for ps in run.scores]
            by_relation.setdefault(run.fact.relation, []).append(run.stored())
        return activations, by_relation

    # ----------------------------------------------------------------- thresholds (views over stored scores)
    def excluded(self) -> frozenset:
        """Neurons kept out of every set: the flagged ones, unless keep_massive or not measured yet."""
        return frozenset() if self.flags is None or self.keep_massive else self.flags.excluded

    def coarse(self, run: Run, prompt_index: int) -> list[Neuron]:
        return run.stored().coarse(prompt_index, self.t, self.excluded())

    def refined(self, run: Run, exclude: frozenset | None = None) -> list[Neuron]:
        """`exclude`: None for the session's exclusions (the loaded model's flags). The neurons the run's subject
        control flagged "template" are not in it (`template_left_out`, as kn neurons --subject-control)."""
        if not run.scores:
            return []
        exclude = (self.excluded() if exclude is None else exclude) | template_left_out(run.params)
        if len(run.prompts) < kn_neurons.REFINE_MIN_PROMPTS:  # kn_core.neurons.case_neurons: coarse in all of them
            return kn_neurons.few_prompt_neurons(self.refined_counts(run, exclude), len(run.scores))
        return [tuple(n) for n in run.stored().refined(self.t, self.p, exclude)]

    def refined_counts(self, run: Run, exclude: frozenset | None = None):
        return run.stored().counts(self.t, self.excluded() if exclude is None else exclude)

    def selection_arrays(self, run: Run, exclude=None) -> list[np.ndarray]:
        """Score arrays whose coarse sets at t (with `exclude`, default the session's exclusions) are the true
        ones (`FullScores` / `CompactScores.decided_arrays`; TooCoarse when a compact run's cannot be). For engine
        functions that take arrays (adapt_p, the flags)."""
        return run.stored().decided_arrays(self.t, self.excluded() if exclude is None else exclude)

    def relation_runs(self, relation_id: str) -> list[Run]:
        return [r for k, r in self.runs.items() if k[0] == relation_id and r.scores]

    def relation_level(self, relation_id: str, fraction: float = 0.1) -> list[tuple[Neuron, int]]:
        runs = self.relation_runs(relation_id)
        return kn_neurons.relation_neurons([self.refined(r) for r in runs], fraction)

    def adapt_p(self, relation_id: str):
        runs = self.relation_runs(relation_id)
        if not runs:
            raise ValueError(f"no attribution runs for relation {relation_id} yet; run some of its facts first")
        return kn_neurons.adapt_p([self.selection_arrays(r) for r in runs], self.t, self.p, exclude=self.excluded())

    # ----------------------------------------------------------------- neuron sets
    def unique_set_name(self, base: str) -> str:
        name, k = base, 2
        while name in self.neuron_sets:
            name, k = f"{base} ({k})", k + 1
        return name

    def put_set(self, neuron_set: NeuronSet):
        self.neuron_sets[neuron_set.name] = neuron_set

    def facts_using(self, neuron: Neuron) -> tuple[list[Fact], int]:
        """The facts whose refined set (their current run, at t and p) holds `neuron`, and how many facts were
        looked at (runs whose stored scores cannot decide the sets at this t are not counted)."""
        neuron, found, looked = (int(neuron[0]), int(neuron[1])), [], 0
        for run in self.runs.values():
            if not run.scores:
                continue
            try:
                refined = self.refined(run)
            except TooCoarse:
                continue
            looked += 1
            if neuron in refined:
                found.append(run.fact)
        return found, looked

    # ----------------------------------------------------------------- inspector data (stored, no model)
    def top_activating(self, layer: int, neuron: int, k: int = 10) -> list[tuple[str, str, float, float]]:
        """Prompts with stored activations, ranked by this neuron's activation: (prompt, answer, act, score)."""
        rows = []
        for run in self.runs.values():
            if not activations_stored(run):
                continue
            for ps in run.scores:
                rows.append((ps.prompt, ps.answer, float(ps.activations[layer, neuron]),
                             float(ps.scores[layer, neuron])))
        rows.sort(key=lambda r: -r[2])
        return rows[:k]
