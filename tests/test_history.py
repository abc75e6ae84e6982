"""kn_core.history: one undo history for model edits, fact-set changes and run-map changes, checked against a
simple reference (each lane a list of states with a cursor, plus the order in which lanes were done and undone),
with the model's weights and outputs compared bitwise to the reference's active edits applied afresh."""

from __future__ import annotations

import gc
import json
import weakref

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kn_core import edits as E
from kn_core.edit_stack import EditStack
from kn_core.history import MODEL, SESSION, History, Replace
from test_edits import assert_bitwise, edit_strategy, snapshot
from tiny import TINY_CAUSAL, make_tiny

_MODELS: dict = {}


def tiny(name: str):
    """Two identical tiny models: the history's and the reference's."""
    if name not in _MODELS:
        _MODELS[name] = make_tiny(TINY_CAUSAL)
    return _MODELS[name]


class Session:
    """What the app's session commands change: the fact set and the run maps (plain values here)."""

    def __init__(self):
        self.factset, self.runs = "facts-0", "runs-0"


def session_change(session: Session, attribute: str, value) -> Replace:
    return Replace(f"{attribute} -> {value}", lambda v: setattr(session, attribute, v), getattr(session, attribute),
                   value)


class Reference:
    """The semantics written as plainly as possible: per lane, a list of items with a cursor (classic linear
    undo); `done`/`undone` hold lane names in the order the lanes were done and undone (one undo order)."""

    def __init__(self):
        self.items = {MODEL: [], SESSION: []}
        self.cursor = {MODEL: 0, SESSION: 0}
        self.done: list[str] = []
        self.undone: list[str] = []

    def push(self, lane, item):
        del self.items[lane][self.cursor[lane]:]
        self.items[lane].append(item)
        self.cursor[lane] += 1
        self.undone = [x for x in self.undone if x != lane]  # a change drops its own lane's redo list only
        self.done.append(lane)

    def _move(self, source, target, lane, step):
        at = max((i for i, x in enumerate(source) if lane in (None, x)), default=None)
        if at is None:
            return False
        chosen = source.pop(at)
        self.cursor[chosen] += step
        target.append(chosen)
        return True

    def undo(self, lane=None):
        return self._move(self.done, self.undone, lane, -1)

    def redo(self, lane=None):
        return self._move(self.undone, self.done, lane, +1)

    def clear(self, lane):
        self.items[lane], self.cursor[lane] = [], 0
        self.done = [x for x in self.done if x != lane]
        self.undone = [x for x in self.undone if x != lane]

    def value(self, attribute, initial):
        values = [v for a, v in self.items[SESSION][:self.cursor[SESSION]] if a == attribute]
        return values[-1] if values else initial

    def active_edits(self):
        return [item["edit"] for item in self.items[MODEL][:self.cursor[MODEL]] if item["enabled"]]

    def state(self):
        return ([(id(i), i["enabled"]) for i in self.items[MODEL][:self.cursor[MODEL]]],
                list(self.items[SESSION][:self.cursor[SESSION]]))


PROMPT = "The capital of France is"

op = st.one_of(
    st.tuples(st.just("edit"), edit_strategy()),
    st.tuples(st.just("facts"), st.integers(1, 4)),
    st.tuples(st.just("runs"), st.integers(1, 4)),
    st.tuples(st.sampled_from(["undo", "redo", "undo model", "redo model", "undo session", "redo session"]),
              st.none()),
    st.tuples(st.just("toggle"), st.integers(0, 20)),
    st.tuples(st.sampled_from(["save", "queue save", "save done", "drop model edits"]), st.none()),
)


def logits(lm):
    with torch.no_grad():
        return lm.model(**lm.tokenizer(PROMPT, return_tensors="pt")).logits


