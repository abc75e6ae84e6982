"""Integrated gradients over FFN neurons (Dai et al., 2022). Coarse, refined and relation-level neurons are
selected from these scores in `kn_core.neurons`.

Attr(w_i^l) = (w_i / m) * sum_k dP(alpha_k * w^l)/dw_i, where the whole activation vector of layer l at the
answer position is scaled by alpha_k and P is the answer's probability. Right Riemann points alpha_k = k/m
(k = 1..m, the paper) or left points k = 0..m-1 (the authors' code).

How it is fast without approximating anything:
- Every row of a batch patches one (layer, step) pair, and rows never run a block below their layer: those
  blocks' outputs are identical to the clean run's, so they are replayed from a cache. In the lowest block of
  a pass, everything before the patch point (attention, the FFN's input side) is replayed too.
- A pass runs the rows of a range of layers in one batch that grows as it goes up: the rows of layer l join
  at block l's input, so no block runs that need not run. Passes hold as many layers as memory allows
  (`plan_passes`); several passes share one vocabulary head and one backward.
- BERT-style encoders: rows join at the FFN output module (skipping their block's attention and FFN input
  side), and the last block computes only the mask position.
- Causal models: the prompt prefix runs once and its key/value cache is shared by all rows, so each row
  computes only the answer position. Masked models: the vocabulary head runs only at the mask.
- A fact's prompts can share passes (masked LMs with BERT-style blocks; on by default on GPUs): their sequences
  are packed side by side in every row with block-diagonal attention, so a row patches one (layer, alpha) pair at
  every prompt's answer at once, with no padding (`_SharedRunner`).
- Parameters never need gradients; one backward gives the gradient of every row at once.
- Groups are sized to a memory budget; on CUDA out-of-memory a group is split and retried.
"""

from __future__ import annotations

import copy
import math
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from . import neurons as kn_neurons
from .ffn import ActivationPatch, capture_activations
from .models import LoadedModel
from .validation import check_choice, check_int, check_positive, check_steps

CPU_ROWS_PER_PASS = 120
CPU_TOKENS_PER_PASS = 400
_FIXED_BATCH = {"bloom", "gpt_bigcode"}  # per-batch ALiBi tensors; a final view to the input batch
ProgressFn = Callable[[float, "dict | None"], None]


class Cancelled(Exception):
    """Raised when a CancelToken is set; nothing partial is returned."""


class CancelToken:
    def __init__(self):
        self._cancelled = False

    def cancel(self):
        self._cancelled = True

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def check(self):
        if self._cancelled:
            raise Cancelled("attribution cancelled")


class PromptError(ValueError):
    pass


@dataclass(frozen=True)
class AttributionParams:
    steps: int = 20
    rule: str = "right"  # "right": alpha = k/m, k=1..m (paper); "left": k=0..m-1 (authors' code)
    method: str = "ig"  # "ig" or "activation" (the paper's baseline: score = raw activation)
    multi_token: str = "mean"  # how per-token scores of a multi-token answer combine: "mean", "sum", "first"
    layers_per_pass: int | None = None  # None: chosen from the device and the memory budget (plan_passes)
    passes_per_backward: int | None = None  # None: as many as the memory budget allows (plan_passes)
    memory_budget_mb: int | None = None  # None: 2 GiB on CPU, a quarter of free memory on CUDA
    seed: int = 0
    share_prompts: bool | None = None  # a fact's prompts in shared passes (`shares_passes`); None: on accelerators
    # steps above validation.MAX_STEPS only on purpose; not a scoring parameter, so not in to_dict()
    force: bool = field(default=False, compare=False, repr=False)

    def __post_init__(self):
        check_steps(self.steps, self.force)
        check_choice("rule", self.rule, ("right", "left"))
        check_choice("method", self.method, ("ig", "activation"))
        check_choice("multi_token", self.multi_token, ("mean", "sum", "first"))
        for name in ("layers_per_pass", "passes_per_backward"):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), 1)
        if self.memory_budget_mb is not None:
            check_positive("memory_budget_mb", self.memory_budget_mb)
        check_int("seed", self.seed, 0)
        check_choice("share_prompts", self.share_prompts, (None, True, False))

    def alphas(self) -> list[float]:
        m = self.steps
        ks = range(1, m + 1) if self.rule == "right" else range(0, m)
        return [k / m for k in ks]

    def to_dict(self) -> dict:
        out = asdict(self)
        del out["force"]
        return out


def default_t(method: str) -> float:
    """The paper's coarse threshold: 0.2 x max for attribution, 0.5 x max for the activation baseline."""
    return 0.5 if method == "activation" else 0.2


@dataclass
class PromptScores:
    prompt: str
    answer: str
    answer_ids: tuple[int, ...]
    scores: np.ndarray  # float32 [layers, neurons]
    activations: np.ndarray  # float32 [layers, neurons], mean over answer tokens
    prob: float  # P(answer): product of the teacher-forced token probabilities
    token_probs: list[float]
    completeness: list[dict]  # per layer: {"layer", "sum", "delta", "ratio"}
    seconds: float
    params: dict = field(default_factory=dict)

    def coarse(self, t: float = 0.2) -> list[kn_neurons.Neuron]:
        return kn_neurons.coarse_neurons(self.scores, t)


