"""The app's side of the one undo history (kn_core.history.History): the session's commands, and `QtHistory`,
which maps the core history to Qt (signals for the window, the model edits as a QUndoStack for QUndoView).

The QUndoStack holds no state of its own: its commands delegate to the core's, it is re-indexed (or rebuilt)
from the core after every change, and a click in the History view walks the core's model lane."""

from __future__ import annotations

from PySide6.QtCore import QObject, Signal
from PySide6.QtGui import QUndoCommand, QUndoStack

from kn_core.history import MODEL, History, Replace


def factset_change(session, factset, text: str) -> Replace:
    """Swaps the session's immutable FactSet."""
    return Replace(text, lambda value: setattr(session, "factset", value), session.factset, factset)


def runs_change(session, text: str, change) -> Replace:
    """A change to which runs the project keeps and which one is each fact's (open a run as the fact's, delete a
    run): `change()` run on the session's three run maps, kept before and after and swapped whole (the runs
    themselves are not copied)."""
    before = session.run_maps()
    change()
    after = session.run_maps()
    session.set_run_maps(before)  # History.push applies it
    return Replace(text, session.set_run_maps, before, after)


def sets_change(session, text: str, sets: dict) -> Replace:
    """The project's neuron sets replaced by `sets` (name -> NeuronSet; a set is never changed in place, so the
    maps before and after hold the sets as they were)."""
    return Replace(text, lambda value: setattr(session, "neuron_sets", dict(value)), dict(session.neuron_sets),
                   dict(sets))


def rename_run(run, name: str) -> Replace:
    return Replace(f"Rename run to {name!r}" if name else "Clear the run's name",
                   lambda value: setattr(run, "name", value), run.name, name)


class _ViewCommand(QUndoCommand):
    """A model edit of the core history as the History view shows it; undo/redo from the view walk the core."""

    def __init__(self, adapter: "QtHistory", command):
        super().__init__(command.text)
        self.adapter, self.command = adapter, command

    def redo(self):
        self.adapter._walk("redo")

    def undo(self):
        self.adapter._walk("undo")


class QtHistory(QObject):
    """Listens to a core History: `lane_changed(lane)` after a lane's state changed, `changed()` after any change
    (the clean mark included); `view_stack` mirrors the MODEL lane for QUndoView."""

    changed = Signal()
    lane_changed = Signal(str)

    def __init__(self, history: History, parent=None):
        super().__init__(parent)
        self.history = history
        self.view_stack = QUndoStack(self)
        self._quiet = False  # True while the stack is set from the core (its commands must not walk it back)
        self._walking = False  # True while a click in the view walks the core
        history.listen(self._core_changed)

    def _walk(self, direction: str):
        if self._quiet:
            return
        self._walking = True
        try:
            getattr(self.history, direction)(MODEL)
        finally:
            self._walking = False

    def _core_changed(self, lanes: frozenset):
        if MODEL in lanes and not self._walking:  # (the view moved its own index)
            self._mirror()
        for lane in sorted(lanes):
            self.lane_changed.emit(lane)
        self.changed.emit()

    def _mirror(self):
        """The stack shows the lane's commands at the lane's index; a new command replaces the stack's redo
        branch as QUndoStack.push does, a shorter lane (cleared, replaced) is rebuilt."""
        commands, stack = self.history.lane(MODEL), self.view_stack
        shown = [stack.command(i).command for i in range(stack.count())]
        self._quiet = True
        try:
            if shown != commands:
                kept = next((i for i, (a, b) in enumerate(zip(shown, commands)) if a is not b),
                            min(len(shown), len(commands)))
                if kept == len(commands):
                    stack.clear()
                    kept = 0
                stack.setIndex(kept)
                for command in commands[kept:]:
                    stack.push(_ViewCommand(self, command))
            stack.setIndex(self.history.index(MODEL))
        finally:
            self._quiet = False
