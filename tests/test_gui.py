"""pytest-qt journeys through the real window on tiny random models (fast)."""

from __future__ import annotations

import gc
import json
import os
import time

import numpy as np
import pytest
import torch

pytest.importorskip("pytestqt")

from PySide6.QtCore import QCoreApplication, QEvent, QPointF, QSettings, Qt, QTimer  # noqa: E402
from PySide6.QtWidgets import QApplication, QMessageBox  # noqa: E402

from kn_core.facts import Fact, FactSet, Relation  # noqa: E402
from kn_gui.app import build_app  # noqa: E402
from kn_gui.main_window import MainWindow  # noqa: E402
from tiny import TINY_CAUSAL, TINY_MASKED, make_tiny  # noqa: E402

CAPITAL = ("The capital of [X] is [Y].", "[X]'s capital city is [Y].", "The capital city of [X] is [Y].",
           "[X] has its capital in [Y].")
LANGUAGE = ("The official language of [X] is [Y].", "People in [X] speak [Y].", "In [X] people speak [Y].")


def geo_factset() -> FactSet:
    rels = {"P36": Relation("P36", "capital", CAPITAL), "P37": Relation("P37", "official language", LANGUAGE)}
    facts = [Fact("P36", c, o) for c, o in [("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"),
                                            ("Spain", "Madrid")]]
    facts += [Fact("P37", c, o) for c, o in [("France", "French"), ("Japan", "Japanese"), ("Italy", "Italian")]]
    return FactSet("geo", rels, facts)


FRANCE = Fact("P36", "France", "Paris")


@pytest.fixture(scope="session")
def app():
    return build_app()


@pytest.fixture
def settings(tmp_path):
    return QSettings(str(tmp_path / "settings.ini"), QSettings.IniFormat)


def make_window(qtbot, settings, lm=None, load_model_fn=None, factset=None):
    window = MainWindow(load_model_fn=load_model_fn, factset=factset or geo_factset(), settings=settings,
                        confirm_dialogs=False)
    qtbot.addWidget(window)
    window.lifecycle.auto_discard = True
    window.project.autosave_folder = os.path.join(os.path.dirname(settings.fileName()), "autosave")
    window.show()
    if lm is not None:
        window.set_model(lm)
        assert window.runner.wait_idle(30000)
    return window


@pytest.fixture
def lm():
    return make_tiny(TINY_CAUSAL)


@pytest.fixture
def window(app, qtbot, settings, lm):
    w = make_window(qtbot, settings, lm)
    yield w
    w.lifecycle.auto_discard = True
    w.close()


def weights(lm):
    return {k: v.clone() for k, v in lm.model.state_dict().items()}


def same_weights(lm, saved) -> bool:
    now = lm.model.state_dict()
    return all(torch.equal(now[k], v) for k, v in saved.items())


def hooks(lm) -> int:
    return sum(len(m._forward_pre_hooks) for m in lm.layout.out_projs)


def run_fact(qtbot, window, fact=FRANCE, steps=4):
    window.facts_panel.select_fact(fact)
    window.attribution_panel.steps.setValue(steps)
    with qtbot.waitSignal(window.run_finished, timeout=60000):
        qtbot.keyClick(window, Qt.Key_F5)
    assert window.runner.wait_idle(30000)
    return window.session.runs[(fact.relation, fact.subject, fact.object)]


def apply_edit(qtbot, window, request):
    reports, failures = [], []
    window.edit_evaluated.connect(reports.append)
    window.error_shown.connect(lambda title, message: failures.append(f"{title}: {message}"))
    window.editing.apply_edit(request)
    qtbot.waitUntil(lambda: bool(reports or failures), timeout=60000)
    assert not failures, failures
    assert window.runner.wait_idle(30000)
    return reports[-1]


def errors(window):
    seen = []
    window.error_shown.connect(lambda title, message: seen.append((title, message)))
    return seen


# ----------------------------------------------------------------------------------------------- journeys

