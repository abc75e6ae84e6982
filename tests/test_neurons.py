"""Selecting knowledge neurons from scores (coarse, refined, relation-level, the paper's adaptive p), with and
without excluded neurons; activation statistics and the massive/unspecific flags."""

import json
from collections import Counter
from types import SimpleNamespace

import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import numpy as np
import pytest
import torch
from hypothesis import given, settings

from kn_core.attribution import AttributionParams, attribute, encode_answer
from kn_core.neurons import (ActivationStats, NeuronFlags, activation_stats, adapt_p, answer_activations,
                             coarse_counts, coarse_neurons, fact_coarse_set, flag_massive, flag_unspecific,
                             neuron_flags, neutral_sentences, refined_from_counts, refined_neurons, relation_neurons,
                             run_flags, run_stats, scored_flags)
from kn_core.validation import ValidationError
from tiny import ALL_FAMILIES, make_tiny


def test_coarse_refined_relation_thresholds():
    scores = np.zeros((2, 4), dtype=np.float32)
    scores[1, 2], scores[0, 1], scores[0, 3] = 1.0, 0.25, 0.1
    assert coarse_neurons(scores, 0.2) == [(0, 1), (1, 2)]
    assert coarse_neurons(-np.ones((2, 2)), 0.2) == []
    other = np.zeros_like(scores)
    other[1, 2] = 1.0
    # 5 prompts, p=0.7 -> a neuron must be coarse in >= max(3.5, 3) = 4 of them
    assert refined_neurons([scores] * 4 + [other], 0.2, 0.7) == [(0, 1), (1, 2)]
    assert refined_neurons([scores] * 3 + [other] * 2, 0.2, 0.7) == [(1, 2)]
    # few prompts: never fewer than 3 prompts
    assert refined_neurons([scores] * 2, 0.2, 0.1) == []
    assert relation_neurons([[(1, 2)], [(1, 2), (0, 1)], [(0, 0)]] + [[]] * 17, 0.1) == [((1, 2), 2)]


def test_adapt_p_moves_toward_two_to_five_neurons():
    rng = np.random.default_rng(0)
    facts = []
    for _ in range(5):
        prompts = []
        for k in range(10):
            s = rng.random((3, 10)).astype(np.float32) * 0.1
            for i in range(10):
                s[0, i] = 1.0 if k < 10 - i // 2 else 0.0  # neuron (0, i) is coarse in 10 - i//2 prompts
            prompts.append(s)
        facts.append(prompts)
    adapted = adapt_p(facts, 0.2, 0.7)
    # need >= 7 prompts: 8 neurons (too many); 0.75 and 0.8 need 8: 6; 0.85 needs 9: 4 -> stop
    assert [(round(p, 2), m) for p, m in adapted.history] == [(0.7, 8.0), (0.75, 6.0), (0.8, 6.0), (0.85, 4.0)]
    assert adapted.p == pytest.approx(0.85) and adapted.mean_neurons == 4.0
    few = adapt_p([list(np.eye(3, dtype=np.float32)[:, None, :])], 0.2, 0.7)  # no neuron in 3 prompts: 6 moves down
    assert len(few.history) == 7 and few.p == pytest.approx(0.4)


# --- exclude: against a slow, obvious reference ----------------------------------------------------------------

def slow_coarse(scores, t, exclude):
    """Reference: look at every neuron twice; the maximum over the neurons that are not excluded."""
    keep = [(l, i) for l in range(scores.shape[0]) for i in range(scores.shape[1]) if (l, i) not in set(exclude)]
    if not keep:
        return []
    top = max(float(scores[n]) for n in keep)
    return [n for n in keep if top > 0 and float(scores[n]) > t * top]


score_arrays = st.integers(1, 4).flatmap(lambda layers: st.integers(1, 6).flatmap(lambda neurons: st.lists(
    hnp.arrays(np.float32, (layers, neurons), elements=st.floats(-2, 2, width=32)), min_size=1, max_size=6)))