def check_model(lm, reference_lm, stack, ref):
    """The model equals the reference model with the reference's active edits applied afresh, bit for bit
    (weights, and outputs through activation hooks)."""
    assert stack.active_edits() == ref.active_edits()
    handles = [e.apply(reference_lm) for e in ref.active_edits()]
    try:
        assert_bitwise(lm, snapshot(reference_lm))
        assert torch.equal(logits(lm), logits(reference_lm))
    finally:
        for handle in reversed(handles):
            handle.revert()


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(op, max_size=16))
def test_random_sequences_match_the_reference(ops):
    lm, reference_lm = tiny("history"), tiny("reference")
    original = snapshot(lm)
    history, session, ref = History(), Session(), Reference()
    stack = EditStack(lm, history)
    saved_state, queued = ref.state(), None
    heard = []
    history.listen(heard.append)
    try:
        for name, arg in ops:
            heard.clear()
            if name == "edit":
                stack.push(arg)
                ref.push(MODEL, {"edit": arg, "enabled": True})
            elif name in ("facts", "runs"):
                attribute = "factset" if name == "facts" else "runs"
                history.push(session_change(session, attribute, f"{name}-{arg}"))
                ref.push(SESSION, (attribute, f"{name}-{arg}"))
            elif name.startswith(("undo", "redo")):
                verb, _, lane = name.partition(" ")
                lane = {"model": MODEL, "session": SESSION}.get(lane)
                possible = getattr(ref, verb)(lane)
                assert getattr(history, f"can_{verb}")(lane) == possible
                if possible:
                    getattr(history, verb)(lane)
                else:
                    with pytest.raises(IndexError):
                        getattr(history, verb)(lane)
            elif name == "toggle" and ref.items[MODEL]:
                i = arg % len(ref.items[MODEL])
                item = ref.items[MODEL][i]
                item["enabled"] = not item["enabled"]
                stack.set_enabled(i, item["enabled"])
            elif name == "save":
                history.set_clean()
                saved_state = ref.state()
            elif name == "queue save":  # the app queues a save and marks the state it wrote when it is done
                queued = (history.position(), ref.state())
            elif name == "save done" and queued is not None:
                history.set_clean(queued[0])
                saved_state = queued[1]
            elif name == "drop model edits":  # another model loaded: its edits leave the history
                history.clear(MODEL)
                ref.clear(MODEL)
            # the state, after every step
            check_model(lm, reference_lm, stack, ref)
            assert (session.factset, session.runs) == (ref.value("factset", "facts-0"), ref.value("runs", "runs-0"))
            assert stack.cursor == ref.cursor[MODEL] and history.index(SESSION) == ref.cursor[SESSION]
            assert [e.edit for e in stack.entries] == [item["edit"] for item in ref.items[MODEL]]
            assert history.is_clean() == (ref.state() == saved_state)
            assert all(isinstance(lanes, frozenset) for lanes in heard) and len(heard) <= 1
            assert stack.to_dict() == {"version": 1, "cursor": ref.cursor[MODEL], "entries": [
                {"edit": item["edit"].to_dict(), "enabled": item["enabled"]} for item in ref.items[MODEL]]}
        # the saved form reopens identically on a fresh history
        saved = stack.to_dict()
        state = snapshot(lm)
        stack.clear()
        assert_bitwise(lm, original)
        reopened = EditStack.from_dict(lm, saved)
        assert reopened.to_dict() == saved
        assert_bitwise(lm, state)
        reopened.clear()
    finally:
        history.clear()
    assert_bitwise(lm, original)
    assert not any(p._forward_pre_hooks for p in lm.layout.out_projs) and not lm.model._forward_pre_hooks


def two_edits():
    """Two edits on the same neuron (amplify, then erase its value vector): their order matters."""
    return E.Amplify(((0, 1),), 3.0, "all"), E.Erase(((0, 1), (1, 2)), "zero")


def shared_history():
    """(model, its original weights, a History, a session, the model's EditStack in that History)."""
    lm = tiny("history")
    history = History()
    return lm, snapshot(lm), history, Session(), EditStack(lm, history)


def test_a_fact_change_keeps_the_model_edits_redo_list():
    """Two edits, back to the original model, a fact change: both edits are still redoable, and the undo order
    is one: the redone edits first, then the fact change."""
    lm, original, history, session, stack = shared_history()
    a, b = two_edits()
    stack.push(a)
    stack.push(b)
    history.undo(MODEL)
    history.undo(MODEL)
    assert_bitwise(lm, original)
    history.push(session_change(session, "factset", "facts-1"))
    assert history.can_redo() and len(stack) == 2 and history.next_redo().edit == a
    history.redo()
    history.redo()
    assert stack.active_edits() == [a, b] and session.factset == "facts-1"
    assert history.undo().edit == b and history.undo().edit == a and history.undo().text == "factset -> facts-1"
    assert_bitwise(lm, original)
    assert session.factset == "facts-0"
    # a new edit drops the model's redo list, never the session's
    history.redo()  # the fact change again
    history.undo()
    stack.push(a)
    assert len(stack) == 1 and history.next_redo().text == "factset -> facts-1"
    history.clear()
    assert_bitwise(lm, original)


def test_the_history_view_walks_model_edits_past_newer_fact_changes():
    lm, original, history, session, stack = shared_history()
    a, b = two_edits()
    stack.push(a)
    history.push(session_change(session, "factset", "facts-1"))
    stack.push(b)
    history.undo(MODEL)
    history.undo(MODEL)  # under the newer fact change: lanes commute
    assert_bitwise(lm, original)
    assert session.factset == "facts-1"
    assert history.next_undo().text == "factset -> facts-1" and history.next_redo().edit == a
    history.clear()


def test_switching_off_an_edit_below_others_restores_bitwise_and_marks_unsaved():
    lm = tiny("history")
    original = snapshot(lm)
    history = History()
    stack = EditStack(lm, history)
    a, b = two_edits()
    stack.push(a)
    stack.push(b)
    history.set_clean()
    stack.set_enabled(0, False)
    assert stack.active_edits() == [b] and not history.is_clean()
    only_b = b.apply(tiny("reference"))
    assert_bitwise(lm, snapshot(tiny("reference")))
    only_b.revert()
    stack.set_enabled(0, True)
    assert history.is_clean()
    with pytest.raises(ValueError, match="cannot be switched off"):
        history.set_enabled(session_change(Session(), "factset", "x"), False)
    history.clear()
    assert_bitwise(lm, original)


