"""Knowledge edits as values: Suppress, Amplify, Update, Erase (their history and export: `edit_stack`).

An edit is an immutable description (kind, neurons, parameters). `edit.apply(lm)` changes the loaded model
and returns a handle whose `revert()` undoes exactly that change:

* Activation edits (Suppress, Amplify) are forward-pre-hooks on the FFN out-projections (the one hook point
  of `hooks.py`); reverting removes the hooks. Their *scope* is "answer" (the paper's setting: only the
  positions that predict the answer) or "all" (every position: a persistent model edit, exportable).
* Weight edits (Update, Erase) write value vectors (out-projection columns; rows for GPT-2's Conv1D). They
  keep a copy of the original slices and restore them with `index_copy_`, so reverting is bitwise exact
  (`torch.equal`).

Which positions are the "answer positions" of a forward: `hooks.answer_position_mask`.

Weight edits must be reverted in the reverse order of application when they touch the same value vectors
(`edit_stack.EditStack` guarantees that). Every number that reaches the weights is checked to be finite.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Iterable, Sequence

import numpy as np
import torch

from .hooks import ActivationPatch, InputCapture, answer_position_mask
from .neurons import neuron_name
from .selection import Neuron


def _finite(value, name: str) -> float:
    """float(value), or a one-line ValueError naming the parameter: NaN/Inf must never reach the weights."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, not {value!r}") from None
    if isinstance(value, bool) or not np.isfinite(number):
        raise ValueError(f"{name} must be a finite number, not {value!r}")
    return number


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


def check_neurons(lm, neurons: Sequence[Neuron]) -> None:
    """ValueError naming the first neuron outside the loaded model (e.g. a set made on another model)."""
    layout = lm.layout
    for layer, index in neurons:
        if not (0 <= layer < layout.layers and 0 <= index < layout.neurons):
            raise ValueError(f"neuron ({layer}, {index}) is outside this model ({layout.layers} layers x "
                             f"{layout.neurons} neurons)")
        if index >= layout.width(layer):  # the padding of a narrower (dense) layer of an MoE model
            raise ValueError(f"neuron ({layer}, {index}) is outside layer {layer}, which has "
                             f"{layout.width(layer)} neurons")


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
    shown = ", ".join(neuron_name(l, i) for l, i in neurons[:limit])
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

    def _values(self) -> dict[Neuron, float] | None:
        """Constant activations to set (mean ablation), or None to scale by `_factor()`."""
        return None

    def apply(self, lm) -> EditHandle:
        check_neurons(lm, self.neurons)
        groups = _by_layer(self.neurons)
        factor = self._factor()
        values = self._values()
        constants = None if values is None else \
            {layer: torch.tensor([values[(layer, i)] for i in idx]) for layer, idx in groups.items()}
        capture = InputCapture(lm.model) if self.scope == "answer" else None
        index_cache: dict[tuple[int, torch.device], torch.Tensor] = {}

        def fn(layer, x):
            key = (layer, x.device)
            if key not in index_cache:
                index_cache[key] = torch.tensor(groups[layer], dtype=torch.long, device=x.device)
            idx = index_cache[key]
            x = x.clone()

            def changed(old):
                if constants is not None:
                    return constants[layer].to(device=old.device, dtype=old.dtype).expand_as(old)
                return old * factor if factor != 0.0 else torch.zeros_like(old)

            if self.scope == "all":
                x[..., idx] = changed(x[..., idx])
                return x
            mask = answer_position_mask(lm, capture, x)
            if mask is None:
                return None
            sel = x[mask]  # (n_positions, neurons)
            sel[:, idx] = changed(sel[:, idx])
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
    """Sets the neurons' activation to 0 (the paper; at the answer positions, or everywhere with
    scope='all'), or with to='mean' to each neuron's mean activation (`means`, aligned with `neurons`, e.g.
    from `kn_core.neurons.ActivationStats`): mean ablation removes what is specific to the input without
    pushing the model to an activation it never sees, which matters for neurons whose typical activation is
    far from 0 (massive activations)."""

    neurons: tuple[Neuron, ...]
    scope: str = "answer"
    to: str = "zero"
    means: tuple[float, ...] = ()
    kind = "suppress"

    def __post_init__(self):
        if self.to not in ("zero", "mean"):
            raise ValueError(f"suppress to must be 'zero' or 'mean', not {self.to!r}")
        raw = [(int(l), int(i)) for l, i in self.neurons]
        means = tuple(_finite(m, "mean activation") for m in self.means)
        if self.to == "mean" and len(means) != len(raw):
            raise ValueError(f"mean ablation needs one mean per neuron ({len(raw)} neurons, {len(means)} means)")
        if self.to == "zero" and means:
            raise ValueError("means are only used with to='mean'")
        if means:
            by_neuron = dict(zip(raw, means))
            object.__setattr__(self, "means", tuple(by_neuron[n] for n in _norm_neurons(raw)))
        super().__post_init__()

    def _factor(self) -> float:
        return 0.0

    def _values(self) -> dict[Neuron, float] | None:
        return dict(zip(self.neurons, self.means)) if self.to == "mean" else None

    def to_dict(self) -> dict:
        out = {"kind": self.kind, "neurons": [list(n) for n in self.neurons], "scope": self.scope}
        if self.to == "mean":
            out |= {"to": self.to, "means": list(self.means)}
        return out

    def describe(self) -> str:
        return (f"Suppress {_neurons_str(self.neurons)}" + (" to their mean activation" if self.to == "mean" else "")
                + f", {self.scope} positions")


