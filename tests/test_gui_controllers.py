"""The GUI's controllers driven headless (no window, no panels): typed events, the one history, projects."""

from __future__ import annotations

import pytest

pytest.importorskip("pytestqt")

from kn_core.attribution import AttributionParams  # noqa: E402
from kn_core.edit_stack import EditStack  # noqa: E402
from kn_core.edits import Amplify, Suppress  # noqa: E402
from kn_core.history import MODEL, SESSION, History  # noqa: E402
from kn_core.facts import Fact, Relation  # noqa: E402
from kn_gui.commands import QtHistory, factset_change  # noqa: E402
from kn_gui.controllers import UserError  # noqa: E402
from kn_gui.controllers import attribution as A  # noqa: E402
from kn_gui.controllers import edits as E  # noqa: E402
from kn_gui.controllers import project as P  # noqa: E402
from kn_gui.project_io import open_project_file  # noqa: E402
from kn_gui.session import Session  # noqa: E402
from kn_gui.worker import JobRunner  # noqa: E402
from test_gui import FRANCE, geo_factset  # noqa: E402
from tiny import TINY_CAUSAL, make_tiny  # noqa: E402


@pytest.fixture
def parts(qapp, tmp_path):
    from PySide6.QtCore import QSettings

    session = Session(geo_factset())
    session.lm = make_tiny(TINY_CAUSAL)
    runner = JobRunner()
    history = History()
    edits = E.EditsController(session, runner, history)
    edits.set_model(session.lm)
    attribution = A.AttributionController(session, runner, edits.active_descriptions)
    project = P.ProjectController(session, runner, edits, QSettings(str(tmp_path / "s.ini"), QSettings.IniFormat))
    project.autosave_folder = str(tmp_path / "autosave")
    events = []
    for controller in (attribution, edits, project):
        controller.event.connect(events.append)
    yield session, runner, history, edits, attribution, project, events
    runner.shutdown()


def test_history_one_undo_order_and_no_cross_truncation(qapp):
    """The core history through the app's adapter: the History view's stack mirrors the model edits, a click in
    it walks the core, a fact-set change keeps the edits' redo list, one undo order."""
    lm = make_tiny(TINY_CAUSAL)
    session, history = Session(geo_factset()), History()
    view, stack = QtHistory(history), EditStack(lm, history)
    changed = []
    view.lane_changed.connect(changed.append)
    a, b = Suppress(((0, 1),)), Amplify(((1, 2),), 2.0)
    stack.push(a)
    stack.push(b)
    shown = view.view_stack
    assert shown.count() == 2 and shown.index() == 2 and shown.text(1) == b.describe()
    assert history.next_undo().edit is b
    shown.setIndex(0)  # a click on <original model> in the History view
    assert stack.active_edits() == [] and changed == [MODEL] * 4
    history.push(factset_change(session, session.factset.with_relation(Relation("P99", "in", ("[X] in [Y].",))),
                                "Add relation P99"))  # a fact-set change: the edits' redo list stays
    assert shown.count() == 2 and history.can_redo(MODEL) and history.next_undo().lane == SESSION
    assert history.next_redo().edit is a
    history.redo()
    assert shown.index() == 1 and history.next_undo().edit is a  # the edit just redone is undone first
    stack.push(b)  # a new edit drops the model's redo list
    assert shown.count() == 2 and shown.index() == 2 and history.next_undo().edit is b
    history.clear()
    assert shown.count() == 0 and stack.active_edits() == []


def test_attribution_events_are_typed_and_cancel_keeps_the_complete_run(parts, qtbot, request):
    session, runner, history, edits, attribution, project, events = parts
    odd = Fact("P99", "France", "Europe")  # [Y] before [X]: no prompt a causal model can continue
    session.factset = session.factset.with_relation(Relation("P99", "in", ("[Y] contains [X].",))).with_fact(odd)
    with pytest.raises(UserError, match="No usable prompts"):
        attribution.start([odd], AttributionParams(steps=1))
    assert not runner.busy and ("P99", "France", "Europe") not in session.runs
    attribution.start([FRANCE], AttributionParams(steps=2))
    assert runner.wait_idle(60000)
    kinds = [type(e) for e in events]
    assert A.PromptDone in kinds and A.RunFinished in kinds and kinds[-1] is A.AllDone
    assert all(not isinstance(e, tuple) for e in events)
    first = session.runs[("P36", "France", "Paris")]
    assert first.complete and first.edits == []
    request.getfixturevalue("pause_after_first_prompt")
    attribution.start([FRANCE], AttributionParams(steps=150))
    run = attribution.running[0]
    qtbot.waitUntil(lambda: len(run.scores) >= 1, timeout=60000)
    runner.cancel()
    assert runner.wait_idle(60000)
    stopped = [e for e in events if isinstance(e, A.RunsStopped)][-1]
    assert stopped.outcome == "cancelled" and stopped.kept == len(run.scores)
    assert session.runs[("P36", "France", "Paris")] is first
    assert session.partial_runs[("P36", "France", "Paris")] is run and run.state == "cancelled"