@settings(max_examples=150, deadline=None)
@given(score_arrays, st.sampled_from([0.2, 0.5]), st.sampled_from([0.1, 0.7, 1.0]), st.data())
def test_exclude_matches_the_reference(score_list, t, p, data):
    layers, neurons = score_list[0].shape
    everyone = [(l, i) for l in range(layers) for i in range(neurons)]
    exclude = data.draw(st.lists(st.sampled_from(everyone), max_size=len(everyone), unique=True))
    for scores in score_list:
        assert coarse_neurons(scores, t, exclude=exclude) == slow_coarse(scores, t, exclude)
    counts = Counter(n for scores in score_list for n in slow_coarse(scores, t, exclude))
    need = max(p * len(score_list), 3)
    assert refined_neurons(score_list, t, p, exclude=exclude) == sorted(n for n, c in counts.items() if c >= need)
    assert coarse_counts(score_list, t, exclude=exclude) == counts
    assert not set(exclude) & set(coarse_counts(score_list, t, exclude=exclude))
    assert adapt_p([score_list], t, 0.7, exclude=exclude).history[0][1] == len(
        refined_neurons(score_list, t, 0.7, exclude=exclude))


def test_an_excluded_neuron_never_sets_the_threshold():
    scores = np.full((2, 3), 0.1, dtype=np.float32)
    scores[0, 0], scores[1, 2], scores[1, 1] = 100.0, 1.0, 0.3
    assert coarse_neurons(scores) == [(0, 0)]  # the paper: one huge score decides the whole set
    assert coarse_neurons(scores, exclude=[(0, 0)]) == [(1, 1), (1, 2)]
    assert coarse_neurons(scores, exclude={(0, 0), (1, 2), (1, 1)}) == [(0, 1), (0, 2), (1, 0)]


def test_relation_neurons_and_refined_from_counts_drop_excluded():
    sets = [[(1, 2), (0, 0)], [(1, 2), (0, 0)], [(3, 3)]]
    assert relation_neurons(sets, 0.5) == [((0, 0), 2), ((1, 2), 2)]
    assert relation_neurons(sets, 0.5, exclude=[(0, 0)]) == [((1, 2), 2)]
    assert refined_from_counts(Counter({(0, 0): 5, (1, 1): 5}), 5, 0.7, exclude=[(0, 0)]) == [(1, 1)]


def test_exclude_outside_the_scores_is_a_clear_error():
    with pytest.raises(ValueError, match=r"excluded neuron \(2, 0\) is outside the scores' 2 layers x 3 neurons"):
        coarse_neurons(np.ones((2, 3)), exclude=[(2, 0)])


# --- activation statistics and the massive flag ----------------------------------------------------------------

def test_stats_from_activations_against_numpy_by_hand():
    rng = np.random.default_rng(1)
    acts = [rng.normal(0, 1, (2, 5)).astype(np.float32) for _ in range(4)]
    stats = ActivationStats.from_activations(acts, source="synthetic")
    assert stats.n_prompts == 4 and stats.shape == (2, 5)
    for l in range(2):
        pooled = sorted(abs(float(a[l, i])) for a in acts for i in range(5))
        assert stats.layer_median_abs[l] == pytest.approx((pooled[9] + pooled[10]) / 2, rel=1e-6)
        for i in range(5):
            values = [float(a[l, i]) for a in acts]
            assert stats.mean[l, i] == pytest.approx(sum(values) / 4, rel=1e-5, abs=1e-6)
            assert stats.mean_abs[l, i] == pytest.approx(sum(map(abs, values)) / 4, rel=1e-5)
            assert stats.median_abs[l, i] == pytest.approx(np.median(np.abs(values)), rel=1e-6)
    assert stats.mean_of([(1, 3), (0, 0)]) == [pytest.approx(float(np.mean([a[1, 3] for a in acts]))),
                                               pytest.approx(float(np.mean([a[0, 0] for a in acts])))]
    again = ActivationStats.from_dict(json.loads(json.dumps(stats.to_dict())))
    for name in ("mean", "mean_abs", "median_abs", "layer_median_abs"):
        assert np.array_equal(getattr(again, name), getattr(stats, name))
    assert (again.n_prompts, again.source) == (4, "synthetic")
    with pytest.raises(ValueError, match="at least one prompt"):
        ActivationStats.from_activations([])
    with pytest.raises(ValueError, match="same shape"):
        ActivationStats.from_activations([np.zeros((2, 5)), np.zeros((2, 4))])


def synthetic_stats(big_on_prompts: int, value: float = 500.0, prompts: int = 10):
    """2 layers x 600 neurons of |activation| ~ 1, neuron (1, 7) at `value` on the first `big_on_prompts`."""
    rng = np.random.default_rng(0)
    acts = [rng.normal(0, 1.5, (2, 600)).astype(np.float32) for _ in range(prompts)]
    for a in acts[:big_on_prompts]:
        a[1, 7] = -value
    return ActivationStats.from_activations(acts)


