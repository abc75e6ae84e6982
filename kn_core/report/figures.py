"""Paper-ready figures of an attribution run, drawn with matplotlib (no Qt): per-layer attribution, the layer x
neuron map and the refined neurons across prompts. The app's figure export (kn_gui/panels/figures.py) and the
project report (`kn report`, the app's report export) draw through `render_figure`; the report takes each
figure's data from a stored run (`run_figure_data`), the app from what its panel shows.

A figure with nothing to plot is refused with NothingToPlot (a one-line message saying what to do), never drawn
empty.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..neurons import neuron_name

FIGURES = {"layers": "Attribution per layer", "heatmap": "Layer \u00d7 neuron map",
           "prompts": "Refined neurons across prompts"}
FORMATS = ("png", "svg", "pdf")
DEFAULT_DPI = 300
DEFAULT_SIZE_IN = (7.0, 3.5)  # a two-column-wide paper figure
PROMPT_LINES = 10
FIGURE_RUNS = 12  # runs a report draws (3 figures each, ~60 KB as PNG): 1000 facts stay a page, not 180 MB


class NothingToPlot(ValueError):
    """The figure would be empty; the message says what to do first."""


def strongest(values: np.ndarray, axis: int = -1) -> np.ndarray:
    """Index of the value of largest magnitude; NaN (a score not stored) only where nothing else is."""
    return np.nan_to_num(np.abs(values), nan=-1.0).argmax(axis=axis)


def pooled_columns(scores: np.ndarray, factor: int) -> np.ndarray:
    """Columns grouped by `factor`, each group shown by its value of largest magnitude (sign kept)."""
    if factor <= 1:
        return scores
    layers, neurons = scores.shape
    padded = np.pad(scores, ((0, 0), (0, (-neurons) % factor)), constant_values=np.nan)
    blocks = padded.reshape(layers, -1, factor)
    strongest_index = strongest(blocks, axis=2)
    return np.take_along_axis(blocks, strongest_index[..., None], axis=2)[..., 0]


def colour_bound(scores: np.ndarray, t: float) -> float:
    """Where the map's colours saturate: the strongest ~0.1% of |score| (never below t x max), so single neurons
    stay visible; NaN (a score not stored) is ignored."""
    magnitude = np.abs(scores[np.isfinite(scores)])
    top = float(magnitude.max()) if magnitude.size else 1.0
    return max(float(np.percentile(magnitude, 99.9)) if magnitude.size else 1.0, t * top, 1e-12)


def per_layer(scores: np.ndarray, agg: str = "sum") -> np.ndarray:
    """Each layer's sum (or max) of the scores shown; NaN (not stored) left out."""
    if agg == "sum":
        return np.nansum(scores, 1)
    return np.nanmax(np.where(np.isnan(scores), -np.inf, scores), 1)


def refined_per_layer(refined, layers: int) -> np.ndarray:
    counts = np.zeros(layers, dtype=int)
    for layer, _ in refined:
        counts[layer] += 1
    return counts


def prompt_lines(score_list, neurons) -> dict[str, list[float]]:
    """Each neuron's score in each prompt over that prompt's largest score (0 where that is not positive)."""
    lines = {}
    for layer, neuron in list(neurons)[:PROMPT_LINES]:
        ys = []
        for scores in score_list:
            top = float(np.nanmax(scores))
            ys.append(float(scores[layer, neuron]) / top if top > 0 else 0.0)
        lines[neuron_name(layer, neuron)] = ys
    return lines


def run_figure_data(title: str, score_list, refined, t: float, p: float, flags=None) -> tuple[dict, dict]:
    """The report's figures of one run (mean over its finished prompts, layers summed, its refined neurons
    marked): ({figure: data}, {figure: why it is not drawn})."""
    datas, refused = {}, {}
    if not score_list:
        return {}, {which: "the run has no finished prompt" for which in FIGURES}
    scores = np.mean(np.stack(score_list), axis=0)
    if not np.isfinite(scores).any():
        return {}, {which: "the run's scores hold no finite value" for which in FIGURES}
    base = {"title": title, "t": t, "p": p}
    datas["layers"] = {**base, "which": "layers", "per_layer": per_layer(scores), "agg": "sum",
                       "refined_per_layer": refined_per_layer(refined, scores.shape[0])}
    datas["heatmap"] = {**base, "which": "heatmap", "scores": scores, "bound": colour_bound(scores, t),
                        "refined": list(refined), "selected": [],
                        "massive": sorted(flags.massive) if flags else [],
                        "unspecific": sorted(flags.unspecific) if flags else []}
    if refined:
        datas["prompts"] = {**base, "which": "prompts", "lines": prompt_lines(score_list, refined)}
    else:
        refused["prompts"] = "no refined neurons to follow across prompts at this t and p"
    return datas, refused


