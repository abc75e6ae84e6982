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
from kn_gui.session import Run, Session  # noqa: E402

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
    run = Run(FRANCE, prompts, complete=True)
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

def test_map_gives_every_layer_room(attribution):
    vb = attribution.heat_widget.vb
    per_layer_px = vb.sceneBoundingRect().height() / LAYERS
    assert per_layer_px >= 6, f"{per_layer_px:.1f} px per layer"
    (x0, x1), (y0, y1) = vb.viewRange()
    assert (x0, x1) == pytest.approx((0, NEURONS)) and (y0, y1) == pytest.approx((0, LAYERS))


def test_click_on_a_cell_selects_exactly_that_cell(attribution, qtbot):
    selected = []
    attribution.neurons_selected.connect(selected.append)
    widget = attribution.heat_widget
    for layer, neuron in [(29, 238), (28, 241), (0, 0), (29, NEURONS - 1), (15, 777)]:
        scene = widget.cell_scene_pos(layer, neuron)
        assert attribution.neuron_at(scene) == (layer, neuron)
        qtbot.mouseClick(widget.viewport(), Qt.LeftButton, pos=widget.mapFromScene(scene))
        assert selected[-1] == [(layer, neuron)], (layer, neuron)
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
    # zoomed in, the map draws one column per neuron again
    attribution.heat_widget._draw_image()
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
