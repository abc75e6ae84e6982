"""Every family end to end from a saved folder (load, attribute against the slow reference, edit with bitwise
undo), image-text checkpoints through their language model, and the structural fallback for a family without
a row (a made-up architecture)."""

import numpy as np
import pytest
import torch
from torch import nn

from kn_core import edits as E
from kn_core.attribution import AttributionParams, attribute, encode_answer
from kn_core.edit_stack import EditStack
from kn_core.families import IMAGE_TEXT_WRAPPERS
from kn_core.models import load_model
from test_attribution import reference_scores
from test_edits import assert_bitwise, snapshot
from test_ffn import one_thread  # noqa: F401 - the module's autouse fixture: tiny models on one thread
from tiny import ALL_FAMILIES, IMAGE_TEXT, make_tiny, save_tiny_image_text


def _prompt(lm):
    if lm.kind == "masked":
        return "The capital of France is [MASK] .", "Paris"
    return "The capital of France is", " Paris"


def _attributes_and_edits(lm):
    """Attribution equals the one-layer-one-step reference; every edit kind changes the model's output and
    undoing them all restores every weight byte for byte."""
    text, answer = _prompt(lm)
    ids = encode_answer(lm, text, answer)
    ours = attribute(lm, text, AttributionParams(steps=2), answer_ids=ids).scores
    ref = reference_scores(lm, text, ids, steps=2)
    assert np.abs(ours - ref).max() <= 1e-5 * np.abs(ref).max()
    x = lm.tokenizer(text, return_tensors="pt").input_ids
    clean = lm.model(input_ids=x).logits
    original = snapshot(lm)
    strongest = tuple((layer, int(np.abs(ours[layer]).argmax())) for layer in range(lm.layout.layers))
    stack = EditStack(lm)
    try:
        for edit in (E.Suppress(strongest, "all"), E.Amplify(strongest, 3.0, "all"),
                     E.Update(strongest[:1], (6,), (7,), 1.0, 8.0), E.Erase(strongest[1:2])):
            stack.push(edit)
            assert not torch.equal(lm.model(input_ids=x).logits, clean), edit.describe()
    finally:
        stack.clear()
    assert_bitwise(lm, original)
    assert torch.equal(lm.model(input_ids=x).logits, clean)


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_every_family_loads_attributes_and_edits(family, tmp_path):
    built = make_tiny(family)
    built.model.save_pretrained(tmp_path)
    built.tokenizer.save_pretrained(tmp_path)
    lm = load_model(str(tmp_path), device="cpu")
    assert lm.family == family and lm.sha256 == built.sha256
    lm.model.set_attn_implementation("eager")
    _attributes_and_edits(lm)


