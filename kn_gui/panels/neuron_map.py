"""The layer x neuron map: a score image with exact cell hit-testing, zoom and pan along the neurons, go-to,
and markers for refined, selected and flagged (massive / unspecific) neurons.

Cell (layer l, neuron n) covers view x in [n, n + 1) and y in [l, l + 1); layer 0 is at the bottom. With 1536
neurons in a few hundred pixels one pixel covers several neurons, so the image is drawn with max-|score|
pooling over the columns a pixel covers (a single strong neuron stays visible at any zoom), and a click selects
the neuron its pixel shows: the strongest of that group, never one from a neighbouring pixel or layer (the hover
line names it). Zoomed in to a pixel or more per neuron, a click selects exactly the cell under the pointer; the
wheel zooms the neuron axis, dragging pans it (layers always fill the height) and "go to" centres a neuron.

Mixture-of-experts models (`set_experts`): a layer's neurons are its experts' side by side (kn_core/moe.py);
dashed lines mark the expert boundaries, the axis names the experts, and the padding of a narrower (dense) layer
is greyed out.
"""

from __future__ import annotations

import math

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import QPointF, QTimer, Signal

from kn_core.report.figures import pooled_columns, strongest  # noqa: F401 - the map pools as the figures do

REFINED = "#e74c3c"
FLAG = "#6c3483"
MIN_LAYER_PX = 6  # each layer gets at least this many pixels of height (30 layers: 180 px)
GO_TO_SPAN = 64  # neurons shown around a go-to target (about 10 px per neuron in a 640 px wide map)


# the title doubles as the markers' legend (a legend inside the plot would cover neurons)
LEGEND = (f'Scores: layer \u00d7 neuron &nbsp;&nbsp; <span style="color:{REFINED}">\u25cb refined</span> &nbsp; '
          '<span style="color:#7d6608">\u25a0 selected</span> &nbsp; '
          f'<span style="color:{FLAG}">\u2605 massive &nbsp; \u25c7 unspecific &nbsp; \u25b3 template</span>')


class CellAxis(pg.AxisItem):
    """Integer ticks at cell centres (cell i spans [i, i + 1)), labelled with the index i."""

    def tickSpacing(self, minVal, maxVal, size):
        spacings = [(s, o) for s, o in super().tickSpacing(minVal, maxVal, size) if s >= 1]
        return spacings or [(1.0, 0.0)]

    def tickValues(self, minVal, maxVal, size):
        levels = super().tickValues(minVal - 0.5, maxVal - 0.5, size)
        return [(spacing, [v + 0.5 for v in values if float(v).is_integer()]) for spacing, values in levels]

    def tickStrings(self, values, scale, spacing):
        return [str(int(math.floor(v))) for v in values]


def expert_at(experts, layer: int, neuron: int):
    """The expert span (kn_core.moe.Expert) holding a neuron of an MoE model's layer; None for dense models or
    the padding of a narrower layer."""
    if experts is None or not 0 <= layer < len(experts):
        return None
    return next((e for e in experts[layer] if e.offset <= neuron < e.offset + e.size), None)


def expert_text(experts, layer: int, neuron: int, activations=()) -> str:
    """"expert e (shared), neuron i (index n)" and, given the prompts' answer-position activations ([layers,
    neurons] each), how many of them route to the expert (a routed prompt gives the expert's neurons a nonzero
    activation)."""
    span = expert_at(experts, layer, neuron)
    if span is None:
        return ""
    kind = " (shared)" if span.shared else (" (dense layer)" if len(experts[layer]) == 1 else "")
    text = f"expert {span.expert}{kind}, neuron {neuron - span.offset} (index {neuron})"
    if activations and len(experts[layer]) > 1 and not span.shared:
        routed = sum(bool(np.any(a[layer, span.offset:span.offset + span.size])) for a in activations)
        text += f"; {routed}/{len(activations)} of the fact's prompts route their answer to it"
    return text


