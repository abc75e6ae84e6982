"""The panels built directly (no main window) on a Session with synthetic data: pytest-qt, offscreen."""

from __future__ import annotations

import csv

import numpy as np
import pytest

pytest.importorskip("pytestqt")

from PySide6.QtCore import QPointF, Qt  # noqa: E402
from PySide6.QtWidgets import QApplication, QDialog  # noqa: E402

from kn_core.attribution import PromptScores  # noqa: E402
from kn_core.facts import Fact, FactSet, Prompt, Relation  # noqa: E402
from kn_gui.session import COMPLETE, Run, Session  # noqa: E402

LAYERS, NEURONS = 30, 1536  # the default model's shape
FRANCE = Fact("P36", "France", "Paris")
TEMPLATES = ("The capital of [X] is [Y].", "[X]'s capital city is [Y].", "The capital city of [X] is [Y].")


def factset() -> FactSet:
    rels = {"P36": Relation("P36", "capital", TEMPLATES)}
    return FactSet("geo", rels, [FRANCE, Fact("P36", "Japan", "Tokyo")])


def make_run(layers=LAYERS, neurons=NEURONS, hot=((29, 238), (3, 1000)), seed=0) -> Run:
    rng = np.random.default_rng(seed)
    prompts = [Prompt(t.replace("[X]", "France").split("[Y]")[0].rstrip(), " Paris", (7,), t, FRANCE, "causal")
               for t in TEMPLATES]
    run = Run(FRANCE, prompts, state=COMPLETE)
    for k, prompt in enumerate(prompts):
        scores = rng.normal(0, 0.01, (layers, neurons)).astype(np.float32)
        acts = rng.normal(0, 1, (layers, neurons)).astype(np.float32)
        for l, n in hot:
            scores[l, n] = 1.0 + k
            acts[l, n] = -3.0
        run.scores.append(PromptScores(prompt.text, prompt.answer, (7,), scores, acts, 0.5 + 0.1 * k + 1.234567e-5, [0.5],
                                       [], 0.1))
    return run


def flags_for(massive=(), unspecific=()):
    """NeuronFlags as kn_core.neurons defines them (a stand-in with the contract's fields until it lands)."""
    try:
        from kn_core.neurons import NeuronFlags
    except ImportError:
        from dataclasses import dataclass

        @dataclass(frozen=True)
        class NeuronFlags:
            massive: frozenset
            unspecific: frozenset
            rule: dict

            @property
            def excluded(self):
                return self.massive | self.unspecific

            def of(self, neuron):
                return tuple(name for name, group in (("massive", self.massive), ("unspecific", self.unspecific))
                             if tuple(neuron) in group)

    return NeuronFlags(massive=frozenset(massive), unspecific=frozenset(unspecific), rule={})


def session_with_run(run=None) -> Session:
    session = Session(factset())
    run = run or make_run()
    session.runs[(FRANCE.relation, FRANCE.subject, FRANCE.object)] = run
    return session


@pytest.fixture
def attribution(qtbot):
    from kn_gui.panels.attribution_panel import AttributionPanel

    session = session_with_run()
    panel = AttributionPanel(session)
    qtbot.addWidget(panel)
    panel.resize(1000, 760)  # the central area of a 1600 x 1000 window
    panel.show()
    panel.show_run(session.runs[("P36", "France", "Paris")])
    qtbot.waitExposed(panel)
    QApplication.processEvents()
    return panel


# ----------------------------------------------------------------------------------------------- the map

def test_the_line_over_the_map_describes_the_run_shown(attribution):
    """After a re-run the line over the map still read the selected neuron's score and activation in the earlier
    run (and "(refined)" by its sets): a number of a run no longer shown, without a word."""
    panel = attribution
    panel.select_neuron(29, 238)
    first = panel.hover.text()
    assert "score 2," in first  # the mean over make_run's 3 prompts (1 + k)
    panel.show_run(make_run(hot=((3, 1000),), seed=1))  # a re-run: another Run, (29, 238) no longer hot
    assert panel.selected == [] and panel.hover.text().strip() == ""
    panel.select_neuron(29, 238)
    assert panel.hover.text() == panel.describe_neuron(29, 238) and "score 2," not in panel.hover.text()
    panel.view_of.setCurrentIndex(1)  # one prompt's scores: the selected neuron's line follows
    assert panel.hover.text() == panel.describe_neuron(29, 238)


