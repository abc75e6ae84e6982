"""Issue 12, "nothing lost, nothing stale" and "start": each test replays a sequence that lost or misreported
work in the window before the fix (tiny random models, fast)."""

from __future__ import annotations

import os

import pytest

pytest.importorskip("pytestqt")

from PySide6.QtCore import Qt  # noqa: E402

from kn_core.facts import Fact, Relation  # noqa: E402
from test_gui import FRANCE, apply_edit, app, geo_factset, lm, make_window, run_fact, settings, window  # noqa: E402,F401

KEY = ("P36", "France", "Paris")
REFINED = ("set", "refined: France \u2192 Paris")


def loose_thresholds(window):
    window.attribution_panel.t_control.spin.setValue(0.1)
    window.attribution_panel.p_control.spin.setValue(0.3)


def start_and_cancel_after_one_prompt(qtbot, window, steps=150):
    window.facts_panel.select_fact(FRANCE)
    window.attribution_panel.steps.setValue(steps)
    window.attributions.run_attribution("current")
    running = window.attribution.running[0]
    qtbot.waitUntil(lambda: len(running.scores) >= 1, timeout=60000)
    qtbot.mouseClick(window.cancel_button, Qt.LeftButton)
    assert window.runner.wait_idle(60000)
    return running


def test_cancelled_rerun_never_replaces_the_complete_run(window, qtbot, settings, lm, tmp_path, request):
    first = run_fact(qtbot, window, steps=2)
    request.getfixturevalue("pause_after_first_prompt")
    partial = start_and_cancel_after_one_prompt(qtbot, window)
    s = window.session
    assert s.runs[KEY] is first and first.complete
    assert s.partial_runs[KEY] is partial and partial.state == "cancelled" and 1 <= len(partial.scores) < 4
    title = window.attribution_panel.title.text()
    assert "running" not in title and window.attribution_panel.run is first
    path = str(tmp_path / "rerun.knproj")
    assert window.lifecycle.save_to(path, wait=True)
    again = make_window(qtbot, settings, lm)
    with qtbot.waitSignal(again.project_opened, timeout=30000):
        again.lifecycle.open_project(path)
    assert again.runner.wait_idle(30000)
    reopened, kept = again.session.runs[KEY], again.session.partial_runs[KEY]
    assert reopened.complete and len(reopened.scores) == len(first.scores)
    assert kept.state == "cancelled" and len(kept.scores) == len(partial.scores)
    assert "running" not in again.attribution_panel.title.text()
    again.close()


def test_cancelled_first_run_is_marked_partial_not_running(window, qtbot, settings, lm, tmp_path,
                                                          pause_after_first_prompt):
    partial = start_and_cancel_after_one_prompt(qtbot, window)
    assert window.session.runs[KEY] is partial and KEY not in window.session.partial_runs
    title = window.attribution_panel.title.text()
    assert "running" not in title and "partial run (cancelled)" in title
    path = str(tmp_path / "partial.knproj")
    assert window.lifecycle.save_to(path, wait=True)
    again = make_window(qtbot, settings, lm)
    with qtbot.waitSignal(again.project_opened, timeout=30000):
        again.lifecycle.open_project(path)
    assert again.runner.wait_idle(30000)
    assert again.session.runs[KEY].state == "cancelled"
    assert "partial run (cancelled)" in again.attribution_panel.title.text()
    again.close()


def test_fact_change_keeps_the_model_edits_redo_list(window, qtbot):
    """The issue's sequence: two model edits, back to <original model> in the History, add a relation."""
    run_fact(qtbot, window, steps=2)
    loose_thresholds(window)
    apply_edit(qtbot, window, {"kind": "Suppress", "target": REFINED, "scope": "answer"})
    apply_edit(qtbot, window, {"kind": "Amplify", "target": REFINED, "factor": 2.0, "scope": "all"})
    assert len(window.edit_stack.active_edits()) == 2
    window.undo_stack.setIndex(0)  # what clicking "<original model>" in the History view does
    assert window.edit_stack.active_edits() == []
    relation = Relation("P99", "made up", ("[X] is made of [Y].",))
    window.facts_panel.change_requested.emit("Add relation P99", window.session.factset.with_relation(relation))
    assert "P99" in window.session.factset.relations
    assert window.undo_stack.count() == 2 and window.menus.act_redo.isEnabled()
    window.redo()
    window.redo()
    assert [e.kind for e in window.edit_stack.active_edits()] == ["suppress", "amplify"]
    assert "P99" in window.session.factset.relations
    # one undo order across both histories: the redone amplify goes first, then the suppress, then the relation
    window.undo()
    assert [e.kind for e in window.edit_stack.active_edits()] == ["suppress"]
    window.undo()
    window.undo()
    assert window.edit_stack.active_edits() == [] and "P99" not in window.session.factset.relations


