"""The whole journey in the real window on the embedded default model (SmolLM2-135M-Instruct).

Marked `default_model`: the fast suite can deselect it (-m "not default_model"); CI runs it.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

pytest.importorskip("pytestqt")

from PySide6.QtCore import QSettings, Qt  # noqa: E402

from kn_core.models import _MARKER, default_model_dir, weights_sha256  # noqa: E402
from kn_gui.app import build_app  # noqa: E402
from kn_gui.main_window import MainWindow  # noqa: E402

pytestmark = pytest.mark.default_model


@pytest.fixture(scope="module")
def app():
    if not (default_model_dir() / _MARKER).exists():
        pytest.skip("the default model is not fetched yet (run `kn model fetch` or setup.sh)")
    return build_app()


def new_window(qtbot, settings):
    window = MainWindow(settings=settings, confirm_dialogs=False)
    qtbot.addWidget(window)
    window.lifecycle.auto_discard = True
    window.project.autosave_folder = os.path.join(os.path.dirname(settings.fileName()), "autosave")
    window.show()
    return window


def test_default_model_journey(app, qtbot, tmp_path):
    settings = QSettings(str(tmp_path / "settings.ini"), QSettings.IniFormat)
    window = new_window(qtbot, settings)
    failures = []
    window.error_shown.connect(lambda title, message: failures.append(f"{title}: {message}"))
    # load the embedded default through the worker
    with qtbot.waitSignal(window.model_loaded, timeout=600000):
        qtbot.mouseClick(window.model_panel.load_button, Qt.LeftButton)
    assert window.runner.wait_idle(60000)
    lm = window.session.lm
    assert (lm.layout.layers, lm.layout.neurons) == (30, 1536)
    assert window.model_panel.info["family"].text() == "llama"
    original_sha = lm.sha256
    # pick France -> Paris (built-in P36); its prompts are checked when it is picked
    fact = next(f for f in window.session.factset.facts_of("P36") if f.subject == "France")
    window.facts_panel.select_fact(fact)
    assert window.runner.wait_idle(60000)
    prompts, _ = window.session.prompts_for(fact)
    assert len(prompts) >= 3
    checks = [window.session.check_for(fact, p.template) for p in prompts]
    assert all(c is not None for c in checks) and sum(c["correct"] for c in checks) >= 3
    # attribution (10 steps to keep CI quick; the method is unchanged), streamed into the plots
    window.attribution_panel.steps.setValue(10)
    with qtbot.waitSignal(window.run_finished, timeout=900000):
        qtbot.keyClick(window, Qt.Key_F5)
    assert window.runner.wait_idle(60000)
    run = window.session.runs[("P36", "France", "Paris")]
    assert run.complete and len(run.scores) == len(prompts)
    ap = window.attribution_panel
    # the map holds every neuron's score; the image pools columns to the pixels it has (panels' neuron_map)
    assert ap.heat_widget.scores.shape == (30, 1536) and ap.image.image.shape[0] == 30
    # t / p recompute the refined set instantly
    ap.p_control.spin.setValue(0.5)
    ap.t_control.spin.setValue(0.3)
    strict = len(window.session.refined(run))
    ap.t_control.spin.setValue(0.2)
    refined = window.session.refined(run)
    assert len(refined) >= strict and refined
    assert sum(ap.hist_bars.opts["height"]) == len(refined)
    # suppress the refined set: the fact's probability drops; the controls are measured beside it
    name = "refined: France \u2192 Paris"
    window.edits_panel.kind.setCurrentText("Suppress")
    window.edits_panel.set_target_set(name)
    with qtbot.waitSignal(window.edit_evaluated, timeout=600000) as blocker:
        qtbot.mouseClick(window.edits_panel.apply_button, Qt.LeftButton)
    assert window.runner.wait_idle(60000)
    report = blocker.args[0]
    rows = report["rows"]
    fact_rows = [r for r in rows if r["group"] == "fact"]
    assert np.mean([r["after"] - r["before"] for r in fact_rows]) < 0
    assert {"same relation", "other relations"} <= {r["group"] for r in rows}
    # undo: the model equals the original exactly
    qtbot.keyClick(window, Qt.Key_Z, Qt.ControlModifier)
    assert window.edit_stack.active_edits() == []
    assert sum(len(m._forward_pre_hooks) for m in lm.layout.out_projs) == 0
    assert weights_sha256(lm.model) == original_sha
    qtbot.keyClick(window, Qt.Key_Z, Qt.ControlModifier | Qt.ShiftModifier)  # redo: saved with the project
    # save, close, reopen
    path = str(tmp_path / "default.knproj")
    assert window.lifecycle.save_to(path, wait=True)
    window.close()
    assert weights_sha256(lm.model) == original_sha
    again = new_window(qtbot, settings)
    again.set_model(lm)
    assert again.runner.wait_idle(60000)
    with qtbot.waitSignal(again.project_opened, timeout=120000):
        again.lifecycle.open_project(path)
    assert again.runner.wait_idle(60000)
    reopened = again.session.runs[("P36", "France", "Paris")]
    assert all(np.array_equal(a.scores, b.scores) for a, b in zip(reopened.scores, run.scores))
    assert again.session.neuron_sets[name].neurons == [tuple(n) for n in refined]
    assert [e.kind for e in again.edit_stack.active_edits()] == ["suppress"]
    assert again.edits_panel.table.table.rowCount() == len(rows)
    again.undo()
    assert weights_sha256(lm.model) == original_sha
    assert not failures, failures
    again.close()
    assert os.path.exists(path)
