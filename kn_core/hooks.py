"""Every way the engine reaches into a running model, each scoped: hooks live for a with-block (and are removed
on the way out, also after an exception) or until `remove()` for edits that stay on until reverted.

- `Hooks`: forward-pre-hooks (with kwargs) and forward hooks on any modules.
- `ActivationPatch`: the named hook point of the whole engine, the FFN neurons (input of each out-projection),
  always seen as (batch, seq, neurons); `capture_activations` reads them.
- `Override` / `replay` / `tiled_replay`: a module's forward replaced (attribution replays clean outputs, causal
  tracing the corrupted run's, instead of computing).
- `replacing_output`: a forward hook that edits a module's output tensor (the first element of a tuple output).
- `InputCapture`: the ids and attention mask of the model's latest forward (answer-scoped edits).
- `capture_routing` / `hold_routing`: a mixture-of-experts model's routing (top-k experts and weights per token,
  per MoE layer) recorded in one forward and held fixed in later ones (attribution holds the clean run's).
- `answer_positions` / `answer_position_mask`: where the answer is in a forward, for answer-scoped edits. When
  `evaluation` runs a batch it publishes the exact positions through `answer_positions(mask)`. Without that,
  a causal model's answer position is the last (non-padding) position of each sequence in each forward (also
  during generation with a KV cache), and a masked model's are the positions of its mask token, read from the
  `input_ids` given to the model.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

PreHook = Callable  # (module, args, kwargs) -> None | (args, kwargs)
PostHook = Callable  # (module, args, output) -> None | output


class Hooks:
    """Forward-pre-hooks (with kwargs) and forward hooks, registered now and removed by `remove()` or at the end
    of a with-block."""

    def __init__(self, pre: Iterable[tuple[nn.Module, PreHook]] = (),
                 post: Iterable[tuple[nn.Module, PostHook]] = ()):
        self._handles: list = []
        try:
            for module, hook in pre:
                self._handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
            for module, hook in post:
                self._handles.append(module.register_forward_hook(hook))
        except BaseException:
            self.remove()
            raise

    def remove(self) -> None:
        for handle in reversed(self._handles):
            handle.remove()
        self._handles.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def hidden_states_of(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """A block's input hidden states, passed positionally or as a keyword."""
    hidden = args[0] if args else kwargs.get("hidden_states")
    return hidden if isinstance(hidden, torch.Tensor) else None


