"""The `kn` command: JSON on stdout, one-line errors, the real loading code on saved tiny models."""

import json

import pytest

from kn_core.cli import main
from tiny import make_tiny


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folders = {}
    for family in ("bert", "gpt2"):
        lm = make_tiny(family)
        folder = tmp_path_factory.mktemp(family)
        lm.model.save_pretrained(folder)
        lm.tokenizer.save_pretrained(folder)
        folders[family] = str(folder)
    folders["project"] = tmp_path_factory.mktemp("project") / "cli.knproj"
    return folders


def test_model_info_from_a_folder(capsys, saved):
    code, out, _ = run(capsys, "model", "info", "--model", saved["bert"], "--json")
    info = strict(out)
    assert code == 0 and info["family"] == "bert" and info["kind"] == "masked"
    assert (info["layers"], info["neurons"]) == (3, 72) and len(info["sha256"]) == 64


def test_predict_masked_needs_a_mask(capsys, saved):
    code, out, err = run(capsys, "predict", "The capital of France is Paris .", "--model", saved["bert"], "--json")
    assert code == 2 and "mask" in strict(out)["error"]
    assert err.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in err
    code, out, _ = run(capsys, "predict", "The capital of France is [MASK] .", "--model", saved["bert"], "--json",
                       "--top", "3", "--project", str(saved["project"]))
    assert code == 0 and len(strict(out)["predictions"]) == 3
    code, out, _ = run(capsys, "project", "info", str(saved["project"]), "--json")
    assert strict(out)["counts"]["evaluations"] == 1


@pytest.mark.parametrize("argv,needle", [
    (["model", "info", "--model", "/nonexistent/folder/xyz"], "Hugging Face"),
    (["predict", "", "--model", "default"], "empty"),
    (["neurons", "--relation", "P999", "--subject", "France"], "no relation"),
    (["neurons", "--relation", "P36", "--subject", "Atlantis"], "no fact"),
    (["facts", "list", "--facts", "/nonexistent.csv"], "no such file"),
])
def test_bad_input_is_one_line(capsys, argv, needle):
    code, _, err = run(capsys, *argv)
    assert code == 2 and needle in err and "Traceback" not in err


def test_folder_that_is_not_a_model(capsys, tmp_path):
    code, _, err = run(capsys, "model", "info", "--model", str(tmp_path))
    assert code == 2 and "not a model" in err


def test_unsupported_family_names_supported_ones(capsys, tmp_path):
    from transformers import AlbertConfig

    AlbertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                 intermediate_size=16, embedding_size=8).save_pretrained(tmp_path)
    code, _, err = run(capsys, "model", "info", "--model", str(tmp_path))
    assert code == 2 and "albert" in err and "llama" in err and "bert" in err


def test_attribute_json_and_project(capsys, saved, tmp_path):
    project = tmp_path / "p.knproj"
    code, out, _ = run(capsys, "attribute", "--prompt", "The capital of France is", "--answer", " Paris",
                       "--model", saved["gpt2"], "--steps", "4", "--json", "--project", str(project),
                       "--save", str(tmp_path / "s.npz"))
    doc = strict(out)
    assert code == 0 and doc["layers"] == 3 and doc["neurons"] == 72
    assert all(n["score"] > 0.2 * doc["max"] for n in doc["coarse"]) and len(doc["completeness"]) == 3
    code, out, _ = run(capsys, "project", "info", str(project), "--json")
    assert strict(out)["counts"]["runs"] == 1


def test_neuron_sign_and_calibrated_update(capsys, saved):
    from kn_core import evaluation as ev
    from kn_core.models import load_model

    code, out, _ = run(capsys, "neuron", "--layer", "1", "--index", "2", "--model", saved["gpt2"], "--sign", "auto",
                       "--prompt", "The capital of France is", "--prompt", "France", "--json")
    doc = json.loads(out)
    lm = load_model(saved["gpt2"], device="cpu")
    expect = ev.activation_sign(lm, 1, 2, ["The capital of France is", "France"])
    assert code == 0 and doc["sign"] == expect and doc["labels"]["promotes"].startswith("promotes")
    code, _, err = run(capsys, "neuron", "--layer", "1", "--index", "2", "--model", saved["gpt2"], "--sign", "auto")
    assert code == 2 and "--prompt" in err and len(err.strip().splitlines()) == 1
    code, out, _ = run(capsys, "edit", "update", "--relation", "P36", "--subject", "France", "--new-object", "Berlin",
                       "--model", saved["gpt2"], "--steps", "2", "--p", "0.3", "--strength", "calibrated", "--json")
    doc = json.loads(out)
    cal = doc["calibration"]
    assert code == 0 and cal["lambda2"] == pytest.approx(8.0 * cal["scale"]) and doc["edit"]["lambda2"] == cal["lambda2"]
    assert cal["reached"] == (doc["success_rate"] == 1.0)