def test_full_journey_tiny_causal(app, qtbot, settings, lm, tmp_path):
    window = make_window(qtbot, settings, load_model_fn=lambda *a, **k: lm)
    original = weights(lm)
    # load the model through the worker, with progress
    with qtbot.waitSignal(window.model_loaded, timeout=30000):
        qtbot.mouseClick(window.model_panel.load_button, Qt.LeftButton)
    assert window.runner.wait_idle(30000)
    assert window.model_panel.info["layers"].text() == str(lm.layout.layers)
    assert window.model_panel.info["neurons"].text() == str(lm.layout.neurons)
    assert window.model_panel.info["sha256"].toolTip() == lm.sha256
    # checks were run for every prompt: the facts tree shows a marker per prompt
    assert len(window.session.checks) == 4 * 4 + 3 * 3
    # pick a fact, run attribution (F5)
    run = run_fact(qtbot, window)
    assert run.complete and len(run.scores) == 4
    ap = window.attribution_panel
    heights = ap.layer_bars.opts["height"]
    assert len(heights) == lm.layout.layers and np.any(np.asarray(heights) != 0)
    assert ap.image.image is not None and ap.image.image.shape == (lm.layout.layers, lm.layout.neurons)
    ap.tabs.setCurrentIndex(1)  # the per-prompt comparison is drawn when its tab is shown
    assert ap.prompt_table.table.rowCount() == 4
    assert sum(line.xData is not None and len(line.xData) > 0 for line in ap._prompt_lines) >= 1
    # t / p are views: moving them recomputes the refined set at once
    refined_at = {}
    for t in (0.2, 0.6):
        ap.t_control.spin.setValue(t)
        refined_at[t] = list(window.session.neuron_sets["refined: France \u2192 Paris"].neurons)
    assert len(refined_at[0.6]) <= len(refined_at[0.2])
    ap.t_control.slider.setValue(10)
    assert window.session.t == pytest.approx(0.10)
    assert ap.t_control.spin.value() == pytest.approx(0.10)
    ap.p_control.spin.setValue(0.5)
    assert window.session.p == pytest.approx(0.5)
    refined = window.session.neuron_sets["refined: France \u2192 Paris"].neurons
    assert refined == window.session.refined(run)
    assert sum(ap.hist_bars.opts["height"]) == len(refined)
    assert refined, "tiny model should have refined neurons at t=0.1, p=0.5"
    # suppress the refined set: the fact's probabilities move; controls are in the table
    report = apply_edit(qtbot, window, {"kind": "Suppress", "target": ("set", "refined: France \u2192 Paris"),
                                        "scope": "answer"})
    groups = {r["group"] for r in report["rows"]}
    assert groups == {"fact", "same relation", "other relations"}
    fact_rows = [r for r in report["rows"] if r["group"] == "fact"]
    assert any(abs(r["after"] - r["before"]) > 0 for r in fact_rows)
    assert window.edits_panel.table.table.rowCount() == len(report["rows"])
    assert hooks(lm) > 0 and window.isWindowModified()
    # undo (Ctrl+Z): hooks gone, weights equal the original
    qtbot.keyClick(window, Qt.Key_Z, Qt.ControlModifier)
    assert hooks(lm) == 0 and same_weights(lm, original)
    # redo (Ctrl+Shift+Z) then a weight edit (update), undone exactly
    qtbot.keyClick(window, Qt.Key_Z, Qt.ControlModifier | Qt.ShiftModifier)
    assert hooks(lm) > 0
    apply_edit(qtbot, window, {"kind": "Update", "target": ("set", "refined: France \u2192 Paris"),
                               "new_object": "Rome", "lambda1": 1.0, "lambda2": 8.0})
    assert not same_weights(lm, original)
    window.undo()
    window.undo()
    assert same_weights(lm, original) and hooks(lm) == 0
    window.redo()  # leave the suppress applied, the update undone (redo-able)
    assert window.edit_stack.active_edits()[0].kind == "suppress"
    # save, close, reopen: same state
    path = str(tmp_path / "journey.knproj")
    assert window.lifecycle.save_to(path, wait=True)
    assert not window.isWindowModified()
    saved_t, saved_p = window.session.t, window.session.p
    saved_scores = [s.scores.copy() for s in run.scores]
    saved_sets = {k: list(v.neurons) for k, v in window.session.neuron_sets.items()}
    window.close()
    assert same_weights(lm, original) and hooks(lm) == 0  # closing reverts the edits
    again = make_window(qtbot, settings, lm)
    with qtbot.waitSignal(again.project_opened, timeout=30000):
        again.lifecycle.open_project(path)
    assert again.runner.wait_idle(30000)
    s = again.session
    assert s.factset.facts == geo_factset().facts
    assert (s.t, s.p) == (pytest.approx(saved_t), pytest.approx(saved_p))
    reopened = s.runs[("P36", "France", "Paris")]
    assert all(np.array_equal(a.scores, b) for a, b in zip(reopened.scores, saved_scores))
    assert {k: list(map(tuple, v.neurons)) for k, v in s.neuron_sets.items()} == \
        {k: list(map(tuple, v)) for k, v in saved_sets.items()}
    assert again.attribution_panel.run is reopened
    assert again.undo_stack.count() == 2 and again.undo_stack.index() == 1
    assert [e.kind for e in again.edit_stack.active_edits()] == ["suppress"] and hooks(lm) > 0
    assert again.edits_panel.table.table.rowCount() > 0  # the saved report is shown again
    assert not again.isWindowModified()
    again.undo()
    assert hooks(lm) == 0 and same_weights(lm, original)
    again.close()