def test_massive_needs_consistency_magnitude_and_rank():
    assert flag_massive(synthetic_stats(10)) == {(1, 7)}
    assert flag_massive(synthetic_stats(6)) == {(1, 7)}  # large on most prompts
    assert flag_massive(synthetic_stats(1, value=5000.0)) == frozenset()  # huge on one prompt only: not massive
    assert flag_massive(synthetic_stats(10, value=50.0)) == frozenset()  # ~50x the layer's median, not 100x
    assert flag_massive(synthetic_stats(0)) == frozenset()  # nothing stands out in plain noise
    flags = neuron_flags(synthetic_stats(10))
    assert flags.massive == {(1, 7)} and flags.of((1, 7)) == ("massive",) and flags.of((0, 0)) == ()
    assert "100 x its layer's median" in flags.rule["massive"] and flags.rule["n_prompts"] == 10


def test_a_mostly_zero_relu_layer_does_not_flag_its_ordinary_neurons():
    rng = np.random.default_rng(0)
    acts = []
    for _ in range(10):
        a = np.maximum(rng.normal(-0.5, 1.0, (2, 600)), 0).astype(np.float32)  # ~70% exact zeros
        a[1, :20] = 1.0 + rng.random(20)  # a few always-on neurons of ordinary size
        acts.append(a)
    stats = ActivationStats.from_activations(acts)
    assert stats.layer_median_abs[1] == 0
    assert flag_massive(stats) == frozenset()
    for a in acts:
        a[1, 7] = 300.0
    assert flag_massive(ActivationStats.from_activations(acts)) == {(1, 7)}


def plant(lm, layer: int, neuron: int, value: float):
    """A bias on the FFN's input side that makes one neuron fire at ~`value` on every input."""
    with torch.no_grad():
        if lm.model.config.model_type == "gpt2":
            lm.model.transformer.h[layer].mlp.c_fc.bias[neuron] = value
        else:
            lm.model.bert.encoder.layer[layer].intermediate.dense.bias[neuron] = value


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_planted_massive_neuron_is_flagged_and_nothing_else(family):
    lm = make_tiny(family)
    assert neuron_flags(activation_stats(lm)).excluded == frozenset()  # a random model has none
    plant(lm, 1, 5, 150.0)
    stats = activation_stats(lm)
    assert stats.n_prompts == len(neutral_sentences()) >= 50
    assert stats.median_abs[1, 5] > 500 * stats.layer_median_abs[1]  # ~1000x the others, on every input
    assert stats.mean_of([(1, 5)])[0] == pytest.approx(150.0, rel=0.02)  # what mean-ablation sets it to
    flags = neuron_flags(stats)
    assert flags.massive == {(1, 5)} and flags.unspecific == frozenset()


def test_coarse_threshold_ignores_the_planted_neuron():
    lm = make_tiny("gpt2")
    plant(lm, 1, 5, 100.0)  # ~600x the layer's median; on this seed its score is the prompt's largest
    text = "The capital of France is"
    result = attribute(lm, text, AttributionParams(steps=5), answer_ids=encode_answer(lm, text, " Paris"))
    flags = run_flags(lm, [result.activations])
    assert flags.massive == {(1, 5)}
    scores = result.scores
    assert np.unravel_index(np.argmax(scores), scores.shape) == (1, 5)  # it would set t x max
    coarse = coarse_neurons(scores, 0.2, exclude=flags.excluded)
    assert (1, 5) not in coarse and coarse == slow_coarse(scores, 0.2, [(1, 5)])
    assert set(coarse) > set(coarse_neurons(scores, 0.2)) - {(1, 5)}  # a lower threshold: more of the others


@pytest.mark.parametrize("family,text,answer", [("gpt2", "The capital of France is", " Paris"),
                                                ("gpt2", "The capital of Argentina is", " Buenos Aires"),
                                                ("bert", "The capital of France is [MASK].", "Paris")])
def test_measured_activations_are_the_ones_attribution_reads(family, text, answer):
    lm = make_tiny(family)
    ids = encode_answer(lm, text, answer)
    result = attribute(lm, text, AttributionParams(steps=2), answer_ids=ids)
    measured = answer_activations(lm, [SimpleNamespace(text=text, answer_ids=ids)])[0]
    np.testing.assert_allclose(measured, result.activations, rtol=1e-4, atol=1e-5)