def france_checks(window):
    return {k[1]: v["prob"] for k, v in window.session.checks.items() if k[0] == KEY}


def test_undo_and_redo_recheck_the_facts_tree(window, qtbot):
    run_fact(qtbot, window, steps=2)
    loose_thresholds(window)
    original = france_checks(window)
    assert len(original) == 4
    apply_edit(qtbot, window, {"kind": "Suppress", "target": REFINED, "scope": "answer"})
    qtbot.waitUntil(lambda: len(france_checks(window)) == 4 and not window.runner.busy, timeout=30000)
    edited = france_checks(window)
    assert any(abs(edited[t] - original[t]) > 1e-6 for t in original)
    window.undo()
    assert france_checks(window) == {}  # never the previous model state's numbers
    qtbot.waitUntil(lambda: len(france_checks(window)) == 4 and not window.runner.busy, timeout=30000)
    assert france_checks(window) == pytest.approx(original, rel=1e-5, abs=1e-9)
    window.redo()
    assert france_checks(window) == {}
    qtbot.waitUntil(lambda: len(france_checks(window)) == 4 and not window.runner.busy, timeout=30000)
    assert france_checks(window) == pytest.approx(edited, rel=1e-5, abs=1e-9)


def test_attribution_on_edited_weights_says_so(window, qtbot, settings, lm, tmp_path):
    window.facts_panel.select_fact(FRANCE)
    window.attribution_panel.select_neuron(0, 1)
    apply_edit(qtbot, window, {"kind": "Suppress", "target": ("selection", None), "scope": "all"})
    run = run_fact(qtbot, window, steps=2)
    assert run.edits == [window.edit_stack.active_edits()[0].describe()]
    assert "on edited weights (1 active edit)" in window.attribution_panel.title.text()
    assert window.files.results_dict()["runs"][0]["edits_active"] == run.edits
    path = str(tmp_path / "edited.knproj")
    assert window.lifecycle.save_to(path, wait=True)
    window.undo()
    again = make_window(qtbot, settings, lm)
    with qtbot.waitSignal(again.project_opened, timeout=30000):
        again.lifecycle.open_project(path)
    assert again.runner.wait_idle(30000)
    assert again.session.runs[KEY].edits == run.edits
    assert "on edited weights" in again.attribution_panel.title.text()
    again.close()


def test_autosave_after_a_job_and_recovery_at_the_next_start(app, qtbot, settings, lm):
    crashed = make_window(qtbot, settings, lm)
    crashed._push_factset("Add fact", crashed.session.factset.with_fact(Fact("P36", "Germany", "Berlin")))
    run_fact(qtbot, crashed, steps=2)  # a finished job with unsaved changes: autosaved
    crashed.project._autosaving.join(30)
    autosaved = crashed.project.autosave_path()
    assert os.path.exists(autosaved)
    # the app is killed here (kill -9: nothing more runs, its autosave lock goes stale with its process); a new
    # start finds the file and offers it
    crashed.project._release_autosave_lock()
    fresh = make_window(qtbot, settings, lm)
    fresh.lifecycle.auto_recover = True
    with qtbot.waitSignal(fresh.project_opened, timeout=30000):
        assert fresh.lifecycle.offer_recovery()
    assert fresh.runner.wait_idle(30000)
    s = fresh.session
    assert Fact("P36", "Germany", "Berlin") in s.factset.facts
    assert s.runs[KEY].complete and len(s.runs[KEY].scores) == 4
    assert fresh.isWindowModified()  # recovered work is unsaved until the user saves it
    path = os.path.join(os.path.dirname(settings.fileName()), "recovered.knproj")
    assert fresh.lifecycle.save_to(path, wait=True)
    assert not os.path.exists(autosaved)  # saved: the autosave goes, and is not offered again
    assert fresh.project.recoverable() == []
    fresh.close()
    crashed.close()


def test_a_running_apps_autosave_is_not_offered_as_a_crashed_ones(app, qtbot, settings, lm):
    """A second app started while the first runs offered the first's live autosave: 'did not close cleanly ...
    Recover it?' (seen under Xvfb with two windows)."""
    running = make_window(qtbot, settings, lm)
    running._push_factset("Add fact", running.session.factset.with_fact(Fact("P36", "Germany", "Berlin")))
    running.project.autosave().join(30)
    second = make_window(qtbot, settings, lm)
    assert second.project.recoverable() == [] and not second.lifecycle.offer_recovery()
    running.project._release_autosave_lock()  # as when its process is killed: offered now
    assert second.project.recoverable() == [running.project.autosave_path()]
    second.close()
    running.close()


