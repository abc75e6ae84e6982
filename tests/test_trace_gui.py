"""The app's "Causal trace" tab: the Trace button runs kn_core.tracing as a worker job on the current fact's first
prompt, the heat map shows exactly the engine's numbers with the subject marked, and the figure exports."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("pytestqt")

from kn_core.tracing import TraceParams, embedding_std, trace  # noqa: E402
from test_gui import FRANCE, app, geo_factset, lm, make_window, run_fact, settings  # noqa: E402,F401


def test_trace_tab_runs_a_job_and_shows_the_engines_numbers(app, qtbot, settings, lm, tmp_path):  # noqa: F811
    window = make_window(qtbot, settings, lm)
    panel = window.trace_panel
    assert window.attribution_panel.tabs.indexOf(panel) >= 0
    window.facts_panel.select_fact(FRANCE)
    panel.samples.setValue(2)
    panel.trace_button.click()
    qtbot.waitUntil(lambda: panel.result is not None, timeout=60000)
    assert window.runner.wait_idle(30000)
    result = panel.result
    prompt = window.session.prompts_for(FRANCE)[0][0]
    subjects = [f.subject for f in geo_factset().facts]
    expect = trace(lm, prompt.text, "France", prompt.answer_ids, TraceParams(samples=2),
                   noise_scale=embedding_std(lm, subjects))
    for kind in ("residual", "mlp", "attn"):
        assert np.array_equal(result.restored[kind], expect.restored[kind])
    shown = panel.image.image
    assert np.allclose(shown, result.restored["mlp"].astype(np.float32))  # the MLP kind is shown first
    start, end = result.subject_span
    assert [label.endswith("*") for label in panel.token_axis.labels] == [start <= i < end
                                                                          for i in range(len(result.tokens))]
    assert "France" in panel.summary.text() and "P(clean)" in panel.summary.text()
    panel.kind.setCurrentIndex(0)
    assert np.allclose(panel.image.image, result.restored["residual"].astype(np.float32))
    path = panel.export(tmp_path / "trace.svg")
    assert path.stat().st_size > 1000
    # kept with the project as an evaluation of kind "trace", listed and reopened from the saved file
    from kn_gui import project_io
    from kn_core.store import open_project

    assert len(window.session.traces) == 1 and window.session.results_dirty
    saved = project_io.save_project(str(tmp_path / "p.knproj"), project_io.snapshot(window.session, None, None))
    project = open_project(saved, read_only=True)
    try:
        (row,) = project.list_evaluations("trace")
        assert row.report["fact"]["subject"] == "France" and row.report["p_clean"] == result.p_clean
    finally:
        project.close()
    snap = project_io.open_project_file(saved)
    window.session.traces = []
    panel.list_saved()
    assert panel.saved.count() == 1 and not panel.saved.isEnabled()
    window.session.traces = list(snap.traces)
    panel.show_result(None)
    panel.list_saved()
    assert panel.saved.count() == 2 and "France" in panel.saved.itemText(1)
    panel.saved.setCurrentIndex(1)
    panel.saved.activated.emit(1)
    for kind in ("residual", "mlp", "attn"):
        assert np.array_equal(panel.result.restored[kind], result.restored[kind])
    window.close()


def test_trace_needs_a_fact(app, qtbot, settings, lm):  # noqa: F811
    window = make_window(qtbot, settings, lm)
    window.current_fact = None
    assert window.trace.start(window.trace_panel.params()) is False
    assert "pick a fact" in window.statusBar().currentMessage()
    window.close()


def test_a_fact_the_model_does_not_know_says_so_in_one_line():
    from kn_gui.session import Session, fact_key

    session = Session(geo_factset())
    assert session.known_note(FRANCE) == ""  # not checked: nothing claimed
    for template, correct in (("a", True), ("b", False), ("c", False), ("d", True)):
        session.checks[(fact_key(FRANCE), template)] = {"correct": correct, "prob": 0.1, "top1_token": " x"}
    note = session.known_note(FRANCE)
    assert note.count("\n") == 1 and "does not know this fact (top-1 on 2 of 4 checked prompts)" in note
    assert "template-like by construction" in note
    session.checks[(fact_key(FRANCE), "e")] = {"correct": True, "prob": 0.5, "top1_token": " Paris"}
    assert session.known_note(FRANCE) == ""  # 3 of 5: known


def test_the_not_known_note_reads_only_checks_of_the_runs_weights(app, qtbot, settings, lm):  # noqa: F811
    """After suppressing a fact's neurons the answer checks (made on the edited weights) said "The model does not
    know this fact ... template-like by construction" beside its run on the model's own weights."""
    window = make_window(qtbot, settings, lm)
    session = window.session
    window.attribution.active_edits = lambda: ["Suppress 3 neurons"]  # the weights as an edit left them
    window.attributions.check_facts([FRANCE])
    assert window.runner.wait_idle(30000)
    own = [v for (key, _), v in session.checks.items() if key == ("P36", "France", "Paris")]
    assert own and all(v["edits"] == ["Suppress 3 neurons"] for v in own)
    for v in own:
        v["correct"] = False  # the edit took the answer away everywhere
    assert session.known_note(FRANCE, []) == ""  # a run on the model's own weights: nothing claimed
    assert "does not know this fact" in session.known_note(FRANCE, ["Suppress 3 neurons"])
    window.close()


def test_the_runs_summary_follows_a_check_that_ends_after_it(app, qtbot, settings, lm):  # noqa: F811
    """The note under a run was written when the run was drawn: a check ending later (F6) left the old count."""
    window = make_window(qtbot, settings, lm)
    run = run_fact(qtbot, window, steps=1)
    window.session.checks.clear()
    window.attribution_panel.redraw()
    assert "does not know" not in window.attribution_panel.summary.text()
    for (key, template), v in list(window.session.checks.items()):
        v["correct"] = False
    window.attributions.check_facts([FRANCE])
    assert window.runner.wait_idle(30000)
    note = window.session.known_note(FRANCE, run.edits)
    assert note and window.attribution_panel.summary.text().endswith(note)  # the random tiny model knows nothing
    window.close()
