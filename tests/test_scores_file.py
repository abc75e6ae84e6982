"""The `kn attribute --save` file: written and read back exactly; every unusable file is one clear error."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from kn_core.scores_file import ScoresFileError, load_scores, save_scores

MODEL = {"name": "tiny", "sha256": "ab" * 32, "layers": 3, "neurons": 8}


def _result(seed=0):
    rng = np.random.default_rng(seed)
    return SimpleNamespace(scores=rng.standard_normal((3, 8)).astype(np.float32),
                           activations=rng.standard_normal((3, 8)).astype(np.float32), prob=0.25)


def test_saved_scores_read_back_bit_for_bit(tmp_path):
    result = _result()
    save_scores(tmp_path / "s.npz", result, {"steps": 4, "method": "ig"}, "The capital of France is", " Paris",
                model=MODEL, answer_ids=[12, 7])
    saved = load_scores(tmp_path / "s.npz")
    assert saved.scores.dtype == np.float32 and np.array_equal(saved.scores, result.scores)
    assert np.array_equal(saved.activations, result.activations)
    assert (saved.prompt, saved.answer, saved.params, saved.model, saved.prob, saved.answer_ids) == (
        "The capital of France is", " Paris", {"steps": 4, "method": "ig"}, MODEL, 0.25, (12, 7))


def test_a_file_from_before_the_model_was_saved_still_opens(tmp_path):
    r = _result()
    np.savez_compressed(tmp_path / "old.npz", scores=r.scores, activations=r.activations,
                        params=json.dumps({"steps": 20}), prompt="p", answer=" a")
    saved = load_scores(tmp_path / "old.npz")
    assert saved.model == {} and np.isnan(saved.prob) and saved.answer_ids == ()
    assert np.array_equal(saved.scores, r.scores)


def _write(tmp_path, name, **arrays):
    r = _result()
    base = dict(scores=r.scores, activations=r.activations, params=json.dumps({}), prompt="p", answer=" a")
    base.update(arrays)
    base = {k: v for k, v in base.items() if v is not None}
    np.savez(tmp_path / name, **base)
    return tmp_path / name


@pytest.mark.parametrize("make, words", [
    (lambda d: d / "nope.npz", ["no such file"]),
    (lambda d: (d / "t.npz").write_text("hello") and d / "t.npz", ["not a readable .npz"]),
    (lambda d: (d / "j.npz").write_text('{"not": "scores"}') and d / "j.npz", ["not a readable .npz", "zip"]),
    (lambda d: np.save(d / "a.npy", np.zeros(3)) or d / "a.npy", ["single array"]),
    (lambda d: _write(d, "m.npz", scores=None), ["missing scores"]),
    (lambda d: _write(d, "v.npz", scores=np.zeros(5, np.float32)), ["'scores'", "[layers, neurons]"]),
    (lambda d: _write(d, "i.npz", scores=np.zeros((3, 8), np.int64)), ["'scores'", "int64"]),
    (lambda d: _write(d, "n.npz", activations=np.full((3, 8), np.nan, np.float32)), ["NaN"]),
    (lambda d: _write(d, "s.npz", activations=np.zeros((2, 8), np.float32)), ["differ in shape"]),
    (lambda d: _write(d, "e.npz", answer="  "), ["empty"]),
    (lambda d: _write(d, "j.npz", params="{oops"), ["'params'", "JSON"]),
    (lambda d: _write(d, "l.npz", params="[1]"), ["'params'", "JSON object"]),
    (lambda d: _write(d, "x.npz", model=json.dumps({"layers": 30, "neurons": 1536})), ["30 layers", "damaged"]),
    (lambda d: _write(d, "a.npz", answer_ids=np.array([0.5])), ["'answer_ids'"]),
    (lambda d: _write(d, "o.npz", prompt=np.array([{"a": 1}], dtype=object)), ["not a readable .npz"]),
])
def test_unusable_files_are_one_line_errors(tmp_path, make, words):
    path = make(tmp_path)
    with pytest.raises(ScoresFileError) as err:
        load_scores(path)
    message = str(err.value)
    assert "\n" not in message and all(w in message for w in words), message
    assert "unsafely" not in message  # numpy's advice to load a text file as a trusted pickle: never ours


def test_a_truncated_file_is_an_error_not_a_crash(tmp_path):
    save_scores(tmp_path / "s.npz", _result(), {}, "p", " a", model=MODEL)
    data = (tmp_path / "s.npz").read_bytes()
    for cut in (10, len(data) // 2, len(data) - 5):
        (tmp_path / "cut.npz").write_bytes(data[:cut])
        with pytest.raises(ScoresFileError, match="not a readable .npz"):
            load_scores(tmp_path / "cut.npz")


def test_kn_attribute_save_writes_a_file_that_reads_back(capsys, tmp_path):
    from kn_core.cli import main
    from kn_core.models import load_model
    from tiny import make_tiny

    tiny = make_tiny("gpt2")
    tiny.model.save_pretrained(tmp_path / "model")
    tiny.tokenizer.save_pretrained(tmp_path / "model")
    code = main(["attribute", "--prompt", "The capital of France is", "--answer", " Paris", "--model",
                 str(tmp_path / "model"), "--steps", "2", "--json", "--save", str(tmp_path / "s.npz")])
    doc = json.loads(capsys.readouterr().out)
    saved = load_scores(tmp_path / "s.npz")
    lm = load_model(str(tmp_path / "model"), device="cpu")
    assert code == 0 and saved.scores.shape == (doc["layers"], doc["neurons"])
    assert float(saved.scores.max()) == pytest.approx(doc["max"], rel=1e-6)
    assert saved.model["sha256"] == lm.sha256 and saved.answer_ids == tuple(doc["answer_tokens"])
    assert saved.params["steps"] == 2 and saved.prob == pytest.approx(doc["prob"])
