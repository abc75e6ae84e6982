"""Quadrature rules for the integrated-gradients integral beyond the paper's Riemann sum (`passes.integrate` keeps
that one), and the per-layer check that decides where more points are needed.

Along the path alpha -> alpha x w^l (the whole activation vector of layer l scaled), the attributions of a layer
sum to the change of the output over any stretch [a, b] of the path (the gradient theorem):
    sum_i w_i integral_a^b dP(alpha w)/dw_i dalpha = P(b w) - P(a w).
So a panel [a, b] integrated with a few Gauss-Legendre points is checked by two probabilities at its ends, which
the same batched rows give (a row at alpha = a yields P(a w) with its gradient; P(1 w) is the clean run's). This
is the paper's completeness property, applied piece by piece.

- `gauss`: m Gauss-Legendre points on [0, 1] in every layer (exact for polynomials of degree 2m - 1; the
  integrand is smooth in most layers). Layers that hold a flagged massive neuron (`neurons.flag_massive` on the
  built-in neutral sentences), and layers whose completeness error is above the tolerance after the m points,
  are integrated again on a dense grid: DENSE_PANELS equal panels of m points each.
- `auto`: starts like `gauss` (flagged layers on the dense grid at once) and then cuts every panel whose
  completeness error is above its share of the tolerance (tolerance x panel width) into SPLIT equal panels,
  round after round, until the layer's error is within the tolerance or panels are MIN_WIDTH wide. Each round
  is one more pass through the model above the layer, and on CPU a pass costs about as much as 40 extra rows
  of layer 0 (the weights are read whatever the batch), so panels are cut in four, not halved: measured on the
  default model, layer 0 (whose integrand jumps) then takes 3 rounds instead of 5 and the prompt ~20-35% less
  time, for a few more rows. A layer still above the
  tolerance is reported (`within_tolerance: false` in its completeness row), never hidden.

The completeness error of a layer is |sum of its attributions - (P(w) - P(0 at layer l))| divided by
max(P(w), |P(w) - P(0 at layer l)|): relative to the change being attributed, or to the answer's probability when
that change is smaller (a change near 0 would make any error look huge). The check sees the sum over a layer's
neurons, not each neuron; errors of single neurons that cancel exactly in the sum go unseen, which is why the
benchmark (benchmarks/bench_quadrature.py) compares neurons and scores against a 200-point reference too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable, Sequence

import numpy as np
import torch

QUADRATURES = ("riemann", "gauss", "auto")
DEFAULT_POINTS = {"riemann": 20, "gauss": 4, "auto": 3}
DEFAULT_TOLERANCE = 0.01
DENSE_PANELS = 16
SPLIT = 4
MIN_WIDTH = 1 / 64  # auto: no panel is cut below this width


@lru_cache(maxsize=64)
def gauss_legendre(m: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Nodes in (0, 1) and weights (summing to 1) of the m-point Gauss-Legendre rule on [0, 1]."""
    x, w = np.polynomial.legendre.leggauss(m)
    return tuple(((x + 1) / 2).tolist()), tuple((w / 2).tolist())


@dataclass
class _Panel:
    a: float
    b: float
    contribution: torch.Tensor | None = None  # [targets, neurons]: this panel's part of the scores
    error: float = 0.0  # completeness error of the panel, relative to the layer's scale (max over targets)


@dataclass
class _Layer:
    panels: list[_Panel]
    probs: dict[float, torch.Tensor] = field(default_factory=dict)  # alpha -> P(alpha w) [targets]
    rows: int = 0  # rows evaluated for this layer (integrand evaluations, every answer token's row counted once)
    done: bool = False


def _uniform(panels: int) -> list[_Panel]:
    return [_Panel(k / panels, (k + 1) / panels) for k in range(panels)]


def _new_rows(layer: _Layer, m: int) -> list[float]:
    """The alphas this layer still needs: the Gauss points of its unscored panels and their ends' probabilities."""
    nodes, _ = gauss_legendre(m)
    out: list[float] = []
    for panel in layer.panels:
        if panel.contribution is None:
            out += [panel.a + (panel.b - panel.a) * x for x in nodes]
    ends = {p.a for p in layer.panels} | {p.b for p in layer.panels}
    out += sorted(e for e in ends if e not in layer.probs and e != 1.0)
    return out


