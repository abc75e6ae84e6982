"""The degeneracy test's table (kn_core.degeneracy) in the Edits panel: the fact's knowledge neurons suppressed
one at a time, in pairs and all together, each row with the answer's probability, its ratio to the unedited one,
the share of prompts on which it stays top-1 and the verdict; then the same rows for the random control.

The panel only asks (`run_requested` with the parameters) and shows (`show_result`); the controller runs the
test on the worker, where the app's Cancel stops it."""

from __future__ import annotations

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import QComboBox, QDoubleSpinBox, QFrame, QLabel, QScrollArea, QSpinBox, QWidget

from ..session import neuron_name
from .common import TableView, button, hbox, hint, vbox

REDUNDANT, REMOVES = "#1e8449", "#c0392b"
HEADERS = ["neurons", "suppressed", "size", "p after", "\u00d7 p", "top-1 kept", "verdict"]


def _names(neurons) -> str:
    return " + ".join(neuron_name(l, i) for l, i in neurons)


class DegeneracyTable(QWidget):
    run_requested = Signal(dict)  # {"criterion", "removed_below", "max_neurons"}

    def __init__(self, parent=None):
        super().__init__(parent)
        self.criterion = QComboBox()
        self.criterion.addItem("top-1 lost", "top1")
        self.criterion.addItem("probability falls", "prob")
        self.criterion.setToolTip("When a suppression removes the fact. top-1 lost: the answer is no longer top-1 on "
                                  "more than half of the prompts the model gets right. probability falls: its mean "
                                  "probability falls below the fraction given of the unedited one.")
        self.removed_below = QDoubleSpinBox()
        self.removed_below.setRange(0.01, 1.0)
        self.removed_below.setSingleStep(0.05)
        self.removed_below.setValue(0.5)
        self.removed_below.setPrefix("below \u00d7")
        self.removed_below.setToolTip("probability falls: removed below this fraction of the unedited probability")
        self.criterion.currentIndexChanged.connect(
            lambda _: self.removed_below.setEnabled(self.criterion.currentData() == "prob"))
        self.removed_below.setEnabled(False)
        self.max_neurons = QSpinBox()
        self.max_neurons.setRange(2, 60)
        self.max_neurons.setValue(20)
        self.max_neurons.setPrefix("pairs among ")
        self.max_neurons.setToolTip("Pairs are tested among at most this many strongest neurons (20 \u2192 190 "
                                    "pairs); the others are tested alone and in 'all', and listed")
        self.run_button = button("Test degeneracy", self._run,
                                 "Suppress each chosen neuron, each pair and all on the fact's prompts, beside as many "
                                 "random neurons from the same layers (Chen et al., AAAI 2024)", name="primary")
        self.title = QLabel("Choose a fact and its neurons, then Test degeneracy.")
        self.title.setObjectName("heading")
        self.title.setWordWrap(True)
        self.summary = hint("")
        self.notes = hint("")
        self.table = TableView(HEADERS, formats={5: lambda rate: f"{100 * rate:.0f}%"})
        self.export_button = button("Export table\u2026",
                                    lambda: self.table.export_csv_dialog(self, "degeneracy.csv"))
        options = hbox(self.criterion, self.removed_below, self.max_neurons, self.run_button, None,
                       self.export_button)
        self.table.setMinimumHeight(150)  # about five rows
        # the result scrolls inside the tab: a long summary never grows the Edits panel (which pushed the edit form
        # out of view until Reset layout)
        result = QWidget()
        result.setLayout(vbox(self.title, self.summary, self.table, self.notes, margins=(0, 0, 0, 0)))
        scroll = QScrollArea()
        scroll.setFrameShape(QFrame.NoFrame)
        scroll.setWidgetResizable(True)
        scroll.setWidget(result)
        self.setLayout(vbox(options, scroll))

    def _run(self):
        self.run_requested.emit({"criterion": self.criterion.currentData(),
                                 "removed_below": self.removed_below.value(),
                                 "max_neurons": self.max_neurons.value()})

    def set_busy(self, busy: bool, has_model: bool = True):
        self.run_button.setEnabled(has_model and not busy)

    def show_result(self, result: dict, fact: str, edits_in_force: int = 0):
        """Rows of the knowledge neurons, then of the random control; the verdicts and what was left out."""
        from kn_core.degeneracy import summary_line

        self.table.clear_rows()
        self.table.setSortingEnabled(False)  # rows in reading order: singles, pairs, all
        n = len(result["neurons"])
        on = f" on the model with {edits_in_force} edit(s) in force" if edits_in_force else ""
        self.title.setText(f"Degeneracy of {fact}: {n} neurons, {result['prompts']} prompts "
                           f"({result['known_prompts']} answered top-1 before){on}")
        redundant = ", ".join(_names(p) for p in result["redundant_pairs"])
        self.summary.setText(f"{summary_line(result)}." + (f" Redundant pairs: {redundant}." if redundant else "")
                             + f" {result['params']['definition'].capitalize()}; \u00d7 p is the ratio to the "
                             f"unedited mean probability {result['unedited']['mean_prob']:.3g}.")
        self.table.context = [f"degeneracy of {fact}", result["params"]["definition"]]
        self._rows("knowledge", result)
        if "control" in result:
            self._rows("random", result["control"])
        notes = [f"{x['what']}: {x['reason']}" for x in result["left_out"]]
        if not result["applicable"]:
            notes.insert(0, f"Not applicable: {result['reason']}.")
        self.notes.setText("Left out: " + "; ".join(notes) if notes and result["applicable"] else " ".join(notes))

    def _rows(self, label: str, r: dict):
        for kind, rows in (("one", r["singles"]), ("pair", r["pairs"]), ("all", [r["all"]])):
            for row in rows:
                verdict = ("redundant" if row.get("redundant") else "removes" if row["removes"] else "leaves")
                color = {"redundant": REDUNDANT, "removes": REMOVES}.get(verdict)
                names = ("all: " if kind == "all" else "") + _names(row["neurons"])
                self.table.add_row([label, names, len(row["neurons"]),
                                    row["mean_prob"], row["prob_ratio"]["text"], row["top1_rate"], verdict],
                                   colors={6: color} if color else None,
                                   tooltips={6: {"redundant": "either neuron alone keeps the fact; both "
                                                              "suppressed remove it",
                                                 "removes": "suppressing this removes the fact",
                                                 "leaves": "the fact survives this suppression"}[verdict]})
        self.table.resizeColumnsToContents()
        self.table.horizontalHeader().setStretchLastSection(True)
        self.table.setColumnWidth(1, min(self.table.columnWidth(1), 320))
        self.table.horizontalHeader().setDefaultAlignment(Qt.AlignLeft)