@pytest.fixture(scope="module", params=sorted(IMAGE_TEXT))
def image_text(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    save_tiny_image_text(request.param, folder)
    return load_model(str(folder), device="cpu")


def test_wrappers_under_test_are_the_supported_ones():
    assert sorted(IMAGE_TEXT) == sorted(IMAGE_TEXT_WRAPPERS)


def test_image_text_checkpoint_runs_its_language_model(image_text):
    lm = image_text
    config = lm.model.config
    text_type = config.get_text_config().model_type
    assert lm.describe()["loaded"].startswith(f"the {text_type} language model and head of this {config.model_type}")
    language_model = lm.model.model.language_model
    assert lm.layout.blocks == list(language_model.layers)
    # the text path of the wrapper is its language model and head, nothing else
    x = lm.tokenizer("The capital of France is", return_tensors="pt").input_ids
    hidden = language_model(input_ids=x).last_hidden_state
    assert torch.allclose(lm.layout.logits_head()(hidden), lm.model(input_ids=x).logits, rtol=1e-5, atol=1e-6)


def test_image_text_checkpoint_attributes_and_edits(image_text):
    image_text.model.set_attn_implementation("eager")
    _attributes_and_edits(image_text)


# ------------------------------------------------------------------ a made-up family without a row

from transformers import PretrainedConfig, PreTrainedModel  # noqa: E402
from transformers.modeling_outputs import BaseModelOutput, CausalLMOutput  # noqa: E402

from kn_core.families import UnsupportedModelError  # noqa: E402
from kn_core.models import wrap_model  # noqa: E402
from tiny import HIDDEN, LAYERS, NEURONS, make_tokenizer  # noqa: E402


class ToyConfig(PretrainedConfig):
    model_type = "kn-toy"

    def __init__(self, vocab_size=400, hidden_size=HIDDEN, intermediate_size=NEURONS, num_hidden_layers=LAYERS,
                 logit_multiplier=1.0, ffn_name="feed_forward", **kwargs):
        super().__init__(**kwargs)
        self.vocab_size, self.hidden_size, self.intermediate_size = vocab_size, hidden_size, intermediate_size
        self.num_hidden_layers, self.logit_multiplier, self.ffn_name = num_hidden_layers, logit_multiplier, ffn_name


class ToyFeedForward(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.w_in = nn.Linear(config.hidden_size, config.intermediate_size)
        self.w_out = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, h):
        return self.w_out(torch.relu(self.w_in(h)) ** 2)


class ToyBlock(nn.Module):
    """Pre-norm causal single-head attention and an FFN under a name no row knows."""

    def __init__(self, config):
        super().__init__()
        self.norm_a, self.norm_f = nn.LayerNorm(config.hidden_size), nn.LayerNorm(config.hidden_size)
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.ffn_name = config.ffn_name
        if config.ffn_name:
            setattr(self, config.ffn_name, ToyFeedForward(config))
        else:  # the FFN's Linears right in the block, as in no family with a row
            self.w_in = nn.Linear(config.hidden_size, config.intermediate_size)
            self.w_out = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, h):
        q, k, v = self.qkv(self.norm_a(h)).chunk(3, dim=-1)
        h = h + nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        ffn = getattr(self, self.ffn_name) if self.ffn_name else ToyFeedForward.forward.__get__(self)
        return h + ffn(self.norm_f(h))


class ToyModel(PreTrainedModel):
    config_class = ToyConfig

    def __init__(self, config):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.stack = nn.ModuleList(ToyBlock(config) for _ in range(config.num_hidden_layers))
        self.norm_out = nn.LayerNorm(config.hidden_size)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids=None, **kwargs):
        h = self.embed(input_ids)
        for block in self.stack:
            h = block(h)
        return BaseModelOutput(last_hidden_state=self.norm_out(h))


class ToyForCausalLM(PreTrainedModel):
    config_class = ToyConfig
    base_model_prefix = "toy"

    def __init__(self, config):
        super().__init__(config)
        self.toy = ToyModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids=None, **kwargs):
        hidden = self.toy(input_ids=input_ids).last_hidden_state
        return CausalLMOutput(logits=self.lm_head(hidden) * self.config.logit_multiplier)


def _toy(claimed_layers=None, **config):
    tokenizer = make_tokenizer("causal")
    torch.manual_seed(0)
    model = ToyForCausalLM(ToyConfig(vocab_size=len(tokenizer), **config))
    model.config.num_hidden_layers = claimed_layers or model.config.num_hidden_layers
    for parameter in model.parameters():
        nn.init.normal_(parameter, std=0.2)
    return model, tokenizer


@pytest.mark.parametrize("ffn_name,out_proj", [("feed_forward", "feed_forward.w_out"), (None, "w_out")])
def test_family_without_a_row_is_read_from_its_structure(ffn_name, out_proj):
    model, tokenizer = _toy(ffn_name=ffn_name)
    lm = wrap_model(model, tokenizer, source="toy")
    assert lm.layout.found == (f"no row for 'kn-toy'; read from its structure: 3 blocks at toy.stack, FFN neurons "
                               f"at the input of {out_proj}, final norm toy.norm_out, head output embeddings "
                               f"(checked against the model's logits)")
    assert (lm.layout.layers, lm.layout.neurons, lm.layout.hidden) == (LAYERS, NEURONS, HIDDEN)
    _attributes_and_edits(lm)


