"""Edits: exact revert under any apply/undo/redo/toggle sequence, and each edit's effect checked against an
independent computation."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kn_core import edits as E
from kn_core.edit_plan import erase_neurons, make_update, random_neurons
from kn_core.edit_stack import EditStack, export_model
from tiny import TINY_CAUSAL, TINY_MASKED, make_tiny

_MODELS: dict = {}


def tiny(family):
    if family not in _MODELS:
        _MODELS[family] = make_tiny(family)
    return _MODELS[family]


def snapshot(lm):
    return {k: v.detach().clone() for k, v in lm.model.state_dict().items()}


def assert_bitwise(lm, snap):
    """Every tensor byte for byte (torch.equal alone would accept -0.0 for 0.0)."""
    for name, tensor in lm.model.state_dict().items():
        assert tensor.dtype == snap[name].dtype and tensor.shape == snap[name].shape, name
        assert tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes() == \
            snap[name].cpu().reshape(-1).view(torch.uint8).numpy().tobytes(), name  # reshape: 0-d ones too


def value_matrix(lm, layer):
    """(neurons, hidden) view of a layer's value vectors, computed without the library."""
    w = lm.layout.out_projs[layer].weight
    return w.detach().clone() if type(lm.layout.out_projs[layer]).__name__ == "Conv1D" else w.detach().T.clone()


def ids_for(lm, word):
    text = word if lm.kind == "masked" else " " + word
    return tuple(lm.tokenizer(text, add_special_tokens=False)["input_ids"])


# ------------------------------------------------------------------ strategies

neuron = st.tuples(st.integers(0, 2), st.integers(0, 71))
neurons = st.lists(neuron, min_size=1, max_size=6, unique=True).map(tuple)


def edit_strategy():
    single = _single_edits()
    # a batch of edits (kn edit batch, the GUI's multi-fact apply) is one history entry with the same guarantees
    return st.one_of(single, st.lists(single, min_size=2, max_size=4).map(lambda parts: E.Batch(tuple(parts))))


def _single_edits():
    return st.one_of(
        st.builds(E.Suppress, neurons, st.sampled_from(["answer", "all"])),
        st.builds(E.Amplify, neurons, st.sampled_from([2.0, -1.5, 0.5]), st.sampled_from(["answer", "all"])),
        st.builds(lambda n, l1, l2, emb, mt, flip: E.Update(n, (6,), (7, 8), l1, l2, emb, mt,
                                                            flipped=n[:1] if flip else ()),
                  neurons, st.sampled_from([1.0, 0.3]), st.sampled_from([8.0, 2.5]),
                  st.sampled_from(["input", "output"]), st.sampled_from(["first", "mean"]), st.booleans()),
        st.builds(E.Erase, neurons, st.sampled_from(["zero", "unk"])),
        st.builds(lambda n, scope: E.Suppress(n, scope, "mean", tuple(0.25 * k - 0.5 for k in range(len(n)))),
                  neurons, st.sampled_from(["answer", "all"])),
    )


op = st.one_of(
    st.tuples(st.just("push"), edit_strategy()),
    st.tuples(st.just("push+report"), edit_strategy()),
    st.tuples(st.just("undo"), st.none()),
    st.tuples(st.just("redo"), st.none()),
    st.tuples(st.just("toggle"), st.integers(0, 20)),
)


# qwen2_moe: neurons 0..71 of its MoE layers are in routed experts 0-2, of its layer 0 in a dense layer
@pytest.mark.parametrize("family", [TINY_MASKED, TINY_CAUSAL, "qwen2_moe"])
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(op, max_size=12))
def test_stack_sequences_restore_bitwise(family, ops):
    lm = tiny(family)
    original = snapshot(lm)
    stack = EditStack(lm)
    try:
        for name, arg in ops:
            if name == "push":
                stack.push(arg)
            elif name == "push+report":
                stack.push(arg, report={"title": arg.describe(), "rows": [{"before": 0.5, "after": 0.25}]})
            elif name == "undo" and stack.can_undo():
                stack.undo()
            elif name == "redo" and stack.can_redo():
                stack.redo()
            elif name == "toggle" and len(stack):
                i = arg % len(stack)
                stack.set_enabled(i, not stack.entries[i].enabled)
        # the model equals the original with the active edits applied afresh, in stack order
        active = stack.active_edits()
        state = snapshot(lm)
        stack.revert_all()
        assert_bitwise(lm, original)
        handles = [e.apply(lm) for e in active]
        assert_bitwise(lm, state)
        for h in reversed(handles):
            h.revert()
        assert_bitwise(lm, original)
        # the state survives a round trip through plain data
        saved = stack.to_dict()
        restored = EditStack.from_dict(lm, saved)
        assert restored.to_dict() == saved
        assert [e.report for e in restored.entries] == [e.report for e in stack.entries]
        restored.clear()
        assert_bitwise(lm, original)
    finally:
        stack.clear()
    assert_bitwise(lm, original)
    # no hooks left behind
    for proj in lm.layout.out_projs:
        assert not proj._forward_pre_hooks
    assert not lm.model._forward_pre_hooks


