"""Evaluation: probabilities against naive one-by-one computations, neuron inspection against a hand-made
projection, and the experiments on tiny models (they run, leave the model unchanged, and report controls)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kn_core import evaluation as ev
from kn_core.facts import Fact, FactSet, Relation, render_prompts
from tiny import TINY_CAUSAL, TINY_MASKED, make_tiny

_MODELS: dict = {}


def tiny(family):
    if family not in _MODELS:
        _MODELS[family] = make_tiny(family)
    return _MODELS[family]


REL = Relation("P36", "capital", ("The capital of [X] is [Y].", "[X]'s capital city is [Y].",
                                  "The capital city of [X] is [Y].", "[X], whose capital is [Y]."))
REL2 = Relation("P37", "official language", ("The official language of [X] is [Y].",
                                             "In [X], the official language is [Y].", "People in [X] speak [Y]."))
FACTS = [Fact("P36", "France", "Paris"), Fact("P36", "Argentina", "Buenos Aires"), Fact("P36", "Japan", "Tokyo"),
         Fact("P37", "France", "French"), Fact("P37", "Japan", "Japanese")]


def prompts_of(lm, fact):
    rel = REL if fact.relation == "P36" else REL2
    return render_prompts(fact, rel, lm.tokenizer, lm.kind)[0]


def naive_prob(lm, prompt):
    """One prompt at a time, no padding, answer tokens teacher-forced one by one."""
    tok = lm.tokenizer
    ids = list(tok(prompt.text)["input_ids"])
    p = 1.0
    with torch.no_grad():
        if lm.kind == "causal":
            for a in prompt.answer_ids:
                logits = lm.model(input_ids=torch.tensor([ids])).logits[0, -1]
                p *= float(torch.softmax(logits, -1)[a])
                ids.append(a)
        else:
            slots = [i for i, t in enumerate(ids) if t == tok.mask_token_id]
            for slot, a in zip(slots, prompt.answer_ids):
                logits = lm.model(input_ids=torch.tensor([ids])).logits[0, slot]
                p *= float(torch.softmax(logits, -1)[a])
                ids[slot] = a
    return p


@pytest.mark.parametrize("family", [TINY_MASKED, TINY_CAUSAL])
def test_answer_probabilities_match_naive(family):
    lm = tiny(family)
    prompts = [p for f in FACTS for p in prompts_of(lm, f)]
    assert any(len(p.answer_ids) > 1 for p in prompts)
    got = ev.answer_probabilities(lm, prompts, batch_size=5, top_k=3)
    for p, g in zip(prompts, got):
        assert math.isclose(g["prob"], naive_prob(lm, p), rel_tol=1e-4)
        assert len(g["top"]) == 3 and g["top"][0]["id"] == g["top1_id"]


def test_predict():
    lm = tiny(TINY_MASKED)
    with pytest.raises(ValueError, match="mask"):
        ev.predict(lm, "The capital of France is Paris.")
    top = ev.predict(lm, "The capital of France is [MASK].", top_k=4)
    assert len(top) == 4 and top[0]["prob"] >= top[-1]["prob"]
    causal = tiny(TINY_CAUSAL)
    top = ev.predict(causal, "The capital of France is", top_k=2)
    ids = causal.tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expect = torch.softmax(causal.model(input_ids=ids).logits[0, -1], -1).topk(2)
    assert [t["id"] for t in top] == expect.indices.tolist()


@pytest.mark.parametrize("family", [TINY_MASKED, TINY_CAUSAL])
def test_neuron_tokens_by_hand(family):
    lm = tiny(family)
    info = ev.neuron_tokens(lm, 1, 7, top_k=5)
    proj = lm.layout.out_projs[1]
    w = proj.weight
    v = w[7] if type(proj).__name__ == "Conv1D" else w[:, 7]
    with torch.no_grad():
        if family == "gpt2":
            logits = lm.model.lm_head(lm.model.transformer.ln_f(v))
        else:
            logits = lm.model.cls(v[None, None])[0, 0]
    assert [r["id"] for r in info["promotes"]] == logits.topk(5).indices.tolist()
    assert [r["id"] for r in info["suppresses"]] == (-logits).topk(5).indices.tolist()
    assert info["suppresses"][0]["logit"] == pytest.approx(float(logits.min()), rel=1e-5)


@pytest.mark.parametrize("family", [TINY_MASKED, TINY_CAUSAL])
def test_activations_match_attribution(family):
    from kn_core.attribution import AttributionParams, attribute

    lm = tiny(family)
    prompts = prompts_of(lm, FACTS[0])
    neurons = [(0, 3), (2, 50)]
    acts = ev.neuron_activations(lm, neurons, prompts)
    for row, p in zip(acts, prompts):
        s = attribute(lm, p, AttributionParams(method="activation"))
        assert row == pytest.approx([s.activations[l, i] for l, i in neurons], rel=1e-4, abs=1e-6)
    ranked = ev.rank_by_activation(lm, neurons, ["The capital of France is", "Paris is nice"] if family == "gpt2"
                                   else ["The capital of France is [MASK].", "Paris"])
    assert ranked[0]["activation"] >= ranked[1]["activation"] and ranked[0]["rank"] == 1


def test_relative_change():
    assert ev.relative_change([0.5, 0.1], [0.3, 0.0]) == pytest.approx(-0.5)


def test_reproduce_on_tiny_writes_report(tmp_path):
    import json

    from kn_core.reproduce import run_reproduce

    lm = tiny(TINY_CAUSAL)
    original = {k: v.clone() for k, v in lm.model.state_dict().items()}
    facts = FACTS + [Fact("P36", "Italy", "Rome"), Fact("P37", "Italy", "Italian")]
    factset = FactSet("t", {"P36": REL, "P37": REL2}, facts)
    report = run_reproduce(lm, factset, tmp_path, ["P36", "P37"], facts_per_relation=2, steps=1,
                           control_prompts=4, say=lambda m: None)
    assert report["status"] == "done"
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["model"]["sha256"] == lm.sha256 and "torch" in data["versions"]
    assert "suppress_amplify" in data and "update" in data and "erase" in data
    text = (tmp_path / "report.md").read_text()
    assert "-29.03%" in text and "Suppress" in text
    assert (tmp_path / "layer_histogram.png").exists()
    for name, tensor in lm.model.state_dict().items():
        assert torch.equal(tensor, original[name]), name
    # a second run reads the attribution cache
    again = run_reproduce(lm, factset, tmp_path, ["P36", "P37"], facts_per_relation=2, steps=1,
                          control_prompts=4, say=lambda m: None)
    assert again["neuron_statistics"] == report["neuron_statistics"]


def test_sign_aware_inspector_on_a_planted_negative_neuron():
    """A SwiGLU neuron made to fire negative on every input (up = -4 x gate, so silu(g) x up = -4 g silu(g) <= 0)
    whose value vector points away from ' Paris': active as it is, it promotes ' Paris'."""
    from tiny import tiny_llama

    lm = tiny_llama()
    layer, index = 1, 7
    mlp = lm.model.model.layers[layer].mlp
    paris = lm.tokenizer.convert_tokens_to_ids("▁Paris")
    with torch.no_grad():
        mlp.up_proj.weight[index] = -4.0 * mlp.gate_proj.weight[index]
        mlp.down_proj.weight[:, index] = -lm.model.get_input_embeddings().weight[paris]
    prompts = prompts_of(lm, FACTS[0])
    acts = ev.neuron_activations(lm, [(layer, index)], prompts)[:, 0]
    assert (acts < 0).all()
    sign = ev.activation_sign(lm, layer, index, prompts)
    assert sign == -1
    aware = ev.neuron_tokens(lm, layer, index, top_k=3, sign=sign)
    naive = ev.neuron_tokens(lm, layer, index, top_k=3)
    assert aware["sign"] == -1 and naive["sign"] is None
    assert aware["promotes"][0]["id"] == paris and naive["suppresses"][0]["id"] == paris
    assert aware["promotes"][0]["logit"] == pytest.approx(-naive["suppresses"][0]["logit"])
    assert [r["id"] for r in aware["suppresses"]] == [r["id"] for r in naive["promotes"]]
    assert "negative" in aware["labels"]["promotes"] and "suppresses" in aware["labels"]["suppresses"]
    assert ev.neuron_tokens(lm, layer, index, top_k=3, sign=1)["promotes"] == naive["promotes"]
    with pytest.raises(ValueError, match="sign"):
        ev.neuron_tokens(lm, layer, index, sign=2)


class _OutOfMemoryAbove:
    """Wraps a model so that a forward pass over more than `rows` rows raises CUDA's out-of-memory error."""

    def __init__(self, model, rows: int):
        self.model, self.rows, self.calls = model, rows, []

    def __getattr__(self, name):  # the config and the rest are the model's
        return getattr(self.model, name)

    def __call__(self, input_ids, **kwargs):
        self.calls.append(input_ids.shape[0])
        if input_ids.shape[0] > self.rows:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return self.model(input_ids=input_ids, **kwargs)


