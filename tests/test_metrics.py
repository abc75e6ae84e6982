"""kn_core.metrics: each metric where the answer is known by construction, ranks against a slow reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kn_core import edits as E
from kn_core.edit_plan import EditRequest, measure_plan, plan_edit
from kn_core.evaluation import answer_probabilities, neuron_activations, with_edits
from kn_core.facts import Fact, FactSet, Relation
from kn_core.metrics import edit_metrics, edit_size, measure_edit, metrics_lines
from tiny import TINY_CAUSAL, TINY_MASKED, make_tiny

REL = Relation("P36", "capital", ("The capital of [X] is [Y].", "[X]'s capital city is [Y].",
                                  "The capital city of [X] is [Y].", "[X], whose capital is [Y] ."))
REL2 = Relation("P37", "official language", ("The official language of [X] is [Y].",
                                             "People in [X] speak [Y]."))
REL3 = Relation("P131", "located in", ("[X] is located in [Y].", "[X] is a city in [Y]."))
FACTS = [Fact("P36", "France", "Paris"), Fact("P36", "Japan", "Tokyo"), Fact("P36", "Italy", "Rome"),
         Fact("P36", "Spain", "Madrid"), Fact("P36", "Ethiopia", "Addis Ababa"), Fact("P37", "France", "French"),
         Fact("P37", "Japan", "Japanese"), Fact("P37", "Italy", "Italian"), Fact("P131", "Berlin", "Germany")]
FS = FactSet("t", {"P36": REL, "P37": REL2, "P131": REL3}, FACTS)
FRANCE = FACTS[0]
_MODELS: dict = {}


def tiny(family):
    if family not in _MODELS:
        _MODELS[family] = make_tiny(family)
    return _MODELS[family]


def _reference_ranks(lm, prompt) -> list[int]:
    """Slow reference: one plain forward per answer token, logits in float64, rank = 1 + #strictly better."""
    tok, ranks = lm.tokenizer, []
    ids = list(tok(prompt.text)["input_ids"])
    answer = list(prompt.answer_ids)
    slots = [i for i, t in enumerate(ids) if t == tok.mask_token_id] if lm.kind == "masked" else []
    for j, target in enumerate(answer):
        if lm.kind == "causal":
            inputs, pos = ids + answer[:j], len(ids) + j - 1
        else:
            inputs = list(ids)
            for k in range(j):
                inputs[slots[k]] = answer[k]
            pos = slots[j]
        with torch.no_grad():
            logits = lm.model(input_ids=torch.tensor([inputs])).logits[0, pos].double()
        ranks.append(1 + int((logits > logits[target]).sum()))
    return ranks


@pytest.mark.parametrize("family", [TINY_MASKED, TINY_CAUSAL])
def test_ranks_match_a_slow_reference_also_for_multi_token_answers(family):
    lm = tiny(family)
    plan = plan_edit(lm, FS, EditRequest("suppress", ((2, 3),), FACTS[4], control_facts=8))
    prompts = [p for ps in plan.prompts.values() for p in ps]
    assert any(len(p.answer_ids) > 1 for p in prompts)  # "Addis Ababa"
    rows = answer_probabilities(lm, prompts)
    for prompt, row in zip(prompts, rows):
        ranks = _reference_ranks(lm, prompt)
        assert row["ranks"] == ranks and row["rank"] == ranks[0]
        assert row["correct"] == all(r == 1 for r in ranks)
    assert {r["rank"] for r in rows} != {1}  # the test sees ranks other than 1


def _measured(lm, plan, edit=None):
    before = measure_plan(lm, plan)
    after = with_edits(lm, [edit or plan.edit], lambda: measure_plan(lm, plan))
    control = with_edits(lm, [plan.control], lambda: measure_plan(lm, plan))
    return before, after, control