def test_masked_model_journey(app, qtbot, settings):
    lm = make_tiny(TINY_MASKED)
    window = make_window(qtbot, settings, lm)
    run = run_fact(qtbot, window, Fact("P37", "France", "French"), steps=3)
    assert len(run.scores) == 3
    original = weights(lm)
    window.attribution_panel.t_control.spin.setValue(0.1)
    window.attribution_panel.p_control.spin.setValue(0.3)
    apply_edit(qtbot, window, {"kind": "Amplify", "target": ("set", "refined: France \u2192 French"),
                               "factor": 2.0, "scope": "answer"})
    window.undo()
    assert same_weights(lm, original) and hooks(lm) == 0
    window.close()


def test_cancel_mid_run_keeps_finished_prompts(window, qtbot, pause_after_first_prompt):
    fact = FRANCE
    window.facts_panel.select_fact(fact)
    window.attribution_panel.steps.setValue(150)
    window.attributions.run_attribution("current")
    run = window.session.runs[("P36", "France", "Paris")]
    qtbot.waitUntil(lambda: len(run.scores) >= 1, timeout=60000)
    outcomes = []
    window.runner.job_ended.connect(lambda name, outcome, msg: outcomes.append(outcome))
    qtbot.mouseClick(window.cancel_button, Qt.LeftButton)
    assert window.runner.wait_idle(60000)
    assert outcomes == ["cancelled"]
    assert not run.complete and 1 <= len(run.scores) < 4
    assert "cancelled" in window.statusBar().currentMessage().lower()
    assert not window.cancel_button.isVisible()
    assert window.attribution_panel.run_button.isEnabled()
    # the app is usable afterwards: a fresh run completes
    run2 = run_fact(qtbot, window, fact, steps=2)
    assert run2.complete


def test_cancel_before_any_prompt_restores_previous_run(window, qtbot):
    first = run_fact(qtbot, window, steps=2)
    window.attribution_panel.steps.setValue(200)
    window.attributions.run_attribution("current")
    window.cancel_job()
    assert window.runner.wait_idle(60000)
    assert window.session.runs[("P36", "France", "Paris")] is first