def test_clean_marks_the_state_a_queued_save_wrote():
    history, session = History(), Session()
    history.push(session_change(session, "factset", "facts-1"))
    queued = history.position()
    history.push(session_change(session, "factset", "facts-2"))  # a change while the save runs
    history.set_clean(queued)
    assert not history.is_clean()
    history.undo()
    assert history.is_clean()
    history.clear()  # forgetting saved changes is an unsaved change
    assert not history.is_clean()


def test_listeners_hear_the_lanes_that_changed():
    lm = tiny("history")
    history, heard = History(), []
    history.listen(heard.append)
    stack = EditStack(lm, history)
    stack.push(E.Suppress(((0, 1),)))
    history.push(session_change(Session(), "runs", "runs-1"))
    history.undo()
    history.set_clean()
    history.clear()
    assert heard == [{MODEL}, {SESSION}, {SESSION}, frozenset(), {MODEL, SESSION}]


def test_a_failed_push_changes_nothing():
    lm = tiny("history")
    original = snapshot(lm)
    history = History()
    stack = EditStack(lm, history)
    stack.push(E.Suppress(((0, 1),)))
    stack.undo()
    with pytest.raises(ValueError):
        stack.push(E.Suppress(((0, 999),)))
    assert len(stack) == 1 and stack.can_redo() and history.done == []
    assert_bitwise(lm, original)


# written by the EditStack of main (fd408b8) for this exact sequence: projects saved today reopen identically
SAVED_BEFORE = ('{"version": 1, "cursor": 3, "entries": [{"edit": {"kind": "suppress", "neurons": [[0, 1], [1, 2]], '
                '"scope": "answer"}, "enabled": true, "report": {"title": "a", "rows": [{"before": 0.5, "after": 0.25}'
                ']}}, {"edit": {"kind": "amplify", "neurons": [[2, 3]], "scope": "answer", "factor": 3.0}, "enabled": '
                'false}, {"edit": {"kind": "erase", "neurons": [[1, 5]], "fill": "zero", "embedding": "input"}, '
                '"enabled": true}, {"edit": {"kind": "batch", "neurons": [[0, 4], [1, 4]], "label": "two", "edits": '
                '[{"kind": "suppress", "neurons": [[0, 4]], "scope": "answer"}, {"kind": "amplify", "neurons": [[1, '
                '4]], "scope": "answer", "factor": 2.0}]}, "enabled": true, "report": {"batch": {"n": 2}}}]}')


def test_the_saved_format_is_byte_compatible():
    lm = tiny("history")
    original = snapshot(lm)
    stack = EditStack(lm)
    stack.push(E.Suppress(((0, 1), (1, 2)), scope="answer"), report={"title": "a", "rows": [{"before": 0.5,
                                                                                            "after": 0.25}]})
    stack.push(E.Amplify(((2, 3),), 3.0))
    stack.push(E.Erase(((1, 5),), "zero"))
    stack.push(E.Batch((E.Suppress(((0, 4),)), E.Amplify(((1, 4),), 2.0)), label="two"), report={"batch": {"n": 2}})
    stack.set_enabled(1, False)
    stack.undo()
    assert json.dumps(stack.to_dict()) == SAVED_BEFORE
    edited = snapshot(lm)
    stack.clear()
    reopened = EditStack.from_dict(lm, json.loads(SAVED_BEFORE))
    assert json.dumps(reopened.to_dict()) == SAVED_BEFORE and reopened.cursor == 3
    assert_bitwise(lm, edited)
    reopened.clear()
    assert_bitwise(lm, original)


def test_restoring_into_a_shared_history_is_all_or_nothing_and_keeps_other_lanes():
    lm = tiny("history")
    history, session = History(), Session()
    stack = EditStack(lm, history)
    history.push(session_change(session, "factset", "facts-1"))
    stack.push(E.Suppress(((0, 1),)))
    before = stack.to_dict()
    bad = {"version": 1, "cursor": 2, "entries": [{"edit": E.Suppress(((0, 2),)).to_dict()},
                                                  {"edit": E.Erase(((1, 3),), "unk").to_dict()}]}
    lm_unk, lm.tokenizer.unk_token = lm.tokenizer.unk_token, None
    try:
        with pytest.raises(ValueError, match=r"edit #1 cannot be applied"):
            stack.load_dict(bad)
    finally:
        lm.tokenizer.unk_token = lm_unk
    assert stack.to_dict() == before and session.factset == "facts-1" and history.index(SESSION) == 1
    stack.load_dict(json.loads(SAVED_BEFORE))
    assert stack.cursor == 3 and history.next_redo().edit.kind == "batch" and history.index(SESSION) == 1
    history.clear()


def test_the_clean_mark_keeps_no_command_alive():
    """A dropped model edit must free its model: the saved position holds numbers, not commands."""
    history, session = History(), Session()
    alive = weakref.ref(session)
    history.push(session_change(session, "factset", "facts-1"))
    history.set_clean()
    history.clear()
    del session
    gc.collect()
    assert alive() is None and not history.is_clean()