def test_map_gives_every_layer_room(attribution):
    vb = attribution.heat_widget.vb
    per_layer_px = vb.sceneBoundingRect().height() / LAYERS
    assert per_layer_px >= 6, f"{per_layer_px:.1f} px per layer"
    (x0, x1), (y0, y1) = vb.viewRange()
    assert (x0, x1) == pytest.approx((0, NEURONS)) and (y0, y1) == pytest.approx((0, LAYERS))


def test_click_selects_the_neuron_its_pixel_shows_and_exactly_the_cell_when_zoomed(attribution, qtbot):
    selected = []
    attribution.neurons_selected.connect(selected.append)
    widget = attribution.heat_widget
    scores = widget.scores
    cells = [(29, 238), (28, 241), (0, 0), (29, NEURONS - 1), (15, 777)]
    for layer, neuron in cells:  # the whole map in view: several neurons per pixel
        pixel = widget.mapFromScene(widget.cell_scene_pos(layer, neuron))
        qtbot.mouseClick(widget.viewport(), Qt.LeftButton, pos=pixel)
        [(hit_layer, hit)] = selected[-1]
        pool = widget._pool
        assert pool > 1 and hit_layer == layer and abs(hit - neuron) < 2 * pool
        group = scores[layer, hit - hit % pool:hit - hit % pool + pool]
        assert abs(scores[layer, hit]) == np.abs(group).max()  # the neuron drawn in that pixel
    for layer, neuron in cells:  # zoomed in (go to), one neuron spans several pixels: exactly that cell
        attribution.goto_layer.setValue(layer)
        attribution.goto_neuron.setValue(neuron)
        attribution.goto_button.click()
        QApplication.processEvents()
        for target in (neuron, min(neuron + 1, NEURONS - 1)):
            pixel = widget.mapFromScene(widget.cell_scene_pos(layer, target))
            qtbot.mouseClick(widget.viewport(), Qt.LeftButton, pos=pixel)
            assert selected[-1] == [(layer, target)], (layer, target)
    # a strong neighbour does not capture the click (it used to snap to the strongest neuron within 4)
    assert attribution._shown_scores[29, 238] > attribution._shown_scores[29, 237]


