"""The subject-specificity control (kn_core/specificity.py, docs/SPECIFICITY.md): the control's scores against a
direct attribution of the swapped prompts on a tiny model, and the flag logic on synthetic arrays."""

from __future__ import annotations

import math

import numpy as np
import pytest

from kn_core import specificity as sp
from kn_core.attribution import AttributionParams, attribute
from kn_core.facts import Fact, FactSet, Relation, render_prompts
from tiny import GEOGRAPHY, TINY_CAUSAL, make_tiny

CAPITAL = Relation("P36", "capital", ("The capital of [X] is [Y].", "[X]'s capital city is [Y].",
                                      "The capital city of [X] is [Y]."))


def _factset(n: int = 8) -> FactSet:
    facts = [Fact("P36", country, capital) for country, capital, _, _ in GEOGRAPHY[:n]]
    return FactSet("tiny", {"P36": CAPITAL}, facts)


@pytest.fixture(scope="module")
def lm():
    return make_tiny(TINY_CAUSAL)


# ---------------------------------------------------------------- the rule on synthetic arrays

def test_ratio_is_the_median_over_control_prompts_of_control_over_own_score_on_the_same_template():
    own = {"a": np.array([[2.0, 1.0, -1.0]]), "b": np.array([[4.0, 1.0, 0.5]])}
    controls = [("a", np.array([[2.0, 0.1, 5.0]])), ("a", np.array([[1.0, 0.1, 5.0]])),
                ("b", np.array([[4.0, 0.2, 0.0]]))]
    per_prompt = sp.prompt_ratios(own, controls, [(7, 0), (7, 1), (7, 2)], layers=[7])
    assert per_prompt[(7, 2)] == [0.0]            # template a has u <= 0: only b's 0 / 0.5 counts
    ratios = sp.template_ratios(per_prompt)
    assert ratios[(7, 0)] == pytest.approx(1.0)   # median of 1.0, 0.5, 1.0
    assert ratios[(7, 1)] == pytest.approx(0.1)   # median of 0.1, 0.1, 0.2
    assert ratios[(7, 2)] == pytest.approx(0.0)
    assert sp.flag_template(ratios) == {(7, 0)}


def test_a_neuron_whose_effect_reverses_without_the_subject_is_judged_by_the_size_it_keeps():
    """Pushing against o without the subject is still an effect on o that does not need the subject: a neuron
    that keeps 15 times its effect, reversed, is not the fact's; one that keeps a tenth of it, reversed, is."""
    own = {"a": np.array([[1.0, 1.0, 1.0]])}
    controls = [("a", np.array([[-15.0, -0.1, -0.6]])), ("a", np.array([[-14.0, -0.2, 0.4]])),
                ("a", np.array([[2.0, 0.1, 0.7]]))]
    per_prompt = sp.prompt_ratios(own, controls, [(0, 0), (0, 1), (0, 2)], layers=[0])
    ratios, signed = sp.template_ratios(per_prompt), sp.signed_ratios(per_prompt)
    assert signed[(0, 0)] == pytest.approx(-14.0) and ratios[(0, 0)] == pytest.approx(14.0)
    assert signed[(0, 1)] == pytest.approx(-0.1) and ratios[(0, 1)] == pytest.approx(0.1)
    assert signed[(0, 2)] == pytest.approx(0.4) and ratios[(0, 2)] == pytest.approx(0.6)
    assert sp.flag_template(ratios) == {(0, 0), (0, 2)}
    assert sp.flag_template(signed) == frozenset()   # the signed median would keep all three


