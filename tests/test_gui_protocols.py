"""Issue 22 in the app: the Edits panel's protocol and evaluation choices are what the edit is scored by, the
report names both (saved with the edit), and the metrics strip shows the protocol's own numbers, read from the
report (kn_core.protocols), beside the random-neuron control."""

from __future__ import annotations

import pytest

pytest.importorskip("pytestqt")

from PySide6.QtGui import QUndoStack  # noqa: E402

from kn_core.attribution import AttributionParams  # noqa: E402
from kn_core.protocols import flat_scores, format_score  # noqa: E402
from kn_gui.controllers import UserError  # noqa: E402
from kn_gui.controllers import edits as E  # noqa: E402
from kn_gui.controllers.batch import BatchApplied  # noqa: E402
from kn_gui.panels.edits_panel import EditsPanel  # noqa: E402
from test_batch_gui import JAPAN, parts  # noqa: E402,F401 (fixture: a session with FRANCE and JAPAN attributed)
from test_gui import FRANCE  # noqa: E402

NEURONS = [(0, 1), (1, 2), (1, 5)]


def test_the_panels_request_carries_protocol_and_evaluation(qapp, parts):  # noqa: F811
    session = parts[0]
    panel = EditsPanel(session, QUndoStack())
    assert panel.current_request()["protocol"] == "kn" and panel.current_request()["eval"] == "forced"
    panel.protocol.setCurrentText("rome")
    panel.evaluation.setCurrentText("generate")
    assert {k: panel.current_request()[k] for k in ("protocol", "eval")} == {"protocol": "rome", "eval": "generate"}


@pytest.mark.parametrize("protocol", ["rome", "easyedit"])
def test_an_edit_scored_by_a_protocol_names_it_and_the_strip_shows_its_numbers(qapp, parts, protocol):  # noqa: F811
    session, runner, history, edits, batch, events = parts
    reports = []
    edits.event.connect(lambda ev: reports.append(ev.report) if isinstance(ev, E.EditEvaluated) else None)
    edits.apply({"kind": "Suppress", "scope": "answer", "protocol": protocol, "eval": "generate"}, FRANCE, NEURONS)
    assert runner.wait_idle(120000) and reports
    report = reports[-1]
    assert report["protocol"] == protocol and report["eval"] == "generate"
    scores = report["protocol_scores"]
    assert set(scores) >= {"pre", "post", "control"}
    key = {"rome": "ES", "easyedit": "rewrite_acc"}[protocol]
    assert key in scores["post"] and key in scores["control"]
    assert edits.edit_stack.entries[0].report["protocol"] == protocol  # saved with the edit
    panel = EditsPanel(session, QUndoStack())
    panel.show_report(report)
    shown = panel.metrics_strip.texts()
    post, control = flat_scores(scores["post"]), flat_scores(scores["control"])
    for name, value in post.items():  # every number of the protocol, as the engine scored it
        assert shown[f"protocol:{name}"][0] == format_score(name, value)
        assert shown[f"protocol:{name}"][2] == f"random: {format_score(name, control.get(name))}"
    assert f"scored by the {protocol} protocol; correct judged by greedy generation" in panel.result_summary.text()
    assert any(protocol in line for line in panel.table.context)  # the CSV's header names it too
    panel.show_report({**report, "protocol": "kn", "protocol_scores": None})  # kn: our cards only
    assert not any(k.startswith("protocol:") for k in panel.metrics_strip.texts())


def test_a_protocol_that_cannot_score_the_edit_is_refused_before_any_work(qapp, parts):  # noqa: F811
    session, runner, history, edits, batch, events = parts
    with pytest.raises(UserError, match="erase"):
        edits.apply({"kind": "Erase relation", "k": 2, "fill": "zero", "protocol": "rome"}, FRANCE, [])
    with pytest.raises(UserError, match="unknown protocol"):
        edits.apply({"kind": "Suppress", "scope": "answer", "protocol": "memit"}, FRANCE, NEURONS)
    assert not runner.busy and history.next_undo() is None


def test_a_batch_edit_is_scored_by_the_chosen_protocol(qapp, parts):  # noqa: F811
    session, runner, history, edits, batch, events = parts
    batch.apply({"kind": "Suppress", "scope": "answer", "to": "zero", "protocol": "easyedit", "eval": "forced"},
                [FRANCE, JAPAN])
    assert runner.wait_idle(120000)
    report = [e for e in events if isinstance(e, BatchApplied)][-1].report
    assert report["protocol"] == "easyedit" and report["eval"] == "forced"
    assert "rewrite_acc" in report["protocol_scores"]["post"] and "rewrite_acc" in report["protocol_scores"]["control"]
    assert report["metrics"]["control"]  # our metrics beside the random control, as before
