"""Attribution against a slow, obvious reference: one layer and one step at a time, full forward passes."""

import numpy as np
import pytest
import torch

from kn_core.attribution import AttributionParams, PromptError, attribute, attribute_fact, encode_answer, shares_passes
from kn_core.encoding import max_positions
from kn_core.hooks import ActivationPatch, capture_routing, hold_routing
from kn_core.models import ModelLoadError, available_devices, pick_device
from kn_core.tasks import Cancelled, Task
from tiny import ALL_FAMILIES, make_tiny, tiny_llama


def reference_scores(lm, text, answer_ids, steps=20, rule="right"):
    """Integrated gradients by the definition: for each answer token, layer and step a full forward pass."""
    tok, layout = lm.tokenizer, lm.layout
    base_ids = list(tok(text)["input_ids"])
    per_token = []
    for j, target in enumerate(answer_ids):
        if lm.kind == "causal":
            ids = base_ids + list(answer_ids[:j])
            pos = len(ids) - 1
        else:
            slots = [i for i, t in enumerate(base_ids) if t == tok.mask_token_id]
            ids = list(base_ids)
            for k in range(j):
                ids[slots[k]] = answer_ids[k]
            pos = slots[j]
        x = torch.tensor([ids])
        scores = []
        for layer in range(layout.layers):
            seen = {}
            with torch.no_grad(), capture_routing() as routing, \
                    ActivationPatch(layout, lambda l, a: seen.__setitem__(l, a[0, pos].clone()), [layer]):
                lm.model(input_ids=x)
            w = seen[layer]
            total = torch.zeros_like(w)
            ks = range(1, steps + 1) if rule == "right" else range(steps)
            for k in ks:
                point = (k / steps * w).clone().requires_grad_(True)

                def put(l, a, point=point):
                    a = a.clone()
                    a[0, pos] = point
                    return a

                # mixture-of-experts layers route as in the clean run (docs/MOE.md); dense models have none
                with torch.enable_grad(), hold_routing(routing), ActivationPatch(layout, put, [layer]):
                    prob = lm.model(input_ids=x).logits[0, pos].softmax(-1)[target]
                    (grad,) = torch.autograd.grad(prob, point)
                total += grad
            scores.append((w * total / steps).numpy())
        per_token.append(np.stack(scores))
    return np.mean(per_token, axis=0)


def double(lm):
    lm.model.double()  # float64 removes rounding, so the comparison tests the algorithm itself
    return lm


CASES = [("bert", "The capital of France is [MASK] .", "Paris"),
         ("gpt2", "The capital of France is", " Paris"),
         ("llama", "The capital of France is", " Paris")]


@pytest.mark.parametrize("family,text,answer", CASES)
@pytest.mark.parametrize("rule", ["right", "left"])
def test_matches_reference(family, text, answer, rule):
    lm = double(tiny_llama() if family == "llama" else make_tiny(family))
    ids = encode_answer(lm, text, answer)
    ours = attribute(lm, text, AttributionParams(steps=5, rule=rule), answer_ids=ids).scores
    ref = reference_scores(lm, text, ids, steps=5, rule=rule)
    assert np.abs(ours - ref).max() <= 1e-5 * np.abs(ref).max()


@pytest.mark.parametrize("family", ALL_FAMILIES)
@pytest.mark.parametrize("layers_per_pass", [1, 2, 3])
def test_every_family_matches_reference(family, layers_per_pass):
    """Replaying blocks and the pre-patch modules of a pass's lowest block is exact in every family."""
    lm = double(make_tiny(family))
    text, answer = (("The capital of France is [MASK] .", "Paris") if lm.kind == "masked"
                    else ("The capital of France is", " Paris"))
    ids = encode_answer(lm, text, answer)
    ours = attribute(lm, text, AttributionParams(steps=2, layers_per_pass=layers_per_pass), answer_ids=ids).scores
    ref = reference_scores(lm, text, ids, steps=2)
    assert np.abs(ours - ref).max() <= 1e-7 * np.abs(ref).max()


class _Prompt:
    def __init__(self, text, answer_ids):
        self.text, self.answer_ids, self.answer = text, tuple(answer_ids), ""


def fact_prompts(lm, answer="Paris", slots=1):
    """Prompts of one fact with different lengths and mask positions, so shared passes must pad."""
    m = " ".join([lm.tokenizer.mask_token] * slots)
    texts = [f"The capital of France is {m} .", f"France has its capital in the old city of {m} , they say .",
             f"{m} is France's capital ."]
    ids = encode_answer(lm, texts[0], answer)
    return [_Prompt(t, ids) for t in texts]


MASKED_FAMILIES = [f for f in ALL_FAMILIES if make_tiny(f).kind == "masked"]