def test_a_stored_runs_control_ratios_read_both_formats():
    now = {"subject_control": {"ratios": [[3, 7, 14.75], [3, 8, 0.1]], "signed_ratios": [[3, 7, -14.75], [3, 8, 0.1]],
                               "template": [[3, 7]]}}
    assert sp.control_ratios(now) == {(3, 7): (14.75, -14.75), (3, 8): (0.1, 0.1)}
    assert sp.control_text(now, (3, 7)).endswith("(signed -14.75; template at >= 0.5): template")
    assert sp.control_text(now, (3, 8)).startswith("subject control: keeps 0.10 of its effect's size")
    before = {"subject_control": {"ratios": [[3, 7, -14.75]], "template": []}}  # saved before |r_c|
    assert sp.control_ratios(before) == {(3, 7): (None, -14.75)}
    assert "keeps n/a" in sp.control_text(before, (3, 7)) and "signed -14.75" in sp.control_text(before, (3, 7))
    assert sp.control_ratios(None) == {} and sp.control_text({}, (0, 0)) == "" and sp.control_text(now, (0, 0)) == ""
    unusable = {"subject_control": {"ratios": [[3, 7, None]], "signed_ratios": [[3, 7, None]], "template": []}}
    assert "no usable control prompt" in sp.control_text(unusable, (3, 7))


def test_a_neuron_without_a_usable_control_prompt_gets_no_ratio_and_no_flag():
    own = {"a": np.array([[0.0, -2.0]])}
    per_prompt = sp.prompt_ratios(own, [("a", np.array([[3.0, 3.0]])), ("zz", np.array([[3.0, 3.0]]))],
                                  [(0, 0), (0, 1)], layers=[0])
    ratios = sp.template_ratios(per_prompt)
    assert all(math.isnan(r) for r in ratios.values())
    assert all(math.isnan(r) for r in sp.signed_ratios(per_prompt).values())
    assert sp.flag_template(ratios) == frozenset()


def test_the_threshold_is_inclusive_at_one_half():
    assert sp.flag_template({(1, 1): 0.5, (1, 2): 0.4999, (1, 3): 3.0}) == {(1, 1), (1, 3)}


def test_control_subjects_are_other_subjects_with_another_object_seeded_per_fact():
    facts = [Fact("P36", "France", "Paris"), Fact("P36", "Gaul", "Paris"), Fact("P36", "France", "Lyon"),
             Fact("P36", "Germany", "Berlin"), Fact("P36", "Italy", "Rome"), Fact("P36", "Spain", "Madrid"),
             Fact("P36", "Poland", "Warsaw")]
    fs = FactSet("t", {"P36": CAPITAL}, facts)
    subjects = sp.control_subjects(fs, facts[0], k=3, seed=0)
    assert len(subjects) == 3 and len(set(subjects)) == 3
    assert not {"France", "Gaul"} & set(subjects)          # the subject itself, and one sharing the answer
    assert subjects == sp.control_subjects(fs, facts[0], k=3, seed=0)
    assert sp.control_subjects(fs, facts[0], k=10) == ["Germany", "Italy", "Spain", "Poland"]


def test_a_fact_with_too_few_other_subjects_is_not_controlled_and_says_why(lm):
    fs = _factset(2)
    fact = fs.facts[0]
    prompts, _ = render_prompts(fact, CAPITAL, lm.tokenizer, lm.kind)
    control = sp.subject_control(lm, fs, fact, prompts, [(1, 3)], AttributionParams(steps=2))
    assert not control.controlled and "only 1 other subject" in control.reason and "at least 2" in control.reason
    assert control.template == frozenset()
    summary = sp.control_summary([control])
    assert summary["not_controlled"][0]["reason"] == control.reason and summary["controlled"] == 0


# ---------------------------------------------------------------- against a slow reference

