"""Edits: suppress, amplify, update (new object, autocompleted from the relation's objects), erase (relation),
on the selected neurons or a named set; the history (QUndoView) and the before/after table with controls.

The report shown by `show_report` is a dict: "title", "rows" ({"group", "fact", "prompt", "answer", "before",
"after", "top_before", "top_after", and for an update's fact rows "new_before", "new_after"; optionally
"top_after_id"}), "edit" (Edit.to_dict()), "new_object"; optional: "model" ({"name", "sha256"}), "requested"
(the neuron count asked for, e.g. erase's top k), "skipped" ([(what, why)], as EditPlan.skipped), "relation"
(the relation id, for the offer to attribute it), "summary" (edit_plan.summarize_plan's dict).
"""

from __future__ import annotations

import re

from PySide6.QtCore import QSize, QStringListModel, Qt, Signal
from PySide6.QtWidgets import (QComboBox, QCompleter, QDoubleSpinBox, QFormLayout, QFrame, QGroupBox, QLabel,
                               QScrollArea, QSpinBox, QSplitter, QStackedWidget, QTabWidget, QUndoView,
                               QWidget)

from kn_core.evaluation import EVALUATIONS, change_text
from kn_core.facts import Fact
from kn_core.protocols import PROTOCOLS

from .common import ElidedLabel, TableView, button, fmt_delta, fmt_prob, hbox, hint, vbox

from .degeneracy_table import DegeneracyTable
from .metrics_strip import MetricsStrip

TABLE_ROWS_SHOWN = 3  # the before/after table's least height, in rows
HEADER_SHARE = 0.2  # the most of the table's column that the warnings and summary above it take (they scroll)

KINDS = ["Suppress", "Amplify", "Update", "Erase relation"]
UP, DOWN = "#1e8449", "#c0392b"
UNCHANGED = 1e-6  # no probability moved more than this: the edit changed nothing measurable
ANSWER_OR_ALL = (("answer", "answer"), ("all", "all"))

# The form's choices: attribute -> ((shown text, value), ...), tooltip. Built by `_declared_controls`.
COMBOS = {
    "kind": (tuple((k, k) for k in KINDS), "Suppress: activation \u2192 0 (or its mean) at the answer position; "
             "Amplify: \u00d7 factor; Update: move value vectors from o to o'; Erase: zero the relation's top neurons"),
    "target": ((), "Which neurons to edit"),
    "scope": (ANSWER_OR_ALL, "answer: only positions that predict the answer (paper); all: every position "
              "(exportable as weights)"),
    "scope_amp": (ANSWER_OR_ALL, "answer: only positions that predict the answer (paper); all: every position"),
    "strength": ((("paper (\u03bb1=1, \u03bb2=8)", "paper"), ("calibrated", "calibrated")),
                 "paper: the \u03bbs as given. calibrated: both \u03bbs scaled by the smallest factor (1/64 to 4, "
                 "line search) at which o' becomes the top answer on the fact's prompts; sign-aware. The report says "
                 "the scale chosen, or that none worked."),
    "suppress_to": ((("zero", "zero"), ("mean activation", "mean")), ""),
    "erase_fill": ((("zero", "zero"), ("unk", "unk")), ""),
    "protocol": (tuple((p, p) for p in PROTOCOLS),
                 "How the metrics strip scores the edit (docs/METRICS.md), as `kn edit --protocol`: kn (ours, per "
                 "prompt); easyedit (EasyEdit's token accuracies: rewrite_acc, rephrase_acc, locality, portability); "
                 "rome (CounterFact's ES, PS, NS, their magnitudes and S); mquake (edit-wise accuracy). Each beside "
                 "the random-neuron control; the report names the protocol."),
    "evaluation": (tuple((e, e) for e in EVALUATIONS),
                   "How 'correct' is judged, as `kn edit --eval`: forced (teacher-forced: every answer token is the "
                   "top-1) or generate (greedy continuation matches the answer). Recorded with the edit."),
}
# (attribute, minimum, maximum, value, step): a float spin box; a step of 0 makes an integer spin box
SPINS = (("factor", -10, 100, 2.0, 0.5), ("lambda1", 0, 100, 1.0, 1.0), ("lambda2", 0, 100, 8.0, 1.0),
         ("erase_k", 1, 1000, 20, 0))
