"""The "Causal trace" view beside the attribution map (kn_core.tracing, Meng et al. 2022): a tokens x layers heat
map of P(answer) with one state restored after the subject was corrupted, per kind (residual stream, MLP output,
attention output), its colour bar, and the subject's tokens marked. Widgets only: the Trace button asks for a
trace (`trace_requested`) and the trace controller runs it as a worker job, then calls `show_result`. "Saved"
lists the traces of the project (`saved_traces`, set by the controller: run here, or stored by `kn trace
--project`) and shows the one picked.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import QComboBox, QDoubleSpinBox, QFileDialog, QLabel, QSpinBox, QWidget

from kn_core.tracing import COLOURS, KIND_NAMES, KINDS

from .common import button, default_folder, hbox, hint, vbox
from .neuron_map import CellAxis

KIND_LABELS = {"residual": "Residual stream", "mlp": "MLP output", "attn": "Attention output"}
SUBJECT = "#c0392b"


class TokenAxis(CellAxis):
    """Token rows: cell i is token i, labelled with its text (subject tokens starred)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.labels: list[str] = []

    def tickSpacing(self, minVal, maxVal, size):
        return [(1.0, 0.0)]

    def tickStrings(self, values, scale, spacing):
        return [self.labels[int(v)] if 0 <= int(v) < len(self.labels) else "" for v in values]


