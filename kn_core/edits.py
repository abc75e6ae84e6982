"""Knowledge edits as values: Suppress, Amplify, Update, Erase; an EditStack with undo/redo; export.

An edit is an immutable description (kind, neurons, parameters). `edit.apply(lm)` changes the loaded model
and returns a handle whose `revert()` undoes exactly that change:

* Activation edits (Suppress, Amplify) are forward-pre-hooks on the FFN out-projections (the one hook point
  of `hooks.py`); reverting removes the hooks. Their *scope* is "answer" (the paper's setting: only the
  positions that predict the answer) or "all" (every position: a persistent model edit, exportable).
* Weight edits (Update, Erase) write value vectors (out-projection columns; rows for GPT-2's Conv1D). They
  keep a copy of the original slices and restore them with `index_copy_`, so reverting is bitwise exact
  (`torch.equal`).

"Answer positions": when `evaluation` runs a batch it publishes the exact positions through
`answer_positions(mask)`. Without that, a causal model's answer position is the last (non-padding) position
of each sequence in each forward (also during generation with a KV cache), and a masked model's are the
positions of its mask token, read from the `input_ids` given to the model.

Weight edits must be reverted in the reverse order of application when they touch the same value vectors;
`EditStack` guarantees that (to switch off an edit in the middle it reverts the edits above it, then
re-applies them), so any sequence of stack operations that returns to no active edits restores every
parameter bitwise.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from .hooks import ActivationPatch, InputCapture

Neuron = tuple[int, int]

_ANSWER_MASK: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar("kn_answer_mask", default=None)


@contextlib.contextmanager
def answer_positions(mask: torch.Tensor):
    """Within this block, answer-scoped activation edits act on the positions where `mask` (batch, seq) is
    True (used by `evaluation` to point at the exact answer positions of a padded batch)."""
    token = _ANSWER_MASK.set(mask)
    try:
        yield
    finally:
        _ANSWER_MASK.reset(token)


def _norm_neurons(neurons: Iterable) -> tuple[Neuron, ...]:
    seen: dict[Neuron, None] = {}
    for layer, index in neurons:
        seen[(int(layer), int(index))] = None
    return tuple(seen)


def _by_layer(neurons: Iterable[Neuron]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for layer, index in neurons:
        out.setdefault(int(layer), []).append(int(index))
    return {layer: sorted(set(idx)) for layer, idx in sorted(out.items())}


def _check_neurons(lm, neurons: Sequence[Neuron]) -> None:
    layout = lm.layout
    for layer, index in neurons:
        if not (0 <= layer < layout.layers and 0 <= index < layout.neurons):
            raise ValueError(f"neuron ({layer}, {index}) is outside this model ({layout.layers} layers x "
                             f"{layout.neurons} neurons)")


# --------------------------------------------------------------------------------------------------------
# Handles
# --------------------------------------------------------------------------------------------------------

class EditHandle:
    """Returned by `Edit.apply`; `revert()` undoes the edit exactly (calling it twice is harmless)."""

    def __init__(self, edit, revert_fn):
        self.edit = edit
        self._revert_fn = revert_fn
        self.active = True

    def revert(self) -> None:
        if self.active:
            self._revert_fn()
            self.active = False


def _position_mask(lm, capture: InputCapture, x: torch.Tensor) -> torch.Tensor | None:
    """Bool mask (batch, seq) of answer positions for an activation x (batch, seq, neurons)."""
    if x.dim() != 3:
        return None
    batch, seq = x.shape[0], x.shape[1]
    mask = _ANSWER_MASK.get()
    if mask is not None and tuple(mask.shape) == (batch, seq):
        return mask.to(x.device)
    if lm.kind == "masked":
        ids = capture.input_ids
        mask_id = getattr(lm.tokenizer, "mask_token_id", None)
        if ids is None or mask_id is None or tuple(ids.shape) != (batch, seq):
            return None
        return (ids == mask_id).to(x.device)
    out = torch.zeros((batch, seq), dtype=torch.bool, device=x.device)
    attention = capture.attention_mask
    if attention is not None and attention.dim() == 2 and attention.shape[0] == batch and attention.shape[1] >= seq:
        attention = attention[:, -seq:].to(x.device)
        # last position whose attention mask is 1 (right padding); left padding gives seq - 1
        idx = torch.arange(seq, device=x.device).expand(batch, seq)
        last = torch.where(attention.bool(), idx, torch.full_like(idx, -1)).max(dim=1).values
        last = torch.where(last < 0, torch.full_like(last, seq - 1), last)
        out[torch.arange(batch, device=x.device), last] = True
    else:
        out[:, -1] = True
    return out


# --------------------------------------------------------------------------------------------------------
# Edits
# --------------------------------------------------------------------------------------------------------

class Edit:
    kind: str = ""

    def apply(self, lm) -> EditHandle:  # pragma: no cover - abstract
        raise NotImplementedError

    def to_dict(self) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def describe(self) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def is_weight_edit(self) -> bool:
        return False


def _neurons_str(neurons: Sequence[Neuron], limit: int = 3) -> str:
    shown = ", ".join(f"L{l}.{i}" for l, i in neurons[:limit])
    more = f" +{len(neurons) - limit}" if len(neurons) > limit else ""
    return f"{len(neurons)} neuron{'s' if len(neurons) != 1 else ''} ({shown}{more})"


class _ActivationEdit(Edit):
    neurons: tuple[Neuron, ...]
    scope: str

    def __post_init__(self):
        object.__setattr__(self, "neurons", _norm_neurons(self.neurons))
        if self.scope not in ("answer", "all"):
            raise ValueError(f"scope must be 'answer' or 'all', not {self.scope!r}")

    def _factor(self) -> float:
        raise NotImplementedError

    def apply(self, lm) -> EditHandle:
        _check_neurons(lm, self.neurons)
        groups = _by_layer(self.neurons)
        factor = self._factor()
        capture = InputCapture(lm.model) if self.scope == "answer" else None
        index_cache: dict[tuple[int, torch.device], torch.Tensor] = {}

        def fn(layer, x):
            key = (layer, x.device)
            if key not in index_cache:
                index_cache[key] = torch.tensor(groups[layer], dtype=torch.long, device=x.device)
            idx = index_cache[key]
            x = x.clone()
            if self.scope == "all":
                x[..., idx] = x[..., idx] * factor if factor != 0.0 else torch.zeros_like(x[..., idx])
                return x
            mask = _position_mask(lm, capture, x)
            if mask is None:
                return None
            sel = x[mask]  # (n_positions, neurons)
            sel[:, idx] = sel[:, idx] * factor if factor != 0.0 else 0.0
            x[mask] = sel
            return x

        patch = ActivationPatch(lm.layout, fn, layers=list(groups))

        def revert():
            patch.remove()
            if capture is not None:
                capture.remove()

        return EditHandle(self, revert)


@dataclass(frozen=True)
class Suppress(_ActivationEdit):
    """Sets the neurons' activation to 0 (at the answer positions, or everywhere with scope='all')."""

    neurons: tuple[Neuron, ...]
    scope: str = "answer"
    kind = "suppress"

    def _factor(self) -> float:
        return 0.0

    def to_dict(self) -> dict:
        return {"kind": self.kind, "neurons": [list(n) for n in self.neurons], "scope": self.scope}

    def describe(self) -> str:
        return f"Suppress {_neurons_str(self.neurons)}, {self.scope} positions"