@pytest.mark.parametrize("family", [TINY_MASKED, TINY_CAUSAL])
def test_an_edit_that_does_nothing_reads_as_the_unedited_model(family):
    lm = tiny(family)
    templates = REL.templates[:3]
    plan = plan_edit(lm, FS, EditRequest("update", ((2, 3), (1, 4)), FRANCE, new_object="Berlin", lambda1=0.0,
                                         lambda2=0.0, neuron_templates=templates))
    result = measure_edit(lm, plan)
    m, before = result["metrics"], result["before"]
    new_before = before["new object"]
    assert m["reliability"]["rate"] == m["reliability"]["before"]["rate"] == np.mean([r["correct"] for r in new_before])
    assert m["reliability"]["mean_prob"] == np.mean([r["prob"] for r in new_before])
    assert m["reliability"]["n"] == 3 and m["generality"]["n"] == 1  # the 4th template is held out
    assert m["locality"]["rate"] == 1.0 and m["locality"]["mean_abs_dp"] == 0.0
    assert set(m["locality"]["groups"]) == {"same relation", "other relations"}
    assert m["flip_rate"] == 0.0
    assert m["rank_old"]["before"] == m["rank_old"]["after"] and m["rank_new"]["before"] == m["rank_new"]["after"]
    assert m["edit_size"] == {"neurons": 2, "weight_change": 0.0, "activation_change": None}
    assert m["portability"]["n"] == 1 and m["portability"]["rate"] == m["portability"]["before"]["rate"]
    assert m["portability"]["mean_abs_dp"] == 0.0
    # the control (also lambdas 0) did nothing either, and is reported in full
    assert m["control"]["edit_size"]["weight_change"] == 0.0 and m["control"]["locality"]["rate"] == 1.0
    assert any("random neurons" in line for line in metrics_lines(m))


def test_amplify_by_one_is_no_change_and_suppress_of_nothing_is_the_base_rate():
    lm = tiny(TINY_CAUSAL)
    plan = plan_edit(lm, FS, EditRequest("amplify", ((2, 3), (1, 4)), FRANCE, factor=1.0))
    before, after, control = _measured(lm, plan)
    assert after == before
    size = edit_size(lm, plan.edit, plan.prompts["fact"])
    m = edit_metrics(plan, before, after, control_after=control, size=size)
    assert m["reliability"]["rate"] == 0.0 and m["reliability"]["before"]["rate"] is None  # P(o) never rose
    assert size["activation_change"] == 0.0 and size["weight_change"] is None
    assert m["generality"] == {"applicable": False, "reason": m["generality"]["reason"]}
    assert "neuron_templates" in m["generality"]["reason"]
    assert m["portability"]["applicable"] is False and "update" in m["portability"]["reason"]
    # a suppress measured "after" on the unedited model: old answer no longer top-1 = 1 - accuracy
    sup = plan_edit(lm, FS, EditRequest("suppress", ((2, 3),), FRANCE))
    b = measure_plan(lm, sup)
    m = edit_metrics(sup, b, b)
    assert m["reliability"]["rate"] == 1 - np.mean([r["correct"] for r in b["fact"]])
    assert m["control"]["applicable"] is False and m["edit_size"]["weight_change"] is None


def test_generality_needs_a_held_out_template():
    lm = tiny(TINY_CAUSAL)
    plan = plan_edit(lm, FS, EditRequest("suppress", ((2, 3),), FRANCE, neuron_templates=REL.templates))
    b = measure_plan(lm, plan)
    reason = edit_metrics(plan, b, b)["generality"]["reason"]
    assert "every template" in reason and "hold one out" in reason


def _plant_answer(lm, fact):
    """Makes the last layer's consistently active neurons write the answer's direction, so that the fact's
    first answer token is top-1 only because of them. Returns the planted neurons."""
    prompts = plan_edit(lm, FS, EditRequest("suppress", ((0, 0),), fact)).prompts["fact"]
    layer = lm.layout.layers - 1
    all_neurons = [(layer, i) for i in range(lm.layout.neurons)]
    acts = neuron_activations(lm, all_neurons, prompts)
    # neurons whose activation keeps one sign on every prompt (SwiGLU neurons fire negative too)
    strength = np.where(acts.min(axis=0) > 0, acts.min(axis=0), -acts.max(axis=0))
    chosen = [n for n, s in sorted(zip(all_neurons, strength), key=lambda x: -x[1]) if s > 0.01][:6]
    assert len(chosen) >= 3
    target = prompts[0].answer_ids[0]
    head = lm.layout.output_embeddings().detach()
    direction = head[target] - head.mean(dim=0)
    weight = lm.layout.value_weight(layer)
    with torch.no_grad():
        for _, i in chosen:
            column = acts[:, i]
            vector = float(np.sign(column[0]) * 40.0 / np.abs(column).min()) * direction / direction.norm()
            if lm.layout.neuron_axis(layer) == 0:
                weight[i] = vector
            else:
                weight[:, i] = vector
    assert all(r["top1_id"] == target for r in answer_probabilities(lm, prompts))
    return tuple(chosen)


