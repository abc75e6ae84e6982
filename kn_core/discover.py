"""A row for a model family that has none in `families.FAMILIES`, read from the model's structure.

What it looks for, and why each is enough:
- kind: the class transformers built (causal-LM or masked-LM head class).
- blocks: the one `nn.ModuleList` with `num_hidden_layers` entries (text config), outside any vision tower.
- the FFN of a block: a submodule named or typed like one (mlp, ffn, feed_forward, ...); its out-projection is
  the last Linear in it that maps the intermediate width back to the hidden width, where another Linear in it
  maps the hidden width to that intermediate width (or twice it, a fused gate and up projection). Without such a
  submodule (BERT-like blocks: `intermediate` and `output`), the same pair among the block's Linears outside
  its attention. The same path in every block; a block holding experts is refused (MoE families need a row).
- the final norm (causal): the base model's last direct child that is a norm.
- the head: causal, the output embeddings; masked, the top model's children after the base model.
Then the model itself checks the reading: on a few tokens every out-projection runs once per forward on
(..., intermediate) inputs, and the head reproduces the model's own logits from the last block's output (a
model that post-processes logits in a way the reading misses fails here). Anything else is refused in one line
naming why and the row to add. Blocks of unknown families might build tensors sized to the batch (ALiBi), so
rows of a pass all start at its lowest block (`fixed_batch`): slower, never wrong for that reason.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from .families import FamilySpec, UnsupportedModelError, get_path

_FFN_NAME = re.compile(r"mlp|ffn|feed_?forward|ff", re.IGNORECASE)  # a whole attribute name
_FFN_CLASS = re.compile(r"MLP|FeedForward|FFN")
_EXPERTS = re.compile(r"expert|router|moe", re.IGNORECASE)  # an attribute name
_EXPERTS_CLASS = re.compile(r"Expert|Router|MoE|SparseMoe|Moe(Block|Layer)")  # not a family name's "moe" (Afmoe...)
_ATTENTION = re.compile(r"attn|attention|self_att", re.IGNORECASE)
_NOT_TEXT = re.compile(r"vision|visual|image|audio|speech|encoder_decoder", re.IGNORECASE)


def _projects(module: nn.Module) -> tuple[int, int] | None:
    """(in, out) widths of a Linear or transformers' Conv1D (which stores its weight transposed)."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D":
        return tuple(module.weight.shape)
    return None


def _kind(model: nn.Module) -> str:
    name = type(model).__name__
    if name.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")):
        return "causal"
    if name.endswith("ForMaskedLM"):
        return "masked"
    raise UnsupportedModelError(f"{name} is neither a causal nor a masked language model class")


def _blocks(model: nn.Module, layers: int) -> str:
    found = [name for name, module in model.named_modules()
             if isinstance(module, nn.ModuleList) and len(module) == layers and not _NOT_TEXT.search(name)
             and all(isinstance(block, nn.Module) and list(block.children()) for block in module)]
    if len(found) != 1:
        what = "no list" if not found else f"{len(found)} lists ({', '.join(found)})"
        raise UnsupportedModelError(f"{what} of {layers} blocks (num_hidden_layers) found")
    return found[0]


def _down_projection(linears: list[tuple[str, tuple[int, int]]], hidden: int) -> str | None:
    """The last Linear back to the hidden width whose input width another Linear maps the hidden width up to."""
    outs = [(path, widths) for path, widths in linears if widths[1] == hidden and widths[0] != hidden]
    if not outs:
        return None
    path, (width, _) = outs[-1]
    return path if any(w[0] == hidden and w[1] in (width, 2 * width) for _, w in linears) else None


def _out_proj(block: nn.Module, hidden: int) -> str:
    """The dotted path, inside one block, of its FFN's out-projection: in a submodule named or typed like an FFN,
    else (BERT-like blocks keep the FFN's two Linears in separate `intermediate` and `output` submodules) among
    the block's Linears outside its attention."""
    modules = [(name, module) for name, module in block.named_modules() if name]
    experts = [name for name, module in modules
               if _EXPERTS.search(name.rsplit(".", 1)[-1]) or _EXPERTS_CLASS.search(type(module).__name__)]
    if experts:
        raise UnsupportedModelError(f"its blocks hold a mixture of experts ({experts[0]})")
    for name, module in modules:
        kind = type(module).__name__
        if "Norm" in kind or not (_FFN_NAME.fullmatch(name.rsplit(".", 1)[-1]) or _FFN_CLASS.search(kind)):
            continue
        found = _down_projection([(f"{name}.{sub}", _projects(m)) for sub, m in module.named_modules()
                                  if sub and _projects(m)], hidden)
        if found:
            return found
    found = _down_projection([(name, _projects(m)) for name, m in modules
                              if _projects(m) and not _ATTENTION.search(name)], hidden)
    if found:
        return found
    raise UnsupportedModelError(f"no FFN in {type(block).__name__}: no Linear from the hidden width {hidden} up "
                                f"to an intermediate width and one back down, outside its attention")