@dataclass(frozen=True)
class Amplify(_ActivationEdit):
    """Multiplies the neurons' activation by `factor` (2 by default)."""

    neurons: tuple[Neuron, ...]
    factor: float = 2.0
    scope: str = "answer"
    kind = "amplify"

    def _factor(self) -> float:
        return float(self.factor)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "neurons": [list(n) for n in self.neurons], "scope": self.scope,
                "factor": float(self.factor)}

    def describe(self) -> str:
        return f"Amplify x{self.factor:g} {_neurons_str(self.neurons)}, {self.scope} positions"


class _WeightEditBase(Edit):
    @property
    def is_weight_edit(self) -> bool:
        return True

    def _new_vectors(self, lm, layer: int, idx: list[int], old: torch.Tensor) -> torch.Tensor:
        """New value vectors (len(idx), hidden) in float32, from the current ones `old`."""
        raise NotImplementedError

    def apply(self, lm) -> EditHandle:
        _check_neurons(lm, self.neurons)
        layout = lm.layout
        saved = []
        with torch.no_grad():
            for layer, idx in _by_layer(self.neurons).items():
                weight = layout.value_weight(layer)
                axis = layout.neuron_axis(layer)
                index = torch.tensor(idx, dtype=torch.long, device=weight.device)
                original = weight.index_select(axis, index).clone()
                vectors = original if axis == 0 else original.T  # (k, hidden)
                new = self._new_vectors(lm, layer, idx, vectors.float()).to(weight.dtype)
                weight.index_copy_(axis, index, new if axis == 0 else new.T.contiguous())
                saved.append((weight, axis, index, original))

        def revert():
            with torch.no_grad():
                for weight, axis, index, original in reversed(saved):
                    weight.index_copy_(axis, index, original)

        return EditHandle(self, revert)


