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
from test_gui_compact import compact_project  # noqa: E402,F401 (fixture)

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
    self.quiet, self.lifecycle.auto_discard = True, True
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
    big.docks.save()
    settings.setValue("window/screen", "2560x1440")  # as if saved on a bigger screen than this one
    big.close()
    window = make_window(qtbot, settings)
    screen = window.screen().availableGeometry()
    assert window.width() <= screen.width() and window.height() <= screen.height()
    assert window.docks.sized  # the default dock sizes were computed for this screen at show
    for dock in (window.model_dock, window.edits_dock):
        scroll = dock.widget()
        assert not scroll.verticalScrollBar().isVisible() or dock is window.edits_dock
    window.close()


def test_one_way_to_write_a_neuron(window, qtbot):
    from kn_core.edits import Suppress
    from kn_gui.panels.degeneracy_table import _names

    window.neurons_panel.show_inspection(1, 2, None)
    assert window.neurons_panel.inspect_title.text().startswith("L1 N2")
    assert _names([(1, 2), (0, 7)]) == "L1 N2 + L0 N7"
    assert "L1 N2" in Suppress(((1, 2),), "answer").describe()


def test_refined_threshold_is_said_as_a_whole_number(window, qtbot):
    window.attribution_panel.p_control.spin.setValue(0.7)
    run_fact(qtbot, window, steps=1)  # 4 prompts: p x 4 = 2.8, at least 3
    text = window.attribution_panel.summary.text()
    assert "coarse in \u2265 3 of 4 prompts" in text
    window.attribution_panel.p_control.spin.setValue(0.9)  # 3.6: a count of at least 4
    assert "coarse in \u2265 4 of 4 prompts" in window.attribution_panel.summary.text()


def test_the_edit_target_follows_the_selected_fact(window, qtbot):
    from test_gui import geo_factset

    japan = [f for f in geo_factset().facts if f.subject == "Japan"][0]
    run_fact(qtbot, window, FRANCE, steps=1)
    run_fact(qtbot, window, japan, steps=1)
    ep = window.edits_panel
    window.facts_panel.select_fact(FRANCE)
    window.select_fact(FRANCE)
    ep.set_target_set("refined: France \u2192 Paris")
    window.facts_panel.select_fact(japan)
    window.select_fact(japan)
    assert ep.target.currentData() == ("set", "refined: Japan \u2192 Tokyo")
    italy = [f for f in geo_factset().facts if f.subject == "Italy"][0]  # no run: no set of its own
    window.facts_panel.select_fact(italy)
    window.select_fact(italy)
    assert ep.target.currentData()[0] == "selection"


def test_a_jsonl_error_names_the_column_where_the_line_ends(window, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"kind": "fact", "relation": "P36",\n "subject": "a", "object": "b"}\n', encoding="utf-8")
    assert not window.files.import_facts(str(path))
    title, message = window.last_error
    assert "line 1" in message and "column 36" in message and "one line" in message


def test_heatmap_legend_is_outside_the_map(tmp_path):
    import numpy as np
    from matplotlib.figure import Figure

    from kn_core.report.figures import _draw_heatmap  # the figures are drawn in kn_core (no Qt)

    scores = np.zeros((6, 40), dtype=np.float32)
    scores[5, 39] = 1.0  # a refined neuron in the top-right corner, where the legend used to sit
    figure = Figure(figsize=(6, 4), dpi=100, layout="constrained")
    _draw_heatmap(figure, {"scores": scores, "bound": 1.0, "refined": [(5, 39)], "selected": [(0, 1)],
                           "massive": [(2, 3)], "unspecific": []})
    figure.canvas.draw()
    axes = figure.axes[0]
    legend = axes.get_legend().get_window_extent()
    assert not legend.overlaps(axes.get_window_extent())


