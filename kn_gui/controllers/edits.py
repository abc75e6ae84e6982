"""Knowledge edits and the two undo histories.

Model edits and fact-set changes live in separate QUndoStacks, so a change to the facts never truncates the
model edits' redo list; Undo/Redo take whichever of the two changed last (`History`). An edit's evaluation
report travels with its history entry and is saved with it.
"""

from __future__ import annotations

from dataclasses import dataclass

from PySide6.QtCore import QObject, Signal
from PySide6.QtGui import QUndoStack

from kn_core.facts import Fact

from ..commands import EditCommand, FactSetCommand
from ..session import Session, fact_label
from ..worker import JobRunner
from . import UserError

CONTROLS_SAME, CONTROLS_OTHER = 4, 4


@dataclass(frozen=True)
class EditEvaluated:
    command: EditCommand
    report: dict


@dataclass(frozen=True)
class EditFailed:
    message: str


@dataclass(frozen=True)
class HistoryRestored:
    applied: int
    total: int


class History:
    """Two undo stacks with one undo order: each command gets a sequence number when pushed; Undo takes the
    stack whose next undo is newest, Redo the one whose next redo is oldest. Works whatever moved a stack's
    index (the History view moves the edits stack directly)."""

    def __init__(self, parent=None):
        self.edits = QUndoStack(parent)
        self.facts = QUndoStack(parent)
        self._seq = 0

    def push(self, stack: QUndoStack, command):
        self._seq += 1
        command.seq = self._seq
        stack.push(command)

    def next_undo(self) -> QUndoStack | None:
        candidates = [(s.command(s.index() - 1).seq, s) for s in (self.edits, self.facts) if s.canUndo()]
        return max(candidates, key=lambda c: c[0])[1] if candidates else None

    def next_redo(self) -> QUndoStack | None:
        candidates = [(s.command(s.index()).seq, s) for s in (self.edits, self.facts) if s.canRedo()]
        return min(candidates, key=lambda c: c[0])[1] if candidates else None

    def is_clean(self) -> bool:
        return self.edits.isClean() and self.facts.isClean()

    def set_clean(self):
        self.edits.setClean()
        self.facts.setClean()

    def clear(self):
        self.edits.clear()
        self.facts.clear()


