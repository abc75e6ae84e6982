"""Batch and sequential editing (kn_core.batch_requests, kn_core.batch, edits.Batch): parsing, composition,
bitwise undo, forgetting, cancel, neurons from the project."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from kn_core import edits as E
from kn_core.batch import resolve_neurons, run_batch
from kn_core.batch_requests import BatchError, check_requests, parse_requests
from kn_core.edit_stack import EditStack
from kn_core.evaluation import answer_probabilities, with_edits
from kn_core.facts import Fact, FactSet, Relation, render_prompts
from kn_core.tasks import Cancelled, Task
from tiny import TINY_CAUSAL, TINY_MASKED, make_tiny

_MODELS: dict = {}


def tiny(family=TINY_CAUSAL):
    if family not in _MODELS:
        _MODELS[family] = make_tiny(family)
    return _MODELS[family]


REL = Relation("P36", "capital", ("The capital of [X] is [Y].", "[X]'s capital city is [Y].",
                                  "The capital city of [X] is [Y].", "[X], whose capital is [Y] ."))
REL2 = Relation("P37", "official language", ("The official language of [X] is [Y].", "People in [X] speak [Y].",
                                             "In [X] the main language is [Y]."))
FACTS = [Fact("P36", c, cap) for c, cap in [("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"),
                                             ("Spain", "Madrid"), ("Peru", "Lima"), ("Kenya", "Nairobi")]] + \
        [Fact("P37", c, lang) for c, lang in [("France", "French"), ("Japan", "Japanese"), ("Italy", "Italian"),
                                              ("Peru", "Spanish")]]
FS = FactSet("t", {"P36": REL, "P37": REL2}, FACTS)


def lines(*records) -> list[str]:
    return [r if isinstance(r, str) else json.dumps(r) for r in records]


def snapshot(lm) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in lm.model.state_dict().items()}


def assert_bitwise(lm, saved) -> None:
    now = lm.model.state_dict()
    assert saved.keys() == now.keys()
    for k, v in saved.items():
        assert torch.equal(v, now[k]), k


def hooks(lm) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in lm.model.modules())


# ---------------------------------------------------------------- parsing

def test_every_bad_line_is_named_with_its_reason_before_any_model_work():
    parsed = parse_requests(lines(
        {"prompt": "The capital of France is", "subject": "France", "ground_truth": "Paris", "target_new": "Rome",
         "rephrase_prompts": ["France's capital city is", "Its capital is"],
         "locality_prompts": [{"prompt": "The capital of Japan is", "ground_truth": "Tokyo"}]},  # 1 good
        {"relation": "P37", "subject": "japan", "kind": "suppress"},  # 2 good (subject case-insensitive)
        "{not json",  # 3
        {"relation": "P36", "subject": "France", "new_object": "Rome", "colour": "red"},  # 4 unknown field
        {"relation": "P36", "subject": "France", "kind": "erase"},  # 5 erase is relation-wide
        {"prompt": "The capital is", "subject": "France", "ground_truth": "Paris", "target_new": "Rome"},  # 6
        {"relation": "P36", "subject": "France"},  # 7 update without new object
        {"relation": "P36", "subject": "France", "new_object": "Paris"},  # 8 same object
        {"relation": "P36", "subject": "France", "kind": "suppress", "neurons": [[1, -2]]},  # 9 bad neurons
        {"relation": "P99", "subject": "France", "new_object": "Rome"},  # 10 unknown relation
        {"relation": "P36", "subject": "Atlantis", "new_object": "Rome"},  # 11 unknown subject
        "[1, 2]",  # 12 not an object
        "",  # blank lines are not requests
        {"prompt": "The capital of France is", "subject": "France", "ground_truth": "Paris", "target_new": "Rome",
         "locality_prompts": ["The capital of Japan is"]},  # 14 locality without an answer
        {"relation": "P36", "subject": "France", "kind": "suppress", "new_object": "Rome"},  # 15
    ), FS)
    assert [r.line for r in parsed.requests] == [1, 2]
    bad = dict(parsed.bad)
    assert sorted(bad) == [3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 14, 15]
    for needle, line in [("not valid JSON", 3), ("'colour'", 4), ("erase", 5), ("does not occur in the prompt", 6),
                         ("'new_object' must be non-empty text and is missing", 7), ("equals the current object", 8),
                         ("[layer, index]", 9), ("no relation 'P99'", 10), ("'Atlantis'", 11),
                         ("JSON object", 12), ("ground_truth", 14), ("only used by update", 15)]:
        assert needle in bad[line], (line, bad[line])
    assert all("\n" not in why for why in bad.values())
    with pytest.raises(BatchError) as exc:
        parsed.refuse_or_skip(skip_bad=False)
    message = str(exc.value)
    assert "12 bad request(s)" in message and "--skip-bad" in message
    assert all(f"line {n}:" in message for n in bad)
    parsed.refuse_or_skip(skip_bad=True)  # skipping explicitly keeps the good ones, bad ones stay listed
    easy = parsed.requests[0]
    assert easy.relation.templates == ("The capital of [X] is [Y]", "[X]'s capital city is [Y]")
    assert easy.left_out == (("rephrase 'Its capital is'",
                              "does not name the subject, so it is not a paraphrase of the fact"),)
    assert easy.locality == (("The capital of Japan is", "Tokyo"),)
    assert parsed.requests[1].fact == Fact("P37", "Japan", "Japanese")
    with pytest.raises(BatchError, match="no usable requests"):
        parse_requests(["", "{bad"], FS).refuse_or_skip(skip_bad=True)


def test_model_checks_before_any_forward_pass():
    lm = tiny()
    parsed = parse_requests(lines({"relation": "P36", "subject": "France", "new_object": "Rome",
                                   "neurons": [[7, 0]]},
                                  {"relation": "P36", "subject": "Japan", "new_object": "Rome", "neurons": [[1, 2]]}), FS)
    check_requests(lm, parsed)
    assert [r.line for r in parsed.requests] == [2]
    assert parsed.bad == [(1, "neuron (7, 0) is outside this model (3 layers x 72 neurons)")]


# ---------------------------------------------------------------- composition and undo

SHARED = (2, 5)  # in every request below: overlapping neurons must compose


def overlapping_updates():
    return parse_requests(lines(
        {"relation": "P36", "subject": "France", "new_object": "Rome", "neurons": [list(SHARED), [1, 7]]},
        {"relation": "P37", "subject": "Italy", "new_object": "Spanish", "neurons": [list(SHARED), [2, 9]]},
        {"relation": "P36", "subject": "Japan", "kind": "suppress", "neurons": [list(SHARED), [0, 3]]},
        {"relation": "P37", "subject": "Peru", "kind": "amplify", "neurons": [[1, 7]]},
    ), FS)


def explicit(parsed):
    return {r.line: (r.neurons, "explicit", None) for r in parsed.requests}


def reference_update(v0, steps, lm):
    """The paper's update applied to one value vector step by step, in float64, from the embeddings."""
    emb = lm.layout.input_embeddings().double()
    v = v0.double()
    for old, new in steps:
        e_old, e_new = emb[old].mean(0), emb[new].mean(0)
        norm = v.norm()
        v = v - norm / e_old.norm() * e_old + norm / e_new.norm() * 8.0 * e_new
    return v


