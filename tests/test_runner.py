"""kn_core.runner: a whole fact set into a project, every fact once, resumable, against an independent
reference (attribute_fact + run_flags + refined_neurons per fact, as `kn neurons` computes them)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from kn_core.attribution import AttributionParams, attribute_fact
from kn_core.cli import main
from kn_core.fact_files import export_facts
from kn_core.facts import Relation, render_prompts
from kn_core.models import load_model
from kn_core.neurons import refined_neurons, run_flags
from kn_core.runner import (NonFiniteRunError, SerialBackend, attribute_each, attribute_factset, plan_facts,
                            prompt_params, run_params)
from kn_core.selection import NeuronSelection
from kn_core.store import create_project, open_project
from kn_core.tasks import Cancelled, Task
from runner_child import tiny_factset, save_tiny

HERE = Path(__file__).resolve().parent
PARAMS = AttributionParams(steps=8)


pytestmark = pytest.mark.usefixtures("one_cpu_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("runner")
    model = save_tiny(root / "model")
    facts = export_facts(tiny_factset(), root / "facts.jsonl")
    return {"root": root, "model": model, "facts": str(facts), "lm": load_model(model, device="cpu")}


@pytest.fixture(scope="module")
def reference(setup):
    """Each usable fact attributed on its own, the way `kn neurons` does it."""
    lm, factset = setup["lm"], tiny_factset()
    out = {}
    for fact in factset.facts:
        prompts, _ = render_prompts(fact, factset.relation(fact.relation), lm.tokenizer, lm.kind)
        if prompts:
            results = attribute_fact(lm, prompts, PARAMS)
            flags = run_flags(lm, [r.activations for r in results])
            out[fact.subject] = (results, refined_neurons([r.scores for r in results], 0.2, 0.7, flags.excluded))
    return out


def stored_facts(project) -> dict:
    """{subject: (done run, [scores per prompt], refined neurons of that run)}; asserts one done run per fact."""
    facts = {f.id: f.subject for f in project.list_facts()}
    done = [r for r in project.list_runs(status="done")]
    per_fact = Counter(facts[r.fact_id] for r in done)
    assert all(n == 1 for n in per_fact.values()), per_fact
    sets = {s.run_ids[0]: s for s in project.list_neuron_sets(kind="refined")}
    return {facts[r.fact_id]: (r, project.load_scores(r.id), sets[r.id].neurons) for r in done}


def assert_matches(project, reference):
    got = stored_facts(project)
    assert set(got) == set(reference)
    for subject, (results, refined) in reference.items():
        run, scores, neurons = got[subject]
        assert run.n_prompts == run.n_done == len(results)
        for k, result in enumerate(results):
            assert np.array_equal(scores[k], result.scores), (subject, k)  # bitwise: same code, same order
        assert list(neurons) == list(refined), subject


def test_plan_lists_facts_without_a_usable_prompt(setup):
    lm = setup["lm"]
    works, skipped = plan_facts(tiny_factset(), "all", lm.tokenizer, lm.kind)
    assert [w.fact.subject for w in works] == ["France", "Germany", "Italy", "Spain", "Japan", "Egypt"]
    assert all(len(w.prompts) == 5 for w in works)
    assert [s.fact.subject for s in skipped] == ["Peru"]
    assert "no usable prompt" in skipped[0].reason and "[Y] comes first" in skipped[0].reason
    works, skipped = plan_facts(tiny_factset(), "P1376", lm.tokenizer, lm.kind)
    assert works == [] and len(skipped) == 1
    with pytest.raises(KeyError, match="no relation P999"):
        plan_facts(tiny_factset(), "P36,P999", lm.tokenizer, lm.kind)


def test_whole_fact_set_matches_one_fact_at_a_time_and_resumes(setup, reference, tmp_path):
    messages = []
    task = Task(on_progress=lambda fraction, message: messages.append((fraction, message)))
    with create_project(tmp_path / "p.knproj") as project:
        report = attribute_factset(project, setup["lm"], tiny_factset(), PARAMS, task=task)
        assert (report.facts, report.attributed, report.already_stored, report.prompts) == (7, 6, 0, 30)
        assert [s.fact.subject for s in report.skipped] == ["Peru"]
        assert_matches(project, reference)
        again = attribute_factset(project, setup["lm"], tiny_factset(), PARAMS)
        assert (again.attributed, again.already_stored, again.run_ids) == (0, 6, [])
        other = attribute_factset(project, setup["lm"], tiny_factset(), AttributionParams(steps=4), relations="P36")
        assert other.attributed == 6  # other parameters: not the same result, so attributed anew
    fractions = [f for f, _ in messages if f is not None]
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)
    assert "6/6 facts" in messages[-1][1] and "facts/h" in messages[-1][1] and "ETA" in messages[-1][1]


def test_cancel_keeps_what_was_stored_and_a_rerun_finishes(setup, reference, tmp_path):
    task = Task()
    with create_project(tmp_path / "p.knproj") as project:
        with pytest.raises(Cancelled):
            attribute_factset(project, setup["lm"], tiny_factset(), PARAMS, task=task,
                              on_fact=lambda work, run_id: work.index == 1 and task.cancel())
        assert len(project.list_runs(status="done")) == 2
        report = attribute_factset(project, setup["lm"], tiny_factset(), PARAMS)
        assert (report.attributed, report.already_stored) == (4, 2)
        assert_matches(project, reference)


def test_a_killed_driver_resumes_without_storing_a_fact_twice(setup, tmp_path):
    path = tmp_path / "p.knproj"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), str(HERE)]), "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen([sys.executable, str(HERE / "runner_child.py"), setup["model"], setup["facts"], str(path),
                              "20"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        lines = [child.stdout.readline() for _ in range(2)]
        assert all(line.startswith("stored") for line in lines), (lines, child.stderr.read() if child.poll() else "")
    finally:
        child.kill()
        child.wait()
    lm = setup["lm"]
    with open_project(path) as project:
        assert 2 <= len(project.list_runs(status="done")) < 6
        report = attribute_factset(project, lm, tiny_factset(), AttributionParams())
        assert report.attributed + report.already_stored == 6 and report.already_stored >= 2
        got = stored_facts(project)
    with create_project(tmp_path / "serial.knproj") as serial:
        attribute_factset(serial, lm, tiny_factset(), AttributionParams())
        want = stored_facts(serial)
    assert set(got) == set(want)
    for subject in want:
        assert all(np.array_equal(got[subject][1][k], want[subject][1][k]) for k in want[subject][1])
        assert got[subject][2] == want[subject][2]


def test_attribute_each_is_the_same_attribution_without_a_project(setup, reference):
    lm, factset = setup["lm"], tiny_factset()
    items = [(f, render_prompts(f, factset.relation("P36"), lm.tokenizer, lm.kind)[0]) for f in factset.facts_of("P36")]
    seen, chunks = [], []
    out = attribute_each(lm, items, PARAMS, on_prompt=lambda i, k, r: seen.append((i, k)),
                         on_chunk=lambda i, c: chunks.append(i))
    assert seen == [(i, k) for i in range(6) for k in range(5)] and sorted(set(chunks)) == list(range(6))
    for (fact, _), results in zip(items, out):
        assert all(np.array_equal(a.scores, b.scores) for a, b in zip(results, reference[fact.subject][0]))


def test_cli_attributes_a_fact_set_and_resumes(setup, capsys, tmp_path):
    argv = ["attribute", "--facts", setup["facts"], "--model", setup["model"], "--device", "cpu",
            "--project", str(tmp_path / "cli.knproj"), "--steps", "8", "--scores", "top", "--json"]
    assert main(argv) == 0
    doc = json.loads(capsys.readouterr().out)
    assert (doc["attributed"], doc["already_stored"], doc["prompts"]) == (6, 0, 30)
    assert doc["skipped"][0]["subject"] == "Peru" and "[Y] comes first" in doc["skipped"][0]["reason"]
    assert doc["score_storage"]["form"] == "top" and doc["backend"]["backend"] == "serial"
    assert doc["facts_per_hour"] > 0 and doc["params"]["steps"] == 8 and doc["causal_templates"] == "prefix"
    assert main(argv[:-1]) == 0
    text = capsys.readouterr().out
    assert text.startswith("0 fact(s) attributed") and "6 stored before" in text and "skipped P1376 'Peru'" in text
    with open_project(tmp_path / "cli.knproj", read_only=True) as project:  # compact: top scores, no activations
        runs = [project.get_run(r.id) for r in project.list_runs(status="done")]
        assert len(runs) == 6 and all(p.arrays == ("scores",) for r in runs for p in r.prompts)
        assert len(project.load_top_scores(runs[0].id)) == 5
    assert main([*argv[:-1], "--causal-templates", "end-only", "--relations", "P36"]) == 0  # another rendering
    assert capsys.readouterr().out.startswith("6 fact(s) attributed (30 prompts)")


@pytest.mark.parametrize("extra,needle", [
    (["--prompt", "The capital of France is"], "--prompt is for one prompt"),
    (["--workers", "2"], "add --cluster ray"),
    (["--cluster", "spark"], "--cluster"),
    (["--cluster", "ray:"], "ray:ADDRESS"),
    (["--relations", "P999"], "no relation P999"),
])
def test_cli_bad_fact_set_options_fail_before_the_model_loads(setup, capsys, tmp_path, extra, needle):
    argv = ["attribute", "--facts", setup["facts"], "--model", "/nonexistent", "--project", str(tmp_path / "x.knproj")]
    assert main(argv + extra) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err and not (tmp_path / "x.knproj").exists()


def test_cli_one_prompt_or_a_fact_set(capsys):
    assert main(["attribute", "--model", "/nonexistent"]) == 2
    assert "--prompt and --answer" in capsys.readouterr().err
    assert main(["attribute", "--facts", "builtin", "--model", "/nonexistent"]) == 2
    assert "--project" in capsys.readouterr().err


def test_serial_backend_describes_itself():
    assert SerialBackend().describe() == {"backend": "serial", "workers": 1}
    assert NeuronSelection().to_dict() == {"t": 0.2, "p": 0.7, "keep_massive": False}


def test_a_run_cut_off_mid_fact_is_attributed_again(setup, reference, tmp_path):
    lm, factset = setup["lm"], tiny_factset()
    path = tmp_path / "p.knproj"
    with create_project(path) as project:  # what a driver killed while storing France leaves
        france = factset.facts[0]
        prompts, _ = render_prompts(france, factset.relation("P36"), lm.tokenizer, lm.kind)
        run = project.start_run(fact=france, prompts=prompts, params=PARAMS, model=lm)
        project.add_prompt_result(run, 0, reference["France"][0][0])
    with open_project(path) as project:
        assert project.get_run(run).status == "interrupted"
        report = attribute_factset(project, lm, factset, PARAMS)
        assert report.attributed == 6
        assert_matches(project, reference)
        assert project.get_run(run).status == "interrupted"  # kept, as every interrupted run


def test_storing_a_fact_is_one_commit(setup, tmp_path):
    """Each fact's run, its prompts' scores, its done status and its refined set commit together: one commit per
    fact (it was 3 + one per prompt), counted on the project's engine (the first fact's count also has the
    run's set-up: the model, the facts, what is already stored)."""
    from sqlalchemy import event

    commits, per_fact = [], []
    with create_project(tmp_path / "p.knproj") as project:
        event.listen(project._db._engine, "commit", lambda conn: commits.append(1))
        before = len(commits)

        def stored(work, run_id):
            nonlocal before
            per_fact.append(len(commits) - before)
            before = len(commits)

        attribute_factset(project, setup["lm"], tiny_factset(), AttributionParams(steps=2), on_fact=stored)
        assert len(project.list_neuron_sets(kind="refined")) == 6
    assert per_fact[1:] == [1] * 5