class EditsController(QObject):
    event = Signal(object)

    def __init__(self, session: Session, runner: JobRunner, history: History, parent=None):
        super().__init__(parent)
        self.session = session
        self.runner = runner
        self.history = history
        self.edit_stack = None  # kn_core.edits.EditStack of the loaded model
        self.pending = None  # (state, sha256) of an opened project's edits, waiting for their model

    # ----------------------------------------------------------------------------------------- model
    def set_model(self, lm) -> bool:
        """A new model: a fresh EditStack; the old model's edits leave the history. True if there were any."""
        from kn_core.edits import EditStack

        had = self.edit_stack is not None and self.history.edits.count() > 0
        if self.edit_stack is not None:
            self.edit_stack.clear()
            self.history.edits.clear()
        self.edit_stack = EditStack(lm)
        return had

    def active_descriptions(self) -> list[str]:
        return [e.describe() for e in self.edit_stack.active_edits()] if self.edit_stack is not None else []

    def commands(self) -> list[EditCommand]:
        stack = self.history.edits
        return [stack.command(i) for i in range(stack.count())]

    def push_factset(self, text: str, factset):
        self.history.push(self.history.facts, FactSetCommand(self.session, factset, text))

    # ----------------------------------------------------------------------------------------- building
    def _neurons_in_model(self, edit):
        layout = self.session.lm.layout
        bad = [n for n in edit.neurons if not (0 <= n[0] < layout.layers and 0 <= n[1] < layout.neurons)]
        if bad:
            raise ValueError(f"neuron {bad[0]} is outside this model ({layout.layers} layers \u00d7 "
                             f"{layout.neurons} neurons); the set was made on another model")

    def build(self, request: dict, fact: Fact | None, neurons: list):
        """(edit, title, evaluated facts) for an edit request; ValueError names what to change."""
        from kn_core import edits as E

        s, lm, kind = self.session, self.session.lm, request["kind"]
        if kind == "Erase relation":
            if fact is None:
                raise ValueError("pick a fact of the relation to erase in the Facts panel")
            runs = s.relation_runs(fact.relation)
            if not runs:
                raise ValueError(f"run attribution on some facts of {fact.relation} first: erase uses the "
                                 "relation's most frequent refined neurons")
            edit = E.make_erase(lm, [s.refined(r) for r in runs], k=request["k"], fill=request["fill"])
            if not edit.neurons:
                raise ValueError(f"the runs of {fact.relation} have no refined neurons at t = {s.t:.2f}, p = "
                                 f"{s.p:.2f}; lower t or p")
            self._neurons_in_model(edit)
            return edit, f"Erase {fact.relation}: {len(edit.neurons)} neurons", s.factset.facts_of(fact.relation)[:3]
        if not neurons:
            raise ValueError("no neurons to edit: click neurons in the layer \u00d7 neuron plot or choose a neuron "
                             "set (e.g. the refined set of a fact)")
        if fact is None:
            raise ValueError("pick the fact to evaluate the edit on in the Facts panel")
        if kind == "Suppress":
            edit = E.Suppress(tuple(neurons), scope=request["scope"])
        elif kind == "Amplify":
            edit = E.Amplify(tuple(neurons), factor=request["factor"], scope=request["scope"])
        else:
            new_object = request["new_object"]
            if not new_object:
                raise ValueError("type the new object o' (the relation's objects are suggested)")
            if new_object == fact.object:
                raise ValueError(f"the new object equals the current one ({fact.object})")
            old_prompts = s.prompts_for(fact)[0]
            new_prompts = s.prompts_for(Fact(fact.relation, fact.subject, new_object))[0]
            if not old_prompts or not new_prompts:
                raise ValueError(f"cannot render prompts for {new_object!r} with this model's tokenizer")
            self._neurons_in_model(E.Suppress(tuple(neurons)))
            # the paper leaves out neurons shared with > 10% of the relation's facts: the *other* facts
            sets = [s.refined(r) for r in s.relation_runs(fact.relation) if r.fact != fact]
            edit = E.make_update(lm, neurons, old_prompts[0].answer_ids, new_prompts[0].answer_ids,
                                 relation_neuron_sets=sets, lambda1=request["lambda1"], lambda2=request["lambda2"])
            if not edit.neurons:
                raise ValueError("every chosen neuron is shared by > 10% of the relation's facts, so the update "
                                 "leaves them out; choose other neurons")
        self._neurons_in_model(edit)
        return edit, f"{edit.describe()} \u2014 evaluated on {fact_label(fact)}", [fact]

    def evaluation_prompts(self, facts_main: list[Fact], relation: str):
        """The edited fact(s)' prompts, then controls: other facts of the relation and of other relations."""
        s, fs = self.session, self.session.factset
        rows = [("fact", p) for fact in facts_main for p in s.prompts_for(fact)[0]]
        for fact in [f for f in fs.facts_of(relation) if f not in facts_main][:CONTROLS_SAME]:
            rows.extend(("same relation", p) for p in s.prompts_for(fact)[0][:1])
        others = [f for rid in fs.relations if rid != relation for f in fs.facts_of(rid)[:2]]
        for fact in others[:CONTROLS_OTHER]:
            rows.extend(("other relations", p) for p in s.prompts_for(fact)[0][:1])
        return rows

    # ----------------------------------------------------------------------------------------- applying
    def apply(self, request: dict, fact: Fact | None, neurons: list):
        """Measures the evaluation prompts, applies the edit (one undoable command), measures again, and sends
        EditEvaluated with the before/after report. Raises UserError before any work when the request is bad."""
        if self.session.lm is None:
            raise UserError("No model loaded", "Load a model first: Model panel \u2192 Load model (Ctrl+L). The "
                            "embedded default works offline.")
        lm, kind = self.session.lm, request["kind"]
        try:
            edit, title, main = self.build(request, fact, neurons)
        except Exception as exc:  # noqa: BLE001 - the engine's ValueErrors name the problem
            raise UserError("Cannot apply the edit", f"{exc}.") from exc
        rows = self.evaluation_prompts(main, main[0].relation)
        if not rows:
            raise UserError("Cannot evaluate the edit", "No prompts to evaluate it on with this model.")
        new_rows = (self.session.prompts_for(Fact(fact.relation, fact.subject, request["new_object"]))[0]
                    if kind == "Update" else [])
        prompts = [p for _, p in rows]
        from kn_core.evaluation import answer_probabilities

        def measure(task):
            before = answer_probabilities(lm, prompts, cancel=task)
            return before, (answer_probabilities(lm, new_rows, cancel=task) if new_rows else [])

        def before_done(result):
            try:  # validate on the real model (the worker is idle now) before it enters the history
                edit.apply(lm).revert()
                command = EditCommand(self.edit_stack, edit, text=edit.describe())
                self.history.push(self.history.edits, command)
            except Exception as exc:  # noqa: BLE001
                self.event.emit(EditFailed(f"{exc}."))
                return
            self.runner.submit("Evaluating the edit (after)", measure,
                               on_done=lambda after: after_done(command, result, after))

        def after_done(command, before, after):
            command.report = self._report(title, edit, request, rows, before, after)
            self.event.emit(EditEvaluated(command, command.report))

        self.runner.submit("Evaluating the edit (before)", measure, on_done=before_done)

    @staticmethod
    def _report(title, edit, request, rows, before, after) -> dict:
        (before, new_before), (after, new_after) = before, after
        report_rows = [{"group": group, "fact": fact_label(p.fact), "prompt": p.text, "answer": p.answer,
                        "before": b["prob"], "after": a["prob"], "top_before": b["top1_token"],
                        "top_after": a["top1_token"]} for (group, p), b, a in zip(rows, before, after)]
        for row, b, a in zip(report_rows, new_before, new_after):
            row["new_before"], row["new_after"] = b["prob"], a["prob"]
        return {"title": title, "rows": report_rows, "edit": edit.to_dict(),
                "new_object": request.get("new_object") if request["kind"] == "Update" else None}

    def report_shown(self) -> dict | None:
        """The report of the newest edit in force (what the before/after table shows)."""
        stack = self.history.edits
        return stack.command(stack.index() - 1).report if stack.index() > 0 else None

    # ----------------------------------------------------------------------------------------- saving
    def saved_state(self) -> tuple[dict | None, dict | None]:
        """(history with each entry's report, the un-edited model it applies to) for the project file."""
        if self.edit_stack is not None and len(self.edit_stack):
            state = self.edit_stack.to_dict()
            state["entries"] = [dict(e, report=c.report) for e, c in zip(state["entries"], self.commands())]
            return state, self.session.lm.describe()
        if self.pending:
            return self.pending[0], {"sha256": self.pending[1], "source": "?"}
        return None, None

    def restore(self, state: dict, sha: str | None) -> HistoryRestored | None:
        """Re-applies an opened project's edits to the loaded model (or keeps them pending until one is loaded).
        Raises UserError when they were made on other weights or cannot be applied."""
        self.pending = (state, sha) if state and state.get("entries") else None
        lm = self.session.lm
        if self.pending is None or lm is None:
            return None
        if sha is not None and sha != lm.sha256:
            raise UserError("Saved edits not applied", "The project's edits were made on another model (weights "
                            f"sha256 {sha[:12]}\u2026, loaded {lm.sha256[:12]}\u2026). They are kept in the file; load "
                            "the model they were made on to re-apply them.")
        from kn_core.edits import edit_from_dict

        self.pending = None
        entries = state["entries"]
        try:
            for entry in entries:
                edit = edit_from_dict(entry["edit"])
                self.history.push(self.history.edits, EditCommand(self.edit_stack, edit, report=entry.get("report")))
            cursor = int(state.get("cursor", len(entries)))
            self.history.edits.setIndex(cursor)
        except Exception as exc:  # noqa: BLE001
            self.edit_stack.clear()
            self.history.edits.clear()
            raise UserError("Saved edits not applied", f"{exc}. The history was left out; the model is unedited.") \
                from exc
        return HistoryRestored(cursor, len(entries))
