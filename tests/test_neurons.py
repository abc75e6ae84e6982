"""Selecting knowledge neurons from scores: coarse, refined, relation-level, the paper's adaptive p."""

import numpy as np
import pytest

from kn_core.neurons import adapt_p, coarse_neurons, refined_neurons, relation_neurons


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
