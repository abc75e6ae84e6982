"""Causal tracing against a slow reference: one plain forward per (restoration, noise sample), no batching, no
replay, no skipped positions; every supported family on tiny random models."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kn_core.encoding import encode_answer, encode_prompt
from kn_core.hooks import Hooks, replacing_output
from kn_core.tracing import (KINDS, TraceError, TraceParams, embedding_std, restored_layers, state_modules,
                             subject_span, trace)
from kn_core.validation import ValidationError
from tiny import ALL_FAMILIES, make_tiny

PARAMS = TraceParams(samples=3, noise=3.0, seed=7)


def _prompt(lm):
    if lm.kind == "causal":
        return "The capital of New Zealand is", " Wellington"
    return f"The capital of New Zealand is {lm.tokenizer.mask_token} .", "Wellington"


def _setup(lm):
    text, answer = _prompt(lm)
    answer_ids = encode_answer(lm, text, answer)
    return text, "New Zealand", answer_ids


def _slow(lm, text, subject, answer_ids, params, std, restore=()):
    """P(o) per noise sample with `restore` = [(kind, token, layer), ...] set to the clean run's values: one
    batch-of-one forward per sample, hooks on the full model."""
    target = encode_prompt(lm, text, answer_ids).targets()[0]
    ids = torch.tensor([target.ids])
    start, end = subject_span(lm, text, target.ids, subject)
    generator = torch.Generator().manual_seed(params.seed)
    noise = torch.randn(params.samples, end - start, lm.layout.hidden, generator=generator,
                        dtype=torch.float64) * (params.noise * std)
    clean = {}

    def keep(kind, layer):
        def hook(module, args, out):
            x = out[0] if isinstance(out, tuple) else out
            clean[kind, layer] = x.reshape(1, len(target.ids), -1).clone()
        return hook

    record = [(m, keep(kind, layer)) for kind in KINDS for layer, m in enumerate(state_modules(lm.layout, kind))]
    with torch.no_grad(), Hooks(post=record):
        clean_p = torch.softmax(lm.model(input_ids=ids).logits[0, target.pos].double(), -1)[target.token]
    probs = []
    for s in range(params.samples):
        def corrupt(x, s=s):
            x = x.clone()
            x[0, start:end] += noise[s].to(x.dtype)
            return x

        def put(kind, token, layer):
            def fn(x):
                y = x.reshape(1, len(target.ids), -1).clone()
                y[0, token] = clean[kind, layer][0, token]
                return y.reshape(x.shape)
            return state_modules(lm.layout, kind)[layer], replacing_output(fn)

        hooks = [(lm.model.get_input_embeddings(), replacing_output(corrupt))] + [put(*r) for r in restore]
        with torch.no_grad(), Hooks(post=hooks):
            logits = lm.model(input_ids=ids).logits[0, target.pos].double()
        probs.append(float(torch.softmax(logits, -1)[target.token]))
    return float(clean_p), float(np.mean(probs))


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_batched_equals_slow_reference(family):
    lm = make_tiny(family)
    text, subject, answer_ids = _setup(lm)
    std = embedding_std(lm, ["France", "New Zealand", "Buenos Aires"])
    result = trace(lm, text, subject, answer_ids, PARAMS, noise_scale=std)
    L, seq = lm.layout.layers, len(result.tokens)
    assert result.subject_span == ((4, 6) if lm.kind == "masked" else (3, 5))  # [CLS] The capital of New Zealand
    p_clean, p_corrupted = _slow(lm, text, subject, answer_ids, PARAMS, std[0])
    assert result.p_clean == pytest.approx(p_clean, abs=1e-6)
    assert result.p_corrupted == pytest.approx(p_corrupted, abs=1e-6)  # restoring nothing
    assert abs(p_clean - p_corrupted) > 5e-3 * p_clean  # the noise does something: the checks below can fail
    for kind in KINDS:
        assert result.restored[kind].shape == (seq, L)
        for token in range(seq):
            for layer in range(L):
                _, slow = _slow(lm, text, subject, answer_ids, PARAMS, std[0], [(kind, token, layer)])
                assert result.restored[kind][token, layer] == pytest.approx(slow, abs=1e-6), (kind, token, layer)
    # restoring the last block's output at the answer position restores what the head reads: P(clean)
    assert result.restored["residual"][result.answer_position, L - 1] == pytest.approx(p_clean, abs=1e-6)
    # restoring the clean residual stream at every position of any one layer gives the clean probability
    for layer in range(L):
        _, every = _slow(lm, text, subject, answer_ids, PARAMS, std[0],
                         [("residual", t, layer) for t in range(seq)])
        assert every == pytest.approx(p_clean, abs=1e-6)


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert", "opt"])
def test_window_equals_slow_reference(family):
    lm = make_tiny(family, num_hidden_layers=5) if family not in ("gpt2",) else make_tiny(family, n_layer=5)
    text, subject, answer_ids = _setup(lm)
    params = TraceParams(kinds=("mlp", "attn"), samples=2, seed=3, window=3)
    std = embedding_std(lm, [subject])
    result = trace(lm, text, subject, answer_ids, params, noise_scale=std)
    L = lm.layout.layers
    assert L == 5
    for kind in ("mlp", "attn"):
        for token in range(len(result.tokens)):
            for layer in range(L):
                states = [(kind, token, j) for j in restored_layers(kind, layer, 3, L)]
                _, slow = _slow(lm, text, subject, answer_ids, params, std[0], states)
                assert result.restored[kind][token, layer] == pytest.approx(slow, abs=1e-6)


def test_window_follows_rome():
    assert list(restored_layers("mlp", 12, 10, 48)) == list(range(7, 17))  # l - 5 .. l + 4
    assert list(restored_layers("mlp", 0, 10, 48)) == list(range(0, 5))
    assert list(restored_layers("attn", 47, 10, 48)) == list(range(42, 48))
    assert list(restored_layers("residual", 12, 10, 48)) == [12]


def test_seeded_and_reproducible():
    lm = make_tiny("gpt2")
    text, subject, answer_ids = _setup(lm)
    a = trace(lm, text, subject, answer_ids, TraceParams(kinds=("mlp",), samples=2, seed=1))
    b = trace(lm, text, subject, answer_ids, TraceParams(kinds=("mlp",), samples=2, seed=1))
    c = trace(lm, text, subject, answer_ids, TraceParams(kinds=("mlp",), samples=2, seed=2))
    assert np.array_equal(a.restored["mlp"], b.restored["mlp"]) and a.p_corrupted == b.p_corrupted
    assert a.p_corrupted != c.p_corrupted
    # before the subject a causal model's states are not corrupted: those cells are P(corrupted) exactly
    assert a.skipped_positions == [0, 1, 2]
    assert np.all(a.restored["mlp"][:3] == a.p_corrupted)


def test_round_trip_and_summary():
    lm = make_tiny("llama")
    text, subject, answer_ids = _setup(lm)
    result = trace(lm, text, subject, answer_ids, TraceParams(samples=2))
    doc = result.to_dict()
    back = type(result).from_dict(doc)
    for kind in KINDS:
        assert np.array_equal(back.restored[kind], result.restored[kind])
        assert doc["kinds"][kind]["peak_layer_at_last_subject_token"] == result.peak_layer(kind)
    assert doc["subject_span"] == [3, 5] and doc["tokens"][3:5] == [" New", " Zealand"]
    assert doc["noise_std"] == pytest.approx(3 * doc["embedding_std"])


def test_embedding_std_is_roms():
    lm = make_tiny("gpt2")
    std, n = embedding_std(lm, ["France", "New Zealand", "France"])
    ids = [lm.tokenizer(s, add_special_tokens=False)["input_ids"] for s in ("France", "New Zealand")]
    rows = torch.cat([lm.model.get_input_embeddings().weight[i] for i in ids])
    assert n == 3 and std == pytest.approx(float(rows.std()), rel=1e-6)


def test_bad_inputs():
    lm = make_tiny("gpt2")
    text, _, answer_ids = _setup(lm)
    with pytest.raises(TraceError, match="does not occur in the prompt"):
        trace(lm, text, "Japan", answer_ids, TraceParams(samples=1))
    with pytest.raises(TraceError, match="empty"):
        trace(lm, text, " ", answer_ids, TraceParams(samples=1))
    for bad in (dict(samples=0), dict(window=0), dict(noise=float("nan")), dict(noise=-1), dict(seed=-1),
                dict(kinds=("mlp", "ffn")), dict(kinds=()), dict(samples=True)):
        with pytest.raises(ValidationError):
            TraceParams(**bad)
