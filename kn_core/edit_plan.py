"""From a request to an edit: fact + neurons + what to do -> the edit, its control and the prompts to judge it.

The GUI's Edits panel, the CLI's `kn edit ...` and the reproduction all build edits here, so an edit means
the same thing everywhere and is refused for the same reasons:

    plan = plan_edit(lm, factset, EditRequest("update", neurons, fact, new_object="Berlin"),
                     relation_neuron_sets={other_fact: its_refined_neurons, ...})
    plan.edit        # the edit (edits.Update), ready for EditStack.push / with_edits
    plan.control     # the same edit on as many random neurons from the same layers (seeded)
    plan.prompts     # {"fact": [...], "held-out": [...], "relation": [...], "other relations": [...], ...}
    plan.skipped     # [(what, why)]: templates, facts and neurons left out, each with its reason

Every refusal is an `EditPlanError` (a ValueError) with a one-line message naming the problem and the fix,
raised before any forward pass. `measure_plan` and `summarize_plan` run and condense the evaluation the
same way for every caller; `make_update`, `erase_neurons` and `random_neurons` (the controls) choose the
neurons, for the experiments too.

Groups of evaluation prompts:
- "fact": the edited fact's prompts (update: those whose template also renders the new object, in the same
  order as "new object"); erase: the prompts of the relation's facts whose neurons chose the erased set.
- "relation": other facts of the same relation (controls for specificity within the relation).
- "other relations": facts of other relations.
- "new object": update only; the fact's prompts rendered with o' (aligned with "fact").
- "held-out" (and for an update "held-out new object", aligned with it): the fact's prompts whose template
  did NOT find the neurons (`EditRequest.neuron_templates`), for generality (docs/METRICS.md); the "fact"
  group then keeps only the prompts whose template did. Without `neuron_templates` the held-out groups are empty.
- "portability": update only; facts whose subject is the new object o' (e.g. the new capital's country), with
  their own answers, where the fact set has any.
Control facts are a seeded sample (`control_facts` per group, `control_prompts_per_fact` prompts each).
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

from . import edits as E
from .facts import CAUSAL_TEMPLATES, Fact, Prompt, render_prompts
from .neurons import neuron_name
from .selection import Neuron

KINDS = ("suppress", "amplify", "update", "erase")


class EditPlanError(ValueError):
    """An edit that cannot be built as requested; the message is one line naming the problem and the fix."""


@dataclass(frozen=True)
class EditRequest:
    """What the user asked for. `neurons` are required for suppress/amplify/update (erase chooses the
    relation's `k` most frequent refined neurons from `relation_neuron_sets`); `fact` is the fact the edit is
    evaluated on (erase: any fact of the relation to erase, or give `relation`).

    `exclude`: neurons never edited (e.g. `NeuronFlags.excluded`: massive/unspecific neurons); for erase
    they are skipped when choosing the k most frequent. `allow_fewer`: erase fewer than k neurons when the
    relation has fewer candidates (otherwise that is an error saying how many there are).

    Update `strength`: "paper" uses lambda1/lambda2 as given (the paper: 1 and 8); "calibrated" scales both
    by the smallest s in CALIBRATION_RANGE at which o' becomes the greedy answer on the fact's prompts (see
    `calibrate_update`; it is always sign-aware). Suppress `to`: "zero" (the paper) or "mean" (mean ablation:
    each neuron set to its mean activation from the `activation_stats` given to `plan_edit`).

    `neuron_templates`: the templates of the prompts that found the neurons (a run's prompts). The fact's
    prompts of other templates form the "held-out" group that generality is measured on; None: not known,
    every prompt of the fact is a reliability prompt and generality is not applicable.

    `causal_templates` ("prefix" or "end-only", facts.CAUSAL_TEMPLATES): how a causal model's evaluation prompts
    are rendered; pass the run's own choice (its params' `causal_templates`), so that the edit is judged on the
    prompts that found its neurons."""

    kind: str
    neurons: tuple[Neuron, ...] = ()
    fact: Fact | None = None
    new_object: str | None = None
    factor: float = 2.0
    scope: str = "answer"
    lambda1: float = 1.0
    lambda2: float = 8.0
    sign_aware: bool = False
    strength: str = "paper"
    to: str = "zero"
    k: int = 20
    fill: str = "zero"
    relation: str | None = None
    exclude: tuple[Neuron, ...] = ()
    allow_fewer: bool = False
    exclusion_fraction: float = 0.1
    neuron_templates: tuple[str, ...] | None = None
    seed: int = 0
    control_facts: int = 4
    control_prompts_per_fact: int | None = 1
    causal_templates: str = "prefix"

    def __post_init__(self):
        if self.kind not in KINDS:
            raise EditPlanError(f"unknown edit kind {self.kind!r}; use one of {', '.join(KINDS)}")
        if self.causal_templates not in CAUSAL_TEMPLATES:
            raise EditPlanError(f"causal_templates must be one of {', '.join(CAUSAL_TEMPLATES)}, not "
                                f"{self.causal_templates!r}")
        try:
            object.__setattr__(self, "neurons", E._norm_neurons(self.neurons))
            object.__setattr__(self, "exclude", E._norm_neurons(self.exclude))
        except (TypeError, ValueError):
            raise EditPlanError("neurons must be (layer, index) pairs of integers") from None
        for name in ("factor", "lambda1", "lambda2", "exclusion_fraction"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise EditPlanError(f"{name} must be a finite number, not {value!r}")
        if self.scope not in ("answer", "all"):
            raise EditPlanError(f"scope must be 'answer' or 'all', not {self.scope!r}")
        if self.fill not in ("zero", "unk"):
            raise EditPlanError(f"fill must be 'zero' or 'unk', not {self.fill!r}")
        if not isinstance(self.k, int) or self.k < 1:
            raise EditPlanError(f"k (neurons to erase) must be an integer >= 1, not {self.k!r}")
        if not 0 <= self.exclusion_fraction <= 1:
            raise EditPlanError(f"exclusion_fraction must lie in [0, 1], not {self.exclusion_fraction!r}")
        if self.control_facts < 0:
            raise EditPlanError(f"control_facts must be >= 0, not {self.control_facts!r}")
        if self.to not in ("zero", "mean"):
            raise EditPlanError(f"suppress to must be 'zero' or 'mean' (mean ablation), not {self.to!r}")
        if self.strength not in ("paper", "calibrated"):
            raise EditPlanError(f"update strength must be 'paper' or 'calibrated', not {self.strength!r}")
        if self.control_prompts_per_fact is not None and self.control_prompts_per_fact < 1:
            raise EditPlanError("control_prompts_per_fact must be >= 1 (or None for all prompts)")
        if self.neuron_templates is not None:
            if isinstance(self.neuron_templates, str):
                raise EditPlanError("neuron_templates must be a sequence of template strings, not one string")
            object.__setattr__(self, "neuron_templates", tuple(str(t) for t in self.neuron_templates))


@dataclass(frozen=True)
class EditPlan:
    request: EditRequest
    edit: E.Edit
    control: E.Edit
    prompts: dict[str, list[Prompt]]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    calibration: dict | None = None  # calibrated updates: see `calibrate_update`

    def to_dict(self) -> dict:
        """Plain data (for reports and the CLI's JSON): the edit, its control, the prompts by group, the
        skipped items."""
        return {"edit": self.edit.to_dict(), "control": {"kind": "random neurons from the same layers",
                                                           "edit": self.control.to_dict()},
                "prompts": {g: [p.text for p in ps] for g, ps in self.prompts.items()},
                "skipped": [{"what": w, "reason": r} for w, r in self.skipped],
                **({"calibration": self.calibration} if self.calibration is not None else {})}


def plan_edit(lm, factset, request: EditRequest,
              relation_neuron_sets: Mapping[Fact, Sequence[Neuron]] | Sequence[Sequence[Neuron]] = (),
              activation_stats=None, task=None) -> EditPlan:
    """Builds the edit of `request`, its random-neuron control and its evaluation prompts (see the module
    notes). `relation_neuron_sets`: refined neurons of facts of the relation, best as {fact: neurons}; update
    uses the *other* facts' sets to leave out neurons shared by more than `exclusion_fraction` of them
    (the paper's 10%), erase takes the k most frequent neurons of all of them. `activation_stats`
    (`kn_core.neurons.ActivationStats`): the means for a suppress with to="mean".

    Sign-aware updates run one forward pass over the fact's prompts (the neurons' mean activation), calibrated
    updates a few evaluations of the fact's prompts (`task` reports them and can cancel); nothing else here runs
    the model."""
    skipped: list[tuple[str, str]] = []
    relation_id = _relation_of(factset, request)
    if request.kind == "suppress" and request.to == "mean" and activation_stats is None:
        raise EditPlanError("mean ablation needs activation statistics (kn_core.neurons.activation_stats on the "
                            "run's prompts); pass activation_stats or suppress to zero")
    sets = _neuron_sets(relation_neuron_sets)
    if request.kind == "erase":
        edit, fact_prompts = _erase(lm, factset, request, relation_id, sets, skipped)
        measured = {f for f, _ in sets if f is not None}
    else:
        if not request.neurons:
            raise EditPlanError("no neurons to edit: choose neurons (e.g. the fact's refined set) or lower t or p "
                                "to get some")
        _check_neurons(lm, request.neurons)
        fact_prompts = _prompts(lm, factset, request.fact, request, skipped, required=True)
        measured = {request.fact}
        neurons = _chosen(request, skipped)
        if request.kind == "update":
            edit, fact_prompts, new_prompts = _update(lm, factset, request, neurons, fact_prompts, sets, skipped)
        elif request.kind == "suppress":
            edit = _suppress(neurons, request, activation_stats)
        else:
            edit = E.Amplify(neurons, float(request.factor), request.scope)
    _check_neurons(lm, edit.neurons)
    prompts = {"fact": fact_prompts}
    same = [f for f in factset.facts_of(relation_id) if f not in measured]
    other = [f for f in factset.facts if f.relation != relation_id]
    # drawn first from the seed so that `kn edit erase` keeps its earlier control sample
    prompts["other relations"] = _control_prompts(lm, factset, other, request, request.seed, skipped)
    prompts["relation"] = _control_prompts(lm, factset, same, request, request.seed + 1, skipped)
    keep = _found_neurons(request, fact_prompts)
    prompts["fact"] = [p for p, k in zip(fact_prompts, keep) if k]
    prompts["held-out"] = [p for p, k in zip(fact_prompts, keep) if not k]
    calibration = None
    if request.kind == "update":
        prompts["held-out new object"] = [p for p, k in zip(new_prompts, keep) if not k]
        prompts["new object"] = new_prompts = [p for p, k in zip(new_prompts, keep) if k]
        prompts["portability"] = _control_prompts(lm, factset, _facts_about(factset, request.new_object),
                                                  request, request.seed + 2, skipped)
        if request.strength == "calibrated":
            edit, calibration = calibrate_update(lm, edit, new_prompts, task=task)
            if not calibration["reached"]:
                skipped.append(("calibration", f"o' did not become the top answer on every prompt even at "
                                               f"{calibration['scale']:g} x the lambdas (the update failed)"))
    control = _control(lm, edit, request, activation_stats)
    return EditPlan(request, edit, control, {g: prompts[g] for g in _GROUPS if g in prompts}, skipped, calibration)


_GROUPS = ("fact", "held-out", "relation", "other relations", "new object", "held-out new object", "portability")


def _found_neurons(request: EditRequest, fact_prompts: list[Prompt]) -> list[bool]:
    """Per prompt of the fact: whether its template is one that found the neurons (all, when not known)."""
    if request.neuron_templates is None:
        return [True] * len(fact_prompts)
    used = set(request.neuron_templates)
    keep = [p.template in used for p in fact_prompts]
    if not any(keep):
        raise EditPlanError("none of the fact's prompts uses a template that found the neurons "
                            "(neuron_templates); pass the templates of the run that found them, or None")
    return keep


def _facts_about(factset, subject: str | None) -> list[Fact]:
    """Facts whose subject is `subject` (the new object of an update: its portability facts)."""
    subject = (subject or "").strip()
    return [f for f in factset.facts if f.subject == subject]


def _check_neurons(lm, neurons) -> None:
    try:
        E.check_neurons(lm, neurons)
    except ValueError as exc:
        raise EditPlanError(f"{exc}; was the set made on another model?") from None


def _relation_of(factset, request: EditRequest) -> str:
    if request.kind != "erase" and request.fact is None:
        raise EditPlanError("pick the fact to evaluate the edit on")
    rid = request.relation or (request.fact.relation if request.fact is not None else None)
    if rid is None:
        raise EditPlanError("name the relation to erase (or pick one of its facts)")
    try:
        factset.relation(rid)
    except KeyError:
        raise EditPlanError(f"no relation {rid!r} in fact set {factset.name!r}; relations: "
                            f"{', '.join(sorted(factset.relations))}") from None
    return rid


def _neuron_sets(sets) -> list[tuple[Fact | None, tuple[Neuron, ...]]]:
    if isinstance(sets, Mapping):
        return [(f, E._norm_neurons(n)) for f, n in sets.items()]
    return [(None, E._norm_neurons(n)) for n in sets]


def _prompts(lm, factset, fact: Fact, request: EditRequest, skipped, required: bool = False) -> list[Prompt]:
    prompts, left_out = render_prompts(fact, factset.relation(fact.relation), lm.tokenizer, lm.kind,
                                       request.causal_templates)
    label = f"{fact.relation} {fact.subject} -> {fact.object}"
    if not prompts and required:
        reasons = "; ".join(dict.fromkeys(s.reason for s in left_out)) or "the relation has no templates"
        raise EditPlanError(f"no template of {fact.relation} renders {label} for this {lm.kind} model: {reasons}")
    if required:
        skipped.extend((f"template {s.template!r} of {label}", s.reason) for s in left_out)
    return prompts


def _control_prompts(lm, factset, facts: list[Fact], request: EditRequest, seed: int, skipped) -> list[Prompt]:
    if not facts or not request.control_facts:
        return []
    order = np.random.default_rng(seed).permutation(len(facts))[: request.control_facts]
    out: list[Prompt] = []
    for k in order:
        fact = facts[int(k)]
        prompts = _prompts(lm, factset, fact, request, skipped)
        if not prompts:
            skipped.append((f"control fact {fact.relation} {fact.subject} -> {fact.object}",
                            f"no template renders it for this {lm.kind} model"))
        out += prompts[: request.control_prompts_per_fact]
    return out


def _chosen(request: EditRequest, skipped) -> tuple[Neuron, ...]:
    """The requested neurons without the excluded (flagged) ones, which are listed in `skipped`."""
    excluded = set(request.exclude)
    skipped.extend((f"neuron {neuron_name(l, i)}", "flagged (massive or unspecific), excluded") for l, i in request.neurons
                   if (l, i) in excluded)
    neurons = tuple(n for n in request.neurons if n not in excluded)
    if not neurons:
        raise EditPlanError("every chosen neuron is flagged (massive or unspecific) and excluded; choose others")
    return neurons


def _suppress(neurons, request: EditRequest, stats) -> E.Suppress:
    if request.to == "zero":
        return E.Suppress(neurons, request.scope)
    return E.Suppress(neurons, request.scope, "mean", tuple(float(stats.mean[layer, index]) for layer, index in neurons))


def _update(lm, factset, request: EditRequest, neurons, fact_prompts, sets, skipped):
    fact, new_object = request.fact, (request.new_object or "").strip()
    if not new_object:
        raise EditPlanError("type the new object o' (e.g. another object of the relation)")
    if new_object == fact.object:
        raise EditPlanError(f"the new object equals the current one ({fact.object!r}); choose another object")
    try:
        new_fact = Fact(fact.relation, fact.subject, new_object)
    except ValueError as exc:
        raise EditPlanError(f"the new object {new_object!r} is not usable: {exc}") from None
    new_prompts, new_left_out = render_prompts(new_fact, factset.relation(fact.relation), lm.tokenizer, lm.kind,
                                               request.causal_templates)
    by_template = {p.template: p for p in new_prompts}
    reasons = {s.template: s.reason for s in new_left_out}
    own, new = [], []
    for p in fact_prompts:
        q = by_template.get(p.template)
        if q is None:
            skipped.append((f"template {p.template!r}", f"cannot render the new object {new_object!r}: "
                                                        f"{reasons.get(p.template, 'not rendered')}"))
        elif q.answer_ids[:1] == p.answer_ids[:1]:
            skipped.append((f"template {p.template!r}", f"{fact.object!r} and {new_object!r} start with the same "
                                                        "token here, so the edit cannot tell them apart"))
        else:
            own.append(p)
            new.append(q)
    if not own:
        raise EditPlanError(f"no template of {fact.relation} renders both {fact.object!r} and {new_object!r} "
                            f"with different first tokens for this {lm.kind} model; choose another new object")
    others = [n for f, n in sets if f != fact]
    activations = None
    if request.sign_aware or request.strength == "calibrated":
        from .evaluation import neuron_activations

        mean = neuron_activations(lm, neurons, fact_prompts).mean(axis=0)
        activations = [_dense(lm, neurons, mean)]
    update = make_update(lm, neurons, own[0].answer_ids, new[0].answer_ids, others, request.exclusion_fraction,
                         request.lambda1, request.lambda2, activations=activations)
    thin = shared_rule_note(len(others), request.exclusion_fraction)
    if thin:
        skipped.append(("shared-neuron rule", thin))
    skipped.extend((f"neuron {neuron_name(l, i)}", f"shared by more than {request.exclusion_fraction:.0%} of the relation's "
                                        f"{len(others)} other facts (the paper leaves these out)")
                   for l, i in update.excluded)
    if not update.neurons:
        raise EditPlanError(f"every chosen neuron is shared by more than {request.exclusion_fraction:.0%} of the "
                            f"relation's {len(others)} other facts, so the update leaves them all out; choose "
                            "other neurons")
    return update, own, new


def _dense(lm, neurons, values) -> np.ndarray:
    out = np.zeros((lm.layout.layers, lm.layout.neurons), dtype=np.float64)
    for (layer, index), value in zip(neurons, values):
        out[layer, index] = value
    return out


def _erase(lm, factset, request: EditRequest, relation_id: str, sets, skipped):
    if not sets:
        raise EditPlanError(f"run attribution on some facts of {relation_id} first: erase uses the relation's "
                            "most frequent refined neurons")
    excluded = set(request.exclude)
    counts = neuron_frequencies([n for _, n in sets])
    flagged = [n for n in counts if n in excluded]
    candidates = [n for n in counts if n not in excluded]
    if not candidates:
        raise EditPlanError(f"the {len(sets)} facts of {relation_id} have no refined neurons"
                            + (f" other than {len(flagged)} flagged ones" if flagged else "")
                            + "; lower t or p, or attribute more facts")
    neurons = erase_neurons([[n for n in s if n not in excluded] for _, s in sets], request.k)
    if len(neurons) < request.k:
        why = (f"the {len(sets)} attributed facts of {relation_id} have only {len(candidates)} distinct refined "
               "neurons" + (f" once {len(flagged)} flagged ones are left out" if flagged else ""))
        if not request.allow_fewer:
            raise EditPlanError(f"asked to erase {request.k} neurons but {why}; ask for k={len(candidates)}, "
                                "attribute more facts, or allow fewer")
        skipped.append((f"{request.k - len(neurons)} of the {request.k} neurons asked for", why))
    skipped.extend((f"neuron {neuron_name(l, i)}", "flagged (massive or unspecific), excluded") for l, i in flagged)
    facts = [f for f, _ in sets if f is not None] or factset.facts_of(relation_id)[: len(sets)]
    prompts = [p for f in facts for p in _prompts(lm, factset, f, request, skipped)]
    if not prompts:
        raise EditPlanError(f"no prompt of {relation_id}'s facts renders for this {lm.kind} model")
    return E.Erase(tuple(neurons), request.fill, E.default_embedding(lm)), prompts


def _control(lm, edit, request: EditRequest, stats) -> E.Edit:
    neurons = tuple(random_neurons(lm, edit.neurons, seed=request.seed, exclude=request.exclude))
    if isinstance(edit, E.Update):
        return E.Update(neurons, edit.old_ids, edit.new_ids, edit.lambda1, edit.lambda2, edit.embedding,
                        edit.multi_token)
    if isinstance(edit, E.Erase):
        return E.Erase(neurons, edit.fill, edit.embedding)
    if isinstance(edit, E.Amplify):
        return E.Amplify(neurons, edit.factor, edit.scope)
    return _suppress(neurons, request, stats)


# --------------------------------------------------------------------------------------------------------
# Choosing neurons: an update's exclusions and signs, erase's most frequent, the random controls
# --------------------------------------------------------------------------------------------------------


def neuron_frequencies(neuron_sets: Sequence[Iterable[Neuron]]) -> dict[Neuron, int]:
    counts: dict[Neuron, int] = {}
    for neurons in neuron_sets:
        for n in set(E._norm_neurons(neurons)):
            counts[n] = counts.get(n, 0) + 1
    return counts


def shared_rule_min_facts(fraction: float) -> int:
    """The fewest other facts on which "shared by more than `fraction` of them" differs from "shared with one other
    fact": one fact is a share of 1/n, so n >= 1/fraction (10 for the paper's 10%; 1 for fraction 0)."""
    return 1 if fraction <= 0 else math.ceil(1 / fraction - 1e-9)


def shared_rule_note(n_facts: int, fraction: float) -> str | None:
    """None when the shared-neuron rule can be applied on `n_facts` other facts; otherwise the one line saying
    it is not, and what stands in for it (docs/SPECIFICITY.md)."""
    need = shared_rule_min_facts(fraction)
    if n_facts >= need:
        return None
    return (f"shared-neuron rule not applied: {n_facts} other attributed fact(s) of the relation cannot support a "
            f"{fraction:.0%} share (one fact is already {1 / max(n_facts, 1):.0%}; at least {need} needed); "
            "relation neurons are left out by the subject-specificity control where it ran (--subject-control)")


def make_update(lm, neurons: Iterable[Neuron], old_ids, new_ids, relation_neuron_sets=(), fraction: float = 0.1,
                lambda1: float = 1.0, lambda2: float = 8.0, embedding: str | None = None,
                multi_token: str | None = None, activations: Sequence[np.ndarray] | None = None) -> E.Update:
    """An Update of one fact's knowledge neurons, leaving out neurons that are knowledge neurons of more than
    `fraction` of the relation's *other* facts (`relation_neuron_sets`: their refined sets, without this
    fact's own; counting the fact itself would exclude every neuron of a relation with fewer than 10 facts).
    With fewer than `shared_rule_min_facts(fraction)` other facts the share cannot be estimated and nothing is
    left out (`shared_rule_note` says so; the subject-specificity control catches relation neurons instead).

    `activations` (each prompt's [layers, neurons] at the answer) makes the update sign-aware: neurons whose
    mean activation over the prompts is negative get the edit reversed (`Update.flipped`)."""
    neurons = E._norm_neurons(neurons)
    counts = neuron_frequencies(relation_neuron_sets)
    n_facts = len(relation_neuron_sets)
    applies = shared_rule_note(n_facts, fraction) is None
    excluded = tuple(n for n in neurons if applies and n_facts and counts.get(n, 0) > fraction * n_facts)
    kept = tuple(n for n in neurons if n not in excluded)
    return E.Update(kept, tuple(old_ids), tuple(new_ids), lambda1, lambda2, embedding or E.default_embedding(lm),
                    multi_token or E.default_multi_token(lm), excluded, negatively_active(kept, activations))


def negatively_active(neurons: Sequence[Neuron], activations: Sequence[np.ndarray] | None) -> tuple[Neuron, ...]:
    """The neurons whose activation, averaged over prompts ([layers, neurons] each), is negative."""
    if not activations:
        return ()
    mean = np.mean(np.stack([np.asarray(a, dtype=np.float64) for a in activations]), axis=0)
    return tuple(n for n in neurons if mean[n] < 0)


def erase_neurons(relation_neuron_sets: Sequence[Iterable[Neuron]], k: int = 20) -> list[Neuron]:
    """The k most frequent knowledge neurons of a relation (ties: lower layer, lower index first)."""
    counts = neuron_frequencies(relation_neuron_sets)
    return [n for n, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:k]]


def random_neurons(lm, like: Sequence[Neuron], seed: int = 0, exclude: Iterable[Neuron] = ()) -> list[Neuron]:
    """As many random neurons as `like`, drawn from the same layers (one per neuron of `like`), seeded. In an MoE
    model from the same expert: its neurons share the routing, so the control is reached by the same tokens."""
    rng = random.Random(seed)
    taken = set(E._norm_neurons(exclude)) | set(E._norm_neurons(like))
    out: list[Neuron] = []
    layout = lm.layout
    for layer, index in E._norm_neurons(like):
        start, stop = 0, layout.neurons
        if layout.experts is not None:
            span = next(e for e in layout.experts[layer] if e.offset <= index < e.offset + e.size)
            start, stop = span.offset, span.offset + span.size
        for _ in range(1000):
            n = (layer, start + rng.randrange(stop - start))
            if n not in taken:
                break
        taken.add(n)
        out.append(n)
    return out


# --------------------------------------------------------------------------------------------------------
# Measuring a plan
# --------------------------------------------------------------------------------------------------------

def measure_plan(lm, plan: EditPlan, task=None, top_k: int = 5, evaluation: str = "forced") -> dict[str, list[dict]]:
    """`evaluation.answer_probabilities` of every group's prompts under the model as it is now (call it before
    and after applying `plan.edit`, or inside `with_edits(lm, [plan.control], ...)`). `evaluation` "generate"
    judges `correct` by greedy generation instead (`evaluation.judge_by_generation`; probabilities stay
    teacher-forced)."""
    from .evaluation import EVALUATIONS, measure_groups

    if evaluation not in EVALUATIONS:
        raise EditPlanError(f"evaluation must be forced or generate, not {evaluation!r}")
    return measure_groups(lm, [plan.prompts], task, evaluation, top_k)[0]


def summarize_plan(plan: EditPlan, before: dict[str, list[dict]], after: dict[str, list[dict]]) -> dict:
    """Per group: mean probability before/after, the paper's relative change mean(Δp)/mean(p), the top-1 flip
    rate and accuracy before/after; for an update also the success rate (o' greedy at every answer token)
    and o''s probability, read from the "new object" group."""
    from .evaluation import flip_rate, relative_change

    out = {}
    for g, rows_before in before.items():
        rows_after = after.get(g, [])
        if not rows_before:
            continue
        pb, pa = [r["prob"] for r in rows_before], [r["prob"] for r in rows_after]
        out[g] = {"n": len(pb), "p_before": float(np.mean(pb)), "p_after": float(np.mean(pa)),
                  "relative_change": relative_change(pb, pa),
                  "flip_rate": flip_rate(rows_before, rows_after),
                  "accuracy_before": float(np.mean([r["correct"] for r in rows_before])),
                  "accuracy_after": float(np.mean([r["correct"] for r in rows_after]))}
    if "new object" in out:
        out["success_rate"] = out["new object"]["accuracy_after"]
    return out


# --------------------------------------------------------------------------------------------------------
# Calibrated update
# --------------------------------------------------------------------------------------------------------

CALIBRATION_RANGE = (1 / 64, 4.0)  # scales of the update's lambdas that are tried (1 = as given)
CALIBRATION_BISECTIONS = 6


def calibrate_update(lm, update: E.Update, new_prompts: Sequence[Prompt], scale_range=CALIBRATION_RANGE,
                     bisections: int = CALIBRATION_BISECTIONS, task=None) -> tuple[E.Update, dict]:
    """The update with both lambda terms scaled by the smallest s in `scale_range` at which o' is the greedy
    answer (every answer token, teacher-forced) on every prompt of `new_prompts` (the fact's prompts rendered
    with o'), and what was tried.

    Search (deterministic): s doubles from the low end of the range until o' wins (at most log2(high/low) + 1
    evaluations), then `bisections` steps in log space between the last failing and the first winning s keep
    the smallest winning s found. Success is not guaranteed to be monotone in s, so this finds the first
    winning s of the doubling grid, refined. If o' does not win even at the high end, the update at the high
    end comes back with reached=False: the caller must say the update failed. The edit stays an ordinary
    `Update` (exact undo like every weight edit)."""
    from dataclasses import replace

    from .evaluation import answer_probabilities, with_edits
    from .tasks import as_task

    task = as_task(task)
    low, high = (float(x) for x in scale_range)
    if not (0 < low <= high and math.isfinite(high)):
        raise EditPlanError(f"the calibration range must satisfy 0 < low <= high, not {scale_range!r}")
    if not new_prompts:
        raise EditPlanError("a calibrated update needs prompts of the new object")
    tried: list[tuple[float, bool]] = []

    def scaled(s: float) -> E.Update:
        return replace(update, lambda1=update.lambda1 * s, lambda2=update.lambda2 * s)

    def wins(s: float) -> bool:
        task.check()
        rows = with_edits(lm, [scaled(s)], lambda: answer_probabilities(lm, new_prompts))
        tried.append((s, all(r["correct"] for r in rows)))
        task.progress(min(len(tried) / (len(grid) + bisections), 1.0), f"calibrating the update: scale {s:.3g}")
        return tried[-1][1]

    grid = [low]
    while grid[-1] * 2 < high:
        grid.append(grid[-1] * 2)
    if grid[-1] < high:
        grid.append(high)
    failing, winning = None, None
    for s in grid:
        if wins(s):
            winning = s
            break
        failing = s
    if winning is not None and failing is not None:
        for _ in range(bisections):
            middle = math.sqrt(failing * winning)
            if wins(middle):
                winning = middle
            else:
                failing = middle
    scale = winning if winning is not None else high
    return scaled(scale), {"reached": winning is not None, "scale": scale, "range": [low, high],
                           "lambda1": update.lambda1 * scale, "lambda2": update.lambda2 * scale,
                           "tried": [{"scale": s, "reached": ok} for s, ok in tried]}
