"""Every per-architecture fact the engine needs, one row per model family (`model_type` in the config).

Adding a family is one row in `FAMILIES` plus its config in tests/tiny.py: tests/test_ffn.py and
tests/test_attribution.py then check the row against the model itself (sizes, hook points, heads, and
attribution against a slow reference). Everything else in the engine reads these fields; nothing branches on a
family's name.
"""

from __future__ import annotations

from dataclasses import dataclass


class UnsupportedModelError(ValueError):
    pass


@dataclass(frozen=True)
class FamilySpec:
    kind: str  # "masked" | "causal"
    blocks: str  # dotted path from the top model to the list of transformer blocks
    out_proj: str  # dotted path from one block to the FFN output projection (its input are the neurons)
    final_norm: str | None = None  # dotted path from the top model to the norm before the vocabulary head
    # Dotted paths from the top model, applied in order, that map the base model's output to logits; empty: the
    # model's output embeddings (for causal families the config's logit scaling/softcapping is added).
    head: tuple[str, ...] = ()
    project_out: str | None = None  # a projection after the final norm to the embedding width (OPT-350m)
    flattens_tokens: bool = False  # blocks reshape (batch, seq, hidden) to (batch * seq, hidden) before the FFN
    # Blocks get tensors sized to the batch the model was called with (ALiBi biases, a final view to the input
    # batch), so a batch cannot grow inside the model: attribution runs every row of a pass from its lowest block.
    fixed_batch: bool = False
    # BERT-style blocks: `attention.self` (query, key, value, scaling, attention_head_size), `attention.output`,
    # `intermediate`, and an `output(ffn, residual)` module; attribution's rows then join at the FFN output and
    # a fact's prompts can share passes.
    bert_style: bool = False
    # Positions start after the padding index (RoBERTa): a max_position_embeddings of 514 with padding index 1
    # holds 512 tokens.
    positions_after_padding: bool = False
    # Dotted path from one block to the attention's output projection: its output is the attention sublayer's
    # contribution at each position (before dropout, residual and any post-norm), which causal tracing restores.
    attn_out: str | None = None

    @property
    def auto_class(self) -> str:
        return "AutoModelForMaskedLM" if self.kind == "masked" else "AutoModelForCausalLM"


_BERT_LIKE = dict(kind="masked", out_proj="output.dense", bert_style=True, attn_out="attention.output.dense")
_ROBERTA = FamilySpec(blocks="roberta.encoder.layer", head=("lm_head",), positions_after_padding=True, **_BERT_LIKE)
_GPT2_LIKE = dict(kind="causal", blocks="transformer.h", out_proj="mlp.c_proj", final_norm="transformer.ln_f",
                  attn_out="attn.c_proj")
_LLAMA_LIKE = FamilySpec("causal", "model.layers", "mlp.down_proj", "model.norm", attn_out="self_attn.o_proj")

FAMILIES: dict[str, FamilySpec] = {
    "bert": FamilySpec(blocks="bert.encoder.layer", head=("cls",), **_BERT_LIKE),
    "roberta": _ROBERTA,
    "xlm-roberta": _ROBERTA,
    "camembert": _ROBERTA,
    "ernie": FamilySpec(blocks="ernie.encoder.layer", head=("cls",), **_BERT_LIKE),
    "electra": FamilySpec(blocks="electra.encoder.layer", head=("generator_predictions", "generator_lm_head"),
                          **_BERT_LIKE),
    "distilbert": FamilySpec("masked", "distilbert.transformer.layer", "ffn.lin2",
                             head=("vocab_transform", "activation", "vocab_layer_norm", "vocab_projector"),
                             attn_out="attention.out_lin"),
    "gpt2": FamilySpec(**_GPT2_LIKE),
    "gpt_bigcode": FamilySpec(**_GPT2_LIKE, fixed_batch=True),
    "gpt_neo": FamilySpec(**(_GPT2_LIKE | {"attn_out": "attn.attention.out_proj"})),
    "gptj": FamilySpec("causal", "transformer.h", "mlp.fc_out", "transformer.ln_f", attn_out="attn.out_proj"),
    "gpt_neox": FamilySpec("causal", "gpt_neox.layers", "mlp.dense_4h_to_h", "gpt_neox.final_layer_norm",
                          attn_out="attention.dense"),
    "opt": FamilySpec("causal", "model.decoder.layers", "fc2", "model.decoder.final_layer_norm",
                      project_out="model.decoder.project_out", flattens_tokens=True, attn_out="self_attn.out_proj"),
    "bloom": FamilySpec("causal", "transformer.h", "mlp.dense_4h_to_h", "transformer.ln_f", fixed_batch=True,
                       attn_out="self_attention.dense"),
    "falcon": FamilySpec("causal", "transformer.h", "mlp.dense_4h_to_h", "transformer.ln_f",
                         attn_out="self_attention.dense"),
    "phi": FamilySpec("causal", "model.layers", "mlp.fc2", "model.final_layernorm", attn_out="self_attn.dense"),
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "phi3": _LLAMA_LIKE,
    "olmo": _LLAMA_LIKE,
    "olmo2": _LLAMA_LIKE,
    "stablelm": _LLAMA_LIKE,
    "granite": _LLAMA_LIKE,
    "smollm3": _LLAMA_LIKE,
}


def supported_families() -> list[str]:
    return sorted(FAMILIES)


def family_spec(model_type: str | None, source: str | None = None) -> FamilySpec:
    """The row of a model type, or UnsupportedModelError naming the supported ones."""
    spec = FAMILIES.get(model_type)
    if spec is None:
        what = f"{source!r} is a {model_type!r} model, which" if source else f"model family {model_type!r}"
        raise UnsupportedModelError(f"{what} is not supported; supported families: " + ", ".join(supported_families()))
    return spec


def get_path(obj: object, dotted: str):
    for name in dotted.split("."):
        obj = getattr(obj, name)
    return obj