@dataclass(frozen=True)
class _Target:
    """One answer token: the input ids, the position that predicts it, and its id."""
    ids: tuple[int, ...]
    pos: int
    token: int


def _targets(lm: LoadedModel, text: str, answer_ids: Sequence[int]) -> list[_Target]:
    tok = lm.tokenizer
    if not text or not text.strip():
        raise PromptError("the prompt is empty; type the sentence that leads to the answer")
    if not answer_ids:
        raise PromptError("the answer has no tokens; give the object to attribute")
    ids = list(tok(text)["input_ids"])
    if lm.kind == "causal":
        targets = []
        for j, token in enumerate(answer_ids):
            prefix = ids + list(answer_ids[:j])  # teacher forcing: the true answer tokens, never the argmax
            targets.append(_Target(tuple(prefix), len(prefix) - 1, int(token)))
        return targets
    mask_id = tok.mask_token_id
    if mask_id is None:
        raise PromptError(f"{lm.family} has no mask token; it cannot be used as a masked language model")
    slots = [i for i, t in enumerate(ids) if t == mask_id]
    if not slots:
        raise PromptError(f"the prompt has no mask slot; put {tok.mask_token} (or [Y] in a template) where "
                          f"the answer goes")
    if len(slots) != len(answer_ids):
        raise PromptError(f"the prompt has {len(slots)} mask slot(s) but the answer has {len(answer_ids)} "
                          f"token(s); use one {tok.mask_token} per answer token")
    targets = []
    for j, token in enumerate(answer_ids):
        filled = list(ids)
        for k in range(j):  # earlier slots teacher-forced with the true tokens, later ones stay masked
            filled[slots[k]] = int(answer_ids[k])
        targets.append(_Target(tuple(filled), slots[j], int(token)))
    return targets


