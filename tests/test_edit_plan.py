"""edit_plan: request -> edit, control, evaluation prompts and skipped items; every refusal one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kn_core import edits as E
from kn_core.edit_plan import EditPlanError, EditRequest, measure_plan, plan_edit, shared_rule_note, summarize_plan
from kn_core.facts import Fact, FactSet, Relation
from tiny import TINY_CAUSAL, TINY_MASKED, make_tiny

_MODELS: dict = {}


def tiny(family):
    if family not in _MODELS:
        _MODELS[family] = make_tiny(family)
    return _MODELS[family]


REL = Relation("P36", "capital", ("The capital of [X] is [Y].", "[X]'s capital city is [Y].",
                                  "The capital city of [X] is [Y].", "[X], whose capital is [Y] ."))
REL2 = Relation("P37", "official language", ("The official language of [X] is [Y].",
                                             "People in [X] speak [Y]."))
FACTS = [Fact("P36", "France", "Paris"), Fact("P36", "Japan", "Tokyo"), Fact("P36", "Italy", "Rome"),
         Fact("P36", "Spain", "Madrid"), Fact("P37", "France", "French"), Fact("P37", "Japan", "Japanese"),
         Fact("P37", "Italy", "Italian")]
FS = FactSet("t", {"P36": REL, "P37": REL2}, FACTS)
FRANCE = FACTS[0]


def one_line(exc) -> str:
    text = str(exc.value)
    assert "\n" not in text and text
    return text


@pytest.mark.parametrize("family", [TINY_MASKED, TINY_CAUSAL])
def test_suppress_plan_groups_and_control(family):
    lm = tiny(family)
    plan = plan_edit(lm, FS, EditRequest("suppress", ((2, 3), (1, 4)), FRANCE, scope="all", seed=5))
    assert plan.edit == E.Suppress(((2, 3), (1, 4)), "all")
    assert isinstance(plan.control, E.Suppress) and plan.control.scope == "all"
    assert [l for l, _ in plan.control.neurons] == [2, 1] and not set(plan.control.neurons) & {(2, 3), (1, 4)}
    assert all(p.fact == FRANCE for p in plan.prompts["fact"]) and len(plan.prompts["fact"]) >= 3
    assert {p.fact.relation for p in plan.prompts["relation"]} == {"P36"}
    assert FRANCE not in {p.fact for p in plan.prompts["relation"]}
    assert {p.fact.relation for p in plan.prompts["other relations"]} == {"P37"}
    assert "new object" not in plan.prompts
    # seeded: the same request gives the same plan; the control sample depends on the seed
    again = plan_edit(lm, FS, EditRequest("suppress", ((2, 3), (1, 4)), FRANCE, scope="all", seed=5))
    assert again.control == plan.control and again.prompts == plan.prompts
    amp = plan_edit(lm, FS, EditRequest("amplify", ((2, 3),), FRANCE, factor=3.0)).edit
    assert amp == E.Amplify(((2, 3),), 3.0, "answer")
    assert plan.to_dict()["edit"]["kind"] == "suppress"


def test_causal_template_that_cannot_be_used_is_listed():
    lm = tiny(TINY_CAUSAL)
    rel = Relation("P36", "capital", REL.templates + ("[Y] is the capital of [X].",))
    fs = FactSet("t", {"P36": rel, "P37": REL2}, FACTS)
    plan = plan_edit(lm, fs, EditRequest("suppress", ((2, 3),), FRANCE))
    assert any("[Y] is the capital" in what for what, _ in plan.skipped)


@pytest.mark.parametrize("family", [TINY_MASKED, TINY_CAUSAL])
@pytest.mark.parametrize("kind", ["suppress", "update", "erase"])
def test_evaluation_prompts_are_rendered_with_the_runs_causal_templates(family, kind):
    """A run made with end-only templates is judged on end-only prompts in every group (a template with text
    after [Y] is left out, with its reason); prefix keeps it, cut before [Y]. Masked models use every template."""
    lm = tiny(family)
    tail = "[X]'s capital [Y] is old"
    rel = Relation("P36", "capital", REL.templates + (tail,))
    rel2 = Relation("P37", "official language", REL2.templates + ("[X] speaks [Y] at home",))
    fs = FactSet("t", {"P36": rel, "P37": rel2}, FACTS)
    extra = {"update": dict(new_object="Berlin"), "erase": dict(relation="P36", k=1, allow_fewer=True)}.get(kind, {})
    sets = {f: [(0, 1)] for f in FACTS[:2]} if kind == "erase" else {}
    neurons = () if kind == "erase" else ((2, 3),)
    plans = {templates: plan_edit(lm, fs, EditRequest(kind, neurons, FRANCE, causal_templates=templates,
                                                       control_prompts_per_fact=None, **extra), sets)
             for templates in ("prefix", "end-only")}
    used = {templates: {p.template for ps in plan.prompts.values() for p in ps} for templates, plan in plans.items()}
    assert {tail, "[X] speaks [Y] at home"} <= used["prefix"]
    if family == TINY_MASKED:
        assert plans["end-only"].prompts == plans["prefix"].prompts
    else:
        assert used["end-only"] == used["prefix"] - {tail, "[X] speaks [Y] at home"}
        assert kind == "erase" or any(tail in what and "not at the end" in why  # the edited fact's are listed
                                      for what, why in plans["end-only"].skipped)
    with pytest.raises(EditPlanError, match="causal_templates") as exc:
        EditRequest(kind, neurons, FRANCE, causal_templates="suffix")
    one_line(exc)


@pytest.mark.parametrize("family", [TINY_MASKED, TINY_CAUSAL])
def test_update_plan_pairs_prompts_and_excludes_shared_neurons(family):
    lm = tiny(family)
    others = {FACTS[1]: [(2, 3)], FACTS[2]: [(2, 3), (0, 1)], FACTS[3]: [(1, 2)], FRANCE: [(2, 3), (1, 4)]}
    plan = plan_edit(lm, FS, EditRequest("update", ((2, 3), (1, 4)), FRANCE, new_object="Berlin"), others)
    update = plan.edit
    assert isinstance(update, E.Update)
    # 3 other facts cannot support a 10% share (one fact is 33%): nothing left out, and the plan says so in one line
    assert update.excluded == () and update.neurons == ((2, 3), (1, 4))
    assert [why for what, why in plan.skipped if what == "shared-neuron rule"] == [shared_rule_note(3, 0.1)]
    assert "at least 10 needed" in shared_rule_note(3, 0.1) and shared_rule_note(10, 0.1) is None
    # with 10 other facts it is applied: (2, 3) is in 2 of them (> 10%); the fact's own set does not count
    ten = [[(2, 3)], [(2, 3), (0, 1)]] + [[(1, 2)]] * 8
    wide = plan_edit(lm, FS, EditRequest("update", ((2, 3), (1, 4)), FRANCE, new_object="Berlin"), ten)
    assert wide.edit.excluded == ((2, 3),) and wide.edit.neurons == ((1, 4),)
    assert any("L2 N3" in what and "10%" in why for what, why in wide.skipped)
    assert not any(what == "shared-neuron rule" for what, _ in wide.skipped)
    fact, new = plan.prompts["fact"], plan.prompts["new object"]
    assert len(fact) == len(new) > 0
    assert all(p.template == q.template and q.fact.object == "Berlin" for p, q in zip(fact, new))
    assert update.old_ids == fact[0].answer_ids and update.new_ids == new[0].answer_ids
    assert isinstance(plan.control, E.Update) and plan.control.new_ids == update.new_ids
    assert [l for l, _ in plan.control.neurons] == [2, 1] and [l for l, _ in wide.control.neurons] == [1]


def test_sign_aware_update_flips_negatively_active_neurons():
    from kn_core.evaluation import neuron_activations

    lm = tiny(TINY_CAUSAL)
    neurons = tuple((l, i) for l in range(3) for i in range(0, 72, 9))
    plan = plan_edit(lm, FS, EditRequest("update", neurons, FRANCE, new_object="Berlin", sign_aware=True))
    mean = neuron_activations(lm, neurons, plan.prompts["fact"]).mean(axis=0)
    expect = tuple(n for n, m in zip(neurons, mean) if m < 0)
    assert expect and plan.edit.flipped == expect
    plain = plan_edit(lm, FS, EditRequest("update", neurons, FRANCE, new_object="Berlin"))
    assert plain.edit.flipped == ()


@pytest.mark.parametrize("family", [TINY_MASKED, TINY_CAUSAL])
def test_erase_plan_chooses_most_frequent_and_its_facts(family):
    lm = tiny(family)
    sets = {FRANCE: [(2, 1), (2, 2)], FACTS[1]: [(2, 1), (1, 4)], FACTS[2]: [(2, 1), (0, 9)]}
    plan = plan_edit(lm, FS, EditRequest("erase", fact=FRANCE, k=2, fill="zero"), sets)
    assert plan.edit.neurons == ((2, 1), (0, 9))  # (2, 1) in 3 facts; ties by layer then index
    assert {p.fact for p in plan.prompts["fact"]} == set(sets)
    assert {p.fact for p in plan.prompts["relation"]} == {FACTS[3]}  # the relation's facts not attributed
    flagged = plan_edit(lm, FS, EditRequest("erase", relation="P36", k=2, exclude=((2, 1),)), sets)
    assert (2, 1) not in flagged.edit.neurons and any("flagged" in why for _, why in flagged.skipped)
    with pytest.raises(EditPlanError, match="only 4 distinct") as exc:
        plan_edit(lm, FS, EditRequest("erase", fact=FRANCE, k=20), sets)
    assert "k=4" in one_line(exc)
    fewer = plan_edit(lm, FS, EditRequest("erase", fact=FRANCE, k=20, allow_fewer=True), sets)
    assert len(fewer.edit.neurons) == 4 and any("only 4 distinct" in why for _, why in fewer.skipped)


def test_refusals_are_one_line():
    lm = tiny(TINY_CAUSAL)
    cases = [
        (EditRequest("suppress", (), FRANCE), "no neurons"),
        (EditRequest("suppress", ((3, 0),), FRANCE), "outside this model"),
        (EditRequest("suppress", ((0, 72),), FRANCE), "outside this model"),
        (EditRequest("suppress", ((0, 1),)), "pick the fact"),
        (EditRequest("update", ((0, 1),), FRANCE, new_object="Paris"), "equals the current one"),
        (EditRequest("update", ((0, 1),), FRANCE, new_object=""), "new object"),
        (EditRequest("update", ((0, 1),), FRANCE, new_object="Atlantis"), "renders both"),
        (EditRequest("erase", relation="P36"), "run attribution"),
        (EditRequest("erase", relation="P99"), "no relation 'P99'"),
    ]
    for request, message in cases:
        with pytest.raises(EditPlanError, match=message) as exc:
            plan_edit(lm, FS, request)
        one_line(exc)
    shared = [[(0, 1)]] * 10  # ten other facts: enough to support the 10% share
    with pytest.raises(EditPlanError, match="shared by more than 10%") as exc:
        plan_edit(lm, FS, EditRequest("update", ((0, 1),), FRANCE, new_object="Berlin"), shared)
    one_line(exc)
    with pytest.raises(EditPlanError, match="no template of P36 renders"):
        plan_edit(lm, FS, EditRequest("suppress", ((0, 1),), Fact("P36", "Atlantis", "Atlantis")))
    for bad in (dict(factor=float("nan")), dict(lambda2=float("inf")), dict(scope="everywhere"), dict(k=0),
                dict(fill="ink")):
        with pytest.raises(EditPlanError) as exc:
            EditRequest("amplify", ((0, 1),), FRANCE, **bad)
        one_line(exc)
    with pytest.raises(EditPlanError, match="unknown edit kind"):
        EditRequest("melt")


@pytest.mark.parametrize("family", [TINY_MASKED, TINY_CAUSAL])
def test_measure_and_summarize_leave_the_model_unchanged(family):
    from kn_core.evaluation import answer_probabilities, with_edits

    lm = tiny(family)
    original = {k: v.clone() for k, v in lm.model.state_dict().items()}
    plan = plan_edit(lm, FS, EditRequest("update", ((2, 3), (1, 4), (2, 30)), FRANCE, new_object="Berlin",
                                         lambda2=20.0))
    before = measure_plan(lm, plan)
    after = with_edits(lm, [plan.edit], lambda: measure_plan(lm, plan))
    summary = summarize_plan(plan, before, after)
    assert set(summary) >= {"fact", "relation", "other relations", "new object", "success_rate"}
    direct = with_edits(lm, [plan.edit], lambda: answer_probabilities(lm, plan.prompts["new object"]))
    assert summary["new object"]["p_after"] == pytest.approx(np.mean([r["prob"] for r in direct]))
    assert summary["new object"]["p_after"] > summary["new object"]["p_before"]
    for name, tensor in lm.model.state_dict().items():
        assert torch.equal(tensor, original[name]), name


def _value_change(lm, before):
    return sum(float((lm.layout.out_projs[l].weight - before[l]).norm() ** 2) for l in range(3)) ** 0.5


def test_calibrated_update_reaches_o_prime_with_a_smaller_change_and_undoes_bitwise():
    from kn_core.edit_plan import CALIBRATION_RANGE
    from kn_core.evaluation import answer_probabilities, with_edits
    from kn_core.edit_stack import EditStack

    lm = tiny(TINY_CAUSAL)
    original = {k: v.clone() for k, v in lm.model.state_dict().items()}
    neurons = tuple((2, i) for i in range(0, 72, 4))
    paper = plan_edit(lm, FS, EditRequest("update", neurons, FRANCE, new_object="Berlin"))
    calibrated = plan_edit(lm, FS, EditRequest("update", neurons, FRANCE, new_object="Berlin", strength="calibrated"))
    new = calibrated.prompts["new object"]
    assert paper.calibration is None and calibrated.calibration["reached"]
    scale = calibrated.calibration["scale"]
    assert CALIBRATION_RANGE[0] <= scale < 1
    assert calibrated.edit.lambda2 == pytest.approx(8.0 * scale) and calibrated.edit.lambda1 == pytest.approx(scale)
    assert calibrated.control.lambda2 == calibrated.edit.lambda2  # the control at the same strength
    tried = calibrated.calibration["tried"]
    assert min(t["scale"] for t in tried if t["reached"]) == scale
    assert all(not t["reached"] for t in tried if t["scale"] < scale)
    for plan in (paper, calibrated):  # both reach o' as the top answer on every prompt
        rows = with_edits(lm, [plan.edit], lambda: answer_probabilities(lm, new))
        assert all(r["correct"] for r in rows)
    below = [t["scale"] for t in tried if not t["reached"]]
    assert below and max(below) < scale  # just below the chosen scale, o' does not win everywhere
    before = {l: lm.layout.out_projs[l].weight.detach().clone() for l in range(3)}
    stack = EditStack(lm)
    stack.push(paper.edit)
    paper_change = _value_change(lm, before)
    stack.undo()
    stack.push(calibrated.edit)
    assert 0 < _value_change(lm, before) < paper_change
    stack.clear()
    for name, tensor in lm.model.state_dict().items():
        assert torch.equal(tensor, original[name]), name
    # same request, same answer: deterministic
    again = plan_edit(lm, FS, EditRequest("update", neurons, FRANCE, new_object="Berlin", strength="calibrated"))
    assert again.edit == calibrated.edit and again.calibration == calibrated.calibration


def test_calibrated_update_is_sign_aware_and_reports_failure():
    from tiny import tiny_llama

    lm = tiny_llama()
    neurons = tuple((2, i) for i in range(0, 72, 4))
    plan = plan_edit(lm, FS, EditRequest("update", neurons, FRANCE, new_object="Berlin", strength="calibrated"))
    assert plan.calibration["reached"] and plan.edit.flipped  # SwiGLU neurons fire negative: reversed there
    many = tuple((l, i) for l in (1, 2) for i in range(0, 72, 3))
    failed = plan_edit(lm, FS, EditRequest("update", many, FRANCE, new_object="Berlin", strength="calibrated"))
    assert not failed.calibration["reached"] and failed.calibration["scale"] == 4.0
    assert any(what == "calibration" and "failed" in why for what, why in failed.skipped)
    with pytest.raises(EditPlanError, match="strength"):
        EditRequest("update", neurons, FRANCE, new_object="Berlin", strength="strong")


def test_mean_ablation_and_flagged_neurons_in_plans():
    class Stats:  # the part of kn_core.neurons.ActivationStats that plans read
        mean = np.arange(3 * 72, dtype=np.float32).reshape(3, 72) / 100

    lm = tiny(TINY_CAUSAL)
    with pytest.raises(EditPlanError, match="mean ablation needs activation statistics") as exc:
        plan_edit(lm, FS, EditRequest("suppress", ((2, 3),), FRANCE, to="mean"))
    one_line(exc)
    plan = plan_edit(lm, FS, EditRequest("suppress", ((2, 3), (1, 4), (0, 9)), FRANCE, to="mean",
                                         exclude=((0, 9),)), activation_stats=Stats())
    assert plan.edit == E.Suppress(((2, 3), (1, 4)), "answer", "mean", (Stats.mean[2, 3], Stats.mean[1, 4]))
    assert plan.control.to == "mean" and plan.control.means == tuple(Stats.mean[n] for n in plan.control.neurons)
    assert (0, 9) not in plan.control.neurons and any("L0 N9" in what for what, _ in plan.skipped)
    with pytest.raises(EditPlanError, match="flagged") as exc:
        plan_edit(lm, FS, EditRequest("amplify", ((0, 9),), FRANCE, exclude=((0, 9),)))
    one_line(exc)
    with pytest.raises(EditPlanError, match="'zero' or 'mean'"):
        EditRequest("suppress", ((0, 1),), FRANCE, to="half")
