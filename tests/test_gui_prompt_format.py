"""The app's prompt format combo (issue 22): chat for a model with a chat template, plain (and why) without one;
runs record it; a fact with fewer than 3 prompts shows the neurons coarse in all of them."""

from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from kn_core.encoding import prompt_format  # noqa: E402
from kn_core.facts import Fact, FactSet, Relation  # noqa: E402
from test_gui import FRANCE, app, make_window, run_fact, settings  # noqa: E402,F401 (fixtures)
from test_prompt_format import TEMPLATE  # noqa: E402
from tiny import make_tiny  # noqa: E402


def test_chat_combo_sets_the_models_format_and_runs_record_it(app, qtbot, settings):  # noqa: F811
    lm = make_tiny("gpt2")
    lm.tokenizer.chat_template = TEMPLATE
    window = make_window(qtbot, settings, lm)
    window.attribution_panel.prompt_format.setCurrentText("chat")
    assert prompt_format(lm) == "chat" and window.session.prompt_params()["prompt_format"] == "chat"
    window.facts_panel.select_fact(FRANCE)  # its answers were checked in plain: selecting it checks them in chat
    assert window.runner.wait_idle(30000) and window.session.checks
    run = run_fact(qtbot, window, steps=2)
    assert run.params["prompt_format"] == "chat" and "chat prompts" in window.attribution_panel.title.text()
    plain = make_tiny("gpt2")  # no chat template: the new model stays plain and the combo says so
    window.set_model(plain)
    assert prompt_format(plain) == "plain" and window.attribution_panel.prompt_format.currentText() == "plain"
    assert window.runner.wait_idle(30000)
    window.attribution_panel.prompt_format.setCurrentText("chat")  # asked again: refused, and why
    assert prompt_format(plain) == "plain" and window.attribution_panel.prompt_format.currentText() == "plain"
    assert "no chat template" in window.statusBar().currentMessage()
    window.close()


def test_a_fact_with_one_prompt_shows_its_coarse_neurons(app, qtbot, settings):  # noqa: F811
    one = FactSet("one", {"P36": Relation("P36", "capital", ("The capital of [X] is [Y].",))},
                  [Fact("P36", "France", "Paris")])
    window = make_window(qtbot, settings, make_tiny("gpt2"), factset=one)
    run = run_fact(qtbot, window, steps=2)
    session = window.session
    assert session.refined(run) == sorted(session.coarse(run, 0)) and session.refined(run)
    assert "fewer than 3 prompts: coarse in all 1" in window.attribution_panel.summary.text()
    window.close()


def test_the_prompt_format_is_saved_with_the_project_and_restored_on_open(app, qtbot, settings, tmp_path):  # noqa: F811
    lm = make_tiny("gpt2")
    lm.tokenizer.chat_template = TEMPLATE
    window = make_window(qtbot, settings, lm)
    window.attribution_panel.prompt_format.setCurrentText("chat")
    path = str(tmp_path / "chat.knproj")
    assert window.lifecycle.save_to(path, wait=True)
    window.attribution_panel.prompt_format.setCurrentText("plain")  # a later choice, not saved
    assert prompt_format(lm) == "plain"
    with qtbot.waitSignal(window.project_opened, timeout=30000):
        window.lifecycle.open_project(path)
    assert window.runner.wait_idle(30000)
    assert window.attribution_panel.prompt_format.currentText() == "chat" and prompt_format(lm) == "chat"
    assert window.session.prompt_params()["prompt_format"] == "chat"  # what the next run records
    window.close()


def test_the_prompt_format_cannot_change_while_a_job_runs(app, qtbot, settings):  # noqa: F811
    lm = make_tiny("gpt2")
    lm.tokenizer.chat_template = TEMPLATE
    window = make_window(qtbot, settings, lm)
    combo = window.attribution_panel.prompt_format
    assert combo.isEnabled()
    states = []
    window.runner.job_started.connect(lambda *_: states.append(combo.isEnabled()))
    run_fact(qtbot, window, steps=2)
    assert states and not any(states)  # disabled while the run encoded its prompts
    assert combo.isEnabled()
    window.close()