def test_a_driver_killed_mid_store_leaves_no_half_stored_fact(setup, tmp_path):
    """A driver that dies while storing a fact (after 3 of its 5 prompts reached the store) leaves that fact out
    entirely: no run of it, interrupted or otherwise, no neuron set; the rerun stores it once."""
    path = tmp_path / "p.knproj"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), str(HERE)]), "OMP_NUM_THREADS": "1",
           "KN_TEST_DIE_AFTER_PROMPTS": "8"}
    child = subprocess.run([sys.executable, str(HERE / "runner_child.py"), setup["model"], setup["facts"], str(path),
                            "2"], capture_output=True, text=True, env=env, timeout=600)
    assert child.returncode == 9, child.stderr
    assert child.stdout.splitlines()[0].startswith("stored France")
    with open_project(path) as project:
        runs = project.list_runs()
        assert [(r.status, r.n_done) for r in runs] == [("done", 5)]
        assert len(project.list_neuron_sets()) == 1 and project.check_integrity() == []
        report = attribute_factset(project, setup["lm"], tiny_factset(), AttributionParams(steps=2))
        assert (report.attributed, report.already_stored) == (5, 1)
        assert sorted(r.status for r in project.list_runs()) == ["done"] * 6
        stored_facts(project)  # one done run per fact


