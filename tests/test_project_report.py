"""The project's report (kn_core.report, `kn report PROJECT --out DIR`) on projects made here through the store
on a tiny random model: a run, a run with no finished prompt, a neuron set, a measured edit and one never
measured, and a compactly stored project read at a t its kept scores do not decide. References: the refined set
counted in the test from the attribution scores; strict JSON parsed with NaN refused."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from kn_core.attribution import AttributionParams, attribute
from kn_core.cli import main
from kn_core.edit_stack import EditStack
from kn_core.edits import Amplify, Suppress
from kn_core.fact_files import builtin_facts
from kn_core.jsonio import dumps
from kn_core.facts import render_prompts
from kn_core.report.build import report_data
from kn_core.report.document import read_project
from kn_core.report.write import ReportError, write_report
from kn_core.store import create_project
from kn_core.tasks import Cancelled, Task
from tiny import make_tiny

SECTIONS = ("## Attribution runs", "## Current runs", "## Neuron sets", "## Edits", "## Left out")
MEASURED = {"title": "Suppress L0 N1 \u2014 evaluated on France \u2192 Paris",
            "summary": {"fact": {"n": 6, "p_before": 0.5, "p_after": 1e-30, "relative_change": -1.0,
                                 "flip_rate": 1.0, "accuracy_before": 1.0, "accuracy_after": 0.0},
                        "relation": {"n": 3, "p_before": 0.25, "p_after": float("nan"), "relative_change": float("nan"),
                                     "flip_rate": 0.0, "accuracy_before": 0.5, "accuracy_after": 0.5}},
            "skipped": [["prompt", "Paris is the capital of", "the answer is not at the end"]]}


def strict(text: str):
    def refuse(constant):
        raise AssertionError(f"{constant} in JSON")

    return json.loads(text, parse_constant=refuse)


def reference_refined(score_list, t, p):
    """The paper's refinement, counted directly: score > t x the prompt's max in >= max(p x n, 3) prompts."""
    counts = {}
    for scores in score_list:
        top = float(np.max(scores))
        for layer in range(scores.shape[0]):
            for neuron in range(scores.shape[1]):
                if top > 0 and float(scores[layer, neuron]) > t * top:
                    counts[(layer, neuron)] = counts.get((layer, neuron), 0) + 1
    need = max(p * len(score_list), 3)
    return sorted(n for n, c in counts.items() if c >= need)


def _project(path, lm, storage=None, t=None):
    fs = builtin_facts()
    fact = next(f for f in fs.facts if (f.relation, f.subject) == ("P36", "France"))
    prompts, _ = render_prompts(fact, fs.relation("P36"), lm.tokenizer, lm.kind, "prefix")
    params = AttributionParams(steps=2)
    with create_project(path) as project:
        if storage:
            project.set_score_storage("top", floor=storage[0], guard=storage[1])
        project.add_relation(fs.relation("P36"))
        project.add_facts([fact], fs.relations)
        run = project.start_run(fact=fact, prompts=prompts, params=params.to_dict(), model=lm)
        scores = []
        for k, prompt in enumerate(prompts):
            result = attribute(lm, prompt, params)
            scores.append(result.scores)
            project.add_prompt_result(run, k, result)
        project.finish_run(run, "done", elapsed_s=2.5)
        empty = project.start_run(fact=fact, prompts=prompts, params=params.to_dict(), model=lm)
        project.finish_run(empty, "cancelled", elapsed_s=0.1)  # stopped before a prompt finished
        project.add_neuron_set("user", [(0, 1), (2, 3)], params={"source": "picked by hand"}, name="mine")
        stack = EditStack(lm)
        stack.push(Suppress(neurons=((0, 1),)), report=MEASURED)
        stack.push(Amplify(neurons=((1, 2),), factor=2.0))
        stack.undo()
        project.save_edit_history(stack.to_dict(), model=lm)
        if t is not None:
            project.set_setting("gui.state", {"t": t, "p": 0.7})
    return scores


@pytest.fixture(scope="module")
def lm():
    return make_tiny("gpt2")


@pytest.fixture(scope="module")
def full(tmp_path_factory, lm):
    path = tmp_path_factory.mktemp("full") / "p.knproj"
    return str(path), _project(path, lm)


def test_report_has_every_section_strict_json_and_no_external_url(full, tmp_path):
    path, scores = full
    written = write_report(read_project(path), tmp_path / "rep", "test")
    out = tmp_path / "rep"
    data = strict((out / "report.json").read_text())
    markdown = (out / "report.md").read_text()
    page = (out / "report.html").read_text()
    assert all(section in markdown for section in SECTIONS)
    run, empty = data["runs"]
    assert [tuple(n) for n in run["refined"]] == reference_refined(scores, 0.2, 0.7)
    assert run["current"] and run["prompts_done"] == 6 and run["state"] == "complete" and run["seconds"] == 2.5
    assert empty["prompts_done"] == 0 and empty["state"] == "cancelled" and not empty["current"]
    assert data["neuron_sets"] == [{"name": "mine", "kind": "user", "source": "picked by hand",
                                    "neurons": [[0, 1], [2, 3]], "count": 2}]
    entries = data["edits"]["entries"]
    assert [e["status"] for e in entries] == ["in force", "undone"] and data["edits"]["in_force"] == 1
    # the non-finite numbers of the stored measurement: null with a note, never NaN
    relation = entries[0]["measurement"]["summary"]["relation"]
    assert relation["p_after"] is None and relation["p_after_note"] == "NaN"
    # every number readable: a 30-digit drop as a ratio, a missing one as n/a
    assert "| fact | 6 | 0.5 | 1e-30 | x2.0e-30 | -100.00% |" in markdown
    assert "| relation | 3 | 0.25 | n/a | n/a | n/a |" in markdown
    # every left-out item with its reason
    reasons = {item["what"]: item["reason"] for item in data["left_out"]}
    assert reasons["run 2 (P36: France \u2192 Paris)"].startswith("no finished prompt")
    assert reasons["edit 2 (Amplify x2 1 neuron (L1 N2), answer positions)"].startswith("not measured")
    assert "the answer is not at the end" in markdown
    # self-contained: every image embedded, nothing fetched, no live link
    assert written["figures"] == 3 == len(data["figures"]) == page.count('src="data:image/png;base64,')
    assert all(v.startswith(("data:", "#")) for v in re.findall(r'(?:src|href)="([^"]*)"', page))
    assert "://" not in page and "default-src 'none'" in page
    assert sorted(p.name for p in out.iterdir()) == sorted(written["files"])


def test_kn_report_json_is_the_builders_and_replaces_only_its_own_folder(full, tmp_path, capsys):
    path, _ = full
    out = tmp_path / "r"
    assert main(["report", path, "--out", str(out), "--json"]) == 0
    doc = strict(capsys.readouterr().out)
    assert doc["ok"] and doc["runs"] == 2 and doc["figures"] == 3 and len(doc["left_out"]) == 2
    data = strict((out / "report.json").read_text())
    assert data["provenance"]["command"].startswith("kn ")
    assert {k: v for k, v in data.items() if k != "provenance"} == strict(dumps(report_data(read_project(path))))
    assert main(["report", path, "--out", str(out)]) == 0  # an earlier report there is replaced
    (out / "notes.txt").write_text("mine")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main(["report", path, "--out", str(out)]) == 2
    assert "already holds other files (notes.txt)" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_compact_scores_not_decided_at_t_are_listed_never_a_smaller_set(tmp_path, lm):
    path = tmp_path / "compact.knproj"
    _project(path, lm, storage=(0.3, 4), t=0.01)
    doc = read_project(path)
    run = doc.runs[0]
    assert any(0.01 * top.values.max() < top.bound for top in run.tops)  # the data makes t = 0.01 undecidable
    data = report_data(doc)
    entry = data["runs"][0]
    assert entry["refined"] is None and entry["refined_count"] is None and "use t >= 0.3" in entry["not_decided"]
    reasons = {item["what"]: item["reason"] for item in data["left_out"]}
    assert "use t >= 0.3" in reasons["run 1 (P36: France \u2192 Paris): refined neurons"]
    assert "not decided" in reasons["figures of run 1 (P36: France \u2192 Paris): refined neurons across prompts"]
    assert [f["figure"] for f in data["figures"]] == ["layers", "heatmap"]


def test_a_cancelled_or_failed_report_writes_nothing(full, tmp_path):
    path, _ = full
    doc = read_project(path)
    task = Task()
    task.cancel()
    with pytest.raises(Cancelled):
        write_report(doc, tmp_path / "new" / "r", "test", task=task)
    assert list(tmp_path.iterdir()) == []  # neither the folder nor the parent it would have made
    (tmp_path / "f").write_text("x")
    with pytest.raises(ReportError, match="is a file"):
        write_report(doc, tmp_path / "f" / "r", "test")
    assert [p.name for p in tmp_path.iterdir()] == ["f"]


def test_run_neurons_match_the_paper_rule_below_three_prompts(full):
    """Fewer than 3 prompts: the neurons coarse in every finished prompt (kn_core.neurons.case_neurons)."""
    from kn_core.report.document import run_neurons

    path, scores = full
    run = read_project(path).runs[0]
    run.prompts, run.tops = run.prompts[:2], run.tops[:2]
    found, rule, why = run_neurons(run, 0.2, 0.7)
    both = [set(map(tuple, np.argwhere(s > 0.2 * s.max()).tolist())) for s in scores[:2]]
    assert found == sorted(both[0] & both[1]) and "all 2 prompt(s)" in rule and why == ""


def test_kn_edit_evaluations_are_reported_beside_their_control(lm, tmp_path, capsys):
    from tiny import save_tiny

    folder = save_tiny(lm, tmp_path / "model")
    project = str(tmp_path / "e.knproj")
    assert main(["edit", "suppress", "--relation", "P36", "--subject", "France", "--model", folder, "--steps", "2",
                 "--project", project, "--json"]) == 0
    edit = strict(capsys.readouterr().out)
    assert main(["report", project, "--out", str(tmp_path / "r")]) == 0
    data = strict((tmp_path / "r" / "report.json").read_text())
    (evaluation,) = data["evaluations"]
    assert evaluation["summary"] == edit["groups"]["edit"] and evaluation["control_summary"] == edit["groups"]["control"]
    markdown = (tmp_path / "r" / "report.md").read_text()
    assert "### Evaluation 1: edit suppress on France \u2192 Paris (P36)" in markdown
    assert "Random-neuron control:" in markdown and "| reliability |" in markdown


def test_an_edit_scored_by_a_protocol_is_reported_in_its_names(lm, tmp_path, capsys):
    """Issue 22: `kn edit --protocol rome --project` stores ROME's scores; the report shows them under ROME's names,
    before, after and under the random control, as `format_score` reads them (here worked from the stored data)."""
    from kn_core.protocols import flat_scores, format_score
    from tiny import save_tiny

    folder = save_tiny(lm, tmp_path / "model")
    project = str(tmp_path / "p.knproj")
    assert main(["edit", "suppress", "--relation", "P36", "--subject", "France", "--model", folder, "--steps", "2",
                 "--protocol", "rome", "--project", project, "--json"]) == 0
    edit = strict(capsys.readouterr().out)
    assert main(["report", project, "--out", str(tmp_path / "r")]) == 0
    (evaluation,) = strict((tmp_path / "r" / "report.json").read_text())["evaluations"]
    assert evaluation["protocol"] == "rome" and evaluation["protocol_scores"] == edit["protocol_scores"]
    markdown = (tmp_path / "r" / "report.md").read_text()
    assert "Scored by the rome protocol:" in markdown
    pre, post, control = (flat_scores(edit["protocol_scores"][k]) for k in ("pre", "post", "control"))
    assert "ES" in post
    for key in post:
        assert (f"| {key} | {format_score(key, pre.get(key))} | {format_score(key, post[key])} | "
                f"{format_score(key, control.get(key))} |") in markdown


def test_a_run_without_a_fact_is_listed_with_its_reason(tmp_path):
    path = tmp_path / "p.knproj"
    with create_project(path) as project:
        run = project.start_run(prompts=["The capital of France is"], params={"steps": 2})
        project.finish_run(run, "done")
    data = report_data(read_project(path))
    assert data["runs"] == [] and data["left_out"] == [
        {"what": f"stored run {run}", "reason": "it has no fact of the project's fact set (a relation-level or "
                                                "deleted fact's run): the report lists fact runs only"}]


def test_the_apps_json_exports_are_strict(tmp_path):
    pytest.importorskip("PySide6")
    from kn_gui.panels.common import write_json

    write_json(tmp_path / "r.json", {"prob": float("nan"), "ranks": [1, float("inf")], "when": tmp_path})
    data = strict((tmp_path / "r.json").read_text())
    assert data["prob"] is None and data["prob_note"] == "NaN" and data["ranks"] == [1, None]
    assert "[1]=Infinity" in data["ranks_note"] and data["when"] == str(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temporary file left


def test_runs_beyond_the_figure_limit_keep_their_numbers_and_say_why_not_drawn(full, monkeypatch):
    """read_project keeps the scores of the drawn runs only; the others are selected while read."""
    import kn_core.report.figures as figures

    path, scores = full
    monkeypatch.setattr(figures, "FIGURE_RUNS", 0)
    doc = read_project(path)
    assert doc.runs[0].current and doc.runs[0].tops == [] and doc.runs[0].done == 6
    data = report_data(doc)
    assert [tuple(n) for n in data["runs"][0]["refined"]] == reference_refined(scores, 0.2, 0.7)
    assert data["figures"] == [] and any(item["what"].startswith("figures of run 1") and "draws the first"
                                         in item["reason"] for item in data["left_out"])