def render_figure(data: dict, path: str | Path, size_in=DEFAULT_SIZE_IN, dpi: int = DEFAULT_DPI) -> Path:
    """Writes the figure to `path`; the format follows the suffix (.png, .svg, .pdf)."""
    import matplotlib
    from matplotlib.figure import Figure

    path = Path(path)
    fmt = path.suffix.lower().lstrip(".")
    if fmt not in FORMATS:
        raise ValueError(f"the file name must end in .png, .svg or .pdf, not {path.name!r}")
    width, height = size_in
    if not (1 <= width <= 40 and 1 <= height <= 40) or not (50 <= dpi <= 1200):
        raise ValueError(f"size {width} x {height} in at {dpi} dpi is out of range: use 1-40 in and 50-1200 dpi")
    # text stays text (editable, searchable): SVG <text>, TrueType (Type 42) fonts in PDF, as journals ask
    with matplotlib.rc_context({"svg.fonttype": "none", "pdf.fonttype": 42}):
        figure = Figure(figsize=(width, height), dpi=dpi, layout="constrained")
        figure.suptitle(data["title"], fontsize=9)
        {"layers": _draw_layers, "heatmap": _draw_heatmap, "prompts": _draw_prompts}[data["which"]](figure, data)
        figure.savefig(path, format=fmt, dpi=dpi)
    return path


def _draw_layers(figure, data):
    left, right = figure.subplots(1, 2)
    x = np.arange(len(data["per_layer"]))
    left.bar(x, data["per_layer"], color="#5dade2", edgecolor="#2e86c1",
             label=f"{data['agg']} of attribution scores")
    left.set_xlabel("layer")
    left.set_ylabel(f"{data['agg']} of scores")
    left.legend(fontsize=7, loc="best")
    right.bar(x, data["refined_per_layer"], color="#e74c3c", edgecolor="#922b21",
              label=f"refined neurons (t = {data['t']:.2f}, p = {data['p']:.2f})")
    right.set_xlabel("layer")
    right.set_ylabel("neurons")
    right.yaxis.get_major_locator().set_params(integer=True)
    right.legend(fontsize=7, loc="best")


def _draw_heatmap(figure, data):
    axes = figure.subplots()
    scores, bound = data["scores"], data["bound"]
    layers, neurons = scores.shape
    width_px = figure.get_figwidth() * figure.dpi * 0.8
    factor = max(1, int(np.ceil(neurons / width_px)))
    shown = pooled_columns(scores, factor)
    image = axes.imshow(shown, aspect="auto", origin="lower", cmap="RdBu_r", vmin=-bound, vmax=bound,
                        interpolation="nearest", extent=(0, shown.shape[1] * factor, 0, layers))
    colorbar = figure.colorbar(image, ax=axes, pad=0.01)
    colorbar.set_label(f"attribution score (clipped at \u00b1{bound:.2g})", fontsize=8)
    marks = [("refined", data["refined"], dict(marker="o", facecolors="none", edgecolors="#c0392b", s=40)),
             ("selected", data["selected"], dict(marker="s", facecolors="none", edgecolors="#7d6608", s=50)),
             ("flagged massive", data["massive"], dict(marker="*", color="#6c3483", s=50)),
             ("flagged unspecific", data["unspecific"], dict(marker="D", facecolors="none", edgecolors="#6c3483",
                                                             s=30))]
    for label, neurons_, style in marks:
        if neurons_:
            axes.scatter([n + 0.5 for _, n in neurons_], [l + 0.5 for l, _ in neurons_], label=label, **style)
    if any(m[1] for m in marks):  # below the map, never over a marked neuron
        axes.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=4, frameon=False)
    axes.set_xlim(0, neurons)
    axes.set_ylim(0, layers)
    axes.set_xlabel("neuron" + (f" (one column = the strongest of {factor})" if factor > 1 else ""))
    axes.set_ylabel("layer")


def _draw_prompts(figure, data):
    axes = figure.subplots()
    for name, ys in data["lines"].items():
        axes.plot(np.arange(1, len(ys) + 1), ys, marker="o", label=name)
    axes.axhline(data["t"], color="#7f8c8d", linestyle="--", label=f"t = {data['t']:.2f}")
    n = len(next(iter(data["lines"].values())))
    axes.set_xticks(np.arange(1, n + 1))
    axes.set_xlabel("prompt")
    axes.set_ylabel("score / the prompt's max score")
    axes.legend(fontsize=7, ncol=2)