@pytest.mark.parametrize("config,reason", [
    (dict(logit_multiplier=3.0), "do not reproduce its logits"),
    (dict(intermediate_size=HIDDEN), "no FFN in ToyBlock"),
    (dict(claimed_layers=5), "no list of 5 blocks"),
])
def test_family_that_cannot_be_read_is_refused_in_one_line(config, reason):
    model, tokenizer = _toy(**config)
    with pytest.raises(UnsupportedModelError, match=reason) as refused:
        wrap_model(model, tokenizer, source="toy")
    message = str(refused.value)
    assert "\n" not in message and "'kn-toy'" in message and "add its row to kn_core/families.py" in message


def test_load_model_reads_a_family_without_a_row_from_its_folder(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    AutoConfig.register("kn-toy", ToyConfig, exist_ok=True)
    AutoModelForCausalLM.register(ToyConfig, ToyForCausalLM, exist_ok=True)
    model, tokenizer = _toy()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    seen = []
    from kn_core.tasks import Task

    lm = load_model(str(tmp_path), device="cpu", task=Task(on_progress=lambda f, message: seen.append(message)))
    assert lm.describe()["structure"].startswith("no row for 'kn-toy'; read from its structure: 3 blocks")
    assert lm.describe()["structure"] in seen


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "bert"])
def test_bfloat16_on_cpu_loads_attributes_and_edits(family, tmp_path):
    """bfloat16 weights from a folder: scores (computed in float32 from the bfloat16 forward) within bfloat16's
    precision of the float32 model's, and edits undone bit for bit."""
    built = make_tiny(family)
    built.model.save_pretrained(tmp_path)
    built.tokenizer.save_pretrained(tmp_path)
    lm = load_model(str(tmp_path), device="cpu", dtype="bfloat16")
    assert lm.dtype == torch.bfloat16 and next(lm.model.parameters()).dtype == torch.bfloat16
    text, answer = _prompt(lm)
    ids = encode_answer(lm, text, answer)
    half = attribute(lm, text, AttributionParams(steps=4), answer_ids=ids)
    full = attribute(built, text, AttributionParams(steps=4), answer_ids=ids)
    assert half.scores.dtype == np.float32 and np.isfinite(half.scores).all()
    assert np.abs(half.scores - full.scores).max() <= 0.05 * np.abs(full.scores).max()
    assert half.prob == pytest.approx(full.prob, rel=0.05)
    original = snapshot(lm)
    stack = EditStack(lm)
    stack.push(E.Update(((0, 1), (2, 5)), (6,), (7,), 1.0, 8.0))
    stack.push(E.Suppress(((1, 3),), "all"))
    stack.clear()
    assert_bitwise(lm, original)


@pytest.mark.parametrize("family,base,found", [
    ("diffllama", "llama", "3 blocks at model.layers, FFN neurons at the input of mlp.down_proj, final norm model.norm"),
    ("megatron-bert", "bert", "3 blocks at bert.encoder.layer, FFN neurons at the input of output.dense, final norm "
                              "none, head cls"),
])
def test_transformers_family_without_a_row_is_read_from_its_structure(family, base, found):
    """Real families of the installed transformers with no row: DiffLlama (differential attention, Llama FFN) and
    Megatron-BERT (pre-norm BERT: the FFN's Linears in the block's `intermediate` and `output`)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM

    from tiny import _config_kwargs

    kind = "masked" if base == "bert" else "causal"
    tokenizer = make_tokenizer(kind)
    config = AutoConfig.for_model(family, **_config_kwargs(base, tokenizer))
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    auto = AutoModelForMaskedLM if kind == "masked" else AutoModelForCausalLM
    lm = wrap_model(auto.from_config(config, dtype=torch.float32), tokenizer)
    assert lm.layout.found.startswith(f"no row for {family!r}; read from its structure: {found}")
    _attributes_and_edits(lm)



def test_image_text_checkpoint_with_an_unsupported_language_model_is_refused_in_one_line(tmp_path):
    from transformers import AutoConfig

    AutoConfig.for_model("llava", text_config={"model_type": "gpt2", "n_embd": 16, "n_layer": 1, "n_head": 2},
                         vision_config={"hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 1,
                                        "num_attention_heads": 2}).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError) as refused:
        load_model(str(tmp_path), device="cpu")
    message = str(refused.value)
    assert "\n" not in message and "'llava' checkpoint's language model is a 'gpt2' model" in message
