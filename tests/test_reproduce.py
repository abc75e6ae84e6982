"""The reproduction on a tiny model: every selected relation in the report, everything left out listed with
its reason, a bounded fact selection, resuming an interrupted run from its cache, and readable ratios."""

from __future__ import annotations

import json
import re

import pytest

from kn_core import evaluation as ev
from kn_core.facts import Fact, FactSet, Relation
from kn_core import experiments as ex
from kn_core.reproduce import resolve_relations, run_reproduce, select_facts
from kn_core.tasks import Cancelled, Task
from tiny import GEOGRAPHY, TINY_CAUSAL, make_tiny

CAPITAL = Relation("P36", "capital", (
    "The capital of [X] is [Y].", "[X]'s capital city is [Y].", "The capital city of [X] is [Y].",
    "[X]'s capital, [Y], is a city.",      # text after [Y]: used as its prefix
    "[Y] is the capital of [X]."))         # [Y] first: nothing to continue
LANGUAGE = Relation("P37", "official language", (
    "The official language of [X] is [Y].", "In [X], the official language is [Y].", "People in [X] speak [Y]."))
OBJECT_FIRST = Relation("P99", "spoken in", ("[Y] is spoken in [X].", "[Y] is the language of [X]."))


def _factset() -> FactSet:
    facts = [Fact("P36", country, capital) for country, capital, _, _ in GEOGRAPHY[:12]]
    facts += [Fact("P36", "Narnia", "Cairparavel")]  # an object the tokenizer cannot spell: no usable prompt
    facts += [Fact("P37", country, language) for country, _, language, _ in GEOGRAPHY[:8]]
    facts += [Fact("P99", country, language) for country, _, language, _ in GEOGRAPHY[:4]]
    return FactSet("tiny", {"P36": CAPITAL, "P37": LANGUAGE, "P99": OBJECT_FIRST}, facts)


@pytest.fixture(scope="module")
def lm():
    return make_tiny(TINY_CAUSAL)


def _run(lm, out, **kwargs):
    # keep_template: a random tiny model knows no fact, so its subject control flags every neuron (as it should)
    # and the experiments below would have nothing to edit; test_subject_control_* runs the default
    args = dict(relations=["P36", "P37", "P99"], facts_per_relation=2, steps=1, control_prompts=4,
                say=lambda m: None, keep_template=True)
    return run_reproduce(lm, _factset(), out, **(args | kwargs))


# ---------------------------------------------------------------- ratios

def test_perplexity_changes_are_ratios_never_long_numbers():
    from kn_core.reproduce.report import _erase_section, _update_section

    def arm(before, after, success):
        return {"change_rate": 1.0, "success_rate": success, "top5_rate": 1.0, "ppl_intra_before": before,
                "ppl_intra_after": after, "ppl_inter_before": 2.0, "ppl_inter_after": 2.5}

    rows = [{"fact": "P36:France", "object": "Paris", "new_object": "Rome",
             "knowledge": arm(3.0, 3.0 * 1.2e26, 0.0), "random": arm(3.0, 3.3, 0.0)}]
    summary = {"knowledge": ex.update_summary(rows, "knowledge"), "random": ex.update_summary(rows, "random")}
    report = {"relations": ["P36"], "update": {"lambda1": 1, "lambda2": 8, "embedding": "input",
                                               "multi_token": "first", "facts": rows, "skipped": [], **summary}}
    text = "\n".join(_update_section(report))
    assert "x1.2e26" in text and "x1.1" in text and "x1.2" in text  # the fact's, random's, inter
    assert "**failed**" in text  # o' never became the answer: said, not hidden in a rate
    assert not re.search(r"\d{7,}", text)
    report["erase"] = {"k": 20, "fill": "zero", "per_relation": {"P36": {
        "before": {"accuracy": 1.0, "perplexity": 1.5, "other_perplexity": 2.0, "other_accuracy": 1.0},
        "knowledge": {"accuracy": 0.0, "perplexity": 1.5e30, "other_perplexity": 4.0, "other_accuracy": 1.0},
        "random": {"accuracy": 1.0, "perplexity": 1.5, "other_perplexity": 2.0, "other_accuracy": 1.0}}}}
    erase = "\n".join(_erase_section(report))
    assert "x1.0e30" in erase and "x2" in erase and "x1 |" in erase and not re.search(r"\d{7,}", erase)


