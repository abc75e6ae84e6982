"""The thesis checks (Niu et al., ICLR 2024): reverse prompts for bijective symmetry, synonymy's n/a for aliases,
and the built-in syntax minimal pairs (kn_core/syntax.py)."""

from __future__ import annotations

import pytest

from kn_core import metrics
from kn_core.attribution import AttributionParams, attribute
from kn_core.edit_plan import EditRequest, plan_edit
from kn_core.facts import Fact, FactSet, Relation
from kn_core.syntax import syntax_experiment, syntax_items
from tiny import GEOGRAPHY, TINY_CAUSAL, make_tiny

BOTH_WAYS = Relation("P36", "capital", ("The capital of [X] is [Y].", "[X]'s capital city is [Y].",
                                        "The capital city of [X] is [Y].", "[Y] is the capital of [X]."))
FORWARD_ONLY = Relation("P37", "official language", ("The official language of [X] is [Y].",
                                                     "In [X], the official language is [Y].", "People in [X] speak [Y]."))


@pytest.fixture(scope="module")
def lm():
    return make_tiny(TINY_CAUSAL)


def _factset():
    facts = [Fact("P36", c, cap) for c, cap, _, _ in GEOGRAPHY[:6]] + [Fact("P37", c, l) for c, _, l, _ in GEOGRAPHY[:6]]
    return FactSet("t", {"P36": BOTH_WAYS, "P37": FORWARD_ONLY}, facts)


def test_reverse_prompts_read_the_templates_that_put_the_object_first_backwards(lm):
    fs = _factset()
    prompts, reason = metrics.reverse_prompts(lm, fs, Fact("P36", "France", "Paris"), "Rome")
    assert reason is None and [p.text for p in prompts] == ["Rome is the capital of"]
    assert prompts[0].answer.strip() == "France"
    none, reason = metrics.reverse_prompts(lm, fs, Fact("P37", "France", "French"), "German")
    assert none == [] and "[Y] before [X]" in reason


def test_symmetry_is_measured_after_the_edit_before_it_and_under_the_control(lm):
    fs = _factset()
    fact = fs.facts[0]
    plan = plan_edit(lm, fs, EditRequest("update", ((1, 3), (2, 5)), fact, new_object="Berlin"))
    m = metrics.symmetry_metric(lm, fs, plan)
    assert m["n"] == 1 and {"before", "control", "reverse_known"} <= set(m)
    assert 0 <= m["rate"] <= 1 and 0 <= m["control"]["rate"] <= 1
    suppress = plan_edit(lm, fs, EditRequest("suppress", ((1, 3),), fact))
    assert not metrics.applicable(metrics.symmetry_metric(lm, fs, suppress))
    lang = plan_edit(lm, fs, EditRequest("update", ((1, 3),), fs.facts[6], new_object="German"))
    assert "[Y] before [X]" in metrics.symmetry_metric(lm, fs, lang)["reason"]


def test_synonymy_is_generality_for_paraphrases_and_na_for_aliases():
    generality = {"rate": 0.5}
    s = metrics.synonymy_metric({"generality": generality, "control": {"generality": {"rate": 0.0}}})
    assert s["paraphrases"] == {"edit": generality, "control": {"rate": 0.0}}
    assert not metrics.applicable(s["aliases"]) and "aliases" in s["aliases"]["reason"]


def test_the_syntax_items_are_minimal_pairs_with_a_named_source():
    data = syntax_items()
    assert "BLiMP" in data["source"] and "Warstadt" in data["source"]
    by_id = {i["id"]: i for i in data["items"]}
    for item in data["items"]:
        partner = by_id[item["pair"]]
        assert partner["pair"] == item["id"] and len(item["prompts"]) >= 3
        for (text, good, bad), (text2, good2, bad2) in zip(item["prompts"], partner["prompts"]):
            assert (good, bad) == (bad2, good2) and text != text2


def _syntax_words() -> tuple[str, ...]:
    return tuple(sorted({w for item in syntax_items()["items"] for text, good, bad in item["prompts"]
                         for w in (*text.split(), good.strip(), bad.strip())}))


def test_syntax_sentences_the_tokenizer_cannot_ask_are_left_out_with_the_reason(lm):
    """The geography-only tiny vocabulary has no ' are': no item keeps 3 sentences, and every sentence is listed."""
    result = syntax_experiment(lm, lambda prompt: pytest.fail("nothing should be attributed"))
    assert not result["applicable"] and "left_out" in result["reason"]
    dropped = [x for x in result["left_out"] if x["prompt"]]
    assert dropped and all("unknown token" in x["reason"] for x in dropped)
    assert {x["item"] for x in result["left_out"] if x["prompt"] is None} == {i["id"] for i in syntax_items()["items"]}


def test_syntax_experiment_refines_items_like_facts():
    lm = make_tiny(TINY_CAUSAL, extra_words=_syntax_words())
    params = AttributionParams(steps=1)
    result = syntax_experiment(lm, lambda prompt: attribute(lm, prompt, params))
    assert result["left_out"] == []
    assert result["applicable"] and len(result["items"]) == 4
    assert result["statistics"]["facts"] == 4
    for row in result["items"]:
        assert 0 <= row["prefers_grammatical"] <= 1 and row["prompts"] == 6
        assert set(map(tuple, row["shared_with_pair"])) <= set(map(tuple, row["refined"]))
