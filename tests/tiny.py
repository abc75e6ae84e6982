"""Tiny random models of every supported family, built from config classes (no download), with a word-level
tokenizer over a small geography vocabulary.

Tokenizers
- masked families: BERT-style special tokens ([PAD] [UNK] [CLS] [SEP] [MASK]); words and punctuation are split
  apart and `[CLS] ... [SEP]` is added around every text.
- causal families: like GPT-2/Llama BPE, a word after a space carries the space as a leading "▁" and decodes
  back to " word": `tok(" Paris")` is one token and `tok.decode` gives " Paris". Every word exists both with
  and without the marker; punctuation is split off ("Paris." -> "▁Paris", "."). No BOS is added (as GPT-2 and
  SmolLM2); `<s>`/`</s>`/`<unk>`/`<pad>` exist.
Unknown words become [UNK]/<unk>. Multi-token answers exist: "Addis Ababa", "Buenos Aires", "New Zealand".
Weights use INIT_STD = 0.2, so predictions are peaked rather than uniform; `make_tiny(..., **overrides)` passes
any config field through (e.g. `make_tiny("opt", word_embed_proj_dim=16)`).

Import from tests as `from tiny import make_tiny` (pytest puts tests/ on sys.path through conftest.py).
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, PreTrainedTokenizerFast

from kn_core.families import FAMILIES
from kn_core.models import LoadedModel, wrap_model

TINY_MASKED = "bert"
TINY_CAUSAL = "gpt2"
ALL_FAMILIES = sorted(FAMILIES)

LAYERS = 3
HIDDEN = 32
NEURONS = 72  # neither HIDDEN nor 4 * HIDDEN, so a transposed weight or an ignored size shows up
HEADS = 4
MAX_POSITIONS = 64
INIT_STD = 0.2  # 10x the usual 0.02: logits of order 1 and peaked predictions, so edits and heads show effects

# country, capital, language, continent
GEOGRAPHY = [
    ("France", "Paris", "French", "Europe"),
    ("Germany", "Berlin", "German", "Europe"),
    ("Italy", "Rome", "Italian", "Europe"),
    ("Spain", "Madrid", "Spanish", "Europe"),
    ("Portugal", "Lisbon", "Portuguese", "Europe"),
    ("Poland", "Warsaw", "Polish", "Europe"),
    ("Greece", "Athens", "Greek", "Europe"),
    ("Sweden", "Stockholm", "Swedish", "Europe"),
    ("Norway", "Oslo", "Norwegian", "Europe"),
    ("Finland", "Helsinki", "Finnish", "Europe"),
    ("Denmark", "Copenhagen", "Danish", "Europe"),
    ("Netherlands", "Amsterdam", "Dutch", "Europe"),
    ("Russia", "Moscow", "Russian", "Europe"),
    ("Hungary", "Budapest", "Hungarian", "Europe"),
    ("Austria", "Vienna", "German", "Europe"),
    ("Ireland", "Dublin", "English", "Europe"),
    ("Japan", "Tokyo", "Japanese", "Asia"),
    ("China", "Beijing", "Chinese", "Asia"),
    ("Korea", "Seoul", "Korean", "Asia"),
    ("India", "Delhi", "Hindi", "Asia"),
    ("Thailand", "Bangkok", "Thai", "Asia"),
    ("Vietnam", "Hanoi", "Vietnamese", "Asia"),
    ("Indonesia", "Jakarta", "Indonesian", "Asia"),
    ("Turkey", "Ankara", "Turkish", "Asia"),
    ("Iran", "Tehran", "Persian", "Asia"),
    ("Egypt", "Cairo", "Arabic", "Africa"),
    ("Kenya", "Nairobi", "Swahili", "Africa"),
    ("Nigeria", "Abuja", "English", "Africa"),
    ("Ethiopia", "Addis", "Amharic", "Africa"),
    ("Morocco", "Rabat", "Arabic", "Africa"),
    ("Brazil", "Brasilia", "Portuguese", "America"),
    ("Argentina", "Buenos", "Spanish", "America"),
    ("Peru", "Lima", "Spanish", "America"),
    ("Chile", "Santiago", "Spanish", "America"),
    ("Mexico", "Mexico", "Spanish", "America"),
    ("Canada", "Ottawa", "English", "America"),
    ("Cuba", "Havana", "Spanish", "America"),
    ("Australia", "Canberra", "English", "Oceania"),
]
WORDS = [
    "The", "the", "A", "a", "An", "an", "capital", "city", "of", "is", "was", "in", "on", "and", "its", "language",
    "official", "spoken", "people", "speak", "located", "continent", "country", "part", "which", "lies", "main",
    "seat", "government", "has", "Its", "It", "it", "In", "largest", "known", "as", "for", "to", "from", "by",
    "s", "North", "South", "Asia", "Europe", "Africa", "America", "Oceania", "Antarctica", "world", "nation",
    "Aires", "Ababa", "New", "Zealand", "Wellington", "Maori", "United", "States", "Washington", "Kingdom",
    "London", "Switzerland", "Bern",
]
PUNCTUATION = [".", ",", "'", "?", "!", ":", ";", "-", "(", ")"]


def vocabulary() -> list[str]:
    seen: dict[str, None] = {}
    for row in GEOGRAPHY:
        seen.update(dict.fromkeys(row))
    seen.update(dict.fromkeys(WORDS))
    return list(seen)


def make_tokenizer(kind: str, extra_words: tuple[str, ...] = ()) -> PreTrainedTokenizerFast:
    words = vocabulary() + [w for w in dict.fromkeys(extra_words) if w not in vocabulary()]
    if kind == "masked":
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        tokens = specials + words + PUNCTUATION
        tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        cls, sep = tokens.index("[CLS]"), tokens.index("[SEP]")
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
        tok.decoder = decoders.WordPiece()  # joins words with spaces
        return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                       cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    tokens = specials + words + ["▁" + w for w in words] + PUNCTUATION + ["▁" + p for p in PUNCTUATION]
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token="<unk>"))
    # Metaspace turns each space into a "▁" prefix of the next word; punctuation is then cut off words.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never"),
        pre_tokenizers.Punctuation(behavior="isolated"),
    ])
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="never")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                   bos_token="<s>", eos_token="</s>")


def _config_kwargs(family: str, tokenizer) -> dict:
    ids = {"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id, "initializer_range": INIT_STD}
    if FAMILIES[family].kind == "causal":
        ids.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    if family == "distilbert":
        return ids | dict(dim=HIDDEN, hidden_dim=NEURONS, n_layers=LAYERS, n_heads=HEADS,
                          max_position_embeddings=MAX_POSITIONS)
    if family in ("gpt2", "gpt_bigcode", "gptj"):
        extra = {"rotary_dim": 4} if family == "gptj" else {}
        return ids | extra | dict(n_embd=HIDDEN, n_inner=NEURONS, n_layer=LAYERS, n_head=HEADS,
                                  n_positions=MAX_POSITIONS)
    if family == "bloom":  # Bloom's FFN is always 4 * hidden
        return ids | dict(hidden_size=HIDDEN, n_layer=LAYERS, n_head=HEADS)
    kwargs = ids | dict(hidden_size=HIDDEN, num_attention_heads=HEADS, max_position_embeddings=MAX_POSITIONS)
    if family == "gpt_neo":
        return kwargs | dict(num_layers=LAYERS, num_heads=HEADS, intermediate_size=NEURONS,
                             attention_types=[[["global", "local"], 1], [["global"], 1]])
    kwargs["num_hidden_layers"] = LAYERS
    if family == "opt":
        return kwargs | dict(ffn_dim=NEURONS, word_embed_proj_dim=HIDDEN, init_std=INIT_STD)
    if family == "falcon":
        return kwargs | dict(ffn_hidden_size=NEURONS)
    kwargs["intermediate_size"] = NEURONS
    if family == "granite":
        kwargs["logits_scaling"] = 4.0  # real Granite checkpoints divide logits by 8 or 16; 1.0 would hide it
    if family == "electra":
        # Real ELECTRA generators use a narrower embedding (e.g. 128 vs 256), which value-vector edits cannot add.
        kwargs["embedding_size"] = HIDDEN
    if FAMILIES[family].blocks == "model.layers" and family != "phi":
        kwargs.update(num_key_value_heads=2, head_dim=HIDDEN // HEADS)  # grouped-query attention, like Llama
    if FAMILIES[family].moe:
        kwargs.update(_moe_kwargs(family))
    return kwargs | _QUIRKS.get(family, {})


# Sizes that make each family's quirk act in a 3-layer model on prompts of ~6 tokens: a sliding window shorter
# than the prompt next to global layers, linear-attention layers, a logit scale that is not 1.
_SLIDING = dict(sliding_window=3, layer_types=["sliding_attention", "full_attention", "sliding_attention"])
_QUIRKS: dict[str, dict] = {
    "gemma3_text": _SLIDING | dict(query_pre_attn_scalar=HIDDEN // HEADS, final_logit_softcapping=30.0),
    "cohere2": _SLIDING,
    "exaone4": _SLIDING,
    "ministral": _SLIDING,
    "cohere": dict(logit_scale=0.5),
    # DeBERTa-v3's setup (relative attention both ways, log buckets, no absolute positions); DeBERTa v1's
    "deberta-v2": dict(relative_attention=True, pos_att_type=["p2c", "c2p"], position_buckets=4,
                       max_relative_positions=-1, position_biased_input=False, norm_rel_ebd="layer_norm",
                       share_att_key=True, type_vocab_size=0),
    "deberta": dict(relative_attention=True, pos_att_type=["c2p", "p2c"], max_relative_positions=-1,
                    position_biased_input=False, type_vocab_size=0),
    # a local window shorter than the prompts next to a global layer
    "modernbert": dict(local_attention=4, global_attn_every_n_layers=2, cls_token_id=2, sep_token_id=3,
                       bos_token_id=2, eos_token_id=3),
    "qwen3_5_text": dict(layer_types=["linear_attention", "full_attention", "linear_attention"],
                         linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8,
                         linear_value_head_dim=8, linear_conv_kernel_dim=2),
}


EXPERTS = 4  # routed experts per MoE layer, 2 of them per token
EXPERT_NEURONS = 24  # each expert's intermediate size (dense layers of MoE models keep NEURONS)


def _moe_kwargs(family: str) -> dict:
    """Tiny mixture-of-experts sizes; where a family has them, a dense first layer and shared experts, so
    layers of different widths and shared-expert neurons are tested too."""
    kwargs = dict(num_local_experts=EXPERTS, num_experts=EXPERTS, n_routed_experts=EXPERTS, num_experts_per_tok=2,
                  moe_intermediate_size=EXPERT_NEURONS, router_aux_loss_coef=0.0)
    if family in ("mixtral", "olmoe", "gpt_oss", "granitemoe"):
        kwargs["intermediate_size"] = EXPERT_NEURONS
    if family in ("qwen2_moe", "qwen3_moe"):
        kwargs.update(mlp_only_layers=[0], decoder_sparse_step=1, norm_topk_prob=family == "qwen3_moe")
    if family == "qwen2_moe":
        kwargs["shared_expert_intermediate_size"] = 2 * EXPERT_NEURONS
    if family == "deepseek_v3":
        kwargs.update(first_k_dense_replace=1, n_shared_experts=1, n_group=2, topk_group=1, q_lora_rank=16,
                      kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, head_dim=8,
                      num_key_value_heads=HEADS, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    if family == "gpt_oss":
        kwargs.update(layer_types=["sliding_attention", "full_attention", "sliding_attention"], sliding_window=8,
                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    return kwargs


def make_tiny(family: str, seed: int = 0, extra_words: tuple[str, ...] = (), **overrides) -> LoadedModel:
    """A random fp32 model of `family` (3 layers, hidden 32, 72 neurons, eval mode) with its tiny tokenizer
    (`extra_words`: words added to its vocabulary, for prompts beyond the geography set)."""
    spec = FAMILIES[family]
    tokenizer = make_tokenizer(spec.kind, extra_words)
    config = AutoConfig.for_model(family, **(_config_kwargs(family, tokenizer) | overrides))
    config._attn_implementation = "eager"  # same numbers on every machine, and Gemma-2's softcapping needs it
    if spec.moe:  # the per-expert loop: the default grouped matmul has no float64, which the references use
        config._experts_implementation = "eager"
    auto = AutoModelForMaskedLM if spec.kind == "masked" else AutoModelForCausalLM
    torch.manual_seed(seed)
    model = auto.from_config(config, dtype=torch.float32)
    return wrap_model(model, tokenizer, source=f"tiny-{family}")


def save_tiny(lm: LoadedModel, folder) -> str:
    """Saves a tiny model and its tokenizer as a model folder (what `kn --model FOLDER` loads); returns the path."""
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    return str(folder)


def tiny_llama(seed: int = 0, **overrides) -> LoadedModel:
    """A tiny Llama (gated FFN, RMSNorm, tied embeddings like the default SmolLM2-135M)."""
    return make_tiny("llama", seed, **({"tie_word_embeddings": True} | overrides))


# Image-text wrappers: the text family whose tiny config their language model gets, and a one-layer vision tower.
_VIT = dict(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2, image_size=28,
            patch_size=14)
_QWEN_VIT = dict(hidden_size=16, intermediate_size=24, depth=1, num_heads=2, out_hidden_size=HIDDEN)
IMAGE_TEXT = {
    "gemma3": ("gemma3_text", _VIT),
    "mistral3": ("mistral", _VIT | dict(head_dim=8)),
    "llava": ("llama", _VIT),
    "qwen2_5_vl": ("qwen2", _QWEN_VIT),
    "qwen3_5": ("qwen3_5_text", _QWEN_VIT),
}


def image_text_config(wrapper: str, tokenizer):
    text_family, vision = IMAGE_TEXT[wrapper]
    text = _config_kwargs(text_family, tokenizer)
    text["model_type"] = AutoConfig.for_model(wrapper).get_text_config().model_type
    if wrapper == "qwen2_5_vl":  # the three rotary sections (time, height, width) must fill head_dim / 2
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]}
    ids = {k: text[k] for k in ("pad_token_id", "bos_token_id", "eos_token_id")}
    config = AutoConfig.for_model(wrapper, text_config=text, vision_config=vision, **ids)
    config.get_text_config()._attn_implementation = "eager"
    return config


def save_tiny_image_text(wrapper: str, folder, seed: int = 0) -> None:
    """A random fp32 image-text checkpoint (tiny language model, one-layer vision tower) and tokenizer, saved."""
    from transformers import AutoModelForImageTextToText

    tokenizer = make_tokenizer("causal")
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(image_text_config(wrapper, tokenizer), dtype=torch.float32)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
