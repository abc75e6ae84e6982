"""Attribution panel: run controls, t/p thresholds and the plots.

- per-layer bars (sum or max of scores per layer) beside a histogram of refined neurons per layer;
- a layer x neuron heatmap: hover shows (layer, neuron, score, activation), click selects neurons
  (Ctrl/Shift-click adds), refined neurons are ringed;
- per-prompt comparison: each refined neuron's score / the prompt's max, per prompt, against the t line.
Thresholds are views: moving t or p recomputes coarse and refined sets from the stored scores at once (a run
stored compactly keeps the last t, p whose sets its kept scores decide, and says why in the status bar).
When the panel is short the per-layer plots fold into a tab, so the map keeps its height (`set_folded`).
"""

from __future__ import annotations

import math

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Qt, QTimer, Signal
from PySide6.QtWidgets import QCheckBox, QComboBox, QLabel, QSpinBox, QSplitter, QTabWidget, QWidget

from kn_core.attribution import AttributionParams
from kn_core.neurons import refine_threshold
from kn_core.quadrature import DEFAULT_POINTS
from kn_core.report.figures import colour_bound
from kn_core.selection import DEFAULT_P, DEFAULT_T
from kn_core.specificity import control_text, template_neurons

from ..session import TooCoarse, neuron_name
from .common import ElidedLabel, TableView, button, fmt_activation, fmt_prob, hbox, hint, vbox
from .form import build_controls
from .neuron_map import NeuronMap, expert_text
from .run_params import ENGINE, PROMPT_PARAMS, RUN_PARAMS
from .thresholds import ThresholdControl

pg.setConfigOptions(imageAxisOrder="row-major", antialias=False, background="w", foreground="#33475b")

BAR = "#5dade2"
REFINED = "#e74c3c"
SELECTED = "#f1c40f"
PALETTE = ["#e74c3c", "#2e86c1", "#28b463", "#af7ac5", "#f39c12", "#17a589", "#d35400", "#5d6d7e",
           "#c0392b", "#1abc9c"]


KEEP_TIP = ("Checked: neurons flagged massive or unspecific stay in the coarse/refined sets (the paper's method). "
            "Unchecked (default): they are marked but left out, and never set the coarse threshold's max.")


def _rule_text(rule: dict) -> str:
    """The flag rules in words (NeuronFlags.rule), one line per flag, then what they were measured on."""
    lines = [f"{name}: {rule[name]}" for name in ("massive", "unspecific", "template")
             if isinstance(rule.get(name), str)]
    if rule.get("stats_source"):
        lines.append(f"measured on {rule['stats_source']}")
    return "\n".join(lines)


def _vsplit(*parts) -> QSplitter:
    """A vertical splitter of (widget, stretch) parts that never collapses one."""
    split = QSplitter(Qt.Vertical)
    for k, (widget, stretch) in enumerate(parts):
        split.addWidget(widget)
        split.setStretchFactor(k, stretch)
    split.setChildrenCollapsible(False)
    return split