def test_compound_and_sequential_compose_overlapping_neurons_and_undo_bitwise():
    lm = tiny()
    original = snapshot(lm)
    parsed = overlapping_updates()
    compound = run_batch(lm, parsed, explicit(parsed), "compound", relation_exclusion=False)
    assert_bitwise(lm, original)  # measuring leaves the model as it was
    sequential = run_batch(lm, parsed, explicit(parsed), "sequential", relation_exclusion=False)
    assert_bitwise(lm, original)
    assert compound.report["applied"] == sequential.report["applied"] == 4
    # explicit neurons, paper lambdas: both modes plan the same edits, so they leave the same model
    assert compound.edit == sequential.edit
    stack = EditStack(lm)
    stack.push(compound.edit, report={"batch": compound.report["summary"]})
    assert len(stack) == 1  # the whole batch is one entry
    batched = snapshot(lm)
    stack.undo()
    assert_bitwise(lm, original)
    one_by_one = EditStack(lm)
    for e in compound.edit.edits:
        one_by_one.push(e)
    assert_bitwise(lm, batched)  # a batch is its edits pushed one after another
    # the shared value vector against an independent float64 reference of the two updates in order
    ups = [e for e in compound.edit.edits if isinstance(e, E.Update)]
    weight = lm.layout.value_weight(SHARED[0])
    axis = lm.layout.neuron_axis(SHARED[0])
    edited = weight.index_select(axis, torch.tensor([SHARED[1]])).flatten()
    v0 = original_vector(original, lm)
    expected = reference_update(v0, [(list(u.old_ids), list(u.new_ids)) for u in ups], lm)
    assert torch.allclose(edited.double(), expected, rtol=1e-5, atol=1e-6)
    one_by_one.revert_all()
    assert_bitwise(lm, original)
    # saved and restored as one entry
    stack.redo()
    state = json.loads(json.dumps(stack.to_dict()))
    stack.revert_all()
    restored = EditStack.from_dict(lm, state)
    assert restored.entries[0].edit == compound.edit
    assert_bitwise(lm, batched)
    restored.undo()
    assert_bitwise(lm, original)


