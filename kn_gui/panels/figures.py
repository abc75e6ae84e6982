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

from kn_core.report.figures import (DEFAULT_DPI, DEFAULT_SIZE_IN, FIGURES, FORMATS, PROMPT_LINES,  # noqa: F401
                                   NothingToPlot, per_layer, prompt_lines, refined_per_layer, render_figure)

from .common import button, default_folder, hbox, hint, problem_label


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
        data["per_layer"] = per_layer(scores, agg)
        data["agg"] = agg
        data["refined_per_layer"] = refined_per_layer(panel.refined, scores.shape[0])
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
        data["lines"] = prompt_lines([ps.scores for ps in run.scores], shown)
    return data


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