# causal families only: there the residual stream reaches the head through a norm alone, so the answer's
# output-embedding direction is known in closed form (BERT's head adds a non-linear transform)
@pytest.mark.parametrize("family", [TINY_CAUSAL, "llama"])
def test_suppressing_the_neurons_that_carry_the_answer_is_fully_reliable_and_the_control_is_not(family):
    lm = make_tiny(family, seed=1)
    neurons = _plant_answer(lm, FRANCE)
    plan = plan_edit(lm, FS, EditRequest("suppress", neurons, FRANCE, neuron_templates=REL.templates[:3]))
    before, after, control = _measured(lm, plan)
    sizes = edit_size(lm, plan.edit, plan.prompts["fact"]), edit_size(lm, plan.control, plan.prompts["fact"])
    m = edit_metrics(plan, before, after, control_after=control, size=sizes[0], control_size=sizes[1])
    assert m["reliability"]["before"]["rate"] == 0.0 and m["reliability"]["rate"] == 1.0
    assert m["generality"]["rate"] == 1.0 and m["generality"]["n"] == 1
    assert m["flip_rate"] == 1.0 and m["rank_old"]["before"] == 1.0 and m["rank_old"]["after"] > 1.0
    assert m["reliability"]["mean_prob"] < m["reliability"]["before"]["mean_prob"]
    assert m["control"]["reliability"]["rate"] == 0.0 and m["control"]["flip_rate"] == 0.0
    # ‖Δa‖ of a zeroing suppress is the norm of the neurons' activations, prompt by prompt
    acts = neuron_activations(lm, neurons, plan.prompts["fact"]).astype(np.float64)
    assert sizes[0]["activation_change"] == pytest.approx(np.linalg.norm(acts, axis=1).mean(), rel=1e-12)
    assert sizes[0]["neurons"] == sizes[1]["neurons"] == len(neurons)


def test_update_weight_change_matches_the_formula():
    lm = tiny(TINY_CAUSAL)
    plan = plan_edit(lm, FS, EditRequest("update", ((2, 3), (1, 4)), FRANCE, new_object="Berlin", lambda1=1.0,
                                         lambda2=8.0))
    update = plan.edit
    emb = lm.layout.input_embeddings().detach().double() if update.embedding == "input" else \
        lm.layout.output_embeddings().detach().double()
    e_old = emb[list(update.old_ids)].mean(dim=0)
    e_new = emb[list(update.new_ids)].mean(dim=0)
    total = 0.0
    for layer, index in update.neurons:
        norm = lm.layout.value_vector(layer, index).double().norm()
        delta = -norm / e_old.norm() * update.lambda1 * e_old + norm / e_new.norm() * update.lambda2 * e_new
        total += float(delta.norm()) ** 2
    size = edit_size(lm, update)
    assert size["weight_change"] == pytest.approx(total ** 0.5, rel=1e-5)
    weights = [lm.layout.value_weight(layer).clone() for layer in range(lm.layout.layers)]
    assert all(torch.equal(w, lm.layout.value_weight(l)) for l, w in enumerate(weights))  # reverted