def test_pixel_to_cell_mapping_matches_the_drawn_image(attribution):
    """The image cell (row l, column n) is drawn where a click maps to (l, n): check the image's transform."""
    widget = attribution.heat_widget
    image = widget.image
    for layer, neuron in [(29, 238), (0, 5), (12, 1535)]:
        scene = widget.cell_scene_pos(layer, neuron)
        local = image.mapFromScene(scene)  # image pixel coordinates: x = column / pool, y = row
        pool = widget._pool
        assert (int(local.y()), int(local.x() * 1)) == (layer, neuron // pool)


def test_go_to_centres_and_selects(attribution):
    selected = []
    attribution.neurons_selected.connect(selected.append)
    attribution.goto_layer.setValue(29)
    attribution.goto_neuron.setValue(238)
    attribution.goto_button.click()
    assert selected[-1] == [(29, 238)] and attribution.selected == [(29, 238)]
    (x0, x1), _ = attribution.heat_widget.vb.viewRange()
    assert x0 < 238.5 < x1 and x1 - x0 <= 100
    px_per_neuron = attribution.heat_widget.vb.sceneBoundingRect().width() / (x1 - x0)
    assert px_per_neuron >= 5
    # zoomed in, the map draws one column per neuron again, at once
    assert attribution.heat_widget._pool == 1
    assert not attribution.go_to(30, 0) and not attribution.go_to(0, NEURONS)


def test_zoom_only_moves_the_neuron_axis(attribution):
    attribution.heat_widget.zoom(0.25)
    (x0, x1), (y0, y1) = attribution.heat_widget.vb.viewRange()
    assert x1 - x0 == pytest.approx(NEURONS / 4)
    assert (y0, y1) == pytest.approx((0, LAYERS))
    attribution.heat_widget.fit()
    assert attribution.heat_widget.vb.viewRange()[0] == pytest.approx([0, NEURONS])


def test_pooling_keeps_single_strong_neurons_visible():
    from kn_gui.panels.neuron_map import pooled_columns

    scores = np.zeros((2, 10), dtype=np.float32)
    scores[0, 3] = -5
    scores[1, 9] = 2
    pooled = pooled_columns(scores, 4)
    assert pooled.tolist() == [[-5, 0, 0], [0, 0, 2]]


def test_colour_bar_has_three_labels_that_do_not_overlap(attribution):
    axis = attribution.colorbar.axis
    ticks = axis._tickLevels[0]
    assert len(ticks) == 3 and ticks[1] == (0.0, "0")
    height = attribution.colorbar.sceneBoundingRect().height()
    assert height >= 3 * 20, f"colour bar {height:.0f} px tall"


def test_per_prompt_plot_has_a_usable_height(attribution):
    attribution.tabs.setCurrentIndex(1)
    QApplication.processEvents()
    assert attribution.prompt_widget.height() >= 180
    assert attribution.prompt_table.table.rowCount() == 3


def test_flagged_neurons_are_marked_on_the_map(attribution):
    flags = flags_for(massive={(3, 1000)}, unspecific={(29, 238)})
    attribution.set_flags(flags)
    assert list(zip(*attribution.heat_widget.massive_marks.getData())) == [(1000.5, 3.5)]
    assert list(zip(*attribution.heat_widget.unspecific_marks.getData())) == [(238.5, 29.5)]
    assert "flagged massive" in attribution.describe_neuron(3, 1000)


def test_prompt_table_csv_has_full_numbers(attribution, tmp_path):
    attribution.tabs.setCurrentIndex(1)
    table = attribution.prompt_table
    assert table.displayed_rows()[0][3] == "0.500"
    run = attribution.run
    table.write_csv(tmp_path / "prompts.csv")
    rows = list(csv.reader(open(tmp_path / "prompts.csv", encoding="utf-8")))
    assert rows[0][0] == "#" and float(rows[2][3]) == float(run.scores[1].prob)
    assert rows[2][3] != table.displayed_rows()[1][3]


# ----------------------------------------------------------------------------------------------- figure export

@pytest.mark.parametrize("fmt", ["png", "svg", "pdf"])
def test_figures_export_at_size_and_dpi(attribution, tmp_path, fmt):
    from kn_gui.panels.figures import FIGURES, export_figures

    attribution.set_flags(flags_for(massive={(3, 1000)}))
    written, refused = export_figures(attribution, tmp_path, fmt, size_in=(6.0, 3.0), dpi=300)
    assert [p.name for p in written] == [f"{w}.{fmt}" for w in FIGURES] and not refused
    for path in written:
        data = path.read_bytes()
        assert len(data) > 2000
        if fmt == "svg":
            text = data.decode()
            assert "France \u2192 Paris" in text and (">score" in text or ">layer" in text)  # text, not paths
    if fmt == "png":
        from PIL import Image

        with Image.open(tmp_path / "heatmap.png") as image:
            assert image.size == (1800, 900)
            assert image.info["dpi"] == pytest.approx((300, 300), abs=0.5)


def test_figure_has_title_labels_and_legend(attribution):
    from matplotlib.figure import Figure

    from kn_gui.panels import figures

    captured = {}
    real_savefig = Figure.savefig

    def keep(self, *args, **kwargs):
        captured["figure"] = self
        return real_savefig(self, *args, **kwargs)

    Figure.savefig = keep
    try:
        import tempfile

        with tempfile.TemporaryDirectory() as folder:
            for which in ("layers", "heatmap", "prompts"):
                figures.export_figure(attribution, which, f"{folder}/{which}.svg")
                figure = captured["figure"]
                assert "France \u2192 Paris (P36)" in figure._suptitle.get_text()
                for axes in figure.axes[:1]:
                    assert axes.get_xlabel() and axes.get_ylabel()
                    assert axes.get_legend() is not None
    finally:
        Figure.savefig = real_savefig


def test_empty_figures_are_refused(qtbot, tmp_path):
    from kn_gui.panels.attribution_panel import AttributionPanel
    from kn_gui.panels.figures import FigureExportDialog, NothingToPlot, export_figure, export_figures

    session = Session(factset())
    panel = AttributionPanel(session)
    qtbot.addWidget(panel)
    with pytest.raises(NothingToPlot, match="run attribution"):
        export_figure(panel, "heatmap", tmp_path / "h.png")
    with pytest.raises(NothingToPlot):
        export_figures(panel, tmp_path)
    dialog = FigureExportDialog(panel, folder=tmp_path)
    qtbot.addWidget(dialog)
    dialog.show()
    dialog.accept()
    assert dialog.isVisible() and dialog.written is None
    assert "run attribution" in dialog.problem.text() and not list(tmp_path.iterdir())
    # a run whose refined set is empty: the per-prompt figure is refused, the others are written
    run = make_run(hot=())
    session.runs[("P36", "France", "Paris")] = run
    session.t = 0.99  # only each prompt's own maximum is coarse: no neuron is coarse in all 3 prompts
    panel.show_run(run)
    assert panel.refined == []
    written, refused = export_figures(panel, tmp_path)
    assert [p.name for p in written] == ["layers.png", "heatmap.png"]
    assert refused and "select neurons" in refused[0]


def test_export_dialog_writes_the_chosen_format(attribution, qtbot, tmp_path):
    from kn_gui.panels.figures import FigureExportDialog

    dialog = FigureExportDialog(attribution, folder=tmp_path)
    qtbot.addWidget(dialog)
    dialog.format.setCurrentIndex(dialog.format.findData("pdf"))
    dialog.which.setCurrentIndex(dialog.which.findData("layers"))
    assert dialog.path.text() == str(tmp_path / "layers.pdf")
    assert dialog.dpi.value() == 300 and dialog.pixels.text() == "2100 \u00d7 1050 pixels"
    dialog.accept()
    assert dialog.result() == QDialog.Accepted and dialog.written == tmp_path / "layers.pdf"
    assert (tmp_path / "layers.pdf").read_bytes().startswith(b"%PDF")


# ----------------------------------------------------------------------------------------------- edits panel

@pytest.fixture(scope="module")
def tiny_lm():
    from tiny import TINY_CAUSAL, make_tiny

    return make_tiny(TINY_CAUSAL)


@pytest.fixture
def edits(qtbot):
    from PySide6.QtGui import QUndoStack

    from kn_gui.panels.edits_panel import EditsPanel

    session = Session(factset())
    stack = QUndoStack()
    panel = EditsPanel(session, stack)
    panel._stack = stack
    qtbot.addWidget(panel)
    panel.show()
    return panel


def report_rows(before_after, group="fact", new=None):
    rows = []
    for k, (b, a) in enumerate(before_after):
        row = {"group": group, "fact": "France \u2192 Paris", "prompt": f"prompt {k}", "answer": " Paris",
               "before": b, "after": a, "top_before": " Paris", "top_after": " Paris"}
        if new is not None:
            row["new_before"], row["new_after"], row["top_after"] = new[k]
        rows.append(row)
    return rows


def test_update_form_shows_objects_as_words(edits, tiny_lm):
    edits.session.lm = tiny_lm
    edits.set_fact(FRANCE)
    edits.set_objects(["Tokyo", "Berlin"])
    edits.kind.setCurrentText("Update")
    edits.new_object.setEditText("Berlin")
    assert edits.objects_line.text() == "o = ' Paris' \u2192 o' = ' Berlin'"
    report = {"title": "Update L1.2: tokens [7] -> [9] \u2014 evaluated on France \u2192 Paris",
              "rows": report_rows([(0.5, 0.2)], new=[(0.01, 0.6, " Berlin")]),
              "edit": {"kind": "update", "neurons": [[1, 2]], "old_ids": [7], "new_ids": [9], "lambda1": 1.0,
                       "lambda2": 8.0}, "new_object": "Berlin"}
    edits.show_report(report)
    title = edits.result_title.text()
    assert title.startswith("Update 1 neurons: ' Paris' \u2192 ' Berlin'") and "[7]" not in title
    assert title.endswith("evaluated on France \u2192 Paris")
    assert edits.table.displayed_rows()[0][9] == "\u2714 ' Berlin' is top-1"
    assert edits.result_warning.isHidden()


def test_first_click_on_apply_after_typing_is_not_lost(edits, qtbot):
    edits.set_fact(FRANCE)
    edits.set_objects(["Tokyo", "Berlin", "Bern", "Rome"])
    edits.kind.setCurrentText("Update")
    requests = []
    edits.apply_requested.connect(requests.append)
    edits.new_object.setFocus()
    qtbot.keyClicks(edits.new_object.lineEdit(), "Ber")
    assert edits.completer.popup() is None or not edits.completer.popup().isVisible()
    qtbot.mouseClick(edits.apply_button, Qt.LeftButton)
    assert len(requests) == 1 and requests[0]["new_object"].startswith("Ber")


def test_failed_update_says_so_in_words(edits):
    rows = report_rows([(0.5, 0.4), (0.6, 0.5)], new=[(0.02, 1e-40, " Paris"), (0.02, 0.3, " Rome")])
    edits.show_report({"title": "Update", "rows": rows, "new_object": "Berlin",
                       "edit": {"kind": "update", "neurons": [[0, 1]], "new_ids": [9]}})
    goals = [row[9] for row in edits.table.displayed_rows()]
    assert goals[0] == "\u2718 p(o') fell 0.020 \u2192 1.0e-40; not top-1 (model says ' Paris')"
    assert goals[1] == "\u2718 not top-1 (model says ' Rome')"
    warning = edits.result_warning.text()
    assert not edits.result_warning.isHidden()
    assert "failed its goal" in warning and "went down on 1 of 2" in warning and "not the top-1 answer on 2 of 2" \
        in warning


def test_edit_that_changed_nothing_says_so(edits):
    rows = report_rows([(0.5, 0.5), (0.25, 0.25 + 1e-9)]) + report_rows([(0.1, 0.1)], group="other relations")
    edits.show_report({"title": "Amplify x2 L0.1", "rows": rows, "edit": {"kind": "amplify", "neurons": [[0, 1]]}})
    assert "changed nothing" in edits.result_warning.text() and not edits.result_warning.isHidden()
    edits.show_report({"title": "Suppress", "rows": report_rows([(0.5, 0.3)]),
                       "edit": {"kind": "suppress", "neurons": [[0, 1]]}})
    assert edits.result_warning.isHidden()


def test_erase_with_fewer_neurons_says_why_and_offers_attribution(edits):
    why = "the 1 attributed facts of P36 have only 3 distinct refined neurons"
    report = {"title": "Erase P36: 3 neurons", "rows": report_rows([(0.5, 0.1)]), "requested": 20,
              "relation": "P36", "edit": {"kind": "erase", "neurons": [[0, 1], [1, 2], [2, 3]], "fill": "zero"},
              "skipped": [("17 of the 20 neurons asked for", why)]}
    edits.show_report(report)
    warning = edits.result_warning.text()
    assert "Edited 3 of the 20 neurons asked for" in warning and why in warning
    assert not edits.attribute_button.isHidden() and "P36" in edits.attribute_button.text()
    asked = []
    edits.attribute_relation_requested.connect(asked.append)
    edits.attribute_button.click()
    assert asked == ["P36"]


def test_edit_table_csv_names_the_edit_and_model_and_keeps_full_numbers(edits, tmp_path):
    rows = report_rows([(0.123456789, 0.0001234567891)])
    edits.show_report({"title": "Suppress L0.1, answer positions", "rows": rows,
                       "edit": {"kind": "suppress", "neurons": [[0, 1]], "scope": "answer"},
                       "model": {"name": "SmolLM2-135M", "sha256": "ab" * 32}})
    edits.table.write_csv(tmp_path / "edit.csv")
    lines = (tmp_path / "edit.csv").read_text(encoding="utf-8").splitlines()
    assert lines[0] == "# edit: Suppress L0.1, answer positions"
    assert lines[1].startswith("# edit parameters: {\"kind\": \"suppress\"")
    assert lines[2] == f"# model: SmolLM2-135M (weights sha256 {'ab' * 32})"
    data = list(csv.reader(lines[3:]))
    assert data[0][:7] == ["group", "fact", "prompt", "answer", "p before", "p after", "\u0394p"]
    assert float(data[1][4]) == 0.123456789 and float(data[1][5]) == 0.0001234567891
    assert float(data[1][6]) == 0.0001234567891 - 0.123456789
    assert edits.table.displayed_rows()[0][4] == "0.123"


# ----------------------------------------------------------------------------------------------- fact dialogs

def open_dialog(qtbot, dialog):
    qtbot.addWidget(dialog)
    dialog.show()
    return dialog


def test_fact_dialog_keeps_bad_input_and_says_what_to_fix(qtbot):
    from kn_gui.panels.facts_panel import FactDialog

    dialog = open_dialog(qtbot, FactDialog(factset(), relation_id="P36"))
    dialog.object.setText("Berlin")
    dialog.accept()
    assert dialog.isVisible() and dialog.result() != QDialog.Accepted
    assert "Type the subject" in dialog.problem.text() and dialog.problem.isVisible()
    assert dialog.object.text() == "Berlin"  # the typed text is kept
    dialog.subject.setText("France")
    dialog.object.setText("Paris")
    dialog.accept()
    assert dialog.isVisible() and "already in P36" in dialog.problem.text()
    dialog.object.setText("Lyon")
    dialog.accept()
    assert dialog.result() == QDialog.Accepted and dialog.fact() == Fact("P36", "France", "Lyon")


def test_fact_dialog_refuses_a_relation_without_templates(qtbot):
    from kn_gui.panels.facts_panel import FactDialog

    fs = FactSet("x", {"P1": Relation("P1", "empty", ())}, [])
    dialog = open_dialog(qtbot, FactDialog(fs, relation_id="P1"))
    dialog.subject.setText("France")
    dialog.object.setText("Paris")
    dialog.accept()
    assert dialog.isVisible() and "has no templates" in dialog.problem.text()


def test_relation_dialog_refuses_missing_slots_and_no_templates(qtbot):
    from kn_gui.panels.facts_panel import RelationDialog

    dialog = open_dialog(qtbot, RelationDialog(taken_ids={"P36"}))
    dialog.rid.setText("P17")
    dialog.name.setText("country")
    dialog.accept()
    assert dialog.isVisible() and "at least one template" in dialog.problem.text()
    dialog.templates.setPlainText("[X] is located in [Y].\nThe country of it is [Y].")
    dialog.accept()
    assert dialog.isVisible() and "Template 2" in dialog.problem.text() and "no [X]" in dialog.problem.text()
    assert dialog.templates.toPlainText().endswith("The country of it is [Y].")
    dialog.templates.setPlainText("[X] is located in [Y].")
    dialog.rid.setText("P36")
    dialog.accept()
    assert dialog.isVisible() and "exists already" in dialog.problem.text()
    dialog.rid.setText("P17")
    dialog.accept()
    assert dialog.result() == QDialog.Accepted
    assert dialog.relation() == Relation("P17", "country", ("[X] is located in [Y].",))


def test_long_answer_is_accepted_only_after_a_warning_with_the_run_time(qtbot, tiny_lm):
    from kn_gui.panels.facts_panel import FactDialog

    session = Session(factset())
    session.lm = tiny_lm
    long_object = " ".join(["Paris"] * 30)  # 30 tokens for the tiny word-level tokenizer
    dialog = open_dialog(qtbot, FactDialog(session.factset, relation_id="P36", session=session,
                                           seconds_per_token=2.0))
    dialog.subject.setText("Germany")
    dialog.object.setText(long_object)
    dialog.accept()
    assert dialog.isVisible() and dialog.result() != QDialog.Accepted
    text = dialog.problem.text()
    # 30 tokens x 3 prompts x 2 s = 180 s
    assert "30 tokens long" in text and "about 3 min" in text and "30 tokens \u00d7 3 prompts \u00d7 2 s" in text
    ok = dialog.buttons.button(dialog.buttons.StandardButton.Ok)
    assert ok.text() == "Add anyway"
    ok.click()
    assert dialog.result() == QDialog.Accepted and dialog.fact().object == long_object
    # a short answer needs no warning
    short = open_dialog(qtbot, FactDialog(session.factset, relation_id="P36", session=session))
    short.subject.setText("Germany")
    short.object.setText("Berlin")
    short.accept()
    assert short.result() == QDialog.Accepted


def test_seconds_per_token_is_measured_from_runs():
    from kn_gui.panels.facts_panel import SECONDS_PER_TOKEN_PROMPT, seconds_per_token_prompt

    session = Session(factset())
    assert seconds_per_token_prompt(session) == SECONDS_PER_TOKEN_PROMPT
    session.runs[("P36", "France", "Paris")] = make_run(layers=2, neurons=4, hot=())  # 0.1 s per one-token prompt
    assert seconds_per_token_prompt(session) == pytest.approx(0.1)


def test_model_says_shows_the_top1_word(qtbot, tiny_lm):
    from kn_gui.panels.facts_panel import FactsPanel

    session = Session(factset())
    session.lm = tiny_lm
    prompts, _ = session.prompts_for(FRANCE)
    session.checks[(("P36", "France", "Paris"), prompts[0].template)] = {"correct": True, "top1_token": " Paris",
                                                                          "prob": 0.4}
    session.checks[(("P36", "France", "Paris"), prompts[1].template)] = {"correct": False, "top1_token": " Lyon",
                                                                          "prob": 0.01}
    panel = FactsPanel(session)
    qtbot.addWidget(panel)
    fact_item = panel._find_fact_item(FRANCE)
    says = [fact_item.child(r, 1).text() for r in range(2)]
    assert says == ["\u2714 ' Paris'", "\u2718 ' Lyon'"]


def test_facts_tree_renders_a_facts_prompts_when_it_is_opened(qtbot, tiny_lm, monkeypatch):
    """Every fact's prompts were tokenized when the tree was built: after importing PARAREL's dev folder (22,425
    facts) the UI thread was held for minutes. Now a fact's prompts are rendered when its row is first opened
    (or at once where the model checked some, for the row's count)."""
    from kn_gui.panels.facts_panel import FactsPanel

    session = Session(factset())
    session.lm = tiny_lm
    rendered = []
    prompts_for = session.prompts_for
    monkeypatch.setattr(session, "prompts_for", lambda fact, *a: (rendered.append(fact), prompts_for(fact, *a))[1])
    panel = FactsPanel(session)
    qtbot.addWidget(panel)
    assert rendered == []
    item = panel._find_fact_item(FRANCE)
    assert item.rowCount() == 1 and not item.child(0).isSelectable()  # the expand arrow, nothing to select
    panel.tree.expand(item.index())
    assert rendered == [FRANCE]
    expected = [p.text + (" ___" if p.kind == "causal" else "") for p in prompts_for(FRANCE)[0]]
    assert [item.child(r).text() for r in range(item.rowCount())] == expected
    panel.refresh_fact(FRANCE)  # re-rendered in place while open: prompts, not the placeholder
    item = panel._find_fact_item(FRANCE)
    assert [item.child(r).text() for r in range(item.rowCount())] == expected


def test_erase_report_from_the_edit_plan_alone_says_both_counts(edits):
    """The controller's report carries EditPlan.skipped; the requested count and the relation come from it and
    the panel's fact."""
    why = "the 1 attributed facts of P36 have only 3 distinct refined neurons"
    edits.set_fact(FRANCE)
    edits.show_report({"title": "Erase (P36)", "rows": report_rows([(0.5, 0.1)]),
                       "edit": {"kind": "erase", "neurons": [[0, 1], [1, 2], [2, 3]]},
                       "skipped": [["17 of the 20 neurons asked for", why]]})
    assert "Edited 3 of the 20 neurons asked for: " + why in edits.result_warning.text()
    asked = []
    edits.attribute_relation_requested.connect(asked.append)
    edits.attribute_button.click()
    assert asked == ["P36"]


# ----------------------------------------------------------------------------------------------- neurons panel

@pytest.fixture
def neurons(qtbot):
    from kn_gui.panels.neurons_panel import NeuronsPanel
    from kn_gui.session import NeuronSet

    session = session_with_run()
    panel = NeuronsPanel(session)
    panel.sets_requested.connect(lambda _text, sets: setattr(session, "neuron_sets", sets))  # as the controller
    qtbot.addWidget(panel)
    panel.show()
    panel.set_run(session.runs[("P36", "France", "Paris")])
    panel.add_set(NeuronSet("refined: France \u2192 Paris", "refined", [(29, 238), (3, 1000), (5, 5)], "France"))
    return panel


def test_flagged_neurons_are_marked_in_the_table_and_exported(neurons, tmp_path):
    neurons.set_flags(flags_for(massive={(3, 1000)}, unspecific={(3, 1000), (5, 5)}))
    rows = neurons.contents.displayed_rows()
    assert [r[4] for r in rows] == ["", "\u26a0 massive, unspecific", "\u26a0 unspecific"]
    item = neurons.contents.table.item(1, 0)
    assert item.foreground().color().name() == "#6c3483" and "massive activation" in item.toolTip()
    neurons.export_set(str(tmp_path / "set.csv"))
    lines = (tmp_path / "set.csv").read_text(encoding="utf-8").splitlines()
    assert lines[0].startswith("# neuron set: refined: France \u2192 Paris")
    data = list(csv.reader([l for l in lines if not l.startswith("#")]))
    assert data[0] == ["layer", "neuron", "score", "activation", "flags"]
    run = neurons.run
    assert data[2][:2] == ["3", "1000"] and data[2][4] == "massive;unspecific" and data[1][4] == ""
    assert float(data[2][2]) == float(run.mean_scores()[3, 1000])  # in full, not the displayed 4 digits
    neurons.export_set(str(tmp_path / "set.json"))
    import json

    saved = json.loads((tmp_path / "set.json").read_text())
    assert saved["flags"] == {"3,1000": ["massive", "unspecific"], "5,5": ["unspecific"]}


def test_inspector_reads_a_negative_neuron_with_its_sign(neurons):
    tokens = {"promoted": [(" junk", 2.0), ("##x", 1.0)], "suppressed": [(" capitals", -5.0), (" metropolis", -4.0)],
              "norm": 1.5}
    neurons.show_inspection(29, 238, tokens)  # its activation is -3 on every prompt of the run
    promoted = neurons.promoted.displayed_rows()
    assert promoted == [["' capitals'", "+5.000"], ["' metropolis'", "+4.000"]]
    assert neurons.suppressed.displayed_rows()[0] == ["' junk'", "-2.000"]
    assert neurons.inspect_tabs.tabText(0) == "Promotes (\u2212v)"
    assert "Sign used: negative (mean activation -3 on the 3 prompts of France \u2192 Paris)" in \
        neurons.sign_line.text()
    assert neurons.inspect_tabs.tabText(2) == "Most negative activations"
    assert neurons.activating.displayed_rows()[0][2] == "-3"


def test_inspector_takes_the_engines_sign_and_labels_lists(neurons):
    tokens = {"sign": -1, "sign_source": "activation on the fact's prompts",
              "promotes": [{"token": " capitals", "id": 1, "logit": 5.0}],
              "suppresses": [{"token": " junk", "id": 2, "logit": -2.0}], "norm": 1.0}
    neurons.show_inspection(29, 238, tokens)  # the engine applied the sign already: no second swap
    assert neurons.promoted.displayed_rows() == [["' capitals'", "+5.000"]]
    assert "negative (activation on the fact's prompts)" in neurons.sign_line.text()
    neurons.run = None
    neurons.show_inspection(1, 1, {"promoted": [("a", 1.0)], "suppressed": [("b", -1.0)]})
    assert neurons.promoted.displayed_rows() == [["'a'", "+1.000"]]
    assert "read as if the activation were positive" in neurons.sign_line.text()
    assert neurons.inspect_tabs.tabText(0) == "Promotes (+v)"


def test_inspector_sign_from_the_run_matches_the_engines_signed_reading(qtbot, tiny_lm):
    """The engine's unsigned answer, read with a run whose activation is negative, lists what neuron_tokens
    gives with sign = -1 (an independent path: the engine negates the projection before ranking)."""
    from kn_core.evaluation import neuron_tokens
    from kn_gui.panels.neurons_panel import NeuronsPanel

    layers, neurons_ = tiny_lm.layout.layers, tiny_lm.layout.neurons
    session = session_with_run(make_run(layers, neurons_, hot=((1, 5),)))  # activation -3 at (1, 5)
    panel = NeuronsPanel(session)
    qtbot.addWidget(panel)
    panel.set_run(session.runs[("P36", "France", "Paris")])
    panel.show_inspection(1, 5, neuron_tokens(tiny_lm, 1, 5, top_k=8))
    from_run = panel.promoted.rows(), panel.suppressed.rows()
    signed = neuron_tokens(tiny_lm, 1, 5, top_k=8, sign=-1)
    panel.show_inspection(1, 5, signed)
    assert (panel.promoted.rows(), panel.suppressed.rows()) == from_run
    assert [r[0] for r in from_run[0]] == [repr(row["token"]) for row in signed["promotes"]]
    assert panel.inspect_tabs.tabToolTip(0) == signed["labels"]["promotes"]


def test_a_disabled_delete_button_looks_disabled(qtbot):
    """The red 'danger' style (Delete in the Facts panel and the runs browser) outranked the disabled look: the
    runs browser's Delete looked ready with no run selected, and a click did nothing."""
    from pathlib import Path

    from PySide6.QtWidgets import QPushButton, QWidget

    from kn_gui.panels.common import hbox

    box = QWidget()
    box.setStyleSheet((Path(__file__).resolve().parent.parent / "resources" / "style.qss").read_text(encoding="utf-8"))
    plain, danger = QPushButton("Delete"), QPushButton("Delete")
    danger.setObjectName("danger")
    box.setLayout(hbox(plain, danger))
    qtbot.addWidget(box)
    box.show()
    qtbot.waitExposed(box)
    danger.setEnabled(False)
    plain.setEnabled(False)
    assert danger.grab().toImage() == plain.grab().toImage()
    danger.setEnabled(True)
    assert danger.grab().toImage() != plain.grab().toImage()  # enabled, it is red


def test_the_inspector_follows_t_and_p(neurons):
    """The inspector said 'refined for 1 of 1 attributed facts' from when the neuron was clicked; after t moved so
    that no fact had it any more, it still did (a sets change never re-read it)."""
    session = neurons.session
    run = session.runs[("P36", "France", "Paris")]
    session.t = 0.0  # every positive score is coarse: some noise neurons are refined
    noise = next(n for n in session.refined(run) if n not in ((29, 238), (3, 1000)))
    neurons.show_inspection(*noise, None)
    assert "refined for 1 of 1 attributed facts" in neurons.inspect_title.text()
    session.t = 0.2
    assert noise not in session.refined(run)
    neurons.refresh()  # what the window does when the sets change (t, p, a new run)
    assert "refined for 0 of 1 attributed facts" in neurons.inspect_title.text()
