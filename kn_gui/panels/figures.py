"""Paper-ready figures of the attribution panel: PNG, SVG or PDF at a chosen size and dpi.

The figures are drawn again with matplotlib from the panel's data (not a screenshot of the widgets), so the
size, the dpi (written into the PNG), fonts and vector output are those of a paper figure; each carries the
fact and the model in its title, axis labels and a legend. A figure with nothing to plot is refused with
NothingToPlot (a one-line message saying what to do), never written empty.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PySide6.QtWidgets import (QComboBox, QDialog, QDialogButtonBox, QDoubleSpinBox, QFileDialog, QFormLayout,
                               QLineEdit, QSpinBox)

from ..session import neuron_name
from .common import button, default_folder, hbox, hint, problem_label
from .neuron_map import pooled_columns

FIGURES = {"layers": "Attribution per layer", "heatmap": "Layer \u00d7 neuron map",
           "prompts": "Refined neurons across prompts"}
FORMATS = ("png", "svg", "pdf")
DEFAULT_DPI = 300
DEFAULT_SIZE_IN = (7.0, 3.5)  # a two-column-wide paper figure
PROMPT_LINES = 10


class NothingToPlot(ValueError):
    """The figure would be empty; the message says what to do first."""


def _model_name(panel) -> str:
    run = panel.run
    name = (run.model or {}).get("name") if run is not None else None
    lm = panel.session.lm
    if not name and lm is not None:
        name = lm.describe().get("name") or getattr(lm, "source", None)
    return str(name) if name else "unknown model"


def _fact_title(panel) -> str:
    run = panel.run
    fact = run.fact
    shown = panel.view_of.currentText() if panel.view_of.currentIndex() > 0 else \
        f"mean over {len(run.scores)} prompts"
    return f"{fact.subject} \u2192 {fact.object} ({fact.relation}) \u2014 {_model_name(panel)}, {shown}"


def figure_data(panel, which: str) -> dict:
    """What the figure `which` shows, as plain arrays; NothingToPlot when there is nothing."""
    if which not in FIGURES:
        raise ValueError(f"figure must be one of {', '.join(FIGURES)}, not {which!r}")
    run = panel.run
    if run is None or not run.scores:
        raise NothingToPlot("there is no attribution to plot yet: pick a fact and run attribution (F5) first")
    scores, _ = panel._arrays()
    if scores is None or not np.isfinite(scores).any():
        raise NothingToPlot("the shown attribution has no finished prompt yet: wait for one, or pick another")
    session = panel.session
    data = {"which": which, "title": _fact_title(panel), "t": session.t, "p": session.p}
    if which == "layers":
        agg = panel.agg.currentText()
        data["per_layer"] = scores.sum(1) if agg == "sum" else scores.max(1)
        data["agg"] = agg
        counts = np.zeros(scores.shape[0], dtype=int)
        for layer, _ in panel.refined:
            counts[layer] += 1
        data["refined_per_layer"] = counts
    elif which == "heatmap":
        flags = panel.flags
        data.update(scores=scores, bound=panel.heat_widget._bound, refined=list(panel.refined),
                    selected=list(panel.selected), massive=sorted(flags.massive) if flags else [],
                    unspecific=sorted(flags.unspecific) if flags else [])
    else:
        shown = (panel.selected + [r for r in panel.refined if r not in panel.selected])[:PROMPT_LINES]
        if not shown:
            raise NothingToPlot("no refined or selected neurons to follow across prompts: select neurons in the "
                                "map (Ctrl-click adds) or lower t or p")
        lines = {}
        for layer, neuron in shown:
            ys = []
            for ps in run.scores:
                top = float(np.max(ps.scores))
                ys.append(float(ps.scores[layer, neuron]) / top if top > 0 else 0.0)
            lines[neuron_name(layer, neuron)] = ys
        data["lines"] = lines
    return data


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


def export_figure(panel, which: str, path: str | Path, size_in=DEFAULT_SIZE_IN, dpi: int = DEFAULT_DPI) -> Path:
    """The panel's figure `which` to `path` (NothingToPlot when it would be empty)."""
    if which == "prompts":
        panel._draw_prompts(force=True)
    return render_figure(figure_data(panel, which), path, size_in, dpi)