def original_vector(saved, lm):
    weight = lm.layout.value_weight(SHARED[0])
    name = next(k for k, v in lm.model.named_parameters() if v is weight)
    axis = lm.layout.neuron_axis(SHARED[0])
    return saved[name].index_select(axis, torch.tensor([SHARED[1]])).flatten()


def test_compound_metrics_are_measured_with_every_edit_and_control_applied():
    lm = tiny()
    parsed = overlapping_updates()
    result = run_batch(lm, parsed, explicit(parsed), "compound", relation_exclusion=False)
    first = result.report["requests"][0]
    plan_prompts = result.report["requests"][0]["prompts"]
    assert plan_prompts["fact"] == 4 and plan_prompts["new object"] == plan_prompts["fact"]
    # independent: France -> Rome's prompts under the whole batch, and under the batch of controls
    prompts, _ = render_prompts(Fact("P36", "France", "Rome"), REL, lm.tokenizer, lm.kind)
    before = answer_probabilities(lm, prompts)
    after = with_edits(lm, [result.edit], lambda: answer_probabilities(lm, prompts))
    control = with_edits(lm, [result.control], lambda: answer_probabilities(lm, prompts))
    reliability = first["metrics"]["reliability"]
    assert reliability["before"]["mean_prob"] == pytest.approx(np.mean([r["prob"] for r in before]), rel=1e-9)
    assert reliability["mean_prob"] == pytest.approx(np.mean([r["prob"] for r in after]), rel=1e-9)
    assert reliability["rate"] == np.mean([r["correct"] for r in after])
    assert first["metrics"]["control"]["reliability"]["mean_prob"] == pytest.approx(
        np.mean([r["prob"] for r in control]), rel=1e-9)
    assert result.control.neurons and not set(result.control.neurons) & {SHARED}
    summary = result.report["summary"]["metrics"]
    assert summary["reliability"]["requests"] == 4
    assert summary["reliability"]["mean_prob"] == pytest.approx(
        np.mean([r["metrics"]["reliability"]["mean_prob"] for r in result.report["requests"]]))
    assert summary["rank_new"]["n"] == 2 and summary["portability"]["applicable"] is False
    from kn_core.batch import _mean_metric
    nan = {"rate": 0.0, "mean_prob": float("nan"), "mean_rank": 3.0, "n": 2}
    mixed = _mean_metric([nan, {"rate": 1.0, "mean_prob": 0.5, "mean_rank": 1.0, "n": 2}])
    assert mixed["mean_prob"] == 0.5 and mixed["non_finite_requests"] == 1 and "non-finite" in mixed["note"]
    json.dumps(result.report)  # plain JSON