# ---------------------------------------------------------------- selection

def test_relations_all_and_unknown_relations():
    fs = _factset()
    assert resolve_relations(fs, "all") == resolve_relations(fs, ["all"]) == ["P36", "P37", "P99"]
    assert resolve_relations(fs, "P37, P36,P37") == ["P37", "P36"]
    assert len(resolve_relations(fs, None)) == 3
    with pytest.raises(KeyError, match="P404"):
        resolve_relations(fs, ["P36", "P404"])


def _answering(monkeypatch, known_subjects, scored):
    """answer_probabilities as a model that answers exactly the facts of ``known_subjects`` (every prompt);
    every scored prompt is recorded in ``scored``."""
    def fake(lm_, prompts, *args, **kwargs):
        scored.extend(prompts)
        return [{"correct": p.fact.subject in known_subjects, "prob": 0.9 if p.fact.subject in known_subjects
                 else 0.01} for p in prompts]

    monkeypatch.setattr(ev, "answer_probabilities", fake)


def test_select_known_screens_in_seeded_order_until_enough_are_known(lm, monkeypatch):
    from kn_core.reproduce import pipeline

    fs = _factset()
    order = [f for f, _ in select_facts(lm, fs, ["P36"], 12, "random", seed=3).chosen["P36"]]  # the seeded order
    monkeypatch.setattr(pipeline, "SCREEN_BATCH", 3)
    scored = []
    _answering(monkeypatch, {order[1].subject, order[4].subject, order[10].subject}, scored)
    sel = select_facts(lm, fs, ["P36"], facts_per_relation=2, select="known", seed=3)
    summary = sel.relations["P36"]
    # two batches of 3 hold the two known facts: screening stops there, the known ones are chosen in order
    assert [f for f, _ in sel.chosen["P36"]] == [order[1], order[4]]
    assert summary["checked"] == 6 and summary["known_found"] == 2 and summary["chosen_known"] == 2
    assert "note" not in summary
    first = [p for p in scored if p.fact not in (order[1], order[4])]
    assert {p.fact for p in scored} == set(order[:6]) and len(first) == 4 * 3  # unknown ones: 3 prompts each
    reasons = [x["reason"] for x in sel.left_out["facts"] if x["relation"] == "P36"]
    assert sum(r.startswith("not known: top-1 on 0 of its first 3") for r in reasons) == 4
    # the screen of a relation does not depend on the relations selected beside it
    again = select_facts(lm, fs, ["P37", "P36"], facts_per_relation=2, select="known", seed=3)
    assert [f for f, _ in again.chosen["P36"]] == [order[1], order[4]]


def test_select_known_fills_with_unknown_facts_at_the_cap_and_says_so(lm, monkeypatch):
    from kn_core.reproduce import pipeline

    fs = _factset()
    order = [f for f, _ in select_facts(lm, fs, ["P36"], 12, "random", seed=3).chosen["P36"]]
    monkeypatch.setattr(pipeline, "SCREEN_BATCH", 2)
    scored = []
    _answering(monkeypatch, {order[1].subject, order[9].subject}, scored)
    sel = select_facts(lm, fs, ["P36"], facts_per_relation=2, select="known", seed=3, screen_cap=5)
    summary = sel.relations["P36"]
    assert summary["checked"] == 5 and {p.fact for p in scored} == set(order[:5])  # the cap, never beyond
    assert summary["chosen_known"] == 1 and sel.chosen["P36"][0][0] == order[1]
    assert len(sel.chosen["P36"]) == 2 and "only 1 known fact(s) among the 5 screened (the cap of 5" in summary["note"]
    everything = select_facts(lm, fs, ["P36"], facts_per_relation=4, select="known", seed=3)
    note = everything.relations["P36"]["note"]
    assert "only 2 known fact(s) among the 12 screened (every usable fact of the relation)" in note
    assert "filled with 2 fact(s) the model does not know" in note
    other_seed = select_facts(lm, fs, ["P36"], 2, "random", seed=4)
    assert other_seed.relations["P36"]["checked"] == 0 and len(other_seed.chosen["P36"]) == 2


