"""Neurons and the paper's rule for selecting them from attribution scores (Dai et al., 2022, section 3.2), in the
bottom layer so that the store's compact scores (`store/topscores.py`) select exactly as the science does.

- `Neuron`: (layer, neuron index) as a plain tuple, the form the store, the saved edit history and JSON output
  keep (MoE models: the index into the layer's flattened expert axis; `neurons.neuron_name` writes it).
- `NeuronSelection`: the one selection value (t, p, keep_massive) with the paper's defaults `DEFAULT_T`,
  `DEFAULT_P` (`ACTIVATION_T` for the activation baseline), checked when made; the runner takes it, and the
  CLI's options and the app's controls start at its defaults.
- The pure rules over [layers, neurons] score arrays: coarse neurons per prompt (score > t x max), refined
  neurons per fact (coarse in >= max(p x n_prompts, 3) prompts). Every rule takes `exclude`: neurons that never
  set the t x max threshold and are never returned. `kn_core.neurons` re-exports them beside the flags.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from .validation import ValidationError, check_fraction

Neuron = tuple[int, int]

DEFAULT_T = 0.2  # the paper's coarse threshold: score > 0.2 x the prompt's maximum
ACTIVATION_T = 0.5  # the paper's threshold for its activation baseline
DEFAULT_P = 0.7  # the paper's starting refinement share (adapted per relation by `neurons.adapt_p`)


def default_t(method: str) -> float:
    """The paper's coarse threshold for an attribution method: 0.2 x max, 0.5 x max for the activation baseline."""
    return ACTIVATION_T if method == "activation" else DEFAULT_T


@dataclass(frozen=True)
class NeuronSelection:
    """How a fact's refined neurons are chosen from its scores (as `kn neurons`): coarse at t x max, refined in
    >= max(p x prompts, 3) prompts, the fact's massive neurons left out unless keep_massive."""
    t: float = DEFAULT_T
    p: float = DEFAULT_P
    keep_massive: bool = False

    def __post_init__(self):  # refused here, not after the first fact's attribution
        check_fraction("t", self.t)
        check_fraction("p", self.p)
        if not isinstance(self.keep_massive, bool):
            raise ValidationError(f"keep_massive = {self.keep_massive!r} is not allowed: expected True or False")

    def to_dict(self) -> dict:
        return {"t": self.t, "p": self.p, "keep_massive": self.keep_massive}


def _exclusion(exclude: Iterable[Neuron], shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """The excluded neurons as index arrays into a [layers, neurons] array; a clear error when out of range."""
    pairs = sorted({(int(layer), int(index)) for layer, index in exclude})
    for layer, index in pairs:
        if not (0 <= layer < shape[0] and 0 <= index < shape[1]):
            raise ValueError(f"excluded neuron ({layer}, {index}) is outside the scores' {shape[0]} layers x "
                             f"{shape[1]} neurons; pass neurons of the model the scores come from")
    return (np.array([p[0] for p in pairs], dtype=np.int64), np.array([p[1] for p in pairs], dtype=np.int64))


def _coarse(scores: np.ndarray, t: float, excluded: tuple[np.ndarray, np.ndarray]) -> list[Neuron]:
    if np.ndim(scores) != 2 or np.size(scores) == 0:
        raise ValidationError(f"scores must be one prompt's non-empty [layers, neurons] array, got shape "
                              f"{np.shape(scores)}")
    check_fraction("t", t)
    if excluded[0].size:
        scores = np.array(scores, dtype=np.float64)
        scores[excluded] = -np.inf
    top = float(np.max(scores))
    if math.isnan(top) or top == math.inf:  # -inf is fine: a compact form's unstored scores, or all excluded
        raise ValidationError(f"scores hold {int(np.sum(~np.isfinite(scores) & (scores != -np.inf)))} NaN or "
                              f"infinite values, so no threshold t x max exists; attribute the prompt again in "
                              f"float32")
    if not top > 0:
        return []
    # In float64: NumPy would round t x top to float32 scores' precision, so t just below 1 would drop the top.
    layers, neurons = np.nonzero(np.asarray(scores, dtype=np.float64) > t * top)
    return list(zip(layers.tolist(), neurons.tolist()))


def coarse_neurons(scores: np.ndarray, t: float = DEFAULT_T, exclude: Iterable[Neuron] = ()) -> list[Neuron]:
    """Neurons whose score exceeds t x the maximum over all layers (none when the maximum is not positive).
    Excluded neurons neither set the maximum nor are returned."""
    return _coarse(scores, t, _exclusion(exclude, np.shape(scores)))


def refine_threshold(n_prompts: int, p: float) -> float:
    return max(p * n_prompts, 3)


def coarse_counts(score_list: Iterable[np.ndarray], t: float = DEFAULT_T, exclude: Iterable[Neuron] = ()) -> Counter:
    """In how many prompts each neuron is coarse."""
    counts: Counter = Counter()
    exclude = list(exclude)
    excluded = None
    for scores in score_list:
        if excluded is None:
            excluded = _exclusion(exclude, np.shape(scores))
        counts.update(_coarse(scores, t, excluded))
    return counts


def refined_from_counts(counts: Counter, n_prompts: int, p: float, exclude: Iterable[Neuron] = ()) -> list[Neuron]:
    need = refine_threshold(n_prompts, p)
    skip = {(int(layer), int(index)) for layer, index in exclude}
    return sorted(n for n, c in counts.items() if c >= need and tuple(n) not in skip)


def refined_neurons(score_list: Sequence[np.ndarray], t: float = DEFAULT_T, p: float = DEFAULT_P,
                    exclude: Iterable[Neuron] = ()) -> list[Neuron]:
    """Neurons coarse in at least max(p x n_prompts, 3) of a fact's prompts."""
    return refined_from_counts(coarse_counts(score_list, t, exclude), len(score_list), p)