def encode_answer(lm: LoadedModel, text: str, answer: str) -> tuple[int, ...]:
    """Token ids of `answer` as it continues `text` (causal) or fills the mask slots (masked)."""
    tok = lm.tokenizer
    if lm.kind == "causal":
        prompt_ids = tok(text)["input_ids"]
        full_ids = tok(text + answer)["input_ids"]
        if full_ids[: len(prompt_ids)] == prompt_ids and len(full_ids) > len(prompt_ids):
            return tuple(full_ids[len(prompt_ids):])
    ids = tok(answer, add_special_tokens=False)["input_ids"]
    if tok.unk_token_id is not None and tok.unk_token_id in ids and lm.kind == "masked":
        raise PromptError(f"the tokenizer maps {answer!r} to the unknown token; pick a word in its vocabulary")
    return tuple(ids)


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """Probabilities and gradients in float32 even for half-precision models (float64 stays float64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _expand(obj, rows: int):
    if isinstance(obj, torch.Tensor):
        return obj.expand(rows, *obj.shape[1:]) if obj.dim() and obj.shape[0] == 1 else obj
    if isinstance(obj, tuple):
        return tuple(_expand(o, rows) for o in obj)
    return obj


class _Override:
    """Replaces the forward of modules with the given functions for the duration of a `with`.

    The module's own instance `forward`, if any (accelerate's device hooks put one there), is restored after.
    """

    def __init__(self, forwards: Sequence[tuple[nn.Module, Callable]]):
        self.forwards = list(forwards)

    def __enter__(self):
        self.saved = [module.__dict__.get("forward") for module, _ in self.forwards]
        for module, forward in self.forwards:
            module.forward = forward
        return self

    def __exit__(self, *exc):
        for (module, _), saved in zip(self.forwards, self.saved):
            if saved is None:
                del module.forward  # back to the class's forward
            else:
                module.forward = saved


def _replay(replays: Iterable[tuple[nn.Module, object]], rows: int) -> _Override:
    """Modules that return their clean output, expanded to `rows`, instead of computing it."""
    return _Override([(module, lambda *args, _out=_expand(out, rows), **kwargs: _out) for module, out in replays])


def _bert_style(block: nn.Module) -> bool:
    attention = getattr(block, "attention", None)
    self_attention = getattr(attention, "self", None)
    return (hasattr(attention, "output") and not getattr(block, "is_decoder", True)
            and all(hasattr(self_attention, name) for name in ("query", "key", "value", "scaling", "attention_head_size")))


def _attention_at(attention: nn.Module, pos: int | torch.Tensor) -> Callable:
    """A BERT-style attention forward whose queries and output are only the answer position(s), the same in
    every row: in the last block of a masked LM nothing else reaches the answer, so the rest of the block runs on
    those positions instead of all.
    """
    heads = attention.self
    at = slice(pos, pos + 1) if isinstance(pos, int) else pos

    def forward(hidden_states, attention_mask=None, *args, **kwargs):
        rows = hidden_states.shape[0]
        here = hidden_states[:, at]
        if attention_mask is not None and attention_mask.shape[-2] > 1:
            attention_mask = attention_mask[..., at, :]

        def split(x):
            return x.view(rows, x.shape[1], -1, heads.attention_head_size).transpose(1, 2)

        context = torch.nn.functional.scaled_dot_product_attention(
            split(heads.query(here)), split(heads.key(hidden_states)), split(heads.value(hidden_states)),
            attn_mask=attention_mask, scale=heads.scaling)
        return attention.output(context.transpose(1, 2).reshape(rows, here.shape[1], -1), here), None

    return forward


def _record_replayable(layout, layer: int, outputs: dict[nn.Module, object]) -> list:
    """Hooks that fill `outputs` with the clean output of each module of block `layer` that runs before the
    out-projection and only once: in a pass whose lowest layer is `layer`, those outputs are the same for every
    row (the patch comes later), so the block need not recompute its attention or the FFN's input side.
    """
    path = layout.path_to_out_proj(layer)
    out_proj = layout.out_projs[layer]
    calls: Counter = Counter()
    reached = []

    def record(module, args, output):
        calls[module] += 1
        if not reached:
            outputs[module] = output

    def mark_patch_point(module, args):
        reached.append(True)

    handles = [out_proj.register_forward_pre_hook(mark_patch_point)]
    for parent in path:
        for child in parent.children():
            if child is not out_proj and not any(child is p for p in path):
                handles.append(child.register_forward_hook(record))

    def finish():
        for h in handles:
            h.remove()
        for module, n in calls.items():  # a module called again after the patch point must really run
            if n != 1 or not _batch_of_one(outputs.get(module)):
                outputs.pop(module, None)

    return finish


def _batch_of_one(obj) -> bool:
    if isinstance(obj, torch.Tensor):
        return obj.dim() > 0 and obj.shape[0] == 1
    if isinstance(obj, tuple):
        return any(isinstance(o, torch.Tensor) for o in obj) and all(
            o is None or _batch_of_one(o) for o in obj)
    return False


def _token_probs(layout, hidden: torch.Tensor, tokens: int | torch.Tensor) -> torch.Tensor:
    """P(token) for each row of final hidden states; `tokens`: one id, or one per row."""
    probs = torch.softmax(_at_least_fp32(layout.logits_head()(hidden)), dim=-1)
    if isinstance(tokens, int):
        return probs[:, tokens]
    return probs.gather(1, tokens.to(probs.device)[:, None])[:, 0]


class _Runner:
    """Runs one answer token: clean pass, then patched passes over (layer, alpha) rows."""

    def __init__(self, lm: LoadedModel, target: _Target, patching: bool = True):
        """`patching`: record what patched passes replay (not needed for the activation baseline)."""
        self.lm = lm
        self.layout = lm.layout
        # masked LMs whose blocks are all BERT-style: rows join at the FFN output, the last block runs at the mask
        self.bert_style = lm.kind == "masked" and all(_bert_style(block) for block in lm.layout.blocks)
        self.target = target
        self.device = lm.device
        ids = torch.tensor([target.ids], device=self.device)
        self.prefix_cache = None
        if lm.kind == "causal" and len(target.ids) > 1:
            with torch.no_grad():
                out = lm.model(input_ids=ids[:, :-1], use_cache=True, logits_to_keep=1)
            self.prefix_cache = out.past_key_values
            self.step_ids = ids[:, -1:]
            self.pos = 0  # each row computes only the answer position
        else:
            self.step_ids = ids
            self.pos = target.pos
        self._clean(patching)

    def _hidden(self, rows: int, cache_rows: Sequence[int] | None = None, pos: int | None = None) -> torch.Tensor:
        """The base model's final hidden state at the answer position, one row per batch row.

        `cache_rows[j]`: the batch that block j sees, when the batch grows inside the model (`_grown_pass`).
        `pos`: where the answer is in the final hidden states, when the last block returns fewer positions.
        """
        ids = self.step_ids.expand(rows, -1)
        if self.prefix_cache is None:
            return self.layout.base_model()(input_ids=ids).last_hidden_state[:, self.pos if pos is None else pos]
        cache = copy.deepcopy(self.prefix_cache)
        if cache_rows is not None:
            for layer, n in zip(cache.layers, cache_rows):
                if n > 1:
                    layer.batch_repeat_interleave(n)
        elif rows > 1:
            cache.batch_repeat_interleave(rows)
        return self.layout.base_model()(input_ids=ids, past_key_values=cache, use_cache=True).last_hidden_state[:, -1]

    def _probs(self, hidden: torch.Tensor) -> torch.Tensor:
        """Probability of the target token; the vocabulary head runs only at the answer position."""
        return _token_probs(self.layout, hidden, self.target.token)

    def _clean(self, patching: bool):
        outputs: dict[int, object] = {}
        inputs: dict[int, torch.Tensor] = {}
        inside: list[dict[nn.Module, object]] = [{} for _ in range(self.layout.layers)]
        handles, finishes = [], []
        if patching:
            handles = [block.register_forward_hook(lambda m, a, o, j=j: outputs.__setitem__(j, o))
                       for j, block in enumerate(self.layout.blocks)]
            handles += [block.register_forward_pre_hook(
                lambda m, a, kw, j=j: inputs.__setitem__(j, (a[0] if a else kw["hidden_states"]).detach()),
                with_kwargs=True) for j, block in enumerate(self.layout.blocks)]
            finishes = [_record_replayable(self.layout, j, inside[j]) for j in range(self.layout.layers)]
        try:
            with torch.no_grad():
                prob, acts = capture_activations(self.layout, lambda: self._probs(self._hidden(1)))
        finally:
            for h in handles:
                h.remove()
            for finish in finishes:
                finish()
        self.block_outputs = [outputs.get(j) for j in range(self.layout.layers)]
        self.block_inputs = [inputs.get(j) for j in range(self.layout.layers)]
        self.inside_outputs = inside
        self.prob = float(prob[0])
        self.acts = torch.stack([_at_least_fp32(acts[l][0, self.pos]).to(self.device) for l in range(self.layout.layers)])

    def patched(self, passes: Sequence[range], alphas: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
        """Gradients [layers, alphas, N] at the patched points and probabilities [layers, alphas].

        The final hidden states of all passes go through one vocabulary head and one backward.
        """
        n_alpha = len(alphas)
        alpha = torch.tensor(alphas, device=self.acts.device, dtype=self.acts.dtype)
        leaves, hiddens = [], []
        run_pass = self._fixed_pass if self.layout.family in _FIXED_BATCH else self._grown_pass
        with torch.enable_grad():
            for layers in passes:
                base = self.acts[layers.start:layers.stop]
                patch = (alpha[None, :, None] * base[:, None, :]).reshape(len(layers) * n_alpha, -1)
                leaves.append(patch.requires_grad_(True))
                hiddens.append(run_pass(layers, patch, n_alpha))
            head_device = hiddens[0].device
            probs = self._probs(torch.cat([h.to(head_device) for h in hiddens]))
            grads = torch.autograd.grad(probs.sum(), leaves)
        n_layers = sum(len(layers) for layers in passes)
        grad = torch.cat([g.to(self.acts.device) for g in grads])
        return grad.reshape(n_layers, n_alpha, -1).detach(), probs.detach().reshape(n_layers, n_alpha)

    def _grown_pass(self, layers: range, patch: torch.Tensor, n_alpha: int) -> torch.Tensor:
        """One pass whose batch grows: the rows of layer l join at block l from the clean values there, so no
        row ever runs a block below its layer. At block l the newest rows are layer l's.

        Rows join at the block's input; in BERT-style encoders, whose FFN output module takes the residual as
        an argument, they join right there instead, so they skip their block's attention and FFN input side.
        The pass's lowest block replays those for its rows. In a masked LM's BERT-style last block only the
        answer position is computed.
        """
        blocks, first, last = self.layout.blocks, layers.start, self.layout.layers - 1
        bert_style = self.bert_style

        def put(layer, x):
            x = x.clone()
            rows = slice((layer - first) * n_alpha, (layer - first + 1) * n_alpha)
            x[-n_alpha:, 0 if bert_style and layer == last else self.pos] = patch[rows].to(device=x.device,
                                                                                         dtype=x.dtype)
            return x

        below = list(zip(blocks[:first], self.block_outputs[:first]))
        inside = [] if bert_style and first == last else list(self.inside_outputs[first].items())
        last_attention = blocks[last].attention if bert_style else None
        at_answer = [(last_attention, _attention_at(last_attention, self.pos))] if bert_style else []
        joins = _joins(self.layout, layers, self.block_inputs, self.inside_outputs, slice(self.pos, self.pos + 1),
                       n_alpha, bert_style)
        cache_rows = [0] * first + [min(j - first + 1, len(layers)) * n_alpha
                                    for j in range(first, self.layout.layers)]
        with _replay(below, 1), _replay(inside, n_alpha), _Override(at_answer), _PreHooks(joins), \
                ActivationPatch(self.layout, put, layers):
            return self._hidden(1, cache_rows, pos=0 if bert_style else None)

    def _fixed_pass(self, layers: range, patch: torch.Tensor, n_alpha: int) -> torch.Tensor:
        """One pass with every row from the pass's lowest block up (rows of higher layers carry clean values
        until their layer): for families whose blocks get per-batch tensors (Bloom's ALiBi) that a grown
        batch would not match."""
        first, rows = layers.start, len(layers) * n_alpha

        def put(layer, x):
            x = x.clone()
            block = slice((layer - first) * n_alpha, (layer - first + 1) * n_alpha)
            x[block, self.pos] = patch[block].to(device=x.device, dtype=x.dtype)
            return x

        replays = [*zip(self.layout.blocks[:first], self.block_outputs[:first]), *self.inside_outputs[first].items()]
        with _replay(replays, rows), ActivationPatch(self.layout, put, layers):
            return self._hidden(rows)


class _SharedRunner:
    """The answer tokens of several prompts (a fact's) in the same passes, for masked LMs with BERT-style blocks.

    Each target's clean run is its own `_Runner`, so every clean value is exactly the unshared one. The patched
    passes pack the targets' sequences side by side into one sequence per row, and attention is block-diagonal:
    a position attends only within its own target, and everything else in a block is per position, so the
    targets cannot touch each other (no padding either). A row still patches one (layer, alpha) pair, now at
    every target's answer position at once, and its final hidden states are read at those positions: the same
    rows as one prompt, each as long as all of them. Same grown batch as `_Runner._grown_pass`: rows of layer l
    join at block l's FFN output, the last block computes only the answer positions.
    """

    def __init__(self, lm: LoadedModel, runners: Sequence[_Runner]):
        self.layout, self.runners = lm.layout, list(runners)
        device = lm.device
        lengths = [len(r.target.ids) for r in runners]
        starts = np.cumsum([0] + lengths[:-1]).tolist()
        self.seq = sum(lengths)
        self.acts = torch.stack([r.acts for r in runners])  # [targets, layers, neurons]
        self.positions = torch.tensor([a + r.pos for a, r in zip(starts, runners)], device=device)
        self.tokens = torch.tensor([r.target.token for r in runners], device=device)
        self.ids = torch.tensor([[i for r in runners for i in r.target.ids]], device=device)
        L = self.layout.layers
        self.block_outputs = [self._pack([r.block_outputs[l] for r in runners]) for l in range(L)]
        self.block_inputs = [self._pack([r.block_inputs[l] for r in runners]) for l in range(L)]
        self.inside_outputs = []
        for layer in range(L):
            found = [r.inside_outputs[layer] for r in runners]
            self.inside_outputs.append({m: self._pack([f[m] for f in found]) for m in found[0]
                                        if all(m in f for f in found)})
        segment = torch.repeat_interleave(torch.arange(len(runners), device=device),
                                          torch.tensor(lengths, device=device))
        dtype = self.acts.dtype if lm.model.dtype == torch.float64 else lm.model.dtype
        apart = segment[:, None] != segment[None, :]
        self.mask = torch.zeros(1, 1, self.seq, self.seq, dtype=dtype, device=device).masked_fill(
            apart, torch.finfo(dtype).min)  # additive: what both eager and sdpa attention take

    def _pack(self, values):
        """Per-target values [1, seq_t, ...] as one [1, sum of seq_t, ...]. In tuples (an attention's output and
        weights) what is not per position (the weights, which these blocks never read) becomes None."""
        if isinstance(values[0], tuple):
            return tuple(self._pack(list(v)) if self._per_position(v) else None for v in zip(*values))
        return torch.cat(values, dim=1)

    def _per_position(self, values) -> bool:
        return all(isinstance(v, torch.Tensor) and v.dim() >= 3 and v.shape[:2] == (1, len(r.target.ids))
                   for v, r in zip(values, self.runners))

    def patched(self, passes: Sequence[range], alphas: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
        """Gradients [layers, targets, alphas, N] and probabilities [layers, targets, alphas]."""
        n_alpha, n_targets = len(alphas), len(self.runners)
        alpha = torch.tensor(alphas, device=self.acts.device, dtype=self.acts.dtype)
        leaves, hiddens = [], []
        with torch.enable_grad():
            for layers in passes:
                base = self.acts[:, layers.start:layers.stop].transpose(0, 1)  # [layers, targets, N]
                patch = (alpha[None, :, None, None] * base[:, None]).reshape(-1, n_targets, base.shape[-1])
                leaves.append(patch.requires_grad_(True))
                hiddens.append(self._pass(layers, patch, n_alpha))
            hidden = torch.cat([h.to(hiddens[0].device) for h in hiddens])  # [rows, targets, hidden]
            probs = _token_probs(self.layout, hidden.flatten(0, 1), self.tokens.repeat(len(hidden)))
            grads = torch.autograd.grad(probs.sum(), leaves)
        n_layers = sum(len(layers) for layers in passes)
        grad = torch.cat([g.to(self.acts.device) for g in grads]).reshape(n_layers, n_alpha, n_targets, -1)
        return grad.transpose(1, 2).detach(), probs.detach().reshape(n_layers, n_alpha, n_targets).transpose(1, 2)

    def _pass(self, layers: range, patch: torch.Tensor, n_alpha: int) -> torch.Tensor:
        blocks, first, last = self.layout.blocks, layers.start, self.layout.layers - 1
        answers = self.positions

        def block_diagonal(module, args, kwargs):
            mask = self.mask.to(device=(args[0] if args else kwargs["hidden_states"]).device)
            if len(args) > 1:
                return (args[0], mask, *args[2:]), kwargs
            return args, {**kwargs, "attention_mask": mask}

        def put(layer, x):
            x = x.clone()
            rows = slice((layer - first) * n_alpha, (layer - first + 1) * n_alpha)
            at = torch.arange(len(answers), device=x.device) if layer == last else answers.to(x.device)
            x[-n_alpha:, at] = patch[rows].to(device=x.device, dtype=x.dtype)
            return x

        below = list(zip(blocks[:first], self.block_outputs[:first]))
        inside = [] if first == last else list(self.inside_outputs[first].items())
        masks = [(blocks[l].attention, block_diagonal) for l in range(first, last + 1)]
        joins = _joins(self.layout, layers, self.block_inputs, self.inside_outputs, answers, n_alpha, True)
        with _replay(below, 1), _replay(inside, n_alpha), \
                _Override([(blocks[last].attention, _attention_at(blocks[last].attention, answers))]), \
                _PreHooks(masks + joins), ActivationPatch(self.layout, put, layers):
            # the embeddings' output is never used (block `first` takes clean values), so the packed sequence may
            # be longer than the position table: zero positions and token types keep the embeddings in range
            zeros = torch.zeros_like(self.ids)
            return self.layout.base_model()(input_ids=self.ids, position_ids=zeros,
                                            token_type_ids=zeros).last_hidden_state


def _joins(layout, layers: range, block_inputs, inside_outputs, answer, n_alpha: int, bert_style: bool) -> list:
    """Pre-hooks by which each layer's rows join a grown pass from the clean run's values: at the block's input,
    or in BERT-style blocks at the FFN output module (which takes the residual as an argument), so they skip
    their block's attention and FFN input side. In the last BERT-style block only `answer` (the answer
    position(s), a slice or an index tensor) joins."""
    blocks, first, last = layout.blocks, layers.start, layout.layers - 1

    def clean_rows(value, like, answer_only=False):
        value = value[:, answer] if answer_only else value
        return value.expand(n_alpha, *value.shape[1:]).to(like.dtype)

    def at_block(layer):
        def join(hidden):
            new = clean_rows(block_inputs[layer], hidden)
            return new if layer == first else torch.cat([hidden, new])
        return blocks[layer], _replacing_hidden(join)

    def at_ffn_output(layer):
        block, inside = blocks[layer], inside_outputs[layer]
        clean_ffn, clean_residual = inside[block.intermediate], inside[block.attention][0]

        def join(module, args, kwargs):
            ffn, residual = args[:2]
            ffn = torch.cat([ffn, clean_rows(clean_ffn, ffn, layer == last)])
            residual = torch.cat([residual, clean_rows(clean_residual, residual, layer == last)])
            return (ffn, residual, *args[2:]), kwargs
        return block.output, join

    def late_join(layer):
        inside = inside_outputs[layer]
        return (bert_style and layer > first and blocks[layer].intermediate in inside
                and blocks[layer].attention in inside)

    return [at_ffn_output(l) if late_join(l) else at_block(l) for l in layers]


class _PreHooks:
    """Forward-pre-hooks (with kwargs) for the duration of a `with`."""

    def __init__(self, hooks: Iterable[tuple[nn.Module, Callable]]):
        self.handles = [module.register_forward_pre_hook(hook, with_kwargs=True) for module, hook in hooks]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


def _replacing_hidden(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable:
    """A pre-hook that replaces a block's input hidden states (positional or keyword) with `fn(hidden)`."""
    def hook(module, args, kwargs):
        if args:
            return (fn(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": fn(kwargs["hidden_states"])}
    return hook


def _row_bytes(lm: LoadedModel, seq_len: int, layers_run: int) -> int:
    """A generous estimate of the autograd memory one row needs (forward activations kept for backward)."""
    layout = lm.layout
    per_layer = seq_len * (layout.hidden * 16 + layout.neurons * 6)
    vocab = int(layout.output_embeddings().shape[0])
    return 4 * (per_layer * layers_run + vocab * 4)


def plan_passes(lm: LoadedModel, params: AttributionParams, seq_len: int, rows_per_layer: int) -> list[list[range]]:
    """Groups of passes: each pass is a range of layers whose rows share blocks; each group shares a backward.

    A pass grows its batch layer by layer, so it runs no block that need not run: passes hold as many layers as
    the memory budget allows. Families that cannot grow a batch (`_FIXED_BATCH`) run every row of a pass from
    its lowest block; on CPU, where FLOPs are the cost, their passes stay small.
    """
    L = lm.layout.layers
    device = lm.device
    if params.memory_budget_mb:
        budget = params.memory_budget_mb * 2**20
    elif device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = free // 4
    else:
        budget = 2 * 2**30
    fits = max(1, budget // max(_row_bytes(lm, seq_len, L) * rows_per_layer, 1))  # layers' rows that fit at once
    if params.layers_per_pass:
        per_pass = params.layers_per_pass
    elif device.type == "cpu" and lm.layout.family in _FIXED_BATCH:
        # Measured (benchmarks/bench_attribution.py): ~100 one-token rows or ~400 tokens per pass balance
        # matrix efficiency against re-running blocks below a pass's top layers.
        per_pass = round(CPU_ROWS_PER_PASS / rows_per_layer if seq_len == 1
                         else CPU_TOKENS_PER_PASS / (rows_per_layer * seq_len))
    else:
        per_pass = fits
    per_pass = max(1, min(per_pass, L))
    passes = [range(a, min(L, a + per_pass)) for a in range(0, L, per_pass)]
    per_group = params.passes_per_backward or (max(1, fits // per_pass) if device.type == "cpu" else 1)
    return [passes[i:i + per_group] for i in range(0, len(passes), per_group)]


def _attribute_target(lm: LoadedModel, target: _Target, params: AttributionParams,
                      report: Callable[[int, int, torch.Tensor], None], cancel: CancelToken | None):
    """Scores [L, N], activations [L, N], P(w) and P(0 at layer l) [L] for one answer token."""
    runner = _Runner(lm, target, patching=params.method == "ig")
    if params.method == "activation":
        report(0, lm.layout.layers, runner.acts)
        return runner.acts, runner.acts, runner.prob, None
    seq_len = 1 if runner.prefix_cache is not None else len(target.ids)
    scores, p_zero = _integrate(lm, runner, params, seq_len, lambda a, b, chunk: report(a, b, chunk[0]), cancel)
    return scores[0], runner.acts, runner.prob, p_zero[0]


def _integrate(lm: LoadedModel, runner: "_Runner | _SharedRunner", params: AttributionParams, seq_len: int,
               report: Callable[[int, int, torch.Tensor], None], cancel: CancelToken | None):
    """IG scores [targets, L, N] and P(0 at layer l) [targets, L] from a runner's patched passes."""
    acts = runner.acts if runner.acts.dim() == 3 else runner.acts[None]
    n_targets, L = acts.shape[0], lm.layout.layers
    alphas = params.alphas()
    zero_extra = params.rule == "right"  # the left rule already has alpha = 0; right needs it for completeness
    run_alphas = alphas + ([0.0] if zero_extra else [])
    todo = plan_passes(lm, params, seq_len, len(run_alphas) * n_targets)
    scores = torch.empty_like(acts)
    p_zero = torch.empty(n_targets, L)
    while todo:
        if cancel is not None:
            cancel.check()
        group = todo[0]
        try:
            grads, probs = runner.patched(group, run_alphas)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            todo[:1] = _split(group)
            continue
        if grads.dim() == 3:  # one target
            grads, probs = grads[:, None], probs[:, None]
        a, b = group[0].start, group[-1].stop
        scores[:, a:b] = acts[:, a:b] * grads[:, :, : len(alphas)].sum(2).transpose(0, 1) / params.steps
        p_zero[:, a:b] = probs[:, :, len(alphas) if zero_extra else 0].T.cpu()
        report(a, b, scores[:, a:b])
        todo.pop(0)
    return scores, p_zero


def _split(group: list[range]) -> list[list[range]]:
    """Halves a group after an out-of-memory: fewer passes per backward, then fewer layers per pass."""
    if len(group) > 1:
        half = len(group) // 2
        return [group[:half], group[half:]]
    layers = group[0]
    if len(layers) == 1:
        raise torch.cuda.OutOfMemoryError("one layer's rows do not fit in GPU memory; use a smaller model, "
                                          "--dtype bfloat16, or --device cpu")
    half = layers.start + len(layers) // 2
    return [[range(layers.start, half)], [range(half, layers.stop)]]


def _combine(arrays: list[torch.Tensor], how: str) -> torch.Tensor:
    if how == "first":
        return arrays[0]
    stacked = torch.stack(arrays)
    return stacked.sum(0) if how == "sum" else stacked.mean(0)


def _prompt_parts(lm: LoadedModel, prompt, params: AttributionParams, answer_ids=None):
    text = prompt if isinstance(prompt, str) else prompt.text
    ids = tuple(answer_ids if answer_ids is not None else prompt.answer_ids)
    answer = "" if isinstance(prompt, str) else getattr(prompt, "answer", "")
    targets = _targets(lm, text, ids)
    return text, answer, ids, (targets[:1] if params.multi_token == "first" else targets)


def _prompt_scores(text: str, answer: str, ids: tuple[int, ...], per_token: list, params: AttributionParams,
                   seconds: float) -> PromptScores:
    """One prompt's result from its answer tokens' (scores, activations, P(w), P(0 at each layer))."""
    how = params.multi_token
    scores = _combine([s for s, _, _, _ in per_token], how)
    acts = _combine([a for _, a, _, _ in per_token], "mean")
    token_probs = [p for _, _, p, _ in per_token]
    completeness = []
    if params.method == "ig":
        delta = _combine([p - pz for _, _, p, pz in per_token], how)
        sums = scores.sum(1).cpu()
        for layer in range(len(sums)):
            d, s = float(delta[layer]), float(sums[layer])
            completeness.append({"layer": layer, "sum": s, "delta": d, "ratio": s / d if d else math.nan})
    return PromptScores(
        prompt=text, answer=answer, answer_ids=ids,
        scores=scores.float().cpu().numpy().astype(np.float32),
        activations=acts.float().cpu().numpy().astype(np.float32),
        prob=float(np.prod(token_probs)), token_probs=token_probs, completeness=completeness,
        seconds=seconds, params=params.to_dict())


def attribute(lm: LoadedModel, prompt, params: AttributionParams | None = None,
              progress: ProgressFn | None = None, cancel: CancelToken | None = None,
              answer_ids: Sequence[int] | None = None) -> PromptScores:
    """Attribution scores of every FFN neuron for one prompt.

    `prompt` is a facts.Prompt (text + answer_ids) or a plain string together with `answer_ids`.
    """
    params = params or AttributionParams()
    started = time.perf_counter()
    torch.manual_seed(params.seed)
    text, answer, ids, targets = _prompt_parts(lm, prompt, params, answer_ids)
    L = lm.layout.layers
    per_token = []
    for j, target in enumerate(targets):
        def report(a, b, chunk_scores, j=j):
            if progress is not None:
                done = (j + b / L) / len(targets)
                progress(done, {"token": j, "layers": (a, b), "scores": chunk_scores.float().cpu().numpy()})
        per_token.append(_attribute_target(lm, target, params, report, cancel))
    return _prompt_scores(text, answer, ids, per_token, params, time.perf_counter() - started)


def shares_passes(lm: LoadedModel, params: AttributionParams) -> bool:
    """Whether a fact's prompts run in shared passes (`_SharedRunner`): masked LMs with BERT-style blocks and an
    attention that takes a mask (eager or sdpa). By default only on GPUs: on CPU the rows are already large enough
    to keep the cores busy, and sharing measured no faster there (benchmarks/bench_attribution.py), while one
    prompt after another lets the app show each prompt as it finishes."""
    wanted = lm.device.type != "cpu" if params.share_prompts is None else params.share_prompts
    return (wanted and params.method == "ig" and lm.kind == "masked"
            and getattr(lm.model.config, "_attn_implementation", "eager") in ("eager", "sdpa")
            and all(_bert_style(block) for block in lm.layout.blocks))


def attribute_fact(lm: LoadedModel, prompts: Sequence, params: AttributionParams | None = None,
                   progress: ProgressFn | None = None, cancel: CancelToken | None = None,
                   on_prompt: Callable[[int, PromptScores], None] | None = None) -> list[PromptScores]:
    """Scores for every prompt of a fact; progress fractions cover the whole fact.

    Where the model allows (`shares_passes`) all prompts go through the same passes; otherwise one prompt after
    another. `on_prompt(k, result)` is called as each prompt's result is ready.
    """
    params = params or AttributionParams()
    n = len(prompts)
    if n > 1 and shares_passes(lm, params):
        results = _attribute_shared(lm, prompts, params, progress, cancel)
        for k, result in enumerate(results):
            if on_prompt is not None:
                on_prompt(k, result)
        return results
    results = []
    for k, prompt in enumerate(prompts):
        def forward(fraction, partial, k=k):
            if progress is not None:
                progress((k + fraction) / n, dict(partial or {}, prompt=k))
        results.append(attribute(lm, prompt, params, forward, cancel))
        if on_prompt is not None:
            on_prompt(k, results[-1])
    return results


def _attribute_shared(lm: LoadedModel, prompts: Sequence, params: AttributionParams,
                      progress: ProgressFn | None, cancel: CancelToken | None) -> list[PromptScores]:
    started = time.perf_counter()
    torch.manual_seed(params.seed)
    parts = [_prompt_parts(lm, prompt, params) for prompt in prompts]
    owner = [(k, j) for k, (_, _, _, targets) in enumerate(parts) for j in range(len(targets))]
    runners = [_Runner(lm, target) for _, _, _, targets in parts for target in targets]
    if cancel is not None:
        cancel.check()
    shared = _SharedRunner(lm, runners)
    L = lm.layout.layers

    def report(a, b, chunk):
        if progress is not None:
            for (k, j), chunk_scores in zip(owner, chunk):
                progress(b / L, {"prompt": k, "token": j, "layers": (a, b),
                                 "scores": chunk_scores.float().cpu().numpy()})

    scores, p_zero = _integrate(lm, shared, params, shared.seq, report, cancel)
    per_prompt: list[list] = [[] for _ in prompts]
    for i, (k, _) in enumerate(owner):
        per_prompt[k].append((scores[i], runners[i].acts, runners[i].prob, p_zero[i]))
    seconds = (time.perf_counter() - started) / len(prompts)
    return [_prompt_scores(text, answer, ids, per_prompt[k], params, seconds)
            for k, (text, answer, ids, _) in enumerate(parts)]