def test_answer_activations_rejects_empty_text_before_any_pass():
    lm = make_tiny("gpt2")
    with pytest.raises(ValueError, match="empty text"):
        answer_activations(lm, ["The capital of", "  "])


# --- unspecific and the flags' record --------------------------------------------------------------------------

def test_unspecific_is_coarse_for_facts_of_most_relations():
    shared, local = (0, 3), (2, 9)
    sets = {"P1": [{shared, local}, {(1, 1)}], "P2": [{shared}, {(1, 2)}], "P3": [{(1, 4)}] * 9 + [{shared}],
            "P4": [{(1, 5)}]}
    # P1, P2 and P3 (1 of 10 facts: 10%) use `shared`: 3 of 4 relations > half
    assert flag_unspecific(sets) == {shared}
    assert flag_unspecific({k: sets[k] for k in ("P1", "P4", "P3")}) == {shared}  # 2 of 3
    assert flag_unspecific({"P1": sets["P1"], "P4": sets["P4"], "P5": [{(1, 6)}], "P6": [{shared}]}) == frozenset()
    assert flag_unspecific({k: sets[k] for k in ("P1", "P2")}) == frozenset()  # fewer than 3 relations
    flags = neuron_flags(synthetic_stats(10), sets)
    assert flags.unspecific == {shared} and flags.excluded == {shared, (1, 7)}
    assert flags.of(shared) == ("unspecific",) and flags.rule["relations"] == 4


def test_flags_round_trip_through_json():
    flags = neuron_flags(synthetic_stats(10), {"P1": [{(0, 1)}], "P2": [{(0, 1)}], "P3": [{(0, 1)}]})
    again = NeuronFlags.from_dict(json.loads(json.dumps(flags.to_dict())))
    assert again == flags and again.excluded == {(1, 7), (0, 1)}
    assert NeuronFlags.from_dict({}) == NeuronFlags()


def test_neutral_sentences_are_plain_prefixes():
    sentences = neutral_sentences()
    assert len(sentences) >= 50 and len(set(sentences)) == len(sentences)
    assert not any(s.rstrip()[-1] in ".!?,;:" for s in sentences)


def test_a_relation_where_fewer_than_a_tenth_of_facts_have_it_does_not_use_it():
    sets = {"P1": [{(0, 3)}], "P2": [{(0, 3)}], "P3": [{(1, 4)}] * 10 + [{(0, 3)}]}  # 1 of 11 facts: 9%
    assert flag_unspecific(sets) == {(0, 3)}  # 2 of 3 relations
    assert flag_unspecific(sets | {"P4": [{(1, 1)}]}) == frozenset()  # 2 of 4 is not more than half


def test_a_facts_coarse_set_is_what_half_of_its_prompts_agree_on():
    a, b = np.zeros((2, 3), dtype=np.float32), np.zeros((2, 3), dtype=np.float32)
    a[0, 1], a[1, 2], b[0, 1], b[1, 0] = 1.0, 0.9, 1.0, 0.9
    assert fact_coarse_set([a, a, b, b]) == {(0, 1), (1, 2), (1, 0)}  # 4, 2 and 2 of 4 prompts
    assert fact_coarse_set([a, a, a, b]) == {(0, 1), (1, 2)}  # (1, 0) in 1 of 4
    assert fact_coarse_set([a, b, b], exclude=[(0, 1)]) == {(1, 0)}


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_every_family_reads_batched_texts_like_one_by_one_and_prompts_like_attribution(family):
    lm = make_tiny(family)
    texts = ["The capital of France is", "Paris", "The official language of the country which lies in Europe is"]
    together = answer_activations(lm, texts, batch_size=3)
    for text, batched in zip(texts, together):
        assert batched.shape == (3, lm.layout.neurons)
        np.testing.assert_allclose(batched, answer_activations(lm, [text])[0], rtol=1e-4, atol=5e-5)
    causal = lm.kind == "causal"
    text, answer = ("The capital of France is", " Paris") if causal else ("The capital of France is [MASK].", "Paris")
    ids = encode_answer(lm, text, answer)
    result = attribute(lm, text, AttributionParams(steps=1), answer_ids=ids)
    measured = answer_activations(lm, [SimpleNamespace(text=text, answer_ids=ids)])[0]
    np.testing.assert_allclose(measured, result.activations, rtol=1e-4, atol=5e-5)