class NeuronMap(pg.GraphicsLayoutWidget):
    hovered = Signal(object)  # (layer, neuron) | None
    clicked = Signal(int, int, bool)  # layer, neuron, add to the selection

    def __init__(self, colormap, parent=None):
        super().__init__(parent)
        self.plot = self.addPlot(title=LEGEND,
                                 axisItems={"left": CellAxis("left"), "bottom": CellAxis("bottom")})
        self.plot.setTitle(LEGEND, size="9pt")
        self.plot.setLabel("bottom", "neuron")
        self.plot.setLabel("left", "layer")
        for axis in ("left", "bottom"):
            self.plot.getAxis(axis).enableAutoSIPrefix(False)
        self.plot.getAxis("left").setWidth(40)
        self.vb = self.plot.vb
        self.vb.setMouseEnabled(x=True, y=False)
        self.image = pg.ImageItem(autoDownsample=False)
        self.plot.addItem(self.image)
        self.image.setColorMap(colormap)
        self.colorbar = pg.ColorBarItem(values=(-1, 1), colorMap=colormap, label="score (clipped)",
                                        interactive=False, width=14)
        self.colorbar.setImageItem(self.image, insert_in=self.plot)
        self.colorbar.axis.setWidth(62)
        self.refined_marks = pg.ScatterPlotItem(size=13, pen=pg.mkPen(REFINED, width=2), brush=None, symbol="o")
        self.selected_marks = pg.ScatterPlotItem(size=15, pen=pg.mkPen("#7d6608", width=2),
                                                 brush=pg.mkBrush(241, 196, 15, 120), symbol="s")
        self.massive_marks = pg.ScatterPlotItem(size=14, pen=pg.mkPen("w", width=1), brush=pg.mkBrush(FLAG),
                                                symbol="star")
        self.unspecific_marks = pg.ScatterPlotItem(size=11, pen=pg.mkPen(FLAG, width=2), brush=None, symbol="d")
        self.template_marks = pg.ScatterPlotItem(size=12, pen=pg.mkPen(FLAG, width=2), brush=None, symbol="t1")
        for marks in (self.massive_marks, self.unspecific_marks, self.template_marks, self.refined_marks,
                      self.selected_marks):
            self.plot.addItem(marks)
        self.scores: np.ndarray | None = None
        self.experts = None  # kn_core FFNLayout.experts of an MoE model
        self._expert_items: list = []
        self._bound = 1.0
        self._pool = 0
        self._pool_timer = QTimer(self)
        self._pool_timer.setSingleShot(True)
        self._pool_timer.setInterval(60)
        self._pool_timer.timeout.connect(self._draw_image)
        self.vb.sigXRangeChanged.connect(lambda *_: self._pool_timer.start())
        self.scene().sigMouseMoved.connect(lambda pos: self.hovered.emit(self.neuron_at(pos)))
        self.scene().sigMouseClicked.connect(self._clicked)
        self.plot.setRange(xRange=(0, 100), yRange=(0, 10), padding=0)

    # ----------------------------------------------------------------- data
    def set_scores(self, scores: np.ndarray | None, bound: float = 1.0, fit: bool = False):
        """Shows `scores` (layers x neurons); colours saturate at +-bound."""
        reshaped = self.scores is None or scores is None or self.scores.shape != scores.shape
        self.scores = None if scores is None else np.asarray(scores, dtype=np.float32)
        self._bound = bound
        if self.scores is None:
            self.image.clear()
            return
        layers, neurons = self.scores.shape
        self.setMinimumHeight(min(MIN_LAYER_PX * layers, 300) + 80)
        self.vb.setLimits(xMin=0, xMax=neurons, yMin=0, yMax=layers, minXRange=min(8, neurons))
        self.plot.getAxis("left").setTicks(None if layers <= 12 else [
            [(l + 0.5, str(l)) for l in range(0, layers, 5)],
            [(l + 0.5, str(l)) for l in range(layers) if l % 5]])
        self.colorbar.setLevels((-bound, bound))
        self.colorbar.axis.setTicks([[(-bound, f"{-bound:.2g}"), (0.0, "0"), (bound, f"{bound:.2g}")]])
        if fit or reshaped:
            self.fit()
        self._pool = 0
        self._draw_image()

    def _draw_image(self):
        if self.scores is None:
            return
        layers, neurons = self.scores.shape
        (x0, x1), _ = self.vb.viewRange()
        width_px = max(1.0, self.vb.sceneBoundingRect().width())
        # a group never spans less than a pixel, so every drawn column is one the pointer can land on
        factor = max(1, math.ceil((x1 - x0) / width_px - 1e-9))
        if factor == self._pool and self.image.image is not None:
            return
        self._pool = factor
        shown = pooled_columns(self.scores, factor)
        self.image.setImage(shown, levels=(-self._bound, self._bound), autoLevels=False)
        self.image.setRect(0, 0, shown.shape[1] * factor, layers)

    def set_experts(self, experts) -> None:
        """Expert boundaries of an MoE model (per layer a list of spans with offset, size, expert), or None."""
        if experts == self.experts:
            return
        for item in self._expert_items:
            self.plot.removeItem(item)
        self._expert_items = []
        self.experts = experts
        self.plot.setLabel("bottom", "neuron" if experts is None else
                           "neuron (experts side by side: dashed lines; shared experts last)")
        if experts is None:
            return
        widest = max(experts, key=lambda spans: sum(e.size for e in spans))
        # each layer's own boundaries (a dense layer of an MoE model has none)
        cuts = [(span.offset, layer) for layer, spans in enumerate(experts) for span in spans[1:]]
        xs = np.repeat([x for x, _ in cuts], 2).astype(float)
        ys = np.array([y + d for _, y in cuts for d in (0, 1)], dtype=float)
        self._expert_items.append(pg.PlotCurveItem(xs, ys, connect="pairs", pen=pg.mkPen(
            "#566573", width=1, style=pg.QtCore.Qt.DashLine)))
        for span in widest:  # the expert's id over its first column, so the boundaries read without hovering
            label = pg.TextItem(f"E{span.expert}{'s' if span.shared else ''}", color="#566573", anchor=(0, 0))
            label.setPos(span.offset, len(experts))
            self._expert_items.append(label)
        total = sum(e.size for e in widest)
        for layer, spans in enumerate(experts):
            width = sum(e.size for e in spans)
            if width < total:  # a narrower layer's padding holds no neurons
                rect = pg.QtWidgets.QGraphicsRectItem(width, layer, total - width, 1)
                rect.setBrush(pg.mkBrush(200, 200, 200, 220))
                rect.setPen(pg.mkPen(None))
                self._expert_items.append(rect)
        for item in self._expert_items:
            self.plot.addItem(item)

    def set_marks(self, refined=(), selected=(), massive=(), unspecific=(), template=()):
        for marks, neurons in ((self.refined_marks, refined), (self.selected_marks, selected),
                               (self.massive_marks, massive), (self.unspecific_marks, unspecific),
                               (self.template_marks, template)):
            neurons = list(neurons)
            marks.setData([n + 0.5 for _, n in neurons], [l + 0.5 for l, _ in neurons])

    # ----------------------------------------------------------------- view
    def fit(self):
        if self.scores is not None:
            layers, neurons = self.scores.shape
            self.plot.setRange(xRange=(0, neurons), yRange=(0, layers), padding=0)
            self._draw_image()

    def zoom(self, factor: float):
        """Zooms the neuron axis about the view's centre (factor < 1 zooms in)."""
        (x0, x1), _ = self.vb.viewRange()
        centre, half = (x0 + x1) / 2, (x1 - x0) * factor / 2
        self.vb.setXRange(centre - half, centre + half, padding=0)
        self._draw_image()

    def centre_on(self, layer: int, neuron: int, span: int = GO_TO_SPAN):
        if self.scores is None:
            return
        layers, neurons = self.scores.shape
        half = min(span, neurons) / 2
        left = min(max(0.0, neuron + 0.5 - half), neurons - 2 * half)
        self.plot.setRange(xRange=(left, left + 2 * half), yRange=(0, layers), padding=0)
        self._draw_image()

    def cell_scene_pos(self, layer: int, neuron: int) -> QPointF:
        """The scene position of a cell's centre (what a click there selects)."""
        return self.vb.mapViewToScene(QPointF(neuron + 0.5, layer + 0.5))

    # ----------------------------------------------------------------- hit-testing
    def neuron_at(self, scene_pos) -> tuple[int, int] | None:
        if self.scores is None or not self.vb.sceneBoundingRect().contains(scene_pos):
            return None
        point = self.vb.mapSceneToView(scene_pos)
        layer, neuron = math.floor(point.y()), math.floor(point.x())
        layers, neurons = self.scores.shape
        if not (0 <= layer < layers and 0 <= neuron < neurons):
            return None
        if self._pool > 1:  # the pixel shows the strongest neuron of its column group: that is the one under it
            start = neuron - neuron % self._pool
            group = self.scores[layer, start:start + self._pool]
            neuron = start + int(strongest(group))
        return layer, neuron

    def _clicked(self, event):
        from PySide6.QtCore import Qt

        if event.button() != Qt.LeftButton or event.double():
            return
        hit = self.neuron_at(event.scenePos())
        if hit is not None:
            self.clicked.emit(*hit, bool(event.modifiers() & (Qt.ControlModifier | Qt.ShiftModifier)))