@pytest.mark.default_model
def test_default_model_predicts_paris(capsys):
    code, out, _ = run(capsys, "predict", "The capital of France is", "--json")
    assert code == 0 and strict(out)["predictions"][0]["token"] == " Paris"


@pytest.mark.default_model
def test_default_model_knows_most_capitals(capsys):
    code, out, _ = run(capsys, "facts", "check", "--relation", "P36", "--json")
    doc = strict(out)
    assert code == 0 and doc["facts_known"] >= doc["facts"] / 2


@pytest.mark.default_model
def test_default_model_refined_neurons_of_france(capsys):
    code, out, _ = run(capsys, "neurons", "--relation", "P36", "--subject", "France", "--json")
    doc = strict(out)
    assert code == 0 and doc["refined"], doc
    # knowledge neurons concentrate in the top layers (paper, Figure 3)
    assert sum(n["layer"] >= 15 for n in doc["refined"]) * 2 > len(doc["refined"])


@pytest.mark.default_model
def test_default_model_sign_aware_update_reverses_negatively_active_neurons(capsys):
    argv = ["edit", "update", "--relation", "P36", "--subject", "Japan", "--new-object", "Berlin", "--steps", "4",
            "--json"]
    code, out, _ = run(capsys, *argv)
    paper = strict(out)
    code2, out2, _ = run(capsys, *argv, "--sign-aware")
    ours = strict(out2)
    assert code == code2 == 0 and paper["flipped"] == [] and paper["edit"]["flipped"] == []
    # SmolLM2's gated FFN: some of the fact's knowledge neurons are negatively active on its prompts
    assert ours["flipped"] and all(n in ours["neurons"] for n in ours["flipped"])
    assert ours["edit"]["flipped"] == [[n["layer"], n["neuron"]] for n in ours["flipped"]]
    assert ours["neurons"] == paper["neurons"] and ours["after"] != paper["after"]


def strict(text: str):
    """json.loads that refuses NaN/Infinity (Python's json accepts them; JSON does not)."""
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def test_jsonio_writes_non_finite_numbers_as_null_with_a_note():
    import math

    import numpy as np

    from kn_core.jsonio import dumps

    doc = strict(dumps({"p": math.nan, "after": [0.5, math.inf, np.float32("nan")], "n": np.int64(3),
                        "inner": {"x": -math.inf}, "ok": np.arange(2)}))
    assert doc["p"] is None and doc["p_note"] == "NaN"
    assert doc["after"] == [0.5, None, None] and "[1]=Infinity" in doc["after_note"] and "[2]=NaN" in doc["after_note"]
    assert doc["n"] == 3 and doc["inner"] == {"x": None, "x_note": "-Infinity"} and doc["ok"] == [0, 1]
    assert strict(dumps({"a": 1.5, "b": "x"})) == {"a": 1.5, "b": "x"}  # finite data: plain json.dumps


@pytest.mark.parametrize("kind", ["suppress", "amplify", "update", "erase"])
def test_edit_commands_build_through_edit_plan_and_print_strict_json(capsys, saved, kind):
    argv = ["edit", kind, "--relation", "P36", "--model", saved["gpt2"], "--steps", "2", "--t", "0.1", "--p", "0.2",
            "--json"]
    if kind != "erase":
        argv += ["--subject", "France"]
    if kind == "update":
        argv += ["--new-object", "Berlin", "--relation-facts", "1"]
    if kind == "erase":
        argv += ["--max-facts", "2", "--control-facts", "2", "--k", "3"]
    code, out, err = run(capsys, *argv)
    doc = strict(out)
    assert code == 0, err
    assert doc["edit"]["kind"] == kind and [[n["layer"], n["neuron"]] for n in doc["neurons"]] == doc["edit"]["neurons"]
    assert doc["prompt_groups"]["fact"] and set(doc["groups"]) == {"edit", "control"}
    assert doc["groups"]["edit"]["fact"]["n"] == len(doc["prompt_groups"]["fact"])
    if kind == "update":
        assert doc["prompts"] == doc["prompt_groups"]["fact"] and len(doc["after"]["new"]) == len(doc["prompts"])
        assert doc["success_rate"] == doc["groups"]["edit"]["success_rate"]
    if kind in ("suppress", "amplify"):
        assert doc["prompts"] == doc["prompt_groups"]["fact"]
        assert doc["relative_change"] == pytest.approx(doc["groups"]["edit"]["fact"]["relative_change"])