def test_sequential_measures_forgetting_of_earlier_edits():
    lm = tiny()
    parsed = overlapping_updates()
    result = run_batch(lm, parsed, explicit(parsed), "sequential", relation_exclusion=False)
    steps = result.report["steps"]
    assert [s["step"] for s in steps] == [1, 2, 3, 4] and [s["earlier_n"] for s in steps] == [0, 1, 2, 3]
    france = result.report["requests"][0]
    assert [s for s, _ in france["holds_after_step"]] == [1, 2, 3, 4]
    # independent: does France -> Rome hold after edits 1..k? (its first new-object prompt, o' greedy)
    new_prompts, _ = render_prompts(Fact("P36", "France", "Rome"), REL, lm.tokenizer, lm.kind)
    probe = new_prompts[:1]
    for k, (_, holds) in enumerate(france["holds_after_step"], 1):
        rows = with_edits(lm, list(result.edit.edits[:k]), lambda: answer_probabilities(lm, probe))
        assert holds == float(rows[0]["correct"])
    assert steps[-1]["earlier_hold_rate"] == pytest.approx(
        np.mean([r["holds_after_step"][-1][1] for r in result.report["requests"][:3]]))
    forgetting = result.report["summary"]["forgetting"]
    assert forgetting["holds_at_the_end"] == pytest.approx(
        np.mean([r["holds_after_step"][-1][1] for r in result.report["requests"]]))
    # the step's own "after" is the model with edits 1..k
    japan = result.report["requests"][2]
    prompts, _ = render_prompts(FACTS[1], REL, lm.tokenizer, lm.kind)
    after = with_edits(lm, list(result.edit.edits[:3]), lambda: answer_probabilities(lm, prompts))
    assert japan["metrics"]["reliability"]["mean_prob"] == pytest.approx(np.mean([r["prob"] for r in after]), rel=1e-9)


@pytest.mark.parametrize("mode", ["compound", "sequential"])
def test_cancel_leaves_weights_and_hooks_untouched(mode):
    lm = tiny()
    original, hooks_before = snapshot(lm), hooks(lm)
    parsed = overlapping_updates()
    seen = []

    def progress(fraction, message):
        seen.append(fraction)
        if fraction is not None and fraction > 0.5:
            task.cancel()

    task = Task(on_progress=progress)
    with pytest.raises(Cancelled):
        run_batch(lm, parsed, explicit(parsed), mode, relation_exclusion=False, task=task)
    assert seen and max(f for f in seen if f is not None) > 0.5
    assert_bitwise(lm, original)
    assert hooks(lm) == hooks_before


@pytest.mark.parametrize("family", [TINY_MASKED, TINY_CAUSAL])
def test_batch_of_suppressions_shares_one_hook_and_equals_their_union(family):
    lm = tiny(family)
    parts = tuple(E.Suppress(((layer, i),), "answer") for layer in range(3) for i in (1, 4, 9))
    batch = E.Batch(parts + (E.Amplify(((1, 1),), 3.0),))
    before = hooks(lm)
    prompts = [p for f in FACTS[:3] for p in render_prompts(f, REL, lm.tokenizer, lm.kind)[0]]
    handle = batch.apply(lm)
    added = hooks(lm) - before
    got = answer_probabilities(lm, prompts)
    handle.revert()
    assert hooks(lm) == before
    union = E.Suppress(tuple(n for p in parts for n in p.neurons), "answer")
    want = with_edits(lm, [union, E.Amplify(((1, 1),), 3.0)], lambda: answer_probabilities(lm, prompts))
    assert [r["prob"] for r in got] == [r["prob"] for r in want]
    single = with_edits(lm, list(parts), lambda: hooks(lm) - before)
    assert added < single


def test_batch_edit_round_trips_and_refuses_bad_dicts():
    batch = E.Batch((E.Suppress(((1, 2),)), E.Update(((1, 2), (0, 1)), (5,), (6,))), "two")
    assert E.edit_from_dict(json.loads(json.dumps(batch.to_dict()))) == batch
    assert batch.neurons == ((1, 2), (0, 1)) and batch.is_weight_edit
    assert "Batch of 2 edits (1 suppress, 1 update" in batch.describe()
    for bad, needle in [({"kind": "batch", "edits": []}, "non-empty list"),
                        ({"kind": "batch", "edits": [{"kind": "batch", "edits": []}]}, "itself a batch"),
                        ({"kind": "batch", "edits": [{"kind": "zap", "neurons": []}]}, "batch edit 0: unknown edit kind"),
                        ({"kind": "batch", "edits": [batch.edits[0].to_dict()], "extra": 1}, "'extra'")]:
        with pytest.raises(ValueError, match=needle):
            E.edit_from_dict(bad)


