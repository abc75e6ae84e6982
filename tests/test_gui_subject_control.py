"""Issue 21 in the app: the subject-specificity control of a run, as `kn neurons --subject-control` computes it
(kn_core.specificity.subject_control on the same prompts, parameters and candidates), its "template" neurons kept
out of the refined set and marked on the map, and the result saved with the run."""

from __future__ import annotations

import pytest

pytest.importorskip("pytestqt")

from kn_core.attribution import AttributionParams  # noqa: E402
from kn_core.specificity import template_neurons  # noqa: E402
from test_gui import FRANCE, app, lm, run_fact, settings, window  # noqa: E402,F401


def loose(window):
    window.attribution_panel.t_control.spin.setValue(0.1)
    window.attribution_panel.p_control.spin.setValue(0.3)


def control_of(qtbot, window, run):
    with qtbot.waitSignal(window.attribution.event, timeout=120000,
                          check_params_cb=lambda ev: type(ev).__name__ == "SubjectControlled"):
        window.attributions.subject_control()
    assert window.runner.wait_idle(30000)
    return run.params["subject_control"]


def test_the_apps_control_is_the_engines_on_the_same_run(window, qtbot):
    from kn_core.specificity import subject_control

    loose(window)
    run = run_fact(qtbot, window, steps=2)
    s = window.session
    candidates = s.refined(run)
    assert candidates, "the tiny model's run needs refined neurons to control"
    got = control_of(qtbot, window, run)
    params = AttributionParams.from_dict(run.params)
    want = subject_control(s.lm, s.factset, FRANCE, list(run.prompts), candidates, params,
                           causal_templates=run.params.get("causal_templates", "prefix")).to_dict()
    assert {k: v for k, v in got.items() if k not in ("t", "p")} == want
    assert got["controlled"] and len(got["control_subjects"]) == 3 and FRANCE.subject not in got["control_subjects"]
    assert (got["t"], got["p"]) == (s.t, s.p)
    flagged = template_neurons(run.params)
    assert set(s.refined(run)) == set(candidates) - flagged
    marks = window.attribution_panel.heat_widget.template_marks.getData()
    assert len(marks[0]) == len(flagged)
    assert "Subject control of France" in window.statusBar().currentMessage()
    panel = window.attribution_panel
    sizes = {(a, b): r for a, b, r in got["ratios"]}
    for neuron in candidates:
        text = panel.describe_neuron(*neuron)
        assert f"keeps {sizes[neuron]:.2f} of its effect's size without the subject" in text
        assert text.endswith(": template" if neuron in flagged else ": subject-specific")


def test_template_neurons_leave_the_refined_set_and_stay_with_the_saved_run(window, qtbot, tmp_path,
                                                                           monkeypatch):
    """With every candidate flagged (the rule replaced here, so the plumbing is what is tested), the refined set
    and its auto set empty out, the map marks them, and the project reopens with the same control."""
    import kn_core.specificity as specificity

    monkeypatch.setattr(specificity, "flag_template", lambda ratios, threshold=0.5: frozenset(
        n for n, r in ratios.items() if r == r))
    loose(window)
    run = run_fact(qtbot, window, steps=2)
    candidates = set(window.session.refined(run))
    control = control_of(qtbot, window, run)
    flagged = template_neurons(run.params)
    assert flagged and flagged <= candidates and len(flagged) == len(control["template"])
    assert f"({len(flagged)} template neurons left out: subject control)" in window.attribution_panel.summary.text()
    assert not set(window.session.refined(run)) & flagged
    auto = window.session.neuron_sets[f"refined: {FRANCE.subject} \u2192 {FRANCE.object}"]
    assert not set(map(tuple, auto.neurons)) & flagged
    path = str(tmp_path / "controlled.knproj")
    assert window.lifecycle.save_to(path, wait=True)
    with qtbot.waitSignal(window.project_opened, timeout=30000):
        window.lifecycle.open_project(path)
    reopened = window.session.runs[(FRANCE.relation, FRANCE.subject, FRANCE.object)]
    assert template_neurons(reopened.params) == flagged
    assert not set(window.session.refined(reopened)) & flagged


def test_a_run_without_refined_neurons_is_refused_before_any_work(window, qtbot):
    window.attributions.subject_control()  # no run yet
    assert window.last_error[0] == "No complete run" and not window.runner.busy


def test_the_control_refuses_weights_other_than_the_runs(window, qtbot, monkeypatch):
    """It re-scores the run's prompts: with an edit active that the run did not have, its own scores and the
    control's would come from other weights than the ones that chose the candidates."""
    loose(window)
    run = run_fact(qtbot, window, steps=2)
    assert window.session.refined(run) and not run.edits
    monkeypatch.setattr(window.attributions.controller, "active_edits", lambda: ["Suppress 3 neurons"])
    window.attributions.subject_control()
    assert window.last_error[0] == "Not the run's weights" and "1 active edit(s) now" in window.last_error[1]
    assert not window.runner.busy and "subject_control" not in run.params

