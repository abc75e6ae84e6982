"""Knowledge neurons of cases with 1 or 2 prompts (EasyEdit's single-prompt request, zsRE's prompt and
rephrase): `neurons.case_neurons` asks for the neurons coarse in every prompt where refinement (coarse in
>= max(p x n, 3) prompts) cannot select anything, records the rule, and the empty-set message names a fix that
can help."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kn_core.neurons import case_neurons, coarse_neurons, empty_neurons_fix, refined_neurons
from kn_core.validation import ValidationError


def _scores(seed, n):
    rng = np.random.default_rng(seed)
    return [rng.random((3, 40)).astype(np.float32) ** 8 for _ in range(n)]


@pytest.mark.parametrize("n", [3, 4, 7])
def test_three_or_more_prompts_are_the_papers_refinement(n):
    scores = _scores(n, n)
    for p in (0.3, 0.7, 1.0):
        found, rule = case_neurons(scores, 0.2, p)
        assert found == refined_neurons(scores, 0.2, p) and rule["rule"] == "refined" and rule["prompts"] == n


def test_one_prompt_gives_its_coarse_neurons():
    (scores,) = _scores(1, 1)
    found, rule = case_neurons([scores], 0.2, 0.7)
    assert found == sorted(coarse_neurons(scores, 0.2)) and found
    assert rule == {"rule": "coarse in every prompt", "prompts": 1, "coarse_in_at_least": 1, "text": rule["text"]}
    assert "1 prompt" in rule["text"] and "t=0.2" in rule["text"]
    assert refined_neurons([scores], 0.2, 0.7) == []  # what the paper's rule gives it


def test_two_prompts_give_the_neurons_coarse_in_both_whatever_p():
    a, b = np.zeros((2, 6), np.float32), np.zeros((2, 6), np.float32)
    a[0, 1], a[1, 2], a[1, 4] = 1.0, 0.5, 0.1
    b[0, 1], b[1, 2], b[0, 3] = 0.9, 0.05, 0.8
    for p in (0.1, 0.7, 1.0):
        found, rule = case_neurons([a, b], 0.2, p)
        assert found == [(0, 1)] and rule["coarse_in_at_least"] == 2  # (1, 2) is coarse in a only
    # excluded neurons neither count nor set the threshold: a's coarse set becomes {(1, 2)}, b's {(0, 3)}
    assert case_neurons([a, b], 0.2, 0.7, exclude=[(0, 1)])[0] == []
    with pytest.raises(ValidationError, match="at least one"):
        case_neurons([], 0.2, 0.7)


def test_the_fix_for_an_empty_set_is_one_that_can_help():
    assert "paraphrased prompts" in empty_neurons_fix(1, 0.7) and "lower p" not in empty_neurons_fix(2, 0.7)
    assert "lower p" in empty_neurons_fix(10, 0.7)  # 7 of 10 prompts: p matters
    assert "cannot help" in empty_neurons_fix(4, 0.7) and "lower p" not in empty_neurons_fix(4, 0.7).split(",")[0]


def test_a_single_prompt_easyedit_request_gets_neurons_with_its_rule(tmp_path, one_cpu_thread):
    from kn_core.attribution import AttributionParams
    from kn_core.batch import NeuronSource, resolve_neurons
    from kn_core.batch_requests import parse_requests
    from kn_core.fact_files import builtin_facts
    from kn_core.store import create_project
    from tiny import tiny_llama

    lm = tiny_llama()
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps({"prompt": "The capital of France is", "subject": "France", "ground_truth": "Paris",
                                "target_new": "Berlin"}) + "\n")
    parsed = parse_requests(path, builtin_facts(), "update")
    with create_project(tmp_path / "p.knproj") as project:
        found = resolve_neurons(lm, parsed, NeuronSource(0.2, 0.7, AttributionParams(steps=2)), project)
        (stored,) = project.list_neuron_sets(kind="refined")
    neurons, how, templates = found[1]
    assert neurons and "1 prompt(s), fewer than the 3 refinement needs: the prompt's coarse neurons" in how
    assert stored.params["selection"]["rule"] == "coarse in every prompt" and tuple(stored.neurons) == neurons