def test_undo_redo_semantics():
    lm = tiny(TINY_CAUSAL)
    stack = EditStack(lm)
    a, b, c = E.Suppress(((0, 1),)), E.Erase(((1, 2),)), E.Amplify(((2, 3),), 3.0)
    stack.push(a)
    stack.push(b)
    assert stack.active_edits() == [a, b]
    assert stack.undo() == b and stack.active_edits() == [a]
    stack.push(c)  # drops the redo branch (b)
    assert [e.edit for e in stack.entries] == [a, c] and not stack.can_redo()
    stack.set_enabled(0, False)
    assert stack.active_edits() == [c]
    assert "Amplify x3" in stack.history()[1]["description"]
    stack.clear()


def test_edit_dict_roundtrip():
    for edit in (E.Suppress(((0, 1), (2, 5)), "all"), E.Amplify(((1, 1),), 2.0),
                 E.Update(((0, 1),), (3,), (4, 5), 1.0, 8.0, "output", "first", ((2, 2),)),
                 E.Update(((0, 1), (1, 2)), (3,), (4, 5), 1.0, 8.0, "input", "mean", (), ((1, 2),)),
                 E.Erase(((1, 7),), "unk", "input")):
        assert E.edit_from_dict(edit.to_dict()) == edit
        assert edit.describe()
    with pytest.raises(ValueError):
        E.edit_from_dict({"kind": "melt", "neurons": []})
    with pytest.raises(ValueError, match="flipped"):
        E.Update(((0, 1),), (3,), (4,), flipped=((1, 1),))
    mean = E.Suppress(((0, 1), (2, 5), (0, 1)), "all", "mean", (0.5, -2.0, 0.5))
    assert mean.neurons == ((0, 1), (2, 5)) and mean.means == (0.5, -2.0)
    assert E.edit_from_dict(mean.to_dict()) == mean
    assert "to" not in E.Suppress(((0, 1),)).to_dict()  # the paper's suppress keeps its saved form


def one_line_error(fn, match):
    with pytest.raises(ValueError, match=match) as exc:
        fn()
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), "nan", "x", None])
def test_non_finite_numbers_never_reach_the_weights(bad):
    one_line_error(lambda: E.Update(((0, 1),), (3,), (4,), lambda1=bad), "lambda1")
    one_line_error(lambda: E.Update(((0, 1),), (3,), (4,), lambda2=bad), "lambda2")
    one_line_error(lambda: E.Amplify(((0, 1),), factor=bad), "amplify factor")
    one_line_error(lambda: E.Suppress(((0, 1),), "answer", "mean", (bad,)), "mean activation")
    one_line_error(lambda: E.edit_from_dict({"kind": "update", "neurons": [[0, 1]], "old_ids": [3], "new_ids": [4],
                                             "lambda2": bad}), "lambda2")
    from kn_core.edit_stack import _Scale

    one_line_error(lambda: _Scale(((0, 1),), bad), "scale factor")


def test_edit_from_dict_refuses_unknown_or_malformed_fields():
    one_line_error(lambda: E.edit_from_dict({"kind": "suppress", "neurons": [[0, 1]], "scope": "all", "extra": 1}),
                   "unknown field.*'extra'")
    one_line_error(lambda: E.edit_from_dict({"kind": "update", "neurons": [[0, 1]]}), "malformed update edit")
    one_line_error(lambda: E.edit_from_dict({"kind": "erase"}), "no 'neurons'")
    one_line_error(lambda: E.edit_from_dict({"kind": "erase", "neurons": [[0]]}), "malformed erase edit")
    one_line_error(lambda: E.edit_from_dict({"kind": "suppress", "neurons": [[0, 1]], "to": "half"}), "zero.*mean")
    one_line_error(lambda: E.edit_from_dict(["suppress"]), "JSON object")