def test_neurons_from_attribution_are_stored_in_the_project_and_reused(tmp_path):
    from kn_core.attribution import AttributionParams
    from kn_core.batch import NeuronSource
    from kn_core.store import open_or_create_project

    lm = tiny()
    parsed = parse_requests(lines({"relation": "P36", "subject": "France", "kind": "suppress"},
                                  {"relation": "P36", "subject": "Japan", "kind": "suppress", "neurons": [[0, 1]]}), FS)
    source = NeuronSource(t=0.2, p=0.5, params=AttributionParams(steps=2))
    with open_or_create_project(tmp_path / "p.knproj") as project:
        project.add_model(lm)
        first = resolve_neurons(lm, parsed, source, project)
        assert first[2] == (((0, 1),), "explicit", None)
        assert first[1][2] == tuple(REL.templates)  # attribution used every template: none is held out
        assert first[1][1].startswith("attribution (ig, 2 steps (right Riemann points), t=0.2, p=0.5, 4 prompts), "
                                      "stored as project neuron set #")
        again = resolve_neurons(lm, parsed, source, project)
        assert again[1][0] == first[1][0] and again[1][1].startswith("project neuron set #")
    from kn_core.attribution import attribute_fact
    from kn_core.neurons import refined_neurons

    prompts, _ = render_prompts(FACTS[0], REL, lm.tokenizer, lm.kind)
    scores = attribute_fact(lm, prompts, AttributionParams(steps=2))
    assert first[1][0] == tuple(refined_neurons([s.scores for s in scores], 0.2, 0.5))


@pytest.mark.parametrize("quadrature", ["gauss", "auto"])
def test_neurons_from_attribution_name_the_quadrature(quadrature):
    """The note on neurons found by attribution says how the integral was computed, as the reproduction report
    says it (attribution.integration_text): the quadrature, its points and its tolerance, not only "N steps"; the
    neurons are those of that attribution."""
    from kn_core.attribution import AttributionParams, attribute_fact
    from kn_core.batch import NeuronSource
    from kn_core.neurons import refined_neurons

    lm = tiny()
    parsed = parse_requests(lines({"relation": "P36", "subject": "France", "kind": "suppress"}), FS)
    params = AttributionParams(steps=2, quadrature=quadrature, tolerance=0.05)
    (neurons, how, _), = resolve_neurons(lm, parsed, NeuronSource(t=0.2, p=0.5, params=params)).values()
    assert how == (f"attribution (ig, {quadrature} quadrature (2 Gauss-Legendre points per panel, completeness "
                   f"tolerance 0.05), t=0.2, p=0.5, 4 prompts)")
    prompts, _ = render_prompts(FACTS[0], REL, lm.tokenizer, lm.kind)
    assert neurons == tuple(refined_neurons([s.scores for s in attribute_fact(lm, prompts, params)], 0.2, 0.5))


def test_requests_without_neurons_or_plans_are_left_out_with_reasons():
    lm = tiny()
    parsed = parse_requests(lines({"relation": "P36", "subject": "France", "kind": "suppress", "neurons": [[0, 1]]},
                                  {"relation": "P36", "subject": "Japan", "kind": "suppress"},
                                  "{bad"), FS)
    result = run_batch(lm, parsed, {1: (((0, 1),), "explicit", None), 2: ((), "attribution (t=0.2)", None)},
                       "compound", measure_sizes=False)
    size = result.report["requests"][0]["metrics"]["edit_size"]
    assert size["neurons"] == 1 and size["activation_change"] is None and "not measured" in size["note"]
    assert result.report["applied"] == 1
    assert [x["line"] for x in result.report["left_out"]] == [2, 3]
    assert "no neurons" in result.report["left_out"][0]["reason"]


# ---------------------------------------------------------------- the CLI