# each edit kind's page of the form: (label, attribute); a label alone is a hint line
PAGES = ((("Set to", "suppress_to"), ("Positions", "scope")),
         (("Factor", "factor"), ("Positions", "scope_amp")),
         (("New object", "new_object"), ("", "objects_line"), ("Strength", "strength"),
          ("\u03bb1 (remove o)", "lambda1"), ("\u03bb2 (add o')", "lambda2")),
         (("Top neurons", "erase_k"), ("Fill", "erase_fill"),
          ("Uses the relation's most frequent refined neurons over its facts' runs.", None)))


class EditsPanel(QWidget):
    apply_requested = Signal(dict)  # {"kind", "target", ...params}
    message = Signal(str)
    attribute_relation_requested = Signal(str)  # relation id: attribute its facts (erase found too few neurons)

    def __init__(self, session, undo_stack, parent=None):
        super().__init__(parent)
        self.session = session
        self.fact: Fact | None = None
        self._relation: str | None = None
        self._declared_controls()
        self._new_object_box()
        self.strength.currentIndexChanged.connect(self._strength_changed)
        self.set_stats(None)
        self.history = QUndoView(undo_stack)
        self.history.setEmptyLabel("<original model>")
        # two rows at least (Qt's default is about three): the form and the history then fit the dock at 1600x1000,
        # which otherwise scrolled and cut the bottom rows of the before/after table
        self.history.setMinimumHeight(2 * self.history.fontMetrics().height() + 12)
        history_box = QGroupBox("History (click to go back)")
        history_box.setLayout(vbox(self.history))

        split = QSplitter(Qt.Horizontal)
        left = QWidget()
        left.setLayout(vbox(self._controls_box(), history_box, margins=(0, 0, 0, 0)))
        split.addWidget(left)
        # the degeneracy test (kn_core.degeneracy) asks through apply_requested, so it uses the same neurons
        self.degeneracy = DegeneracyTable()
        self.degeneracy.run_requested.connect(lambda params: self.apply_requested.emit(
            {"kind": "Degeneracy", "target": self.target.currentData(), **params}))
        self.result_tabs = _TabsWithCorner()
        self.result_tabs.addTab(self._result_box(), "Before / after")
        self.result_tabs.addTab(self.degeneracy, "Degeneracy")
        # the report's title and Export beside the tabs, not in a row of their own: the table keeps the height
        self.result_tabs.setCornerWidget(self.result_header, Qt.TopRightCorner)
        self.result_tabs.currentChanged.connect(lambda index: self.result_header.setVisible(index == 0))
        self.apply_button.clicked.connect(lambda: self.result_tabs.setCurrentIndex(0))
        split.addWidget(self.result_tabs)
        split.setStretchFactor(0, 1)
        split.setStretchFactor(1, 3)
        self.setLayout(vbox(split, margins=(4, 4, 4, 4)))
        self.refresh_targets()
        self.show_report(None)

    def _declared_controls(self):
        """The combo boxes of COMBOS and the spin boxes of SPINS, as attributes of the panel."""
        for name, (items, tip) in COMBOS.items():
            combo = QComboBox()
            for text, value in items:
                combo.addItem(text, value)
            combo.setToolTip(tip)
            setattr(self, name, combo)
        for name, low, high, value, step in SPINS:
            spin = QSpinBox() if step == 0 else QDoubleSpinBox()
            spin.setRange(low, high)
            spin.setValue(value)
            if step:
                spin.setSingleStep(step)
            setattr(self, name, spin)

    def _new_object_box(self):
        # an editable combo box: the relation's objects in its list, inline completion while typing. A popup
        # completer would swallow the first click outside it (the click on "Apply edit" right after typing)
        self.new_object = QComboBox()
        self.new_object.setEditable(True)
        self.new_object.setInsertPolicy(QComboBox.NoInsert)
        self.new_object.lineEdit().setPlaceholderText("new object o' (e.g. Rome)")
        self.completer = QCompleter(QStringListModel([]), self.new_object)
        self.completer.setCaseSensitivity(Qt.CaseInsensitive)
        self.completer.setCompletionMode(QCompleter.InlineCompletion)
        self.new_object.setCompleter(self.completer)
        self.new_object.editTextChanged.connect(lambda _: self._show_objects())
        self.objects_line = hint("")

    def _controls_box(self) -> QGroupBox:
        """The form: kind, neurons, the kind's page (PAGES), how the edit is scored, Apply."""
        self.pages = QStackedWidget()
        for rows in PAGES:
            page = QWidget()
            form = QFormLayout(page)
            form.setContentsMargins(0, 0, 0, 0)
            for label, name in rows:
                if name is None:
                    form.addRow(hint(label))
                elif label:
                    form.addRow(label, getattr(self, name))
                else:
                    form.addRow(getattr(self, name))
            self.pages.addWidget(page)
        self.kind.currentIndexChanged.connect(self.pages.setCurrentIndex)
        self.kind.currentIndexChanged.connect(lambda _: self._update_target_enabled())
        self.apply_button = button("Apply edit", self._apply, "Apply to the model (undo with Ctrl+Z)",
                                   name="primary")
        form = QFormLayout()
        form.setLabelAlignment(Qt.AlignRight)
        form.addRow("Edit", self.kind)
        form.addRow("Neurons", self.target)
        scoring = QFormLayout()
        scoring.setLabelAlignment(Qt.AlignRight)
        scoring.addRow("Scored by", hbox(self.protocol, self.evaluation))  # one row: 1280x800 keeps the table
        controls = QGroupBox("Edit the model")
        controls.setLayout(vbox(form, self.pages, scoring, self.apply_button, None))
        return controls

    def _result_box(self) -> QWidget:
        """The report: the before/after table takes the height (its warnings and summary above it get what they
        need up to HEADER_SHARE of it), the metric cards beside both; the one-line title and Export in
        `result_header`, which stands beside the tabs."""
        self.result_title = ElidedLabel("Apply an edit to see its effect here.")
        self.result_title.setObjectName("heading")
        self.result_summary = hint("")
        self.result_warning = QLabel("")
        self.result_warning.setObjectName("warning")
        self.result_warning.setWordWrap(True)
        self.result_warning.hide()
        self.attribute_button = button("Attribute the relation\u2026", self._attribute_relation,
                                       "Run attribution on every fact of the relation, then erase again")
        self.attribute_button.hide()
        self.table = TableView(["group", "fact", "prompt", "answer", "p before", "p after", "\u0394p", "p(o') before",
                                "p(o') after", "goal", "top-1 before", "top-1 after", "flip"],
                               formats={4: fmt_prob, 5: fmt_prob, 6: fmt_delta, 7: fmt_prob, 8: fmt_prob})
        self.export_button = button("Export table\u2026", lambda: self.table.export_csv_dialog(self, "edit.csv"))
        title_row = hbox(self.result_title, self.export_button, margins=(4, 1, 0, 0))  # Qt sets a corner at y = -1
        title_row.setStretch(0, 1)
        self.result_header = _Corner()
        self.result_header.setLayout(title_row)
        warning_row = hbox(self.result_warning, self.attribute_button)
        warning_row.setStretch(0, 1)
        self.metrics_strip = MetricsStrip()
        # no group box around it (the tab names it): at 1600x1000 its frame, a wrapped title and the summary left
        # the table about two rows; the summary scrolls in its own area, in a splitter above the table
        header = QWidget()
        header.setLayout(vbox(warning_row, self.result_summary, margins=(0, 0, 0, 0)))  # a warning first
        header_scroll = QScrollArea()
        header_scroll.setFrameShape(QFrame.NoFrame)
        header_scroll.setWidgetResizable(True)
        header_scroll.setWidget(header)
        header_scroll.setMinimumHeight(2 * self.fontMetrics().lineSpacing())
        header_scroll.viewport().setAutoFillBackground(False)
        header.setAutoFillBackground(False)
        self.table.setMinimumHeight(TABLE_ROWS_SHOWN * self.table.verticalHeader().defaultSectionSize()
                                    + self.table.horizontalHeader().sizeHint().height() + 4)
        self.result_split = _split(Qt.Vertical, header_scroll, self.table)
        page = QWidget()
        page.setToolTip("The fact's prompts, then the controls: other facts the edit must not move")
        page.setLayout(vbox(_split(Qt.Horizontal, self.result_split, self.metrics_strip), margins=(2, 2, 2, 2)))
        return page

    def resizeEvent(self, event):
        super().resizeEvent(event)
        self.metrics_strip.set_columns(3 if self.width() >= 1250 else 2)  # the table keeps most of a 1280 screen

    def set_stats(self, stats):
        """Mean ablation needs the model's activation statistics (kn_core.neurons.ActivationStats, or None)."""
        item = self.suppress_to.model().item(1)
        item.setEnabled(stats is not None)
        if stats is None:
            self.suppress_to.setCurrentIndex(0)
            self.suppress_to.setToolTip("zero: the paper's suppression. Mean activation is available once the "
                                        "model's activation statistics are measured (after an attribution run).")
        else:
            self.suppress_to.setToolTip(f"zero: the paper's suppression; mean activation: each neuron set to its "
                                        f"mean activation at the answer position ({stats.source or stats.n_prompts}"
                                        f" prompts), a milder baseline than 0 for neurons that are never near 0")

    def _strength_changed(self, _=None):
        paper = self.strength.currentData() == "paper"
        for spin, value in ((self.lambda1, 1.0), (self.lambda2, 8.0)):
            if paper:
                spin.setValue(value)

    def _update_target_enabled(self):
        self.target.setEnabled(self.kind.currentText() != "Erase relation")

    def refresh_targets(self, selection_count: int | None = None):
        current = self.target.currentData()
        self.target.blockSignals(True)
        self.target.clear()
        n = selection_count if selection_count is not None else getattr(self, "_selection_count", 0)
        self._selection_count = n
        self.target.addItem(f"selected in plot ({n})", ("selection", None))
        for s in self.session.neuron_sets.values():
            self.target.addItem(f"{s.name} ({len(s.neurons)})", ("set", s.name))
        index = self._find_target(current) if current is not None else -1
        if index < 0:
            refined = [i for i in range(self.target.count())
                       if (self.target.itemData(i)[1] or "").startswith("refined")]
            index = refined[0] if refined else 0
        self.target.setCurrentIndex(index)
        self.target.blockSignals(False)

    def _find_target(self, data) -> int:
        for i in range(self.target.count()):
            if tuple(self.target.itemData(i) or ()) == tuple(data):
                return i
        return -1

    def set_target_set(self, name: str):
        index = self._find_target(("set", name))
        if index >= 0:
            self.target.setCurrentIndex(index)

    def set_objects(self, objects: list[str]):
        """Autocompletion of the new object from the relation's other objects."""
        text = self.new_object.currentText()
        self.new_object.blockSignals(True)
        self.new_object.clear()
        self.new_object.addItems(objects)
        self.new_object.setEditText(text)
        self.new_object.blockSignals(False)
        self.completer.setModel(QStringListModel(objects, self.completer))
        self._show_objects()

    def set_fact(self, fact: Fact | None):
        """The fact an update starts from (its object o is shown as the model reads it)."""
        self.fact = fact
        self._show_objects()

    def answer_words(self, obj: str) -> str:
        """The object as the model's prompts continue with it (e.g. ' Paris' for a causal model)."""
        fact = self.fact
        if fact is None or not obj:
            return obj
        prompts, _ = self.session.prompts_for(Fact(fact.relation, fact.subject, obj))
        return prompts[0].answer if prompts else obj

    def _show_objects(self):
        new = self.new_object.currentText().strip()
        if self.fact is None:
            self.objects_line.setText("Pick a fact: the update moves its object o to o'.")
            return
        old = self.answer_words(self.fact.object)
        self.objects_line.setText(f"o = {old!r} \u2192 o' = {self.answer_words(new)!r}" if new
                                  else f"o = {old!r} \u2192 o' = ?")

    def _apply(self):
        self.apply_requested.emit(self.current_request())

    def current_request(self) -> dict:
        """The form as a request (also applied to several facts at once: the Facts panel's Apply to selected)."""
        kind = self.kind.currentText()
        request = {"kind": kind, "target": self.target.currentData(), "protocol": self.protocol.currentData(),
                   "eval": self.evaluation.currentData()}
        if kind == "Suppress":
            request["scope"] = self.scope.currentText()
            request["to"] = self.suppress_to.currentData()
        elif kind == "Amplify":
            request["factor"] = self.factor.value()
            request["scope"] = self.scope_amp.currentText()
        elif kind == "Update":
            request["new_object"] = self.new_object.currentText().strip()
            request["lambda1"] = self.lambda1.value()
            request["lambda2"] = self.lambda2.value()
            request["strength"] = self.strength.currentData()
        else:
            request["k"] = self.erase_k.value()
            request["fill"] = self.erase_fill.currentText()
        return request

    def set_busy(self, busy: bool, has_model: bool = True):
        self.apply_button.setEnabled(has_model and not busy)
        self.degeneracy.set_busy(busy, has_model)
        self.history.setEnabled(not busy)

    def show_degeneracy(self, result: dict, fact: str, edits_in_force: int = 0):
        self.degeneracy.show_result(result, fact, edits_in_force)
        self.result_tabs.setCurrentWidget(self.degeneracy)

    # ----------------------------------------------------------------- the before/after table
    def _attribute_relation(self):
        if self._relation:
            self.attribute_relation_requested.emit(self._relation)

    def show_report(self, report: dict | None):
        self.table.clear_rows()
        self.table.context = []
        for col in (7, 8, 9):  # p(o') and the goal: shown for updates only
            self.table.setColumnHidden(col, True)
        self.result_warning.hide()
        self.attribute_button.hide()
        self.metrics_strip.show_metrics((report or {}).get("metrics"), (report or {}).get("protocol", "kn"),
                                        (report or {}).get("protocol_scores"))
        self.result_split.widget(0).setVisible(bool(report))  # no empty box above an empty table
        if not report:
            self.result_title.setText("Apply an edit to see its effect here.")
            self.result_summary.setText("")
            return
        rows = report["rows"]
        edit = report.get("edit") or {}
        self.result_title.setText(self._title(report))  # whole in its tooltip when the line is too short
        method = [m for m in (self._method(report), _scoring(report)) if m]
        self.result_summary.setText("   |   ".join(method
                                                + self._group_summaries(report, self.answer_words)))
        warnings = [w for w in (self._unchanged(rows), self._fewer_neurons(report), self._goal(report)) if w]
        warnings += [f"Skipped {what}: {why}." for what, why in report.get("skipped") or []
                     if not what.endswith("neurons asked for")]
        if warnings:
            self.result_warning.setText("\n".join(warnings))
            self.result_warning.show()
        self.table.context = self._context(report)
        is_update = edit.get("kind") == "update" or bool(report.get("new_object"))
        for r in rows:
            delta = r["after"] - r["before"]
            flip = r["top_before"] != r["top_after"]
            goal = self._row_goal(r, report) if is_update and r["group"] in ("fact", "held-out template") else ""
            self.table.add_row([r["group"], r["fact"], r["prompt"], repr(r["answer"]), float(r["before"]),
                                float(r["after"]), float(delta), _maybe_float(r.get("new_before")),
                                _maybe_float(r.get("new_after")), goal, repr(r["top_before"]), repr(r["top_after"]),
                                "\u21c4 flip" if flip else ""],
                               colors={6: UP if delta > 0 else DOWN if delta < 0 else "#5d6d7e", 9: DOWN if goal.startswith("\u2718") else UP,
                                       12: DOWN})
        for col in (7, 8, 9):
            self.table.setColumnHidden(col, not is_update)
        self.table.resizeColumnsToContents()
        self.table.setColumnWidth(2, min(260, self.table.columnWidth(2)))
        self._share_height()

    def _share_height(self):
        """The summary and warnings get what they need up to HEADER_SHARE of the height; the table the rest."""
        total = sum(self.result_split.sizes())
        if total > 0:
            header = min(self.result_split.widget(0).widget().sizeHint().height(), int(HEADER_SHARE * total))
            self.result_split.setSizes([header, total - header])

    def _title(self, report: dict) -> str:
        """The report's title; an update names its objects as words, not token ids."""
        edit = report.get("edit") or {}
        title = report["title"]
        if edit.get("kind") != "update" or not report.get("new_object"):
            return title
        fact_rows = [r for r in report["rows"] if r["group"] == "fact"]
        old = fact_rows[0]["answer"] if fact_rows else "o"
        words = (f"Update {len(edit.get('neurons', []))} neurons: {old!r} \u2192 "
                 f"{self.answer_words(report['new_object'])!r} (\u03bb1 = {edit.get('lambda1', 1):g}, "
                 f"\u03bb2 = {edit.get('lambda2', 8):g})")
        _, sep, rest = title.partition(" \u2014 ")
        return words + (sep + rest if sep else "")

    @staticmethod
    def _method(report: dict) -> str:
        """Which variant was used: suppress to zero or the mean activation; an update's paper or calibrated strength
        (the scale chosen, or that calibration failed)."""
        kind, request = (report.get("edit") or {}).get("kind"), report.get("request") or {}
        if kind == "suppress" and request.get("to"):
            return ("set to the mean activation (mean ablation)" if request["to"] == "mean"
                    else "set to zero (paper)")
        if kind != "update" or not request.get("strength"):
            return ""
        cal = report.get("calibration")
        if request["strength"] != "calibrated" or not cal:
            return "strength: paper (\u03bbs as given)"
        scaled = f"\u03bb1 = {cal['lambda1']:.3g}, \u03bb2 = {cal['lambda2']:.3g}"
        if cal.get("reached"):
            return f"strength: calibrated, \u03bbs \u00d7 {cal['scale']:.3g} ({scaled})"
        return (f"strength: calibrated FAILED: o' never became the top answer, up to \u03bbs \u00d7 {cal['scale']:.3g} "
                f"({scaled}, applied)")

    @staticmethod
    def _group_summaries(report: dict, words=str) -> list[str]:
        rows = report["rows"]
        summary = []
        for group in dict.fromkeys(r["group"] for r in rows):
            g = [r for r in rows if r["group"] == group]
            mean_before = sum(r["before"] for r in g) / len(g)
            mean_delta = sum(r["after"] - r["before"] for r in g) / len(g)
            rel = f" ({change_text(mean_delta / mean_before)})" if mean_before > 0 else ""
            flips = sum(r["top_before"] != r["top_after"] for r in g)
            summary.append(f"{group}: mean \u0394p {fmt_delta(mean_delta)}{rel}, {flips}/{len(g)} top-1 flips")
        nb = [r for r in rows if r["group"] == "fact" and r.get("new_before") is not None]
        if report.get("new_object") and nb:
            summary.append(f"p({words(report['new_object'])!r}): {fmt_prob(sum(r['new_before'] for r in nb) / len(nb))}"
                           f" \u2192 {fmt_prob(sum(r['new_after'] for r in nb) / len(nb))}")
        return summary

    @staticmethod
    def _unchanged(rows: list[dict]) -> str:
        moved = max((abs(r["after"] - r["before"]) for r in rows), default=0.0)
        moved = max([moved] + [abs(r["new_after"] - r["new_before"]) for r in rows
                               if r.get("new_before") is not None and r.get("new_after") is not None])
        if rows and moved <= UNCHANGED and all(r["top_before"] == r["top_after"] for r in rows):
            return (f"This edit changed nothing: no probability on these {len(rows)} prompts moved by more than "
                    f"{UNCHANGED:g} (e.g. the neurons are not active at these positions, so zeroing or "
                    "amplifying them has no effect).")
        return ""

    def _fewer_neurons(self, report: dict) -> str:
        """Erase (or any edit asked for k neurons) that found fewer: both counts, why, and the offer."""
        actual = len((report.get("edit") or {}).get("neurons", []))
        requested = report.get("requested")
        why = []
        for what, reason in report.get("skipped") or []:
            asked = re.fullmatch(r"\d+ of the (\d+) neurons asked for", what)
            if asked:  # EditPlan.skipped's entry for an erase that found fewer neurons than asked for
                requested = requested or int(asked.group(1))
                why.append(reason)
        if not requested or actual >= requested:
            return ""
        self._relation = report.get("relation") or (self.fact.relation if self.fact is not None else None)
        if self._relation:
            self.attribute_button.setText(f"Attribute {self._relation}\u2026")
            self.attribute_button.show()
        return (f"Edited {actual} of the {requested} neurons asked for: "
                + (why[0] if why else "the relation's attributed facts have no more refined neurons")
                + ". Attribute more of the relation's facts to find more neurons.")

    def _goal(self, report: dict) -> str:
        """An update's goal: o' becomes the top-1 answer and its probability rises."""
        if not report.get("new_object"):
            return ""
        fact_rows = [r for r in report["rows"] if r["group"] == "fact" and r.get("new_after") is not None]
        if not fact_rows:
            return ""
        goals = [self._row_goal(r, report) for r in fact_rows]
        failed = [g for g in goals if g.startswith("\u2718")]
        new = self.answer_words(report["new_object"])
        rate = (report.get("summary") or {}).get("success_rate")
        success = f" (the engine's success rate: {100 * rate:.0f}% of the prompts)" if rate is not None else ""
        if not failed:
            return ""
        fell = sum("fell" in g for g in failed)
        not_top = sum("not top-1" in g for g in failed)
        parts = []
        if fell:
            parts.append(f"p({new!r}) went down on {fell} of {len(goals)} prompts")
        if not_top:
            parts.append(f"{new!r} is not the top-1 answer on {not_top} of {len(goals)} prompts")
        return "The update failed its goal: " + "; ".join(parts) + success + "."

    def _row_goal(self, r: dict, report: dict) -> str:
        if r.get("new_before") is None or r.get("new_after") is None:
            return ""
        new = self.answer_words(report["new_object"])
        new_ids = (report.get("edit") or {}).get("new_ids") or []
        if r.get("top_after_id") is not None and new_ids:
            top1 = r["top_after_id"] == new_ids[0]
        else:  # by text: the top-1 token is o' or its first word
            token = str(r["top_after"]).strip()
            top1 = bool(token) and token in (new.strip(), (new.split() or [""])[0])
        fell = r["new_after"] < r["new_before"]
        if top1 and not fell:
            return f"\u2714 {new!r} is top-1"
        problems = ([f"p(o') fell {fmt_prob(r['new_before'])} \u2192 {fmt_prob(r['new_after'])}"] if fell else []) \
            + ([] if top1 else [f"not top-1 (model says {r['top_after']!r})"])
        return "\u2718 " + "; ".join(problems)

    def _context(self, report: dict) -> list[str]:
        """The CSV's header lines: which edit, on which model."""
        import json

        model = report.get("model") or {}
        lm = self.session.lm
        if not model and lm is not None:
            info = lm.describe()
            model = {"name": info.get("name") or getattr(lm, "source", ""), "sha256": info.get("sha256", "")}
        lines = [f"edit: {self._title(report)}",
                 f"edit parameters: {json.dumps(report.get('edit') or {}, default=str)}",
                 f"model: {model.get('name') or 'unknown'}"
                 + (f" (weights sha256 {model['sha256']})" if model.get("sha256") else "")]
        if report.get("metrics"):  # the metrics strip's numbers, each beside the random control (kn_core.metrics)
            from kn_core.metrics import metrics_lines

            lines += ["metrics (edit [random-neuron control]):"] + [line.strip() for line in
                                                                     metrics_lines(report["metrics"])]
        if report.get("protocol_scores"):
            from kn_core.protocols import summary_lines

            lines += [line.strip() for line in summary_lines(report["protocol"], report["protocol_scores"])]
        scoring = _scoring(report)
        return lines + ([scoring] if scoring else [])


