"""Selecting knowledge neurons from attribution scores (Dai et al., 2022, section 3.2), and keeping apart the
neurons that would look like knowledge neurons of every fact.

Selection (pure functions over stored [layers, neurons] score arrays, instant to recompute when t or p change):
coarse neurons per prompt (score > t x max) and refined neurons per fact (coarse in >= max(p x n_prompts, 3) of
its prompts) live in the bottom layer (`kn_core.selection`, re-exported here); here are the few-prompt rule, the
paper's per-relation p and relation-level neurons (refined for >= 10% of a relation's facts).
Every selection function takes `exclude`: neurons that never set the t x max threshold and are never returned.
The defaults (`exclude=()`) are the paper's method exactly.

Flags (`NeuronFlags`), beyond the paper:
- massive: a few neurons fire orders of magnitude above the rest on almost every input (Sun et al. 2024,
  "Massive activations in large language models": magnitude > 100 and ~1,000x the median; Yu et al. 2024,
  "The super weight"). Integrating from 0 to such an activation moves the output for any fact, and one such
  score sets the t x max threshold of every prompt. The rule, scale-free so it holds for any model size:
  a neuron is massive when (1) its median |activation| over prompts exceeds `ratio` (100) x the median
  |activation| of its layer (over all the layer's neurons and prompts) -- the median over prompts makes it
  "large on at least half of the inputs", not on one; a layer whose median is 0 (ReLU, mostly exact zeros)
  is measured by its mean |activation| instead -- and (2) its mean |activation| is among the
  `top_fraction` (0.1%, at least one) largest of the whole model. The rule was chosen from the literature
  before it was run on any model; it was not tuned on any fact set.
- template (per fact, `kn_core.specificity`, docs/SPECIFICITY.md): keeps at least half its effect on the fact's
  answer when the subject is swapped for other subjects of the relation (same templates): a neuron of the
  wording, not of the fact. Taken out of that fact's refined set unless the caller keeps it.
- unspecific: coarse for facts of most relations. A fact's coarse set is the neurons coarse in at least half of
  its prompts (`fact_coarse_set`). A relation "uses" a neuron when it is in the coarse sets of at least
  `fact_fraction` (10%, the paper's relation-level threshold) of the relation's facts; the neuron is
  unspecific when more than `relation_fraction` (half) of the relations use it, given at least `min_relations`
  (3) relations (with fewer, nothing is flagged: "most relations" means nothing). Compute the coarse sets with
  the massive neurons excluded, or the massive neurons' threshold hides everything else. Relations that share
  answers (official language and native language: "French") share output neurons too; flag on relations
  whose answers differ, or expect those neurons among the unspecific ones.

Activation statistics (`ActivationStats`) are read at the answer position, as attribution reads activations:
either from the activations an attribution run already has (`ActivationStats.from_activations`, no extra
forward pass) or measured on prompts or plain text (`activation_stats`, by default on a built-in set of neutral
sentence prefixes). They also give each neuron's mean activation for mean-ablation.

Callers (CLI, GUI, reproduction) use, with `keep_massive` to keep flagged neurons in:

    flags = run_flags(lm, [r.activations for r in results])          # run's prompts + the neutral set
    # several relations: run_flags(lm, activations, {relation: [[r.scores for r in fact_results], ...]}, t)
    # needing the statistics too (mean-ablation): stats = run_stats(lm, acts); flags = scored_flags(stats, ...)
    exclude = () if keep_massive else flags.excluded
    refined = refined_neurons([r.scores for r in results], t, p, exclude=exclude)
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from importlib import resources
from typing import Iterable, Mapping, Sequence

import numpy as np

from .encoding import prompt_ids, text_ids
from .selection import (DEFAULT_P, DEFAULT_T, Neuron, coarse_counts, coarse_neurons,  # noqa: F401 (callers
                        refine_threshold, refined_from_counts, refined_neurons)  # select through `neurons`)
from .tasks import Task
from .validation import ValidationError
MASSIVE_RATIO = 100.0
MASSIVE_TOP_FRACTION = 0.001
UNSPECIFIC_FACT_FRACTION = 0.1
UNSPECIFIC_RELATION_FRACTION = 0.5
UNSPECIFIC_MIN_RELATIONS = 3


# --- selection ------------------------------------------------------------------------------------------------

def neuron_name(layer: int, neuron: int, layout=None) -> str:
    """The one way the CLI, the reports and the app write a neuron (as the README does): "L24 N1005"; given the
    layout of a mixture-of-experts model, "L3 E5 N24" (expert 5's neuron 24 in layer 3's flattened axis)."""
    if layout is None or getattr(layout, "experts", None) is None:
        return f"L{int(layer)} N{int(neuron)}"
    expert, local = layout.expert_of(int(layer), int(neuron))
    return f"L{int(layer)} E{expert} N{local}"




REFINE_MIN_PROMPTS = 3  # the floor of refine_threshold


def case_neurons(score_list: Sequence[np.ndarray], t: float = DEFAULT_T, p: float = DEFAULT_P,
                 exclude: Iterable[Neuron] = ()) -> tuple[list[Neuron], dict]:
    """A case's knowledge neurons for any number of prompts, with the rule that chose them (record it).

    With >= 3 prompts this is `refined_neurons` exactly. With 1 or 2 (EasyEdit's single-prompt request, zsRE's
    prompt and rephrase) refinement can select nothing, as no neuron is coarse in 3 of them; the rule then
    asks for the neurons coarse in every prompt: min(max(p x n, 3), n) prompts. That is the paper's own
    threshold where it can be met (with exactly 3 prompts it already means all of them), and below it: with 1
    prompt its coarse neurons (the paper's coarse step is per prompt), with 2 the neurons coarse in both (the
    agreement across paraphrases refinement asks for, at its strictest). p does not matter below 3 prompts."""
    n = len(score_list)
    if n >= REFINE_MIN_PROMPTS:
        need = refine_threshold(n, p)
        rule = {"rule": "refined", "prompts": n, "coarse_in_at_least": math.ceil(need),  # as applied
                "text": f"refined: coarse (t={t:g}) in >= max(p x n, 3) = {need:g} of the {n} prompts"}
        return refined_neurons(score_list, t, p, exclude), rule
    if n == 0:
        raise ValidationError("a case needs at least one attributed prompt to have knowledge neurons")
    found = few_prompt_neurons(coarse_counts(score_list, t, exclude), n)
    what = "the prompt's coarse neurons" if n == 1 else "neurons coarse in both prompts"
    rule = {"rule": "coarse in every prompt", "prompts": n, "coarse_in_at_least": n,
            "text": f"{n} prompt(s), fewer than the 3 refinement needs: {what} (score > t={t:g} x max)"}
    return found, rule


def few_prompt_neurons(counts: Counter, n_prompts: int) -> list[Neuron]:
    """`case_neurons` below 3 prompts from coarse counts (e.g. a stored run's): coarse in every prompt."""
    return sorted(tuple(nrn) for nrn, c in counts.items() if c >= n_prompts)


def empty_neurons_fix(n_prompts: int, p: float) -> str:
    """What can give a case knowledge neurons when its set came back empty (lowering p below 3/n cannot)."""
    if n_prompts < REFINE_MIN_PROMPTS:
        return ("lower t (the coarse threshold: below 3 prompts a neuron must be coarse in every one), or give the "
                "case 4 or more paraphrased prompts, so that refinement need not have every one agree")
    if p * n_prompts > REFINE_MIN_PROMPTS:
        return f"lower p (needs {p * n_prompts:g} of {n_prompts} prompts now; the floor is 3) or lower t"
    return (f"lower t, or attribute more prompts: refinement already needs only its floor of 3 of the {n_prompts} "
            "prompts, so lowering p cannot help")


@dataclass
class AdaptedP:
    p: float
    mean_neurons: float
    history: list[tuple[float, float]]  # (p, mean refined neurons per fact) at each try


def adapt_p(facts_scores: Sequence[Sequence[np.ndarray]], t: float = DEFAULT_T, p: float = DEFAULT_P,
            step: float = 0.05, max_moves: int = 6, target: tuple[float, float] = (2.0, 5.0),
            exclude: Iterable[Neuron] = ()) -> AdaptedP:
    """The paper's per-relation p: move by +-step (up to max_moves) until the mean refined count is in target."""
    exclude = list(exclude)
    counts = [(coarse_counts(scores, t, exclude), len(scores)) for scores in facts_scores]

    def mean_at(q):
        return float(np.mean([len(refined_from_counts(c, n, q)) for c, n in counts])) if counts else 0.0

    history = [(p, mean_at(p))]
    for _ in range(max_moves):
        mean = history[-1][1]
        if target[0] <= mean <= target[1]:
            break
        p = round(p - step if mean < target[0] else p + step, 10)
        if not 0 < p <= 1:
            break
        history.append((p, mean_at(p)))
    return AdaptedP(p=history[-1][0], mean_neurons=history[-1][1], history=history)


def fact_coarse_set(score_list: Sequence[np.ndarray], t: float = DEFAULT_T,
                    exclude: Iterable[Neuron] = ()) -> set[Neuron]:
    """A fact's coarse set for `flag_unspecific`: neurons coarse in at least half of its prompts (one wording's
    coarse neurons say little about the fact; the refined set's 70% would hide what most facts share)."""
    counts = coarse_counts(score_list, t, exclude)
    return {n for n, c in counts.items() if 2 * c >= len(score_list)}


def relation_neurons(refined_sets: Sequence[Iterable[Neuron]], fraction: float = 0.1,
                     exclude: Iterable[Neuron] = ()) -> list[tuple[Neuron, int]]:
    """Neurons refined for at least `fraction` of a relation's facts, most frequent first, with their counts."""
    skip = {(int(layer), int(index)) for layer, index in exclude}
    counts: Counter = Counter()
    for neurons in refined_sets:
        counts.update(set(map(tuple, neurons)) - skip)
    need = fraction * len(refined_sets)
    return sorted(((n, c) for n, c in counts.items() if c >= need), key=lambda nc: (-nc[1], nc[0]))


# --- activation statistics ------------------------------------------------------------------------------------

def _array(rows, dtype=np.float32) -> np.ndarray:
    return np.asarray(rows, dtype=dtype)


@dataclass(frozen=True, eq=False)
class ActivationStats:
    """Per neuron, at the answer position over `n_prompts` prompts: mean activation (signed; the value for
    mean-ablation), mean |activation|, median |activation|; per layer, the median |activation| over all its
    neurons and prompts. Arrays are float32, [layers, neurons] or [layers]."""
    mean: np.ndarray
    mean_abs: np.ndarray
    median_abs: np.ndarray
    layer_median_abs: np.ndarray
    n_prompts: int
    source: str = ""
    # Mixture of experts: per neuron, the median |activation| of its expert (its neurons, on the prompts routed
    # to it); the massive rule measures an expert neuron against its own expert, not its layer. None: dense.
    expert_median_abs: np.ndarray | None = None

    @classmethod
    def from_activations(cls, activations: Sequence[np.ndarray], source: str = "",
                         experts=None) -> "ActivationStats":
        """From per-prompt [layers, neurons] activations at the answer position, e.g. `PromptScores.activations`
        of an attribution run (no forward pass needed). `experts`: an MoE model's `FFNLayout.experts`."""
        arrays = [np.asarray(a, dtype=np.float32) for a in activations]
        if not arrays:
            raise ValueError("activation statistics need the activations of at least one prompt")
        shape = arrays[0].shape
        if len(shape) != 2 or any(a.shape != shape for a in arrays):
            raise ValueError(f"every prompt's activations must be one [layers, neurons] array of the same shape; "
                             f"got {sorted({a.shape for a in arrays})}")
        stacked = np.stack(arrays)  # [prompts, layers, neurons]
        absolute = np.abs(stacked)
        layer_median = np.median(absolute.transpose(1, 0, 2).reshape(shape[0], -1), axis=1)
        return cls(mean=stacked.mean(axis=0), mean_abs=absolute.mean(axis=0), median_abs=np.median(absolute, axis=0),
                   layer_median_abs=layer_median.astype(np.float32), n_prompts=len(arrays), source=source,
                   expert_median_abs=None if experts is None else _expert_medians(absolute, experts))

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.mean.shape)

    def typical_abs(self) -> np.ndarray:
        """[layers, neurons]: the typical |activation| a neuron is compared with by the massive rule: its layer's
        median (its expert's in an MoE model), or where that is 0 (ReLU layers, mostly exact zeros) the mean
        |activation| of its layer."""
        median = (np.broadcast_to(self.layer_median_abs[:, None], self.mean.shape) if self.expert_median_abs is None
                  else self.expert_median_abs)
        return np.where(median > 0, median, self.mean_abs.mean(axis=1)[:, None])

    def mean_of(self, neurons: Iterable[Neuron]) -> list[float]:
        """Each neuron's mean activation: what mean-ablation sets it to."""
        return [float(self.mean[int(layer), int(index)]) for layer, index in neurons]

    def to_dict(self) -> dict:
        out = {"mean": self.mean.tolist(), "mean_abs": self.mean_abs.tolist(), "median_abs": self.median_abs.tolist(),
               "layer_median_abs": self.layer_median_abs.tolist(), "n_prompts": self.n_prompts,
               "source": self.source}
        if self.expert_median_abs is not None:
            out["expert_median_abs"] = self.expert_median_abs.tolist()
        return out

    @classmethod
    def from_dict(cls, d: Mapping) -> "ActivationStats":
        experts = d.get("expert_median_abs")
        return cls(mean=_array(d["mean"]), mean_abs=_array(d["mean_abs"]), median_abs=_array(d["median_abs"]),
                   layer_median_abs=_array(d["layer_median_abs"]), n_prompts=int(d["n_prompts"]),
                   source=str(d.get("source", "")), expert_median_abs=None if experts is None else _array(experts))


