"""The runs browser (Run → Runs…, Ctrl+R): every run of the fact or of the project (complete, partial, on edited
weights, earlier ones a re-run replaced) with its parameters (steps, quadrature, templates, model, weight hash,
date); open one as its fact's run, rename, delete (undoable, in the project's history); compare two: their
refined sets side by side with the overlap (Jaccard index) and, when both have the model's shape, the map of the
difference of their mean scores."""

from __future__ import annotations

import time

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import QItemSelectionModel, Qt, Signal
from PySide6.QtWidgets import QComboBox, QDialog, QInputDialog, QLabel, QSplitter, QWidget

from ..session import Run, Session, TooCoarse, fact_key, fact_label, neuron_name
from .common import TableView, button, hbox, hint, vbox
from .neuron_map import NeuronMap

HEADERS = ["fact", "name", "state", "prompts", "refined", "steps", "quadrature", "templates", "model", "weights",
           "edits", "started"]


def run_row(session: Session, run: Run) -> list:
    p = run.params
    try:
        refined = len(session.refined(run, _exclusions(session, run)[0])) if run.scores else 0
    except TooCoarse:
        refined = "not decided"
    current = session.runs.get(fact_key(run.fact)) is run
    return [fact_label(run.fact), run.name, run.state + (" (the fact's run)" if current else ""),
            f"{len(run.scores)}/{len(run.prompts)}", refined, p.get("steps", ""), p.get("quadrature", "riemann"),
            p.get("causal_templates") or "masked", run.model.get("name") or run.model.get("source", ""),
            (run.model.get("sha256") or "")[:12], len(run.edits) or "",
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(run.started)) if run.started else ""]


def _shape(run: Run) -> tuple[int, int] | None:
    return tuple(run.scores[0].scores.shape) if run.scores and run.compact is None else (
        tuple(run.compact[0].shape) if run.compact else None)


def _exclusions(session: Session, run: Run) -> tuple[frozenset, str]:
    """The loaded model's flagged neurons leave its own runs' sets (as in the map); a run of another model (other
    weights, or another shape when the run recorded no hash) keeps every neuron: the flags do not describe it."""
    lm = session.lm
    if lm is None:
        return session.excluded(), ""
    sha = run.model.get("sha256")
    own = sha == lm.sha256 if sha else _shape(run) in (None, (lm.layout.layers, lm.layout.neurons))
    if own:
        return session.excluded(), ""
    return frozenset(), (f"{fact_label(run.fact)} [{run.name or run.state}] is a run of another model "
                         f"({run.model.get('name') or run.model.get('source') or 'unnamed'}): the loaded model's "
                         "flagged neurons are not left out of it")


def compare_runs(session: Session, a: Run, b: Run) -> dict:
    """Refined sets of two runs at the session's t and p (the loaded model's flagged neurons excluded from its own
    runs, as in the map), their overlap and Jaccard index |A ∩ B| / |A ∪ B| (None when both are empty), and the
    difference of their mean scores (None, with the reason, when the runs' models differ in shape: then the sets
    are compared by neuron name only, and "notes" says so)."""
    exclusions = [_exclusions(session, run) for run in (a, b)]
    sets = [set(session.refined(run, exclude)) for run, (exclude, _) in zip((a, b), exclusions)]
    notes = [note for _, note in exclusions if note]
    union = sets[0] | sets[1]
    both = sets[0] & sets[1]
    mean_a, mean_b = a.mean_scores(), b.mean_scores()
    difference, why = None, ""
    if mean_a is None or mean_b is None:
        why = "a run has no finished prompt"
    elif mean_a.shape != mean_b.shape:
        why = f"the models differ in shape ({mean_a.shape[0]}x{mean_a.shape[1]} vs {mean_b.shape[0]}x{mean_b.shape[1]})"
        notes.append("The runs come from models of different shapes: the overlap below matches neurons by name "
                     "(layer, index) only, and the same name in two models is not the same neuron")
    else:
        difference = np.nan_to_num(mean_a) - np.nan_to_num(mean_b)
    return {"a": sorted(sets[0]), "b": sorted(sets[1]), "both": sorted(both), "only_a": sorted(sets[0] - sets[1]),
            "only_b": sorted(sets[1] - sets[0]), "jaccard": len(both) / len(union) if union else None,
            "difference": difference, "difference_note": why, "notes": notes}


def _names(neurons, limit: int = 12) -> str:
    shown = ", ".join(neuron_name(*n) for n in neurons[:limit])
    return (shown + (f" and {len(neurons) - limit} more" if len(neurons) > limit else "")) if neurons else "none"