@pytest.mark.parametrize("family", MASKED_FAMILIES)
@pytest.mark.parametrize("layers_per_pass", [1, 2, None])
@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_shared_prompt_passes_match_reference(family, layers_per_pass, attention):
    """A fact's prompts in shared, padded passes: each prompt's scores equal the reference's."""
    lm = double(make_tiny(family))
    lm.model.set_attn_implementation(attention)
    params = AttributionParams(steps=2, layers_per_pass=layers_per_pass, share_prompts=True)
    for answer, slots in (("Paris", 1), ("Addis Ababa", 2)):
        prompts = fact_prompts(lm, answer, slots)
        results = attribute_fact(lm, prompts, params)
        for prompt, result in zip(prompts, results):
            ref = reference_scores(lm, prompt.text, prompt.answer_ids, steps=2)
            assert np.abs(result.scores - ref).max() <= 1e-7 * np.abs(ref).max(), (prompt.text, answer)


def test_which_models_share_passes():
    bert = make_tiny("bert")
    assert shares_passes(bert, AttributionParams(share_prompts=True))
    assert not shares_passes(bert, AttributionParams())  # by default only on GPUs
    assert not shares_passes(bert, AttributionParams(share_prompts=True, method="activation"))
    assert not shares_passes(make_tiny("distilbert"), AttributionParams(share_prompts=True))
    assert not shares_passes(make_tiny("gpt2"), AttributionParams(share_prompts=True))
    bert.model.set_attn_implementation("flex_attention")  # takes no additive mask
    assert not shares_passes(bert, AttributionParams(share_prompts=True))