def test_edit_report_lives_in_the_edit_stack_and_project_round_trip(parts, qtbot, tmp_path):
    session, runner, history, edits, attribution, project, events = parts
    attribution.start([FRANCE], AttributionParams(steps=2))
    assert runner.wait_idle(60000)
    edits.apply({"kind": "Suppress", "scope": "answer"}, FRANCE, [(0, 1), (1, 2)])
    assert runner.wait_idle(60000)
    evaluated = [e for e in events if isinstance(e, E.EditEvaluated)][-1]
    assert edits.edit_stack.entries[0].report is evaluated.report
    assert {r["group"] for r in evaluated.report["rows"]} >= {"fact", "same relation", "other relations"}
    state, model = edits.saved_state()
    assert state["entries"][0]["report"]["title"] == evaluated.report["title"]
    path = str(tmp_path / "p.knproj")
    project.save_to(path)
    assert runner.wait_idle(60000)
    assert isinstance(events[-1], P.ProjectSaved) and not project.modified()
    snap = open_project_file(path)
    assert [r.state for r in snap.runs] == ["complete"] and snap.edit_state["entries"][0]["report"]
    assert snap.t == session.t and snap.factset.facts == session.factset.facts


@pytest.mark.parametrize("templates", ["prefix", "end-only"])
def test_a_gui_run_is_what_the_runner_resumes_with_the_same_templates(parts, tmp_path, templates):
    """A fact attributed in the GUI and saved is recognised by `kn attribute --facts`' resume (runner) when the
    model, the attribution parameters and the causal templates are the same; other templates attribute it anew."""
    from kn_core.runner import attribute_factset
    from kn_core.store import open_project

    session, runner, history, edits, attribution, project, events = parts
    session.causal_templates = templates
    attribution.start([FRANCE], AttributionParams(steps=2))
    assert runner.wait_idle(60000)
    path = str(tmp_path / "gui.knproj")
    project.save_to(path)
    assert runner.wait_idle(60000)
    other = "end-only" if templates == "prefix" else "prefix"
    with open_project(path) as stored:
        same = attribute_factset(stored, session.lm, session.factset, AttributionParams(steps=2), relations="P36",
                                 causal_templates=templates)
        assert (same.already_stored, same.attributed) == (1, 3)  # France was the GUI's
        different = attribute_factset(stored, session.lm, session.factset, AttributionParams(steps=2),
                                      relations="P36", causal_templates=other)
        assert (different.already_stored, different.attributed) == (0, 4)
    snap = open_project_file(path)  # and the GUI reads the runner's runs with their templates
    assert sorted(r.params["causal_templates"] for r in snap.runs) == sorted([templates] * 4 + [other] * 4)


def test_an_edit_is_judged_on_prompts_rendered_as_its_run_rendered_them(parts):
    """The Edits panel's plan renders the evaluation prompts with the causal templates of the run that found the
    neurons (end-only here), even after the window's choice changed; with no run, the window's choice."""
    from test_gui import CAPITAL

    session, runner, history, edits, attribution, project, events = parts
    tail = "[X]'s capital [Y] is old"
    session.factset = session.factset.with_relation(Relation("P36", "capital", CAPITAL + (tail,)))
    session.causal_templates = "end-only"
    attribution.start([FRANCE], AttributionParams(steps=2))
    assert runner.wait_idle(60000)
    run = session.runs[("P36", "France", "Paris")]
    assert run.params["causal_templates"] == "end-only" and tail not in {p.template for p in run.prompts}
    session.causal_templates = "prefix"
    request = edits.request({"kind": "Suppress", "scope": "answer"}, FRANCE, [(0, 1), (1, 2)])
    assert request.causal_templates == "end-only"
    plan = edits.planner(request)()
    assert [p.text for p in plan.prompts["fact"]] == [p.text for p in run.prompts] and plan.prompts["held-out"] == []
    japan = Fact("P36", "Japan", "Tokyo")  # no run of it: the window's choice
    assert edits.request({"kind": "Suppress", "scope": "answer"}, japan, [(0, 1)]).causal_templates == "prefix"
