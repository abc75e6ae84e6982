"""QUndoCommand wrappers. Edits: redo() applies the engine edit through its EditStack, undo() reverts it
(bitwise for weight edits, hooks removed for activation edits). Fact-set changes swap immutable FactSets."""

from __future__ import annotations

from PySide6.QtGui import QUndoCommand


class FactSetCommand(QUndoCommand):
    def __init__(self, session, new_factset, text: str, on_change):
        super().__init__(text)
        self.session = session
        self.old = session.factset
        self.new = new_factset
        self.on_change = on_change

    def redo(self):
        self.session.factset = self.new
        self.on_change()

    def undo(self):
        self.session.factset = self.old
        self.on_change()


class EditCommand(QUndoCommand):
    """One knowledge edit. `report` (before/after probabilities) travels with the command so that the table
    can show it again when the user walks the history."""

    def __init__(self, edit_stack, edit, text: str | None = None, on_change=None, report=None):
        super().__init__(text or edit.describe())
        self.edit_stack = edit_stack
        self.edit = edit
        self.on_change = on_change
        self.report = report
        self._pushed = False
        self.error: str | None = None

    def redo(self):
        if not self._pushed:
            self.edit_stack.push(self.edit)  # raises on a bad edit: the window catches it before pushing
            self._pushed = True
        else:
            self.edit_stack.redo()
        if self.on_change:
            self.on_change(self)

    def undo(self):
        self.edit_stack.undo()
        if self.on_change:
            self.on_change(self)