def _scoring(report: dict) -> str:
    """How the edit was scored (`kn edit --protocol/--eval`); edits made before the app recorded it say nothing."""
    if "protocol" not in report:
        return ""
    judged = "greedy generation" if report.get("eval") == "generate" else "teacher-forced"
    return f"scored by the {report['protocol']} protocol; correct judged by {judged}"


class _Corner(QWidget):
    """A tab widget's corner that asks for the width the tabs leave it (`_TabsWithCorner`), whatever its text."""

    wanted = 120

    def sizeHint(self):
        return QSize(self.wanted, super().sizeHint().height())


class _TabsWithCorner(QTabWidget):
    """Tabs whose corner widget (the report's title row, a `_Corner`) takes the width the tab bar leaves, never
    more (a long title would otherwise squeeze the tabs behind scroll arrows)."""

    def resizeEvent(self, event):
        corner = self.cornerWidget()
        if isinstance(corner, _Corner):
            corner.wanted = max(120, self.width() - self.tabBar().sizeHint().width() - 12)
            corner.setFixedHeight(self.tabBar().sizeHint().height() - 2)  # within the tab bar's row
            corner.updateGeometry()
        super().resizeEvent(event)


def _split(orientation, first: QWidget, second: QWidget) -> QSplitter:
    """Two parts, neither collapsing; the table's side takes the extra room: the second part of a vertical split
    (the summary above the table), the first of a horizontal one (the table beside the metric cards)."""
    split = QSplitter(orientation)
    split.addWidget(first)
    split.addWidget(second)
    split.setStretchFactor(0, 0 if orientation == Qt.Vertical else 1)
    split.setStretchFactor(1, 1 if orientation == Qt.Vertical else 0)
    split.setChildrenCollapsible(False)
    return split


def _maybe_float(value):
    return None if value is None else float(value)
