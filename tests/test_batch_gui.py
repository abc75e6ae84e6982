"""The GUI's multi-fact apply (kn_gui.controllers.batch): one history entry, facts left out listed, cancel."""

from __future__ import annotations

import pytest

pytest.importorskip("pytestqt")

import torch  # noqa: E402

from kn_core.attribution import AttributionParams  # noqa: E402
from kn_core.edits import Batch  # noqa: E402
from kn_core.facts import Fact  # noqa: E402
from kn_core.history import History  # noqa: E402
from kn_gui.controllers import UserError  # noqa: E402
from kn_gui.controllers import attribution as A  # noqa: E402
from kn_gui.controllers import edits as E  # noqa: E402
from kn_gui.controllers.batch import BatchApplied, BatchController, BatchNotApplied  # noqa: E402
from kn_gui.session import Session  # noqa: E402
from kn_gui.worker import JobRunner  # noqa: E402
from test_gui import FRANCE, geo_factset  # noqa: E402
from tiny import TINY_CAUSAL, make_tiny  # noqa: E402

JAPAN, SPAIN = Fact("P36", "Japan", "Tokyo"), Fact("P36", "Spain", "Madrid")


@pytest.fixture
def parts(qapp):
    session = Session(geo_factset())
    session.lm = make_tiny(TINY_CAUSAL)
    built = attributed(session, [FRANCE, JAPAN])
    yield built
    built[1].shutdown()


def attributed(session, facts):
    """(session, runner, history, edits, batch, batch events) with `facts` attributed (loose p: neurons to edit)."""
    session.p = 0.3
    runner = JobRunner()
    history = History()
    edits = E.EditsController(session, runner, history)
    edits.set_model(session.lm)
    attribution = A.AttributionController(session, runner, edits.active_descriptions)
    batch = BatchController(session, runner, history)
    events = []
    batch.event.connect(events.append)
    attribution.start(facts, AttributionParams(steps=2))
    assert runner.wait_idle(60000)
    return session, runner, history, edits, batch, events


def weights(lm):
    return {k: v.detach().clone() for k, v in lm.model.state_dict().items()}


def same(lm, saved) -> bool:
    return all(torch.equal(v, lm.model.state_dict()[k]) for k, v in saved.items())


def test_selected_facts_become_one_history_entry_and_undo_bitwise(parts):
    session, runner, history, edits, batch, events = parts
    assert session.refined(session.runs[("P36", "France", "Paris")])  # the facts have neurons to edit
    original = weights(session.lm)
    batch.apply({"kind": "Update", "new_object": "Rome", "lambda1": 1.0, "lambda2": 8.0, "strength": "paper"},
                [FRANCE, JAPAN, SPAIN])
    assert runner.wait_idle(60000)
    applied = [e for e in events if isinstance(e, BatchApplied)]
    assert len(applied) == 1 and len(edits.edit_stack) == 1
    entry = edits.edit_stack.entries[0]
    assert isinstance(entry.edit, Batch) and len(entry.edit.edits) == 2
    report = applied[0].report
    assert len([r for r in report["rows"] if r["group"] == "fact"]) == 2  # then the control facts' rows
    assert report["skipped"] == [["Spain \u2192 Madrid", "not attributed yet (run attribution on the selection)"]]
    assert entry.report["batch"]["requests"][0]["metrics"]["reliability"]["n"] >= 1  # saved with the history
    # the strip shows the engine's batch metrics beside the random control (never recomputed in the app)
    assert report["metrics"] is report["batch"]["summary"]["metrics"] and "control" in report["metrics"]
    assert batch.unattributed([FRANCE, JAPAN, SPAIN]) == [SPAIN]
    assert not same(session.lm, original)
    history.undo()
    assert same(session.lm, original)
    history.redo()
    assert not same(session.lm, original)


def test_cancel_leaves_model_and_history_unchanged(parts):
    session, runner, history, edits, batch, events = parts
    original = weights(session.lm)
    batch.apply({"kind": "Update", "new_object": "Rome", "strength": "paper"}, [FRANCE, JAPAN])
    runner.cancel()
    assert runner.wait_idle(60000)
    assert [type(e) for e in events] == [BatchNotApplied] and events[0].cancelled
    assert len(edits.edit_stack) == 0 and same(session.lm, original)
    assert sum(len(m._forward_pre_hooks) for m in session.lm.model.modules()) == 0