def export_figures(panel, folder: str | Path, fmt: str = "png", size_in=DEFAULT_SIZE_IN,
                   dpi: int = DEFAULT_DPI) -> tuple[list[Path], list[str]]:
    """Every figure that has something to show, as `folder/<name>.<fmt>`: (written, [why others were not])."""
    written, refused = [], []
    for which in FIGURES:
        try:
            written.append(export_figure(panel, which, Path(folder) / f"{which}.{fmt}", size_in, dpi))
        except NothingToPlot as exc:
            refused.append(f"{FIGURES[which]}: {exc}")
    if not written:
        raise NothingToPlot(refused[0].split(": ", 1)[1])
    return written, refused


class FigureExportDialog(QDialog):
    """One dialog: which figure, format, size, dpi and file. Refusals keep the dialog open with a message."""

    def __init__(self, panel, parent=None, folder: str | Path | None = None):
        super().__init__(parent)
        self.panel = panel
        self.setWindowTitle("Export figure")
        self.which = QComboBox()
        for key, label in FIGURES.items():
            self.which.addItem(label, key)
        self.which.setCurrentIndex(1 if panel.tabs.currentIndex() == 0 else 2)
        self.format = QComboBox()
        for fmt in FORMATS:
            self.format.addItem(fmt.upper(), fmt)
        self.width = QDoubleSpinBox()
        self.height = QDoubleSpinBox()
        for spin, value in ((self.width, DEFAULT_SIZE_IN[0]), (self.height, DEFAULT_SIZE_IN[1])):
            spin.setRange(1, 40)
            spin.setDecimals(1)
            spin.setSingleStep(0.5)
            spin.setSuffix(" in")
            spin.setValue(value)
        self.dpi = QSpinBox()
        self.dpi.setRange(50, 1200)
        self.dpi.setValue(DEFAULT_DPI)
        self.dpi.setSuffix(" dpi")
        self.dpi.setToolTip("Resolution of PNG files and of the image inside SVG/PDF (300 dpi: print quality)")
        self.path = QLineEdit(str(Path(folder or default_folder()) / "heatmap.png"))
        browse = button("Browse\u2026", self._browse)
        self.which.currentIndexChanged.connect(lambda _: self._sync_name())
        self.format.currentIndexChanged.connect(lambda _: self._sync_name())
        self.pixels = hint("")
        for spin in (self.width, self.height, self.dpi):
            spin.valueChanged.connect(lambda _: self._show_pixels())
        form = QFormLayout(self)
        form.addRow("Figure", self.which)
        form.addRow("Format", self.format)
        form.addRow("Size", hbox(self.width, hint("\u00d7"), self.height, None))
        form.addRow("Resolution", self.dpi)
        form.addRow("", self.pixels)
        form.addRow("File", hbox(self.path, browse))
        buttons = QDialogButtonBox(QDialogButtonBox.Save | QDialogButtonBox.Cancel)
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        self.problem = problem_label()
        form.addRow(self.problem)
        form.addRow(buttons)
        self.written: Path | None = None
        self._sync_name()
        self._show_pixels()

    def _sync_name(self):
        current = Path(self.path.text() or default_folder() / "figure.png")
        self.path.setText(str(current.with_name(f"{self.which.currentData()}.{self.format.currentData()}")))

    def _show_pixels(self):
        self.pixels.setText(f"{round(self.width.value() * self.dpi.value())} \u00d7 "
                            f"{round(self.height.value() * self.dpi.value())} pixels")

    def _browse(self):
        fmt = self.format.currentData()
        path, _ = QFileDialog.getSaveFileName(self, "Export figure", self.path.text(), f"{fmt.upper()} (*.{fmt})")
        if path:
            if not path.lower().endswith(f".{fmt}"):
                path += f".{fmt}"
            self.path.setText(path)

    def accept(self):
        """Writes the figure; on a refusal or an error says why and stays open."""
        try:
            self.written = export_figure(self.panel, self.which.currentData(), self.path.text().strip(),
                                         (self.width.value(), self.height.value()), self.dpi.value())
        except (NothingToPlot, ValueError, OSError) as exc:
            self.problem.setText(f"Nothing exported: {exc}.")
            self.problem.show()
            return
        super().accept()
