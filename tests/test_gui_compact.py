"""Issue 16's "the GUI opens top-form projects": a project whose scores are stored compactly (the top scores per
prompt, kn_core/store/topscores.py), written here through the store API, opens in the window; its runs are
listed, its neurons shown and t and p move. Where t needs scores that were not kept, the window says the store's
one-line reason in the status bar and keeps the last valid t (never a smaller set); the map shows what is
stored; saving keeps the compact form and the scores as they were read. References: the full arrays, through
kn_core.neurons (no compact code)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("pytestqt")

from PySide6.QtCore import QCoreApplication  # noqa: E402

from kn_core import neurons as kn_neurons  # noqa: E402
from kn_core.attribution import AttributionParams, attribute_fact  # noqa: E402
from kn_core.facts import render_prompts  # noqa: E402
from kn_core.store import TopScores, create_project, open_project  # noqa: E402
from kn_gui.controllers.attribution import FlagsMeasured  # noqa: E402
from test_gui import FRANCE, app, errors, geo_factset, lm, make_window, settings  # noqa: E402,F401

FLOOR, GUARD = 0.3, 4  # exact for t >= 0.3 with up to 4 excluded neurons
LOW_T = 0.01  # the project opens at this t: far below what the kept scores decide (checked on the data below)
JAPAN = geo_factset().facts[1]


@pytest.fixture
def compact_project(tmp_path, lm):
    """A project in the "top" form with two attributed facts, and their full scores for the references."""
    fs = geo_factset()
    path = str(tmp_path / "compact.knproj")
    full = {}
    project = create_project(path)
    try:
        project.set_score_storage("top", floor=FLOOR, guard=GUARD)
        for relation in fs.relations.values():
            project.add_relation(relation)
        project.add_facts(fs.facts, fs.relations)
        project.add_model(lm)
        for fact in (FRANCE, JAPAN):
            prompts, _ = render_prompts(fact, fs.relation(fact.relation), lm.tokenizer, lm.kind)
            params = AttributionParams(steps=2)
            with project.recording_run(fact=fact, prompts=prompts, params=params, model=lm) as rec:
                results = attribute_fact(lm, prompts, params, on_prompt=rec.add)
            full[fact] = [r.scores for r in results]
        project.set_setting("gui.state", {"t": LOW_T, "p": 0.7})
        for run in project.list_runs():  # the data makes LOW_T undecidable: the largest unkept score passes it
            assert any(LOW_T * top.values.max() < top.bound for top in project.load_top_scores(run.id).values())
    finally:
        project.close()
    return path, full


def stored(path):
    with open_project(path, read_only=True) as project:
        return project.score_storage(), {r.id: [project.load_stored(r.id, k) for k in range(r.n_prompts)]
                                         for r in project.list_runs()}


def open_in_window(qtbot, window, path):
    with qtbot.waitSignal(window.project_opened, timeout=30000):
        window.lifecycle.open_project(path)
    assert window.runner.wait_idle(30000)
    QCoreApplication.processEvents()


def test_compact_project_opens_lists_runs_and_moves_t_and_p(app, qtbot, settings, lm, compact_project):
    path, full = compact_project
    window = make_window(qtbot, settings, lm)
    shown = errors(window)
    measured = []
    window.attribution.event.connect(lambda ev: measured.append(ev) if isinstance(ev, FlagsMeasured) else None)
    open_in_window(qtbot, window, path)
    s, ap = window.session, window.attribution_panel
    # the flags are measured on the opened runs; the compact ones whose kept scores cannot decide their coarse
    # sets at t are left out of the unspecific flag, and the message says so
    assert measured and measured[-1].left_out.startswith("2 compactly stored fact(s) left out of the unspecific")
    run = s.runs[("P36", "France", "Paris")]
    assert set(s.runs) == {("P36", "France", "Paris"), ("P36", "Japan", "Tokyo")} and run.complete
    assert run.compact is not None and all(isinstance(top, TopScores) for top in run.compact)
    assert not shown  # nothing failed on opening
    # the map shows what is stored: the kept scores exactly, NaN (drawn blank) for the rest
    window.facts_panel.select_fact(FRANCE)
    window.select_fact(FRANCE)
    ap.view_of.setCurrentIndex(1)  # prompt 1
    map_scores, kept = ap.heat_widget.scores, run.compact[0]
    flat = map_scores.ravel()
    assert np.array_equal(flat[kept.indices], full[FRANCE][0].ravel()[kept.indices])
    assert np.isnan(np.delete(flat, kept.indices)).all() and kept.indices.size < flat.size
    assert "not stored" in ap.describe_neuron(*np.unravel_index(np.flatnonzero(np.isnan(flat))[0], map_scores.shape))
    ap.view_of.setCurrentIndex(0)
    # t = 0.01 is below what the kept scores decide: the reason, no set (not a smaller one)
    assert s.t == LOW_T and ap.refined == [] and "\u26a0 no coarse or refined sets at t = 0.01" in ap.summary.text()
    assert f"use t >= {FLOOR}" in ap.summary.text()
    # a t they decide: the sets of the full scores, exactly
    ap.t_control.spin.setValue(0.4)
    assert s.t == pytest.approx(0.4)
    expect = kn_neurons.refined_neurons(full[FRANCE], 0.4, 0.7, s.excluded())
    assert ap.refined == [tuple(n) for n in expect]
    assert s.neuron_sets["refined: France \u2192 Paris"].neurons == ap.refined
    for k in range(len(run.scores)):
        assert s.coarse(run, k) == kn_neurons.coarse_neurons(full[FRANCE][k], 0.4, s.excluded())
    ap.p_control.spin.setValue(0.5)  # p needs no scores beyond those: moves freely
    assert ap.refined == [tuple(n) for n in kn_neurons.refined_neurons(full[FRANCE], 0.4, 0.5, s.excluded())]
    # below the floor again: refused, the last valid t and result stay, the status bar says why in one line
    before = list(ap.refined)
    ap.t_control.spin.setValue(LOW_T)
    assert s.t == pytest.approx(0.4) and ap.t_control.value() == pytest.approx(0.4)
    assert ap.t_control.slider.value() == 40 and ap.refined == before
    message = window.statusBar().currentMessage()
    assert "Kept t = 0.40" in message and f"use t >= {FLOOR}" in message and "\n" not in message
    window.close()


def test_compact_runs_save_as_stored_and_refuse_where_not_decided(app, qtbot, settings, lm, compact_project,
                                                                   tmp_path):
    path, full = compact_project
    window = make_window(qtbot, settings, lm)
    open_in_window(qtbot, window, path)
    shown = errors(window)
    window.facts_panel.select_fact(FRANCE)
    window.select_fact(FRANCE)
    # at t = 0.01 adapting p and the relation's neurons refuse with the reason (no crash, no partial answer)
    window.attributions.adapt_p()
    window.attributions.make_relation_set()
    assert [title for title, _ in shown] == ["Cannot adapt p", "Cannot make the relation's neurons"]
    assert all(f"use t >= {FLOOR}" in message for _, message in shown)
    results = window.files.results_dict()
    assert all(r["refined"] is None and f"use t >= {FLOOR}" in r["sets_not_decided"] for r in results["runs"])
    # the HTML report's Markdown says the sets are not decided, with the reason (no traceback, no smaller set)
    from kn_core.report.build import render_markdown, report_data
    from kn_gui.report_export import document_of, report_snapshot

    markdown = render_markdown(report_data(document_of(report_snapshot(window.session, (None, None), None))))
    rows = [line for line in markdown.splitlines() if "| P36 |" in line]
    assert rows and all("not decided" in row and f"use t >= {FLOOR}" in row for row in rows)
    # saving keeps the compact form and every kept score as read
    copy = str(tmp_path / "saved.knproj")
    assert window.lifecycle.save_to(copy, wait=True)
    window.close()
    (form, before), (form_after, after) = stored(path), stored(copy)
    assert form == form_after and form_after["form"] == "top"
    assert sorted(map(len, before.values())) == sorted(map(len, after.values()))
    for old, new in zip(before.values(), after.values()):
        for a, b in zip(old, new):
            assert isinstance(b, TopScores) and np.array_equal(a.indices, b.indices)
            assert np.array_equal(a.values, b.values) and a.bound == b.bound and (a.floor, a.guard) == (b.floor,
                                                                                                        b.guard)


def test_flags_see_the_coarse_sets_of_the_full_scores_or_leave_the_fact_out(compact_project):
    from kn_gui.controllers.attribution import decided_scores
    from kn_gui.session import CompactScores, FullScores

    path, full = compact_project
    with open_project(path, read_only=True) as project:
        tops = [list(project.load_top_scores(r.id).values()) for r in project.list_runs()]
    massive = frozenset({(0, 1)})
    decided, note = decided_scores({"P36": [CompactScores(t) for t in tops]}, 0.4, massive)
    assert note == "" and len(decided["P36"]) == 2
    for arrays, fact in zip(decided["P36"], (FRANCE, JAPAN)):
        assert kn_neurons.fact_coarse_set(arrays, 0.4, massive) == kn_neurons.fact_coarse_set(full[fact], 0.4, massive)
    decided, note = decided_scores({"P36": [CompactScores(t) for t in tops], "P37": [FullScores(full[FRANCE])]},
                                  LOW_T, massive)
    assert list(decided) == ["P37"] and note.startswith("2 compactly stored fact(s) left out") and "t >= 0.3" in note
