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
    hooks removed for activation edits). Its evaluation report lives in the EditStack entry, so the table can
    show it again when the user walks the history and the project saves it with the edit."""

    def __init__(self, edit_stack, edit, text: str | None = None, report=None):
        super().__init__(text or edit.describe())
        self.edit_stack = edit_stack
        self.edit = edit
        self._report = report  # until the first redo() creates the entry
        self.index: int | None = None  # the entry in edit_stack

    @property
    def report(self) -> dict | None:
        return self._report if self.index is None else self.edit_stack.entries[self.index].report

    def redo(self):
        if self.index is None:  # raises on a bad edit: the controller validates before pushing
            self.index = self.edit_stack.push(self.edit, report=self._report)
        else:
            self.edit_stack.redo()

    def undo(self):
        self.edit_stack.undo()


class RunsCommand(QUndoCommand):
    """A change to which runs the project keeps and which one is each fact's (open a run as the fact's, delete a
    run): the session's three run maps before and after, swapped whole (the runs themselves are not copied)."""

    def __init__(self, session, text: str, change):
        super().__init__(text)
        self.session = session
        self.before = session.run_maps()
        change()
        self.after = session.run_maps()
        session.set_run_maps(self.before)  # the stack's first redo() applies it

    def redo(self):
        self.session.set_run_maps(self.after)

    def undo(self):
        self.session.set_run_maps(self.before)


class RenameRunCommand(QUndoCommand):
    def __init__(self, run, name: str):
        super().__init__(f"Rename run to {name!r}" if name else "Clear the run's name")
        self.run, self.old, self.new = run, run.name, name

    def redo(self):
        self.run.name = self.new

    def undo(self):
        self.run.name = self.old