def test_compact_runs_say_activation_not_stored(window, qtbot, tmp_path):
    """`kn attribute --facts` into a compact project keeps no activations (kn_core/runner.py): not 0, not stored."""
    import numpy as np

    from kn_core.attribution import AttributionParams, attribute_fact
    from kn_core.facts import render_prompts
    from kn_core.store import create_project
    from test_gui import geo_factset
    from test_gui_compact import open_in_window

    fs, lm, path = geo_factset(), window.session.lm, str(tmp_path / "compact.knproj")
    project = create_project(path)
    try:
        project.set_score_storage("top", floor=0.05, guard=16)
        for relation in fs.relations.values():
            project.add_relation(relation)
        project.add_facts(fs.facts, fs.relations)
        prompts, _ = render_prompts(FRANCE, fs.relation("P36"), lm.tokenizer, lm.kind)
        run_id = project.start_run(fact=FRANCE, prompts=prompts, params=AttributionParams(steps=1).to_dict(),
                                   model=lm)
        for k, result in enumerate(attribute_fact(lm, prompts, AttributionParams(steps=1))):
            project.add_prompt_result(run_id, k, scores=result.scores, activations=None, prob=result.prob)
        project.finish_run(run_id, "done")
    finally:
        project.close()
    open_in_window(qtbot, window, path)
    run = window.session.runs[("P36", "France", "Paris")]
    assert all(np.isnan(ps.activations).all() for ps in run.scores)  # not stored: never zeros
    window.neurons_panel.set_run(run)
    window.neurons_panel.add_set(NeuronSet("some", "user", [(1, 2), (0, 5)]))
    table = window.neurons_panel.contents.table
    assert table.rowCount() == 2 and all(table.item(r, 3).text() == "not stored" for r in range(2))


def test_an_empty_plot_selection_gives_way_to_the_facts_refined_set(window, qtbot):
    window.attribution_panel.t_control.spin.setValue(0.05)
    window.attribution_panel.p_control.spin.setValue(0.3)
    run_fact(qtbot, window, FRANCE, steps=1)
    ep = window.edits_panel
    ep.target.setCurrentIndex(0)  # "selected in plot (0)"
    window.select_fact(FRANCE)
    assert ep.target.currentData() == ("set", "refined: France \u2192 Paris")


def test_batch_edit_says_before_running_which_facts_it_skips(window, qtbot):
    from test_gui import geo_factset

    japan = [f for f in geo_factset().facts if f.subject == "Japan"][0]
    run_fact(qtbot, window, FRANCE, steps=1)
    said, started = [], []
    window.statusBar().messageChanged.connect(said.append)
    window.runner.job_started.connect(lambda name: started.append((name, list(said))))
    window.edits_panel.kind.setCurrentText("Suppress")
    window.editing.batch_edit([FRANCE, japan])
    assert window.runner.wait_idle(60000)
    name, before = started[0]
    assert name.startswith("Batch edit") and any("1 of the 2 selected facts" in m and "Japan" in m for m in before)
    assert window.edits_panel.metrics_strip.isVisible()


def test_the_before_after_csv_carries_the_metrics_and_the_control(window, qtbot, tmp_path):
    from test_gui import apply_edit

    run_fact(qtbot, window, FRANCE, steps=1)
    window.attribution_panel.select_neuron(1, 5)
    report = apply_edit(qtbot, window, {"kind": "Suppress", "target": ("selection", None), "scope": "answer"})
    assert report.get("metrics")
    window.edits_panel.table.write_csv(tmp_path / "edit.csv")
    text = (tmp_path / "edit.csv").read_text(encoding="utf-8")
    assert "# metrics (edit [random-neuron control]):" in text and "[random neurons:" in text
    assert "# reliability" in text.lower()


def test_help_lists_shortcuts_and_says_the_version(window):
    from kn_core import __version__
    from kn_gui.menus import about_text

    shortcuts = dict(window.menus.shortcuts())
    assert shortcuts["Run attribution"] == "F5" and "Runs" in shortcuts and "Apply edit" in shortcuts
    box = window.menus.show_shortcuts()
    assert "F5" in box.text()
    box.close()
    assert __version__ in about_text()


def test_the_inspector_says_which_facts_use_the_neuron(window, qtbot):
    window.attribution_panel.t_control.spin.setValue(0.05)
    window.attribution_panel.p_control.spin.setValue(0.3)
    run = run_fact(qtbot, window, FRANCE, steps=1)
    neuron = window.session.refined(run)[0]
    window.neurons_panel.show_inspection(*neuron, None)
    assert "refined for 1 of 1 attributed facts: France \u2192 Paris" in window.neurons_panel.inspect_title.text()