class AttributionPanel(QWidget):
    run_requested = Signal(str)  # "current" | "selection"
    thresholds_requested = Signal(float, float)  # t, p: the controller applies them (or refuses: show_selection)
    keep_massive_requested = Signal(bool)
    neurons_selected = Signal(list)  # [(layer, neuron)]
    neuron_clicked = Signal(int, int)
    adapt_p_requested = Signal()
    relation_set_requested = Signal()
    subject_control_requested = Signal()
    templates_changed = Signal(str)  # "prefix" | "end-only": the causal prompts requested from now on
    prompt_format_changed = Signal(str)  # "plain" | "chat" (kn_core.encoding.PROMPT_FORMATS)
    problem = Signal(str)  # one line for the status bar (compact scores that cannot decide the shown run's sets)

    def __init__(self, session, parent=None):
        super().__init__(parent)
        self.session = session  # read only: changes go out as requests (run, thresholds, templates, selection)
        self.run = None
        self.live: dict[int, np.ndarray] = {}  # prompt index -> scores being filled (NaN = not yet)
        self.selected: list[tuple[int, int]] = []
        self.refined: list[tuple[int, int]] = []
        self._shown_scores = None
        self._shown_acts = None
        self.flags = None  # kn_core.neurons.NeuronFlags of the model, when measured
        # streamed results are drawn at most ~5 times a second: the UI thread stays free while a run pours in
        self._redraw_timer = QTimer(self, singleShot=True, interval=200, timeout=self.redraw)
        params, prompt_row = self._build_run_controls()
        self._build_threshold_controls()
        self._build_layer_plots()
        self._build_map()
        self._build_prompt_view()
        self._build_layout(params, prompt_row)
        self._fill_view_of()
        self.set_running(False, has_model=False)
        self.redraw()

    def _build_run_controls(self):
        """The run's parameters (declared in RUN_PARAMS), the run buttons; the parameters' row."""
        self.run_button = button("Run attribution (F5)", lambda: self.run_requested.emit("current"),
                                 "Integrated gradients over every FFN neuron, for all prompts of the current fact",
                                 name="primary")
        self.run_sel_button = button("Run selected", lambda: self.run_requested.emit("selection"),
                                     "Run every fact selected in the Facts panel, one after another")
        row = build_controls(self, RUN_PARAMS)
        prompt_row = build_controls(self, PROMPT_PARAMS)
        self.quadrature.currentTextChanged.connect(self._quadrature_changed)
        self.templates.currentTextChanged.connect(self.templates_changed.emit)
        self.prompt_format.currentTextChanged.connect(self.prompt_format_changed.emit)
        return hbox(*row, None), prompt_row

    def _build_threshold_controls(self):
        self.t_control = ThresholdControl("t", DEFAULT_T, "Coarse: score > t \u00d7 the prompt's max score (paper: 0.2)")
        self.p_control = ThresholdControl("p", DEFAULT_P, "Refined: coarse in \u2265 max(p \u00d7 prompts, 3) prompts "
                                          "(paper: 0.7, adapted per relation)")
        self.t_control.changed.connect(self._thresholds)
        self.p_control.changed.connect(self._thresholds)
        self.adapt_button = button("Adapt p", self.adapt_p_requested.emit,
                                   "Move p by \u00b10.05 (up to 6 times) until the relation's facts have 2\u20135 "
                                   "refined neurons on average")
        self.relation_button = button("Relation neurons", self.relation_set_requested.emit,
                                      "Neurons refined for \u2265 10% of the relation's facts, as a neuron set")
        self.control_button = button("Subject control", self.subject_control_requested.emit,
                                     "Re-score the refined neurons on the fact's templates with 3 other subjects "
                                     "of its relation: a neuron that keeps half the size of its effect without the "
                                     "subject (pushing the answer or against it) is "
                                     "a template neuron (\u25b3 on the map), kept out of the refined set "
                                     "(docs/SPECIFICITY.md; kn neurons --subject-control)")
        self.keep_massive = QCheckBox("Keep massive/unspecific neurons")
        self.keep_massive.setToolTip(KEEP_TIP)
        self.keep_massive.toggled.connect(lambda keep: self.keep_massive_requested.emit(bool(keep)))
        self.agg = QComboBox()
        self.agg.addItems(["sum", "max"])
        self.agg.setToolTip("Per-layer bars: sum or max of the scores in each layer")
        self.agg.currentTextChanged.connect(lambda _: self.redraw())
        self.view_of = QComboBox()
        self.view_of.setToolTip("Plot the mean over the fact's prompts, or one prompt")
        self.view_of.setSizeAdjustPolicy(QComboBox.AdjustToMinimumContentsLengthWithIcon)
        self.view_of.setMinimumContentsLength(12)
        self.view_of.currentIndexChanged.connect(lambda _: self.redraw())
        self.title = QLabel("No attribution yet: pick a fact and press F5.")
        self.title.setObjectName("heading")
        self.title.setWordWrap(True)
        self.summary = hint("")
        self.summary.setMinimumHeight(self.summary.fontMetrics().height())  # empty or not: the map keeps its place
        self.hover = ElidedLabel(" ")  # a neuron's whole line is in the map's tooltip; a long one must not widen
        self.hover.setObjectName("value")
        self.hover.setTextInteractionFlags(Qt.TextSelectableByMouse)

    def _build_layer_plots(self):
        """The per-layer bars beside the histogram of refined neurons per layer."""
        self.layer_widget = pg.GraphicsLayoutWidget()
        self.layer_plot = self.layer_widget.addPlot(title="Attribution per layer")
        self.layer_plot.setLabel("bottom", "layer")
        self.layer_plot.setLabel("left", "sum of scores")
        self.layer_plot.showGrid(y=True, alpha=0.25)
        self.layer_bars = pg.BarGraphItem(x=[], height=[], width=0.8, brush=BAR, pen=pg.mkPen("#2e86c1"))
        self.layer_plot.addItem(self.layer_bars)
        self.hist_plot = self.layer_widget.addPlot(title="Refined neurons per layer")
        self.hist_plot.setLabel("bottom", "layer")
        self.hist_plot.setLabel("left", "neurons")
        self.hist_plot.showGrid(y=True, alpha=0.25)
        self.hist_bars = pg.BarGraphItem(x=[], height=[], width=0.8, brush=REFINED, pen=pg.mkPen("#922b21"))
        self.hist_plot.addItem(self.hist_bars)
        self.hist_plot.setXLink(self.layer_plot)
        for plot in (self.layer_plot, self.hist_plot):
            plot.setTitle(plot.titleLabel.text, size="9pt")
            plot.getAxis("left").setStyle(maxTickLevel=1)
            plot.getAxis("left").setWidth(48)
            for axis in ("left", "bottom"):
                plot.getAxis(axis).enableAutoSIPrefix(False)
        self.layer_widget.setMinimumHeight(140)

    def _build_map(self):
        """The layer x neuron map, and its go-to and zoom tools (they sit in the tab bar's corner)."""
        self.colormap = pg.colormap.get("CET-D1")
        self.heat_widget = NeuronMap(self.colormap)
        self.heat_plot = self.heat_widget.plot
        self.image = self.heat_widget.image
        self.colorbar = self.heat_widget.colorbar
        self.refined_marks = self.heat_widget.refined_marks
        self.selected_marks = self.heat_widget.selected_marks
        self.heat_widget.hovered.connect(self._show_hover)
        self.heat_widget.clicked.connect(lambda layer, neuron, add: self.select_neuron(layer, neuron, add=add))
        self.goto_layer = QSpinBox()
        self.goto_layer.setPrefix("L ")
        self.goto_layer.setToolTip("Layer of the neuron to go to")
        self.goto_neuron = QSpinBox()
        self.goto_neuron.setPrefix("N ")
        self.goto_neuron.setToolTip("Index of the neuron within its layer")
        self.goto_neuron.lineEdit().returnPressed.connect(self._go_to_clicked)
        self.goto_button = button("Go to", self._go_to_clicked, "Centre the map on this neuron and select it")
        zoom_in = button("+", lambda: self.heat_widget.zoom(0.5), "Zoom in on the neurons (or the mouse wheel)")
        zoom_out = button("\u2212", lambda: self.heat_widget.zoom(2.0), "Zoom out")
        fit = button("All", self.heat_widget.fit, "Show every neuron")
        for b in (zoom_in, zoom_out):
            b.setFixedWidth(30)
        self.hover.setMinimumWidth(120)
        self.map_tools = QWidget()
        self.map_tools.setLayout(hbox(QLabel("go to"), self.goto_layer, self.goto_neuron, self.goto_button,
                                      zoom_in, zoom_out, fit, margins=(0, 0, 2, 2)))
        self.heat_page = QWidget()
        self.heat_page.setLayout(vbox(self.hover, self.heat_widget, margins=(2, 2, 2, 2), spacing=2))

    def _build_prompt_view(self):
        """The refined neurons' scores across prompts above the table of prompts."""
        self.prompt_widget = pg.GraphicsLayoutWidget()
        self.prompt_plot = self.prompt_widget.addPlot(title="Refined neurons across prompts")
        self.prompt_plot.setLabel("bottom", "prompt")
        self.prompt_plot.setLabel("left", "score / prompt max")
        self.prompt_plot.showGrid(y=True, alpha=0.25)
        self.prompt_legend = self.prompt_plot.addLegend(offset=(-10, 10), labelTextSize="8pt")
        self.prompt_table = TableView(["#", "prompt", "answer", "p(answer)", "coarse", "completeness", "seconds"],
                                      formats={3: fmt_prob, 5: "{:.2f}".format, 6: "{:.1f}".format})
        # the per-prompt lines get a usable height by default; the table below shows at least 3 rows
        self.prompt_widget.setMinimumHeight(180)
        self.prompt_table.setMinimumHeight(90)
        self.prompt_page = _vsplit((self.prompt_widget, 3), (self.prompt_table, 2))

    def _build_layout(self, params, prompt_row):
        """Two rows of controls, then the title with the view choices, the summary, then the plots: the panel
        fits a 1280 px wide screen."""
        self.tabs = QTabWidget()
        self.tabs.addTab(self.heat_page, "Layer \u00d7 neuron")
        self.tabs.addTab(self.prompt_page, "Per prompt")
        self.tabs.setCornerWidget(self.map_tools, Qt.TopRightCorner)
        self.tabs.currentChanged.connect(self._tab_changed)
        self.split = _vsplit((self.layer_widget, 1), (self.tabs, 3))
        self.folded = False  # True: the per-layer plots are a tab beside the map (a short panel)
        self.run_row = QWidget()
        self.run_row.setLayout(hbox(self.run_button, self.run_sel_button, params))
        self.thresholds_row = QWidget()
        self.thresholds_row.setToolTip("Thresholds are views over the stored scores: moving them recomputes the "
                                       "coarse and refined sets at once, without running anything")
        # hold out and the prompt format sit here: the parameters' row is the panel's widest (1280x800 must fit)
        self.thresholds_row.setLayout(hbox(self.t_control, self.p_control, self.adapt_button,
                                           self.relation_button, self.keep_massive, *prompt_row))
        title_row = hbox(self.title, self.control_button, QLabel("show"), self.view_of, QLabel("bars"), self.agg)
        title_row.setStretch(0, 1)
        self.setLayout(vbox(self.run_row, self.thresholds_row, title_row, self.summary, self.split, spacing=4))

    # ----------------------------------------------------------------- layout
    def resizeEvent(self, event):
        super().resizeEvent(event)
        view = self.parentWidget()  # the scroll area's viewport: the height the panel really has on screen
        self.set_folded((view.height() if view is not None else self.height()) < self._unfolded_height())

    def _unfolded_height(self) -> int:
        least = self.minimumSizeHint().height()
        return least if not self.folded else least + self.layer_widget.minimumHeight() + self.split.handleWidth()

    def set_folded(self, folded: bool):
        """Too short for the per-layer plots above the map at its minimum height: they become the "Per layer"
        tab (after "Per prompt"), so the map keeps its height; tall enough again, they go back above the tabs."""
        if folded == self.folded:
            return
        self.folded = folded
        if folded:
            self.tabs.insertTab(self.tabs.indexOf(self.prompt_page) + 1, self.layer_widget, "Per layer")
            return
        shown = self.tabs.currentWidget() is self.layer_widget
        self.tabs.removeTab(self.tabs.indexOf(self.layer_widget))
        self.split.insertWidget(0, self.layer_widget)
        self.layer_widget.show()
        if shown:
            self.tabs.setCurrentWidget(self.heat_page)

    def _tab_changed(self, index: int):
        self.map_tools.setVisible(self.tabs.widget(index) is self.heat_page)
        if self.tabs.widget(index) is self.prompt_page:
            self._draw_prompts()

    # ----------------------------------------------------------------- params
    def params(self):
        quadrature = self.quadrature.currentText()
        return AttributionParams(steps=self.steps.value(), quadrature=quadrature,
                                 rule=self.rule.currentText() if quadrature == "riemann" else ENGINE.rule,
                                 method=self.method.currentText())

    def _quadrature_changed(self, quadrature: str):
        """Steps mean Riemann steps or Gauss points: a default of one becomes the other's; the rule is Riemann's."""
        if self.steps.value() in DEFAULT_POINTS.values():
            self.steps.setValue(DEFAULT_POINTS[quadrature])
        self.rule.setEnabled(quadrature == "riemann")

    def set_thresholds(self, t: float, p: float):
        self.t_control.set_value(t)
        self.p_control.set_value(p)

    def set_causal_templates(self, mode: str):
        self.templates.blockSignals(True)
        self.templates.setCurrentText(mode)
        self.templates.blockSignals(False)

    def set_prompt_format(self, mode: str):
        self.prompt_format.blockSignals(True)
        self.prompt_format.setCurrentText(mode)
        self.prompt_format.blockSignals(False)

    def _thresholds(self, _=None):
        self.thresholds_requested.emit(self.t_control.value(), self.p_control.value())

    def show_selection(self):
        """The session's t, p and keep-massive choice on the controls (after the controller applied or refused a
        request: a refused one's controls go back)."""
        self.set_thresholds(self.session.t, self.session.p)
        self.keep_massive.blockSignals(True)
        self.keep_massive.setChecked(self.session.keep_massive)
        self.keep_massive.blockSignals(False)

    # ----------------------------------------------------------------- data in
    def show_run(self, run):
        changed = run is not self.run
        self.run = run
        if changed:
            self.live.clear()
            self.selected = []
            self.hover.setText(" ")  # it described a neuron in the run no longer shown
            self._autorange = True
        self._fill_view_of()
        self.redraw()

    def stream_chunk(self, prompt_index: int, layers: tuple[int, int], scores: np.ndarray):
        """A layer chunk of the prompt being attributed: drawn at once, before the prompt is complete."""
        lm = self.session.lm
        if lm is None:
            return
        live = self.live.get(prompt_index)
        if live is None:
            live = np.full((lm.layout.layers, lm.layout.neurons), np.nan, dtype=np.float32)
            self.live[prompt_index] = live
        a, b = layers
        chunk = np.asarray(scores, dtype=np.float32)
        if chunk.ndim == 2 and chunk.shape[0] == b - a:
            live[a:b] = chunk
        self.schedule_redraw()

    def prompt_done(self, prompt_index: int):
        self.live.pop(prompt_index, None)
        self._fill_view_of()
        if self.run is not None and self.run.complete:
            self.redraw()
        else:
            self.schedule_redraw()

    def schedule_redraw(self):
        if not self._redraw_timer.isActive():
            self._redraw_timer.start()

    def _fill_view_of(self):
        current = self.view_of.currentIndex()
        self.view_of.blockSignals(True)
        self.view_of.clear()
        self.view_of.addItem("mean over prompts")
        if self.run is not None:
            for i, prompt in enumerate(self.run.prompts):
                self.view_of.addItem(f"prompt {i + 1}: {prompt.text[:40]}")
        self.view_of.setCurrentIndex(max(0, min(current, self.view_of.count() - 1)))
        self.view_of.blockSignals(False)

    # ----------------------------------------------------------------- drawing
    def _arrays(self):
        run = self.run
        if run is None:
            return None, None
        index = self.view_of.currentIndex()
        if index > 0 and index - 1 < len(run.scores):
            ps = run.scores[index - 1]
            return ps.scores, ps.activations
        if index > 0 and (index - 1) in self.live:
            return np.nan_to_num(self.live[index - 1]), None
        if run.scores:
            return run.mean_scores(), run.mean_activations()
        if self.live:
            live = next(iter(self.live.values()))
            return np.nan_to_num(live), None
        return None, None

    def redraw(self):
        self._redraw_timer.stop()
        scores, acts = self._arrays()
        self._shown_scores, self._shown_acts = scores, acts
        run = self.run
        self._describe(run)
        # per-layer bars (a compact run: over the stored scores only, and the axis says so)
        if scores is not None and scores.size:
            agg = self.agg.currentText()
            per_layer = np.nansum(scores, 1) if agg == "sum" else np.nanmax(np.where(np.isnan(scores), -np.inf,
                                                                                     scores), 1)
            x = np.arange(len(per_layer))
            self.layer_bars.setOpts(x=x, height=np.where(np.isfinite(per_layer), per_layer, 0), width=0.8)
            compact = run is not None and run.compact is not None
            self.layer_plot.setLabel("left", f"{agg} of {'stored ' if compact else ''}scores")
        else:
            self.layer_bars.setOpts(x=[], height=[])
        lm = self.session.lm
        layers = lm.layout.layers if lm is not None else (scores.shape[0] if scores is not None else 0)
        counts = np.zeros(layers)
        for l, _n in self.refined:
            if l < layers:
                counts[l] += 1
        self.hist_bars.setOpts(x=np.arange(layers), height=counts, width=0.8)
        if layers:
            self.layer_plot.setXRange(-0.6, layers - 0.4, padding=0)
            self.hist_plot.setYRange(0, max(1, counts.max()) * 1.15, padding=0)
        # heatmap
        if scores is not None:
            # colour saturates at the strongest ~0.1% (never below t x max): single neurons stay visible
            bound = colour_bound(scores, self.session.t)  # as the report's map (NaN: not stored, compact runs)
            self.heat_widget.set_scores(scores, bound, fit=getattr(self, "_autorange", True))
            self.heat_widget.set_experts(self._experts(scores))
            self._autorange = False
            self.goto_layer.setRange(0, scores.shape[0] - 1)
            self.goto_neuron.setRange(0, scores.shape[1] - 1)
        else:
            self.heat_widget.set_scores(None)
        self._draw_marks()
        self._draw_prompts()
        if self.selected:  # the selected neuron's line reads the scores now shown (a prompt, new sets)
            self.hover.setText(self.describe_neuron(*self.selected[-1]))

    def _describe(self, run):
        """The title and summary line, and `self.refined`: when a compactly stored run's kept scores cannot decide
        the sets at t, no set (never a smaller one) and the store's one-line reason in their place."""
        self.refined = []
        if run is None:
            self.title.setText("No attribution yet: pick a fact and press F5.")
            self.summary.setText("")
            return
        done, n = len(run.scores), len(run.prompts)
        templates = run.params.get("causal_templates")
        chat = run.params.get("prompt_format") == "chat"
        self.title.setText(f"{run.fact.subject} \u2192 {run.fact.object}  ({run.fact.relation}, {n} prompts"
                           + (f", {templates} templates" if templates else "") + (", chat prompts" if chat else "")
                           + (", top scores stored" if run.compact is not None else "") + ")" + run.header_note())
        if not run.scores:
            self.summary.setText("waiting for the first prompt\u2026")
            return
        try:
            self.refined = self.session.refined(run)
            coarse = [len(self.session.coarse(run, i)) for i in range(done)]
        except TooCoarse as exc:
            self.summary.setText(f"\u26a0 no coarse or refined sets at t = {self.session.t:.2f}: {exc}")
            self.problem.emit(str(exc))
            return
        need = math.ceil(refine_threshold(done, self.session.p))  # a count: >= 4.2 of 6 means >= 5 of 6
        if done < 3:  # kn_core.neurons.case_neurons: refinement cannot select anything below 3 prompts
            rule = f"neurons (fewer than 3 prompts: coarse in all {done})"
        else:
            rule = f"refined (coarse in \u2265 {need} of {done} prompts)"
        template = template_neurons(run.params)
        left_out = f" ({len(template)} template neurons left out: subject control)" if template else ""
        self.summary.setText(
            f"coarse per prompt: {', '.join(map(str, coarse))}   |   {rule}: {len(self.refined)}{left_out}   |   "
            f"t = {self.session.t:.2f}, p = {self.session.p:.2f}" + self.session.known_note(run.fact, run.edits))

    def _draw_prompts(self, force: bool = False):
        """The per-prompt view; drawn only while its tab is visible (it is the costly one to redraw)."""
        if not force and self.tabs.currentWidget() is not self.prompt_page:
            self._prompts_stale = True
            return
        self._prompts_stale = False
        run = self.run
        if not hasattr(self, "_prompt_lines"):
            self._prompt_lines = []
            for k in range(len(PALETTE)):
                color = PALETTE[k]
                line = self.prompt_plot.plot([], [], pen=pg.mkPen(color, width=2), symbol="o", symbolSize=7,
                                             symbolBrush=color, name=f"line {k}")
                self._prompt_lines.append(line)
            self._t_line = pg.InfiniteLine(pos=0.2, angle=0, pen=pg.mkPen("#7f8c8d", style=Qt.DashLine),
                                           label="t", labelOpts={"position": 0.05, "color": "#7f8c8d"})
            self.prompt_plot.addItem(self._t_line)
            self._legend_names = None
        self.prompt_table.clear_rows()
        t = self.session.t
        self._t_line.setValue(t)
        self._t_line.label.setFormat(f"t = {t:.2f}")
        shown = []
        if run is not None and run.scores:
            shown = (self.selected + [r for r in self.refined if r not in self.selected])[:len(self._prompt_lines)]
        names = [neuron_name(l, i) for l, i in shown]
        if names != self._legend_names:
            self.prompt_legend.clear()
            for line, name in zip(self._prompt_lines, names):
                self.prompt_legend.addItem(line, name)
            self._legend_names = names
        for k, line in enumerate(self._prompt_lines):
            if k >= len(shown):
                line.setData([], [])
                continue
            l, i = shown[k]
            ys = []
            for ps in run.scores:
                top = float(np.nanmax(ps.scores))  # a compact run keeps every prompt's top scores
                ys.append(float(ps.scores[l, i]) / top if top > 0 else 0.0)
            line.setData(np.arange(1, len(ys) + 1), ys, connect="finite")  # NaN: a score not stored
        if run is None or not run.scores:
            return
        n = len(run.scores)
        self.prompt_plot.setXRange(0.5, n + 0.5, padding=0)
        self.prompt_plot.getAxis("bottom").setTicks([[(k, str(k)) for k in range(1, n + 1)]])
        for k, (prompt, ps) in enumerate(zip(run.prompts, run.scores)):
            ratios = [c["ratio"] for c in ps.completeness if c.get("ratio") == c.get("ratio")]
            comp = float(np.median(ratios)) if ratios else float("nan")
            try:
                coarse = len(self.session.coarse(run, k))
            except TooCoarse:  # not decided by the kept scores at this t: no count rather than a smaller one
                coarse = None
            self.prompt_table.add_row([k + 1, prompt.text, prompt.answer, float(ps.prob), coarse, comp,
                                       float(ps.seconds)])
        self.prompt_table.resizeColumnToContents(0)
        self.prompt_table.setColumnWidth(1, 260)

    # ----------------------------------------------------------------- hover and click on the heatmap
    def neuron_at(self, scene_pos):
        """The (layer, neuron) cell under a scene position, exactly (None outside the map)."""
        return self.heat_widget.neuron_at(scene_pos)

    def _draw_marks(self):
        flags = self.flags
        self.heat_widget.set_marks(self.refined, self.selected, flags.massive if flags else (),
                                   flags.unspecific if flags else (),
                                   template_neurons(self.run.params) if self.run is not None else ())

    def set_flags(self, flags):
        """Marks the neurons flagged massive / unspecific (kn_core.neurons.NeuronFlags, or None)."""
        self.flags = flags
        self.keep_massive.setToolTip(KEEP_TIP + (f"\n{_rule_text(flags.rule)}" if flags and flags.rule else
                                                 "\nNot measured yet: flags come after a run completes."))
        self._draw_marks()

    def go_to(self, layer: int, neuron: int):
        """Centres the map on (layer, neuron), zoomed so single neurons can be clicked, and selects it."""
        if self._shown_scores is None:
            return False
        L, N = self._shown_scores.shape
        if not (0 <= layer < L and 0 <= neuron < N):
            return False
        self.tabs.setCurrentWidget(self.heat_page)
        self.goto_layer.setValue(layer)
        self.goto_neuron.setValue(neuron)
        self.heat_widget.centre_on(layer, neuron)
        self.select_neuron(layer, neuron)
        return True

    def _go_to_clicked(self):
        self.go_to(self.goto_layer.value(), self.goto_neuron.value())

    def _experts(self, scores):
        """The loaded MoE model's expert spans when the shown scores are its (same shape), else None."""
        lm = getattr(self.session, "lm", None)
        experts = getattr(getattr(lm, "layout", None), "experts", None)
        if experts is None or scores.shape != (lm.layout.layers, lm.layout.neurons):
            return None
        return experts

    def describe_neuron(self, layer: int, neuron: int) -> str:
        text = neuron_name(layer, neuron)
        in_expert = expert_text(self.heat_widget.experts, layer, neuron)
        if in_expert:
            text = f"layer {layer}, {in_expert}"
        if self._shown_scores is not None:
            score = self._shown_scores[layer, neuron]
            text += (f":  score {score:.4g}" if not np.isnan(score) else
                     ":  score not stored (below this run's kept top scores in at least one prompt shown)")
        if self._shown_acts is not None:
            text += f",  activation {fmt_activation(self._shown_acts[layer, neuron])}"
        if (layer, neuron) in self.refined:
            text += "   (refined)"
        flagged = self.flags.of((layer, neuron)) if self.flags is not None else ()
        if flagged:
            text += "   \u26a0 flagged " + ", ".join(flagged)
        control = control_text(self.run.params, (layer, neuron)) if self.run is not None else ""
        return text + (f"   {control}" if control else "")

    def _hovered(self, pos):
        self._show_hover(self.neuron_at(pos))

    def _show_hover(self, hit):
        if hit is None:
            self.hover.setText(" ")
            self.heat_widget.setToolTip("")
            return
        text = self.describe_neuron(*hit)
        self.hover.setText(text)
        self.heat_widget.setToolTip(text)

    def select_neuron(self, layer: int, neuron: int, add: bool = False):
        key = (int(layer), int(neuron))
        if add:
            if key in self.selected:
                self.selected.remove(key)
            else:
                self.selected.append(key)
        else:
            self.selected = [key]
        self.hover.setText(self.describe_neuron(*key))
        self._draw_marks()
        self._draw_prompts()
        self.neurons_selected.emit(list(self.selected))
        self.neuron_clicked.emit(*key)

    def set_selected(self, neurons):
        self.selected = [tuple(map(int, n)) for n in neurons]
        self._draw_marks()
        self._draw_prompts()

    def set_running(self, running: bool, has_model: bool = True, startable: bool | None = None):
        """`startable`: a run may be queued now (None: when nothing runs)."""
        startable = has_model and not running if startable is None else startable
        self.run_button.setEnabled(startable)
        self.run_sel_button.setEnabled(startable)
        tip = "" if has_model else " \u2014 load a model first"
        # a job encodes its prompts as the model's prompt format says: never switched under it (masked: plain)
        lm = self.session.lm
        self.prompt_format.setEnabled(not running and (lm is None or lm.kind == "causal"))
        self.run_button.setToolTip("Integrated gradients over every FFN neuron, for all prompts of the current "
                                   "fact" + tip)
