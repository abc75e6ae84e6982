"""Subject specificity: is a fact's knowledge neuron the fact's, or its template's? (issue #21; the rule, its
reasons and its history are in docs/SPECIFICITY.md.)

Knowledge must depend on the subject (Meng et al. 2022, ROME: corrupt the subject and the fact is lost); the
attribution that finds knowledge neurons finds neurons of the wording as readily (Niu et al., ICLR 2024). The
control keeps the fact's templates and answer o and swaps the subject s for subjects of other facts of the
relation (not sharing o), then re-scores the fact's candidate neurons:

- scores: integrated gradients as in the fact's attribution, only on the layers holding a candidate neuron
  (`attribute_layers`), on the fact's own prompts and on the control prompts;
- units: each answer token's scores divided by that token's probability (Attr / P ~ the neuron's contribution
  to log P(o)), so a control prompt's much smaller P(o) does not shrink every score alike;
- ratio per control prompt c on template j: r_c(n) = u'_c(n) / u_j(n), where u_j(n) > 0 is the neuron's
  normalized score on the fact's own prompt of template j;
- flag (`flag_template`): "template" when the median |r_c(n)| over the neuron's control prompts is >= 1/2 (without
  the fact's subject it keeps at least half the size of its effect on log P(o), pushing o or pushing against it).

Up to CONTROL_SUBJECTS (3) control subjects per fact; a fact with fewer than MIN_CONTROL_SUBJECTS (2) is not
controlled, with the reason. The numbers were fixed before the rule was run on any relation and are not tuned;
the absolute value was added after the known-facts reproduction (docs/reproduction/known/; docs/SPECIFICITY.md
says why and when).

    control = subject_control(lm, factset, fact, prompts, candidates, params)
    refined = [n for n in candidates if n not in control.template]     # unless the caller keeps them
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np

from .facts import Fact, render_prompts
from .selection import Neuron
from .tasks import Task, as_task

CONTROL_SUBJECTS = 3
MIN_CONTROL_SUBJECTS = 2
TEMPLATE_RATIO = 0.5
RULE = (f"template (subject-unspecific): with the subject swapped for up to {CONTROL_SUBJECTS} subjects of other "
        f"facts of the relation (same templates, same answer; at least {MIN_CONTROL_SUBJECTS}), the neuron's "
        f"integrated gradient per unit of answer probability keeps >= {TEMPLATE_RATIO:g} of its size on the fact's "
        f"own prompt of the same template (either sign), on the median control prompt")


# --------------------------------------------------------------------------------------------------------
# Scores of chosen layers, in units of the answer's probability
# --------------------------------------------------------------------------------------------------------

@dataclass
class LayerScores:
    """One prompt's scores on chosen `layers`: `scores` [len(layers), neurons] (as `attribute` combines answer
    tokens) and `normalized` (each token's scores / that token's probability, then combined the same way)."""
    layers: tuple[int, ...]
    scores: np.ndarray
    normalized: np.ndarray
    token_probs: list[float]


def attribute_layers(lm, prompt, layers: Sequence[int], params=None, task: Task | None = None) -> LayerScores:
    """Integrated gradients of `prompt` (a facts.Prompt) for `layers` only (Riemann sum); equal to the same
    layers of `attribution.attribute` (a layer's scores do not depend on the other layers)."""
    import torch

    from .attribution import AttributionParams, _combine, _prompt_parts
    from .passes import Runner, integrate

    params = params or AttributionParams()
    layers = tuple(sorted({int(layer) for layer in layers}))
    if not layers:
        raise ValueError("attribute_layers needs at least one layer")
    if params.method != "ig":
        raise ValueError("the subject control re-scores integrated gradients; method='activation' has no control")
    task = as_task(task)
    torch.manual_seed(params.seed)
    _, _, _, targets = _prompt_parts(lm, prompt, params)
    raw, normalized, probs = [], [], []
    for target in targets:
        runner = Runner(lm, target)
        seq_len = 1 if runner.prefix_cache is not None else len(target.ids)
        scores, _, _ = integrate(lm, runner, params, seq_len, lambda *a, **k: None, task, (), layers)
        chosen = scores[0][list(layers)].float()
        raw.append(chosen)
        normalized.append(chosen / max(runner.prob, 1e-30))
        probs.append(float(runner.prob))
    how = params.multi_token
    return LayerScores(layers, _combine(raw, how).cpu().numpy(), _combine(normalized, how).cpu().numpy(), probs)


# --------------------------------------------------------------------------------------------------------
# The rule, on plain arrays
# --------------------------------------------------------------------------------------------------------

def prompt_ratios(own: Mapping[str, np.ndarray], controls: Sequence[tuple[str, np.ndarray]],
                  candidates: Sequence[Neuron], layers: Sequence[int]) -> dict[Neuron, list[float]]:
    """Each candidate's ratios r_c = u'_c / u_j over the control prompts c (template j) where u_j > 0 (none: an
    empty list). `own`: {template: normalized scores [len(layers), N]} of the fact's prompts; `controls`:
    [(template, normalized scores)] of the control prompts."""
    row = {layer: k for k, layer in enumerate(layers)}
    out: dict[Neuron, list[float]] = {}
    for layer, index in candidates:
        ratios = out.setdefault((int(layer), int(index)), [])
        for template, scores in controls:
            base = own.get(template)
            if base is None:
                continue
            u = float(base[row[layer], index])
            if u > 0:
                ratios.append(float(scores[row[layer], index]) / u)
    return out


def template_ratios(ratios: Mapping[Neuron, Sequence[float]]) -> dict[Neuron, float]:
    """The rule's statistic: each neuron's median |r_c| over its control prompts, the share of the size of its
    effect on log P(o) that it keeps without the fact's subject, whichever way it then pushes; NaN without a
    usable control prompt."""
    return {n: float(np.median(np.abs(r))) if len(r) else float("nan") for n, r in ratios.items()}


def signed_ratios(ratios: Mapping[Neuron, Sequence[float]]) -> dict[Neuron, float]:
    """Each neuron's median signed r_c (reported beside the rule's statistic: a negative one means the neuron
    pushes against o without the fact's subject); NaN without a usable control prompt."""
    return {n: float(np.median(r)) if len(r) else float("nan") for n, r in ratios.items()}


def flag_template(ratios: Mapping[Neuron, float], threshold: float = TEMPLATE_RATIO) -> frozenset[Neuron]:
    """The neurons whose `template_ratios` statistic is >= threshold (NaN: no usable control prompt, never
    flagged)."""
    return frozenset(n for n, r in ratios.items() if r == r and r >= threshold)


# --------------------------------------------------------------------------------------------------------
# The control of one fact
# --------------------------------------------------------------------------------------------------------

def control_subjects(factset, fact: Fact, k: int = CONTROL_SUBJECTS, seed: int = 0) -> list[str]:
    """Up to k distinct subjects of other facts of the fact's relation whose object differs from the fact's,
    drawn with a generator seeded by (seed, the fact), so a fact's controls do not depend on the run."""
    seen, pool = {fact.subject}, []
    for other in factset.facts_of(fact.relation):
        if other.subject not in seen and other.object != fact.object:
            seen.add(other.subject)
            pool.append(other.subject)
    rng = np.random.default_rng([seed, zlib.crc32(f"{fact.relation}\t{fact.subject}".encode("utf-8"))])
    return [pool[i] for i in sorted(rng.choice(len(pool), size=min(k, len(pool)), replace=False))]


def control_prompts(lm, factset, fact: Fact, prompts: Sequence, subjects: Sequence[str],
                    causal_templates: str = "prefix") -> tuple[list, list[dict]]:
    """The fact's templates filled with each control subject, answer = the fact's object; and the (subject,
    template) pairs that did not render, with the reason."""
    relation = factset.relation(fact.relation)
    templates = [p.template for p in prompts]
    out, skipped = [], []
    for subject in subjects:
        rendered, left = render_prompts(Fact(fact.relation, subject, fact.object), relation, lm.tokenizer,
                                        lm.kind, causal_templates)
        by_template = {p.template: p for p in rendered}
        reasons = {s.template: s.reason for s in left}
        for template in templates:
            if template in by_template:
                out.append(by_template[template])
            else:
                skipped.append({"subject": subject, "template": template,
                                "reason": reasons.get(template, "not rendered")})
    return out, skipped


@dataclass
class SubjectControl:
    """One fact's control: the candidates, their median ratios, the template-flagged ones, what it used and
    what it could not use. `reason` is set (and nothing flagged) when the fact was not controlled."""
    relation: str
    subject: str
    candidates: list[Neuron]
    ratios: dict[Neuron, float] = field(default_factory=dict)  # the rule's statistic, median |r_c|
    signed: dict[Neuron, float] = field(default_factory=dict)  # median r_c
    template: frozenset[Neuron] = frozenset()
    subjects: list[str] = field(default_factory=list)
    layers: list[int] = field(default_factory=list)
    prompts: int = 0  # control prompts scored
    skipped: list[dict] = field(default_factory=list)
    reason: str | None = None

    @property
    def controlled(self) -> bool:
        return self.reason is None

    def to_dict(self) -> dict:
        return {"relation": self.relation, "subject": self.subject, "controlled": self.controlled,
                "reason": self.reason, "control_subjects": self.subjects, "control_prompts": self.prompts,
                "layers": self.layers, "candidates": [list(n) for n in self.candidates],
                "template": [list(n) for n in sorted(self.template)],
                "ratios": _rounded(self.ratios), "signed_ratios": _rounded(self.signed),
                "skipped": self.skipped}


def _rounded(ratios: Mapping[Neuron, float]) -> list:
    return [[n[0], n[1], None if r != r else round(r, 4)] for n, r in sorted(ratios.items())]


def stored_control(run_params: Mapping | None) -> dict:
    """A stored run's subject control (`run_params["subject_control"]`, written by the app's control and
    `kn neurons --subject-control --project`: `SubjectControl.to_dict` and the thresholds); {} when none ran."""
    return (run_params or {}).get("subject_control") or {}


def template_neurons(run_params: Mapping | None) -> frozenset[Neuron]:
    """The neurons a stored run's subject control flagged "template"; empty when the run was not controlled."""
    return frozenset((int(layer), int(index)) for layer, index in stored_control(run_params).get("template", ()))


def control_ratios(run_params: Mapping | None) -> dict[Neuron, tuple[float | None, float | None]]:
    """{neuron: (median |r_c|, median r_c)} of a stored run's subject control; empty when the run was not
    controlled. A run stored before the rule read |r_c| has only the signed median: (None, signed)."""
    control = stored_control(run_params)
    signed = {(int(a), int(b)): r for a, b, r in control.get("signed_ratios", ())}
    if "signed_ratios" not in control:
        return {(int(a), int(b)): (None, r) for a, b, r in control.get("ratios", ())}
    return {(int(a), int(b)): (r, signed.get((int(a), int(b)))) for a, b, r in control.get("ratios", ())}


def kept_text(size: float | None, signed: float | None, template: bool) -> str:
    """What the control measured of one candidate, in words (None or NaN: not measured)."""
    size, signed = (None if x is None or x != x else x for x in (size, signed))
    if size is None and signed is None:
        return "no usable control prompt (the fact's own score is not positive): not flagged"
    kept = "n/a" if size is None else f"{size:.2f}"
    sign = "n/a" if signed is None else f"{signed:+.2f}"
    return (f"keeps {kept} of its effect's size without the subject (signed {sign}; template at >= "
            f"{TEMPLATE_RATIO:g}): {'template' if template else 'subject-specific'}")


def control_text(run_params: Mapping | None, neuron: Neuron) -> str:
    """One line on a neuron's subject control for a stored run ("" when it has none)."""
    ratios = control_ratios(run_params)
    if tuple(neuron) not in ratios:
        return ""
    return "subject control: " + kept_text(*ratios[tuple(neuron)], tuple(neuron) in template_neurons(run_params))


def template_left_out(run_params: Mapping | None) -> frozenset[Neuron]:
    """The template neurons a stored run's refined set leaves out: all of them, unless the control was run with
    --keep-template (the app and the report select a run's neurons with this, as the command that stored it)."""
    return frozenset() if stored_control(run_params).get("keep_template") else template_neurons(run_params)


Scorer = Callable[[object, Sequence[int]], LayerScores]


def riemann_params(params):
    """The parameters the control scores with: the run's own, or the paper's Riemann sum (its seed kept) when the
    run used another quadrature, since the control compares two scores of one kind and `attribute_layers` sums
    the Riemann way."""
    from .attribution import AttributionParams

    if params is None or params.quadrature == "riemann":
        return params
    return AttributionParams(seed=params.seed)


def subject_control(lm, factset, fact: Fact, prompts: Sequence, candidates: Sequence[Neuron], params=None, *,
                    k: int = CONTROL_SUBJECTS, seed: int = 0, causal_templates: str = "prefix",
                    score: Scorer | None = None, task: Task | None = None) -> SubjectControl:
    """The subject control of one fact (module notes). `score(prompt, layers)`: how a prompt's `LayerScores` are
    obtained (default `attribute_layers` with `params`; the reproduction passes a cached one)."""
    task = as_task(task)
    params = riemann_params(params)
    candidates = sorted({(int(a), int(b)) for a, b in candidates})
    result = SubjectControl(fact.relation, fact.subject, candidates)
    if not candidates:
        result.reason = "no candidate neurons"
        return result
    subjects = control_subjects(factset, fact, k, seed)
    result.subjects = subjects
    if len(subjects) < MIN_CONTROL_SUBJECTS:
        result.reason = (f"only {len(subjects)} other subject(s) of {fact.relation} with an object other than "
                         f"{fact.object!r} in the fact set; the control needs at least {MIN_CONTROL_SUBJECTS}")
        return result
    controls, result.skipped = control_prompts(lm, factset, fact, prompts, subjects, causal_templates)
    if not controls:
        result.reason = "no template of the fact renders with any control subject"
        return result
    layers = sorted({layer for layer, _ in candidates})
    result.layers = layers
    if score is None:
        def score(prompt, chosen):
            return attribute_layers(lm, prompt, chosen, params, task.relay())
    items = list(prompts) + controls
    scored = []
    for n, prompt in enumerate(items):
        task.check()
        scored.append(score(prompt, layers))
        task.progress((n + 1) / len(items), f"subject control {fact.relation} {fact.subject}: {n + 1}/{len(items)}")
    own = {p.template: s.normalized for p, s in zip(prompts, scored)}
    per_prompt = prompt_ratios(own, [(p.template, s.normalized) for p, s in zip(controls, scored[len(prompts):])],
                               candidates, layers)
    result.ratios, result.signed = template_ratios(per_prompt), signed_ratios(per_prompt)
    result.template = flag_template(result.ratios)
    result.prompts = len(controls)
    return result


def control_summary(controls: Sequence[SubjectControl]) -> dict:
    """What a run's controls used and found, for reports: facts controlled, not controlled (with reasons),
    control subjects and prompts, candidates and template-flagged neurons."""
    done = [c for c in controls if c.controlled]
    return {"rule": RULE, "control_subjects_per_fact": CONTROL_SUBJECTS, "min_control_subjects": MIN_CONTROL_SUBJECTS,
            "threshold": TEMPLATE_RATIO, "facts": len(controls), "controlled": len(done),
            "not_controlled": [{"relation": c.relation, "subject": c.subject, "reason": c.reason}
                               for c in controls if not c.controlled],
            "control_subjects": sum(len(c.subjects) for c in done), "control_prompts": sum(c.prompts for c in done),
            "candidates": sum(len(c.candidates) for c in done), "template": sum(len(c.template) for c in done)}
