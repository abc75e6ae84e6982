"""Degeneracy test: batched suppression against a slow reference (one plain Suppress edit and one evaluation
per subset), and tiny models where redundancy is built by construction (or is not)."""

from __future__ import annotations

from itertools import combinations

import numpy as np
import pytest
import torch

from kn_core import edits as E
from kn_core.degeneracy import DegeneracyParams, degeneracy_test, relation_summary, summary_line, suppressed_answers
from kn_core.evaluation import answer_probabilities, with_edits
from kn_core.facts import Fact, Relation, render_prompts
from kn_core.tasks import Cancelled, Task
from tiny import TINY_CAUSAL, TINY_MASKED, make_tiny

REL = Relation("P36", "capital", ("The capital of [X] is [Y].", "[X]'s capital city is [Y].",
                                  "The capital city of [X] is [Y].", "[X], whose capital is [Y] ."))
FRANCE = Fact("P36", "France", "Paris")
A, B, OTHER = (2, 5), (2, 9), (1, 3)


def prompts_of(lm, fact=FRANCE):
    prompts, _ = render_prompts(fact, REL, lm.tokenizer, lm.kind)
    assert prompts
    return prompts


def slow(lm, prompts, subset):
    """The reference: one Suppress edit (answer positions, to zero) and one evaluation."""
    if not subset:
        return answer_probabilities(lm, prompts)
    return with_edits(lm, [E.Suppress(tuple(subset))], lambda: answer_probabilities(lm, prompts))


def slow_removes(base, after, criterion="top1", removed_below=0.5):
    if criterion == "top1":
        known = [k for k, b in enumerate(base) if b["correct"]]
        return np.mean([after[k]["correct"] for k in known]) < 0.5
    return np.mean([a["prob"] for a in after]) < removed_below * np.mean([b["prob"] for b in base])


def slow_redundant_pairs(lm, prompts, neurons, **criterion):
    base = slow(lm, prompts, ())
    alone = {n: slow_removes(base, slow(lm, prompts, [n]), **criterion) for n in neurons}
    return [[list(a), list(b)] for a, b in combinations(neurons, 2)
            if not alone[a] and not alone[b] and slow_removes(base, slow(lm, prompts, [a, b]), **criterion)]


def carrying(c_a: float, c_b: float):
    """Tiny GPT-2 whose last-layer neurons A and B are always on (activation gelu(3)) and write c x the unit
    embedding direction of " Paris": from c = 4 on, Paris is top-1 on every prompt; at c <= 2 on none (checked
    below). c_a = c_b = 6: either neuron alone suffices (redundant); 2 and 2: both are needed."""
    lm = make_tiny(TINY_CAUSAL)
    mlp = lm.model.transformer.h[2].mlp
    paris = prompts_of(lm)[0].answer_ids[0]
    direction = lm.model.transformer.wte.weight[paris].detach()
    direction = direction / direction.norm()
    on = torch.nn.functional.gelu(torch.tensor(3.0), approximate="tanh")
    with torch.no_grad():
        for (_, i), c in ((A, c_a), (B, c_b)):
            mlp.c_fc.weight[:, i] = 0
            mlp.c_fc.bias[i] = 3.0
            mlp.c_proj.weight[i] = c * direction / on
    return lm


def test_construction_holds():
    """The premises the tests below rest on, measured with plain evaluations."""
    for c, wins in ((0, False), (2, False), (4, True), (6, True)):
        lm = carrying(c, 0)
        assert [r["correct"] for r in answer_probabilities(lm, prompts_of(lm))] == [wins] * 4, c


@pytest.mark.parametrize("family", [TINY_CAUSAL, TINY_MASKED])
def test_batched_suppression_matches_one_edit_per_subset(family):
    lm = make_tiny(family)
    prompts = prompts_of(lm) + prompts_of(lm, Fact("P36", "Ethiopia", "Addis Ababa"))  # a two-token answer
    assert any(len(p.answer_ids) == 2 for p in prompts)
    neurons = [(0, 4), (1, 7), (2, 3), (2, 40)]
    subsets = [()] + [(n,) for n in neurons] + list(combinations(neurons, 2)) + [tuple(neurons)]
    got = suppressed_answers(lm, prompts, subsets, batch_size=5)  # batches mix subsets and padding widths
    for subset, rows in zip(subsets, got):
        for g, r in zip(rows, slow(lm, prompts, subset)):
            assert g["prob"] == pytest.approx(r["prob"], rel=1e-5, abs=1e-9)
            assert (g["correct"], g["top1_id"]) == (r["correct"], r["top1_id"])
    # the suppressions change something (a test that cannot fail is a defect)
    assert any(abs(a["prob"] - b["prob"]) > 1e-4 for a, b in zip(got[-1], got[0]))