class TracePanel(QWidget):
    trace_requested = Signal(dict)  # TraceParams fields

    def __init__(self, parent=None):
        super().__init__(parent)
        self.result = None
        self.saved_traces = lambda: []  # the project's traces ({"name", "report", "params"}), set by the controller
        self.saved = QComboBox()
        self.saved.setToolTip("Causal traces of this project (run here, or by kn trace --project): pick one to see it")
        self.saved.setMinimumContentsLength(24)
        self.saved.setSizeAdjustPolicy(QComboBox.AdjustToMinimumContentsLengthWithIcon)  # long names never widen it
        self.saved.activated.connect(self._open_saved)
        self.kind = QComboBox()
        for kind in KINDS:
            self.kind.addItem(KIND_LABELS[kind], kind)
        self.kind.setCurrentIndex(KINDS.index("mlp"))
        self.kind.currentIndexChanged.connect(lambda _: self.redraw())
        self.samples = _spin(QSpinBox(), 1, 100, 10, "Noise samples averaged per cell (ROME: 10)")
        self.noise = _spin(QDoubleSpinBox(), 0.1, 20.0, 3.0,
                           "Noise standard deviation, as a multiple of the subject embeddings' (ROME: 3)")
        self.window = _spin(QSpinBox(), 1, 64, 1, "MLP/attention layers restored around each layer (ROME: 10)")
        self.seed = _spin(QSpinBox(), 0, 2**31 - 1, 0, "Seed of the noise")
        self.trace_button = button("Trace", self._request, "Corrupt the subject of the fact's first prompt and "
                                   "restore each state in turn (all three kinds; about a minute on the default model)",
                                   name="trace_button")
        self.export_button = button("Export figure\u2026", self.export_dialog, "The heat maps as PNG, SVG or PDF")
        self.export_button.setEnabled(False)
        self.summary = hint("Pick a fact and press Trace: causal tracing (Meng et al. 2022) corrupts the subject's "
                            "embeddings and restores one hidden state at a time.")
        self.summary.setWordWrap(True)
        self.map = pg.GraphicsLayoutWidget()
        self.token_axis = TokenAxis("left")
        self.plot = self.map.addPlot(axisItems={"left": self.token_axis, "bottom": CellAxis("bottom")})
        self.plot.setLabel("bottom", "layer")
        self.plot.invertY(True)  # the prompt reads top to bottom
        self.plot.setMouseEnabled(x=False, y=False)
        self.image = pg.ImageItem(axisOrder="row-major")
        self.plot.addItem(self.image)
        self.subject_marks = pg.ScatterPlotItem(symbol="t2", size=9, brush=pg.mkBrush(SUBJECT), pen=None)
        self.plot.addItem(self.subject_marks)
        self.colorbar = pg.ColorBarItem(values=(0, 1), colorMap=pg.colormap.get("viridis"), interactive=False,
                                        width=14)
        self.colorbar.setImageItem(self.image, insert_in=self.plot)
        self.colorbar.axis.enableAutoSIPrefix(False)  # probabilities read as they are, never "x0.001"
        controls = hbox(QLabel("State"), self.kind, QLabel("samples"), self.samples, QLabel("noise \u00d7"),
                        self.noise, QLabel("window"), self.window, QLabel("seed"), self.seed, self.trace_button,
                        self.export_button, None)
        # the saved traces on a row of their own: beside the controls they made the panel wider than a 1600 px
        # screen leaves the map (the window then grew past the screen)
        saved = hbox(QLabel("Saved"), self.saved, None)
        self.setLayout(vbox(controls, saved, self.summary, self.map, margins=(2, 2, 2, 2), spacing=4))

    def showEvent(self, event):  # a project opened since the tab was last shown brings its own traces
        self.list_saved()
        super().showEvent(event)

    def list_saved(self) -> None:
        traces = self.saved_traces()
        self.saved.clear()
        self.saved.addItem(f"{len(traces)} saved" if traces else "none saved", None)
        for k, trace in enumerate(traces):
            self.saved.addItem(f"{k + 1}. {trace.get('name') or 'trace'}", k)
        self.saved.setEnabled(bool(traces))

    def _open_saved(self, index: int) -> None:
        from kn_core.tracing import TraceResult

        k = self.saved.itemData(index)
        if k is None:
            return
        try:
            result = TraceResult.from_dict(self.saved_traces()[k]["report"])
        except (KeyError, TypeError, ValueError) as exc:  # a row written by another version: said, not a crash
            self.summary.setText(f"This saved trace cannot be read: {type(exc).__name__}: {exc}")
            return
        self.show_result(result)

    def params(self) -> dict:
        return {"samples": self.samples.value(), "noise": float(self.noise.value()), "seed": self.seed.value(),
                "window": self.window.value()}

    def _request(self):
        self.trace_requested.emit(self.params())

    def set_running(self, busy: bool, has_model: bool):
        self.trace_button.setEnabled(has_model and not busy)

    def show_result(self, result) -> None:
        self.result = result
        self.export_button.setEnabled(result is not None)
        self.redraw()

    def redraw(self):
        result, kind = self.result, self.kind.currentData()
        if result is None or kind not in result.restored:
            self.image.clear()
            self.subject_marks.clear()
            return
        grid = result.restored[kind]
        start, end = result.subject_span
        self.token_axis.labels = [repr(t)[1:-1] + ("*" if start <= i < end else "")
                                  for i, t in enumerate(result.tokens)]
        self.image.setImage(grid.astype(np.float32), autoLevels=False)
        self.image.setRect(0, 0, grid.shape[1], grid.shape[0])
        low, high = min(result.p_corrupted, float(grid.min())), max(float(grid.max()), result.p_corrupted + 1e-6)
        self.colorbar.setColorMap(pg.colormap.getFromMatplotlib(COLOURS[kind]))  # ROME's colours
        self.colorbar.setLevels((low, high))
        self.colorbar.axis.setLabel(f"p({result.answer.strip()})")
        self.subject_marks.setData([-0.35] * (end - start), [i + 0.5 for i in range(start, end)])
        self.plot.setXRange(-0.6, grid.shape[1], padding=0)
        self.plot.setYRange(0, grid.shape[0], padding=0)
        peak = result.peak_layer(kind)
        self.summary.setText(
            f"{result.prompt!r} \u2192 {result.answer!r}: P(clean) {result.p_clean:.3f}, subject corrupted "
            f"{result.p_corrupted:.3f} ({result.params.samples} samples, noise {result.params.noise:g}\u00d7 std). "
            f"Colour: P(answer) with the {KIND_NAMES[kind]} at (token, layer) restored; \u25b8 and * mark the "
            f"subject. At the last subject token restoring the {KIND_NAMES[kind]} helps most at layer {peak} "
            f"({result.effect(kind)[end - 1, peak]:+.3f}).")

    def export_dialog(self):
        if self.result is None:
            return
        path, _ = QFileDialog.getSaveFileName(self, "Export causal trace", str(default_folder() / "trace.png"),
                                              "PNG (*.png);;SVG (*.svg);;PDF (*.pdf)")
        if path:
            self.export(path)

    def export(self, path) -> Path:
        """ROME's heat maps of every traced kind (kn_core.tracing.plot_trace) at 300 dpi."""
        from kn_core.tracing import plot_trace

        plot_trace(self.result, path, dpi=300)
        return Path(path)


def _spin(spin, low, high, value, tooltip):
    spin.setRange(low, high)
    spin.setValue(value)
    spin.setToolTip(tooltip)
    spin.setAlignment(Qt.AlignRight)
    return spin