def test_no_recovery_offered_after_a_clean_close(app, qtbot, settings, lm):
    first = make_window(qtbot, settings, lm)
    first._push_factset("Add fact", first.session.factset.with_fact(Fact("P36", "Germany", "Berlin")))
    first.project.autosave().join(30)
    first.close()  # the user discards the changes (auto_discard)
    second = make_window(qtbot, settings, lm)
    assert not second.lifecycle.offer_recovery()
    second.close()


def test_open_project_then_load_model_are_queued(app, qtbot, settings, lm, tmp_path):
    """`kn-studio PROJECT.knproj --model default`: the load waits for the opening instead of being refused."""
    saver = make_window(qtbot, settings, lm)
    run_fact(qtbot, saver, steps=2)
    path = str(tmp_path / "start.knproj")
    assert saver.lifecycle.save_to(path, wait=True)
    saver.close()
    window = make_window(qtbot, settings, load_model_fn=lambda *a, **k: lm)
    seen = []
    window.error_shown.connect(lambda title, message: seen.append(title))
    window.lifecycle.open_project(path)
    window.load_model("default")
    assert window.runner.wait_idle(30000)
    assert not seen, seen
    assert window.session.lm is lm and window.project.path == path
    assert window.session.runs[KEY].complete
    window.close()


def test_erase_with_fewer_neurons_offers_to_attribute_the_relation(window, qtbot):
    run_fact(qtbot, window, steps=2)
    loose_thresholds(window)
    report = apply_edit(qtbot, window, {"kind": "Erase relation", "target": None, "k": 1000, "fill": "zero"})
    assert report["requested"] == 1000 and len(report["edit"]["neurons"]) < 1000
    assert report["relation"] == "P36" and report["model"]["sha256"] == window.session.lm.sha256
    assert window.edits_panel.attribute_button.isVisibleTo(window)
    finished = []
    window.run_finished.connect(finished.append)
    window.undo()
    qtbot.mouseClick(window.edits_panel.attribute_button, Qt.LeftButton)
    assert window.runner.wait_idle(60000)
    assert {r.fact for r in finished} == set(window.session.factset.facts_of("P36"))


def test_save_dialogs_start_in_the_documents_folder(window, monkeypatch):
    from PySide6.QtWidgets import QFileDialog

    from kn_gui.panels.common import default_folder

    asked = []
    monkeypatch.setattr(QFileDialog, "getSaveFileName", lambda *a, **k: (asked.append(a[2]), ("", ""))[1])
    window.lifecycle.save_as()
    window.files.export_results_dialog()
    assert asked and all(os.path.dirname(p) == str(default_folder()) for p in asked)


def saved_snapshot(runs: int = 3, prompts: int = 2):
    """A project of `runs` complete runs (of geo_factset's facts) with `prompts` random prompts each, one cancelled
    run and a neuron set, without a model: what project_io.save_project writes."""
    import numpy as np

    from kn_core.attribution import PromptScores
    from kn_core.facts import Prompt
    from kn_gui.project_io import ProjectSnapshot
    from kn_gui.session import CANCELLED, COMPLETE, NeuronSet, Run

    factset, rng = geo_factset(), np.random.default_rng(0)
    kept = []
    for i, fact in enumerate(factset.facts[: runs + 1]):
        texts = [Prompt(f"{k}: the capital of {fact.subject} is", f" {fact.object}", (7,), f"[X] {k} [Y]", fact,
                        "causal") for k in range(prompts)]
        scores = [PromptScores(p.text, p.answer, p.answer_ids, rng.standard_normal((3, 72)).astype(np.float32),
                               rng.standard_normal((3, 72)).astype(np.float32), 0.5, [0.5], [], 1.0, {"steps": 2})
                  for p in texts]
        state = COMPLETE if i < runs else CANCELLED
        kept.append(Run(fact, texts, scores if i < runs else scores[:1], {"steps": 2}, seconds=1.0, state=state))
    return ProjectSnapshot(factset, runs=kept, sets=[NeuronSet("mine", "user", [(0, 1), (2, 5)], "test")])


