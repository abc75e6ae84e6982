"""Generation-based evaluation (`--eval generate`): greedy continuations batched over prompts against
transformers' own generate(do_sample=False), answer matching with aliases, and measure_plan / run_batch judging
`correct` by generation."""

from __future__ import annotations

import pytest
import torch

from kn_core import edits as E
from kn_core.evaluation import (GENERATION_MARGIN, answer_matches, answer_probabilities, greedy_continuations,
                                judge_by_generation, with_edits)
from kn_core.facts import Fact, Prompt
from tiny import make_tiny, tiny_llama

TEXTS = ["The capital of France is", "Paris is the capital of", "The official language of Japan is",
         "Tokyo is located in"]


def _prompts(lm, texts=TEXTS, answer=" Paris"):
    ids = tuple(lm.tokenizer(answer, add_special_tokens=False)["input_ids"])
    return [Prompt(t, answer, ids, "[X] [Y]", Fact("r", "s", answer.strip()), "causal") for t in texts]


def _reference(lm, prompts, n: int) -> list[list[int]]:
    """transformers' generate, one prompt at a time (no padding), greedy."""
    out = []
    for p in prompts:
        ids = torch.tensor([lm.tokenizer(p.text)["input_ids"]])
        with torch.no_grad():
            full = lm.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                                     min_new_tokens=n, pad_token_id=lm.tokenizer.pad_token_id)
        out.append(full[0, ids.shape[1]:].tolist())
    return out


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_greedy_continuations_equal_transformers_generate(family, one_cpu_thread):
    lm = make_tiny(family) if family == "gpt2" else tiny_llama()
    prompts = _prompts(lm)
    # prompts of different lengths in one padded batch (batch_size 3: a full chunk and a partial one)
    got = greedy_continuations(lm, prompts, [4] * len(prompts), batch_size=3)
    assert got == _reference(lm, prompts, 4)
    assert greedy_continuations(lm, prompts, [1, 2, 3, 0]) == [r[:k] for r, k in zip(_reference(lm, prompts, 4),
                                                                                      [1, 2, 3, 0])]


def test_generation_under_an_edit_on_every_position_equals_generate_under_it(one_cpu_thread):
    lm = tiny_llama()
    prompts = _prompts(lm)
    edit = E.Suppress(((1, 3), (2, 5), (0, 7)), "all")
    got = with_edits(lm, [edit], lambda: greedy_continuations(lm, prompts, [3] * len(prompts)))
    assert got == with_edits(lm, [edit], lambda: _reference(lm, prompts, 3))


def test_an_answer_scoped_edit_acts_on_every_generated_position(one_cpu_thread):
    """Amplifying at the answer positions while generating = amplifying at every position from the prompt's last
    token on (an edit scoped to all positions changes the prompt's earlier positions too, so compare by hand)."""
    from kn_core.hooks import answer_positions

    lm = tiny_llama()
    prompts = _prompts(lm)[:1]
    edit = E.Amplify(((1, 3), (2, 5)), 4.0, "answer")
    got = with_edits(lm, [edit], lambda: greedy_continuations(lm, prompts, [3]))
    ids = lm.tokenizer(prompts[0].text)["input_ids"]
    start = len(ids) - 1
    slow = []
    for _ in range(3):
        seq = torch.tensor([ids + slow])
        mask = torch.zeros_like(seq, dtype=torch.bool)
        mask[0, start:] = True
        with torch.no_grad(), answer_positions(mask):
            logits = with_edits(lm, [edit], lambda: lm.model(input_ids=seq).logits)
        slow.append(int(logits[0, -1].argmax()))
    assert got == [slow]


def test_answer_matching_ignores_case_and_spaces_but_not_longer_words():
    assert answer_matches(" Paris.", [" Paris"])
    assert answer_matches("  paris is", ["Paris"])
    assert answer_matches("\nPARIS", [" Paris"])
    assert not answer_matches(" Parisian", [" Paris"])
    assert not answer_matches(" The city of Paris", [" Paris"])
    assert answer_matches(" the City of Light", [" Paris", "the city of light"])
    assert answer_matches(" New  York", ["New York"])
    assert not answer_matches("", [" Paris"]) and not answer_matches(" Paris", [""])


def test_judge_by_generation_keeps_the_forced_verdict_and_uses_aliases(one_cpu_thread):
    lm = tiny_llama()
    prompts = _prompts(lm)
    rows = answer_probabilities(lm, prompts)
    forced = [r["correct"] for r in rows]
    generated = greedy_continuations(lm, prompts, [len(p.answer_ids) + GENERATION_MARGIN for p in prompts])
    judged = judge_by_generation(lm, prompts, [dict(r) for r in rows])
    for row, ids, was in zip(judged, generated, forced):
        text = lm.tokenizer.decode(ids, skip_special_tokens=True)
        assert row["generated"] == text and row["correct_forced"] == was
        assert row["correct"] == answer_matches(text, [" Paris"])
        assert row["max_new_tokens"] == 1 + GENERATION_MARGIN
    # an alias equal to the first word the model generates makes it correct
    first = judged[0]["generated"].split()[0]

    class Aliased:
        text, answer, answer_ids, kind, aliases = prompts[0].text, " Paris", prompts[0].answer_ids, "causal", (first,)

    (row,) = judge_by_generation(lm, [Aliased()], [dict(rows[0])])
    assert row["correct"] is True and row["max_new_tokens"] >= 1 + GENERATION_MARGIN


def test_generation_refuses_masked_models():
    lm = make_tiny("bert")
    with pytest.raises(ValueError, match="causal model"):
        greedy_continuations(lm, [], [])


def test_measure_plan_judges_correct_by_generation(one_cpu_thread):
    from kn_core.edit_plan import EditRequest, measure_plan, plan_edit
    from kn_core.fact_files import builtin_facts

    lm = tiny_llama()
    factset = builtin_facts()
    fact = next(f for f in factset.facts_of("P36") if f.subject == "France")
    plan = plan_edit(lm, factset, EditRequest("suppress", ((1, 3), (2, 5)), fact, control_facts=1))
    forced = measure_plan(lm, plan)
    generated = measure_plan(lm, plan, evaluation="generate")
    for g, rows in forced.items():
        for f, gen in zip(rows, generated[g]):
            assert gen["prob"] == f["prob"] and gen["correct_forced"] == f["correct"] and "generated" in gen
    with pytest.raises(ValueError, match="forced or generate"):
        measure_plan(lm, plan, evaluation="sampled")


@pytest.mark.default_model
def test_default_model_generates_paris():
    from kn_core.models import load_model

    lm = load_model("default", device="cpu")
    prompts = _prompts(lm, ["The capital of France is"])
    (ids,) = greedy_continuations(lm, prompts, [1 + GENERATION_MARGIN])
    assert ids == _reference(lm, prompts, 1 + GENERATION_MARGIN)[0]
    assert lm.tokenizer.decode(ids[:1]) == " Paris"
    (row,) = judge_by_generation(lm, prompts, answer_probabilities(lm, prompts))
    assert row["correct"] and row["generated"].startswith(" Paris")
