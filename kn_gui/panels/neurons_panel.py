"""Neuron sets (coarse, refined, relation-level, user; named, listed, exportable) and the neuron inspector.

Neurons flagged massive / unspecific (kn_core.neurons.NeuronFlags, given with `set_flags`) are marked in the
set's table (a warning glyph, purple text and the rule as tooltip) and in a "flags" column of CSV exports.
The inspector reads a value vector with the sign of the neuron's activation: a neuron firing negative writes
-v, so what it promotes is what +v suppresses. The sign comes from the engine's answer when it gives one
("sign"), else from the mean activation on the shown run's prompts; the inspector says which.
"""

from __future__ import annotations


import csv

from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QBrush, QColor
from PySide6.QtWidgets import (QHeaderView, QGroupBox, QInputDialog, QLabel, QSplitter, QTabWidget, QWidget)

from ..session import NeuronSet, fact_label, neuron_name
from .common import TableView, button, hbox, hint, safe_file_name, save_file_dialog, vbox, write_json
from .neuron_map import FLAG, expert_text

FLAG_GLYPH = "\u26a0"


class NeuronsPanel(QWidget):
    select_neurons = Signal(list)  # ask the plots to select these neurons
    inspect_requested = Signal(int, int)
    sets_changed = Signal()
    sets_requested = Signal(str, dict)  # (what, the project's sets after it): the window pushes it as one undo step
    error = Signal(str, str)
    message = Signal(str)

    def __init__(self, session, parent=None):
        super().__init__(parent)
        self.session = session
        self.current_selection: list[tuple[int, int]] = []

        self.sets = TableView(["name", "kind", "neurons"])
        self.sets.setSortingEnabled(False)
        self.sets.horizontalHeader().setSectionResizeMode(0, QHeaderView.Stretch)
        self.sets.horizontalHeader().setStretchLastSection(False)
        for col in (1, 2):
            self.sets.horizontalHeader().setSectionResizeMode(col, QHeaderView.ResizeToContents)
        self.contents_header_fixed = False
        self.sets.selectionModel().currentRowChanged.connect(lambda *_: self._show_set())
        self.flags = None  # kn_core.neurons.NeuronFlags of the model, when measured
        self.contents = TableView(["layer", "neuron", "score", "activation", "flags"],
                                  formats={2: "{:.4g}".format, 3: "{:.4g}".format}, missing={3: "not stored"})
        self.contents.setMinimumHeight(130)  # about five rows
        self.contents.doubleClicked.connect(self._inspect_row)
        self.contents.setToolTip("Double-click a neuron to inspect it")

        self.save_sel_button = button("Save selection", self.save_selection,
                                      "Save the neurons selected in the plot as a user set")
        self.rename_button = button("Rename", self.rename_set)
        self.delete_button = button("Delete", self.delete_set, name="danger")
        self.use_button = button("Select in plot", self._use_set, "Select this set's neurons in the plots")
        # a lambda: clicked(bool) would pass False as the path (and the export did nothing)
        self.export_button = button("Export\u2026", lambda: self.export_set(), "Save the set as CSV or JSON")

        sets_box = QWidget()
        sets_box.setLayout(vbox(self.sets, hbox(self.save_sel_button, self.rename_button, self.delete_button, None),
                                hbox(self.use_button, self.export_button, None), self.contents,
                                margins=(0, 0, 0, 0)))

        # --- inspector
        self.inspect_title = QLabel("Click a neuron in the layer \u00d7 neuron plot to inspect it.")
        self.inspect_title.setObjectName("heading")
        self.inspect_title.setWordWrap(True)
        self.promoted = TableView(["token", "logit"], formats={1: "{:+.3f}".format})
        self.suppressed = TableView(["token", "logit"], formats={1: "{:+.3f}".format})
        self.activating = TableView(["prompt", "answer", "activation", "score"],
                                    formats={2: "{:.4g}".format, 3: "{:.4g}".format})
        tabs = QTabWidget()
        tabs.addTab(self.promoted, "Promotes")
        tabs.addTab(self.suppressed, "Suppresses")
        tabs.addTab(self.activating, "Top-activating prompts")
        tabs.setMinimumHeight(190)  # about six rows of each list
        self.inspect_tabs = tabs
        self.sign_line = hint("")
        inspector = QGroupBox("Neuron inspector")
        inspector.setLayout(vbox(self.inspect_title, self.sign_line,
                                 tabs))
        split = QSplitter(Qt.Vertical)
        split.addWidget(sets_box)
        split.addWidget(inspector)
        split.setSizes([330, 420])
        for table in (self.promoted, self.suppressed):
            table.horizontalHeader().setSectionResizeMode(QHeaderView.Stretch)
        for col in range(4):
            self.contents.horizontalHeader().setSectionResizeMode(col, QHeaderView.ResizeToContents)
        self.setLayout(vbox(split, margins=(4, 4, 4, 4)))
        self.inspected: tuple[int, int] | None = None
        self.inspected_tokens: dict | None = None  # the engine's answer for it: read again when the sets change

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
        if self.inspected is not None:  # which facts have it in their refined set changes with t, p and the runs
            self.show_inspection(*self.inspected, self.inspected_tokens)

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
            flagged = self.flags_of((l, n))
            items = self.contents.add_row([int(l), int(n), score, act, ", ".join(flagged)], data=(l, n))
            if flagged:
                tip = self._flag_tooltip(flagged)
                items[4].setText(f"{FLAG_GLYPH} {', '.join(flagged)}")
                for item in items:
                    item.setForeground(QBrush(QColor(FLAG)))
                    item.setToolTip(tip)

    def flags_of(self, neuron) -> tuple[str, ...]:
        return tuple(self.flags.of((int(neuron[0]), int(neuron[1])))) if self.flags is not None else ()

    def _flag_tooltip(self, flagged) -> str:
        rule = getattr(self.flags, "rule", None) or {}
        text = f"Flagged {', '.join(flagged)}: " + "; ".join(
            {"massive": "its activation is far beyond its layer's (a massive activation, Sun et al. 2024)",
             "unspecific": "coarse for facts of most relations, not specific to this one",
             "template": "keeps its effect with the subject swapped: the template's, not the fact's "
                         "(docs/SPECIFICITY.md)"}.get(f, f) for f in flagged)
        return text + (f"\nrule: {rule}" if rule else "") + ("\nLeft out of the coarse, refined and relation sets "
                                                           "(and of the coarse threshold's maximum) unless Keep "
                                                           "massive/unspecific neurons is checked.")

    def set_flags(self, flags):
        """Marks the neurons flagged massive / unspecific (kn_core.neurons.NeuronFlags, or None)."""
        self.flags = flags
        self._show_set()

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
        """Asks for `neuron_set` to join the project's sets (replacing one of the same name), as one undo step."""
        self._request(f"Save neuron set {neuron_set.name!r}", {**self.session.neuron_sets,
                                                               neuron_set.name: neuron_set},
                      keep=neuron_set.name if select else None)

    def _request(self, text: str, sets: dict, keep: str | None = None):
        self.sets_requested.emit(text, sets)
        self.refresh(keep=keep)
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
        sets = {k: v for k, v in self.session.neuron_sets.items() if k != s.name}
        sets[name] = NeuronSet(name, s.kind, list(s.neurons), s.source)
        self._request(f"Rename neuron set {s.name!r} to {name!r}", sets, keep=name)

    def delete_set(self):
        s = self.current_set()
        if s is None:
            return
        self._request(f"Delete neuron set {s.name!r}", {k: v for k, v in self.session.neuron_sets.items()
                                                         if k != s.name})

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
            path = save_file_dialog(self, "Export neuron set", f"{safe_file_name(s.name)}.json",
                                    "JSON (*.json);;CSV (*.csv)")
        if not path:
            return
        try:
            if path.lower().endswith(".csv"):
                self._write_set_csv(s, path)
            else:
                data = s.to_dict()
                flagged = {f"{l},{n}": list(self.flags_of((l, n))) for l, n in s.neurons if self.flags_of((l, n))}
                if flagged:
                    data["flags"] = flagged  # "layer,neuron" -> ["massive", ...]
                write_json(path, data)
        except OSError as exc:
            self.error.emit("Could not export the set", f"{exc}. Choose a folder you can write to.")
            return
        self.message.emit(f"Exported {s.name} to {path}")

    def _write_set_csv(self, s: NeuronSet, path: str):
        """layer, neuron, the shown run's mean score and activation in full, and the neuron's flags."""
        run = getattr(self, "run", None)
        mean = run.mean_scores() if run is not None and run.scores else None
        acts = run.mean_activations() if run is not None and run.scores else None
        with open(path, "w", newline="", encoding="utf-8") as handle:
            handle.write(f"# neuron set: {s.name} ({s.kind}{', from ' + s.source if s.source else ''})\n")
            if run is not None and run.scores:
                handle.write(f"# score, activation: mean over the {len(run.scores)} prompts of "
                             f"{run.fact.subject} -> {run.fact.object} ({run.fact.relation})\n")
            writer = csv.writer(handle)
            writer.writerow(["layer", "neuron", "score", "activation", "flags"])
            for l, n in s.neurons:
                inside = mean is not None and l < mean.shape[0]
                writer.writerow([l, n, repr(float(mean[l, n])) if inside else "",
                                 repr(float(acts[l, n])) if inside else "", ";".join(self.flags_of((l, n)))])

    def _inspect_row(self, index):
        data = self.contents.table.item(index.row(), 0).data(Qt.UserRole)
        if data:
            self.inspect_requested.emit(int(data[0]), int(data[1]))

    # ----------------------------------------------------------------- inspector
    def show_inspection(self, layer: int, neuron: int, tokens: dict | None):
        """`tokens`: kn_core.evaluation.neuron_tokens' answer ("promotes"/"suppresses" rows, optionally "sign" when
        the engine already read the value vector with the activation's sign) or the older adapter's
        {"promoted", "suppressed", "norm"} (read as +v)."""
        self.inspected, self.inspected_tokens = (layer, neuron), tokens
        users, looked = self.session.facts_using((layer, neuron))
        names = ", ".join(fact_label(f) for f in users[:6]) + (f" and {len(users) - 6} more" if len(users) > 6 else "")
        extra = f"  \u2014 refined for {len(users)} of {looked} attributed facts" + (f": {names}" if users else "")
        flagged = self.flags_of((layer, neuron))
        flag_text = f"  {FLAG_GLYPH} flagged {', '.join(flagged)}" if flagged else ""
        norm = f", |v| = {tokens['norm']:.3g}" if tokens and tokens.get("norm") is not None else ""
        experts = getattr(getattr(getattr(self.session, "lm", None), "layout", None), "experts", None)
        name = f"Layer {layer}, {self._expert_part(layer, neuron)}" if experts is not None else neuron_name(layer, neuron)
        self.inspect_title.setText(f"{name}{norm}{extra}{flag_text}")
        self.inspect_title.setToolTip(self._flag_tooltip(flagged) if flagged else "")
        self.promoted.clear_rows()
        self.suppressed.clear_rows()
        sign, source = self._sign(layer, neuron, tokens)
        promoted, suppressed = _token_lists(tokens)
        if tokens is not None and tokens.get("sign") is None and sign < 0:
            # the neuron fires negative: it writes -v, so it promotes what +v suppresses (logits negated)
            promoted, suppressed = ([(t, -v) for t, v in suppressed], [(t, -v) for t, v in promoted])
        for table, rows in ((self.promoted, promoted), (self.suppressed, suppressed)):
            for tok, v in rows:
                table.add_row([repr(tok), float(v)])
        vector = "\u2212v" if sign < 0 else "+v"
        self.inspect_tabs.setTabText(0, f"Promotes ({vector})")
        self.inspect_tabs.setTabText(1, f"Suppresses ({vector})")
        labels = (tokens or {}).get("labels") or {}
        self.inspect_tabs.setTabToolTip(0, labels.get("promotes", f"what {vector} writes toward"))
        self.inspect_tabs.setTabToolTip(1, labels.get("suppresses", f"what {vector} writes away from"))
        self.sign_line.setText(f"Sign used: {'negative' if sign < 0 else 'positive'} ({source}). The lists rank "
                               f"the tokens that {vector} writes toward and away from through the vocabulary head; "
                               "the prompts are ranked by the activation in that direction.")
        self.activating.clear_rows()
        rows = self.session.top_activating(layer, neuron, k=10 ** 9)
        rows.sort(key=lambda r: -sign * r[2])
        for prompt, answer, act, score in rows[:10]:
            self.activating.add_row([prompt, answer, act, score])
        self.activating.setColumnWidth(0, 240)
        self.inspect_tabs.setTabText(2, "Top-activating prompts" if sign > 0 else "Most negative activations")

    def _expert_part(self, layer: int, neuron: int) -> str:
        """"neuron i", or in an MoE model "expert e, neuron i (index n); k/n of the fact's prompts route to it"."""
        lm = getattr(self.session, "lm", None)
        experts = getattr(getattr(lm, "layout", None), "experts", None)
        run = getattr(self, "run", None)
        acts = [s.activations for s in run.scores] if run is not None and run.scores else []
        text = expert_text(experts, layer, neuron, acts)
        return text or f"neuron {neuron}"

    def _sign(self, layer: int, neuron: int, tokens: dict | None) -> tuple[int, str]:
        """(+1 or -1, where it came from)."""
        if tokens is not None and tokens.get("sign") is not None:
            sign = -1 if tokens["sign"] < 0 else 1
            return sign, tokens.get("sign_source") or "the engine's: its mean activation on the fact's prompts"
        run = getattr(self, "run", None)
        acts = run.mean_activations() if run is not None and run.scores else None
        if acts is not None and layer < acts.shape[0] and neuron < acts.shape[1]:
            mean = float(acts[layer, neuron])
            return (-1 if mean < 0 else 1), (f"mean activation {mean:+.3g} on the {len(run.scores)} prompts of "
                                             f"{run.fact.subject} \u2192 {run.fact.object}")
        return 1, "no run of a fact to take it from: read as if the activation were positive"


def _token_lists(tokens: dict | None) -> tuple[list, list]:
    """(promoted, suppressed) as [(token, logit)] from either answer shape."""
    if not tokens:
        return [], []

    def pairs(rows):
        return [(r["token"], r["logit"]) if isinstance(r, dict) else (r[0], r[1]) for r in rows or []]

    return (pairs(tokens.get("promotes", tokens.get("promoted"))),
            pairs(tokens.get("suppresses", tokens.get("suppressed"))))