def test_ui_thread_stays_responsive_during_attribution(app, qtbot, settings):
    """A 20 ms QTimer heartbeat is never late by more than 100 ms while attribution streams into the plots."""
    # wider and deeper than the other tests' model, so the job lasts seconds even on a fast machine
    window = make_window(qtbot, settings, make_tiny(TINY_CAUSAL, n_embd=256, n_inner=1024, n_layer=8))
    facts = window.session.factset.facts
    window.facts_panel.select_facts(facts)
    window.attribution_panel.steps.setValue(60)
    # pytest-qt deleteLater()s earlier tests' windows; destroying them in this test's event loop took 0.2-1.2 s
    # of the UI thread (seen with py-spy), which is the harness, not the app: destroy them before measuring
    gc.collect()
    QCoreApplication.sendPostedEvents(None, QEvent.Type.DeferredDelete)
    QCoreApplication.processEvents()
    ticks = []
    timer = QTimer()
    timer.setInterval(20)
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    started = time.perf_counter()
    with qtbot.waitSignal(window.runner.job_ended, timeout=300000):
        timer.start()
        window.attributions.run_attribution("selection")
    ended = time.perf_counter()
    timer.stop()
    assert all(r.complete for r in (window.session.runs[(f.relation, f.subject, f.object)] for f in facts))
    # the job must outlast many heartbeats, or the check below proves nothing
    assert ended - started > 0.5, f"workload too small: the job took {ended - started:.2f} s"
    # the gaps include the job's start and end, so a UI thread blocked at either edge is caught too
    gaps = np.diff([started, *ticks, ended])
    assert gaps.max() < 0.020 + 0.100, f"heartbeat late by {gaps.max() - 0.020:.3f} s (gap {gaps.argmax()} of {len(gaps)})"


def test_run_selected_facts_streams_each_fact(window, qtbot):
    facts = window.session.factset.facts_of("P36")[:2]
    window.facts_panel.select_facts(facts)
    window.attribution_panel.steps.setValue(2)
    finished = []
    window.run_finished.connect(finished.append)
    window.attributions.run_attribution("selection")
    assert window.runner.wait_idle(60000)
    assert [r.fact for r in finished] == facts
    # relation-level neurons and erase use the relation's runs
    window.attribution_panel.t_control.spin.setValue(0.1)
    window.attribution_panel.p_control.spin.setValue(0.3)
    window.facts_panel.select_fact(facts[0])
    window.attributions.make_relation_set()
    assert any(s.kind == "relation" for s in window.session.neuron_sets.values())
    original = weights(window.session.lm)
    report = apply_edit(qtbot, window, {"kind": "Erase relation", "target": None, "k": 20, "fill": "zero"})
    assert report["edit"]["kind"] == "erase"
    assert report["title"].startswith("Erase ") and "Erase Erase" not in report["title"]
    assert not same_weights(window.session.lm, original)
    window.undo()
    assert same_weights(window.session.lm, original)
    # adapt p moves p within the paper's bounds
    window.attributions.adapt_p()
    assert 0 < window.session.p <= 1


