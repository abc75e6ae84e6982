"""Edits: suppress, amplify, update (new object, autocompleted from the relation's objects), erase (relation),
on the selected neurons or a named set; the history (QUndoView) and the before/after table with controls."""

from __future__ import annotations

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (QComboBox, QCompleter, QDoubleSpinBox, QFormLayout, QGroupBox, QLabel, QLineEdit,
                               QSpinBox, QSplitter, QStackedWidget, QUndoView, QWidget)

from .common import TableView, button, fmt_delta, fmt_prob, hbox, hint, vbox

KINDS = ["Suppress", "Amplify", "Update", "Erase relation"]
UP, DOWN = "#1e8449", "#c0392b"


class EditsPanel(QWidget):
    apply_requested = Signal(dict)  # {"kind", "target", ...params}
    message = Signal(str)

    def __init__(self, session, undo_stack, parent=None):
        super().__init__(parent)
        self.session = session
        self.kind = QComboBox()
        self.kind.addItems(KINDS)
        self.kind.setToolTip("Suppress: activation \u2192 0 at the answer position; Amplify: \u00d7 factor; "
                             "Update: move value vectors from o to o'; Erase: zero the relation's top neurons")
        self.target = QComboBox()
        self.target.setToolTip("Which neurons to edit")
        self.scope = QComboBox()
        self.scope.addItems(["answer", "all"])
        self.scope.setToolTip("answer: only positions that predict the answer (paper); all: every position "
                              "(exportable as weights)")
        self.factor = QDoubleSpinBox()
        self.factor.setRange(-10, 100)
        self.factor.setValue(2.0)
        self.factor.setSingleStep(0.5)
        self.new_object = QLineEdit()
        self.new_object.setPlaceholderText("new object o' (e.g. Rome)")
        self.completer = QCompleter([])
        self.completer.setCaseSensitivity(Qt.CaseInsensitive)
        self.completer.setFilterMode(Qt.MatchContains)
        self.new_object.setCompleter(self.completer)
        self.lambda1 = QDoubleSpinBox()
        self.lambda1.setRange(0, 100)
        self.lambda1.setValue(1.0)
        self.lambda2 = QDoubleSpinBox()
        self.lambda2.setRange(0, 100)
        self.lambda2.setValue(8.0)
        self.erase_k = QSpinBox()
        self.erase_k.setRange(1, 1000)
        self.erase_k.setValue(20)
        self.erase_fill = QComboBox()
        self.erase_fill.addItems(["zero", "unk"])

        pages = QStackedWidget()
        for build in (self._page_suppress, self._page_amplify, self._page_update, self._page_erase):
            pages.addWidget(build())
        self.kind.currentIndexChanged.connect(pages.setCurrentIndex)
        self.kind.currentIndexChanged.connect(lambda _: self._update_target_enabled())
        self.pages = pages
        self.apply_button = button("Apply edit", self._apply, "Apply to the model (undo with Ctrl+Z)",
                                   name="primary")
        form = QFormLayout()
        form.setLabelAlignment(Qt.AlignRight)
        form.addRow("Edit", self.kind)
        form.addRow("Neurons", self.target)
        controls = QGroupBox("Edit the model")
        controls.setLayout(vbox(form, pages, self.apply_button, None))

        self.history = QUndoView(undo_stack)
        self.history.setEmptyLabel("<original model>")
        history_box = QGroupBox("History (click to go back)")
        history_box.setLayout(vbox(self.history))

        self.result_title = QLabel("Apply an edit to see its effect here.")
        self.result_title.setObjectName("heading")
        self.result_title.setWordWrap(True)
        self.result_summary = hint("")
        self.table = TableView(["group", "fact", "prompt", "answer", "p before", "p after", "\u0394p", "top-1 before",
                                "top-1 after", "flip"])
        self.export_button = button("Export table\u2026", lambda: self.table.export_csv_dialog(self, "edit.csv"))
        result_box = QGroupBox("Before / after (the fact's prompts, then controls)")
        title_row = hbox(self.result_title, self.export_button)
        title_row.setStretch(0, 1)
        result_box.setLayout(vbox(title_row, self.result_summary, self.table))

        split = QSplitter(Qt.Horizontal)
        left = QWidget()
        left.setLayout(vbox(controls, history_box, margins=(0, 0, 0, 0)))
        split.addWidget(left)
        split.addWidget(result_box)
        split.setStretchFactor(0, 1)
        split.setStretchFactor(1, 3)
        self.setLayout(vbox(split, margins=(4, 4, 4, 4)))
        self.refresh_targets()

    def _page_suppress(self):
        w = QWidget()
        f = QFormLayout(w)
        f.setContentsMargins(0, 0, 0, 0)
        f.addRow("Positions", self.scope)
        return w

    def _page_amplify(self):
        w = QWidget()
        f = QFormLayout(w)
        f.setContentsMargins(0, 0, 0, 0)
        self.scope_amp = QComboBox()
        self.scope_amp.addItems(["answer", "all"])
        f.addRow("Factor", self.factor)
        f.addRow("Positions", self.scope_amp)
        return w

    def _page_update(self):
        w = QWidget()
        f = QFormLayout(w)
        f.setContentsMargins(0, 0, 0, 0)
        f.addRow("New object", self.new_object)
        f.addRow("\u03bb1 (remove o)", self.lambda1)
        f.addRow("\u03bb2 (add o')", self.lambda2)
        return w

    def _page_erase(self):
        w = QWidget()
        f = QFormLayout(w)
        f.setContentsMargins(0, 0, 0, 0)
        f.addRow("Top neurons", self.erase_k)
        f.addRow("Fill", self.erase_fill)
        f.addRow(hint("Uses the relation's most frequent refined neurons over its facts' runs."))
        return w

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
        from PySide6.QtCore import QStringListModel

        self.completer.setModel(QStringListModel(objects, self.completer))

    def _apply(self):
        kind = self.kind.currentText()
        request = {"kind": kind, "target": self.target.currentData()}
        if kind == "Suppress":
            request["scope"] = self.scope.currentText()
        elif kind == "Amplify":
            request["factor"] = self.factor.value()
            request["scope"] = self.scope_amp.currentText()
        elif kind == "Update":
            request["new_object"] = self.new_object.text().strip()
            request["lambda1"] = self.lambda1.value()
            request["lambda2"] = self.lambda2.value()
        else:
            request["k"] = self.erase_k.value()
            request["fill"] = self.erase_fill.currentText()
        self.apply_requested.emit(request)

    def set_busy(self, busy: bool, has_model: bool = True):
        self.apply_button.setEnabled(has_model and not busy)
        self.history.setEnabled(not busy)

    # ----------------------------------------------------------------- the before/after table
    def show_report(self, report: dict | None):
        self.table.clear_rows()
        if not report:
            self.result_title.setText("Apply an edit to see its effect here.")
            self.result_summary.setText("")
            return
        self.result_title.setText(report["title"])
        rows = report["rows"]
        summary = []
        for group in ("fact", "same relation", "other relations"):
            g = [r for r in rows if r["group"] == group]
            if not g:
                continue
            mean_before = sum(r["before"] for r in g) / len(g)
            mean_delta = sum(r["after"] - r["before"] for r in g) / len(g)
            rel = f" ({100 * mean_delta / mean_before:+.1f}%)" if mean_before > 0 else ""
            flips = sum(r["top_before"] != r["top_after"] for r in g)
            summary.append(f"{group}: mean \u0394p {fmt_delta(mean_delta)}{rel}, {flips}/{len(g)} top-1 flips")
        if report.get("new_object"):
            nb = [r for r in rows if r["group"] == "fact" and r.get("new_before") is not None]
            if nb:
                summary.append(f"p({report['new_object']!r}): {fmt_prob(sum(r['new_before'] for r in nb) / len(nb))}"
                               f" \u2192 {fmt_prob(sum(r['new_after'] for r in nb) / len(nb))}")
        self.result_summary.setText("   |   ".join(summary))
        for r in rows:
            delta = r["after"] - r["before"]
            flip = r["top_before"] != r["top_after"]
            self.table.add_row([r["group"], r["fact"], r["prompt"], r["answer"], fmt_prob(r["before"]),
                                fmt_prob(r["after"]), fmt_delta(delta), repr(r["top_before"]),
                                repr(r["top_after"]), "\u21c4 flip" if flip else ""],
                               colors={6: UP if delta > 0 else DOWN, 9: DOWN})
        self.table.resizeColumnsToContents()
        self.table.setColumnWidth(2, min(260, self.table.columnWidth(2)))