def test_select_known_judges_a_screened_fact_on_all_its_prompts(lm, monkeypatch):
    fs = _factset()
    order = [f for f, _ in select_facts(lm, fs, ["P36"], 12, "random", seed=3).chosen["P36"]]

    def first_prompts_only(lm_, prompts, *args, **kwargs):  # order[0] answered on its first 2 prompts only
        return [{"correct": p.fact == order[0] and p.template in CAPITAL.templates[:2], "prob": 0.5}
                for p in prompts]

    monkeypatch.setattr(ev, "answer_probabilities", first_prompts_only)
    sel = select_facts(lm, fs, ["P36"], facts_per_relation=1, select="known", seed=3)
    assert sel.relations["P36"]["known_found"] == 0  # 2 of its first 3, but 2 of its 4 prompts: not known
    reasons = {x["subject"]: x["reason"] for x in sel.left_out["facts"]}
    assert sel.chosen["P36"][0][0] == order[0]  # the best-answered unknown fact fills
    assert all("answered less well than the 1 unknown" in reasons[f.subject] for f in order[1:])


def test_causal_templates_change_the_prompts_and_are_recorded(lm, tmp_path):
    prefix = select_facts(lm, _factset(), ["P36"], 1, "random", seed=0)
    end_only = select_facts(lm, _factset(), ["P36"], 1, "random", seed=0, causal_templates="end-only")
    (_, prompts), = prefix.chosen["P36"]
    (_, end_prompts), = end_only.chosen["P36"]
    assert len(prompts) == 4 and len(end_prompts) == 3
    assert any(p.template == CAPITAL.templates[3] and p.text.endswith("capital,") for p in prompts)
    reasons = {x["template"]: x["reason"] for x in end_only.left_out["templates"]}
    assert set(reasons) == {CAPITAL.templates[3], CAPITAL.templates[4]}
    assert all("not at the end" in r for r in reasons.values())
    assert [x["template"] for x in prefix.left_out["templates"]] == [CAPITAL.templates[4]]
    assert "nothing comes before" in prefix.left_out["templates"][0]["reason"]
    assert prefix.left_out["templates"][0]["facts"] == prefix.relations["P36"]["rendered"]


# ---------------------------------------------------------------- the report

def test_no_relation_missing_and_everything_left_out_listed(lm, tmp_path):
    report = _run(lm, tmp_path)
    assert report["status"] == "done" and report["parameters"]["causal_templates"] == "prefix"
    text = (tmp_path / "report.md").read_text()
    data = json.loads((tmp_path / "report.json").read_text())
    relations_table = text.split("## Relations")[1].split("##")[0]
    for rid in ("P36", "P37", "P99"):
        assert f"| {rid} |" in relations_table, rid
    assert "| P99 |" in text.split("### Suppress")[1] and "| P99 |" in text.split("## Erasing")[1]
    left = data["left_out"]
    assert [x["relation"] for x in left["relations"]] == ["P99"]
    assert "usable prompts" in left["relations"][0]["reason"]
    object_first = [x for x in left["templates"] if x["template"] == CAPITAL.templates[4]]
    assert object_first and "nothing comes before" in object_first[0]["reason"]
    assert {x["template"] for x in left["templates"] if x["relation"] == "P99"} == set(OBJECT_FIRST.templates)
    narnia = [x for x in left["facts"] if x["subject"] == "Narnia"]
    assert len(narnia) <= 1 and all("usable prompt" in x["reason"] for x in narnia)
    assert any("answered less well" in x["reason"] for x in left["facts"])
    left_md = text.split("## Left out")[1]
    assert "P99:" in left_md and CAPITAL.templates[4] in left_md and "answered less well" in left_md
    for x in left["templates"]:
        assert x["template"] in left_md
    # strict JSON and readable ratios
    assert "NaN" not in (tmp_path / "report.json").read_text()
    erase_md = text.split("## Erasing relations")[1].split("##")[0]
    assert re.search(r"\| x\d", erase_md) and not re.search(r"\d{9,}", text)