def integrate_panels(acts: torch.Tensor, prob: torch.Tensor, params, dense_layers: Sequence[int],
                     run_rows: Callable[[list[int], list[list[float]]], tuple[torch.Tensor, torch.Tensor]],
                     report: Callable[[dict, float], None], check: Callable[[], None]):
    """Scores [targets, L, N], P(0 at layer l) [targets, L] and per-layer notes for `gauss` and `auto`.

    acts [targets, L, N]; prob [targets] (P(w), the clean run's); `run_rows(layers, alphas per layer)` returns
    gradients [targets, layers, rows, N] and probabilities [targets, layers, rows] (every listed layer has the
    same number of rows); `report({layer: its scores [targets, N]}, fraction of layers done)` after each round,
with the layers that became final.
    """
    n_targets, L, _ = acts.shape
    m, tol = params.steps, params.tolerance
    nodes, weights = gauss_legendre(m)
    dense = set(dense_layers)
    layers = [_Layer(_uniform(DENSE_PANELS) if l in dense else [_Panel(0.0, 1.0)]) for l in range(L)]
    for layer in layers:
        layer.probs[1.0] = prob
    rounds = 0
    while True:
        check()
        todo = [l for l in range(L) if not layers[l].done]
        wanted = {l: _new_rows(layers[l], m) for l in todo}
        for count in sorted({len(a) for a in wanted.values()}):  # one batch per row count (same rows per layer)
            group = [l for l in todo if len(wanted[l]) == count]
            if not count:
                continue
            grads, probs = run_rows(group, [wanted[l] for l in group])
            for j, l in enumerate(group):
                _take(layers[l], acts[:, l], wanted[l], grads[:, j], probs[:, j], m, nodes, weights)
        rounds += 1
        finished = []
        for l in todo:
            layer = layers[l]
            scale = _scale(prob, layer.probs[0.0])
            for panel in layer.panels:
                drop = layer.probs[panel.b] - layer.probs[panel.a]
                panel.error = float(((panel.contribution.sum(-1) - drop).abs() / scale).max())
            if _refine(layer, params.quadrature, tol, rounds, l in dense):
                continue
            layer.done = True
            finished.append(l)
        report({l: sum(p.contribution for p in layers[l].panels) for l in finished},
               sum(layer.done for layer in layers) / L)
        if all(layer.done for layer in layers):
            break
    scores = torch.stack([sum(p.contribution for p in layer.panels) for layer in layers], dim=1)
    p_zero = torch.stack([layer.probs[0.0] for layer in layers], dim=1).cpu()
    notes = [{"rows": layer.rows, "panels": len(layer.panels),
              "error": _layer_error(scores[:, l], prob, layer.probs[0.0])} for l, layer in enumerate(layers)]
    return scores, p_zero, notes


def _take(layer: _Layer, acts: torch.Tensor, alphas: list[float], grads: torch.Tensor, probs: torch.Tensor, m: int,
          nodes, weights) -> None:
    """Stores a round's rows of one layer: panel contributions from their Gauss points, probabilities at ends.
    acts [targets, N], grads [targets, rows, N], probs [targets, rows]."""
    layer.rows += len(alphas)
    k = 0
    for panel in layer.panels:
        if panel.contribution is not None:
            continue
        width = panel.b - panel.a
        w = torch.tensor([width * c for c in weights], dtype=grads.dtype, device=grads.device)
        panel.contribution = acts * torch.einsum("r,trn->tn", w, grads[:, k:k + m])
        k += m
    for j, alpha in enumerate(alphas[k:], start=k):
        layer.probs[alpha] = probs[:, j]


def _layer_error(scores: torch.Tensor, prob: torch.Tensor, p_zero: torch.Tensor) -> float:
    """The layer's completeness error (the largest over targets), relative to `_scale`."""
    return float(((scores.sum(-1) - (prob - p_zero)).abs() / _scale(prob, p_zero)).max())


def _scale(prob: torch.Tensor, p_zero: torch.Tensor) -> torch.Tensor:
    """What a layer's completeness error is measured against: max(P(w), |P(w) - P(0)|), never 0."""
    return torch.maximum(prob.abs(), (prob - p_zero).abs()).clamp_min(torch.finfo(prob.dtype).tiny)


def _refine(layer: _Layer, quadrature: str, tol: float, rounds: int, dense: bool) -> bool:
    """Whether the layer needs another round (and its panels are replaced by the ones to compute next)."""
    if sum(p.error for p in layer.panels) <= tol:
        return False
    if quadrature == "gauss":  # one fixed fallback: the dense grid, once
        if rounds > 1 or dense:
            return False
        layer.panels = _uniform(DENSE_PANELS)
        return True
    split = [p for p in layer.panels if p.error > tol * (p.b - p.a) and (p.b - p.a) / SPLIT >= MIN_WIDTH * (1 - 1e-9)]
    if not split:
        return False
    kept = [p for p in layer.panels if not any(p is s for s in split)]
    parts = [_Panel(p.a + (p.b - p.a) * k / SPLIT, p.a + (p.b - p.a) * (k + 1) / SPLIT)
             for p in split for k in range(SPLIT)]
    layer.panels = sorted(kept + parts, key=lambda p: p.a)
    return True