def _final_norm(base: nn.Module, base_path: str) -> str | None:
    norms = [name for name, module in base.named_children() if "norm" in type(module).__name__.lower()]
    return f"{base_path}.{norms[-1]}" if norms and base_path else (norms[-1] if norms else None)


def _head(model: nn.Module, base_path: str) -> tuple[str, ...]:
    names = [name for name, _ in model.named_children()]
    return tuple(names[names.index(base_path) + 1:]) if base_path in names else ()


def discover_spec(model: nn.Module) -> tuple[FamilySpec, str]:
    """A row read from the model's structure (to be checked with `check_reading`), and one line saying what was
    found; UnsupportedModelError with the reason otherwise."""
    config = model.config.get_text_config()
    kind = _kind(model)
    blocks_path = _blocks(model, config.num_hidden_layers)
    blocks = list(get_path(model, blocks_path))
    hidden = getattr(config, "hidden_size", None) or model.get_input_embeddings().weight.shape[1]
    paths = {_out_proj(block, hidden) for block in blocks}
    if len(paths) != 1:
        raise UnsupportedModelError(f"its blocks have their FFNs at different places ({', '.join(sorted(paths))})")
    out_proj = paths.pop()
    base_path = model.base_model_prefix if model.base_model is not model else ""
    spec = FamilySpec(kind, blocks_path, out_proj,
                      final_norm=_final_norm(model.base_model, base_path) if kind == "causal" else None,
                      head=() if kind == "causal" else _head(model, base_path), fixed_batch=True)
    found = (f"no row for {config.model_type!r}; read from its structure: {len(blocks)} blocks at {blocks_path}, "
             f"FFN neurons at the input of {out_proj}, final norm {spec.final_norm or 'none'}, head "
             f"{'.'.join(spec.head) or 'output embeddings'} (checked against the model's logits)")
    return spec, found


def check_reading(layout) -> bool:
    """Runs a few tokens through the layout's model (an `FFNLayout` built on a discovered row): refuses when an
    out-projection does not run once per block on inputs of its width, or when the final norm and head do not
    reproduce the model's logits. True when the out-projections see flattened (tokens, intermediate) inputs."""
    model, blocks = layout.model, layout.blocks
    vocab = layout.input_embeddings().shape[0]
    ids = (torch.arange(2, 8) % vocab)[None].to(layout.input_embeddings().device)
    calls: list[tuple[int, torch.Size]] = []
    last: list[torch.Tensor] = []
    handles = [proj.register_forward_pre_hook(lambda m, a, l=l: calls.append((l, a[0].shape)))
               for l, proj in enumerate(layout.out_projs)]
    handles.append(blocks[-1].register_forward_hook(
        lambda m, a, out: last.append(out[0] if isinstance(out, tuple) else out)))
    try:
        with torch.no_grad():
            logits = model(input_ids=ids).logits.float()
            if layout.kind == "causal":
                ours = layout.vocab_head()(last[0]).float()
            else:
                ours = layout.logits_head()(layout.base_model()(input_ids=ids).last_hidden_state).float()
    finally:
        for handle in handles:
            handle.remove()
    if sorted(l for l, _ in calls[:len(blocks)]) != list(range(len(blocks))) or len(calls) > 2 * len(blocks):
        raise UnsupportedModelError("its FFN out-projections do not run exactly once per block")
    if any(shape[-1] != layout.neurons for _, shape in calls):
        raise UnsupportedModelError("its FFN out-projections get inputs of another width than their weights")
    tolerance = 1e-4 if next(model.parameters()).dtype in (torch.float32, torch.float64) else 2e-2
    scale = float(logits.abs().max()) or 1.0
    if ours.shape != logits.shape or not torch.allclose(ours, logits, rtol=tolerance, atol=tolerance * scale):
        raise UnsupportedModelError("the final norm and head read from its structure do not reproduce its "
                                    "logits (it post-processes them in a way only a row can say)")
    return len(calls[0][1]) == 2