def test_update_with_a_token_outside_the_vocabulary_is_refused():
    lm = tiny(TINY_CAUSAL)
    original = snapshot(lm)
    one_line_error(lambda: E.Update(((0, 1),), (3,), (10 ** 6,)).apply(lm), "outside this model's vocabulary")
    assert_bitwise(lm, original)


@pytest.mark.parametrize("family", [TINY_MASKED, TINY_CAUSAL])
def test_load_dict_is_all_or_nothing(family):
    lm = tiny(family)
    original = snapshot(lm)
    stack = EditStack(lm)
    stack.push(E.Update(((1, 2),), (6,), (7,)), report={"title": "before"})
    weights_before = snapshot(lm)
    good = [{"edit": E.Erase(((0, 3),)).to_dict(), "enabled": True},
            {"edit": E.Update(((2, 3),), (6,), (8,)).to_dict(), "enabled": True}]
    bad_entries = [
        ({"edit": E.Update(((2, 4),), (6,), (10 ** 6,)).to_dict(), "enabled": True}, "#2 cannot be applied"),
        ({"edit": E.Suppress(((3, 0),)).to_dict(), "enabled": True}, "#2: neuron \\(3, 0\\) is outside"),
        ({"edit": {"kind": "suppress", "neurons": [[0, 1]], "oops": 1}, "enabled": True}, "#2: .*unknown field"),
        ({"edit": E.Suppress(((0, 1),)).to_dict(), "enabled": "yes"}, "#2: 'enabled'"),
        ({"enabled": True}, "#2 has no 'edit'"),
    ]
    for bad, match in bad_entries:
        state_before = stack.to_dict()
        state = {"version": 1, "cursor": 3, "entries": good + [bad]}
        one_line_error(lambda: stack.load_dict(state), match)
        # nothing of the new history stays applied; the old one is intact and the stack still works
        assert stack.to_dict() == state_before
        assert_bitwise(lm, weights_before)
        stack.push(E.Suppress(((0, 5),)))
        stack.undo()
    one_line_error(lambda: stack.load_dict({"version": 1, "cursor": 7, "entries": good}), "cursor 7")
    one_line_error(lambda: stack.load_dict({"version": 2, "entries": []}), "version")
    stack.load_dict({"version": 1, "cursor": 2, "entries": good})
    assert len(stack.active_edits()) == 2
    stack.clear()
    assert_bitwise(lm, original)


def test_reports_travel_with_their_entries():
    lm = tiny(TINY_CAUSAL)
    stack = EditStack(lm)
    stack.push(E.Suppress(((0, 1),)), report={"title": "a"})
    stack.push(E.Amplify(((0, 2),), 3.0))
    stack.set_report(1, {"title": "b", "rows": []})
    saved = stack.to_dict()
    assert [e.get("report") for e in saved["entries"]] == [{"title": "a"}, {"title": "b", "rows": []}]
    stack.undo()
    assert stack.history()[1]["report"] == {"title": "b", "rows": []} and not stack.history()[1]["done"]
    restored = EditStack.from_dict(lm, saved)
    assert [h["report"]["title"] for h in restored.history()] == ["a", "b"]
    with pytest.raises(IndexError):
        stack.set_report(5, {})
    restored.clear()
    stack.clear()


@pytest.mark.parametrize("family", [TINY_MASKED, TINY_CAUSAL])
@pytest.mark.parametrize("scope", ["answer", "all"])
def test_mean_ablation_sets_the_activation_to_the_given_means(family, scope):
    lm = tiny(family)
    text = "The capital of France is [MASK] ." if lm.kind == "masked" else "The capital of France is"
    ids = _inputs(lm, text)
    if lm.kind == "masked":
        positions = [int((ids[0] == lm.tokenizer.mask_token_id).nonzero()[0, 0])]
    else:
        positions = [ids.shape[1] - 1]
    if scope == "all":
        positions = list(range(ids.shape[1]))
    chosen, means = ((0, 2), (2, 33), (2, 5)), (0.7, -1.3, 2.0)

    def reference_hook(layer_idx):
        def hook(module, args):
            x = args[0].clone()
            for (layer, i), m in zip(chosen, means):
                if layer == layer_idx:
                    x[0, positions, i] = m
            return (x,)
        return hook

    with torch.no_grad():
        h = E.Suppress(chosen, scope, "mean", means).apply(lm)
        got = lm.model(input_ids=ids).logits
        h.revert()
        hooks = [lm.layout.out_projs[l].register_forward_pre_hook(reference_hook(l)) for l in range(3)]
        expect = lm.model(input_ids=ids).logits
        for hk in hooks:
            hk.remove()
        clean = lm.model(input_ids=ids).logits
    torch.testing.assert_close(got, expect)
    assert not torch.allclose(got, clean)