def test_causal_templates_render_the_prompts_and_resume_matches_on_them(setup, tmp_path):
    """--causal-templates: end-only drops the template with text after [Y]; each run records the choice as the GUI
    does (Session.prompt_params), and only a run made with the same choice is skipped on resume; runs stored
    before the choice was recorded rendered prefix prompts, and count as prefix runs."""
    from kn_gui.session import Session

    lm = setup["lm"]
    p36 = tiny_factset().relation("P36")
    factset = tiny_factset().with_relation(Relation("P36", "capital", (*p36.templates, "[X]'s capital [Y] is old")))
    works, _ = plan_facts(factset, "P36", lm.tokenizer, lm.kind, "prefix")
    assert all(len(w.prompts) == 6 for w in works) and works[0].prompts[5].text == "France's capital"
    works, _ = plan_facts(factset, "P36", lm.tokenizer, lm.kind, "end-only")
    assert all(len(w.prompts) == 5 for w in works)
    params = AttributionParams(steps=2)
    gui = Session(factset)
    gui.lm = lm
    for templates in ("prefix", "end-only"):
        gui.causal_templates = templates
        assert {**params.to_dict(), **gui.prompt_params()} == run_params(params, "causal", templates)
    assert prompt_params("masked", "end-only") == {"causal_templates": None}
    with create_project(tmp_path / "p.knproj") as project:
        first = attribute_factset(project, lm, factset, params, relations="P36", causal_templates="end-only")
        assert first.prompts == 30 and all(project.get_run(r).params["causal_templates"] == "end-only"
                                           for r in first.run_ids)
        sets = project.list_neuron_sets(kind="refined")
        assert all(s.params["causal_templates"] == "end-only" for s in sets)
        again = attribute_factset(project, lm, factset, params, relations="P36", causal_templates="end-only")
        assert (again.attributed, again.already_stored) == (0, 6)
        prefix = attribute_factset(project, lm, factset, params, relations="P36")
        assert (prefix.attributed, prefix.already_stored, prefix.prompts) == (6, 0, 36)
        with pytest.raises(ValueError, match="causal_templates"):
            attribute_factset(project, lm, factset, params, causal_templates="suffix")
    with create_project(tmp_path / "old.knproj") as project:  # a run stored before the choice was recorded
        france = factset.facts[0]
        prompts, _ = render_prompts(france, factset.relation("P36"), lm.tokenizer, lm.kind)
        with project.recording_run(fact=france, prompts=prompts, params=params, model=lm) as rec:
            for k, result in enumerate(attribute_fact(lm, prompts, params)):
                rec.add(k, result)
        end_only = attribute_factset(project, lm, factset, params, relations="P36", causal_templates="end-only")
        assert (end_only.attributed, end_only.already_stored) == (6, 0)
        prefix = attribute_factset(project, lm, factset, params, relations="P36")
        assert (prefix.attributed, prefix.already_stored) == (5, 1)  # France's old run is a prefix run


