"""The attribution panel's controls are declared from the engine's parameters and it only requests; the
controllers change the session."""

from __future__ import annotations

import pytest

pytest.importorskip("pytestqt")

from kn_core.attribution import AttributionParams  # noqa: E402
from kn_core.facts import FactSet  # noqa: E402
from kn_core.validation import MAX_STEPS  # noqa: E402
from kn_gui.panels.attribution_panel import AttributionPanel  # noqa: E402
from kn_gui.panels.run_params import PROMPT_PARAMS, RUN_PARAMS  # noqa: E402
from kn_gui.session import NeuronSet, Session  # noqa: E402
from test_gui_controllers import parts  # noqa: E402,F401 (fixture)


@pytest.fixture
def panel(qtbot):
    panel = AttributionPanel(Session(FactSet("empty", {}, [])))
    qtbot.addWidget(panel)
    return panel


def test_run_controls_take_their_ranges_choices_and_defaults_from_the_engine(panel):
    assert (panel.steps.minimum(), panel.steps.maximum()) == (1, MAX_STEPS)
    assert panel.params() == AttributionParams()
    for param in RUN_PARAMS + PROMPT_PARAMS:
        control = getattr(panel, param.name)
        if param.choices:
            assert [control.itemText(i) for i in range(control.count())] == list(param.choices)
            assert control.currentText() == param.default
        else:
            assert (control.minimum(), control.maximum(), control.value()) == (*param.bounds, param.default)
    panel.steps.setValue(MAX_STEPS)  # every value the app offers is one the engine takes
    assert panel.params().steps == MAX_STEPS


def test_the_panel_requests_and_never_writes_the_session(panel):
    requests = []
    panel.thresholds_requested.connect(lambda t, p: requests.append((t, p)))
    panel.keep_massive_requested.connect(requests.append)
    panel.templates_changed.connect(requests.append)
    panel.t_control.spin.setValue(0.5)
    panel.keep_massive.setChecked(True)
    panel.templates.setCurrentText("end-only")
    s = panel.session
    assert requests == [(0.5, 0.7), True, "end-only"]
    assert (s.t, s.keep_massive, s.causal_templates) == (0.2, False, "prefix")
    panel.show_selection()  # nobody applied them: the controls show the session's values again
    assert panel.t_control.value() == 0.2 and not panel.keep_massive.isChecked()


def test_the_controllers_change_the_session(parts, qtbot):
    session, runner, history, edits, attribution, project, events = parts
    assert attribution.change_selection(None, t=0.3, p=0.5, keep_massive=True) == ""
    assert (session.t, session.p, session.keep_massive) == (0.3, 0.5, True)
    attribution.set_causal_templates("end-only")
    assert session.causal_templates == "end-only"
    session.neuron_sets["mine"] = NeuronSet("mine", "user", [(0, 1)])
    session.results_dirty = True
    project.new()  # an empty project: the built-in facts, nothing else; the model stays
    assert not session.runs and not session.neuron_sets and not session.results_dirty
    assert session.factset.facts and session.lm is not None


def test_declared_controls_take_value_pairs_and_float_steps(qtbot):
    from kn_gui.panels.form import Param, build_control

    combo = build_control(Param("fill", "", "", "unk", choices=(("zero", "zero"), ("<unk> token", "unk"))))
    spin = build_control(Param("factor", "", "", 2.0, bounds=(-10, 100), step=0.5))
    for control in (combo, spin):
        qtbot.addWidget(control)
    assert (combo.currentText(), combo.currentData()) == ("<unk> token", "unk")
    assert (spin.value(), spin.singleStep(), spin.minimum()) == (2.0, 0.5, -10)
