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
    factset = FactSet("t", {"P36": REL, "P37": REL2}, FACTS)
    act = ex.activation_by_prompt(lm, recs, factset, prompts_per_group=3)
    assert act["facts"] == len(recs) and {"expressing", "subject_only", "random"} <= set(act)
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
    for key in ("change_rate", "success_rate", "top5_rate", "ppl_intra_ratio_median", "ppl_inter_ratio_geomean"):
        for arm in ("knowledge", "random", "sign_aware", "calibrated", "calibrated_random"):
            assert key in up[arm], (arm, key)
    assert {"scale", "reached_rate"} <= set(up["calibrated"]) and "scale" in up["calibrated_random"]
    assert row["calibration"]["scale"] == row["calibrated"]["scale"]
    assert not any(k.startswith("ppl_") and "ratio" not in k for k in up["knowledge"])
    rec = next(r for r in recs if f"{r.relation}:{r.fact.subject}" == row["fact"])
    assert row["flipped"] == [list(rec.neurons[0])]
    assert row["sign_aware"]["p_new_after"] != row["knowledge"]["p_new_after"]
    for name, tensor in lm.model.state_dict().items():
        assert torch.equal(tensor, original[name]), name


def test_update_summary_reports_perplexity_ratios_not_differences():
    def row(before, after):
        return {"knowledge": {"change_rate": 1.0, "ppl_intra_before": before, "ppl_intra_after": after,
                              "ppl_inter_before": 2.0, "ppl_inter_after": 3.0}}

    out = ex.update_summary([row(1.0, 2.0), row(1.0, 3.0), row(1.0, 1.2e26)], "knowledge")
    assert out["ppl_intra_ratio_median"]["ratio"] == pytest.approx(3.0)
    assert out["ppl_intra_ratio_median"]["text"] == "x3"
    geomean = (np.log10(2.0) + np.log10(3.0) + np.log10(1.2e26)) / 3
    assert out["ppl_intra_ratio_geomean"]["log10"] == pytest.approx(geomean)
    assert out["ppl_inter_ratio_median"]["ratio"] == pytest.approx(1.5) and out["change_rate"] == 1.0
    assert not any(k.startswith("ppl_") and "ratio" not in k for k in out)
    assert ex.update_summary([], "knowledge") == {}


def test_ratio_text():
    from kn_core.evaluation import ratio

    assert ratio(2.0, 6.4) | {"ratio": 3.2} == {"ratio": 3.2, "log10": pytest.approx(0.50515), "text": "x3.2"}
    assert ratio(1.0, 1.2e26)["text"] == "x1.2e26" and ratio(1.0, 1.2e26)["log10"] == pytest.approx(26.0792)
    assert ratio(10.0, 8.5)["text"] == "x0.85"
    assert [ratio(1.0, x)["text"] for x in (440.0, 9.99e5, 99.7, 12.3, 0.005, 1.0)] == [
        "x4.4e2", "x1.0e6", "x100", "x12", "x5.0e-3", "x1"]  # no "4.4e+02" beside "1.2e26", no "10.0e5"
    assert ratio(1.0, float("nan")) == {"ratio": None, "log10": None, "text": "n/a"}
    assert ratio(0.0, 1.0)["ratio"] is None


class _Stats:
    """The part of kn_core.neurons.ActivationStats the experiments read: `mean` [layers, neurons]."""

    def __init__(self, mean):
        self.mean = mean