def _embedding_matrix(lm, which: str) -> torch.Tensor:
    if which == "input":
        return lm.layout.input_embeddings()
    if which == "output":
        return lm.layout.output_embeddings()
    raise ValueError(f"embedding must be 'input' or 'output', not {which!r}")


def default_embedding(lm) -> str:
    """'output' (the vocabulary head's rows) for causal models with an untied head, else 'input' (the word
    embeddings, as in the paper; identical to the head for tied models)."""
    if lm.kind == "causal" and not lm.layout.ties_embeddings():
        return "output"
    return "input"


def default_multi_token(lm) -> str:
    """How a multi-token object becomes one embedding: causal 'first' (the first answer token decides the
    next-token prediction; later tokens are conditioned on it); masked 'mean' (every mask predicts one
    token)."""
    return "first" if lm.kind == "causal" else "mean"


def _target_embedding(lm, ids: Sequence[int], which: str, multi_token: str) -> torch.Tensor:
    matrix = _embedding_matrix(lm, which)
    ids = [int(i) for i in ids]
    if not ids:
        raise ValueError("an update target has no tokens")
    if multi_token == "first":
        ids = ids[:1]
    elif multi_token != "mean":
        raise ValueError(f"multi_token must be 'first' or 'mean', not {multi_token!r}")
    index = torch.tensor(ids, dtype=torch.long, device=matrix.device)
    return matrix.index_select(0, index).float().mean(dim=0)


@dataclass(frozen=True)
class Update(_WeightEditBase):
    """<s, r, o> -> <s, r, o'>: for each neuron's value vector v,
    v <- v - (|v|/|e_o|)·λ1·e_o + (|v|/|e_o'|)·λ2·e_o'   (|v| is the norm before the edit).

    `old_ids` / `new_ids` are the token ids of o and o'; a multi-token object uses its first token's
    embedding or the mean of its tokens' embeddings (`multi_token`). `excluded` records the neurons that were
    left out because they belong to more than 10% of the relation's facts (see `make_update`).

    `flipped` (not in the paper; empty by default): neurons whose activation on the fact's prompts is negative,
    which gated FFNs (SwiGLU) and GELU's negative lobe produce. Such a neuron adds activation x v to the
    residual stream, so the paper's edit would push o' *down* and o up; for these the edit's sign is reversed."""

    neurons: tuple[Neuron, ...]
    old_ids: tuple[int, ...]
    new_ids: tuple[int, ...]
    lambda1: float = 1.0
    lambda2: float = 8.0
    embedding: str = "input"
    multi_token: str = "mean"
    excluded: tuple[Neuron, ...] = ()
    flipped: tuple[Neuron, ...] = ()
    kind = "update"

    def __post_init__(self):
        object.__setattr__(self, "neurons", _norm_neurons(self.neurons))
        object.__setattr__(self, "excluded", _norm_neurons(self.excluded))
        object.__setattr__(self, "flipped", _norm_neurons(self.flipped))
        if not set(self.flipped) <= set(self.neurons):
            raise ValueError("flipped neurons must be among the updated neurons")
        object.__setattr__(self, "old_ids", tuple(int(i) for i in self.old_ids))
        object.__setattr__(self, "new_ids", tuple(int(i) for i in self.new_ids))

    def _new_vectors(self, lm, layer, idx, old):
        e_old = _target_embedding(lm, self.old_ids, self.embedding, self.multi_token).to(old.device)
        e_new = _target_embedding(lm, self.new_ids, self.embedding, self.multi_token).to(old.device)
        norms = old.norm(dim=1, keepdim=True)
        flipped = set(self.flipped)
        # multiplying by +-1 is exact, so unflipped neurons get bitwise the paper's formula
        sign = torch.tensor([[-1.0 if (layer, i) in flipped else 1.0] for i in idx], device=old.device, dtype=old.dtype)
        return (old - sign * (norms / e_old.norm() * self.lambda1 * e_old)
                + sign * (norms / e_new.norm() * self.lambda2 * e_new))

    def to_dict(self) -> dict:
        return {"kind": self.kind, "neurons": [list(n) for n in self.neurons], "old_ids": list(self.old_ids),
                "new_ids": list(self.new_ids), "lambda1": self.lambda1, "lambda2": self.lambda2,
                "embedding": self.embedding, "multi_token": self.multi_token,
                "excluded": [list(n) for n in self.excluded], "flipped": [list(n) for n in self.flipped]}

    def describe(self) -> str:
        return (f"Update {_neurons_str(self.neurons)}: tokens {list(self.old_ids)} -> {list(self.new_ids)} "
                f"(λ1={self.lambda1:g}, λ2={self.lambda2:g}, {self.embedding} embedding"
                + (f", sign reversed on {len(self.flipped)} negatively active" if self.flipped else "") + ")")