def test_shared_passes_equal_prompt_by_prompt_with_progress_and_cancel():
    lm = double(make_tiny("bert"))
    prompts = fact_prompts(lm)
    seen, ready, fractions = [], [], []
    shared = attribute_fact(lm, prompts, AttributionParams(steps=3, layers_per_pass=1, passes_per_backward=1,
                                                           share_prompts=True),
                            task=Task(on_progress=lambda f, message: fractions.append(f),
                                      on_partial=lambda partial: seen.append((partial["prompt"], partial["layers"]))),
                            on_prompt=lambda k, result: ready.append(k))
    alone = attribute_fact(lm, prompts, AttributionParams(steps=3, share_prompts=False))
    for a, b in zip(shared, alone):
        np.testing.assert_allclose(a.scores, b.scores, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(a.activations, b.activations, rtol=1e-12)
        assert a.prob == pytest.approx(b.prob, rel=1e-12) and len(a.completeness) == lm.layout.layers
    assert ready == [0, 1, 2]
    assert [(k, layers) for k, layers in seen] == [(k, (l, l + 1)) for l in range(3) for k in range(3)]
    assert fractions[-1] == pytest.approx(1.0)
    token = Task()
    with pytest.raises(Cancelled):
        attribute_fact(lm, prompts, AttributionParams(steps=2, layers_per_pass=1, passes_per_backward=1,
                                                      share_prompts=True),
                       task=token.relay(on_progress=lambda f, message: token.cancel()),
                       on_prompt=lambda k, result: ready.append(k))
    assert ready == [0, 1, 2]


@pytest.mark.parametrize("layers_per_pass,passes_per_backward", [(1, 1), (1, 3), (2, 1), (2, 2), (3, 1)])
def test_pass_grouping_does_not_change_scores(layers_per_pass, passes_per_backward):
    lm = double(make_tiny("gpt2"))
    ids = encode_answer(lm, "The capital of France is", " Paris")
    full = attribute(lm, "The capital of France is", AttributionParams(steps=4, layers_per_pass=3, passes_per_backward=1),
                     answer_ids=ids)
    part = attribute(lm, "The capital of France is", AttributionParams(
        steps=4, layers_per_pass=layers_per_pass, passes_per_backward=passes_per_backward), answer_ids=ids)
    np.testing.assert_allclose(part.scores, full.scores, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("family,text,answer", [("bert", "The capital of Ethiopia is [MASK] [MASK] .", "Addis Ababa"),
                                                ("gpt2", "The capital of Ethiopia is", " Addis Ababa")])
def test_multi_token_answer_is_teacher_forced_mean(family, text, answer):
    lm = double(make_tiny(family))
    ids = encode_answer(lm, text, answer)
    assert len(ids) == 2
    result = attribute(lm, text, AttributionParams(steps=3), answer_ids=ids)
    ref = reference_scores(lm, text, ids, steps=3)
    assert np.abs(result.scores - ref).max() <= 1e-5 * np.abs(ref).max()
    assert len(result.token_probs) == 2 and result.prob == pytest.approx(np.prod(result.token_probs))


def test_completeness_converges_with_steps():
    lm = double(make_tiny("gpt2"))
    ids = encode_answer(lm, "The capital of France is", " Paris")
    result = attribute(lm, "The capital of France is", AttributionParams(steps=200), answer_ids=ids)
    for row in result.completeness:
        assert row["sum"] == pytest.approx(row["delta"], rel=0.02, abs=1e-4)


def test_probability_matches_model():
    lm = make_tiny("gpt2")
    ids = encode_answer(lm, "The capital of France is", " Paris")
    result = attribute(lm, "The capital of France is", AttributionParams(steps=2), answer_ids=ids)
    x = torch.tensor([lm.tokenizer("The capital of France is")["input_ids"]])
    expected = lm.model(input_ids=x).logits[0, -1].softmax(-1)[ids[0]].item()
    assert result.prob == pytest.approx(expected, rel=1e-4)


def test_activation_baseline_is_raw_activation():
    lm = make_tiny("bert")
    text = "The capital of France is [MASK] ."
    ids = encode_answer(lm, text, "Paris")
    result = attribute(lm, text, AttributionParams(method="activation"), answer_ids=ids)
    x = torch.tensor([lm.tokenizer(text)["input_ids"]])
    pos = x[0].tolist().index(lm.tokenizer.mask_token_id)
    seen = {}
    with torch.no_grad(), ActivationPatch(lm.layout, lambda l, a: seen.__setitem__(l, a[0, pos].clone())):
        lm.model(input_ids=x)
    np.testing.assert_allclose(result.scores, np.stack([seen[l].numpy() for l in range(3)]), rtol=1e-6)
    assert result.completeness == []


def test_bad_prompts_have_clear_errors():
    lm = make_tiny("bert")
    with pytest.raises(PromptError, match="no mask slot"):
        attribute(lm, "The capital of France is Paris .", answer_ids=(5,))
    with pytest.raises(PromptError, match="empty"):
        attribute(lm, "  ", answer_ids=(5,))
    with pytest.raises(PromptError, match="2 token"):
        attribute(lm, "The capital of France is [MASK] .", answer_ids=(5, 6))


class _Forwards:
    """Counts the model's forward passes: bad input must be refused before the first one."""

    def __init__(self, lm):
        self.n = 0
        self.handle = lm.model.register_forward_pre_hook(lambda *args: setattr(self, "n", self.n + 1))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


@pytest.mark.parametrize("family", ["gpt2", "bert", "roberta", "llama"])
def test_a_prompt_longer_than_the_model_is_refused_before_any_work(family):
    lm = make_tiny(family)
    limit = max_positions(lm)
    pad = lm.model.config.pad_token_id  # RoBERTa's positions start after its padding index
    assert limit == (64 - pad - 1 if family == "roberta" else 64)
    with torch.no_grad():  # the limit is the model's: the longest input runs, one more token would not
        lm.model(input_ids=torch.full((1, limit), 5))
    mask = " [MASK]" if lm.kind == "masked" else ""
    ok = _Prompt("The capital of France is" + mask, encode_answer(lm, "The capital of France is" + mask, " Paris"))
    long_text = "France " * 100 + "is" + mask
    with _Forwards(lm) as forwards:
        with pytest.raises(PromptError, match=r"\d+ tokens, more than this model's %d positions" % limit):
            attribute(lm, long_text, answer_ids=ok.answer_ids)
        with pytest.raises(PromptError, match="positions"):  # the fact's first prompt is fine: nothing runs
            attribute_fact(lm, [ok, _Prompt(long_text, ok.answer_ids)])
    assert forwards.n == 0


@pytest.mark.parametrize("budget", [-1, 0, float("nan"), float("inf"), "20"])
def test_a_memory_budget_must_be_positive_and_finite(budget):
    lm = make_tiny("gpt2")
    ids = encode_answer(lm, "The capital of France is", " Paris")
    with _Forwards(lm) as forwards, pytest.raises(ValueError, match="memory_budget_mb = .* expected a finite number > 0"):
        attribute(lm, "The capital of France is", AttributionParams(steps=2, memory_budget_mb=budget), answer_ids=ids)
    assert forwards.n == 0


def test_answer_ids_and_prompt_text_are_checked():
    lm = make_tiny("gpt2")
    text = "The capital of France is"
    vocab = lm.layout.output_embeddings().shape[0]
    messages = []
    with _Forwards(lm) as forwards:
        with pytest.raises(TypeError, match="without answer_ids; pass a facts.Prompt") as info:
            attribute(lm, text)
        assert isinstance(info.value, PromptError)  # a ValueError too, so the CLI reports it in one line
        with pytest.raises(TypeError, match="not int"):
            attribute(lm, 42, answer_ids=(5,))
        for bad, at in [((-1,), 0), ((5, vocab), 1), ((10**12,), 0)]:
            with pytest.raises(ValueError, match=r"answer_ids\[%d\] = .* from 0 to %d" % (at, vocab - 1)) as info:
                attribute(lm, text, answer_ids=bad)
            messages.append(str(info.value))
        with pytest.raises(ValueError, match="answer_ids\\[0\\] = 1.5"):
            attribute(lm, text, answer_ids=(1.5,))
        with pytest.raises(ValueError, match="prompt = .*NUL") as info:
            attribute(lm, "The capital\x00 of France is", answer_ids=(5,))
        messages.append(str(info.value))
        with pytest.raises(ValueError, match="prompt = .*lone surrogate") as info:
            attribute(lm, "The capital of \ud800 France is", answer_ids=(5,))
        messages.append(str(info.value))
        with pytest.raises(ValueError, match="answer = .*NUL"):
            encode_answer(lm, text, " Par\x00is")
    assert forwards.n == 0
    assert all("\n" not in message for message in messages)


@pytest.mark.parametrize("name", ["cuda:99", "cuda:abc", "tpu", "cpu:1", "mps:0", ""])
def test_unknown_or_missing_devices_name_the_ones_that_exist(name):
    with pytest.raises(ModelLoadError) as info:
        pick_device(name)
    message = str(info.value)
    assert "\n" not in message and repr(name) in message
    assert all(device in message for device in available_devices()) and "cpu" in message
    assert pick_device("cpu") == torch.device("cpu") and pick_device("auto").type in ("cpu", "cuda", "mps")


def test_progress_and_cancel():
    lm = make_tiny("gpt2")
    ids = encode_answer(lm, "The capital of France is", " Paris")
    seen, fractions = [], []
    attribute(lm, "The capital of France is", AttributionParams(steps=2, layers_per_pass=1, passes_per_backward=1),
              task=Task(on_progress=lambda f, message: fractions.append(f),
                        on_partial=lambda partial: seen.append((partial["layers"], partial["scores"].shape))),
              answer_ids=ids)
    assert [s[0] for s in seen] == [(0, 1), (1, 2), (2, 3)] and fractions[-1] == pytest.approx(1.0)
    assert seen[0][1] == (1, lm.layout.neurons)
    token = Task()

    def cancel_after_first(fraction, message):
        token.cancel()

    with pytest.raises(Cancelled):
        attribute(lm, "The capital of France is", AttributionParams(steps=2, layers_per_pass=1, passes_per_backward=1),
                  task=token.relay(on_progress=cancel_after_first), answer_ids=ids)


def test_deterministic():
    lm = make_tiny("llama")
    ids = encode_answer(lm, "The capital of France is", " Paris")
    a = attribute(lm, "The capital of France is", AttributionParams(steps=3), answer_ids=ids).scores
    b = attribute(lm, "The capital of France is", AttributionParams(steps=3), answer_ids=ids).scores
    assert np.array_equal(a, b)


@pytest.mark.default_model
def test_completeness_on_default_model_capitals():
    """At the paper's m = 20, each layer's scores sum to P(w) - P(0 at that layer) within a few percent
    overall (measured: 4.7-5.9% for these four)."""
    from kn_core.models import load_model

    lm = load_model()
    for country, capital in [("France", " Paris"), ("Germany", " Berlin"), ("Japan", " Tokyo"), ("Italy", " Rome")]:
        text = f"The capital of {country} is"
        result = attribute(lm, text, answer_ids=encode_answer(lm, text, capital))
        sums = np.array([row["sum"] for row in result.completeness])
        deltas = np.array([row["delta"] for row in result.completeness])
        assert np.abs(sums - deltas).sum() / np.abs(deltas).sum() < 0.08, country


def test_non_finite_scores_name_the_prompt_the_layers_and_the_fix():
    from kn_core.attribution import NonFiniteScoresError, _check_finite

    scores = torch.zeros(4, 6)
    _check_finite("fine", scores, torch.float32)
    scores[2, 3], scores[3, 0] = float("nan"), float("inf")
    for dtype, fix in ((torch.bfloat16, "--dtype float32"), (torch.float32, "weights")):
        with pytest.raises(NonFiniteScoresError) as info:
            _check_finite("The capital of France is", scores, dtype)
        message = str(info.value)
        assert "2 attribution scores of 'The capital of France is'" in message and "layers 2, 3" in message
        assert fix in message and "\n" not in message


def test_params_read_back_from_a_runs_stored_dict():
    """`AttributionParams.from_dict` is `to_dict`'s inverse, and ignores the other keys a run stores beside them."""
    from kn_core.attribution import AttributionParams

    for params in (AttributionParams(), AttributionParams(steps=7, rule="left", seed=3),
                   AttributionParams(quadrature="gauss", steps=4, tolerance=0.02)):
        stored = {**params.to_dict(), "causal_templates": "prefix", "held_out_templates": ["x"]}
        assert AttributionParams.from_dict(stored) == params