def test_redundant_pair_by_construction():
    lm = carrying(6, 6)
    prompts = prompts_of(lm)
    result = degeneracy_test(lm, prompts, [A, B, OTHER])
    assert result["applicable"] and result["known_prompts"] == 4
    assert result["redundant_pairs"] == [[list(A), list(B)]] == slow_redundant_pairs(lm, prompts, [A, B, OTHER])
    assert result["necessary"] == [] and result["degenerate"]
    assert [r["removes"] for r in result["singles"]] == [False, False, False]
    assert result["all"]["removes"] and result["all"]["redundant"]
    pair = next(r for r in result["pairs"] if r["neurons"] == [list(A), list(B)])
    assert pair["top1_rate"] == 0.0 and pair["prob_ratio"]["ratio"] < 0.1
    assert "1/3 redundant pairs" in summary_line(result)


def test_both_needed_is_not_redundant():
    lm = carrying(2, 2)
    prompts = prompts_of(lm)
    result = degeneracy_test(lm, prompts, [A, B])
    assert result["applicable"] and result["known_prompts"] == 4
    assert result["redundant_pairs"] == [] == slow_redundant_pairs(lm, prompts, [A, B])
    assert result["necessary"] == [list(A), list(B)]
    assert result["all"]["removes"] and not result["all"]["redundant"] and not result["degenerate"]


def test_single_carrier_is_necessary_not_redundant():
    lm = carrying(6, 0)
    result = degeneracy_test(lm, prompts_of(lm), [A, B, OTHER])
    assert result["necessary"] == [list(A)] and result["redundant_pairs"] == [] and not result["degenerate"]


def test_probability_criterion():
    # c = 12 each: either alone keeps > 0.5 of the probability (0.13 of 0.17); both off: 0.003
    lm = carrying(12, 12)
    prompts = prompts_of(lm)
    params = DegeneracyParams(criterion="prob", removed_below=0.5)
    result = degeneracy_test(lm, prompts, [A, B], params)
    assert result["redundant_pairs"] == [[list(A), list(B)]] == \
        slow_redundant_pairs(lm, prompts, [A, B], criterion="prob", removed_below=0.5)
    assert "0.5 x its unedited mean probability" in result["params"]["definition"]
    # a stricter fraction decides differently, and the reference agrees
    strict = degeneracy_test(lm, prompts, [A, B], DegeneracyParams(criterion="prob", removed_below=0.9))
    assert strict["redundant_pairs"] == [] == \
        slow_redundant_pairs(lm, prompts, [A, B], criterion="prob", removed_below=0.9)


def test_random_control_same_layers_and_not_degenerate():
    lm = carrying(6, 6)
    result = degeneracy_test(lm, prompts_of(lm), [A, B, OTHER], DegeneracyParams(seed=3))
    control = result["control"]
    assert sorted(l for l, _ in map(tuple, control["neurons"])) == [1, 2, 2]
    assert not {tuple(n) for n in control["neurons"]} & {A, B, OTHER}
    assert not control["degenerate"] and not control["all"]["removes"]
    counts = relation_summary([result, result])
    assert counts["knowledge"]["with_redundant_pairs"] == 2 and counts["random"]["degenerate"] == 0
    assert "control" not in degeneracy_test(lm, prompts_of(lm), [A, B], DegeneracyParams(control=False))


def test_cap_lists_what_was_not_paired_strongest_first():
    lm = make_tiny(TINY_CAUSAL)
    neurons = [(0, 1), (0, 2), (1, 1), (1, 2), (2, 1), (2, 2)]
    scores = np.zeros((3, 72))
    scores[2, 2], scores[0, 2], scores[1, 1] = 3.0, 2.0, 1.0
    result = degeneracy_test(lm, prompts_of(lm), neurons, DegeneracyParams(max_neurons=3, control=False),
                             scores=scores)
    assert result["pairs_tested"] == 3 and result["pairs_total"] == 15
    assert result["neurons"][:3] == [[2, 2], [0, 2], [1, 1]]
    assert len(result["singles"]) == 6 and len(result["all"]["neurons"]) == 6
    assert [x["what"] for x in result["left_out"]] == ["pairs with L0 N1", "pairs with L1 N2", "pairs with L2 N1"]
    assert all("max_neurons" in x["reason"] for x in result["left_out"])


def test_model_left_exactly_as_it_was_also_when_cancelled():
    lm = make_tiny(TINY_CAUSAL)
    prompts = prompts_of(lm)
    weights = {k: v.clone() for k, v in lm.model.state_dict().items()}
    before = answer_probabilities(lm, prompts)
    degeneracy_test(lm, prompts, [(1, 3), (2, 4)])
    task = Task(on_progress=lambda fraction, message: task.cancel())
    with pytest.raises(Cancelled):
        degeneracy_test(lm, prompts, [(1, 3), (2, 4)], DegeneracyParams(batch_size=1), task=task)
    assert all(torch.equal(v, weights[k]) for k, v in lm.model.state_dict().items())
    assert [r["prob"] for r in answer_probabilities(lm, prompts)] == [r["prob"] for r in before]
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in lm.model.modules())


