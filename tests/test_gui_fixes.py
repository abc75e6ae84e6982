"""Issue 24's defects in the window, each replayed (tiny random models, fast)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("pytestqt")

from PySide6.QtCore import Qt  # noqa: E402
from PySide6.QtWidgets import QFileDialog  # noqa: E402

from kn_gui.session import NeuronSet  # noqa: E402
from test_gui import FRANCE, app, lm, make_window, run_fact, settings, window  # noqa: E402,F401 (fixtures)

ROOT = Path(__file__).resolve().parent.parent


def test_neurons_dock_export_writes_the_file_and_remembers_the_folder(window, qtbot, tmp_path, monkeypatch):
    window.neurons_panel.add_set(NeuronSet("mine", "user", [(1, 2), (0, 5)]))
    asked = []

    def save_dialog(parent, title, start, filters):
        asked.append(start)
        return str(tmp_path / "out" / "mine.json"), filters

    (tmp_path / "out").mkdir()
    monkeypatch.setattr(QFileDialog, "getSaveFileName", save_dialog)
    messages = []
    window.neurons_panel.message.connect(messages.append)
    qtbot.mouseClick(window.neurons_panel.export_button, Qt.LeftButton)
    data = json.loads((tmp_path / "out" / "mine.json").read_text())
    assert data["neurons"] == [[1, 2], [0, 5]] and messages and "mine.json" in messages[-1]
    qtbot.mouseClick(window.neurons_panel.export_button, Qt.LeftButton)
    assert Path(asked[-1]).parent == tmp_path / "out"  # the next export dialog starts where the last one saved


def test_a_degeneracy_result_never_grows_the_edits_panel(window, qtbot):
    from kn_core.degeneracy import DegeneracyParams, degeneracy_test

    panel = window.edits_panel
    window.edits_dock.raise_()
    qtbot.wait(50)
    before = (panel.height(), panel.minimumSizeHint().height(), panel.apply_button.visibleRegion().isEmpty())
    prompts, _ = window.session.prompts_for(FRANCE)
    neurons = [(layer, n) for layer in range(2) for n in range(12)]
    result = degeneracy_test(window.session.lm, prompts, neurons, DegeneracyParams(max_neurons=3))
    result["left_out"] = [{"what": f"L{i} N{i}", "reason": "a long reason " * 8} for i in range(12)]
    panel.show_degeneracy(result, "France \u2192 Paris")
    qtbot.wait(50)
    after = (panel.height(), panel.minimumSizeHint().height(), panel.apply_button.visibleRegion().isEmpty())
    assert after[0] <= before[0] and after[1] <= before[1] and not after[2], (before, after)


@pytest.mark.parametrize("while_a_job_runs", [False, True])
def test_quit_is_orderly(tmp_path, while_a_job_runs):
    """Start the app, (start a model load,) quit: exit code 0 and nothing fatal on stderr."""
    script = f"""
import sys
from PySide6.QtCore import QTimer
from PySide6.QtWidgets import QApplication
sys.path.insert(0, {str(ROOT / 'tests')!r})
import kn_gui.app as app_module
from kn_gui.main_window import MainWindow
from tiny import TINY_CAUSAL, make_tiny

def slow_load(*a, task=None, **k):
    import time
    for _ in range(200):
        task.check()
        time.sleep(0.01)
    return make_tiny(TINY_CAUSAL)

original = MainWindow.__init__
def init(self, *a, **k):
    original(self, *a, load_model_fn=slow_load, **k)
    self.quiet, self.auto_discard = True, True
    if {while_a_job_runs!r}:
        QTimer.singleShot(300, lambda: self.load_model("tiny"))
    QTimer.singleShot(800, self.close)
MainWindow.__init__ = init
sys.exit(app_module.main([]))
"""
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen", "HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path),
           "XDG_DATA_HOME": str(tmp_path), "PYTHONPATH": str(ROOT)}
    for _ in range(2 if while_a_job_runs else 1):
        done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and "Fatal" not in done.stderr, done.stderr[-2000:]


def test_the_window_never_asks_for_more_than_the_screen(app, qtbot, settings):
    from kn_gui.layout import FRAME_GUESS

    window = make_window(qtbot, settings)
    screen = window.screen().availableGeometry()
    assert window.width() + FRAME_GUESS[0] <= screen.width() and window.height() + FRAME_GUESS[1] <= screen.height()
    window.close()


def test_a_layout_saved_on_a_big_screen_fits_a_small_one(app, qtbot, settings):
    from PySide6.QtCore import QRect

    big = make_window(qtbot, settings)
    big.setGeometry(QRect(0, 0, 1600, 1000))
    big.save_layout()
    settings.setValue("window/screen", "2560x1440")  # as if saved on a bigger screen than this one
    big.close()
    window = make_window(qtbot, settings)
    screen = window.screen().availableGeometry()
    assert window.width() <= screen.width() and window.height() <= screen.height()
    assert window._sized  # the default dock sizes were computed for this screen at show
    for dock in (window.model_dock, window.edits_dock):
        scroll = dock.widget()
        assert not scroll.verticalScrollBar().isVisible() or dock is window.edits_dock
    window.close()
