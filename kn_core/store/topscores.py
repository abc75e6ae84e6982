"""Compact score storage: per prompt, the top scores only, kept so that coarse selection stays exact.

A `TopScores` keeps every score >= floor x r, where r is the (guard+1)-th largest score of the prompt (all of the
top guard+1 scores are kept in any case), in the scores' own dtype, plus `bound`: no unstored score exceeds it.
Coarse selection (`selection.coarse_neurons`: scores > t x the maximum over the non-excluded neurons) is exact
whenever t x that maximum >= bound, because no unstored score can then pass the threshold. That holds for every
t >= floor while at most `guard` neurons are excluded (then the maximum is >= r); past that, `coarse` checks
the condition itself and refuses (`ScoresTooCoarseError`, one line) instead of returning a silently smaller set.
A full array is a `TopScores` with everything kept (`bound` = -inf): exact for every t.
"""

from __future__ import annotations

import io
import math
import zlib
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from ..selection import DEFAULT_P, DEFAULT_T, Neuron, coarse_neurons, refined_from_counts

TOP_CODEC = "top+zlib"
DEFAULT_FLOOR = 0.1  # half the paper's t = 0.2: the slider can go that far down and stay exact
DEFAULT_GUARD = 16  # excluded (flagged) neurons that may set the maximum while t >= floor stays exact
_MARGIN = 1 + 2 ** -20  # the reference compares in float32; refuse a threshold within rounding of the bound


class ScoresTooCoarseError(ValueError):
    pass


@dataclass(frozen=True, eq=False)
class TopScores:
    shape: tuple[int, int]
    indices: np.ndarray  # flat indices into shape, ascending
    values: np.ndarray  # the scores at those indices, in the dtype they were computed in
    bound: float  # every score not stored is <= bound (-inf: nothing left out)
    floor: float = 0.0
    guard: int = 0

    @classmethod
    def keep_all(cls, scores: np.ndarray) -> "TopScores":
        scores = np.asarray(scores)
        return cls(tuple(scores.shape), np.arange(scores.size), scores.ravel(), -math.inf)

    @classmethod
    def compress(cls, scores: np.ndarray, floor: float = DEFAULT_FLOOR, guard: int = DEFAULT_GUARD) -> "TopScores":
        scores = np.asarray(scores)
        flat = scores.ravel()
        if flat.size <= guard + 1 or not np.all(np.isfinite(flat)):
            return cls.keep_all(scores)  # nothing to gain, or NaN/inf whose meaning only the full array keeps
        r = float(np.partition(flat, flat.size - guard - 1)[flat.size - guard - 1])
        if r > 0:
            keep = flat >= floor * r / _MARGIN  # so t >= floor passes the margin check below
            below = flat[~keep]
            bound = float(below.max()) if below.size else -math.inf
        else:  # at most `guard` positive scores: keep the top guard+1; the rest are <= r <= 0
            order = np.argpartition(flat, flat.size - guard - 1)[flat.size - guard - 1:]
            keep = np.zeros(flat.size, dtype=bool)
            keep[order] = True
            bound = r
        indices = np.flatnonzero(keep)
        return cls(tuple(scores.shape), indices, flat[indices], bound, float(floor), int(guard))

    @property
    def exact_everywhere(self) -> bool:
        return self.bound == -math.inf

    def dense(self, fill: float = -math.inf) -> np.ndarray:
        """The scores with every unstored one set to `fill` (exactly the original array when nothing is left out)."""
        out = np.full(int(np.prod(self.shape)), fill, dtype=self.values.dtype)
        out[self.indices] = self.values
        return out.reshape(self.shape)

    def coarse(self, t: float = DEFAULT_T, exclude: Iterable[Neuron] = ()) -> list[Neuron]:
        """`selection.coarse_neurons` of the full scores, or ScoresTooCoarseError when unstored scores could matter."""
        exclude = list(exclude)
        if not self.exact_everywhere:
            self._check(t, exclude)
        return coarse_neurons(self.dense(), t, exclude)

    def _check(self, t: float, exclude: list) -> None:
        skip = {int(layer) * self.shape[1] + int(index) for layer, index in exclude}
        kept = self.values[~np.isin(self.indices, np.fromiter(skip, dtype=np.int64, count=len(skip)))]
        top = float(kept.max()) if kept.size else -math.inf
        if max(top, self.bound) <= 0:
            return  # the maximum is not positive: no neuron is coarse, whatever was left out
        if top < self.bound or t * top < self.bound * _MARGIN:
            raise ScoresTooCoarseError(
                f"t={t} is below what these compactly stored scores keep exact (scores >= {self.floor} x the "
                f"{self.guard + 1}th largest, with {len(skip)} excluded neurons); use t >= {self.floor}, exclude at "
                f"most {self.guard} neurons, or re-run the attribution into a project storing full scores")


def coarse_counts(tops: Iterable[TopScores], t: float = DEFAULT_T, exclude: Iterable[Neuron] = ()) -> Counter:
    """In how many prompts each neuron is coarse (as `selection.coarse_counts`, refusing where not exact)."""
    exclude = list(exclude)
    counts: Counter = Counter()
    for top in tops:
        counts.update(top.coarse(t, exclude))
    return counts


def refined_neurons(tops: Sequence[TopScores], t: float = DEFAULT_T, p: float = DEFAULT_P,
                    exclude: Iterable[Neuron] = ()) -> list[Neuron]:
    """`selection.refined_neurons` over stored scores (full or compact)."""
    exclude = list(exclude)
    return refined_from_counts(coarse_counts(tops, t, exclude), len(tops), p, exclude)


def encode_top(top: TopScores) -> tuple[bytes, int]:
    """zlib of three `.npy` arrays one after the other: indices (uint16 when they fit), values, and
    [bound, floor, guard] as float64. Any numpy reads them with three np.load calls on one stream."""
    buf = io.BytesIO()
    index_type = np.uint16 if int(np.prod(top.shape)) <= 1 << 16 else np.int64
    np.save(buf, top.indices.astype(index_type), allow_pickle=False)
    np.save(buf, np.ascontiguousarray(top.values), allow_pickle=False)
    np.save(buf, np.array([top.bound, top.floor, top.guard], dtype=np.float64), allow_pickle=False)
    blob = zlib.compress(buf.getvalue(), 1)
    return blob, zlib.crc32(blob)


def decode_top(raw: bytes, shape) -> TopScores:
    buf = io.BytesIO(raw)
    indices = np.load(buf, allow_pickle=False).astype(np.int64)
    values = np.load(buf, allow_pickle=False)
    bound, floor, guard = np.load(buf, allow_pickle=False).tolist()
    if indices.shape != values.shape or (indices.size and (indices.min() < 0 or indices.max() >= np.prod(shape))):
        raise ValueError("top scores whose indices do not fit their shape")
    return TopScores(tuple(int(n) for n in shape), indices, values, float(bound), float(floor), int(guard))
