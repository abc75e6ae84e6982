"""The GUI's causal templates (prefix or end-only, kn_core.facts.render_prompts): chosen beside Run, recorded in
every run's params as the CLI records it, shown in the run's header, kept through save and reopen; and the
message when a fact has no usable prompt names the fix that applies."""

from __future__ import annotations

import pytest

pytest.importorskip("pytestqt")

from PySide6.QtCore import QCoreApplication  # noqa: E402

from kn_core.facts import Fact, FactSet, Relation  # noqa: E402
from test_gui import app, errors, lm, make_window, run_fact, settings  # noqa: E402,F401

TEMPLATES = ("The capital of [X] is [Y].", "[X] has its capital in [Y].", "In [X] the capital is [Y], of course.")
FACT = Fact("P36", "France", "Paris")
BACKWARDS = Fact("P1", "France", "Paris")  # its only template names [Y] first: no prompt for a causal model
ONLY_TAIL = Fact("P2", "France", "Paris")  # its only template has text after [Y]: a prompt with prefix only


def factset() -> FactSet:
    return FactSet("t", {"P36": Relation("P36", "capital", TEMPLATES),
                         "P1": Relation("P1", "backwards", ("[Y] is the capital of [X].",)),
                         "P2": Relation("P2", "tail", (TEMPLATES[2],))}, [FACT, BACKWARDS, ONLY_TAIL])


def test_causal_templates_are_chosen_recorded_shown_and_reopened(app, qtbot, settings, lm, tmp_path):
    window = make_window(qtbot, settings, lm, factset=factset())
    ap = window.attribution_panel
    assert ap.templates.isEnabled() and ap.templates.currentText() == "prefix"
    prefix = run_fact(qtbot, window, FACT, steps=1)
    assert len(prefix.prompts) == 3 and prefix.params["causal_templates"] == "prefix"
    assert prefix.params["steps"] == 1  # the attribution parameters stay beside it
    assert "3 prompts, prefix templates)" in ap.title.text()
    ap.templates.setCurrentText("end-only")
    assert window.session.causal_templates == "end-only"
    assert "Causal templates: end-only" in window.statusBar().currentMessage()
    item = window.facts_panel._find_fact_item(FACT)  # the Facts tree lists the template end-only leaves out
    window.facts_panel.tree.expand(item.index())
    assert [item.child(r).text() for r in range(item.rowCount())][-1] == f"skipped: {TEMPLATES[2]}"
    end_only = run_fact(qtbot, window, FACT, steps=1)
    assert len(end_only.prompts) == 2 and end_only.params["causal_templates"] == "end-only"
    assert "2 prompts, end-only templates)" in ap.title.text()
    path = str(tmp_path / "templates.knproj")
    assert window.lifecycle.save_to(path, wait=True)
    window.close()

    again = make_window(qtbot, settings, lm)
    with qtbot.waitSignal(again.project_opened, timeout=30000):
        again.lifecycle.open_project(path)
    assert again.runner.wait_idle(30000)
    run = again.session.runs[("P36", "France", "Paris")]
    assert run.params["causal_templates"] == "end-only" and len(run.prompts) == 2
    assert again.session.causal_templates == "end-only"
    assert again.attribution_panel.templates.currentText() == "end-only"
    again.facts_panel.select_fact(FACT)
    again.select_fact(FACT)
    QCoreApplication.processEvents()
    assert "end-only templates)" in again.attribution_panel.title.text()
    again.close()


@pytest.mark.parametrize("mode, fact, fix, reason", [
    ("prefix", BACKWARDS, "name [X] before [Y]", "[Y] comes first"),
    ("end-only", BACKWARDS, "name [X] before [Y]", "[Y] is not at the end"),  # prefix would not help either
    ("end-only", ONLY_TAIL, "Set templates to prefix", "[Y] is not at the end")])
def test_no_usable_prompt_names_the_fix_for_the_templates_in_use(app, qtbot, settings, lm, mode, fact, fix, reason):
    window = make_window(qtbot, settings, lm, factset=factset())
    window.attribution_panel.templates.setCurrentText(mode)
    seen = errors(window)
    window.facts_panel.select_fact(fact)
    window.attributions.run_attribution("current")
    (title, message), = seen
    assert title == "Nothing to attribute" and fix in message and reason in message
    assert "at the end (causal models)" not in message  # the text from before prefix templates
    window.close()


def test_masked_models_record_no_causal_templates(app, qtbot, settings):
    from tiny import TINY_MASKED, make_tiny

    window = make_window(qtbot, settings, make_tiny(TINY_MASKED), factset=factset())
    assert not window.attribution_panel.templates.isEnabled()
    run = run_fact(qtbot, window, FACT, steps=1)
    assert run.params["causal_templates"] is None
    assert "templates)" not in window.attribution_panel.title.text()
    window.close()