def test_heatmap_hover_and_click_select_neurons(window, qtbot):
    run_fact(qtbot, window, steps=2)
    ap = window.attribution_panel
    ap.tabs.setCurrentIndex(0)
    qtbot.wait(50)
    vb = ap.heat_plot.vb
    layer, neuron = 1, 30
    scene = vb.mapViewToScene(QPointF(neuron + 0.5, layer + 0.5))
    assert ap.neuron_at(scene) == (layer, neuron)
    ap._hovered(scene)
    assert ap.hover.text().startswith(f"L{layer} N{neuron}:  score")  # kn_core.neurons.neuron_name
    assert "activation" in ap.hover.text()
    width = ap.minimumSizeHint().width()
    ap.hover.setText("L1 N30: " + "a neuron's line as long as a subject control makes it " * 8)
    assert ap.minimumSizeHint().width() == width  # a long line is elided (whole in the tooltip), never wider
    assert ap.hover.toolTip() == ap.hover.text() and ap.hover.text().startswith("L1 N30: ")
    ap._hovered(scene)
    view_pos = ap.heat_widget.mapFromScene(scene)
    selected = []
    ap.neurons_selected.connect(selected.append)
    qtbot.mouseClick(ap.heat_widget.viewport(), Qt.LeftButton, pos=view_pos)
    assert selected and selected[-1] == [(layer, neuron)]
    scene2 = vb.mapViewToScene(QPointF(10.5, 2.5))
    qtbot.mouseClick(ap.heat_widget.viewport(), Qt.LeftButton, Qt.ControlModifier,
                     pos=ap.heat_widget.mapFromScene(scene2))
    assert selected[-1] == [(layer, neuron), (2, 10)]
    # the inspector shows the neuron's tokens and top-activating prompts
    qtbot.waitUntil(lambda: window.neurons_panel.promoted.table.rowCount() > 0, timeout=10000)
    assert window.neurons_panel.activating.table.rowCount() > 0
    assert window.edits_panel.target.currentText() == "selected in plot (2)"
    window.edits_panel.set_target_set("refined: France \u2192 Paris")
    assert window.edits_panel.target.currentData() == ("set", "refined: France \u2192 Paris")
    window.edits_panel.set_objects(["Rome", "Tokyo"])
    assert window.edits_panel.completer.model().stringList() == ["Rome", "Tokyo"]
    # save the selection as a user set, export it
    window.neurons_panel.add_set(__import__("kn_gui.session", fromlist=["NeuronSet"]).NeuronSet(
        "mine", "user", selected[-1], "selection"))
    assert "mine" in window.session.neuron_sets and window.isWindowModified()


def test_facts_add_edit_delete_are_undoable(window, qtbot):
    fs = window.session.factset
    new = fs.with_fact(Fact("P36", "Germany", "Berlin"))
    window._push_factset("Add fact Germany", new)
    assert Fact("P36", "Germany", "Berlin") in window.session.factset.facts
    assert window.isWindowModified()
    window.facts_panel.select_fact(Fact("P36", "Germany", "Berlin"))
    assert window.facts_panel.current_fact() == Fact("P36", "Germany", "Berlin")
    window.undo()
    assert window.session.factset.facts == fs.facts
    assert not window.isWindowModified()
    window.facts_panel.select_facts([FRANCE])
    window.facts_panel.delete_selected()
    assert FRANCE not in window.session.factset.facts
    window.undo()
    assert FRANCE in window.session.factset.facts


def test_import_facts_merges_and_bad_file_explains(window, tmp_path):
    good = tmp_path / "facts.jsonl"
    good.write_text(json.dumps({"kind": "relation", "id": "P36", "name": "capital", "templates": list(CAPITAL)})
                    + "\n" + json.dumps({"kind": "fact", "relation": "P36", "subject": "Germany",
                                          "object": "Berlin"}) + "\n")
    seen = errors(window)
    assert window.files.import_facts(str(good))
    assert Fact("P36", "Germany", "Berlin") in window.session.factset.facts
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    assert not window.files.import_facts(str(bad))
    assert seen and seen[-1][0] == "Could not import the facts" and "bad.jsonl" in seen[-1][1]


def test_a_big_import_checks_the_fact_set_once_per_step_and_names_what_it_left_out(window, tmp_path, monkeypatch):
    """Importing PARAREL's dev folder (22,425 facts) froze the app for many minutes: every fact was added with its
    own check of the whole set (quadratic). And a facts file without a pattern file was dropped without a word."""
    from kn_core.fact_files import export_pararel
    from kn_core.facts import FactSet

    big = FactSet("big", {"P36": window.session.factset.relation("P36")},
                  [Fact("P36", f"Land {i}", f"City {i}") for i in range(400)])
    export_pararel(big, tmp_path / "pararel")
    (tmp_path / "pararel" / "trex_lms_vocab" / "P31.jsonl").write_text('{"sub_label": "Paris", "obj_label": "city"}\n')
    checks = []
    check = FactSet.__post_init__
    monkeypatch.setattr(FactSet, "__post_init__", lambda fs: (checks.append(len(fs.facts)), check(fs)))
    assert window.files.import_facts(str(tmp_path / "pararel"))
    monkeypatch.undo()
    assert Fact("P36", "Land 399", "City 399") in window.session.factset.facts
    assert len(checks) < 20, f"{len(checks)} checks of the fact set for one import"
    shown = window.statusBar().currentMessage()
    assert "Imported 400 new facts" in shown and "trex_lms_vocab/P31.jsonl (1: no pattern_data" in shown
    assert window.statusBar().toolTip() == shown  # whole on hover where the bar cuts it (1280 px: it did)


