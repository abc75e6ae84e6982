"""The degeneracy table in the Edits panel: the controller runs kn_core.degeneracy on the worker (cancelable),
the panel asks through apply_requested with the chosen neurons and shows every row with its verdict."""

from __future__ import annotations

import time

import pytest

pytest.importorskip("pytestqt")

from kn_core import degeneracy as D  # noqa: E402
from kn_core.history import History  # noqa: E402
from kn_gui.controllers import UserError  # noqa: E402
from kn_gui.controllers import edits as E  # noqa: E402
from kn_gui.session import Session  # noqa: E402
from kn_gui.worker import JobRunner  # noqa: E402
from test_gui import FRANCE, geo_factset  # noqa: E402
from tiny import TINY_CAUSAL, make_tiny  # noqa: E402

NEURONS = [(1, 3), (2, 4), (2, 40)]
REQUEST = {"kind": "Degeneracy", "target": ("selection",), "criterion": "prob", "removed_below": 0.5,
           "max_neurons": 20}


@pytest.fixture
def parts(qapp):
    session = Session(geo_factset())
    session.lm = make_tiny(TINY_CAUSAL)
    runner = JobRunner()
    edits = E.EditsController(session, runner, History())
    edits.set_model(session.lm)
    events = []
    edits.event.connect(events.append)
    yield session, runner, edits, events
    runner.shutdown()


def test_the_worker_runs_the_engine_test_and_sends_its_result(parts):
    session, runner, edits, events = parts
    edits.apply(REQUEST, FRANCE, NEURONS)
    assert runner.wait_idle(60000)
    (event,) = [e for e in events if isinstance(e, E.DegeneracyTested)]
    prompts, _ = session.prompts_for(FRANCE)
    expected = D.degeneracy_test(session.lm, prompts, NEURONS, D.DegeneracyParams(criterion="prob"))
    assert event.result == expected and event.fact == "France \u2192 Paris" and event.edits_in_force == 0
    assert len(edits.edit_stack) == 0  # a test, not an edit: nothing enters the history


@pytest.mark.parametrize("fact, neurons, words", [(None, NEURONS, "Select a fact"),
                                                  (FRANCE, [], "no neurons chosen"),
                                                  (FRANCE, [(9, 1)], "outside this model")])
def test_bad_requests_are_refused_before_any_work(parts, fact, neurons, words):
    session, runner, edits, events = parts
    with pytest.raises(UserError) as exc:
        edits.apply(REQUEST, fact, neurons)
    assert words in str(exc.value.args) and not runner.busy and not events


def test_cancel_stops_the_job_and_sends_nothing(parts, monkeypatch):
    session, runner, edits, events = parts
    real = D.suppressed_answers

    def waits_for_cancel(lm, prompts, subsets, batch_size=32, task=None):
        while not task.cancelled:  # the job is running in the worker until the Cancel below
            time.sleep(0.01)
        return real(lm, prompts, subsets, batch_size, task)

    monkeypatch.setattr(D, "suppressed_answers", waits_for_cancel)
    edits.apply(REQUEST, FRANCE, NEURONS)
    assert runner.busy
    runner.cancel()
    assert runner.wait_idle(60000)
    assert not [e for e in events if isinstance(e, E.DegeneracyTested)]
    assert all(not m._forward_pre_hooks for m in session.lm.model.modules())


def test_panel_asks_with_its_target_and_shows_every_row(qapp, qtbot):
    from PySide6.QtGui import QUndoStack

    from kn_gui.panels.edits_panel import EditsPanel

    session = Session(geo_factset())
    session.lm = make_tiny(TINY_CAUSAL)
    panel = EditsPanel(session, QUndoStack())
    qtbot.addWidget(panel)
    asked = []
    panel.apply_requested.connect(asked.append)
    panel.degeneracy.criterion.setCurrentIndex(1)
    panel.degeneracy.run_button.click()
    assert asked == [{"kind": "Degeneracy", "target": panel.target.currentData(), "criterion": "prob",
                      "removed_below": 0.5, "max_neurons": 20}]
    prompts, _ = session.prompts_for(FRANCE)
    result = D.degeneracy_test(session.lm, prompts, NEURONS, D.DegeneracyParams(criterion="prob"))
    panel.show_degeneracy(result, "France \u2192 Paris", edits_in_force=1)
    assert panel.result_tabs.currentWidget() is panel.degeneracy
    rows = panel.degeneracy.table.displayed_rows()
    assert len(rows) == 2 * (3 + 3 + 1)  # knowledge and random: 3 alone, 3 pairs, all
    assert [r[0] for r in rows] == ["knowledge"] * 7 + ["random"] * 7
    assert rows[0][1] == "L1 N3" and rows[3][1] == "L1 N3 + L2 N4" and rows[6][1].startswith("all: ")
    assert all(r[6] in ("leaves", "removes", "redundant") for r in rows)
    assert rows[0][4] == result["singles"][0]["prob_ratio"]["text"]
    assert "1 edit(s) in force" in panel.degeneracy.title.text()
    assert result["params"]["definition"].capitalize() in panel.degeneracy.summary.text()


def test_window_routes_the_result_to_the_edits_panel(qtbot, tmp_path):
    from PySide6.QtCore import QSettings

    from test_gui import make_window

    lm = make_tiny(TINY_CAUSAL)
    window = make_window(qtbot, QSettings(str(tmp_path / "s.ini"), QSettings.IniFormat), lm=lm)
    prompts, _ = window.session.prompts_for(FRANCE)
    result = D.degeneracy_test(lm, prompts, NEURONS, D.DegeneracyParams(control=False))
    window.edits.event.emit(E.DegeneracyTested(result, "France \u2192 Paris", 0))
    panel = window.edits_panel
    assert panel.result_tabs.currentWidget() is panel.degeneracy and panel.degeneracy.table.table.rowCount() == 7
