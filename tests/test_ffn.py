"""FFNLayout against tiny random models of every supported family: sizes, neuron hooks, value vectors, heads."""

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM

from kn_core.families import FAMILIES, UnsupportedModelError
from kn_core.ffn import FFNLayout
from kn_core.hooks import ActivationPatch, capture_activations
from tiny import ALL_FAMILIES, make_tiny, make_tokenizer

PROMPT = "The capital of France is Paris ."


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny models gain nothing from intra-op threads, and on a busy machine the thread hand-offs cost
    # hundreds of milliseconds per forward pass.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", params=ALL_FAMILIES)
def lm(request):
    return make_tiny(request.param)


def encode(lm, text=PROMPT):
    return lm.tokenizer(text, return_tensors="pt").input_ids


def moe_config_neurons(config) -> int:
    """The widest layer of an MoE config: routed experts x their size, plus shared experts; or a dense layer."""
    experts = next(getattr(config, n) for n in ("n_routed_experts", "num_local_experts", "num_experts")
                   if getattr(config, n, None))
    size = getattr(config, "moe_intermediate_size", None) or config.intermediate_size
    shared = getattr(config, "shared_expert_intermediate_size", 0) or \
        getattr(config, "n_shared_experts", 0) * getattr(config, "moe_intermediate_size", 0)
    dense = config.intermediate_size if (getattr(config, "mlp_only_layers", None)
                                         or getattr(config, "first_k_dense_replace", 0)) else 0
    return max(experts * size + (shared or 0), dense)


def config_neurons(config) -> int:
    if FAMILIES[config.model_type].moe:
        return moe_config_neurons(config)
    for name in ("intermediate_size", "n_inner", "ffn_dim", "hidden_dim", "ffn_hidden_size"):
        if getattr(config, name, None):
            return getattr(config, name)
    assert config.model_type == "bloom"  # the only family without an FFN-size field
    return 4 * config.hidden_size


def test_layout_matches_config(lm):
    config = lm.model.config
    assert (lm.layout.layers, lm.layout.neurons, lm.layout.hidden) == (
        config.num_hidden_layers, config_neurons(config), config.hidden_size)
    assert lm.kind == FAMILIES[lm.family].kind


def test_zeroing_a_neuron_removes_exactly_its_value_vector(lm):
    """Out-projection output with neuron i zeroed at one position = original - activation * value_vector(i)."""
    layout, ids = lm.layout, encode(lm)
    pos = ids.shape[1] - 2
    outputs: dict[int, torch.Tensor] = {}

    def keep(layer, out):
        outputs[layer] = out.detach().reshape(*ids.shape, -1)  # OPT runs its FFN on (batch * seq, hidden)

    handles = [proj.register_forward_hook(lambda m, a, out, l=l: keep(l, out))
               for l, proj in enumerate(layout.out_projs)]
    try:
        _, acts = capture_activations(layout, lambda: lm.model(ids))
        clean = dict(outputs)
        for layer in range(layout.layers):
            neuron = int(acts[layer][0, pos].abs().argmax())  # the strongest neuron, so the change is large

            def zero(l, x, layer=layer, neuron=neuron):
                x = x.clone()
                x[:, pos, neuron] = 0
                return x

            with ActivationPatch(layout, zero, layers=[layer]):
                lm.model(ids)
            expected = acts[layer][0, pos, neuron] * layout.value_vector(layer, neuron)
            delta = clean[layer] - outputs[layer]
            scale = clean[layer].abs().max()
            assert torch.allclose(delta[0, pos], expected, rtol=1e-5, atol=1e-5 * scale), (layer, neuron)
            others = torch.ones(ids.shape[1], dtype=torch.bool)
            others[pos] = False
            assert torch.allclose(delta[0, others], torch.zeros_like(delta[0, others]), atol=1e-5 * scale)
    finally:
        for handle in handles:
            handle.remove()


def test_value_vectors_agree_with_value_vector(lm):
    layout = lm.layout
    vectors = layout.value_vectors(1, [0, 5, 7])
    assert vectors.shape == (3, layout.hidden)
    assert torch.equal(vectors[1], layout.value_vector(1, 5))
    if layout.experts is None:
        assert layout.value_weight(1).shape[layout.neuron_axis(1)] == layout.neurons
    else:  # one weight per expert, together as wide as the layer
        assert sum(e.size for e in layout.experts[1]) == layout.width(1) <= layout.neurons


def test_embedding_shapes(lm):
    shape = (lm.model.config.vocab_size, lm.layout.hidden)
    assert tuple(lm.layout.input_embeddings().shape) == shape
    assert tuple(lm.layout.output_embeddings().shape) == shape


