"""Undo commands. Each changes the model or the fact set and nothing else; the window listens to the stacks'
signals to refresh what it shows."""

from __future__ import annotations

from PySide6.QtGui import QUndoCommand


class FactSetCommand(QUndoCommand):
    """Swaps the session's immutable FactSet."""

    def __init__(self, session, new_factset, text: str):
        super().__init__(text)
        self.session = session
        self.old = session.factset
        self.new = new_factset

    def redo(self):
        self.session.factset = self.new

    def undo(self):
        self.session.factset = self.old


class EditCommand(QUndoCommand):
    """One knowledge edit: redo() applies it through the EditStack, undo() reverts it (bitwise for weight edits,
    hooks removed for activation edits). `report` (before/after probabilities) is the evaluation that travels
    with the edit, so the table can show it again when the user walks the history."""

    def __init__(self, edit_stack, edit, text: str | None = None, report=None):
        super().__init__(text or edit.describe())
        self.edit_stack = edit_stack
        self.edit = edit
        self.report = report
        self._pushed = False

    def redo(self):
        if not self._pushed:
            self.edit_stack.push(self.edit)  # raises on a bad edit: the controller validates before pushing
            self._pushed = True
        else:
            self.edit_stack.redo()

    def undo(self):
        self.edit_stack.undo()