@dataclass(frozen=True)
class Amplify(_ActivationEdit):
    """Multiplies the neurons' activation by `factor` (2 by default: the paper's "double the activation").

    The factor multiplies the *signed* activation: a neuron at -3 goes to -6. Its contribution to the residual
    stream, activation x value vector, is then doubled in the direction it already pushes, which is what
    "strengthen this neuron" means for the negative activations of SwiGLU/GELU models; it is not |a| x 2."""

    neurons: tuple[Neuron, ...]
    factor: float = 2.0
    scope: str = "answer"
    kind = "amplify"

    def __post_init__(self):
        object.__setattr__(self, "factor", _finite(self.factor, "amplify factor"))
        super().__post_init__()

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
        check_neurons(lm, self.neurons)
        layout = lm.layout
        saved = []
        with torch.no_grad():
            for layer, idx in _by_layer(self.neurons).items():
                # one weight per expert in an MoE layer (its down projection, a view of the 3-D parameter)
                for weight, axis, positions, local in layout.value_slices(layer, idx):
                    index = torch.tensor(local, dtype=torch.long, device=weight.device)
                    original = weight.index_select(axis, index).clone()
                    vectors = original if axis == 0 else original.T  # (k, hidden)
                    new = self._new_vectors(lm, layer, [idx[k] for k in positions], vectors.float()).to(weight.dtype)
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
    bad = [i for i in ids if not 0 <= i < matrix.shape[0]]
    if bad:
        raise ValueError(f"token id {bad[0]} is outside this model's vocabulary (0..{matrix.shape[0] - 1})")
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
        object.__setattr__(self, "lambda1", _finite(self.lambda1, "lambda1"))
        object.__setattr__(self, "lambda2", _finite(self.lambda2, "lambda2"))

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