# ------------------------------------------------------------------ effects, computed independently

@pytest.mark.parametrize("family", [TINY_MASKED, TINY_CAUSAL])
@pytest.mark.parametrize("embedding,multi", [("input", "mean"), ("output", "first")])
def test_update_changes_exactly_the_chosen_vectors(family, embedding, multi):
    lm = tiny(family)
    chosen = ((0, 3), (2, 10), (2, 40))
    old_ids, new_ids = ids_for(lm, "Paris"), ids_for(lm, "Berlin") + ids_for(lm, "Rome")
    before = {l: value_matrix(lm, l) for l in range(3)}
    emb = (lm.model.get_input_embeddings().weight if embedding == "input"
           else lm.model.get_output_embeddings().weight).detach()

    def e(ids):
        ids = list(ids)[:1] if multi == "first" else list(ids)
        return emb[ids].mean(0)

    e_o, e_n = e(old_ids), e(new_ids)
    handle = E.Update(chosen, old_ids, new_ids, 1.0, 8.0, embedding, multi).apply(lm)
    for l in range(3):
        after = value_matrix(lm, l)
        for i in range(72):
            if (l, i) in chosen:
                v = before[l][i]
                expect = v - v.norm() / e_o.norm() * e_o + v.norm() / e_n.norm() * 8.0 * e_n
                torch.testing.assert_close(after[i], expect, rtol=1e-5, atol=1e-6)
            else:
                assert torch.equal(after[i], before[l][i])
    handle.revert()
    for l in range(3):
        assert torch.equal(value_matrix(lm, l), before[l])


@pytest.mark.parametrize("family", [TINY_MASKED, TINY_CAUSAL])
def test_sign_aware_update_reverses_the_edit_of_negatively_active_neurons(family):
    lm = tiny(family)
    chosen = ((0, 3), (2, 10), (2, 40))
    acts = [np.zeros((3, 72)), np.zeros((3, 72))]
    acts[0][2, 10], acts[1][2, 10] = -0.5, 0.2  # mean -0.15: negatively active
    acts[0][0, 3], acts[1][0, 3] = 0.4, -0.1  # mean +0.15
    update = make_update(lm, chosen, ids_for(lm, "Paris"), ids_for(lm, "Berlin"), activations=acts)
    assert update.flipped == ((2, 10),)
    assert make_update(lm, chosen, ids_for(lm, "Paris"), ids_for(lm, "Berlin")).flipped == ()
    before = {l: value_matrix(lm, l) for l in range(3)}
    emb = lm.model.get_input_embeddings().weight.detach() if update.embedding == "input" else \
        lm.model.get_output_embeddings().weight.detach()
    e_o, e_n = emb[list(update.old_ids)].mean(0), emb[list(update.new_ids)].mean(0)
    paper = E.Update(update.neurons, update.old_ids, update.new_ids, embedding=update.embedding,
                     multi_token=update.multi_token)
    paper_handle = paper.apply(lm)
    paper_after = {l: value_matrix(lm, l) for l in range(3)}
    paper_handle.revert()
    handle = update.apply(lm)
    for layer, i in chosen:
        v = before[layer][i]
        delta = -v.norm() / e_o.norm() * e_o + v.norm() / e_n.norm() * 8.0 * e_n
        sign = -1.0 if (layer, i) == (2, 10) else 1.0
        torch.testing.assert_close(value_matrix(lm, layer)[i], v + sign * delta, rtol=1e-5, atol=1e-6)
        if sign > 0:  # unflipped neurons: bitwise the paper's edit
            assert torch.equal(value_matrix(lm, layer)[i], paper_after[layer][i])
    handle.revert()
    for l in range(3):
        assert torch.equal(value_matrix(lm, l), before[l])