def test_deleting_many_selected_facts_checks_the_set_once(window, monkeypatch):
    """Each deleted fact re-checked the whole set (quadratic, as the import was): 400 selected facts of an
    imported relation, one FactSet check each."""
    from kn_core.facts import FactSet

    fs = window.session.factset
    many = [Fact("P36", f"Land {i}", f"City {i}") for i in range(400)]
    window._push_factset("Add", fs.with_facts(many))
    window.facts_panel.select_facts(many)
    checks = []
    check = FactSet.__post_init__
    monkeypatch.setattr(FactSet, "__post_init__", lambda s: (checks.append(len(s.facts)), check(s)))
    window.facts_panel.delete_selected()
    monkeypatch.undo()
    assert window.session.factset.facts == fs.facts and len(checks) < 5, len(checks)
    with pytest.raises(ValueError, match="not in fact set"):
        fs.without_facts([many[0]])


@pytest.mark.parametrize("fmt", ["counterfact", "zsre", "knowedit", "mquake", "easyedit"])
def test_the_app_imports_every_benchmark_format_and_names_it(window, fmt):
    """Issue 22: the five field formats load in the app as in `kn facts import`; the status bar names the format
    read and every field the fact set left out, with its reason."""
    from kn_core.fact_files import import_facts_described
    from test_field_formats import DATA, FILES

    path = DATA / FILES[fmt]
    factset, read, left = import_facts_described(path)
    assert window.files.import_facts(str(path))
    assert set(factset.facts) <= set(window.session.factset.facts)
    shown = window.statusBar().currentMessage()
    assert f"read as {read}" in shown and read.startswith(fmt)
    assert all(f"{x['field']} ({x['records']}: {x['reason']})" in shown for x in left)


def test_exports(window, qtbot, tmp_path):
    run_fact(qtbot, window, steps=2)
    written = window.files.export_plots(str(tmp_path), "png") + window.files.export_plots(str(tmp_path), "svg")
    assert all(os.path.getsize(p) > 500 for p in written)
    data = window.files.results_dict()
    assert data["runs"][0]["fact"]["subject"] == "France"
    window.attribution_panel.prompt_table.write_csv(tmp_path / "prompts.csv")
    assert (tmp_path / "prompts.csv").read_text().startswith("#,prompt")
    window.files.export_model(str(tmp_path / "model"))
    assert window.runner.wait_idle(30000)
    assert (tmp_path / "model" / "kn-edits.json").exists()


def test_unsaved_marker_and_close_confirmation(window, qtbot):
    assert not window.isWindowModified()
    window._push_factset("Add", window.session.factset.with_fact(Fact("P36", "Germany", "Berlin")))
    assert window.isWindowModified() and "[*]" in window.windowTitle()
    window.lifecycle.auto_discard = False  # the user answers Cancel
    window.close()
    assert window.isVisible()
    window.undo()
    assert not window.isWindowModified()
    window.close()
    assert not window.isVisible()


def test_layout_and_recent_projects_are_remembered(app, qtbot, settings, lm, tmp_path):
    w = make_window(qtbot, settings, lm)
    w.neurons_dock.hide()
    path = str(tmp_path / "p.knproj")
    assert w.lifecycle.save_to(path, wait=True)
    w.close()
    w2 = make_window(qtbot, settings)
    assert not w2.neurons_dock.isVisible()
    assert w2.menus.recent_projects()[0] == os.path.abspath(path)
    assert w2.menus.recent_menu.actions()[0].text() == "p.knproj"
    w2.close()


# ----------------------------------------------------------------------------------------------- error paths