def _expert_medians(absolute: np.ndarray, experts) -> np.ndarray:
    """Per neuron [layers, neurons], the median |activation| of its expert over the expert's neurons and the
    prompts that reach it (any neuron of the expert nonzero); 0 for padding and experts no prompt reached."""
    out = np.zeros(absolute.shape[1:], dtype=np.float32)
    for layer, spans in enumerate(experts):
        for expert in spans:
            block = absolute[:, layer, expert.offset:expert.offset + expert.size]  # [prompts, neurons]
            routed = block[block.max(axis=1) > 0]
            out[layer, expert.offset:expert.offset + expert.size] = np.median(routed) if routed.size else 0.0
    return out


def neutral_sentences() -> list[str]:
    """The built-in neutral set: plain everyday sentence prefixes that stop before a word (no facts of any
    relation, no final punctuation: delimiter tokens carry massive activations of their own)."""
    text = resources.files("kn_core").joinpath("data/neutral_sentences.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def _answer_rows(lm, item) -> tuple[list[int], list[int]]:
    """(input ids, positions read) for a Prompt or a plain text prefix, as attribution reads activations:
    causal -- the positions predicting the answer tokens (a text: its last token); masked -- the mask slots (a
    text without a mask gets " <mask>." appended)."""
    tokenizer = lm.tokenizer
    text = item if isinstance(item, str) else item.text
    if not text or not text.strip():
        raise ValueError("an empty text has no answer position; remove empty lines from the texts")
    if lm.kind == "causal":  # a Prompt in the model's prompt format (as attribution reads it); a text as it is
        ids = text_ids(lm, "text", text) if isinstance(item, str) else prompt_ids(lm, text)
        if not ids:
            raise ValueError(f"{text!r} has no tokens")
        answer = [] if isinstance(item, str) else [int(t) for t in item.answer_ids]
        start = len(ids) - 1
        return ids + answer[:-1], list(range(start, start + max(len(answer), 1)))
    mask = tokenizer.mask_token
    if mask not in text:
        text = f"{text} {mask}."
    ids = text_ids(lm, "text", text)
    return ids, [i for i, t in enumerate(ids) if t == tokenizer.mask_token_id]


def answer_activations(lm, items: Sequence, task: Task | None = None, batch_size: int = 16) -> list[np.ndarray]:
    """Each item's [layers, neurons] activations at its answer position (mean over a multi-token answer's).
    `items`: Prompts or plain text prefixes."""
    import torch

    from .evaluation import PaddedRow, forward_rows

    rows = [PaddedRow(*_answer_rows(lm, item), []) for item in items]  # all input errors before any forward pass
    layers = range(lm.layout.layers)
    return [torch.stack([out.activations[layer].float().mean(dim=0) for layer in layers]).cpu().numpy()
            for out in forward_rows(lm, rows, batch_size, layers=layers, publish_answers=False, task=task,
                                    message="activation statistics")]


def activation_stats(lm, prompts: Sequence | None = None, task: Task | None = None) -> ActivationStats:
    """Activation statistics measured on `prompts` (Prompts or plain text prefixes; default: the built-in
    neutral sentences), one forward pass per batch."""
    items = neutral_sentences() if prompts is None else list(prompts)
    source = "neutral sentences" if prompts is None else f"{len(items)} prompts"
    return ActivationStats.from_activations(answer_activations(lm, items, task), source=source,
                                            experts=lm.layout.experts)


# --- flags ----------------------------------------------------------------------------------------------------

def flag_massive(stats: ActivationStats, ratio: float = MASSIVE_RATIO,
                 top_fraction: float = MASSIVE_TOP_FRACTION) -> frozenset[Neuron]:
    """Neurons whose median |activation| over prompts is > ratio x their layer's median |activation| and
    whose mean |activation| is among the top_fraction (at least one) largest of the model."""
    size = stats.mean_abs.size
    top = max(1, math.ceil(top_fraction * size))
    kth_largest = np.partition(stats.mean_abs.ravel(), size - top)[size - top]
    # ReLU layers (OPT) can be more than half exact zeros: a median of 0 makes any ratio true, so their mean
    # |activation| stands in as the layer's typical size (`typical_abs`; per expert in MoE models)
    big = stats.median_abs > ratio * stats.typical_abs()
    few = stats.mean_abs >= kth_largest
    layers, neurons = np.nonzero(big & few & (stats.median_abs > 0))
    return frozenset(zip(layers.tolist(), neurons.tolist()))


def flag_unspecific(coarse_sets_by_relation: Mapping[str, Sequence[Iterable[Neuron]]],
                    fact_fraction: float = UNSPECIFIC_FACT_FRACTION,
                    relation_fraction: float = UNSPECIFIC_RELATION_FRACTION,
                    min_relations: int = UNSPECIFIC_MIN_RELATIONS) -> frozenset[Neuron]:
    """Neurons used by more than relation_fraction of the relations (at least min_relations of them), where a
    relation uses a neuron in the coarse sets of >= fact_fraction of its facts."""
    relations = {r: [set(map(tuple, s)) for s in sets] for r, sets in coarse_sets_by_relation.items() if sets}
    if len(relations) < min_relations:
        return frozenset()
    used: Counter = Counter()
    for fact_sets in relations.values():
        per_fact = Counter(n for s in fact_sets for n in s)
        used.update(n for n, c in per_fact.items() if c >= fact_fraction * len(fact_sets))
    return frozenset((int(n[0]), int(n[1])) for n, c in used.items() if c > relation_fraction * len(relations))


FLAG_NAMES = ("massive", "unspecific", "template")


@dataclass(frozen=True)
class NeuronFlags:
    """Neurons kept apart from knowledge neurons, and the rule that flagged them. `template`: neurons the
    subject-specificity control (kn_core.specificity) flagged for the fact(s) it ran on; a per-fact flag, so it
    is not in `excluded` (which also keeps neurons from setting every prompt's t x max threshold): callers
    take a fact's template neurons out of that fact's refined set (`without_template`)."""
    massive: frozenset[Neuron] = frozenset()
    unspecific: frozenset[Neuron] = frozenset()
    rule: dict = field(default_factory=dict)
    template: frozenset[Neuron] = frozenset()

    @property
    def excluded(self) -> frozenset[Neuron]:
        return self.massive | self.unspecific

    def of(self, neuron: Neuron) -> tuple[str, ...]:
        """The flags of one neuron: () or some of FLAG_NAMES ("massive", "unspecific", "template")."""
        neuron = (int(neuron[0]), int(neuron[1]))
        return tuple(name for name in FLAG_NAMES if neuron in getattr(self, name))

    def with_template(self, neurons: Iterable[Neuron], rule: str) -> "NeuronFlags":
        """These flags plus `neurons` flagged template by the subject control (`rule`: its rule in words)."""
        from dataclasses import replace

        return replace(self, template=self.template | {(int(a), int(b)) for a, b in neurons},
                       rule={**self.rule, "template": rule})

    def to_dict(self) -> dict:
        return {"massive": [list(n) for n in sorted(self.massive)],
                "unspecific": [list(n) for n in sorted(self.unspecific)],
                "template": [list(n) for n in sorted(self.template)], "rule": dict(self.rule)}

    @classmethod
    def from_dict(cls, d: Mapping) -> "NeuronFlags":
        def neurons(key):
            return frozenset((int(layer), int(index)) for layer, index in d.get(key, ()))
        return cls(massive=neurons("massive"), unspecific=neurons("unspecific"), rule=dict(d.get("rule", {})),
                   template=neurons("template"))


def without_template(neurons: Iterable[Neuron], template: Iterable[Neuron]) -> list[Neuron]:
    """A fact's refined neurons without those its subject control flagged template (order kept)."""
    drop = {(int(a), int(b)) for a, b in template}
    return [n for n in neurons if (int(n[0]), int(n[1])) not in drop]


def neuron_flags(stats: ActivationStats, coarse_sets_by_relation: Mapping | None = None, *,
                 ratio: float = MASSIVE_RATIO, top_fraction: float = MASSIVE_TOP_FRACTION,
                 fact_fraction: float = UNSPECIFIC_FACT_FRACTION,
                 relation_fraction: float = UNSPECIFIC_RELATION_FRACTION,
                 min_relations: int = UNSPECIFIC_MIN_RELATIONS) -> NeuronFlags:
    """Massive neurons from `stats`; unspecific ones from the coarse sets of each relation's facts, if given."""
    reference = ("its layer's median |activation| (its mean where the median is 0)" if stats.expert_median_abs is None
                 else "its expert's median |activation| on the prompts routed to it (its layer's mean where that is 0)")
    rule = {"massive": f"median |activation| over prompts > {ratio:g} x {reference}, and mean |activation| among "
                       f"the {top_fraction:.2%} largest of the model (at least one)",
            "ratio": ratio, "top_fraction": top_fraction, "n_prompts": stats.n_prompts, "stats_source": stats.source}
    unspecific: frozenset[Neuron] = frozenset()
    if coarse_sets_by_relation is not None:
        unspecific = flag_unspecific(coarse_sets_by_relation, fact_fraction, relation_fraction, min_relations)
        rule.update({"unspecific": f"in the coarse sets of >= {fact_fraction:.0%} of the facts of more than "
                                   f"{relation_fraction:.0%} of the relations (at least {min_relations} relations)",
                     "fact_fraction": fact_fraction, "relation_fraction": relation_fraction,
                     "min_relations": min_relations, "relations": len(coarse_sets_by_relation)})
    return NeuronFlags(massive=flag_massive(stats, ratio, top_fraction), unspecific=unspecific, rule=rule)


def run_stats(lm, activations: Sequence[np.ndarray] = (), task: Task | None = None) -> ActivationStats:
    """Activation statistics for a run: its prompts' activations (`PromptScores.activations`, free) plus the
    built-in neutral sentences (one batched forward pass each), so "on almost every input" never rests on one
    fact's paraphrases. Also the means for mean-ablation."""
    neutral = answer_activations(lm, neutral_sentences(), task)
    return ActivationStats.from_activations(list(activations) + neutral,
                                            source=f"{len(activations)} run prompts + {len(neutral)} neutral sentences",
                                            experts=lm.layout.experts)


def scored_flags(stats: ActivationStats, scores_by_relation: Mapping[str, Sequence[Sequence[np.ndarray]]] | None = None,
                 t: float = DEFAULT_T) -> NeuronFlags:
    """Massive neurons from `stats`; unspecific ones, when `scores_by_relation` ({relation: [one fact's prompt
    scores, ...]}) is given, from each fact's coarse set at threshold t with the massive neurons excluded."""
    if scores_by_relation is None:
        return neuron_flags(stats)
    massive = flag_massive(stats)
    sets = {relation: [fact_coarse_set(scores, t, massive) for scores in facts]
            for relation, facts in scores_by_relation.items()}
    return neuron_flags(stats, sets)


def run_flags(lm, activations: Sequence[np.ndarray] = (),
              scores_by_relation: Mapping[str, Sequence[Sequence[np.ndarray]]] | None = None, t: float = DEFAULT_T,
              task: Task | None = None) -> NeuronFlags:
    """The flags for a run in one call: `scored_flags(run_stats(lm, activations), scores_by_relation, t)`."""
    return scored_flags(run_stats(lm, activations, task), scores_by_relation, t)
