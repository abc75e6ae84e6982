"""One undo/redo history of edits on a loaded model (`EditStack`), and exporting the edited model.

Weight edits must be reverted in the reverse order of application when they touch the same value vectors;
`EditStack` guarantees that (to switch off an edit in the middle it reverts the edits above it, then
re-applies them), so any sequence of stack operations that returns to no active edits restores every
parameter bitwise.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .edits import (Batch, Edit, EditHandle, Neuron, _ActivationEdit, _WeightEditBase, _finite, check_neurons,
                    edit_from_dict)

# --------------------------------------------------------------------------------------------------------
# EditStack
# --------------------------------------------------------------------------------------------------------

@dataclass
class _Entry:
    edit: Edit
    enabled: bool = True
    report: dict | None = None  # what the caller measured for this edit (e.g. the GUI's evaluation)


class EditStack:
    """An undo/redo history of edits on one loaded model.

    Entries below the cursor are *done*; `undo()` moves the cursor down (reverting), `redo()` up
    (re-applying); `push()` drops everything above the cursor (the redo branch). A done entry can also be
    switched off and on (`set_enabled`) without losing its place. The model always equals the original with
    the active edits applied in stack order.

    Each entry may carry a `report` (plain JSON-able data, e.g. the edit's evaluation), saved and restored
    with the entry, so one history holds both the edits and what was measured about them."""

    def __init__(self, lm):
        self.lm = lm
        self.entries: list[_Entry] = []
        self.cursor = 0
        self._applied: list[tuple[int, EditHandle]] = []  # in application (= stack) order

    # -- internal
    def _active_indices(self) -> list[int]:
        return [i for i in range(self.cursor) if self.entries[i].enabled]

    def _unwind_to(self, index: int) -> None:
        """Reverts applied edits with stack index >= index (last first)."""
        while self._applied and self._applied[-1][0] >= index:
            _, handle = self._applied.pop()
            handle.revert()

    def _rewind(self) -> None:
        applied = {i for i, _ in self._applied}
        for i in self._active_indices():
            if i not in applied:
                self._applied.append((i, self.entries[i].edit.apply(self.lm)))

    # -- public
    def push(self, edit: Edit, report: dict | None = None) -> int:
        self._unwind_to(self.cursor)
        del self.entries[self.cursor:]
        self.entries.append(_Entry(edit, report=report))
        self.cursor = len(self.entries)
        try:
            self._rewind()
        except Exception:
            self.entries.pop()
            self.cursor -= 1
            raise
        return self.cursor - 1

    def can_undo(self) -> bool:
        return self.cursor > 0

    def can_redo(self) -> bool:
        return self.cursor < len(self.entries)

    def undo(self) -> Edit:
        if not self.can_undo():
            raise IndexError("nothing to undo")
        self.cursor -= 1
        self._unwind_to(self.cursor)
        self._rewind()
        return self.entries[self.cursor].edit

    def redo(self) -> Edit:
        if not self.can_redo():
            raise IndexError("nothing to redo")
        self.cursor += 1
        self._unwind_to(self.cursor - 1)
        self._rewind()
        return self.entries[self.cursor - 1].edit

    def set_enabled(self, index: int, enabled: bool) -> None:
        if not 0 <= index < len(self.entries):
            raise IndexError(f"no edit #{index}")
        self._unwind_to(index)
        self.entries[index].enabled = bool(enabled)
        self._rewind()

    def set_report(self, index: int, report: dict | None) -> None:
        """Attaches (or replaces) the report of entry `index` (the model is not touched)."""
        if not 0 <= index < len(self.entries):
            raise IndexError(f"no edit #{index}")
        self.entries[index].report = report

    def revert_all(self) -> None:
        """Reverts every applied edit (history is kept; cursor goes to 0)."""
        self._unwind_to(0)
        self.cursor = 0

    def clear(self) -> None:
        self._unwind_to(0)
        self.entries.clear()
        self.cursor = 0

    def active_edits(self) -> list[Edit]:
        return [self.entries[i].edit for i in self._active_indices()]

    def history(self) -> list[dict]:
        return [{"index": i, "edit": e.edit, "description": e.edit.describe(), "done": i < self.cursor,
                 "enabled": e.enabled, "active": i < self.cursor and e.enabled, "report": e.report}
                for i, e in enumerate(self.entries)]

    def to_dict(self) -> dict:
        def entry(e: _Entry) -> dict:
            out = {"edit": e.edit.to_dict(), "enabled": e.enabled}
            return out | ({"report": e.report} if e.report is not None else {})

        return {"version": 1, "cursor": self.cursor, "entries": [entry(e) for e in self.entries]}

    def load_dict(self, state: dict) -> None:
        """Reverts everything, then takes the saved history and applies its active edits. All or nothing: if
        any entry is invalid or cannot be applied to this model, a one-line ValueError says which, and the
        stack and the model are left exactly as they were."""
        entries, cursor = _parse_state(state)
        for i, e in enumerate(entries):
            try:
                check_neurons(self.lm, e.edit.neurons)
            except ValueError as exc:
                raise ValueError(f"edit #{i}: {exc}") from None
        old_entries, old_cursor = self.entries, self.cursor
        self._unwind_to(0)
        self.entries, self.cursor = entries, cursor
        try:
            self._rewind()
        except Exception as exc:
            failed = self._active_indices()[len(self._applied)]
            self._unwind_to(0)
            self.entries, self.cursor = old_entries, old_cursor
            self._rewind()
            raise ValueError(f"edit #{failed} cannot be applied to this model: "
                             f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None

    @classmethod
    def from_dict(cls, lm, state: dict) -> "EditStack":
        stack = cls(lm)
        stack.load_dict(state)
        return stack

    def __len__(self) -> int:
        return len(self.entries)


def _parse_state(state) -> tuple[list[_Entry], int]:
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
            entries.append(_Entry(edit_from_dict(e["edit"]), enabled, report))
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