@dataclass(frozen=True)
class Erase(_WeightEditBase):
    """Sets the neurons' value vectors to zero, or to the unknown token's embedding (fill='unk')."""

    neurons: tuple[Neuron, ...]
    fill: str = "zero"
    embedding: str = "input"
    kind = "erase"

    def __post_init__(self):
        object.__setattr__(self, "neurons", _norm_neurons(self.neurons))
        if self.fill not in ("zero", "unk"):
            raise ValueError(f"fill must be 'zero' or 'unk', not {self.fill!r}")

    def _new_vectors(self, lm, layer, idx, old):
        if self.fill == "zero":
            return torch.zeros_like(old)
        unk = getattr(lm.tokenizer, "unk_token_id", None)
        if unk is None:
            raise ValueError("this tokenizer has no unknown token; erase with fill='zero'")
        e = _embedding_matrix(lm, self.embedding)[int(unk)].float().to(old.device)
        return e.expand_as(old).clone()

    def apply(self, lm) -> EditHandle:
        if self.fill == "unk" and getattr(lm.tokenizer, "unk_token_id", None) is None:
            raise ValueError("this tokenizer has no unknown token; erase with fill='zero'")
        return super().apply(lm)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "neurons": [list(n) for n in self.neurons], "fill": self.fill,
                "embedding": self.embedding}

    def describe(self) -> str:
        return f"Erase {_neurons_str(self.neurons)} (value vectors -> {self.fill})"


_KINDS = {"suppress": Suppress, "amplify": Amplify, "update": Update, "erase": Erase}


def edit_from_dict(d: dict) -> Edit:
    d = dict(d)
    kind = d.pop("kind", None)
    cls = _KINDS.get(kind)
    if cls is None:
        raise ValueError(f"unknown edit kind {kind!r}; known: {', '.join(_KINDS)}")
    d["neurons"] = tuple(tuple(n) for n in d.get("neurons", ()))
    for key in ("excluded", "flipped"):
        if key in d:
            d[key] = tuple(tuple(n) for n in d[key])
    for key in ("old_ids", "new_ids"):
        if key in d:
            d[key] = tuple(d[key])
    return cls(**d)


# --------------------------------------------------------------------------------------------------------
# Builders used by the experiments and the CLI
# --------------------------------------------------------------------------------------------------------

def neuron_frequencies(neuron_sets: Sequence[Iterable[Neuron]]) -> dict[Neuron, int]:
    counts: dict[Neuron, int] = {}
    for neurons in neuron_sets:
        for n in set(_norm_neurons(neurons)):
            counts[n] = counts.get(n, 0) + 1
    return counts


def make_update(lm, neurons: Iterable[Neuron], old_ids, new_ids, relation_neuron_sets=(), fraction: float = 0.1,
                lambda1: float = 1.0, lambda2: float = 8.0, embedding: str | None = None,
                multi_token: str | None = None, activations: Sequence[np.ndarray] | None = None) -> Update:
    """An Update of one fact's knowledge neurons, leaving out neurons that are knowledge neurons of more than
    `fraction` of the relation's *other* facts (`relation_neuron_sets`: their refined sets, without this
    fact's own; counting the fact itself would exclude every neuron of a relation with fewer than 10 facts).

    `activations` (each prompt's [layers, neurons] at the answer) makes the update sign-aware: neurons whose
    mean activation over the prompts is negative get the edit reversed (`Update.flipped`)."""
    neurons = _norm_neurons(neurons)
    counts = neuron_frequencies(relation_neuron_sets)
    n_facts = len(relation_neuron_sets)
    excluded = tuple(n for n in neurons if n_facts and counts.get(n, 0) > fraction * n_facts)
    kept = tuple(n for n in neurons if n not in excluded)
    return Update(kept, tuple(old_ids), tuple(new_ids), lambda1, lambda2, embedding or default_embedding(lm),
                  multi_token or default_multi_token(lm), excluded, negatively_active(kept, activations))