@pytest.mark.parametrize("family", [TINY_MASKED, TINY_CAUSAL])
def test_forward_halves_a_batch_on_out_of_memory(family, monkeypatch):
    """The one padded forward (`evaluation.forward_rows`) retries a batch that ran out of GPU memory in halves:
    the same probabilities and activations as one row at a time (the independent reference); one row that does
    not fit is refused with what to do."""
    from kn_core.neurons import answer_activations

    lm = tiny(family)
    prompts = [p for f in FACTS for p in prompts_of(lm, f)]
    reference = [ev.answer_probabilities(lm, [p])[0]["prob"] for p in prompts]
    acts_reference = [answer_activations(lm, [p])[0] for p in prompts]
    small = _OutOfMemoryAbove(lm.model, 2)
    monkeypatch.setattr(lm, "model", small)
    got = ev.answer_probabilities(lm, prompts, batch_size=7)
    assert max(small.calls) > 2 and any(n <= 2 for n in small.calls)
    assert [g["prob"] for g in got] == pytest.approx(reference, rel=1e-4)
    for a, b in zip(answer_activations(lm, prompts, batch_size=7), acts_reference):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=5e-5)
    monkeypatch.setattr(lm, "model", _OutOfMemoryAbove(small.model, 0))
    with pytest.raises(torch.cuda.OutOfMemoryError, match="does not fit in GPU memory; use a smaller model"):
        ev.answer_probabilities(lm, prompts[:3])


