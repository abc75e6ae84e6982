"""Edits in the window: the Edits panel's requests (one edit, a batch over selected facts) handed to the edits and
batch controllers and their reports shown; the neuron selection kept in step across the map, the Neurons panel
and the edit's target; the neuron inspector. `EditsFlow`, an object the window owns."""

from __future__ import annotations

from PySide6.QtWidgets import QMessageBox

from kn_core.facts import Fact

from .controllers import edits as E
from .controllers.batch import BatchApplied
from .session import fact_label, neuron_name


class EditsFlow:
    def __init__(self, window):
        self.window = window
        self.session, self.runner = window.session, window.runner
        self.panel = window.edits_panel
        self.status, self.show_error = window.status, window.show_error

    # ----------------------------------------------------------------------------------------- edits
    def apply_edit(self, request: dict):
        w = self.window
        target = request.get("target")
        if target is None or target[0] == "selection":
            neurons = list(w.attribution_panel.selected)
        else:
            chosen = self.session.neuron_sets.get(target[1])
            neurons = list(map(tuple, chosen.neurons)) if chosen else []
        w.attempt(w.edits.apply, request, w.current_fact, neurons)

    def batch_edit(self, facts):
        """The Edits panel's request on each selected fact; facts without a run are named before anything runs
        (a question, or in quiet mode the status bar) and left out."""
        w = self.window
        missing = w.batch.unattributed(list(facts))
        if missing and len(missing) < len(facts):
            names = ", ".join(fact_label(f) for f in missing[:4]) + (f" and {len(missing) - 4} more"
                                                                       if len(missing) > 4 else "")
            note = (f"{len(missing)} of the {len(facts)} selected facts have no attribution run and will be "
                    f"skipped: {names}.")
            if w.quiet:
                self.status(note, 20000)
            elif QMessageBox.question(w, "Skip facts without a run?", note + " Edit the other "
                                      f"{len(facts) - len(missing)}?") != QMessageBox.Yes:
                return
        w.attempt(w.batch.apply, self.panel.current_request(), list(facts))

    def on_edits_event(self, ev):
        w = self.window
        if isinstance(ev, E.EditEvaluated):
            self.panel.show_report(ev.report)
            skipped = ev.report.get("skipped") or []
            note = f"   |   left out: {skipped[0][0]} ({skipped[0][1]})" + (
                f" and {len(skipped) - 1} more" if len(skipped) > 1 else "") if skipped else ""
            self.status(f"{ev.command.text}: {self.panel.result_summary.text()}{note}", 20000)
            w.edit_evaluated.emit(ev.report)
            w.edits_dock.raise_()
        elif isinstance(ev, E.EditFailed):
            self.show_error("Cannot apply the edit", ev.message)
        elif isinstance(ev, E.DegeneracyTested):
            self.panel.show_degeneracy(ev.result, ev.fact, ev.edits_in_force)
            w.edits_dock.raise_()

    def on_batch_event(self, ev):
        if isinstance(ev, BatchApplied):
            self.panel.show_report(ev.report)
            self.status(f"{ev.command.text}: {ev.report['batch']['applied']} facts edited as one history entry"
                        + (f", {len(ev.report['skipped'])} left out (listed in the Edits panel)"
                           if ev.report["skipped"] else ""), 20000)
            self.window.edits_dock.raise_()
        elif ev.cancelled:
            self.status(ev.message)
        else:
            self.show_error("Batch edit not applied", ev.message)

    def target_follows(self, fact: Fact):
        """The Edits panel's neurons follow the selected fact: another fact's refined or coarse set becomes this
        fact's set of the same kind (or the plot selection when this fact has none), never left on the old one;
        an empty plot selection gives way to the fact's refined set."""
        ep = self.panel
        data = ep.target.currentData()
        if data and data[0] == "selection" and not self.window.attribution_panel.selected:
            data = ("set", "refined: ")
        if not data or data[0] != "set" or not data[1].startswith(("refined: ", "coarse: ")):
            return  # a non-empty selection, a relation or user set: the user's own choice
        kind = data[1].split(": ", 1)[0]
        own = f"{kind}: {fact_label(fact)}"
        if data[1] != own:
            index = ep._find_target(("set", own))
            ep.target.setCurrentIndex(max(index, 0))

    # ----------------------------------------------------------------------------------------- neurons
    def neurons_selected(self, neurons):
        self.window.neurons_panel.set_selection(neurons)
        self.panel.refresh_targets(len(neurons))
        if neurons:
            self.panel.target.setCurrentIndex(0)

    def select_from_set(self, neurons):
        self.window.attribution_panel.set_selected(neurons)
        self.neurons_selected(list(map(tuple, neurons)))

    def inspect_neuron(self, layer: int, neuron: int):
        lm = self.session.lm
        neurons_panel = self.window.neurons_panel
        neurons_panel.show_inspection(layer, neuron, None)
        if lm is None:
            return
        from kn_core.evaluation import neuron_tokens

        def done(result):
            if neurons_panel.inspected == (layer, neuron):
                neurons_panel.show_inspection(layer, neuron, {
                    "promoted": [(row["token"], row["logit"]) for row in result["promotes"]],
                    "suppressed": [(row["token"], row["logit"]) for row in result["suppresses"]],
                    "norm": result.get("norm")})

        self.runner.submit(f"Inspecting {neuron_name(layer, neuron)}",
                           lambda task: neuron_tokens(lm, layer, neuron, top_k=12), on_done=done)