def test_a_save_is_one_commit(tmp_path, monkeypatch):
    """project_io.save_project writes the temporary file in one transaction (one commit, one wait for the disk,
    not one per prompt of every run), and the file reads back as the snapshot was."""
    from sqlalchemy import event

    import kn_core.store as store
    from kn_gui.project_io import open_project_file, save_project

    commits, real = [], store.create_project

    def counting(*args, **kwargs):  # commits after the empty project is created
        project = real(*args, **kwargs)
        event.listen(project._db._engine, "commit", lambda connection: commits.append(1))
        return project

    monkeypatch.setattr(store, "create_project", counting)
    snap = saved_snapshot(runs=3, prompts=2)
    path = save_project(str(tmp_path / "one.knproj"), snap)
    assert len(commits) == 1
    back = open_project_file(path)
    assert [(r.fact, r.state, len(r.scores)) for r in back.runs] == \
        [(r.fact, r.state, len(r.scores)) for r in snap.runs]
    for got, want in zip(back.runs, snap.runs):
        for a, b in zip(got.scores, want.scores):
            assert (a.scores == b.scores).all() and (a.activations == b.activations).all() and a.prob == b.prob
    assert [(s.name, list(s.neurons)) for s in back.sets] == [("mine", [(0, 1), (2, 5)])]


def test_a_failed_save_changes_nothing(tmp_path, monkeypatch):
    """A save that fails half-way (here the third prompt's arrays) leaves the project file it was replacing
    byte for byte, and no temporary file: the transaction is rolled back whole and the file removed."""
    from kn_core.store import Project
    from kn_gui.project_io import save_project

    path = tmp_path / "kept.knproj"
    save_project(str(path), saved_snapshot(runs=1, prompts=1))
    before = path.read_bytes()
    real, calls = Project.add_prompt_result, []

    def failing(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk gone")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Project, "add_prompt_result", failing)
    with pytest.raises(OSError, match="disk gone"):
        save_project(str(path), saved_snapshot(runs=3, prompts=2))
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.knproj"]  # no temporary file left behind


def test_saving_from_the_app_keeps_what_other_front_ends_stored(window, qtbot, tmp_path):
    """The app saves by rewriting the whole file from its session: evaluations stored by `kn edit --project` or
    `kn trace`, and settings of other tools, which the app does not show, were dropped by the first save. They
    are read on open and written back, with their model; the app's own settings are still its own."""
    from kn_core.store import open_project
    from kn_gui.project_io import save_project

    path = str(tmp_path / "shared.knproj")
    save_project(path, saved_snapshot(runs=1, prompts=1))
    model = {"source": "tiny", "sha256": "ab" * 32, "dtype": "float32", "family": "gpt2", "kind": "causal",
             "layers": 3, "neurons": 72}
    project = open_project(path)
    with project.atomic("the CLI's records"):
        project.add_evaluation("edit", {"metrics": {"reliability": 0.75}}, params={"edit": "suppress"},
                               model=model, name="kn edit suppress", elapsed_s=2.5)
        project.add_evaluation("trace", {"peak": [3, 1]}, name="kn trace")
        project.set_setting("another.tool", {"kept": [1, 2]})
    want = [(e.kind, e.name, e.params, e.report, e.status, e.started_at, e.elapsed_s)
            for e in project.list_evaluations()]
    project.close()

    with qtbot.waitSignal(window.project_opened, timeout=30000):
        window.lifecycle.open_project(path)
    assert window.lifecycle.save_to(path, wait=True)

    project = open_project(path, read_only=True)
    try:
        assert [(e.kind, e.name, e.params, e.report, e.status, e.started_at, e.elapsed_s)
                for e in project.list_evaluations()] == want
        (stored_model,) = [m for m in project.list_models() if m.sha256 == model["sha256"]]
        assert project.list_evaluations("edit")[0].model_id == stored_model.id
        assert project.get_setting("another.tool") == {"kept": [1, 2]}
    finally:
        project.close()


def test_answer_checks_come_back_when_the_projects_weights_are_loaded_after_it_opens(window, qtbot, settings, lm,
                                                                                   tmp_path):
    """Opened (or recovered) before any model is loaded, a project's answer checks came back never: they are kept
    with the weights they were made on and restored when those weights are loaded, never for other weights."""
    from tiny import TINY_CAUSAL, make_tiny

    run_fact(qtbot, window, steps=1)
    saved = france_checks(window)
    assert len(saved) == 4
    path = str(tmp_path / "checked.knproj")
    assert window.lifecycle.save_to(path, wait=True)
    for weights, restored in ((lm, True), (make_tiny(TINY_CAUSAL, seed=7), False)):
        again = make_window(qtbot, settings)  # no model yet
        with qtbot.waitSignal(again.project_opened, timeout=30000):
            again.lifecycle.open_project(path)
        assert again.runner.wait_idle(30000) and again.session.checks == {}
        assert (weights.sha256 == lm.sha256) is restored
        again.set_model(weights)
        assert france_checks(again) == (saved if restored else {})  # at once: before any new check ran
        assert again.runner.wait_idle(30000)
        again.lifecycle.auto_discard = True
        again.close()