@pytest.fixture(scope="module")
def saved_gpt2(tmp_path_factory):
    lm = tiny()
    folder = tmp_path_factory.mktemp("gpt2")
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    return str(folder)


def test_cli_batch_stores_metrics_and_one_history_entry_and_reuses_neurons(capsys, tmp_path, saved_gpt2):
    from kn_core.cli import main
    from kn_core.store import open_project

    requests = tmp_path / "req.jsonl"
    requests.write_text("\n".join(lines(
        {"prompt": "The capital of France is", "subject": "France", "ground_truth": "Paris", "target_new": "Rome",
         "rephrase_prompts": ["France's capital city is"], "neurons": [[2, 5], [1, 7]],
         "locality_prompts": [{"prompt": "The capital of Japan is", "ground_truth": "Tokyo"}]},
        {"relation": "P36", "subject": "Japan", "kind": "suppress"},
    )) + "\n")
    project = tmp_path / "b.knproj"
    argv = ["edit", "batch", str(requests), "--model", saved_gpt2, "--mode", "sequential", "--steps", "2",
            "--t", "0.1", "--p", "0.2", "--project", str(project), "--json"]
    assert main(argv) == 0, capsys.readouterr().err
    doc = json.loads(capsys.readouterr().out)
    assert doc["applied"] == 2 and doc["history_entry"] == 0 and len(doc["steps"]) == 2
    easy, japan = doc["requests"]
    assert easy["neurons_from"] == "explicit" and japan["neurons_from"].startswith("attribution (ig, 2 steps")
    # explicit neurons of an EasyEdit request: its rephrase is held out (generality), as EasyEdit measures it
    assert easy["prompts"]["fact"] == 1 and easy["prompts"]["held-out"] == 1 and easy["prompts"]["locality"] == 1
    assert easy["metrics"]["generality"]["n"] == 1 and easy["metrics"]["locality_prompts"]["n"] == 1
    assert japan["metrics"]["generality"]["applicable"] is False
    with open_project(project) as p:
        evaluation = p.list_evaluations("edit batch")[-1]
        assert evaluation.report["requests"][1]["metrics"] == japan["metrics"]
        state, sha = p.load_edit_history()
        assert [e["edit"]["kind"] for e in state["entries"]] == ["batch"] and state["cursor"] == 1
        assert state["entries"][0]["report"]["batch"]["evaluation_id"] == evaluation.id
    assert main(argv) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["requests"][1]["neurons_from"].startswith("project neuron set #")
    assert doc["history_entry"] == 1  # on top of the saved batch


def test_cli_batch_refuses_bad_lines_unless_skipped(capsys, tmp_path, saved_gpt2):
    from kn_core.cli import main

    requests = tmp_path / "req.jsonl"
    requests.write_text("\n".join(lines({"relation": "P36", "subject": "France", "kind": "suppress",
                                         "neurons": [[0, 1]]}, "{oops", {"relation": "P36", "subject": "Mars"})))
    argv = ["edit", "batch", str(requests), "--model", saved_gpt2, "--control-facts", "1"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "line 2: not valid JSON" in err and "line 3: no fact of P36 with subject 'Mars'" in err
    assert "error: 2 bad request(s)" in err and "--skip-bad" in err
    assert main(argv + ["--skip-bad", "--json"]) == 0
    captured = capsys.readouterr()
    doc = json.loads(captured.out)
    assert doc["applied"] == 1 and [x["line"] for x in doc["left_out"]] == [2, 3]
    assert "skipped line 2" in captured.err
    assert main(["edit", "batch", str(tmp_path / "missing.jsonl")]) == 2
    assert "REQUESTS" in capsys.readouterr().err


def test_measuring_in_chunks_gives_the_same_metrics(monkeypatch):
    import kn_core.evaluation as evaluation

    lm = tiny()
    parsed = overlapping_updates()
    whole = run_batch(lm, parsed, explicit(parsed), "compound", relation_exclusion=False)
    monkeypatch.setattr(evaluation, "MEASURE_CHUNK", 3)  # many chunk boundaries inside and between requests
    chunked = run_batch(lm, parsed, explicit(parsed), "compound", relation_exclusion=False)
    assert chunked.report["requests"] == whole.report["requests"]