@pytest.mark.parametrize("kind", ["suppress", "update", "erase"])
def test_edit_leaves_out_flagged_neurons_as_kn_neurons_does(capsys, saved, monkeypatch, kind):
    """An edit never rests on a massive neuron unless --keep-massive: the flagged neuron is left out of the
    knowledge neurons (and of the edit), named in `flagged_excluded`, and kept with --keep-massive."""
    import kn_core.neurons as kn_neurons

    argv = ["edit", kind, "--relation", "P36", "--model", saved["gpt2"], "--steps", "2", "--t", "0.1", "--p", "0.2",
            "--json"]
    argv += ["--max-facts", "2", "--control-facts", "2", "--k", "3"] if kind == "erase" else ["--subject", "France"]
    if kind == "update":
        argv += ["--new-object", "Berlin"]
    code, out, err = run(capsys, *argv, "--keep-massive")
    kept = strict(out)
    assert code == 0, err
    assert kept["flagged_excluded"] == [] and kept["keep_massive"] is True
    target = tuple(kept["edit"]["neurons"][0])
    real = kn_neurons.run_flags
    monkeypatch.setattr(kn_neurons, "run_flags", lambda lm, acts, *a, **k: kn_neurons.NeuronFlags(
        massive=frozenset({target}), unspecific=frozenset(), rule=real(lm, acts, *a, **k).rule))
    code, out, err = run(capsys, *argv)
    doc = strict(out)
    assert code == 0, err
    assert doc["flagged_excluded"] == [{"layer": target[0], "neuron": target[1]}] and doc["keep_massive"] is False
    assert list(target) not in doc["edit"]["neurons"]
    control = doc["control"].get("edit", {}).get("neurons") or [[n["layer"], n["neuron"]]
                                                                 for n in doc["control"].get("neurons", [])]
    assert kind == "erase" or (control and list(target) not in control)
    assert "massive neurons left out" in err
    code, out, err = run(capsys, *argv, "--keep-massive")
    assert code == 0 and list(target) in strict(out)["edit"]["neurons"]


@pytest.mark.parametrize("kind", ["suppress", "amplify", "update", "erase", "batch"])
def test_edit_verbs_find_neurons_with_the_quadrature_asked_for(capsys, saved, monkeypatch, tmp_path, kind):
    """--quadrature/--tolerance reach the attribution that finds the neurons to edit, and --json reports them
    (neuron_params, as kn edit batch reports its own); without them it is the paper's Riemann sum."""
    import kn_core.attribution as attribution

    seen, real = [], attribution.attribute_fact
    monkeypatch.setattr(attribution, "attribute_fact",
                        lambda lm, prompts, params, **kw: seen.append(params) or real(lm, prompts, params, **kw))
    argv = ["edit", kind, "--model", saved["gpt2"], "--t", "0.1", "--p", "0.2", "--json"]
    if kind == "batch":
        requests = tmp_path / "req.jsonl"
        requests.write_text(json.dumps({"relation": "P36", "subject": "Japan", "kind": "suppress"}) + "\n")
        argv[2:2] = [str(requests)]
        argv += ["--control-facts", "1"]
    else:
        argv += ["--relation", "P36"]
        argv += ["--max-facts", "2", "--control-facts", "2", "--k", "3"] if kind == "erase" else ["--subject", "France"]
    if kind == "update":
        argv += ["--new-object", "Berlin"]
    code, out, err = run(capsys, *argv, "--quadrature", "gauss", "--steps", "2", "--tolerance", "0.05")
    assert code == 0, err
    assert seen and all((p.quadrature, p.steps, p.tolerance) == ("gauss", 2, 0.05) for p in seen)
    reported = strict(out)["neuron_params"]
    assert (reported["t"], reported["p"], reported["quadrature"], reported["steps"], reported["tolerance"]) == \
        (0.1, 0.2, "gauss", 2, 0.05)
    seen.clear()
    code, out, err = run(capsys, *argv)
    assert code == 0, err
    assert seen and all((p.quadrature, p.steps) == ("riemann", 20) for p in seen)
    reported = strict(out)["neuron_params"]
    assert reported["steps"] == 20 and "quadrature" not in reported and "tolerance" not in reported