def test_kn_neurons_records_its_runs_as_the_runner_does(setup, capsys, tmp_path):
    """kn neurons --project renders with --causal-templates and records the choice in its run and refined set
    (runner.run_params), so resuming kn attribute --facts with the same choice skips that fact and with the other
    choice does not."""
    p36 = tiny_factset().relation("P36")
    factset = tiny_factset().with_relation(Relation("P36", "capital", (*p36.templates, "[X]'s capital [Y] is old")))
    facts = str(export_facts(factset, tmp_path / "facts.jsonl"))
    common = ["--facts", facts, "--model", setup["model"], "--device", "cpu", "--steps", "2", "--json"]
    for templates, n_prompts in (("end-only", 5), ("prefix", 6)):
        project = str(tmp_path / f"{templates}.knproj")
        assert main(["neurons", "--relation", "P36", "--subject", "France", "--project", project,
                     "--causal-templates", templates, *common]) == 0
        doc = json.loads(capsys.readouterr().out)
        assert len(doc["prompts"]) == n_prompts and doc["causal_templates"] == templates
        with open_project(project, read_only=True) as stored:
            run, = stored.list_runs(status="done")
            assert run.params == run_params(AttributionParams(steps=2), "causal", templates)
            refined, = stored.list_neuron_sets(kind="refined")
            assert refined.params["causal_templates"] == templates
        other = "prefix" if templates == "end-only" else "end-only"
        for choice, stored_before in ((templates, 1), (other, 0)):
            assert main(["attribute", "--relations", "P36", "--project", project, "--causal-templates", choice,
                         *common]) == 0
            assert json.loads(capsys.readouterr().out)["already_stored"] == stored_before


