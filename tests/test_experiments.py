"""The paper's experiments on tiny models: they run, leave the model unchanged and report controls."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kn_core import experiments as ex
from kn_core.facts import FactSet
from test_evaluation import FACTS, REL, REL2, prompts_of, tiny
from tiny import TINY_CAUSAL, TINY_MASKED


def test_neuron_statistics():
    stats = ex.neuron_statistics([[(0, 1), (2, 3)], [(2, 3)], [(2, 3), (1, 1)]], ["A", "A", "B"], 3)
    assert stats["mean_neurons_per_fact"] == pytest.approx(5 / 3)
    assert stats["layer_histogram"] == [1, 1, 3]
    assert stats["shared_intra_relation"] == 1.0 and stats["shared_inter_relation"] == 1.0


def _records(lm):
    recs = []
    rng = np.random.default_rng(0)
    for k, f in enumerate(FACTS):
        prompts = prompts_of(lm, f)
        neurons = [(2, int(rng.integers(72))), (1, int(rng.integers(72)))]
        acts = [rng.random((3, 72)).astype(np.float32) for _ in prompts]
        recs.append(ex.FactNeurons(f, prompts, neurons, [(2, 5)] if k % 2 else [], acts))
    return recs


@pytest.mark.parametrize("family", [TINY_MASKED, TINY_CAUSAL])
def test_experiments_run_and_restore(family):
    lm = tiny(family)
    original = {k: v.clone() for k, v in lm.model.state_dict().items()}
    recs = _records(lm)
    sa = ex.suppress_amplify_experiment(lm, recs, control_prompts=4)
    assert set(sa["average"]) == {"knowledge", "baseline", "random"}
    assert sa["per_relation"]["P36"]["knowledge"]["suppress"]["own"]["n_prompts"] > 0
    er = ex.erase_experiment(lm, recs, k=3, control_prompts=4)
    assert len(er["per_relation"]["P36"]["neurons"]) == 3
    assert "accuracy" in er["per_relation"]["P36"]["knowledge"]
    act = ex.activation_by_prompt(recs)
    assert act["facts"] == len(recs)
    for name, tensor in lm.model.state_dict().items():
        assert torch.equal(tensor, original[name]), name


def test_update_experiment_on_tiny(monkeypatch):
    lm = tiny(TINY_CAUSAL)
    original = {k: v.clone() for k, v in lm.model.state_dict().items()}
    recs = _records(lm)
    for rec in recs:  # each fact's first neuron negatively active: the sign-aware arm reverses its edit
        for acts in rec.activations:
            acts[rec.neurons[0]] = -1.0
    factset = FactSet("t", {"P36": REL, "P37": REL2}, FACTS)
    real = ex.answer_probabilities

    def all_correct(lm_, prompts, batch_size=16, task=None, top_k=0):
        rows = real(lm_, prompts, batch_size, task, top_k)
        return [dict(r, correct=True) for r in rows]

    monkeypatch.setattr(ex, "answer_probabilities", all_correct)
    up = ex.update_experiment(lm, recs, factset, facts_per_relation=2, control_prompts=4, fraction=1.0)
    monkeypatch.setattr(ex, "answer_probabilities", real)
    assert up["facts"], up["skipped"]
    row = up["facts"][0]
    assert row["new_object"] != row["object"]
    for key in ("change_rate", "success_rate", "top5_rate", "ppl_intra_change", "ppl_inter_change"):
        assert key in up["knowledge"] and key in up["random"] and key in up["sign_aware"]
    rec = next(r for r in recs if f"{r.relation}:{r.fact.subject}" == row["fact"])
    assert row["flipped"] == [list(rec.neurons[0])]
    assert row["sign_aware"]["p_new_after"] != row["knowledge"]["p_new_after"]
    for name, tensor in lm.model.state_dict().items():
        assert torch.equal(tensor, original[name]), name


def test_update_summary_reports_median_beside_a_mean_one_outlier_dominates():
    def row(before, after):
        return {"knowledge": {"change_rate": 1.0, "ppl_intra_before": before, "ppl_intra_after": after,
                              "ppl_inter_before": 2.0, "ppl_inter_after": 3.0}}

    out = ex.update_summary([row(1.0, 2.0), row(1.0, 3.0), row(1.0, 1e12)], "knowledge")
    assert out["ppl_intra_change_median"] == 2.0
    assert out["ppl_intra_change"] == pytest.approx((1.0 + 2.0 + (1e12 - 1)) / 3)
    assert out["ppl_intra_change_rel"] == pytest.approx((1.0 + 2.0 + (1e12 - 1)) / 3)
    assert out["ppl_inter_change_median"] == 1.0 and out["change_rate"] == 1.0
    assert ex.update_summary([], "knowledge") == {}