@pytest.mark.parametrize("family", [TINY_MASKED, TINY_CAUSAL])
def test_erase_fills(family):
    lm = tiny(family)
    unk = lm.tokenizer.unk_token_id
    h = E.Erase(((1, 5), (1, 6)), "unk").apply(lm)
    m = value_matrix(lm, 1)
    emb = lm.model.get_input_embeddings().weight
    assert torch.equal(m[5], emb[unk]) and torch.equal(m[6], emb[unk])
    h.revert()
    h = E.Erase(((1, 5),), "zero").apply(lm)
    assert torch.count_nonzero(value_matrix(lm, 1)[5]) == 0
    h.revert()


def _inputs(lm, text):
    enc = lm.tokenizer(text, return_tensors="pt")
    return enc["input_ids"]


@pytest.mark.parametrize("family", [TINY_MASKED, TINY_CAUSAL])
@pytest.mark.parametrize("kind,factor", [("suppress", 0.0), ("amplify", 2.0)])
def test_all_positions_equals_scaling_the_value_vectors(family, kind, factor):
    lm = tiny(family)
    ids = _inputs(lm, "The capital of France is Paris .")
    chosen = ((0, 1), (1, 30), (2, 71))
    edit = E.Suppress(chosen, "all") if kind == "suppress" else E.Amplify(chosen, factor, "all")
    with torch.no_grad():
        h = edit.apply(lm)
        got = lm.model(input_ids=ids).logits
        h.revert()
        reference = copy.deepcopy(lm.model)
        for layer, i in chosen:
            w = lm.layout.__class__(reference).out_projs[layer].weight
            if w.shape[0] == 72:  # Conv1D: rows are value vectors
                w[i] *= factor
            else:
                w[:, i] *= factor
        expect = reference(input_ids=ids).logits
    torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-5)


def test_answer_scope_causal_only_touches_the_last_position():
    lm = tiny(TINY_CAUSAL)
    ids = _inputs(lm, "The capital of France is")
    chosen = ((0, 2), (1, 9), (2, 33), (2, 34))
    with torch.no_grad():
        clean = lm.model(input_ids=ids).logits
        h = E.Suppress(chosen, "answer").apply(lm)
        got = lm.model(input_ids=ids).logits
        h.revert()
        # independent: the prefix from the clean model's cache, the last token through zeroed value vectors
        reference = copy.deepcopy(lm.model)
        for layer, i in chosen:
            lm.layout.__class__(reference).out_projs[layer].weight[i] = 0.0
        past = lm.model(input_ids=ids[:, :-1], use_cache=True).cache
        last = reference(input_ids=ids[:, -1:], cache=past).logits
    torch.testing.assert_close(got[:, :-1], clean[:, :-1])
    torch.testing.assert_close(got[:, -1], last[:, -1], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got[:, -1], clean[:, -1])


def test_answer_scope_masked_touches_only_mask_positions():
    lm = tiny(TINY_MASKED)
    ids = _inputs(lm, "The capital of France is [MASK] .")
    pos = int((ids[0] == lm.tokenizer.mask_token_id).nonzero()[0, 0])
    chosen = ((0, 2), (1, 9), (2, 33))

    def reference_hook(layer_idx):
        def hook(module, args):
            x = args[0].clone()
            for layer, i in chosen:
                if layer == layer_idx:
                    x[0, pos, i] = x[0, pos, i] * 2.0
            return (x,)
        return hook

    with torch.no_grad():
        h = E.Amplify(chosen, 2.0, "answer").apply(lm)
        got = lm.model(input_ids=ids).logits
        h.revert()
        hooks = [lm.layout.out_projs[l].register_forward_pre_hook(reference_hook(l)) for l in range(3)]
        expect = lm.model(input_ids=ids).logits
        for hk in hooks:
            hk.remove()
    torch.testing.assert_close(got, expect)


def test_builders_exclusion_and_erase_choice():
    lm = tiny(TINY_CAUSAL)
    sets = [[(2, 1), (2, 2)], [(2, 1), (1, 4)], [(2, 1)]] + [[(0, k)] for k in range(10, 17)]
    upd = make_update(lm, [(2, 1), (2, 2), (1, 4)], (6,), (7,), sets, fraction=0.1)
    # 10 facts: (2, 1) is in 3 (> 1) -> excluded; (2, 2) and (1, 4) in 1 (not > 1) -> kept
    assert upd.excluded == ((2, 1),) and upd.neurons == ((2, 2), (1, 4))
    assert erase_neurons(sets, k=2) == [(2, 1), (0, 10)]
    r = random_neurons(lm, [(2, 1), (2, 2), (0, 5)], seed=3)
    assert [l for l, _ in r] == [2, 2, 0] and r == random_neurons(lm, [(2, 1), (2, 2), (0, 5)], seed=3)
    assert not set(r) & {(2, 1), (2, 2), (0, 5)}