def test_update_reliability_generality_and_portability_read_the_new_object():
    lm = tiny(TINY_CAUSAL)
    plan = plan_edit(lm, FS, EditRequest("update", ((2, 3), (1, 4), (0, 7)), FRANCE, new_object="Berlin",
                                         lambda1=4.0, lambda2=60.0, neuron_templates=REL.templates[1:]))
    assert [p.template for p in plan.prompts["held-out"]] == [REL.templates[0]]
    assert [p.fact.object for p in plan.prompts["held-out new object"]] == ["Berlin"]
    assert [p.fact for p in plan.prompts["portability"]] == [FACTS[-1]]
    result = measure_edit(lm, plan)
    m, after = result["metrics"], result["after"]
    new_rows = after["new object"]
    assert m["reliability"]["rate"] == np.mean([r["correct"] for r in new_rows])
    assert m["reliability"]["mean_rank"] == np.mean([r["rank"] for r in new_rows])
    assert m["generality"]["mean_prob"] == after["held-out new object"][0]["prob"]
    with_edits(lm, [plan.edit], lambda: _check_ranks(lm, plan.prompts["new object"], new_rows))
    assert m["rank_new"]["after"] == np.mean([r["rank"] for r in new_rows])
    assert m["edit_size"]["weight_change"] > 0 and m["control"]["edit_size"]["weight_change"] > 0


def _check_ranks(lm, prompts, rows):
    for prompt, row in zip(prompts, rows):
        assert row["rank"] == _reference_ranks(lm, prompt)[0]


def test_metric_formulas_on_hand_made_rows():
    lm = tiny(TINY_CAUSAL)
    plan = plan_edit(lm, FS, EditRequest("suppress", ((2, 3),), FRANCE, control_facts=1))

    def row(prob, top1, correct, rank):
        return {"prob": prob, "top1_id": top1, "correct": correct, "rank": rank}

    n_fact = len(plan.prompts["fact"])
    before = {"fact": [row(0.5, 7, True, 1)] * n_fact, "relation": [row(0.4, 1, True, 1)],
              "other relations": [row(0.2, 2, False, 3)]}
    after = {"fact": [row(0.1, 9, False, 4)] + [row(0.6, 7, True, 1)] * (n_fact - 1),
             "relation": [row(0.1, 5, False, 2)], "other relations": [row(0.3, 2, False, 2)]}
    m = edit_metrics(plan, before, after)
    assert m["reliability"]["rate"] == pytest.approx(1 / n_fact) and m["flip_rate"] == pytest.approx(1 / n_fact)
    assert m["locality"]["rate"] == 0.5 and m["locality"]["mean_abs_dp"] == pytest.approx(0.2)
    assert m["locality"]["groups"]["same relation"]["rate"] == 0.0
    assert m["locality"]["mean_rank"] == 2.0 and m["locality"]["mean_prob"] == pytest.approx(0.2)
    assert m["rank_old"]["after"] == pytest.approx((4 + (n_fact - 1)) / n_fact)