class RunsDialog(QDialog):
    open_requested = Signal(object)  # the Run to make its fact's run
    rename_requested = Signal(object, str)
    delete_requested = Signal(object)

    def __init__(self, session: Session, fact=None, parent=None):
        super().__init__(parent)
        self.setWindowTitle("Runs")
        self.session, self.fact = session, fact
        self.scope = QComboBox()
        self.scope.addItem("this fact's runs", "fact")
        self.scope.addItem("every run of the project", "project")
        self.scope.setCurrentIndex(0 if fact is not None else 1)
        self.scope.setEnabled(fact is not None)
        self.scope.currentIndexChanged.connect(lambda _: self.refresh())
        self.table = TableView(HEADERS)
        self.table.setSelectionMode(TableView.ExtendedSelection)
        self.table.selectionModel().selectionChanged.connect(lambda *_: self._update_buttons())
        self.table.doubleClicked.connect(lambda _: self._open())
        self.open_button = button("Open", self._open, "Make the selected run its fact's run (plots, sets, edits)")
        self.rename_button = button("Rename\u2026", self._rename)
        self.delete_button = button("Delete", self._delete, "Delete the run (Ctrl+Z undoes it)", name="danger")
        self.compare_button = button("Compare", self._compare, "Select two runs: refined sets side by side, their "
                                     "overlap and the map of their difference")
        self.summary = QLabel("Select two runs and press Compare.")
        self.summary.setWordWrap(True)
        self.summary.setTextInteractionFlags(Qt.TextSelectableByMouse)
        self.difference = NeuronMap(pg.colormap.get("CET-D1"))
        self.difference.plot.setTitle("mean score of the first run \u2212 the second:  \u25cb refined in both,  "
                                      "\u25a0 refined in one only")
        comparison = QWidget()
        comparison.setLayout(vbox(self.summary, self.difference, margins=(0, 0, 0, 0)))
        split = QSplitter(Qt.Vertical)
        split.addWidget(self.table)
        split.addWidget(comparison)
        t_and_p = hint("refined at the window's t and p")
        t_and_p.setWordWrap(False)  # wrapped, the stretch beside it squeezed it to two cut lines
        self.setLayout(vbox(hbox(self.scope, None, t_and_p), split,
                            hbox(self.open_button, self.rename_button, self.delete_button, None,
                                 self.compare_button)))
        self.resize(1100, 640)
        self.refresh()

    def runs(self) -> list[Run]:
        runs = self.session.all_runs()
        if self.scope.currentData() == "fact" and self.fact is not None:
            runs = [r for r in runs if r.fact == self.fact]
        return runs

    def refresh(self):
        self.shown = self.runs()
        self.table.setSortingEnabled(False)
        self.table.clear_rows()
        for i, run in enumerate(self.shown):
            self.table.add_row(run_row(self.session, run), data=i)
        self.table.resizeColumnsToContents()
        self._update_buttons()

    def selected(self) -> list[Run]:
        rows = sorted({index.row() for index in self.table.selectionModel().selectedRows()})
        return [self.shown[self.table.table.item(r, 0).data(Qt.UserRole)] for r in rows]

    def select_runs(self, runs: list[Run]):
        """Selects these runs in the table (tests and the window use it)."""
        self.table.clearSelection()
        for r in range(self.table.table.rowCount()):
            if any(self.shown[self.table.table.item(r, 0).data(Qt.UserRole)] is run for run in runs):
                self.table.selectionModel().select(self.table.table.index(r, 0),
                                                   QItemSelectionModel.Select | QItemSelectionModel.Rows)

    def _update_buttons(self):
        n = len(self.selected())
        for b in (self.open_button, self.rename_button, self.delete_button):
            b.setEnabled(n == 1)
        self.compare_button.setEnabled(n == 2)

    def _for_the_selected_run(self, signal):
        chosen = self.selected()
        if len(chosen) == 1:
            signal.emit(chosen[0])
            self.refresh()

    def _open(self):
        self._for_the_selected_run(self.open_requested)

    def _rename(self):
        chosen = self.selected()
        if len(chosen) != 1:
            return
        name, ok = QInputDialog.getText(self, "Rename run", "Name:", text=chosen[0].name)
        if ok:
            self.rename_requested.emit(chosen[0], name.strip())
            self.refresh()

    def _delete(self):
        self._for_the_selected_run(self.delete_requested)

    def _compare(self):
        chosen = self.selected()
        if len(chosen) != 2:
            return
        a, b = chosen
        try:
            result = compare_runs(self.session, a, b)
        except TooCoarse as exc:
            self.summary.setText(f"Cannot compare at this t: {exc}")
            return
        self.result = result
        label = lambda run: f"{fact_label(run.fact)} [{run.name or run.state}, {run.params.get('steps', '?')} steps]"
        jaccard = "n/a (both empty)" if result["jaccard"] is None else f"{result['jaccard']:.2f}"
        self.summary.setText(
            f"First: {label(a)}: {len(result['a'])} refined. Second: {label(b)}: {len(result['b'])} refined.\n"
            f"Overlap {len(result['both'])} (Jaccard {jaccard}): {_names(result['both'])}.\n"
            f"Only the first: {_names(result['only_a'])}.   Only the second: {_names(result['only_b'])}."
            + (f"\nNo difference map: {result['difference_note']}." if result["difference"] is None else "")
            + "".join(f"\n{note}." for note in result["notes"]))
        diff = result["difference"]
        if diff is not None:
            bound = float(np.max(np.abs(diff))) or 1.0
            self.difference.set_scores(diff, bound, fit=True)
            self.difference.set_marks(refined=result["both"], selected=result["only_a"] + result["only_b"])
        else:
            self.difference.set_scores(None)