def test_not_applicable_when_the_model_never_gives_the_answer():
    lm = make_tiny(TINY_CAUSAL)  # the random model does not say Paris
    result = degeneracy_test(lm, prompts_of(lm), [A, B])
    assert not result["applicable"] and "criterion 'prob'" in result["reason"]
    assert not result["degenerate"] and result["redundant_pairs"] == []
    assert "not applicable" in summary_line(result)


@pytest.mark.parametrize("call, message", [
    (lambda lm, p: degeneracy_test(lm, p, []), "needs knowledge neurons"),
    (lambda lm, p: degeneracy_test(lm, [], [A]), "needs the fact's prompts"),
    (lambda lm, p: degeneracy_test(lm, p, [(7, 1)]), "outside this model"),
    (lambda lm, p: DegeneracyParams(criterion="rank"), "criterion must be one of top1, prob"),
    (lambda lm, p: DegeneracyParams(removed_below=1.5), "removed_below must be a fraction"),
    (lambda lm, p: DegeneracyParams(max_neurons=1), "max_neurons must be an integer >= 2"),
])
def test_bad_input_one_line(call, message):
    lm = make_tiny(TINY_CAUSAL)
    with pytest.raises(ValueError) as exc:
        call(lm, prompts_of(lm))
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_cli_prints_the_table_and_strict_json(capsys, tmp_path):
    import json

    from kn_core.cli import main

    lm = make_tiny(TINY_CAUSAL)
    lm.model.save_pretrained(tmp_path)
    lm.tokenizer.save_pretrained(tmp_path)
    argv = ["edit", "degeneracy", "--relation", "P36", "--subject", "France", "--model", str(tmp_path), "--steps",
            "2", "--t", "0.1", "--p", "0.2", "--criterion", "prob", "--max-neurons", "3"]
    assert main(argv + ["--json"]) == 0
    doc = json.loads(capsys.readouterr().out, parse_constant=lambda c: pytest.fail(f"non-strict JSON: {c}"))
    n = len(doc["neurons"])
    assert n >= 2 and doc["fact"]["object"] == "Paris" and len(doc["singles"]) == n
    assert doc["pairs_tested"] == min(n, 3) * (min(n, 3) - 1) // 2 and len(doc["left_out"]) == max(n - 3, 0)
    assert doc["params"]["criterion"] == "prob" and "0.5 x" in doc["params"]["definition"]
    assert doc["control"]["kind"] == "random neurons from the same layers"
    assert [x["layer"] for x in doc["neuron_scores"]] == [l for l, _ in doc["neurons"]]
    # suppressing all as an ordinary edit, in kn_core.metrics' terms, with the same random control set
    assert doc["all_suppressed_metrics"]["edit_size"]["neurons"] == n
    assert doc["all_suppressed_metrics"]["control"]["edit_size"]["neurons"] == n
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "removes = the answer's mean probability falls below 0.5" in text and "random control:" in text
    assert "reliability" in text and "[random neurons:" in text


def test_reproduction_counts_per_relation_and_report_section():
    from kn_core.degeneracy import degeneracy_experiment
    from kn_core.experiments import FactNeurons
    from kn_core.reproduce.report import _degeneracy_section

    lm = carrying(6, 6)
    japan = Fact("P36", "Japan", "Tokyo")
    records = [FactNeurons(FRANCE, prompts_of(lm), [A, B, OTHER], []),
               FactNeurons(japan, prompts_of(lm, japan), [], [])]
    part = degeneracy_experiment(lm, records)
    counts = part["per_relation"]["P36"]["knowledge"]
    assert counts == {"facts": 1, "applicable": 1, "with_redundant_pairs": 1, "whole_set_redundant": 1,
                      "degenerate": 1, "all_removes": 1, "redundant_pairs": 1, "pairs_tested": 3}
    assert part["per_relation"]["P36"]["random"]["degenerate"] == 0 and part["total"] == part["per_relation"]["P36"]
    assert part["facts_without_neurons"] == ["P36:Japan"]
    assert part["facts"][0]["redundant_pairs"] == [[list(A), list(B)]]
    text = "\n".join(_degeneracy_section({"degeneracy": part, "relations": ["P36"], "left_out": {}}))
    assert "| P36 | 1 | 1 | 1 | 1 | 1 | 1 | 1 / 3 | 0 |" in text
    assert "- P36 France -> Paris: pairs L2 N5 + L2 N9; the whole set (L2 N5 + L2 N9 + L1 N3)" in text
    assert "P36:Japan: no knowledge neurons" in text