@dataclass(frozen=True)
class Batch(Edit):
    """Several edits as one history entry (`kn edit batch`, the GUI's multi-fact apply): applied in order and
    reverted in reverse order, so a batch changes the model exactly as pushing its edits one by one would.
    Requests that share neurons compose in that order: a weight edit reads the value vectors the edits
    before it left (an update scales by the current |v|), activation hooks run one after another.

    Consecutive zero-suppressions with the same scope share one hook (zeroing a neuron twice is zeroing it
    once), so a thousand suppress requests cost one hook per layer at every forward pass, not a thousand."""

    edits: tuple[Edit, ...]
    label: str = ""
    kind = "batch"

    def __post_init__(self):
        object.__setattr__(self, "edits", tuple(self.edits))
        if not self.edits:
            raise ValueError("a batch needs at least one edit")
        for e in self.edits:
            if not isinstance(e, Edit) or isinstance(e, Batch):
                raise ValueError(f"a batch holds single edits, not {type(e).__name__}")

    @property
    def neurons(self) -> tuple[Neuron, ...]:
        return _norm_neurons(n for e in self.edits for n in e.neurons)

    @property
    def is_weight_edit(self) -> bool:
        return any(e.is_weight_edit for e in self.edits)

    def _coalesced(self) -> list[Edit]:
        out: list[Edit] = []
        for e in self.edits:
            last = out[-1] if out else None
            if (isinstance(e, Suppress) and e.to == "zero" and isinstance(last, Suppress) and last.to == "zero"
                    and last.scope == e.scope):
                out[-1] = Suppress(last.neurons + e.neurons, e.scope)
            else:
                out.append(e)
        return out

    def apply(self, lm) -> EditHandle:
        check_neurons(lm, self.neurons)
        handles: list[EditHandle] = []

        def revert():
            for handle in reversed(handles):
                handle.revert()

        try:
            for e in self._coalesced():
                handles.append(e.apply(lm))
        except Exception:
            revert()
            raise
        return EditHandle(self, revert)

    def to_dict(self) -> dict:
        # "neurons" (the union) is derived; it is written for readers of the saved history and ignored on load
        return {"kind": self.kind, "neurons": [list(n) for n in self.neurons], "label": self.label,
                "edits": [e.to_dict() for e in self.edits]}

    def describe(self) -> str:
        counts: dict[str, int] = {}
        for e in self.edits:
            counts[e.kind] = counts.get(e.kind, 0) + 1
        kinds = ", ".join(f"{n} {k}" for k, n in counts.items())
        return f"Batch of {len(self.edits)} edits ({kinds}; {_neurons_str(self.neurons)})" + \
            (f": {self.label}" if self.label else "")


def _batch_from_dict(d: dict) -> Batch:
    unknown = sorted(set(d) - {"edits", "label", "neurons"}, key=str)
    if unknown:
        raise ValueError(f"batch edit has unknown field(s) {', '.join(map(repr, unknown))}; known: edits, label")
    raw = d.get("edits")
    if not isinstance(raw, list) or not raw:
        raise ValueError("batch edit needs a non-empty list 'edits'")
    parts = []
    for i, e in enumerate(raw):
        if isinstance(e, dict) and e.get("kind") == "batch":
            raise ValueError(f"batch edit: edit {i} is itself a batch")
        try:
            parts.append(edit_from_dict(e))
        except ValueError as exc:
            raise ValueError(f"batch edit {i}: {exc}") from None
    label = d.get("label", "")
    if not isinstance(label, str):
        raise ValueError(f"batch edit label must be text, not {label!r}")
    return Batch(tuple(parts), label)


_KINDS = {"suppress": Suppress, "amplify": Amplify, "update": Update, "erase": Erase}


def edit_from_dict(d: dict) -> Edit:
    """The edit described by `Edit.to_dict()` output; a one-line ValueError for anything else (an unknown
    kind, a missing, unknown or malformed field)."""
    if not isinstance(d, dict):
        raise ValueError(f"an edit must be a JSON object, not {type(d).__name__}")
    d = dict(d)
    kind = d.pop("kind", None)
    if kind == "batch":
        return _batch_from_dict(d)
    cls = _KINDS.get(kind)
    if cls is None:
        raise ValueError(f"unknown edit kind {kind!r}; known: {', '.join(_KINDS)}, batch")
    known = [f.name for f in fields(cls)]
    unknown = sorted(set(d) - set(known), key=str)
    if unknown:
        raise ValueError(f"{kind} edit has unknown field(s) {', '.join(map(repr, unknown))}; known: {', '.join(known)}")
    if "neurons" not in d:
        raise ValueError(f"{kind} edit has no 'neurons'")
    try:
        for key in ("neurons", "excluded", "flipped"):
            if key in d:
                d[key] = tuple((int(layer), int(index)) for layer, index in d[key])
        for key in ("old_ids", "new_ids", "means"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)
    except (TypeError, ValueError) as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(f"malformed {kind} edit: {message}") from None