def test_attribute_layers_equals_the_same_layers_of_a_full_attribution(lm):
    fact = Fact("P36", "France", "Paris")
    prompt = render_prompts(fact, CAPITAL, lm.tokenizer, lm.kind)[0][0]
    params = AttributionParams(steps=4)
    full = attribute(lm, prompt, params)
    part = sp.attribute_layers(lm, prompt, [2, 0], params)
    assert part.layers == (0, 2)
    np.testing.assert_allclose(part.scores, full.scores[[0, 2]], rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(part.normalized, full.scores[[0, 2]] / full.prob, rtol=1e-5, atol=1e-8)
    assert part.token_probs == pytest.approx(full.token_probs)


def test_attribute_layers_refuses_a_quadrature_it_cannot_restrict(lm):
    prompt = render_prompts(Fact("P36", "France", "Paris"), CAPITAL, lm.tokenizer, lm.kind)[0][0]
    with pytest.raises(ValueError, match="Riemann"):
        sp.attribute_layers(lm, prompt, [1], AttributionParams(quadrature="gauss"))


def test_the_controls_ratios_equal_a_direct_attribution_of_the_swapped_prompts(lm):
    fs = _factset(8)
    fact = fs.facts[0]
    prompts, _ = render_prompts(fact, CAPITAL, lm.tokenizer, lm.kind)
    params = AttributionParams(steps=3)
    own = [attribute(lm, p, params) for p in prompts]
    top = np.argsort(-own[0].scores.ravel())[:4]
    candidates = sorted({tuple(int(v) for v in np.unravel_index(i, own[0].scores.shape)) for i in top})
    control = sp.subject_control(lm, fs, fact, prompts, candidates, params, seed=3)
    assert control.controlled and len(control.subjects) == 3
    assert control.prompts == 3 * len(prompts) and control.layers == sorted({l for l, _ in candidates})

    # the slow way: render each swapped prompt by hand, attribute every layer, divide by P(Paris)
    expected = {}
    for layer, index in candidates:
        ratios = []
        for subject in control.subjects:
            for p, o in zip(prompts, own):
                swapped = p.text.replace("France", subject)
                assert swapped != p.text
                full = attribute(lm, swapped, params, answer_ids=p.answer_ids)
                u = o.scores[layer, index] / o.prob
                if u > 0:
                    ratios.append((full.scores[layer, index] / full.prob) / u)
        expected[(layer, index)] = ratios
    for neuron, ratios in expected.items():
        if not ratios:
            assert math.isnan(control.ratios[neuron]) and math.isnan(control.signed[neuron])
        else:
            assert control.ratios[neuron] == pytest.approx(np.median(np.abs(ratios)), rel=1e-4, abs=1e-6)
            assert control.signed[neuron] == pytest.approx(np.median(ratios), rel=1e-4, abs=1e-6)
    assert control.template == {n for n, r in expected.items() if r and np.median(np.abs(r)) >= 0.5}
    d = control.to_dict()
    assert d["controlled"] and d["control_prompts"] == control.prompts
    assert len(d["ratios"]) == len(d["signed_ratios"]) == len(candidates)


def test_kn_neurons_subject_control_flags_template_and_lists_p_rank_known(capsys, tmp_path):
    import json

    from kn_core.cli import main

    tiny = make_tiny(TINY_CAUSAL)
    tiny.model.save_pretrained(tmp_path)
    tiny.tokenizer.save_pretrained(tmp_path)
    argv = ["neurons", "--relation", "P36", "--subject", "France", "--model", str(tmp_path), "--steps", "1",
            "--p", "0.3", "--json"]
    assert main(argv + ["--subject-control"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert {"prob", "rank_median", "rank_best", "top1_share", "known"} <= set(doc["fact"])
    control = doc["subject_control"]
    assert control["controlled"] and control["control_prompts"] > 0
    template = [tuple(n) for n in control["template"]]
    assert doc["flags"]["template"] == [list(n) for n in sorted(template)] and "template" in doc["flags"]["rule"]
    refined = [(n["layer"], n["neuron"]) for n in doc["refined"]]
    assert not set(template) & set(refined)
    assert set(refined) | set(template) == {tuple(n) for n in control["candidates"]}
    assert main(argv + ["--subject-control", "--keep-template"]) == 0
    kept = json.loads(capsys.readouterr().out)
    assert {(n["layer"], n["neuron"]) for n in kept["refined"]} == {tuple(n) for n in control["candidates"]}
    assert all(("template" in n["flags"]) == ((n["layer"], n["neuron"]) in set(template)) for n in kept["refined"])


def test_kn_edit_subject_control_leaves_template_neurons_out_of_the_edit(capsys, tmp_path):
    import json

    from kn_core.cli import main

    tiny = make_tiny(TINY_CAUSAL)
    tiny.model.save_pretrained(tmp_path)
    tiny.tokenizer.save_pretrained(tmp_path)
    common = ["--relation", "P36", "--subject", "France", "--model", str(tmp_path), "--steps", "1", "--p", "0.3",
              "--hold-out", "0", "--json"]
    assert main(["neurons", "--relation", "P36", "--subject", "France", "--model", str(tmp_path), "--steps", "1",
                 "--p", "0.3", "--subject-control", "--keep-template"]) == 0
    shown = capsys.readouterr().out
    assert "NOT known" in shown and "the model does not know this fact: its neurons push the answer's type" in shown
    judged = [line for line in shown.splitlines() if "of its effect's size without the subject" in line]
    assert judged and all(line.endswith((": template", ": subject-specific")) for line in judged)
    assert main(["edit", "amplify", *common, "--subject-control", "--keep-template"]) == 0
    kept = json.loads(capsys.readouterr().out)
    control = kept["subject_control"]
    assert control["controlled"] and kept["keep_template"] is True
    edited = {(n["layer"], n["neuron"]) for n in kept["neurons"]}
    assert edited == {tuple(n) for n in control["candidates"]}
    template = {tuple(n) for n in control["template"]}
    assert template, "a random tiny model knows nothing: the control should flag some neuron"
    if template == edited:  # every neuron flagged: the edit without them has nothing to edit and says so
        assert main(["edit", "amplify", *common, "--subject-control"]) == 2  # a CliError
        error = json.loads(capsys.readouterr().out)["error"]
        assert f"the subject control flagged all {len(template)} as template neurons (--keep-template" in error
    else:
        assert main(["edit", "amplify", *common, "--subject-control"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert {(n["layer"], n["neuron"]) for n in out["neurons"]} == edited - template


def test_the_control_scores_a_non_riemann_run_with_the_riemann_sum():
    """One rule for every front end (kn neurons, kn edit, kn reproduce, the app): the control compares scores of
    one kind, so another quadrature is controlled with the paper's Riemann sum, its seed kept."""
    from kn_core.attribution import AttributionParams
    from kn_core.specificity import riemann_params

    riemann = AttributionParams(steps=7, seed=2)
    assert riemann_params(riemann) is riemann and riemann_params(None) is None
    assert riemann_params(AttributionParams(quadrature="gauss", seed=5)) == AttributionParams(seed=5)


def test_a_controlled_run_stored_by_kn_neurons_is_reported_with_its_template_neurons_left_out(capsys, tmp_path):
    """`kn neurons --subject-control --project` keeps the control with its run (where the app keeps it), so the
    project report selects the refined set as the command did and counts the template neurons; --keep-template is
    recorded and keeps them in."""
    import json

    from kn_core.cli import main
    from kn_core.report.build import render_markdown, report_data
    from kn_core.report.document import read_project

    tiny = make_tiny(TINY_CAUSAL)
    tiny.model.save_pretrained(tmp_path)
    tiny.tokenizer.save_pretrained(tmp_path)
    for keep in (False, True):
        project = str(tmp_path / f"controlled-{keep}.knproj")
        argv = ["neurons", "--relation", "P36", "--subject", "France", "--model", str(tmp_path), "--steps", "1",
                "--json", "--subject-control", "--project", project]  # the report's t and p: the defaults
        assert main(argv + (["--keep-template"] if keep else [])) == 0
        doc = json.loads(capsys.readouterr().out)
        template = sorted(tuple(n) for n in doc["subject_control"]["template"])
        assert template, "a random tiny model knows nothing: the control should flag some neuron"
        data = report_data(read_project(project))
        (run,) = data["runs"]
        assert sorted(map(tuple, run["refined"])) == sorted((n["layer"], n["neuron"]) for n in doc["refined"])
        assert run["subject_control"]["template"] == [list(n) for n in template]
        assert run["subject_control"]["left_out"] is (not keep)
        text = render_markdown(data)
        assert (f"1 of 1 runs controlled; {len(template)} of {len(doc['subject_control']['candidates'])} candidate "
                f"neurons flagged template, {0 if keep else len(template)} of them left out") in text
        assert ("kept (--keep-template)" in text) is keep
