"""Localisation vs editing (kn reproduce --trace): the section's numbers against direct computations on a tiny
model, and its rank correlation against the textbook formula."""

from __future__ import annotations

import numpy as np
import pytest

from kn_core import evaluation as ev
from kn_core.edits import Suppress
from kn_core.reproduce import run_reproduce
from kn_core.reproduce.localisation import MIN_N, bands, spearman
from kn_core.tracing import TraceParams, trace
from test_reproduce import _factset
from tiny import TINY_CAUSAL, make_tiny


def test_spearman_is_the_textbook_formula():
    rng = np.random.default_rng(0)
    x, y = rng.permutation(12).astype(float), rng.permutation(12).astype(float)
    d = np.argsort(np.argsort(x)) - np.argsort(np.argsort(y))
    n = len(x)
    assert spearman(x, y)["rho"] == pytest.approx(1 - 6 * np.sum(d ** 2) / (n * (n * n - 1)))
    perfect = spearman(np.arange(12), np.arange(12) ** 2)
    assert perfect["rho"] == pytest.approx(1.0) and perfect["p_value"] < 0.001 and "note" not in perfect
    ties = spearman([1, 1, 2, 3], [1, 2, 2, 3])  # average ranks: Pearson of (1.5,1.5,3,4) and (1,2.5,2.5,4)
    assert ties["rho"] == pytest.approx(np.corrcoef([1.5, 1.5, 3, 4], [1, 2.5, 2.5, 4])[0, 1])
    assert "too few" in ties["note"] and ties["n"] == 4 < MIN_N
    assert spearman([1, 2], [2, 1])["rho"] is None and spearman([1, 1, 1], [1, 2, 3])["rho"] is None


def test_bands_are_thirds():
    assert bands(30) == [range(0, 10), range(10, 20), range(20, 30)]
    assert bands(3) == [range(0, 1), range(1, 2), range(2, 3)]


def test_reproduce_trace_section(tmp_path):
    lm = make_tiny(TINY_CAUSAL)
    report = run_reproduce(lm, _factset(), tmp_path, relations=["P36", "P37"], facts_per_relation=2, steps=1,
                           control_prompts=4, say=lambda m: None, trace=True,
                           keep_template=True)  # a random tiny model: the subject control flags every neuron
    sec = report["localisation"]
    assert report["parameters"]["trace"] is True and len(sec["facts"]) + len(sec["left_out"]) == 4
    row = sec["facts"][0]
    # the trace: the fact's first prompt, MLP kind, at the last subject token, mean over each band
    result = trace(lm, row["traced_prompt"], row["subject"],
                   next(p.answer_ids for p in _prompts(lm, row) if p.text == row["traced_prompt"]),
                   TraceParams(kinds=("mlp",)), (sec["params"]["embedding_std"], sec["params"]["embedding_std_tokens"]))
    effect = result.effect("mlp")[result.last_subject_token()]
    assert row["peak_layer"] == int(np.argmax(effect))
    assert row["trace_effect_by_band"] == pytest.approx([effect[b.start:b.stop].mean() for b in bands(3)])
    # the band edits: the listed neurons suppressed, p(answer) over the fact's prompts
    prompts = _prompts(lm, row)
    before = np.mean([r["prob"] for r in ev.answer_probabilities(lm, prompts)])
    for neurons, change in zip(row["edited_neurons_by_band"], row["edit_change_by_band"]):
        assert len(neurons) <= 5 and all(b.start <= n[0] < b.stop for n in neurons for b in [bands(3)[
            row["edited_neurons_by_band"].index(neurons)]])
        if not neurons:
            assert change is None
            continue
        handle = Suppress(tuple(map(tuple, neurons))).apply(lm)
        after = np.mean([r["prob"] for r in ev.answer_probabilities(lm, prompts)])
        handle.revert()
        assert change == pytest.approx((after - before) / before, rel=1e-6)
    text = (tmp_path / "report.md").read_text()
    assert "## Localisation vs editing (Hase et al. 2023)" in text and "too few points" in text


def _prompts(lm, row):
    from kn_core.facts import render_prompts

    factset = _factset()
    fact = next(f for f in factset.facts_of(row["relation"]) if f.subject == row["subject"])
    return render_prompts(fact, factset.relation(fact.relation), lm.tokenizer, lm.kind)[0]