def test_forward_rows_reads_logits_and_activations_at_the_answer_positions():
    """`forward_rows` over rows of different lengths: each row's logits and activations at its own positions are
    the unpadded single-row forward's (right padding is masked out)."""
    from kn_core.hooks import capture_activations

    lm = tiny(TINY_CAUSAL)
    rows = [ev.PaddedRow([5, 9, 17, 3], [1, 3], []), ev.PaddedRow([8, 2], [1], []), ev.PaddedRow([4, 4, 4], [0, 2], [])]
    got = list(ev.forward_rows(lm, rows, batch_size=3, layers=[0, 1]))
    for row, out in zip(rows, got):
        def run(row=row):
            with torch.no_grad():
                return lm.model(input_ids=torch.tensor([row.ids]))

        single, acts = capture_activations(lm.layout, run, [0, 1])
        torch.testing.assert_close(out.logits, single.logits[0, row.positions], rtol=1e-4, atol=1e-5)
        for layer in (0, 1):
            torch.testing.assert_close(out.activations[layer], acts[layer][0, row.positions], rtol=1e-4, atol=1e-5)


def test_change_text_is_a_percentage_up_to_a_doubling_and_a_ratio_beyond():
    from kn_core.evaluation import change_text

    assert change_text(0.416) == "+41.6%" and change_text(-0.637, 2) == "-63.70%" and change_text(0.0) == "+0.0%"
    assert change_text(695.171) == "x7.0e2"  # the app printed "+69517.1%"
    assert change_text(1.0) == "x2" and change_text(9.0) == "x10"
    assert change_text(float("nan")) == change_text(None) == "n/a"
