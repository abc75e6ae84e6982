"""The passes behind attribution: integrated gradients of every FFN neuron, computed exactly but fast.

A row of a batch patches one (layer, alpha) pair: the whole activation vector of its layer at the answer position
is scaled by alpha. `integrate` runs all rows of a target in groups of passes (`plan_passes`) and sums their
gradients. How it is fast without approximating anything:
- Rows never run a block below their layer: those blocks' outputs are identical to the clean run's, so they are
  replayed from a cache. In the lowest block of a pass, everything before the patch point (attention, the FFN's
  input side) is replayed too.
- A pass runs the rows of a range of layers in one batch that grows as it goes up: the rows of layer l join
  at block l's input, so no block runs that need not run. Passes hold as many layers as memory allows
  (`plan_passes`); several passes share one vocabulary head and one backward.
- BERT-style encoders (`FamilySpec.bert_style`): rows join at the FFN output module (skipping their block's
  attention and FFN input side), and the last block computes only the mask position.
- Causal models: the prompt prefix runs once and its key/value cache is shared by all rows, so each row
  computes only the answer position. Masked models: the vocabulary head runs only at the mask.
- A fact's prompts can share passes (masked LMs with BERT-style blocks): their sequences are packed side by side
  in every row with block-diagonal attention, so a row patches one (layer, alpha) pair at every prompt's answer
  at once, with no padding (`SharedRunner`).
- Mixture-of-experts layers route every row as the clean run did (`hooks.hold_routing`): the integral scales
  a neuron's contribution with the router's choice and weights fixed (docs/MOE.md).
- Parameters never need gradients; one backward gives the gradient of every row at once.
- Groups are sized to a memory budget; on CUDA out-of-memory a group is split and retried.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections import Counter
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from .encoding import Target
from .hooks import (ActivationPatch, Hooks, Override, capture_activations, capture_routing, hidden_states_of,
                    hold_routing, replacing_hidden, replay)
from .models import LoadedModel
from .quadrature import integrate_panels
from .tasks import Task

CPU_ROWS_PER_PASS = 120
CPU_TOKENS_PER_PASS = 400


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """Probabilities and gradients in float32 even for half-precision models (float64 stays float64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


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


@contextlib.contextmanager
def _recording_replayable(layout, layer: int, outputs: dict[nn.Module, object]):
    """Within the block, fills `outputs` with the clean output of each module of block `layer` that runs before
    the out-projection and only once: in a pass whose lowest layer is `layer`, those outputs are the same for
    every row (the patch comes later), so the block need not recompute its attention or the FFN's input side.
    """
    path = layout.path_to_out_proj(layer)
    out_proj = layout.out_projs[layer]
    calls: Counter = Counter()
    reached = []

    def record(module, args, output):
        calls[module] += 1
        if not reached:
            outputs[module] = output

    def mark_patch_point(module, args, kwargs):
        reached.append(True)

    children = [child for parent in path for child in parent.children()
                if child is not out_proj and not any(child is p for p in path)]
    with Hooks(pre=[(out_proj, mark_patch_point)], post=[(child, record) for child in children]):
        yield
    for module, n in calls.items():  # a module called again after the patch point must really run
        if n != 1 or not _batch_of_one(outputs.get(module)):
            outputs.pop(module, None)


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


class Runner:
    """Runs one answer token: clean pass, then patched passes over (layer, alpha) rows."""

    def __init__(self, lm: LoadedModel, target: Target, patching: bool = True):
        """`patching`: record what patched passes replay (not needed for the activation baseline)."""
        self.lm = lm
        self.layout = lm.layout
        # masked LMs whose blocks are all BERT-style: rows join at the FFN output, the last block runs at the mask
        self.bert_style = lm.layout.bert_style
        self.target = target
        self.device = lm.device
        ids = torch.tensor([target.ids], device=self.device)
        self.prefix_cache = None
        if lm.kind == "causal" and len(target.ids) > 1:
            with torch.no_grad():
                out = lm.model(input_ids=ids[:, :-1], use_cache=True, logits_to_keep=1)
            # Linear-attention layers (Qwen 3.5's) overwrite their cached recurrent state in place after reading
            # it, which the backward through the rows still needs: such models, and models without a cache, run
            # the whole prompt in every row.
            cache = getattr(out, "cache", None)
            if cache is not None and not any(getattr(layer, "recurrent_states", None) for layer in cache.layers):
                self.prefix_cache = cache
        if self.prefix_cache is not None:
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
        return self.layout.base_model()(input_ids=ids, cache=cache, use_cache=True).last_hidden_state[:, -1]

    def _probs(self, hidden: torch.Tensor) -> torch.Tensor:
        """Probability of the target token; the vocabulary head runs only at the answer position."""
        return _token_probs(self.layout, hidden, self.target.token)

    def _clean(self, patching: bool):
        outputs: dict[int, object] = {}
        inputs: dict[int, torch.Tensor] = {}
        inside: list[dict[nn.Module, object]] = [{} for _ in range(self.layout.layers)]
        with contextlib.ExitStack() as recording:
            if patching:
                blocks = list(enumerate(self.layout.blocks))
                recording.enter_context(Hooks(
                    pre=[(block, lambda m, a, kw, j=j: inputs.__setitem__(j, hidden_states_of(a, kw).detach()))
                         for j, block in blocks],
                    post=[(block, lambda m, a, o, j=j: outputs.__setitem__(j, o)) for j, block in blocks]))
                for j in range(self.layout.layers):
                    recording.enter_context(_recording_replayable(self.layout, j, inside[j]))
            routing = recording.enter_context(capture_routing())  # MoE layers: held in the patched passes
            with torch.no_grad():
                prob, acts = capture_activations(self.layout, lambda: self._probs(self._hidden(1)))
        self.routing = routing
        self.block_outputs = [outputs.get(j) for j in range(self.layout.layers)]
        self.block_inputs = [inputs.get(j) for j in range(self.layout.layers)]
        self.inside_outputs = inside
        self.prob = float(prob[0])
        self.acts = torch.stack([_at_least_fp32(acts[l][0, self.pos]).to(self.device) for l in range(self.layout.layers)])

    def patched(self, passes: Sequence[range], alphas) -> tuple[torch.Tensor, torch.Tensor]:
        """Gradients [layers, alphas, N] at the patched points and probabilities [layers, alphas]. `alphas`: one
        list for every layer, or {layer: list} (the same length for all layers).

        The final hidden states of all passes go through one vocabulary head and one backward.
        """
        table = _alpha_table(alphas, passes, self.acts)
        n_alpha = table.shape[1]
        leaves, hiddens = [], []
        run_pass = self._fixed_pass if self.layout.spec.fixed_batch else self._grown_pass
        with torch.enable_grad(), hold_routing(self.routing):
            for layers, alpha in zip(passes, table.split([len(r) for r in passes])):
                base = self.acts[layers.start:layers.stop]
                patch = (alpha[:, :, None] * base[:, None, :]).reshape(len(layers) * n_alpha, -1)
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
        with replay(below, 1), replay(inside, n_alpha), Override(at_answer), Hooks(pre=joins), \
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
        with replay(replays, rows), ActivationPatch(self.layout, put, layers):
            return self._hidden(rows)


class SharedRunner:
    """The answer tokens of several prompts (a fact's) in the same passes, for masked LMs with BERT-style blocks.

    Each target's clean run is its own `Runner`, so every clean value is exactly the unshared one. The patched
    passes pack the targets' sequences side by side into one sequence per row, and attention is block-diagonal:
    a position attends only within its own target, and everything else in a block is per position, so the
    targets cannot touch each other (no padding either). A row still patches one (layer, alpha) pair, now at
    every target's answer position at once, and its final hidden states are read at those positions: the same
    rows as one prompt, each as long as all of them. Same grown batch as `Runner._grown_pass`: rows of layer l
    join at block l's FFN output, the last block computes only the answer positions.
    """

    def __init__(self, lm: LoadedModel, runners: Sequence[Runner]):
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

    def patched(self, passes: Sequence[range], alphas) -> tuple[torch.Tensor, torch.Tensor]:
        """Gradients [layers, targets, alphas, N] and probabilities [layers, targets, alphas]; `alphas` as in
        `Runner.patched`."""
        table = _alpha_table(alphas, passes, self.acts)
        n_alpha, n_targets = table.shape[1], len(self.runners)
        leaves, hiddens = [], []
        with torch.enable_grad():
            for layers, alpha in zip(passes, table.split([len(r) for r in passes])):
                base = self.acts[:, layers.start:layers.stop].transpose(0, 1)  # [layers, targets, N]
                patch = (alpha[:, :, None, None] * base[:, None]).reshape(-1, n_targets, base.shape[-1])
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
        with replay(below, 1), replay(inside, n_alpha), \
                Override([(blocks[last].attention, _attention_at(blocks[last].attention, answers))]), \
                Hooks(pre=masks + joins), ActivationPatch(self.layout, put, layers):
            # the embeddings' output is never used (block `first` takes clean values), so the packed sequence may
            # be longer than the position table: zero positions and token types keep the embeddings in range
            zeros = torch.zeros_like(self.ids)
            return self.layout.base_model()(input_ids=self.ids, position_ids=zeros,
                                            token_type_ids=zeros).last_hidden_state


def _alpha_table(alphas, passes: Sequence[range], like: torch.Tensor) -> torch.Tensor:
    """[layers of the passes, rows] alphas: one list for every layer, or {layer: list}."""
    if isinstance(alphas, dict):
        return torch.tensor([alphas[l] for layers in passes for l in layers], device=like.device, dtype=like.dtype)
    alpha = torch.tensor(alphas, device=like.device, dtype=like.dtype)
    return alpha[None].expand(sum(len(r) for r in passes), -1)


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
        return blocks[layer], replacing_hidden(join)

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


def _row_bytes(lm: LoadedModel, seq_len: int, layers_run: int) -> int:
    """A generous estimate of the autograd memory one row needs (forward activations kept for backward)."""
    layout = lm.layout
    per_layer = seq_len * (layout.hidden * 16 + layout.neurons * 6)
    vocab = int(layout.output_embeddings().shape[0])
    return 4 * (per_layer * layers_run + vocab * 4)


def plan_passes(lm: LoadedModel, params, seq_len: int, rows_per_layer: int,
                layers: Sequence[int] | None = None) -> list[list[range]]:
    """Groups of passes: each pass is a range of layers whose rows share blocks; each group shares a backward.
    `params`: an attribution.AttributionParams (not imported: attribution imports this module). `layers`: only
    these (default all); a pass never spans a layer left out.

    A pass grows its batch layer by layer, so it runs no block that need not run: passes hold as many layers as
    the memory budget allows. Families that cannot grow a batch (`FamilySpec.fixed_batch`) run every row of a
    pass from its lowest block; on CPU, where FLOPs are the cost, their passes stay small.
    """
    L = lm.layout.layers
    device = lm.device
    if params.memory_budget_mb is not None:
        budget = int(params.memory_budget_mb * 2**20)  # validated positive and finite by AttributionParams
    elif device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = free // 4
    else:
        budget = 2 * 2**30
    fits = max(1, budget // max(_row_bytes(lm, seq_len, L) * rows_per_layer, 1))  # layers' rows that fit at once
    if params.layers_per_pass:
        per_pass = params.layers_per_pass
    elif device.type == "cpu" and lm.layout.spec.fixed_batch:
        # Measured (benchmarks/bench_attribution.py): ~100 one-token rows or ~400 tokens per pass balance
        # matrix efficiency against re-running blocks below a pass's top layers.
        per_pass = round(CPU_ROWS_PER_PASS / rows_per_layer if seq_len == 1
                         else CPU_TOKENS_PER_PASS / (rows_per_layer * seq_len))
    else:
        per_pass = fits
    per_pass = max(1, min(per_pass, L))
    passes = [range(a, min(run.stop, a + per_pass)) for run in _runs(range(L) if layers is None else layers)
              for a in range(run.start, run.stop, per_pass)]
    per_group = params.passes_per_backward or (max(1, fits // per_pass) if device.type == "cpu" else 1)
    return [passes[i:i + per_group] for i in range(0, len(passes), per_group)]


def _runs(layers: Sequence[int]) -> list[range]:
    """Sorted layers as ranges of consecutive ones."""
    runs: list[range] = []
    for layer in sorted(layers):
        if runs and runs[-1].stop == layer:
            runs[-1] = range(runs[-1].start, layer + 1)
        else:
            runs.append(range(layer, layer + 1))
    return runs


def _each_group(lm, runner, params, seq_len: int, alphas, n_rows: int, task: Task, layers=None):
    """Yields (group, gradients [layers, targets, rows, N], probabilities [layers, targets, rows]) for each group
    of passes over `layers` (default all) with `alphas` (one list, or {layer: list} of n_rows each); on CUDA
    out-of-memory a group is split and retried."""
    n_targets = runner.acts.shape[0] if runner.acts.dim() == 3 else 1
    todo = plan_passes(lm, params, seq_len, n_rows * n_targets, layers)
    while todo:
        task.check()
        group = todo[0]
        try:
            grads, probs = runner.patched(group, alphas)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            todo[:1] = _split(group)
            continue
        if grads.dim() == 3:  # one target
            grads, probs = grads[:, None], probs[:, None]
        yield group, grads, probs
        todo.pop(0)


def integrate(lm: LoadedModel, runner: "Runner | SharedRunner", params, seq_len: int,
              report: Callable[..., None], task: Task, dense_layers: Sequence[int] = (),
              layers: Sequence[int] | None = None):
    """IG scores [targets, L, N], P(0 at layer l) [targets, L] and per-layer notes of the quadrature (None for
    the Riemann sum) from a runner's patched passes. `report(a, b, scores of layers a..b-1, done=fraction)`
    as layers become final. `dense_layers`: layers that `gauss`/`auto` integrate on a dense grid (quadrature.py).
    `layers`: only these (Riemann sum only; the others stay NaN): a layer's scores do not depend on which other
    layers are attributed, so a control that needs a few layers (`specificity`) pays for those only.
    """
    acts = runner.acts if runner.acts.dim() == 3 else runner.acts[None]
    if params.quadrature != "riemann":
        if layers is not None:
            raise ValueError("attributing chosen layers is implemented for the Riemann sum only; use "
                             "quadrature='riemann' or attribute every layer")
        return _integrate_panels(lm, runner, params, seq_len, acts, report, task, dense_layers)
    n_targets, L = acts.shape[0], lm.layout.layers
    alphas = params.alphas()
    zero_extra = params.rule == "right"  # the left rule already has alpha = 0; right needs it for completeness
    run_alphas = alphas + ([0.0] if zero_extra else [])
    scores = torch.full_like(acts, math.nan)
    p_zero = torch.full((n_targets, L), math.nan)
    for group, grads, probs in _each_group(lm, runner, params, seq_len, run_alphas, len(run_alphas), task,
                                           layers):
        a, b = group[0].start, group[-1].stop
        # a group's passes are consecutive when every layer runs; with chosen `layers` they may skip some
        at = [layer for run in group for layer in run]
        scores[:, at] = (acts[:, at] * grads[:, :, : len(alphas)].sum(2).transpose(0, 1) / params.steps).to(scores.dtype)
        p_zero[:, at] = probs[:, :, len(alphas) if zero_extra else 0].T.cpu().to(p_zero.dtype)
        report(a, b, scores[:, a:b])
    return scores, p_zero, None


def _integrate_panels(lm, runner, params, seq_len: int, acts: torch.Tensor, report, task: Task, dense_layers):
    """`integrate` for the `gauss` and `auto` quadratures (quadrature.integrate_panels): rounds of rows, each
    layer with its own alphas, batched and planned like the Riemann sum's."""
    prob = torch.tensor([r.prob for r in getattr(runner, "runners", [runner])], dtype=acts.dtype,
                        device=acts.device)

    def run_rows(layers: list[int], alphas: list[list[float]]):
        table = dict(zip(layers, alphas))
        grads = torch.empty(acts.shape[0], len(layers), len(alphas[0]), acts.shape[2], dtype=acts.dtype,
                            device=acts.device)
        probs = torch.empty(acts.shape[0], len(layers), len(alphas[0]), dtype=acts.dtype, device=acts.device)
        where = {layer: j for j, layer in enumerate(layers)}
        for group, g, p in _each_group(lm, runner, params, seq_len, table, len(alphas[0]), task, layers):
            at = [where[l] for r in group for l in r]
            grads[:, at], probs[:, at] = g.transpose(0, 1).to(grads.dtype), p.transpose(0, 1).to(probs.dtype)
        return grads, probs

    def finished(layer_scores: dict, done: float):
        for run in _runs(layer_scores):
            report(run.start, run.stop, torch.stack([layer_scores[l] for l in run], dim=1), done=done)

    return integrate_panels(acts, prob, params, dense_layers, run_rows, finished, task.check)


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


