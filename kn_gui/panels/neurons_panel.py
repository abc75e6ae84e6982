"""Neuron sets (coarse, refined, relation-level, user; named, listed, exportable) and the neuron inspector."""

from __future__ import annotations

import json

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (QFileDialog, QHeaderView, QGroupBox, QInputDialog, QLabel, QSplitter, QTabWidget, QWidget)

from ..session import NeuronSet
from .common import TableView, button, hbox, hint, vbox


class NeuronsPanel(QWidget):
    select_neurons = Signal(list)  # ask the plots to select these neurons
    inspect_requested = Signal(int, int)
    sets_changed = Signal()
    error = Signal(str, str)
    message = Signal(str)

    def __init__(self, session, parent=None):
        super().__init__(parent)
        self.session = session
        self.current_selection: list[tuple[int, int]] = []

        self.sets = TableView(["name", "kind", "neurons"])
        self.sets.setSortingEnabled(False)
        from PySide6.QtWidgets import QHeaderView
        self.sets.horizontalHeader().setSectionResizeMode(0, QHeaderView.Stretch)
        self.sets.horizontalHeader().setStretchLastSection(False)
        for col in (1, 2):
            self.sets.horizontalHeader().setSectionResizeMode(col, QHeaderView.ResizeToContents)
        self.contents_header_fixed = False
        self.sets.selectionModel().currentRowChanged.connect(lambda *_: self._show_set())
        self.contents = TableView(["layer", "neuron", "score", "activation"])
        self.contents.doubleClicked.connect(self._inspect_row)
        self.contents.setToolTip("Double-click a neuron to inspect it")

        self.save_sel_button = button("Save selection", self.save_selection,
                                      "Save the neurons selected in the plot as a user set")
        self.rename_button = button("Rename", self.rename_set)
        self.delete_button = button("Delete", self.delete_set, name="danger")
        self.use_button = button("Select in plot", self._use_set, "Select this set's neurons in the plots")
        self.export_button = button("Export\u2026", self.export_set, "Save the set as CSV or JSON")

        sets_box = QWidget()
        sets_box.setLayout(vbox(self.sets, hbox(self.save_sel_button, self.rename_button, self.delete_button, None),
                                hbox(self.use_button, self.export_button, None), self.contents,
                                margins=(0, 0, 0, 0)))

        # --- inspector
        self.inspect_title = QLabel("Click a neuron in the layer \u00d7 neuron plot to inspect it.")
        self.inspect_title.setObjectName("heading")
        self.inspect_title.setWordWrap(True)
        self.promoted = TableView(["token", "logit"])
        self.suppressed = TableView(["token", "logit"])
        self.activating = TableView(["prompt", "answer", "activation", "score"])
        tabs = QTabWidget()
        tabs.addTab(self.promoted, "Promotes")
        tabs.addTab(self.suppressed, "Suppresses")
        tabs.addTab(self.activating, "Top-activating prompts")
        self.inspect_tabs = tabs
        inspector = QGroupBox("Neuron inspector")
        inspector.setLayout(vbox(self.inspect_title,
                                 hint("Tokens its value vector writes toward (promotes) and away from "
                                      "(suppresses) through the vocabulary head; prompts of this project ranked "
                                      "by its activation."),
                                 tabs))
        split = QSplitter(Qt.Vertical)
        split.addWidget(sets_box)
        split.addWidget(inspector)
        split.setSizes([330, 420])
        for table in (self.contents, self.promoted, self.suppressed):
            table.horizontalHeader().setSectionResizeMode(QHeaderView.Stretch)
        self.setLayout(vbox(split, margins=(4, 4, 4, 4)))
        self.inspected: tuple[int, int] | None = None

    # ----------------------------------------------------------------- sets
    def refresh(self, keep: str | None = None):
        keep = keep or self.current_set_name()
        self.sets.clear_rows()
        for s in self.session.neuron_sets.values():
            items = self.sets.add_row([s.name, s.kind, len(s.neurons)], data=s.name)
            items[0].setToolTip(f"{s.name}\n{s.kind} set from {s.source}" if s.source else s.name)
        if keep is not None:
            self.select_set(keep)
        elif self.sets.table.rowCount():
            refined = [r for r in range(self.sets.table.rowCount())
                       if self.sets.table.item(r, 1).text() == "refined"]
            self.sets.selectRow(refined[-1] if refined else 0)
        self._show_set()

    def current_set_name(self) -> str | None:
        index = self.sets.currentIndex()
        if not index.isValid():
            return None
        return self.sets.table.item(index.row(), 0).data(Qt.UserRole)

    def select_set(self, name: str):
        for r in range(self.sets.table.rowCount()):
            if self.sets.table.item(r, 0).data(Qt.UserRole) == name:
                self.sets.selectRow(r)
                return

    def current_set(self) -> NeuronSet | None:
        name = self.current_set_name()
        return self.session.neuron_sets.get(name) if name else None

    def _show_set(self):
        self.contents.clear_rows()
        s = self.current_set()
        if s is None:
            return
        run = getattr(self, "run", None)
        mean = run.mean_scores() if run is not None and run.scores else None
        acts = run.mean_activations() if run is not None and run.scores else None
        for l, n in s.neurons:
            score = float(mean[l, n]) if mean is not None and l < mean.shape[0] else None
            act = float(acts[l, n]) if acts is not None and l < acts.shape[0] else None
            self.contents.add_row([int(l), int(n), "" if score is None else f"{score:.4g}",
                                   "" if act is None else f"{act:.4g}"], data=(l, n))

    def set_run(self, run):
        self.run = run
        self._show_set()

    def set_selection(self, neurons):
        self.current_selection = list(neurons)

    def save_selection(self):
        if not self.current_selection:
            self.error.emit("No neurons selected", "Click neurons in the layer \u00d7 neuron plot (Ctrl-click adds) "
                            "first, then save them as a set.")
            return
        name, ok = QInputDialog.getText(self, "Save neuron set", "Name:",
                                        text=self.session.unique_set_name("my neurons"))
        if not ok or not name.strip():
            return
        self.add_set(NeuronSet(name.strip(), "user", list(self.current_selection), "selection"))

    def add_set(self, neuron_set: NeuronSet, select: bool = True):
        self.session.put_set(neuron_set)
        self.session.results_dirty = True
        self.refresh(keep=neuron_set.name if select else None)
        self.sets_changed.emit()

    def rename_set(self):
        s = self.current_set()
        if s is None:
            return
        name, ok = QInputDialog.getText(self, "Rename neuron set", "Name:", text=s.name)
        name = name.strip()
        if not ok or not name or name == s.name:
            return
        if name in self.session.neuron_sets:
            self.error.emit("Name taken", f"A set named {name!r} exists already; choose another name.")
            return
        del self.session.neuron_sets[s.name]
        s.name = name
        self.add_set(s)

    def delete_set(self):
        s = self.current_set()
        if s is None:
            return
        del self.session.neuron_sets[s.name]
        self.session.results_dirty = True
        self.refresh()
        self.sets_changed.emit()

    def _use_set(self):
        s = self.current_set()
        if s is not None:
            self.select_neurons.emit(list(s.neurons))

    def export_set(self, path: str | None = None):
        s = self.current_set()
        if s is None:
            self.error.emit("No set selected", "Select a neuron set in the list first.")
            return
        if path is None:
            path, _ = QFileDialog.getSaveFileName(self, "Export neuron set", f"{s.name}.json",
                                                  "JSON (*.json);;CSV (*.csv)")
        if not path:
            return
        try:
            if path.lower().endswith(".csv"):
                with open(path, "w", encoding="utf-8") as handle:
                    handle.write("layer,neuron\n")
                    handle.writelines(f"{l},{n}\n" for l, n in s.neurons)
            else:
                with open(path, "w", encoding="utf-8") as handle:
                    json.dump(s.to_dict(), handle, indent=2)
        except OSError as exc:
            self.error.emit("Could not export the set", f"{exc}. Choose a folder you can write to.")
            return
        self.message.emit(f"Exported {s.name} to {path}")

    def _inspect_row(self, index):
        data = self.contents.table.item(index.row(), 0).data(Qt.UserRole)
        if data:
            self.inspect_requested.emit(int(data[0]), int(data[1]))

    # ----------------------------------------------------------------- inspector
    def show_inspection(self, layer: int, neuron: int, tokens: dict | None):
        self.inspected = (layer, neuron)
        sets = [s.name for s in self.session.neuron_sets.values() if (layer, neuron) in map(tuple, s.neurons)]
        extra = f"  \u2014 in {', '.join(sets)}" if sets else ""
        norm = f", |v| = {tokens['norm']:.3g}" if tokens and "norm" in tokens else ""
        self.inspect_title.setText(f"Layer {layer}, neuron {neuron}{norm}{extra}")
        self.promoted.clear_rows()
        self.suppressed.clear_rows()
        if tokens:
            for tok, v in tokens["promoted"]:
                self.promoted.add_row([repr(tok), f"{v:.3f}"])
            for tok, v in tokens["suppressed"]:
                self.suppressed.add_row([repr(tok), f"{v:.3f}"])
        self.activating.clear_rows()
        for prompt, answer, act, score in self.session.top_activating(layer, neuron):
            self.activating.add_row([prompt, answer, f"{act:.4g}", f"{score:.4g}"])
        self.activating.setColumnWidth(0, 240)