def _last_block_output(lm, ids):
    captured = {}

    def keep(module, args, out):
        captured["h"] = (out[0] if isinstance(out, tuple) else out).detach()

    handle = lm.layout.blocks[-1].register_forward_hook(keep)
    try:
        logits = lm.model(ids).logits
    finally:
        handle.remove()
    return captured["h"], logits


def _assert_heads_reproduce_logits(lm):
    ids = encode(lm)
    if lm.kind == "causal":
        hidden, logits = _last_block_output(lm, ids)
        assert torch.allclose(lm.layout.vocab_head()(hidden), logits, rtol=1e-5, atol=1e-5)
        normed = lm.layout.base_model()(ids).last_hidden_state
        assert torch.allclose(lm.layout.logits_head()(normed), logits, rtol=1e-5, atol=1e-5)
    else:
        logits = lm.model(ids).logits
        hidden = lm.layout.base_model()(ids).last_hidden_state
        assert torch.allclose(lm.layout.logits_head()(hidden), logits, rtol=1e-5, atol=1e-5)
        assert torch.allclose(lm.layout.vocab_head()(hidden), logits, rtol=1e-5, atol=1e-5)


def test_heads_reproduce_model_logits(lm):
    _assert_heads_reproduce_logits(lm)


def test_opt_350m_layout_heads():
    """OPT-350m: post-norm layers, no final norm, and project_out from hidden to a narrower embedding width."""
    lm = make_tiny("opt", word_embed_proj_dim=16, do_layer_norm_before=False)
    assert lm.layout.final_norm is None
    _assert_heads_reproduce_logits(lm)


def test_tiny_llama_is_gated_and_tied():
    from tiny import tiny_llama

    lm = tiny_llama()
    assert lm.family == "llama" and lm.layout.ties_embeddings()
    assert hasattr(lm.layout.blocks[0].mlp, "gate_proj")


def test_tiny_tokenizers():
    masked, causal = make_tokenizer("masked"), make_tokenizer("causal")
    ids = masked("The capital of France is [MASK] .").input_ids
    assert masked.mask_token_id in ids and masked.unk_token_id not in ids
    paris = causal(" Paris").input_ids
    assert len(paris) == 1 and causal.decode(paris) == " Paris"
    assert causal.unk_token_id not in causal("The capital of France is Paris.").input_ids


def test_unsupported_family_names_the_supported_ones():
    config = AutoConfig.for_model("albert", vocab_size=50, hidden_size=16, embedding_size=16,
                                  num_hidden_layers=1, num_attention_heads=2, intermediate_size=24)
    with pytest.raises(UnsupportedModelError) as info:
        FFNLayout(AutoModelForMaskedLM.from_config(config))
    assert "'albert'" in str(info.value)
    assert all(family in str(info.value) for family in ALL_FAMILIES)


def test_model_without_lm_head_is_explained():
    config = AutoConfig.for_model("gpt2", vocab_size=50, n_embd=16, n_layer=1, n_head=2)
    with pytest.raises(UnsupportedModelError, match="AutoModelForCausalLM"):
        FFNLayout(AutoModel.from_config(config))


def test_no_engine_module_branches_on_a_family_name():
    """Per-family facts live in families.FAMILIES only: adding a family must never need an edit elsewhere."""
    import re
    from pathlib import Path

    import kn_core

    names = "|".join(re.escape(family) for family in FAMILIES)
    branching = re.compile(rf"(family|model_type)\s*(==|!=|\bin\b)|[\"']({names})[\"']")
    offenders = [f"{path.name}:{n}: {line.strip()}"
                 for path in Path(kn_core.__file__).parent.rglob("*.py") if path.name != "families.py"
                 for n, line in enumerate(path.read_text().splitlines(), 1) if branching.search(line)]
    assert offenders == []


def _looks_bert_style(block) -> bool:
    """The structure attribution's BERT-style passes rely on, read from the block itself."""
    attention = getattr(block, "attention", None)
    heads = getattr(attention, "self", None)
    return (hasattr(attention, "output") and hasattr(block, "intermediate") and hasattr(block, "output")
            and not getattr(block, "is_decoder", True)
            and all(hasattr(heads, name) for name in ("query", "key", "value", "scaling", "attention_head_size")))


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_family_rows_agree_with_the_models(family):
    lm = make_tiny(family)
    spec = FAMILIES[family]
    assert lm.layout.spec is spec and lm.kind == spec.kind
    assert spec.bert_style == all(_looks_bert_style(block) for block in lm.layout.blocks)
    assert all(hasattr(lm.model, dotted.split(".")[0]) for dotted in spec.head)