def test_error_model_load_failure(app, qtbot, settings):
    from kn_core.models import ModelLoadError

    def broken(*args, **kwargs):
        raise ModelLoadError("could not load 'nope': it is not a local folder; pass a folder")

    window = make_window(qtbot, settings, load_model_fn=broken)
    seen = errors(window)
    window.load_model("nope")
    assert window.runner.wait_idle(10000)
    assert seen[-1][0] == "Loading model nope failed" and "pass a folder" in seen[-1][1]
    assert window.model_panel.load_button.isEnabled()
    assert window.session.lm is None
    window.close()


def test_error_actions_without_model_or_fact(app, qtbot, settings, tmp_path):
    window = make_window(qtbot, settings)
    seen = errors(window)
    window.attributions.run_attribution("current")
    assert seen[-1][0] == "No model loaded" and "Load model" in seen[-1][1]
    window.editing.apply_edit({"kind": "Suppress", "target": None, "scope": "answer"})
    assert seen[-1][0] == "No model loaded"
    window.files.export_model(str(tmp_path))
    assert seen[-1][0] == "No model loaded"
    window.set_model(make_tiny(TINY_CAUSAL))
    window.runner.wait_idle()
    window.current_fact = None
    window.facts_panel.tree.setCurrentIndex(window.facts_panel.model.index(-1, -1))
    window.attributions.run_attribution("current")
    assert seen[-1][0] == "No fact selected"
    window.facts_panel.tree.selectionModel().clearSelection()
    window.attributions.run_attribution("selection")
    assert seen[-1][0] == "No facts selected"
    window.attributions.adapt_p()
    assert seen[-1][0] == "No fact selected"
    window.facts_panel.select_fact(FRANCE)
    window.attributions.adapt_p()
    assert seen[-1][0] == "Cannot adapt p"
    window.attributions.make_relation_set()
    assert seen[-1][0] == "No runs"
    window.close()


def test_error_edit_requests(window, qtbot):
    seen = errors(window)
    window.facts_panel.select_fact(FRANCE)
    window.editing.apply_edit({"kind": "Suppress", "target": ("selection", None), "scope": "answer"})
    assert seen[-1][0] == "Cannot apply the edit" and "no neurons" in seen[-1][1]
    window.editing.apply_edit({"kind": "Erase relation", "target": None, "k": 20, "fill": "zero"})
    assert "run attribution" in seen[-1][1]
    window.attribution_panel.select_neuron(0, 1)
    window.editing.apply_edit({"kind": "Update", "target": ("selection", None), "new_object": "", "lambda1": 1,
                       "lambda2": 8})
    assert "new object" in seen[-1][1]
    window.editing.apply_edit({"kind": "Update", "target": ("selection", None), "new_object": "Paris", "lambda1": 1,
                       "lambda2": 8})
    assert "equals" in seen[-1][1]
    window.attribution_panel.selected = [(99, 1)]
    window.editing.apply_edit({"kind": "Suppress", "target": ("selection", None), "scope": "answer"})
    assert seen[-1][0] == "Cannot apply the edit"
    assert window.undo_stack.count() == 0 and hooks(window.session.lm) == 0


def test_error_busy_refuses_model_changes(window, qtbot):
    seen = errors(window)
    window.facts_panel.select_fact(FRANCE)
    assert window.runner.wait_idle(10000)
    window.attribution_panel.select_neuron(0, 1)
    apply_edit(qtbot, window, {"kind": "Suppress", "target": ("selection", None), "scope": "answer"})
    window.attribution_panel.steps.setValue(200)
    window.attributions.run_attribution("current")
    assert window.runner.busy
    window.undo()
    assert seen[-1][0] == "Busy" and "Cancel" in seen[-1][1]
    assert len(window.edit_stack.active_edits()) == 1
    window.load_model("default")
    assert seen[-1][0] == "Busy"
    assert not window.menus.act_undo.isEnabled() and not window.menus.act_run.isEnabled()
    # fact changes stay undoable while the worker runs
    window._push_factset("Add", window.session.factset.with_fact(Fact("P36", "Germany", "Berlin")))
    window.undo()
    assert Fact("P36", "Germany", "Berlin") not in window.session.factset.facts
    window.cancel_job()
    assert window.runner.wait_idle(60000)
    window.undo()
    assert window.edit_stack.active_edits() == []