@pytest.mark.parametrize("kind", ["suppress", "amplify"])
def test_edit_activation_evaluates_the_fact_once_per_model_state(capsys, saved, monkeypatch, kind):
    """kn edit suppress|amplify read their top-level before/after/relative_change/flip_rate (and the control's)
    off the measured "fact" group: the fact's prompts are evaluated once unedited, once with the edit and once
    with the control (it was 7 times), and the figures equal an evaluation made here on their own."""
    import numpy as np

    import kn_core.evaluation as ev

    plans, calls, real_probs = _record_plans_and_evaluations(monkeypatch)
    code, out, err = run(capsys, "edit", kind, "--relation", "P36", "--subject", "France", "--model", saved["gpt2"],
                         "--steps", "2", "--t", "0.1", "--p", "0.2", "--json")
    assert code == 0, err
    doc = strict(out)
    (lm, plan), = plans
    prompts = plan.prompts["fact"]
    assert doc["prompts"] == [p.text for p in prompts] and _times_evaluated(calls, prompts) == 3
    before = real_probs(lm, prompts)
    for key, edit in (("edit", plan.edit), ("control", plan.control)):
        after = ev.with_edits(lm, [edit], lambda: real_probs(lm, prompts))
        pb, pa = [r["prob"] for r in before], [r["prob"] for r in after]
        got = doc if key == "edit" else doc["control"]
        if key == "edit":
            assert got["before"] == pb
        assert got["after"] == pa
        assert got["relative_change"] == pytest.approx((sum(pa) - sum(pb)) / sum(pb), rel=1e-12)
        assert got["flip_rate"] == sum(b["top1_id"] != a["top1_id"] for b, a in zip(before, after)) / len(prompts)
    assert np.isfinite(doc["relative_change"])


def _record_plans_and_evaluations(monkeypatch):
    """Every plan `plan_edit` builds (with its model) and every list of prompts `answer_probabilities` scores,
    as (text, answer) pairs (an update's new-object prompts share the fact's texts)."""
    import kn_core.edit_plan as edit_plan
    import kn_core.evaluation as ev

    plans, calls = [], []
    real_plan, real_probs = edit_plan.plan_edit, ev.answer_probabilities

    def plan_edit(lm, *args, **kwargs):
        plans.append((lm, real_plan(lm, *args, **kwargs)))
        return plans[-1][1]

    monkeypatch.setattr(edit_plan, "plan_edit", plan_edit)
    monkeypatch.setattr(ev, "answer_probabilities", lambda lm, prompts, *a, **k: calls.append(
        [(p.text, p.answer) for p in prompts]) or real_probs(lm, prompts, *a, **k))
    return plans, calls, real_probs


def _pairs(prompts) -> list:
    return [(p.text, p.answer) for p in prompts]


def _times_evaluated(calls, prompts) -> int:
    """How many calls scored `prompts` (as one run of rows: the measurement batches a plan's groups together)."""
    want, n = _pairs(prompts), len(prompts)
    return sum(any(call[i:i + n] == want for i in range(len(call) - n + 1)) for call in calls)


def test_edit_update_evaluates_each_prompt_once_per_model_state(capsys, saved, monkeypatch):
    """kn edit update reads its top-level before/after, top-1, change and success rates off the measured "fact"
    and "new object" groups: each is evaluated once unedited, once with the update and once with the control
    (it was 5 times), and the figures equal an evaluation made here on its own."""
    import numpy as np

    import kn_core.evaluation as ev

    plans, calls, real_probs = _record_plans_and_evaluations(monkeypatch)
    code, out, err = run(capsys, "edit", "update", "--relation", "P36", "--subject", "France", "--new-object", "Berlin",
                         "--model", saved["gpt2"], "--steps", "2", "--t", "0.1", "--p", "0.2", "--json")
    assert code == 0, err
    doc = strict(out)
    (lm, plan), = plans
    own, new = plan.prompts["fact"], plan.prompts["new object"]
    assert own and new and doc["prompts"] == [p.text for p in own]
    assert _times_evaluated(calls, own) == 3 and _times_evaluated(calls, new) == 3
    before_old, before_new = real_probs(lm, own, top_k=5), real_probs(lm, new, top_k=5)
    after_old, after_new = ev.with_edits(lm, [plan.edit], lambda: (real_probs(lm, own), real_probs(lm, new)))
    assert doc["before"] == {"old": [r["prob"] for r in before_old], "new": [r["prob"] for r in before_new]}
    assert doc["after"] == {"old": [r["prob"] for r in after_old], "new": [r["prob"] for r in after_new]}
    assert doc["top1_after"] == [r["top1_token"] for r in after_old]
    assert doc["change_rate"] == np.mean([a["top1_id"] != b["top1_id"] for a, b in zip(after_old, before_old)])
    assert doc["success_rate"] == np.mean([r["correct"] for r in after_new])


