"""The one undo history of a session (no Qt): model edits, fact-set changes and run-map changes as `Command`s,
each owning its undo (`apply()` / `revert()`), in one undo order. Every front end maps to it: the CLI through
`edit_stack.EditStack` (the model-edit lane of a History), the app through `kn_gui.commands.QtHistory`.

Commands live in *lanes*: `MODEL` (edits of the loaded model's weights and activations) and `SESSION` (the fact
set, which runs the project keeps, run names). Lanes change independent state, so their commands commute.

The semantics (tests/test_history.py checks them against a list-of-states reference):
- `undo()` reverts the most recently done or redone command of any lane; `redo()` re-applies the most recently
  undone one. One order, as if there were one stack.
- A new command drops the redo list of *its own lane* only: pushing a fact change keeps the undone model edits
  redoable (and the other way round), at their place in the redo order. The old app kept two QUndoStacks merged
  by a clock for this; here it is one history.
- `undo(lane)` / `redo(lane)` move one lane alone (the app's History view walks the model edits this way), past
  newer commands of other lanes: they commute.
- Within a lane, commands are reverted in the reverse order of application, so weight edits that touch the same
  value vectors restore every parameter bitwise. `set_enabled` switches a command that supports it
  (`can_disable`) off or on in place: the lane's done commands above it are reverted first and re-applied after.
- Clean state: `set_clean()` marks the current state (or a `position()` taken earlier, e.g. when a save was
  queued) as the saved one; `is_clean()` says whether the done commands of every lane, with their enabled flags,
  are exactly the marked ones. `clear()` does not move the mark: forgetting saved edits is an unsaved change.
- `clear()` forgets commands; those whose effect must not outlive their entry (`revert_when_dropped`: model edits,
  so the model never carries an edit no history lists) are reverted first, last first.
- Listeners (`listen`) are called after every change with the frozenset of lanes whose state changed (empty when
  only the clean mark moved).
"""

from __future__ import annotations

import itertools
from typing import Any, Callable, Iterable

MODEL = "model"
SESSION = "session"