def test_flagged_neurons_are_never_edited_and_mean_ablation_runs(monkeypatch):
    from kn_core import edits as E

    lm = tiny(TINY_CAUSAL)
    recs = _records(lm)
    flagged = {tuple(recs[0].neurons[0]), (2, 5)}
    seen = []
    real_apply = {cls: cls.apply for cls in (E.Suppress, E.Amplify, E.Erase)}

    def spy(cls):
        def apply(self, lm_):
            seen.append((cls.__name__, self))
            return real_apply[cls](self, lm_)
        return apply

    for cls in real_apply:
        monkeypatch.setattr(cls, "apply", spy(cls))
    stats = _Stats(np.full((3, 72), 0.25, dtype=np.float32))
    sa = ex.suppress_amplify_experiment(lm, recs, control_prompts=3, exclude=flagged, activation_stats=stats)
    er = ex.erase_experiment(lm, recs, k=3, control_prompts=3, exclude=flagged)
    assert seen and not any(set(edit.neurons) & flagged for _, edit in seen)
    assert sa["excluded_neurons"] == 2 and er["excluded_neurons"] == 2
    means = [edit for _, edit in seen if isinstance(edit, E.Suppress) and edit.to == "mean"]
    assert means and all(m.means == (0.25,) * len(m.neurons) for m in means)
    assert "suppress_mean" in sa["average"]["knowledge"] and "negative" in sa["amplify_meaning"]
    erased = er["per_relation"]["P36"]["knowledge"]
    assert erased["perplexity_ratio"]["log10"] == pytest.approx(
        np.log10(erased["perplexity"] / er["per_relation"]["P36"]["before"]["perplexity"]))


def test_activation_by_prompt_on_a_planted_negative_neuron():
    """A neuron that fires negative (-6) where the text has the fact's subject and relation word, -3 with the
    subject only, and as the model makes it elsewhere: measured in the direction that raises the answer, the
    paper's order expressing > subject only > random must come out (raw signed means give the reverse)."""
    from tiny import tiny_llama

    lm = tiny_llama()
    tok = lm.tokenizer
    france, capital = {tok.convert_tokens_to_ids(t) for t in ("France", "▁France")}, \
        {tok.convert_tokens_to_ids(t) for t in ("capital", "▁capital")}
    planted = (1, 5)
    seen_ids = {}
    capture = lm.model.register_forward_pre_hook(
        lambda module, args, kwargs: seen_ids.update(ids=kwargs.get("input_ids", args[0] if args else None)),
        with_kwargs=True)

    def plant(module, args):
        x = args[0].clone()
        for row, ids in enumerate(seen_ids["ids"].tolist()):
            has_subject, has_relation = bool(france & set(ids)), bool(capital & set(ids))
            x[row, :, planted[1]] += -6.0 if has_subject and has_relation else -3.0 if has_subject else 0.0
        return (x,)

    hook = lm.layout.out_projs[planted[0]].register_forward_pre_hook(plant)
    try:
        factset = FactSet("t", {"P36": REL, "P37": REL2}, FACTS)
        recs = [ex.FactNeurons(f, prompts_of(lm, f), [planted] if f == FACTS[0] else [], []) for f in FACTS]
        corpus = ["The capital of France is Paris .", "France is in Europe .", "Tokyo is a city ."]
        out = ex.activation_by_prompt(lm, recs, factset, corpus=corpus)
    finally:
        hook.remove()
        capture.remove()
    assert out["facts"] == 1 and out["per_fact"][0]["direction"] == [-1]
    assert out["expressing"] > out["subject_only"] > out["random"]
    assert out["expressing"] - out["subject_only"] == pytest.approx(3.0, abs=0.5)
    assert out["subject_only"] - out["random"] == pytest.approx(3.0, abs=0.5)
    assert out["corpus"] == pytest.approx((6 + 3 + 0) / 3, abs=0.5)


def test_known_facts_are_pooled_apart_and_random_prompts_match_the_subject_only_templates():
    lm = tiny(TINY_CAUSAL)
    recs = _records(lm)
    known = {f"{r.relation}:{r.fact.subject}": k % 2 == 0 for k, r in enumerate(recs)}
    sa = ex.suppress_amplify_experiment(lm, recs, control_prompts=2, known=known)
    own = {side: sa["by_known"][side]["knowledge"]["suppress"]["own"]["n_prompts"] for side in ("known", "unknown")}
    assert own == {"known": sum(len(r.prompts) for r, k in zip(recs, known.values()) if k),
                   "unknown": sum(len(r.prompts) for r, k in zip(recs, known.values()) if not k)}
    assert sa["by_known"]["known"]["facts"] + sa["by_known"]["unknown"]["facts"] == len(recs)
    assert ex.suppress_amplify_experiment(lm, recs[:1], control_prompts=1)["by_known"] == {}
    factset = FactSet("t", {"P36": REL, "P37": REL2}, FACTS)
    pairs = ex._matched_prompts(lm, recs[0], factset, np.random.default_rng(0))
    assert pairs and all(a.template == b.template and a.fact.relation == b.fact.relation != recs[0].relation
                         and a.fact.subject == recs[0].fact.subject != b.fact.subject for a, b in pairs)
    act = ex.activation_by_prompt(lm, recs, factset, prompts_per_group=3)
    assert all(row["n_subject_only"] == row["n_random"] for row in act["per_fact"])