def replacing_hidden(fn: Callable[[torch.Tensor], torch.Tensor]) -> PreHook:
    """A pre-hook that replaces a block's input hidden states (positional or keyword) with `fn(hidden)`."""
    def hook(module, args, kwargs):
        if args:
            return (fn(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": fn(kwargs["hidden_states"])}
    return hook


class ActivationPatch(Hooks):
    """Pre-hooks on the out-projections of `layers` (all by default); `fn(layer, x) -> x | None` sees each FFN
    activation x (batch, seq, neurons) and may return a replacement.

    Families whose blocks flatten tokens to (batch * seq, ...) before the FFN (`FamilySpec.flattens_tokens`) get
    a second pre-hook on the block that records the token shape, so `fn` still sees (batch, seq, neurons).
    """

    def __init__(self, layout, fn: Callable[[int, torch.Tensor], torch.Tensor | None], layers=None):
        pre = []
        for layer in (range(layout.layers) if layers is None else layers):
            token_shape: list[torch.Size] = []

            def remember(module, args, kwargs, token_shape=token_shape):
                hidden = hidden_states_of(args, kwargs)
                token_shape[:] = [hidden.shape[:-1]] if hidden is not None else []

            def hook(module, args, kwargs, layer=layer, token_shape=token_shape):
                x = args[0]
                flat = x.dim() == 2 and bool(token_shape)
                seen = x.view(*token_shape[0], x.shape[-1]) if flat else x
                width = seen.shape[-1]
                if width < layout.neurons:  # a narrower layer of an MoE model: zero padding, never selected
                    seen = torch.nn.functional.pad(seen, (0, layout.neurons - width))
                out = fn(layer, seen)
                if out is None:
                    return None
                out = out[..., :width]
                return ((out.reshape(x.shape) if flat else out), *args[1:]), kwargs

            if layout.spec.flattens_tokens:
                pre.append((layout.blocks[layer], remember))
            pre.append((layout.out_projs[layer], hook))
        super().__init__(pre)


def capture_activations(layout, run: Callable[[], object], layers=None) -> tuple[object, dict[int, torch.Tensor]]:
    """Runs `run()` and returns its result and the FFN activations (batch, seq, neurons) per layer."""
    captured: dict[int, torch.Tensor] = {}

    def record(layer, x):
        captured[layer] = x.detach()

    with ActivationPatch(layout, record, layers):
        result = run()
    return result, captured


class Override:
    """Replaces the forward of modules with the given functions for the duration of a with-block.

    The module's own instance `forward`, if any (accelerate's device hooks put one there), is restored after.
    """

    def __init__(self, forwards: Sequence[tuple[nn.Module, Callable]]):
        self.forwards = list(forwards)

    def __enter__(self):
        self.saved = []
        try:
            for module, forward in self.forwards:
                self.saved.append(module.__dict__.get("forward"))
                module.forward = forward
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc):
        for (module, _), saved in zip(self.forwards, self.saved):
            if saved is None:
                del module.forward  # back to the class's forward
            else:
                module.forward = saved


def _expand(obj, rows: int):
    if isinstance(obj, torch.Tensor):
        return obj.expand(rows, *obj.shape[1:]) if obj.dim() and obj.shape[0] == 1 else obj
    if isinstance(obj, tuple):
        return tuple(_expand(o, rows) for o in obj)
    return obj


def replay(replays: Iterable[tuple[nn.Module, object]], rows: int) -> Override:
    """Modules that return a recorded output, expanded to `rows`, instead of computing it."""
    return Override([(module, lambda *args, _out=_expand(out, rows), **kwargs: _out) for module, out in replays])


_ROUTING: contextvars.ContextVar[tuple[str, dict] | None] = contextvars.ContextVar("kn_routing", default=None)


@contextlib.contextmanager
def capture_routing():
    """Within this block every MoE layer's routing is recorded (the latest forward's), into the dict yielded:
    {MoE module: moe.Routing}. Dense models record nothing."""
    recorded: dict = {}
    token = _ROUTING.set(("capture", recorded))
    try:
        yield recorded
    finally:
        _ROUTING.reset(token)


@contextlib.contextmanager
def hold_routing(routing: dict):
    """Within this block the MoE layers in `routing` (from `capture_routing`) route every token as recorded,
    whatever their input: a batch of rows repeats the recorded tokens (rows of the recorded sequence)."""
    token = _ROUTING.set(("hold", routing))
    try:
        yield
    finally:
        _ROUTING.reset(token)


def routing_mode() -> str | None:
    mode = _ROUTING.get()
    return None if mode is None else mode[0]


def routing_for(module: nn.Module, tokens: int, compute: Callable):
    """The routing an MoE module uses for a forward of `tokens` tokens: held, or `compute()` (recorded while
    capturing)."""
    mode = _ROUTING.get()
    if mode is not None and mode[0] == "hold" and module in mode[1]:
        return mode[1][module].repeated(tokens)
    routing = compute()
    if mode is not None and mode[0] == "capture":
        mode[1][module] = type(routing)(routing.index.detach(), routing.weights.detach(),
                                        None if routing.shared is None else routing.shared.detach())
    return routing


def _tile(obj, per_copy: int, times: int):
    if isinstance(obj, torch.Tensor):
        return obj.repeat(times, *[1] * (obj.dim() - 1)) if obj.dim() and obj.shape[0] == per_copy else obj
    if isinstance(obj, tuple):
        return tuple(_tile(o, per_copy, times) for o in obj)
    return obj


def tiled_replay(replays: Iterable[tuple[nn.Module, object]], per_copy: int, times: int) -> Override:
    """Modules that return a recorded output of `per_copy` rows tiled `times` over the batch (row k * per_copy
    + j is recorded row j), instead of computing it."""
    return Override([(module, lambda *args, _out=_tile(out, per_copy, times), **kwargs: _out)
                     for module, out in replays])


def replacing_output(fn: Callable[[torch.Tensor], torch.Tensor]) -> PostHook:
    """A forward hook that replaces a module's output tensor (or a tuple output's first element) with `fn(it)`."""
    def hook(module, args, output):
        if isinstance(output, tuple):
            return (fn(output[0]), *output[1:])
        return fn(output)
    return hook


class InputCapture(Hooks):
    """Remembers the input_ids and attention_mask of the model's latest forward, until `remove()`."""

    def __init__(self, model: nn.Module):
        self.input_ids: torch.Tensor | None = None
        self.attention_mask: torch.Tensor | None = None
        super().__init__(pre=[(model, self._remember)])

    def _remember(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.input_ids = ids if isinstance(ids, torch.Tensor) else None
        mask = kwargs.get("attention_mask")
        self.attention_mask = mask if isinstance(mask, torch.Tensor) else None


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


def answer_position_mask(lm, capture: InputCapture, x: torch.Tensor) -> torch.Tensor | None:
    """Bool mask (batch, seq) of answer positions for an activation x (batch, seq, neurons); None when they
    cannot be told (an answer-scoped edit then leaves x as it is)."""
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