def test_kn_edit_prints_metrics_and_holds_out_a_template(capsys, tmp_path):
    import json

    from kn_core.cli import main
    from kn_core.metrics import held_out_templates

    lm = make_tiny(TINY_CAUSAL)
    lm.model.save_pretrained(tmp_path)
    lm.tokenizer.save_pretrained(tmp_path)
    argv = ["edit", "suppress", "--relation", "P36", "--subject", "France", "--model", str(tmp_path), "--steps", "2",
            "--t", "0.1", "--p", "0.2"]
    assert main(argv + ["--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    m = doc["metrics"]
    assert set(m) >= {"reliability", "generality", "locality", "portability", "flip_rate", "rank_old", "rank_new",
                      "edit_size", "control", "kind"}
    assert m["generality"]["n"] == len(doc["prompt_groups"]["held-out"]) == 1
    assert m["reliability"]["n"] == len(doc["prompts"]) and m["edit_size"]["activation_change"] > 0
    assert m["control"]["edit_size"]["neurons"] == m["edit_size"]["neurons"] == len(doc["neurons"])
    assert held_out_templates(["a", "b", "c"], 0) == ()
    with pytest.raises(ValueError, match="fewer than 3"):
        held_out_templates(["a", "b", "c"], 1)
    assert main(argv + ["--hold-out", "0"]) == 0
    text = capsys.readouterr().out
    assert "generality" in text and "n/a: every template" in text and "[random neurons:" in text
    assert main(argv + ["--hold-out", "9", "--json"]) == 2
    assert "--hold-out 0" in json.loads(capsys.readouterr().out)["error"]


def test_gui_evaluates_the_control_in_the_worker_and_the_strip_shows_both(qtbot, tmp_path):
    pytest.importorskip("pytestqt")
    from PySide6.QtGui import QUndoStack

    from kn_core.attribution import AttributionParams
    from kn_core.jsonio import dumps
    from kn_core.tasks import Cancelled, Task
    from kn_gui.controllers import attribution as A
    from kn_gui.controllers import edits as C
    from kn_gui.panels.edits_panel import EditsPanel
    from kn_gui.session import Session
    from kn_gui.worker import JobRunner
    from test_gui import FRANCE, geo_factset

    session = Session(geo_factset())
    session.lm = lm = make_tiny(TINY_CAUSAL)
    runner, history = JobRunner(), C.History()
    edits = C.EditsController(session, runner, history)
    edits.set_model(lm)
    events = []
    edits.event.connect(events.append)
    try:
        attribution = A.AttributionController(session, runner, edits.active_descriptions)
        run_fact = session.factset.facts_of(FRANCE.relation)[0]
        attribution.start([run_fact], AttributionParams(steps=2))
        assert runner.wait_idle(60000)
        request = edits.request({"kind": "Suppress", "scope": "answer"}, run_fact, [(0, 1), (1, 2)])
        run = session.relation_runs(run_fact.relation)[0]
        assert request.neuron_templates == tuple(p.template for p in run.prompts)
        # cancelled before it starts: nothing measured, the model untouched
        plan = edits.planner(request)()
        task = Task()
        task.cancel()
        with pytest.raises(Cancelled):
            measure_edit(lm, plan, task, states=("before", "control_after"))
        edits.apply({"kind": "Suppress", "scope": "answer"}, run_fact, [(0, 1), (1, 2)])
        assert runner.wait_idle(60000)
        report = [e for e in events if isinstance(e, C.EditEvaluated)][-1].report
    finally:
        runner.shutdown()
    m = report["metrics"]
    assert m["edit_size"]["neurons"] == 2 and m["edit_size"]["activation_change"] > 0
    assert m["control"]["edit_size"]["neurons"] == 2 and m["control"]["locality"]["n"] == m["locality"]["n"]
    assert "every template" in m["generality"]["reason"]  # the run used them all
    dumps(report)  # saved with the history entry
    panel = EditsPanel(session, QUndoStack())
    qtbot.addWidget(panel)
    panel.show()
    panel.show_report(report)
    texts = panel.metrics_strip.texts()
    assert panel.metrics_strip.isVisible()
    assert texts["reliability"][0] == f"{100 * m['reliability']['rate']:.0f}%"
    assert texts["reliability"][2] == f"random: {100 * m['control']['reliability']['rate']:.0f}%"
    assert texts["generality"][0] == "n/a" and texts["edit_size"][1] == "2 neurons"
    panel.show_report(None)
    assert not panel.metrics_strip.isVisible()


def test_reproduction_reports_metrics_per_kind_beside_the_control(tmp_path):
    import json

    from kn_core.reproduce import run_reproduce
    from tiny import GEOGRAPHY

    capital = Relation("P36", "capital", REL.templates + ("The capital city of [X] is called [Y].",))
    facts = [Fact("P36", country, city) for country, city, _, _ in GEOGRAPHY[:8]]
    facts += [Fact("P37", country, language) for country, _, language, _ in GEOGRAPHY[:4]] + [FACTS[-1]]
    fs = FactSet("tiny", {"P36": capital, "P37": REL2, "P131": REL3}, facts)
    report = run_reproduce(make_tiny(TINY_CAUSAL), fs, tmp_path, relations=["P36"], facts_per_relation=3, steps=1,
                           control_prompts=4, say=lambda m: None)
    section = json.loads((tmp_path / "report.json").read_text())["edit_metrics"]
    assert section == json.loads(json.dumps(report["edit_metrics"]))
    measured = [f for f in section["facts"] if f["kinds"]]
    assert measured, section["skipped"]
    for fact in measured:
        assert len(fact["held_out"]) == 1 and fact["held_out"][0] in capital.templates
        for kind, m in fact["kinds"].items():
            assert m["generality"]["n"] == 1 and m["control"]["generality"]["n"] == 1, kind
            assert m["locality"]["n"] > 0 and m["edit_size"]["neurons"] == m["control"]["edit_size"]["neurons"]
    summary = section["summary"]
    assert set(summary) >= {"suppress", "amplify"}
    rates = [f["kinds"]["suppress"]["reliability"]["rate"] for f in measured if "suppress" in f["kinds"]]
    assert summary["suppress"]["reliability"]["edit"] == pytest.approx(np.mean(rates))
    text = (tmp_path / "report.md").read_text()
    table = text.split("## Edit metrics")[1].split("\n## ")[0]
    assert "%)" in table  # a random tiny model knows no fact: its rows are the unknown facts', none are mixed in
    assert "| suppress, facts the model does not know |" in table and "| every edit, known facts | 0 |" in table
    assert "| suppress |" not in table


def test_measure_edit_in_parts_gives_what_the_whole_measurement_gives():
    """The GUI measures "before" and the control in one job, applies the edit as an undoable command and measures
    again: the same rows, sizes and metrics as `measure_edit` measuring all three states."""
    lm = tiny(TINY_CAUSAL)
    plan = plan_edit(lm, FS, EditRequest("suppress", ((2, 3), (1, 4)), FRANCE, scope="answer"))
    whole = measure_edit(lm, plan)
    parts = measure_edit(lm, plan, states=("before", "control_after"))
    assert "metrics" not in parts and "after" not in parts
    assert parts["before"] == whole["before"] and parts["control_after"] == whole["control_after"]
    after = with_edits(lm, [plan.edit], lambda: measure_plan(lm, plan))
    assert after == whole["after"]
    assert edit_metrics(plan, parts["before"], after, control_after=parts["control_after"], size=parts["size"],
                        control_size=parts["control_size"]) == whole["metrics"]
    with pytest.raises(ValueError, match="states must be some of before, after, control_after"):
        measure_edit(lm, plan, states=("later",))


def test_every_summary_reads_the_one_flip_rate():
    """The top-1 flip rate by hand (2 of 3 prompts changed their greedy first token), and the metrics, the plan
    summary and the before/after effect all give it for the same rows."""
    from kn_core.edit_plan import summarize_plan
    from kn_core.evaluation import effect_between, flip_rate

    lm = tiny(TINY_CAUSAL)
    plan = plan_edit(lm, FS, EditRequest("suppress", ((2, 3),), FRANCE))
    before = measure_plan(lm, plan)
    after = {g: [dict(r, top1_id=r["top1_id"] + (k % 3 != 0)) for k, r in enumerate(rows)]
             for g, rows in before.items()}
    n = len(before["fact"])
    by_hand = sum(k % 3 != 0 for k in range(n)) / n
    assert flip_rate(before["fact"], after["fact"]) == by_hand
    assert edit_metrics(plan, before, after)["flip_rate"] == by_hand
    assert summarize_plan(plan, before, after)["fact"]["flip_rate"] == by_hand
    assert effect_between(before["fact"], after["fact"])["flip_rate"] == by_hand
    assert math.isnan(flip_rate([], []))


def test_measure_groups_batches_across_entries_as_each_group_alone():
    """`evaluation.measure_groups` over several plans' groups at once (batched across them, in chunks) gives each
    group the rows `answer_probabilities` gives it alone."""
    from kn_core import evaluation as ev

    lm = tiny(TINY_MASKED)
    plans = [plan_edit(lm, FS, EditRequest("suppress", ((2, 3),), fact)) for fact in FACTS[:3]]
    measured = ev.measure_groups(lm, [p.prompts for p in plans], top_k=2)
    for plan, groups in zip(plans, measured):
        assert list(groups) == list(plan.prompts)
        for g, ps in plan.prompts.items():
            alone = answer_probabilities(lm, ps, top_k=2) if ps else []
            assert [r["prob"] for r in groups[g]] == pytest.approx([r["prob"] for r in alone], rel=1e-5)
            assert [r["top1_id"] for r in groups[g]] == [r["top1_id"] for r in alone]
    with pytest.raises(ValueError, match="evaluation must be forced or generate"):
        ev.measure_groups(lm, [plans[0].prompts], evaluation="sampled")