def test_fact_answers_and_the_known_rule():
    lm = tiny(TINY_CAUSAL)
    recs = _records(lm)
    rows = ex.fact_answers(lm, [(r.fact, r.prompts) for r in recs])
    assert [row["subject"] for row in rows] == [r.fact.subject for r in recs]
    for row, rec in zip(rows, recs):
        measured = ex.answer_probabilities(lm, rec.prompts)
        assert row["prob"] == pytest.approx(np.mean([m["prob"] for m in measured]))
        assert row["rank_best"] == min(m["rank"] for m in measured)
        assert row["known"] == (np.mean([m["correct"] for m in measured]) > 0.5)
    assert ex.is_known(0.51) and not ex.is_known(0.5)
    split = ex.split_by_known([{"fact": "a", "x": 1.0}, {"fact": "b", "x": 3.0}, {"fact": "c", "x": 5.0}],
                              {"a": True, "b": False}, ["x"])
    assert split == {"known": {"facts": 1, "x": 1.0}, "unknown": {"facts": 1, "x": 3.0}}


def _score_test_bound(k: int, n: int, upper: bool, z: float = 1.959964) -> float:
    """The slow reference: bisect for the p0 at which the score statistic |k/n - p0| / sqrt(p0 (1 - p0) / n)
    reaches z, on the side asked for."""
    lo, hi = (k / n, 1.0) if upper else (0.0, k / n)
    if (upper and k == n) or (not upper and k == 0):
        return k / n
    for _ in range(200):
        mid = (lo + hi) / 2
        inside = abs(k / n - mid) / np.sqrt(mid * (1 - mid) / n) < z
        if upper:
            lo, hi = (mid, hi) if inside else (lo, mid)
        else:
            lo, hi = (lo, mid) if inside else (mid, hi)
    return (lo + hi) / 2


@pytest.mark.parametrize("k,n", [(0, 5), (1, 7), (3, 20), (10, 10), (22, 109)])
def test_the_layer0_share_interval_is_the_wilson_score_interval(k, n):
    low, high = ex.wilson_interval(k, n)
    assert low == pytest.approx(_score_test_bound(k, n, upper=False), abs=1e-9)
    assert high == pytest.approx(_score_test_bound(k, n, upper=True), abs=1e-9)
    assert 0.0 <= low <= k / n <= high <= 1.0


def test_neuron_statistics_give_the_layer0_share_with_its_interval():
    stats = ex.neuron_statistics([[(0, 1), (5, 2)], [(3, 3)], [(5, 2), (6, 1), (7, 0), (8, 8)]], ["a", "a", "b"], 10)
    assert stats["layer0_share"] == pytest.approx(1 / 7)
    assert stats["layer0_share_interval"] == pytest.approx(ex.wilson_interval(1, 7))
    assert stats["layer0_share_interval"] == pytest.approx([0.0257, 0.5131], abs=1e-4)
    assert ex.neuron_statistics([[]], ["a"], 10)["layer0_share_interval"] is None


def test_one_verdict_names_a_facts_status_for_every_front_end():
    assert ex.known_verdict(True, True) == ("not counted as known", "not counted as known", ex.NAME_NOTE)
    assert ex.known_verdict(True, None).why == ex.NAME_NOTE            # the name decides before any check
    assert ex.known_verdict(False, False) == ("not known", "the model does not know this fact", ex.NOT_KNOWN_NOTE)
    assert ex.known_verdict(False, True) == ("known", "", "")
    assert ex.known_verdict(False, None) == ("not checked", "", "")