class Command:
    """One undoable change. Subclasses set `text` (what Undo/Redo and history views show) and `lane`."""

    text: str = ""
    lane: str = SESSION
    can_disable = False  # True: `enabled` may be switched in place and apply()/revert() honour it
    enabled = True
    revert_when_dropped = False  # True: clear() reverts it if done (its effect must not outlive the entry)
    serial = -1  # set by the History it enters

    def apply(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def revert(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


class Replace(Command):
    """Replaces one value wholesale: `put(new)` on apply, `put(old)` on revert (immutable values or snapshots)."""

    def __init__(self, text: str, put: Callable[[Any], None], old, new, lane: str = SESSION):
        self.text, self.put, self.old, self.new, self.lane = text, put, old, new, lane

    def apply(self) -> None:
        self.put(self.new)

    def revert(self) -> None:
        self.put(self.old)


class LaneNotApplied(Exception):
    """`History.replace_lane` could not apply the command at `position` of the new lane (`cause`)."""

    def __init__(self, position: int, cause: BaseException):
        super().__init__(f"command #{position}: {cause}")
        self.position, self.cause = position, cause


class History:
    """Done commands (`done`, oldest first) and undone ones (`undone`, the next redo last); see the module
    docstring for the semantics."""

    def __init__(self):
        self.done: list[Command] = []
        self.undone: list[Command] = []
        self._serials = itertools.count()
        self._clean = self.position()
        self._listeners: list[Callable[[frozenset], None]] = []

    def _enter(self, command: Command) -> None:
        """Numbers a command entering the history: the clean mark keeps numbers, not the commands (a model
        edit holds its model, which must be freed when the edit leaves)."""
        command.serial = next(self._serials)

    # -- listeners
    def listen(self, callback: Callable[[frozenset], None]) -> None:
        self._listeners.append(callback)

    def _changed(self, lanes: Iterable[str]) -> None:
        lanes = frozenset(lanes)
        for callback in list(self._listeners):
            callback(lanes)

    # -- reading
    def lane(self, name: str) -> list[Command]:
        """The lane's commands in order (done first, then the undone in redo order)."""
        return [c for c in self.done if c.lane == name] + [c for c in reversed(self.undone) if c.lane == name]

    def index(self, name: str) -> int:
        """How many of the lane's commands are done (the lane's cursor)."""
        return sum(c.lane == name for c in self.done)

    def next_undo(self, lane: str | None = None) -> Command | None:
        return next((c for c in reversed(self.done) if lane in (None, c.lane)), None)

    def next_redo(self, lane: str | None = None) -> Command | None:
        return next((c for c in reversed(self.undone) if lane in (None, c.lane)), None)

    def can_undo(self, lane: str | None = None) -> bool:
        return self.next_undo(lane) is not None

    def can_redo(self, lane: str | None = None) -> bool:
        return self.next_redo(lane) is not None

    # -- changing
    def push(self, command: Command) -> None:
        """Applies `command` and makes it the newest; drops its lane's redo list. If apply() raises, nothing
        changes (apply must then leave its state untouched, as every command here does)."""
        command.apply()
        self._enter(command)
        self.undone = [c for c in self.undone if c.lane != command.lane]
        self.done.append(command)
        self._changed({command.lane})

    def undo(self, lane: str | None = None) -> Command:
        command = self.next_undo(lane)
        if command is None:
            raise IndexError("nothing to undo")
        command.revert()
        self.done.remove(command)  # it may sit below newer commands of other lanes
        self.undone.append(command)
        self._changed({command.lane})
        return command

    def redo(self, lane: str | None = None) -> Command:
        command = self.next_redo(lane)
        if command is None:
            raise IndexError("nothing to redo")
        command.apply()
        self.undone.remove(command)
        self.done.append(command)
        self._changed({command.lane})
        return command

    def set_enabled(self, command: Command, enabled: bool) -> None:
        """Switches `command` off or on where it stands (done or undone)."""
        if not command.can_disable:
            raise ValueError(f"{command.text!r} cannot be switched off; undo it instead")
        if command not in self.done and command not in self.undone:
            raise ValueError(f"{command.text!r} is not in this history")
        lane = [c for c in self.done if c.lane == command.lane]
        above = lane[lane.index(command):] if command in lane else []  # an undone command is only flagged
        for c in reversed(above):
            c.revert()
        command.enabled = bool(enabled)
        for c in above:
            c.apply()
        self._changed({command.lane})

    def clear(self, lane: str | None = None) -> None:
        """Forgets every command (of `lane`, or all); done ones with `revert_when_dropped` are reverted first."""
        dropped = [c for c in self.done + self.undone if lane in (None, c.lane)]
        for c in reversed(self.done):
            if c in dropped and c.revert_when_dropped:
                c.revert()
        self.done = [c for c in self.done if c not in dropped]
        self.undone = [c for c in self.undone if c not in dropped]
        if dropped:
            self._changed({c.lane for c in dropped})

    def replace_lane(self, name: str, commands: list[Command], index: int) -> None:
        """All or nothing: reverts the lane's done commands (last first), forgets the lane and puts `commands` in
        its place, the first `index` done (applied in order, newest in the undo order), the rest undone (redo
        order as listed). If one cannot be applied, what was applied is reverted, the old lane is put back
        exactly and LaneNotApplied says which."""
        old_lane = [c for c in self.done if c.lane == name]
        for c in reversed(old_lane):
            c.revert()
        for position, c in enumerate(commands[:index]):
            try:
                c.apply()
            except Exception as exc:
                for applied in reversed(commands[:position]):
                    applied.revert()
                for old in old_lane:
                    old.apply()
                raise LaneNotApplied(position, exc) from exc
        for c in commands:
            self._enter(c)
        self.done = [c for c in self.done if c.lane != name] + list(commands[:index])
        self.undone = [c for c in self.undone if c.lane != name] + list(reversed(commands[index:]))
        self._changed({name})

    # -- saved or not
    def position(self) -> tuple:
        """The state as a comparable value: each lane's done commands (their numbers) with their enabled flags."""
        lanes = sorted({c.lane for c in self.done})
        return tuple((lane, tuple((c.serial, c.enabled) for c in self.done if c.lane == lane)) for lane in lanes)

    def set_clean(self, position: tuple | None = None) -> None:
        """Marks the current state (or an earlier `position()`) as the saved one."""
        self._clean = self.position() if position is None else position
        self._changed(())

    def is_clean(self) -> bool:
        return self.position() == self._clean