@pytest.mark.parametrize("request_, facts, needle", [
    ({"kind": "Erase relation"}, [FRANCE], "Erase acts on a whole relation"),
    ({"kind": "Suppress"}, [], "Select facts"),
    ({"kind": "Update", "new_object": " "}, [FRANCE], "new object"),
    ({"kind": "Suppress"}, [SPAIN], "Run attribution on the selected facts first"),
])
def test_refusals_before_any_work(parts, request_, facts, needle):
    session, runner, history, edits, batch, events = parts
    with pytest.raises(UserError) as exc:
        batch.apply(request_, facts)
    assert needle in str(exc.value) and "\n" not in str(exc.value)
    assert not runner.busy and len(edits.edit_stack) == 0


def test_batch_control_facts_are_table_rows_with_the_numbers_of_kn_edit_batch(qapp, tmp_path, capsys):
    """The facts a batch must not move are rows of the before/after table, one per prompt, as a single edit shows
    them, with the very numbers `kn edit batch --json` reports for the same batch (same model, facts, neurons)."""
    import json

    from kn_core.cli import main
    from kn_core.fact_files import builtin_facts
    from kn_core.models import load_model
    from PySide6.QtGui import QUndoStack

    from kn_gui.panels.edits_panel import EditsPanel

    folder = tmp_path / "model"
    built = make_tiny(TINY_CAUSAL)
    built.model.save_pretrained(folder)
    built.tokenizer.save_pretrained(folder)
    session = Session(builtin_facts())
    session.lm = load_model(str(folder))
    facts = [FRANCE, JAPAN]
    _, runner, history, _, batch, events = attributed(session, facts)
    try:
        batch.apply({"kind": "Suppress", "scope": "answer", "to": "zero"}, facts)
        assert runner.wait_idle(60000)
    finally:
        runner.shutdown()
    (applied,) = [e for e in events if isinstance(e, BatchApplied)]
    report = applied.report
    requests = tmp_path / "requests.jsonl"
    requests.write_text("".join(json.dumps({"relation": f.relation, "subject": f.subject, "kind": "suppress",
                                            "neurons": r["edit"]["neurons"]}) + "\n"
                                for f, r in zip(facts, report["batch"]["requests"])))
    assert main(["edit", "batch", str(requests), "--model", str(folder), "--json"]) == 0
    cli = json.loads(capsys.readouterr().out)
    engine = {}
    for r in cli["requests"]:
        for c in r["control_rows"]:
            engine[(c["fact"]["subject"], c["prompt"])] = c
    controls = [row for row in report["rows"] if row["group"] != "fact"]
    assert {row["group"] for row in controls} == {"same relation", "other relations"}
    assert len(controls) == len({(row["group"], row["fact"], row["prompt"]) for row in controls})  # no repeats
    assert {(row["fact"].split(" \u2192 ")[0], row["prompt"]) for row in controls} == set(engine)
    for row in controls:
        c = engine[(row["fact"].split(" \u2192 ")[0], row["prompt"])]
        assert row["before"] == pytest.approx(c["before"]["prob"], rel=1e-5, abs=1e-12)
        assert row["after"] == pytest.approx(c["after"]["prob"], rel=1e-5, abs=1e-12)
        assert (row["top_before_id"], row["top_after_id"]) == (c["before"]["top1_id"], c["after"]["top1_id"])
    # the locality metric is the mean of these rows' |change|: the table and the strip agree
    for request in report["batch"]["requests"]:
        rows = request["control_rows"]
        local = [c for c in rows if c["group"] in ("relation", "other relations")]
        assert request["metrics"]["locality"]["mean_abs_dp"] == pytest.approx(
            sum(abs(c["after"]["prob"] - c["before"]["prob"]) for c in local) / len(local))
    # the panel shows them with the single edit's row code: one table row per row of the report
    panel = EditsPanel(session, QUndoStack())
    panel.show_report(report)
    model = panel.table.model()
    shown = [model.index(i, 0).data() for i in range(model.rowCount())]
    assert shown == [row["group"] for row in report["rows"]] and "same relation" in shown
    assert "same relation: mean \u0394p" in panel.result_summary.text()