def test_a_cancelled_run_resumes_from_its_cache(lm, tmp_path, monkeypatch):
    import kn_core.attribution as attribution

    calls = []
    real = attribution.attribute

    def counting(lm_, prompt, params=None, *args, **kwargs):
        calls.append((prompt.text, params.method))
        return real(lm_, prompt, params, *args, **kwargs)

    monkeypatch.setattr(attribution, "attribute", counting)
    _run(lm, tmp_path / "whole")
    total = len(calls)
    assert total > 6 and len(set(calls)) == total

    calls.clear()
    seen = []

    def cancel_mid_attribution(fraction, message):
        if message.startswith("attribution"):
            seen.append(message)
            if len(seen) == 3:
                task.cancel()

    task = Task(on_progress=cancel_mid_attribution)
    with pytest.raises(Cancelled):
        _run(lm, tmp_path / "resumed", task=task)
    first = list(calls)
    assert 0 < len(first) < total
    assert json.loads((tmp_path / "resumed" / "report.json").read_text())["status"].startswith("interrupted")
    partial = (tmp_path / "resumed" / "report.md").read_text()
    assert "interrupted" in partial and "| P36 |" in partial and "| P99 |" in partial

    calls.clear()
    resumed = _run(lm, tmp_path / "resumed")
    assert len(first) + len(calls) == total and not set(first) & set(calls)  # nothing computed twice

    def comparable(folder):
        return {k: v for k, v in json.loads((folder / "report.json").read_text()).items()
                if k not in ("timings", "provenance")}  # when and how each run was started differ

    assert resumed["status"] == "done" and comparable(tmp_path / "resumed") == comparable(tmp_path / "whole")

    def text(folder):  # a phase's seconds (the subject control's "(37 s)") differ between runs
        return [re.sub(r"\(\d+ s\)", "(N s)", line) for line in (folder / "report.md").read_text().splitlines()
                if not line.startswith("Total time")]

    assert text(tmp_path / "resumed") == text(tmp_path / "whole")
    # the resumed run's seconds cover only what it computed, and its report says so instead of a time per fact
    whole = json.loads((tmp_path / "whole" / "report.json").read_text())["timings"]
    assert whole["attribution_cached_prompts"] == 0 and whole["attribution_per_fact"] > 0
    assert 0 < resumed["timings"]["attribution_cached_prompts"] and resumed["timings"]["attribution_per_fact"] is None
    total_line = [line for line in (tmp_path / "resumed" / "report.md").read_text().splitlines()
                  if line.startswith("Total time")]
    assert "read from the cache" in total_line[0] and " s per fact" not in total_line[0].split("paper")[0]


def test_massive_neurons_are_kept_out_unless_asked_and_reported_both_ways(tmp_path):
    import torch

    lm = make_tiny(TINY_CAUSAL)
    with torch.no_grad():  # one neuron firing at ~100 on every input: ~600x its layer's median
        lm.model.transformer.h[1].mlp.c_fc.bias[5] = 100.0
    args = dict(relations=["P36", "P37"], facts_per_relation=2, steps=1, control_prompts=4, say=lambda m: None,
                keep_template=True)
    default = run_reproduce(lm, _factset(), tmp_path, **args)
    assert [1, 5] in default["flags"]["massive"] and default["parameters"]["keep_massive"] is False
    assert all([1, 5] not in f["neurons"] and [1, 5] not in f["baseline_neurons"] for f in default["facts_detail"])
    kept = run_reproduce(lm, _factset(), tmp_path, keep_massive=True, **args)  # same cache: no new attribution
    assert kept["parameters"]["keep_massive"] is True
    assert sum([1, 5] in f["neurons"] for f in kept["facts_detail"]) >= 1  # kept: refined for a fact (or more)
    for report in (default, kept):
        both = report["both_ways"]
        assert both["flagged_excluded"]["flagged_among_refined"] == 0
        assert both["flagged_kept"]["flagged_among_refined"] >= 1
    text = (tmp_path / "report.md").read_text()
    assert "massive" in text and "flagged neurons kept" in text.lower()


def test_edit_metrics_are_judged_on_prompts_rendered_with_the_runs_templates(lm, tmp_path, monkeypatch):
    """With end-only templates the metrics section's edits are planned with them too: no evaluation prompt comes
    from a template with text after [Y] (prefix would cut it and judge the edit on a prompt no run used)."""
    from kn_core.reproduce import metrics_section

    plans, real = [], metrics_section.plan_edit
    monkeypatch.setattr(metrics_section, "plan_edit", lambda *a, **k: plans.append(real(*a, **k)) or plans[-1])
    report = _run(lm, tmp_path, relations=["P36", "P37"], causal_templates="end-only")
    assert report["status"] == "done" and plans
    assert all(plan.request.causal_templates == "end-only" for plan in plans)
    used = {p.template for plan in plans for prompts in plan.prompts.values() for p in prompts}
    assert CAPITAL.templates[3] not in used and used


