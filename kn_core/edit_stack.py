"""The model edits of a `history.History` (`EditStack`, its save/restore format), and exporting the edited model.

Weight edits must be reverted in the reverse order of application when they touch the same value vectors; the
History guarantees that within its `MODEL` lane (to switch off an edit in the middle it reverts the edits above
it, then re-applies them), so any sequence of operations that returns to no active edits restores every
parameter bitwise.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .edits import (Batch, Edit, EditHandle, Neuron, _ActivationEdit, _WeightEditBase, _finite, check_neurons,
                    edit_from_dict)
from .history import MODEL, Command, History, LaneNotApplied

# --------------------------------------------------------------------------------------------------------
# EditStack
# --------------------------------------------------------------------------------------------------------

class ModelEdit(Command):
    """One knowledge edit on a loaded model: apply() applies it (while enabled), revert() undoes it exactly
    (edits.EditHandle: bitwise for weight edits, hooks removed for activation edits). `report` is what the caller
    measured about it (plain JSON-able data), saved and restored with it."""

    lane = MODEL
    can_disable = True
    revert_when_dropped = True  # the model never carries an edit that no history lists

    def __init__(self, lm, edit: Edit, report: dict | None = None, enabled: bool = True, text: str | None = None):
        self.lm, self.edit, self.report, self.enabled = lm, edit, report, enabled
        self.text = text or edit.describe()
        self._handle: EditHandle | None = None

    def apply(self) -> None:
        if self.enabled:
            self._handle = self.edit.apply(self.lm)

    def revert(self) -> None:
        if self._handle is not None:
            self._handle.revert()
            self._handle = None


class EditStack:
    """The model edits of one loaded model: the `MODEL` lane of a History (its own, or one shared with other
    lanes, as the app's), seen as a stack. Entries (`ModelEdit`s) below the cursor are *done*; `undo()` moves the
    cursor down, `redo()` up; `push()` drops the undone edits (the lane's redo branch). A done entry can be
    switched off and on (`set_enabled`) without losing its place. The model always equals the original with the
    active edits applied in stack order. A shared History must hold no other model's edits (clear its MODEL lane
    when the model changes)."""

    def __init__(self, lm, history: History | None = None):
        self.lm = lm
        self.undo_history = history if history is not None else History()

    @property
    def entries(self) -> list[ModelEdit]:
        return self.undo_history.lane(MODEL)

    @property
    def cursor(self) -> int:
        return self.undo_history.index(MODEL)

    def push(self, edit: Edit, report: dict | None = None, text: str | None = None) -> int:
        """Applies `edit` as the newest entry (raises, changing nothing, when it cannot be applied); its index."""
        self.undo_history.push(ModelEdit(self.lm, edit, report, text=text))
        return self.cursor - 1

    def can_undo(self) -> bool:
        return self.undo_history.can_undo(MODEL)

    def can_redo(self) -> bool:
        return self.undo_history.can_redo(MODEL)

    def undo(self) -> Edit:
        if not self.can_undo():
            raise IndexError("nothing to undo")
        return self.undo_history.undo(MODEL).edit

    def redo(self) -> Edit:
        if not self.can_redo():
            raise IndexError("nothing to redo")
        return self.undo_history.redo(MODEL).edit

    def _entry(self, index: int) -> ModelEdit:
        entries = self.entries
        if not 0 <= index < len(entries):
            raise IndexError(f"no edit #{index}")
        return entries[index]

    def set_enabled(self, index: int, enabled: bool) -> None:
        self.undo_history.set_enabled(self._entry(index), enabled)

    def set_report(self, index: int, report: dict | None) -> None:
        """Attaches (or replaces) the report of entry `index` (the model is not touched)."""
        self._entry(index).report = report

    def revert_all(self) -> None:
        """Reverts every applied edit (history is kept; cursor goes to 0)."""
        while self.can_undo():
            self.undo()

    def clear(self) -> None:
        self.undo_history.clear(MODEL)

    def active_edits(self) -> list[Edit]:
        return [e.edit for e in self.entries[:self.cursor] if e.enabled]

    def history(self) -> list[dict]:
        cursor = self.cursor
        return [{"index": i, "edit": e.edit, "description": e.edit.describe(), "done": i < cursor,
                 "enabled": e.enabled, "active": i < cursor and e.enabled, "report": e.report}
                for i, e in enumerate(self.entries)]

    def to_dict(self) -> dict:
        def entry(e: ModelEdit) -> dict:
            out = {"edit": e.edit.to_dict(), "enabled": e.enabled}
            return out | ({"report": e.report} if e.report is not None else {})

        return {"version": 1, "cursor": self.cursor, "entries": [entry(e) for e in self.entries]}

    def load_dict(self, state: dict) -> None:
        """Reverts everything, then takes the saved history and applies its active edits. All or nothing: if
        any entry is invalid or cannot be applied to this model, a one-line ValueError says which, and the
        stack and the model are left exactly as they were."""
        entries, cursor = _parse_state(self.lm, state)
        for i, e in enumerate(entries):
            try:
                check_neurons(self.lm, e.edit.neurons)
            except ValueError as exc:
                raise ValueError(f"edit #{i}: {exc}") from None
        try:
            self.undo_history.replace_lane(MODEL, entries, cursor)
        except LaneNotApplied as failed:
            exc = failed.cause
            raise ValueError(f"edit #{failed.position} cannot be applied to this model: "
                             f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None

    @classmethod
    def from_dict(cls, lm, state: dict) -> "EditStack":
        stack = cls(lm)
        stack.load_dict(state)
        return stack

    def __len__(self) -> int:
        return len(self.entries)


def _parse_state(lm, state) -> tuple[list[ModelEdit], int]:
    """The entries and cursor of a saved stack, or a one-line ValueError naming the first bad entry."""
    if not isinstance(state, dict):
        raise ValueError(f"an edit history must be a JSON object, not {type(state).__name__}")
    if state.get("version", 1) != 1:
        raise ValueError(f"unknown edit-stack version {state.get('version')!r}; this version reads version 1")
    raw = state.get("entries", [])
    if not isinstance(raw, list):
        raise ValueError("the edit history's 'entries' must be a list")
    entries = []
    for i, e in enumerate(raw):
        if not isinstance(e, dict) or "edit" not in e:
            raise ValueError(f"edit #{i} has no 'edit'")
        enabled, report = e.get("enabled", True), e.get("report")
        if not isinstance(enabled, bool):
            raise ValueError(f"edit #{i}: 'enabled' must be true or false, not {enabled!r}")
        if report is not None and not isinstance(report, dict):
            raise ValueError(f"edit #{i}: 'report' must be an object, not {type(report).__name__}")
        try:
            entries.append(ModelEdit(lm, edit_from_dict(e["edit"]), report, enabled))
        except ValueError as exc:
            raise ValueError(f"edit #{i}: {exc}") from None
    cursor = state.get("cursor", len(entries))
    if isinstance(cursor, bool) or not isinstance(cursor, int) or not 0 <= cursor <= len(entries):
        raise ValueError(f"cursor {cursor!r} outside 0..{len(entries)}")
    return entries, cursor


# --------------------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------------------

def export_model(lm, edits, folder, skip_unexportable: bool = False) -> dict:
    """Writes the model as it is with its active edits (an EditStack or a list of active edits) to `folder`
    with `save_pretrained` (+ tokenizer) and a `kn-edits.json` describing them.

    Weight edits are already in the weights; activation edits with scope 'all' are baked in exactly (zeroing
    or scaling an activation everywhere equals scaling its value vector) for the save and taken out again.
    Answer-scoped activation edits cannot be expressed as weights: ValueError, or with
    `skip_unexportable=True` they are left out and listed."""
    active = edits.active_edits() if isinstance(edits, EditStack) else list(edits)
    active = [part for e in active for part in (e.edits if isinstance(e, Batch) else (e,))]
    skipped = [e for e in active if isinstance(e, _ActivationEdit) and (e.scope == "answer" or e._values())]
    if skipped and not skip_unexportable:
        raise ValueError(f"{len(skipped)} active edit(s) act only at the answer position or set activations to a "
                         f"constant, which cannot be saved as weights ({skipped[0].describe()}); re-apply them with "
                         "scope 'all' and to='zero', or skip them")
    baked = [_Scale(e.neurons, e._factor()) for e in active if isinstance(e, _ActivationEdit) and e not in skipped]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    handles = [b.apply(lm) for b in baked]
    try:
        lm.model.save_pretrained(folder)
        if lm.tokenizer is not None:
            lm.tokenizer.save_pretrained(folder)
    finally:
        for handle in reversed(handles):
            handle.revert()
    info = {"source": lm.source, "sha256_before_edits": lm.sha256,
            "edits": [e.to_dict() for e in active if e not in skipped],
            "skipped": [e.to_dict() for e in skipped]}
    (folder / "kn-edits.json").write_text(json.dumps(info, indent=2))
    return info


@dataclass(frozen=True)
class _Scale(_WeightEditBase):
    neurons: tuple[Neuron, ...]
    factor: float
    kind = "scale"

    def __post_init__(self):
        object.__setattr__(self, "factor", _finite(self.factor, "scale factor"))

    def _new_vectors(self, lm, layer, idx, old):
        return old * self.factor