def test_error_projects(window, qtbot, tmp_path):
    seen = errors(window)
    window.lifecycle.open_project(str(tmp_path / "missing.knproj"))
    assert seen[-1][0] == "Project not found"
    junk = tmp_path / "junk.knproj"
    junk.write_bytes(b"this is not a project" * 10)
    window.lifecycle.open_project(str(junk))
    assert window.runner.wait_idle(10000)
    assert seen[-1][0].startswith("Opening junk.knproj failed")
    window.lifecycle.save_to(str(tmp_path / "no" / "such" / "folder" / "p.knproj"))
    assert window.runner.wait_idle(10000)
    assert seen[-1][0].startswith("Saving p.knproj failed") and window.isVisible()


def test_error_saved_edits_on_another_model(app, qtbot, settings, lm, tmp_path):
    window = make_window(qtbot, settings, lm)
    window.attribution_panel.select_neuron(1, 2)
    window.facts_panel.select_fact(FRANCE)
    apply_edit(qtbot, window, {"kind": "Suppress", "target": ("selection", None), "scope": "answer"})
    path = str(tmp_path / "e.knproj")
    assert window.lifecycle.save_to(path, wait=True)
    window.close()
    other = make_window(qtbot, settings, make_tiny(TINY_CAUSAL, seed=1))
    seen = errors(other)
    other.lifecycle.open_project(path)
    assert other.runner.wait_idle(10000)
    assert seen[-1][0] == "Saved edits not applied" and "another model" in seen[-1][1]
    assert other.undo_stack.count() == 0 and hooks(other.session.lm) == 0
    other.close()


def test_error_dialog_is_a_real_message_box(app, qtbot, settings):
    window = MainWindow(factset=geo_factset(), settings=settings, confirm_dialogs=True)
    qtbot.addWidget(window)
    window.show()
    window.attributions.run_attribution("current")
    boxes = [b for b in window.findChildren(QMessageBox) if b.isVisible()]
    assert boxes and boxes[0].windowTitle() == "No model loaded"
    assert "Load model" in boxes[0].text()
    boxes[0].accept()
    window.runner.shutdown()


def test_unexpected_exception_becomes_a_message(window, qtbot):
    import sys

    from kn_gui.app import install_excepthook

    old = sys.excepthook
    seen = errors(window)
    try:
        install_excepthook(window)
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            sys.excepthook(*sys.exc_info())
    finally:
        sys.excepthook = old
    assert seen[-1][0] == "Unexpected error" and "boom" in seen[-1][1]
    assert window.isVisible()


def test_app_main_parses_arguments(monkeypatch, app):
    from kn_gui import app as app_module

    opened = {}
    monkeypatch.setattr(app_module, "build_app", lambda: type("A", (), {"exec": lambda self: 0})())
    monkeypatch.setattr("kn_gui.lifecycle.ProjectLifecycle.open_project", lambda self, p: opened.setdefault("p", p))
    monkeypatch.setattr("kn_gui.main_window.MainWindow.load_model",
                        lambda self, m, d, t: opened.setdefault("m", (m, d, t)))
    monkeypatch.setattr("kn_gui.main_window.MainWindow.show", lambda self: None)
    monkeypatch.setattr("kn_gui.lifecycle.ProjectLifecycle.offer_recovery", lambda self: False)
    windows = []
    monkeypatch.setattr(app_module, "install_excepthook", windows.append)
    assert app_module.main(["x.knproj", "--model", "gpt2", "--dtype", "float32"]) == 0
    assert opened == {"p": "x.knproj", "m": ("gpt2", "auto", "float32")}
    import shiboken6

    assert not shiboken6.isValid(windows[0])  # main ends with an orderly teardown: the window is gone