def test_export_bakes_all_scope_and_refuses_answer_scope(tmp_path):
    from transformers import AutoModelForCausalLM

    lm = tiny(TINY_CAUSAL)
    original = snapshot(lm)
    stack = EditStack(lm)
    stack.push(E.Update(((2, 3),), (6,), (7,)))
    stack.push(E.Suppress(((1, 4),), "all"))
    ids = _inputs(lm, "The capital of France is")
    with torch.no_grad():
        edited = lm.model(input_ids=ids).logits
    info = export_model(lm, stack, tmp_path / "out")
    assert len(info["edits"]) == 2
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, edited, rtol=1e-5, atol=1e-5)
    stack.push(E.Amplify(((0, 1),), 2.0, "answer"))
    with pytest.raises(ValueError, match="answer position"):
        export_model(lm, stack, tmp_path / "out2")
    stack.clear()
    assert_bitwise(lm, original)


def test_bad_neuron_rejected():
    lm = tiny(TINY_CAUSAL)
    with pytest.raises(ValueError, match="outside"):
        E.Suppress(((3, 0),)).apply(lm)
    with pytest.raises(ValueError):
        E.Suppress(((0, 0),), scope="everywhere")


@pytest.mark.default_model
def test_default_model_stack_restores_bitwise_and_edits_act():
    from kn_core import evaluation as ev
    from kn_core.facts import Fact, Relation, render_prompts
    from kn_core.models import load_model

    lm = load_model("default", device="cpu")
    rel = Relation("P36", "capital", ("The capital of [X] is [Y].",))
    prompt = render_prompts(Fact("P36", "France", "Paris"), rel, lm.tokenizer, lm.kind)[0][0]
    berlin = render_prompts(Fact("P36", "France", "Berlin"), rel, lm.tokenizer, lm.kind)[0][0]
    p0 = ev.answer_probabilities(lm, [prompt])[0]
    assert p0["correct"] and p0["prob"] > 0.5
    # value vectors touched: every layer's top block, so the edits visibly move the answer
    neurons = tuple((l, i) for l in range(24, 30) for i in range(0, 1536, 16))
    original = {k: v.clone() for k, v in lm.model.state_dict().items()}
    stack = EditStack(lm)
    stack.push(E.Update(neurons, prompt.answer_ids, berlin.answer_ids))
    assert ev.answer_probabilities(lm, [berlin])[0]["prob"] > ev.answer_probabilities(lm, [prompt])[0]["prob"]
    stack.push(E.Suppress(neurons))  # the updated value vectors are silenced again
    assert ev.answer_probabilities(lm, [berlin])[0]["prob"] < 0.01
    stack.push(E.Erase(neurons[:20], "unk"))
    stack.undo()
    stack.set_enabled(0, False)
    stack.redo()
    stack.revert_all()
    for name, tensor in lm.model.state_dict().items():
        assert torch.equal(tensor, original[name]), name
    assert ev.answer_probabilities(lm, [prompt])[0]["prob"] == pytest.approx(p0["prob"], rel=1e-6)
    info = ev.neuron_tokens(lm, 29, 238, top_k=5)
    assert len(info["promotes"]) == 5 and info["promotes"][0]["logit"] > info["suppresses"][0]["logit"]


def test_the_shared_neuron_rule_needs_a_sample_that_supports_its_share():
    from kn_core.edit_plan import shared_rule_min_facts, shared_rule_note

    assert [shared_rule_min_facts(f) for f in (0.1, 0.2, 0.25, 0.3, 0.0, 1.0)] == [10, 5, 4, 4, 1, 1]
    assert shared_rule_note(9, 0.1) and shared_rule_note(10, 0.1) is None
    lm = make_tiny(TINY_CAUSAL)
    thin = make_update(lm, [(2, 1), (1, 4)], (6,), (7,), [[(2, 1)], [(2, 1)], [(1, 4)]], fraction=0.1)
    assert thin.excluded == () and thin.neurons == ((2, 1), (1, 4))  # 3 other facts: not applied