def test_held_out_templates_make_generality_measurable(window, qtbot):
    from test_gui import apply_edit

    window.attribution_panel.hold_out.setValue(1)
    run = run_fact(qtbot, window, FRANCE, steps=1)
    held = run.params["held_out_templates"]
    assert len(held) == 1 and held[0] not in [p.template for p in run.prompts] and len(run.prompts) == 3
    assert "1 template held out for generality" in window.attribution_panel.title.text()
    window.attribution_panel.select_neuron(1, 5)
    report = apply_edit(qtbot, window, {"kind": "Suppress", "target": ("selection", None), "scope": "answer"})
    generality = report["metrics"]["generality"]
    assert generality.get("applicable", True) and generality["n"] >= 1  # measured on the held-out wording
    window.attribution_panel.hold_out.setValue(3)  # 4 templates: fewer than 3 would be left to find neurons
    errors = []
    window.error_shown.connect(lambda title, message: errors.append(title))
    window.attributions.run_attribution("current")
    assert errors == ["Cannot hold out templates"] and not window.runner.busy


def test_saving_renaming_and_deleting_a_neuron_set_are_undoable(window, monkeypatch):
    """Issue 20: the Neurons dock asks, the history changes the sets: save, rename and delete are each one undo
    step (the panel wrote the session itself, and none of them could be undone); undo brings each back as it was,
    redo again, and the project reads unsaved until the state it was saved in."""
    from PySide6.QtWidgets import QInputDialog

    panel, session = window.neurons_panel, window.session
    before = dict(session.neuron_sets)
    panel.add_set(NeuronSet("mine", "user", [(1, 2), (0, 5)], "picked"))
    assert list(session.neuron_sets) == list(before) + ["mine"]
    assert window.history.next_undo().text == "Save neuron set 'mine'"
    panel.select_set("mine")
    monkeypatch.setattr(QInputDialog, "getText", lambda *a, **k: ("ours", True))
    panel.rename_set()
    assert "mine" not in session.neuron_sets and session.neuron_sets["ours"].neurons == [(1, 2), (0, 5)]
    panel.select_set("ours")
    panel.delete_set()
    assert "ours" not in session.neuron_sets
    window.undo()
    assert session.neuron_sets["ours"].neurons == [(1, 2), (0, 5)] and panel.current_set_name() in session.neuron_sets
    window.undo()
    assert "mine" in session.neuron_sets and "ours" not in session.neuron_sets
    window.undo()
    assert session.neuron_sets == before
    window.redo()
    assert session.neuron_sets["mine"].source == "picked"
    shown = [panel.sets.table.item(r, 0).text() for r in range(panel.sets.table.rowCount())]
    assert "mine" in shown


def test_edit_on_a_prompt_row_edits_its_fact(window, qtbot, monkeypatch):
    """A new user selects a prompt under France -> Paris and presses Edit: the fact's dialog opens (it did nothing)."""
    import kn_gui.panels.facts_panel as facts_panel
    from PySide6.QtCore import QItemSelectionModel

    from kn_core.facts import Fact

    panel = window.facts_panel
    item = panel._find_fact_item(FRANCE)
    panel.tree.expand(item.index())
    prompt = item.child(0)
    assert prompt is not None and prompt.data(facts_panel.ROLE)[0] == "prompt"
    panel.tree.selectionModel().setCurrentIndex(prompt.index(), QItemSelectionModel.ClearAndSelect)
    opened = []

    class Accepting:
        def __init__(self, factset, fact=None, **kwargs):
            opened.append(fact)

        def exec(self):
            return facts_panel.QDialog.Accepted

        def fact(self):
            return Fact(FRANCE.relation, FRANCE.subject, "Lyon")

    monkeypatch.setattr(facts_panel, "FactDialog", Accepting)
    with qtbot.waitSignal(panel.change_requested, timeout=5000) as changed:
        panel.edit_button.click()
    assert opened == [FRANCE] and changed.args[0] == "Edit fact France \u2192 Lyon"