def test_subject_control_takes_template_neurons_out_and_reports_both_ways_and_known_apart(lm, tmp_path):
    report = _run(lm, tmp_path, relations=["P36", "P37"], keep_template=False)
    sc = report["subject_control"]
    assert report["parameters"]["subject_control"] is True and report["parameters"]["keep_template"] is False
    assert sc["facts"] == 4 and sc["controlled"] + len(sc["not_controlled"]) == 4
    assert sc["control_prompts"] == sum(f["control_prompts"] for f in sc["per_fact"]) > 0
    for detail, control in zip(report["facts_detail"], sc["per_fact"]):
        assert detail["template_neurons"] == control["template"]
        assert detail["neurons"] == [n for n in control["candidates"] if n not in control["template"]]
    without, with_ = sc["without_control"]["all"], sc["with_control"]["all"]
    assert with_["refined_total"] == without["refined_total"] - sc["template"]
    assert report["neuron_statistics"] == with_
    answers = report["fact_answers"]
    assert len(answers) == 4 and all({"prob", "rank_median", "rank_best", "top1_share", "known"} <= set(a)
                                     for a in answers)
    known = sum(a["known"] for a in answers)
    assert sc["without_control"]["known"]["facts"] == known and sc["without_control"]["unknown"]["facts"] == 4 - known
    text = (tmp_path / "report.md").read_text()
    assert "## Subject specificity" in text and "## Facts" in text
    assert "with the control, neurons of facts the model does not know (template-like by construction)" in text
    assert "### Known facts (the headline) and facts the model does not know" in text
    # the controls' scores are cached: a second run computes no attribution
    import kn_core.reproduce.specificity_section as section

    def fail(*a, **k):
        raise AssertionError("the control was computed again instead of read from the cache")

    real, section.attribute_layers = section.attribute_layers, fail
    try:
        again = _run(lm, tmp_path, relations=["P36", "P37"], keep_template=False)
    finally:
        section.attribute_layers = real
    assert again["subject_control"]["per_fact"] == sc["per_fact"] or all(
        a["template"] == b["template"] for a, b in zip(again["subject_control"]["per_fact"], sc["per_fact"]))


def test_summaries_give_known_facts_first_and_unknown_facts_apart_never_mixed():
    from kn_core.reproduce.report import _activation_section, _neurons_section
    from kn_core.reproduce.specificity_section import UNKNOWN, neurons_by_known

    answers = [{"relation": "P1", "subject": s, "object": "o", "known": k}
               for s, k in (("a", True), ("b", True), ("c", False), ("d", False))]
    neurons = {"a": [[5, 1], [9, 2]], "b": [[5, 1]], "c": [[0, 7]], "d": [[0, 7], [3, 3]]}
    report = {"model": {"layers": 12}, "fact_answers": answers,
              "facts_detail": [{"relation": "P1", "subject": s, "neurons": n} for s, n in neurons.items()],
              "neuron_statistics": {"layer_histogram": [2] + [0] * 11, "mean_neurons_per_fact": 1.5,
                                    "facts_without_neurons": 0, "facts": 4, "shared_intra_relation": 1.0,
                                    "shared_inter_relation": float("nan")},
              "activation_by_prompt": {"facts": 4, "expressing": 2.5, "subject_only": 1.25, "random": 1.5,
                                       "per_fact": [{"fact": f"P1:{s}", "expressing": e, "subject_only": so,
                                                     "random": r} for s, e, so, r in
                                                    (("a", 3, 1, 0), ("b", 3, 1, 0), ("c", 2, 1.5, 3),
                                                     ("d", 2, 1.5, 3))]}}
    split = neurons_by_known(report)
    assert split["known"]["refined_total"] == 3 and split["known"]["layer_histogram"][0] == 0
    assert split["known"]["shared_intra_relation"] == 1.0
    assert split["unknown"]["refined_total"] == 3 and split["unknown"]["layer_histogram"][0] == 2
    assert split["unknown"]["layer0_in_every_fact"] == [{"relation": "P1", "neuron": [0, 7], "facts": 2}]
    text = "\n".join(_neurons_section(report))
    row = next(line for line in text.splitlines() if line.startswith("| refined neurons in layer 0 |"))
    assert row == "| refined neurons in layer 0 | 0 of 3 (0.0%; 95% CI 0-56%) | 2 of 3 (66.7%; 95% CI 21-94%) |"
    assert f"| | known facts | {UNKNOWN} |" in text
    activation = "\n".join(_activation_section(report))
    assert "| expressing the fact | 3.000 | 2.000 | 2.500 |" in activation
    assert "as in the paper, known facts: **yes**" in activation and "as in the paper, all facts: **no**" in activation


