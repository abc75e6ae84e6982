"""Every per-architecture fact the engine needs, one row per model family (`model_type` in the config).

Adding a family is one row in `FAMILIES` plus its config in tests/tiny.py: tests/test_ffn.py and
tests/test_attribution.py then check the row against the model itself (sizes, hook points, heads, and
attribution against a slow reference). Everything else in the engine reads these fields; nothing branches on a
family's name.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


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
    # An image-text checkpoint (`IMAGE_TEXT_WRAPPERS`): loaded whole, prompts are text and run through the
    # wrapper's own text path (its language model and head); the vision tower is loaded but never runs.
    image_text: bool = False
    # Mixture of experts (kn_core/moe.py): dotted path from a block to its FFN module; a layer whose module has
    # `experts` (transformers-5 3-D expert weights) is an MoE layer, any other is dense (its `out_proj`).
    moe: str | None = None
    router: str = "gate"  # the MoE module's router: returns (logits, top-k weights, top-k expert ids)
    shared_expert: str | None = None  # the MoE module's shared-expert MLP (every token; expert id E)
    shared_expert_gate: str | None = None  # its gate (sigmoid of a linear), if it has one
    moe_returns_scores: bool = False  # the MoE module returns (output, routing weights)
    # Dotted path from one block to the attention's output projection: its output is the attention sublayer's
    # contribution at each position (before dropout, residual and any post-norm), which causal tracing restores;
    # "a|b" where layers differ (the first path a block has).
    attn_out: str | None = None

    @property
    def auto_class(self) -> str:
        if self.image_text:
            return "AutoModelForImageTextToText"
        return "AutoModelForMaskedLM" if self.kind == "masked" else "AutoModelForCausalLM"


_BERT_LIKE = dict(kind="masked", out_proj="output.dense", bert_style=True, attn_out="attention.output.dense")
_ROBERTA = FamilySpec(blocks="roberta.encoder.layer", head=("lm_head",), positions_after_padding=True, **_BERT_LIKE)
_GPT2_LIKE = dict(kind="causal", blocks="transformer.h", out_proj="mlp.c_proj", final_norm="transformer.ln_f",
                  attn_out="attn.c_proj")
_LLAMA_LIKE = FamilySpec("causal", "model.layers", "mlp.down_proj", "model.norm", attn_out="self_attn.o_proj")
_MOE = dict(kind="causal", blocks="model.layers", out_proj="mlp.down_proj", final_norm="model.norm", moe="mlp",
            attn_out="self_attn.o_proj")

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
    # Dense decoders of 2025-2026 with the Llama layout; their quirks live inside the blocks and the model class,
    # which the engine runs as they are: Gemma 3's sliding/global layers and sqrt(hidden)-scaled embeddings,
    # Cohere's parallel attention+FFN blocks and logit_scale, GLM's fused gate_up_proj (down_proj's input is
    # still act(gate) * up), Qwen 3.5's linear-attention layers, Apertus' and Arcee's ungated FFNs.
    "gemma3_text": _LLAMA_LIKE,
    "olmo3": _LLAMA_LIKE,
    "qwen3_5_text": replace(_LLAMA_LIKE, attn_out="self_attn.o_proj|linear_attn.out_proj"),
    "glm": _LLAMA_LIKE,
    "glm4": _LLAMA_LIKE,
    "cohere": _LLAMA_LIKE,
    "cohere2": _LLAMA_LIKE,
    "exaone4": _LLAMA_LIKE,
    "ministral": _LLAMA_LIKE,
    "ministral3": _LLAMA_LIKE,
    "seed_oss": _LLAMA_LIKE,
    "arcee": _LLAMA_LIKE,
    "apertus": _LLAMA_LIKE,
    "hunyuan_v1_dense": _LLAMA_LIKE,
    "helium": _LLAMA_LIKE,
    "ernie4_5": _LLAMA_LIKE,
    "vaultgemma": _LLAMA_LIKE,
    "nemotron": _LLAMA_LIKE,
    "starcoder2": FamilySpec("causal", "model.layers", "mlp.c_proj", "model.norm", attn_out="self_attn.o_proj"),
    # Masked encoders of today. Not BERT-style (DeBERTa's disentangled relative attention, ModernBERT's fused
    # Wqkv and alternating global/local attention), so a fact's prompts are attributed one by one: the packed
    # shared passes need BERT's attention internals to make their attention block-diagonal.
    "modernbert": FamilySpec("masked", "model.layers", "mlp.Wo", head=("head", "decoder"), attn_out="attn.Wo"),
    "deberta-v2": FamilySpec("masked", "deberta.encoder.layer", "output.dense", head=("cls",),
                            attn_out="attention.output.dense"),
    "deberta": FamilySpec("masked", "deberta.encoder.layer", "output.dense", head=("cls",),
                         attn_out="attention.output.dense"),

    # mixture of experts (kn_core/moe.py)
    "mixtral": FamilySpec(**_MOE),
    "qwen2_moe": FamilySpec(**_MOE, shared_expert="shared_expert", shared_expert_gate="shared_expert_gate"),
    "qwen3_moe": FamilySpec(**_MOE),
    "olmoe": FamilySpec(**_MOE),
    "deepseek_v3": FamilySpec(**_MOE, shared_expert="shared_experts"),
    "gpt_oss": FamilySpec(**_MOE, router="router", moe_returns_scores=True),
    "granitemoe": FamilySpec(**{**_MOE, "out_proj": "block_sparse_moe.down_proj", "moe": "block_sparse_moe"},
                             router="router"),
}


# Image-text checkpoints (Gemma 3, Mistral 3, Llava, Qwen2.5-VL, Qwen 3.5) keep their language model at
# `model.language_model` and the head at `lm_head`; its blocks are those of the text family named by the text
# config, whose row (or, for text models that exist only inside a wrapper, `_WRAPPED_TEXT`'s) gives the rest.
IMAGE_TEXT_WRAPPERS = ("gemma3", "mistral3", "llava", "qwen2_5_vl", "qwen3_5")
_WRAPPED_TEXT = {"qwen2_5_vl_text": _LLAMA_LIKE}


def is_image_text(config) -> bool:
    """Whether the config is one of an image-text checkpoint that `spec_for_config` reads through its text model."""
    return config.model_type in IMAGE_TEXT_WRAPPERS


def _inside_wrapper(text: FamilySpec) -> FamilySpec:
    def inside(dotted: str | None) -> str | None:
        return dotted and dotted.replace("model.", "model.language_model.", 1)
    return replace(text, blocks=inside(text.blocks), final_norm=inside(text.final_norm), image_text=True)


def supported_families() -> list[str]:
    return sorted([*FAMILIES, *IMAGE_TEXT_WRAPPERS])


def spec_for_config(config, source: str | None = None) -> FamilySpec:
    """The row of a model's config; for an image-text wrapper, its language model's row moved inside it."""
    if is_image_text(config):
        text_type = config.get_text_config().model_type
        text = FAMILIES.get(text_type) or _WRAPPED_TEXT.get(text_type)
        if text is None or text.kind != "causal" or not text.blocks.startswith("model."):
            raise UnsupportedModelError(
                f"{source or 'this'} {config.model_type!r} checkpoint's language model is a {text_type!r} model, "
                f"which is not supported; supported families: " + ", ".join(supported_families()))
        return _inside_wrapper(text)
    return family_spec(config.model_type, source)


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