def test_run_flags_finds_unspecific_neurons_from_scores_by_relation():
    lm = make_tiny("gpt2")
    plant(lm, 1, 5, 150.0)
    text = "The capital of France is"
    result = attribute(lm, text, AttributionParams(steps=2), answer_ids=encode_answer(lm, text, " Paris"))
    common = np.zeros((3, 72), dtype=np.float32)
    common[1, 5], common[2, 9], common[0, 1] = 9.0, 1.0, 0.1  # (1, 5) is massive: (2, 9) sets the threshold
    other = np.zeros_like(common)
    other[0, 4] = 1.0
    by_relation = {"P1": [[common, common]], "P2": [[common, other], [other, other]], "P3": [[other, other]]}
    flags = run_flags(lm, [result.activations], by_relation)
    assert flags.massive == {(1, 5)} and flags.unspecific == {(2, 9), (0, 4)}
    assert flags.rule["relations"] == 3 and "neutral sentences" in flags.rule["stats_source"]
    stats = run_stats(lm, [result.activations])
    assert stats.n_prompts == 1 + len(neutral_sentences()) and scored_flags(stats, by_relation) == flags


def test_kn_neurons_flags_massive_neurons_and_keeps_them_out_unless_asked(tmp_path, capsys):
    from kn_core.cli import main

    lm = make_tiny("gpt2")
    plant(lm, 1, 5, 150.0)
    lm.model.save_pretrained(tmp_path)
    lm.tokenizer.save_pretrained(tmp_path)
    docs = {}
    for keep in ([], ["--keep-massive"]):
        assert main(["neurons", "--relation", "P36", "--subject", "France", "--model", str(tmp_path), "--steps", "2",
                     "--p", "0.1", "--json"] + keep) == 0
        docs[bool(keep)] = json.loads(capsys.readouterr().out)
    excluded, kept = docs[False], docs[True]
    assert excluded["flags"]["massive"] == [[1, 5]] and excluded["flags"]["excluded_from_neurons"]
    assert not kept["flags"]["excluded_from_neurons"]

    def listed(doc):
        return [(n["layer"], n["neuron"]) for n in doc["refined"] + [e for c in doc["coarse"] for e in c]]

    assert (1, 5) not in listed(excluded) and (1, 5) in listed(kept)
    assert all(n["flags"] == (["massive"] if (n["layer"], n["neuron"]) == (1, 5) else []) for n in kept["refined"])


def test_gui_session_keeps_flagged_neurons_out_unless_keep_massive():
    from kn_core.facts import Fact
    from kn_gui.session import COMPLETE, Run, Session

    scores = np.full((2, 4), 0.1, dtype=np.float32)
    scores[0, 0], scores[1, 2], scores[1, 1] = 100.0, 1.0, 0.3
    fact = Fact("P36", "France", "Paris")
    run = Run(fact, [None] * 3, state=COMPLETE,
              scores=[SimpleNamespace(scores=scores, activations=np.zeros_like(scores))] * 3)
    session = Session()
    session.runs[("P36", "France", "Paris")] = run
    paper = (session.coarse(run, 0), session.refined(run), session.relation_level("P36"))
    assert paper == ([(0, 0)], [(0, 0)], [((0, 0), 1)])  # not measured yet: the paper's sets
    session.flags = NeuronFlags(massive=frozenset({(0, 0)}))
    assert session.coarse(run, 0) == session.refined(run) == [(1, 1), (1, 2)]
    assert session.relation_level("P36") == [((1, 1), 1), ((1, 2), 1)] and (0, 0) not in session.refined_counts(run)
    assert session.adapt_p("P36").history[0] == (0.7, 2.0)
    session.keep_massive = True
    assert (session.coarse(run, 0), session.refined(run), session.relation_level("P36")) == paper


def test_nan_or_infinite_scores_are_refused_not_read_as_no_neurons():
    scores = np.ones((2, 3), dtype=np.float32)
    for bad in (np.nan, np.inf):
        broken = scores.copy()
        broken[1, 2] = bad
        with pytest.raises(ValidationError, match="NaN or infinite") as info:
            coarse_neurons(broken, 0.2)
        assert "\n" not in str(info.value)
    compact = scores.copy()
    compact[0, :2] = -np.inf  # a compact form's unstored scores
    assert coarse_neurons(compact, 0.2) == [(0, 2), (1, 0), (1, 1), (1, 2)]
    assert coarse_neurons(broken, 0.2, exclude=[(1, 2)]) == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]
