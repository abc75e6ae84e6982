"""The window measures massive / unspecific neurons after a run and offers mean ablation and the calibrated
update (issue 13 items 2-4), on tiny models with a planted massive neuron."""

from __future__ import annotations

import pytest

pytest.importorskip("pytestqt")

from test_gui import FRANCE, app, apply_edit, make_window, run_fact, settings  # noqa: E402,F401 (fixtures)
from test_neurons import plant  # noqa: E402
from tiny import TINY_CAUSAL, make_tiny  # noqa: E402

MASSIVE = (1, 5)


@pytest.fixture
def planted():
    lm = make_tiny(TINY_CAUSAL)
    plant(lm, *MASSIVE, 150.0)
    return lm


@pytest.fixture
def window(app, qtbot, settings, planted):
    w = make_window(qtbot, settings, planted)
    yield w
    w.lifecycle.auto_discard = True
    w.close()


def test_run_flags_the_planted_neuron_and_leaves_it_out(window, qtbot):
    s = window.session
    assert s.flags is None
    run = run_fact(qtbot, window)
    assert s.flags is not None and MASSIVE in s.flags.massive
    assert s.activation_stats is not None and s.activation_stats.n_prompts > len(run.prompts)
    assert window.attribution_panel.flags is s.flags and window.neurons_panel.flags is s.flags
    ap = window.attribution_panel
    assert not ap.keep_massive.isChecked() and "100 x its layer's median" in ap.keep_massive.toolTip()
    coarse = s.neuron_sets[f"coarse: {FRANCE.subject} \u2192 {FRANCE.object}"].neurons
    assert MASSIVE not in coarse and MASSIVE not in ap.refined
    ap.keep_massive.setChecked(True)  # the paper's method: flagged neurons count again
    assert s.keep_massive and s.excluded() == frozenset()
    coarse_kept = s.neuron_sets[f"coarse: {FRANCE.subject} \u2192 {FRANCE.object}"].neurons
    assert coarse_kept == sorted({n for i in range(len(run.scores)) for n in s.coarse(run, i)})
    ap.keep_massive.setChecked(False)
    assert s.excluded() == s.flags.excluded


def test_flags_reset_with_the_model_and_come_back_with_runs(window, qtbot, planted):
    run_fact(qtbot, window)
    other = make_tiny(TINY_CAUSAL, seed=1)
    window.set_model(other)
    assert window.session.flags is None  # at once: the old model's flags never describe the new one
    # the runs were made on the other weights: nothing to measure them on, so no flags describe `other`
    assert window.session.flags is None and window.session.activation_stats is None
    assert window.attribution_panel.flags is None and not window.edits_panel.suppress_to.model().item(1).isEnabled()
    window.set_model(planted)  # back to the weights the run was made on: measured again on a worker job
    assert window.runner.wait_idle(30000)
    assert MASSIVE in window.session.flags.massive


def test_project_with_runs_is_flagged_when_opened(window, qtbot, tmp_path):
    run_fact(qtbot, window)
    path = str(tmp_path / "p.knproj")
    window.session.reset_flags()  # a file saved without flags (before they were saved): measured when opened
    assert window.lifecycle.save_to(path, wait=True)
    with qtbot.waitSignal(window.project_opened, timeout=30000):
        window.lifecycle.open_project(path)
    assert window.session.flags is None  # the opened runs are measured on the worker, not in the UI thread
    assert window.runner.wait_idle(30000)
    assert window.session.flags is not None and MASSIVE in window.session.flags.massive


def test_mean_ablation_offered_once_statistics_exist(window, qtbot):
    ep = window.edits_panel
    assert not ep.suppress_to.model().item(1).isEnabled() and "after an attribution run" in ep.suppress_to.toolTip()
    run_fact(qtbot, window)
    assert ep.suppress_to.model().item(1).isEnabled()
    ep.kind.setCurrentText("Suppress")
    ep.suppress_to.setCurrentIndex(1)
    requests = []
    ep.apply_requested.connect(requests.append)
    ep._apply()
    assert requests[-1]["to"] == "mean"
    target = ("set", f"coarse: {FRANCE.subject} \u2192 {FRANCE.object}")
    report = apply_edit(qtbot, window, {**requests[-1], "target": target})
    assert report["request"]["to"] == "mean" and report["edit"]["to"] == "mean"
    neurons = [tuple(n) for n in report["edit"]["neurons"]]
    assert report["edit"]["means"] == pytest.approx(window.session.activation_stats.mean_of(neurons))
    assert "mean activation" in ep.result_summary.text()


def test_update_strength_choice_reaches_the_engine(window, qtbot):
    ep = window.edits_panel
    ep.kind.setCurrentText("Update")
    assert [ep.strength.itemData(i) for i in range(ep.strength.count())] == ["paper", "calibrated"]
    assert "\u03bb1=1, \u03bb2=8" in ep.strength.itemText(0)
    run_fact(qtbot, window)
    ep.strength.setCurrentIndex(1)
    ep.new_object.setEditText("Rome")
    requests = []
    ep.apply_requested.connect(requests.append)
    ep._apply()
    assert requests[-1]["strength"] == "calibrated"
    target = ("set", f"refined: {FRANCE.subject} \u2192 {FRANCE.object}")
    if not window.session.neuron_sets[target[1]].neurons:
        target = ("set", f"coarse: {FRANCE.subject} \u2192 {FRANCE.object}")
    report = apply_edit(qtbot, window, {**requests[-1], "target": target})
    cal = report["calibration"]
    assert report["request"]["strength"] == "calibrated" and cal is not None and cal["tried"]
    assert report["edit"]["lambda1"] == pytest.approx(cal["lambda1"])
    text = ep.result_summary.text()
    assert (f"\u00d7 {cal['scale']:.3g}" in text) and ("FAILED" in text) != cal["reached"]