def negatively_active(neurons: Sequence[Neuron], activations: Sequence[np.ndarray] | None) -> tuple[Neuron, ...]:
    """The neurons whose activation, averaged over prompts ([layers, neurons] each), is negative."""
    if not activations:
        return ()
    mean = np.mean(np.stack([np.asarray(a, dtype=np.float64) for a in activations]), axis=0)
    return tuple(n for n in neurons if mean[n] < 0)


def erase_neurons(relation_neuron_sets: Sequence[Iterable[Neuron]], k: int = 20) -> list[Neuron]:
    """The k most frequent knowledge neurons of a relation (ties: lower layer, lower index first)."""
    counts = neuron_frequencies(relation_neuron_sets)
    return [n for n, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:k]]


def make_erase(lm, relation_neuron_sets, k: int = 20, fill: str = "zero", embedding: str | None = None) -> Erase:
    return Erase(tuple(erase_neurons(relation_neuron_sets, k)), fill, embedding or default_embedding(lm))


def random_neurons(lm, like: Sequence[Neuron], seed: int = 0, exclude: Iterable[Neuron] = ()) -> list[Neuron]:
    """As many random neurons as `like`, drawn from the same layers (one per neuron of `like`), seeded."""
    rng = random.Random(seed)
    taken = set(_norm_neurons(exclude)) | set(_norm_neurons(like))
    out: list[Neuron] = []
    for layer, _ in _norm_neurons(like):
        for _ in range(1000):
            n = (layer, rng.randrange(lm.layout.neurons))
            if n not in taken:
                break
        taken.add(n)
        out.append(n)
    return out


# --------------------------------------------------------------------------------------------------------
# EditStack
# --------------------------------------------------------------------------------------------------------

@dataclass
class _Entry:
    edit: Edit
    enabled: bool = True


class EditStack:
    """An undo/redo history of edits on one loaded model.

    Entries below the cursor are *done*; `undo()` moves the cursor down (reverting), `redo()` up
    (re-applying); `push()` drops everything above the cursor (the redo branch). A done entry can also be
    switched off and on (`set_enabled`) without losing its place. The model always equals the original with
    the active edits applied in stack order."""

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
    def push(self, edit: Edit) -> int:
        self._unwind_to(self.cursor)
        del self.entries[self.cursor:]
        self.entries.append(_Entry(edit))
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
                 "enabled": e.enabled, "active": i < self.cursor and e.enabled} for i, e in enumerate(self.entries)]

    def to_dict(self) -> dict:
        return {"version": 1, "cursor": self.cursor,
                "entries": [{"edit": e.edit.to_dict(), "enabled": e.enabled} for e in self.entries]}

    def load_dict(self, state: dict) -> None:
        """Reverts everything, then takes the saved history and applies its active edits."""
        if state.get("version", 1) != 1:
            raise ValueError(f"unknown edit-stack version {state.get('version')!r}")
        entries = [_Entry(edit_from_dict(e["edit"]), bool(e.get("enabled", True))) for e in state.get("entries", [])]
        cursor = int(state.get("cursor", len(entries)))
        if not 0 <= cursor <= len(entries):
            raise ValueError(f"cursor {cursor} outside 0..{len(entries)}")
        self.clear()
        self.entries, self.cursor = entries, cursor
        self._rewind()

    @classmethod
    def from_dict(cls, lm, state: dict) -> "EditStack":
        stack = cls(lm)
        stack.load_dict(state)
        return stack

    def __len__(self) -> int:
        return len(self.entries)


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
    skipped = [e for e in active if isinstance(e, _ActivationEdit) and e.scope == "answer"]
    if skipped and not skip_unexportable:
        raise ValueError(f"{len(skipped)} active edit(s) act only at the answer position and cannot be saved as "
                         f"weights ({skipped[0].describe()}); re-apply them with scope 'all' or skip them")
    baked = [_Scale(e.neurons, e._factor()) for e in active if isinstance(e, _ActivationEdit) and e.scope == "all"]
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

    def _new_vectors(self, lm, layer, idx, old):
        return old * self.factor
