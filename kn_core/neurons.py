"""Selecting knowledge neurons from attribution scores (Dai et al., 2022, section 3.2): coarse neurons per
prompt, refined neurons per fact, the paper's per-relation p, and relation-level neurons.

Pure functions over stored [layers, neurons] score arrays, instant to recompute when t or p change.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

Neuron = tuple[int, int]


def coarse_neurons(scores: np.ndarray, t: float = 0.2) -> list[Neuron]:
    """Neurons whose score exceeds t x the maximum over all layers (none when the maximum is not positive)."""
    top = float(np.max(scores))
    if not top > 0:
        return []
    layers, neurons = np.nonzero(scores > t * top)
    return list(zip(layers.tolist(), neurons.tolist()))


def refine_threshold(n_prompts: int, p: float) -> float:
    return max(p * n_prompts, 3)


def coarse_counts(score_list: Iterable[np.ndarray], t: float = 0.2) -> Counter:
    counts: Counter = Counter()
    for scores in score_list:
        counts.update(coarse_neurons(scores, t))
    return counts


def refined_from_counts(counts: Counter, n_prompts: int, p: float) -> list[Neuron]:
    need = refine_threshold(n_prompts, p)
    return sorted(n for n, c in counts.items() if c >= need)


def refined_neurons(score_list: Sequence[np.ndarray], t: float = 0.2, p: float = 0.7) -> list[Neuron]:
    """Neurons coarse in at least max(p x n_prompts, 3) of a fact's prompts."""
    return refined_from_counts(coarse_counts(score_list, t), len(score_list), p)


@dataclass
class AdaptedP:
    p: float
    mean_neurons: float
    history: list[tuple[float, float]]  # (p, mean refined neurons per fact) at each try


def adapt_p(facts_scores: Sequence[Sequence[np.ndarray]], t: float = 0.2, p: float = 0.7, step: float = 0.05,
            max_moves: int = 6, target: tuple[float, float] = (2.0, 5.0)) -> AdaptedP:
    """The paper's per-relation p: move by +-step (up to max_moves) until the mean refined count is in target."""
    counts = [(coarse_counts(scores, t), len(scores)) for scores in facts_scores]

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


def relation_neurons(refined_sets: Sequence[Iterable[Neuron]], fraction: float = 0.1) -> list[tuple[Neuron, int]]:
    """Neurons refined for at least `fraction` of a relation's facts, most frequent first, with their counts."""
    counts: Counter = Counter()
    for neurons in refined_sets:
        counts.update(set(map(tuple, neurons)))
    need = fraction * len(refined_sets)
    return sorted(((n, c) for n, c in counts.items() if c >= need), key=lambda nc: (-nc[1], nc[0]))