def test_edit_erase_evaluates_each_prompt_once_per_model_state(capsys, saved, monkeypatch):
    """kn edit erase reads its accuracies and perplexities (the edit's and the control's) off the measured "fact"
    and "other relations" groups: each is evaluated once per model state (the relation's prompts were evaluated 9
    times), and the figures equal `answer_perplexity` and an accuracy computed here on their own."""
    import numpy as np

    import kn_core.evaluation as ev

    plans, calls, real_probs = _record_plans_and_evaluations(monkeypatch)
    code, out, err = run(capsys, "edit", "erase", "--relation", "P36", "--max-facts", "2", "--control-facts", "2",
                         "--k", "3", "--model", saved["gpt2"], "--steps", "2", "--t", "0.1", "--p", "0.2", "--json")
    assert code == 0, err
    doc = strict(out)
    (lm, plan), = plans
    own, other = plan.prompts["fact"], plan.prompts["other relations"]
    assert own and other
    assert _times_evaluated(calls, own) == 3 and _times_evaluated(calls, other) == 3
    monkeypatch.setattr(ev, "answer_probabilities", real_probs)

    def figures():
        return {"accuracy": np.mean([r["correct"] for r in real_probs(lm, own)]),
                "perplexity": ev.answer_perplexity(lm, own),
                "other_accuracy": np.mean([r["correct"] for r in real_probs(lm, other)]),
                "other_perplexity": ev.answer_perplexity(lm, other)}

    assert doc["before"] == figures()
    assert doc["after"] == ev.with_edits(lm, [plan.edit], figures)
    assert doc["control"] == {"kind": "random neurons from the same layers",
                              **ev.with_edits(lm, [plan.control], figures)}
    assert doc["after"] != doc["before"]


def test_trace_json_project_export_and_figure(capsys, saved, tmp_path):
    project, figure = tmp_path / "trace.knproj", tmp_path / "trace.png"
    code, out, err = run(capsys, "trace", "--prompt", "The capital of New Zealand is", "--subject-text", "New Zealand",
                         "--answer", " Wellington", "--model", saved["gpt2"], "--samples", "2", "--json",
                         "--project", str(project), "--out", str(figure))
    doc = strict(out)
    assert code == 0, err
    assert doc["subject_span"] == [3, 5] and doc["params"]["samples"] == 2 and set(doc["kinds"]) == {"residual",
                                                                                                    "mlp", "attn"}
    assert len(doc["kinds"]["mlp"]["restored"]) == len(doc["tokens"]) == 6
    assert figure.stat().st_size > 1000
    code, out, _ = run(capsys, "project", "export", str(project), "--out", str(tmp_path / "export"))
    assert code == 0
    stored = json.loads((tmp_path / "export" / "evaluations.json").read_text())
    assert [e["kind"] for e in stored] == ["trace"]
    assert stored[0]["report"]["kinds"]["mlp"]["restored"] == doc["kinds"]["mlp"]["restored"]
    code, out, err = run(capsys, "trace", "--relation", "P36", "--subject", "France", "--model", saved["bert"],
                         "--kind", "mlp", "--samples", "1", "--window", "2")
    assert code == 0 and "MLP output" in out and "France" in out, err


@pytest.mark.default_model
def test_kn_facts_check_counts_known_facts_by_the_one_known_rule(capsys, monkeypatch):
    """`kn facts check` says "known" as every other front end does (kn_core.experiments.knows): top-1 on more
    than half of the prompts (half is not enough) and the answer not part of the subject's name."""
    from kn_core import evaluation
    from kn_core.experiments import answer_in_name
    from kn_core.facts import Fact

    def first_half(lm, prompts, *args, **kwargs):  # the first half of each fact's prompts top-1 (rounded down)
        return [{"correct": k < len(prompts) // 2, "prob": 0.5, "rank": 1} for k in range(len(prompts))]

    monkeypatch.setattr(evaluation, "answer_probabilities", first_half)
    code, out, _ = run(capsys, "facts", "check", "--relation", "P36", "--json")
    facts = json.loads(out)["relations"][0]["facts"]
    assert code == 0 and facts and not any(f["known"] for f in facts)  # at most half: never known
    assert any(f["prompts"] % 2 == 0 and f["correct"] * 2 == f["prompts"] for f in facts)
    monkeypatch.setattr(evaluation, "answer_probabilities", lambda lm, prompts, *a, **k: [
        {"correct": True, "prob": 0.9, "rank": 1} for _ in prompts])
    code, out, _ = run(capsys, "facts", "check", "--relation", "P36", "--json")
    facts = json.loads(out)["relations"][0]["facts"]
    assert all(f["known"] == (not answer_in_name(Fact("P36", f["subject"], f["object"]))) for f in facts)