def test_a_fact_whose_answer_is_in_its_subjects_name_is_never_counted_as_known(lm, monkeypatch):
    """LAMA-UHN's filter (Poerner et al. 2020): "Paris France -> Paris" can be answered by reading the name, so
    answering it is no evidence of knowledge: the screen passes over it (listed with the reason), and when
    unknown facts must fill, those whose answer is not in the name come first."""
    from kn_core.reproduce import pipeline

    base = _factset()
    country, capital = GEOGRAPHY[0][0], GEOGRAPHY[0][1]
    named = Fact("P36", f"{capital} {country}", capital)
    fs = FactSet("tiny", base.relations, [named if f == Fact("P36", country, capital) else f for f in base.facts])
    order = [f for f, _ in select_facts(lm, fs, ["P36"], 12, "random", seed=3).chosen["P36"]]
    assert named in order and named not in order[-2:]
    monkeypatch.setattr(pipeline, "SCREEN_BATCH", 3)
    _answering(monkeypatch, {named.subject, order[-2].subject, order[-1].subject}, [])
    sel = select_facts(lm, fs, ["P36"], facts_per_relation=2, select="known", seed=3)
    assert [f for f, _ in sel.chosen["P36"]] == order[-2:]
    assert sel.relations["P36"]["known_found"] == 2 and sel.relations["P36"]["answer_in_name"] == 1
    reasons = {x["subject"]: x["reason"] for x in sel.left_out["facts"]}
    assert reasons[named.subject].startswith("not counted as known: the answer is part of the subject's name")
    filled = select_facts(lm, fs, ["P36"], facts_per_relation=3, select="known", seed=3)
    chosen = [f for f, _ in filled.chosen["P36"]]
    assert chosen[:2] == order[-2:] and named not in chosen  # the fill: an unknown fact, not the named one
    monkeypatch.setattr(ex, "answer_probabilities", lambda lm_, prompts, *a, **k: [
        {"correct": True, "prob": 0.9, "rank": 1} for _ in prompts])  # a model that answers every prompt
    rows = ex.fact_answers(lm, [(named, render(lm, named)), (order[-1], render(lm, order[-1]))])
    assert [r["answer_in_name"] for r in rows] == [True, False]
    assert [r["top1_share"] for r in rows] == [1.0, 1.0] and [r["known"] for r in rows] == [False, True]


def render(lm, fact):
    from kn_core.facts import render_prompts

    return render_prompts(fact, CAPITAL, lm.tokenizer, lm.kind)[0]


def test_answer_in_name_is_a_case_insensitive_substring_of_the_subject():
    assert ex.answer_in_name(Fact("P131", "National Museum Cardiff", "Cardiff"))
    assert ex.answer_in_name(Fact("P17", "Note Printing AUSTRALIA", "australia"))
    assert not ex.answer_in_name(Fact("P1376", "Minsk", "Belarus"))
    assert ex.knows(Fact("P1376", "Minsk", "Belarus"), 0.51) and not ex.knows(Fact("P1376", "Minsk", "Belarus"), 0.5)
    assert not ex.knows(Fact("P131", "National Museum Cardiff", "Cardiff"), 1.0)


def test_the_app_says_when_a_facts_answer_is_in_its_subjects_name():
    from kn_gui.session import Session

    session = Session()
    assert "Not counted as known: the answer is part of the subject's name" in session.known_note(
        Fact("P131", "National Museum Cardiff", "Cardiff"))
    assert session.known_note(Fact("P1376", "Minsk", "Belarus")) == ""  # not checked: nothing said