def _non_finite_for(monkeypatch, subjects):
    """attribute_fact as if the prompts of `subjects` overflowed (the engine's own check is tested in
    test_bad_inputs and test_neurons)."""
    import kn_core.attribution as attribution

    real = attribution.attribute_fact

    def overflowing(lm, prompts, params, **kwargs):
        if any(s in prompts[0].text for s in subjects):
            raise attribution.NonFiniteScoresError(f"12 attribution scores of {prompts[0].text!r} are NaN or infinite")
        return real(lm, prompts, params, **kwargs)

    monkeypatch.setattr(attribution, "attribute_fact", overflowing)


def test_a_fact_with_non_finite_scores_is_listed_not_stored_and_tried_again(setup, reference, tmp_path, monkeypatch):
    _non_finite_for(monkeypatch, ["Italy"])
    with create_project(tmp_path / "p.knproj") as project:
        report = attribute_factset(project, setup["lm"], tiny_factset(), PARAMS)
        assert report.attributed == 5 and [s.fact.subject for s in report.failed] == ["Italy"]
        assert "NaN or infinite" in report.failed[0].reason and report.to_dict()["failed"][0]["subject"] == "Italy"
        assert_matches(project, {k: v for k, v in reference.items() if k != "Italy"})
        monkeypatch.undo()
        again = attribute_factset(project, setup["lm"], tiny_factset(), PARAMS)
        assert (again.attributed, again.already_stored, again.failed) == (1, 5, [])
        assert_matches(project, reference)


def test_a_run_whose_first_facts_all_overflow_stops(setup, tmp_path, monkeypatch):
    _non_finite_for(monkeypatch, ["France", "Germany", "Italy", "Spain", "Japan", "Egypt"])
    with create_project(tmp_path / "p.knproj") as project:
        with pytest.raises(NonFiniteRunError, match="first 3 facts all gave NaN or infinite scores"):
            attribute_factset(project, setup["lm"], tiny_factset(), PARAMS)
        assert project.list_runs() == []
