"""The scores file of `kn attribute --save FILE.npz` (one prompt's attribution), written and read in one place so
the CLI and the app (File -> Open scores) agree on it.

Keys: ``scores`` and ``activations`` (float32 [layers, neurons]), ``prompt`` and ``answer`` (strings),
``params`` (the AttributionParams as a JSON object) and, since the app opens these files, ``model`` (the
model's description as a JSON object: name, sha256, layers, neurons), ``answer_ids`` and ``prob`` (older files
lack these three).
Read without pickle: a scores file can never run code.
"""

from __future__ import annotations

import json
import math
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REQUIRED = ("scores", "activations", "prompt", "answer", "params")


class ScoresFileError(ValueError):
    """A file that is not a usable scores file; the message names the file, the problem and the fix."""


@dataclass
class SavedScores:
    prompt: str
    answer: str
    scores: np.ndarray  # float32 [layers, neurons]
    activations: np.ndarray
    params: dict
    model: dict = field(default_factory=dict)  # empty for files written before the model was saved
    prob: float = float("nan")
    answer_ids: tuple[int, ...] = ()


def save_scores(path, result, params: dict, prompt: str, answer: str, model: dict | None = None,
                answer_ids=()) -> None:
    """Writes one prompt's attribution result (kn_core.attribution.PromptScores) to ``path``."""
    np.savez_compressed(path, scores=result.scores, activations=result.activations, params=json.dumps(params),
                        prompt=prompt, answer=answer, model=json.dumps(model or {}),
                        prob=np.float64(result.prob), answer_ids=np.asarray(list(answer_ids), dtype=np.int64))


def _text(data, key: str, name: str) -> str:
    value = data[key]
    if value.shape != () or value.dtype.kind != "U":
        raise ScoresFileError(f"{name}: '{key}' is not a string; write the file again with kn attribute --save")
    return str(value)


def _json_object(data, key: str, name: str) -> dict:
    try:
        value = json.loads(_text(data, key, name))
    except json.JSONDecodeError as exc:
        raise ScoresFileError(f"{name}: '{key}' is not valid JSON ({exc.msg}); write the file again with "
                              "kn attribute --save") from None
    if not isinstance(value, dict):
        raise ScoresFileError(f"{name}: '{key}' is not a JSON object; write the file again with kn attribute --save")
    return value


def _matrix(data, key: str, name: str) -> np.ndarray:
    value = data[key]
    if value.ndim != 2 or value.dtype.kind != "f" or 0 in value.shape:
        raise ScoresFileError(f"{name}: '{key}' must be a [layers, neurons] float array, found shape "
                              f"{list(value.shape)} of {value.dtype}; write the file again with kn attribute --save")
    if not np.isfinite(value).all():
        raise ScoresFileError(f"{name}: '{key}' holds NaN or infinite values; attribute the prompt again")
    return value.astype(np.float32, copy=False)


def _is_npy(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(6) == b"\x93NUMPY"


def load_scores(path) -> SavedScores:
    """Reads and checks a scores file; raises ScoresFileError (one line) for anything unusable."""
    path = Path(path)
    name = path.name
    if not path.is_file():
        raise ScoresFileError(f"{path}: no such file; pick a .npz written by kn attribute --save")
    try:
        if not zipfile.is_zipfile(path) and not _is_npy(path):
            # else numpy reads it as a pickle and advises loading it "unsafely" if trusted: not the fix here
            raise ScoresFileError(f"{name}: not a readable .npz file (a .npz is a zip archive and this file is "
                                  "not one); pick a file written by kn attribute --save")
        data = np.load(path, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise ScoresFileError(f"{name}: a single array (.npy), not a scores file; pick a .npz written by "
                                  "kn attribute --save")
        with data:
            missing = [k for k in REQUIRED if k not in data.files]
            if missing:
                raise ScoresFileError(f"{name}: not a scores file (missing {', '.join(missing)}); pick a .npz "
                                      "written by kn attribute --save")
            scores, activations = _matrix(data, "scores", name), _matrix(data, "activations", name)
            if scores.shape != activations.shape:
                raise ScoresFileError(f"{name}: scores {list(scores.shape)} and activations "
                                      f"{list(activations.shape)} differ in shape; write the file again")
            prompt, answer = _text(data, "prompt", name), _text(data, "answer", name)
            if not prompt.strip() or not answer.strip():
                raise ScoresFileError(f"{name}: the prompt or the answer is empty; write the file again")
            params = _json_object(data, "params", name)
            model = _json_object(data, "model", name) if "model" in data.files else {}
            prob = float(data["prob"]) if "prob" in data.files and data["prob"].shape == () else float("nan")
            ids = data["answer_ids"] if "answer_ids" in data.files else np.zeros(0, np.int64)
            if ids.ndim != 1 or ids.dtype.kind not in "iu":
                raise ScoresFileError(f"{name}: 'answer_ids' is not a list of token ids; write the file again")
    except ScoresFileError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error, KeyError) as exc:
        raise ScoresFileError(f"{name}: not a readable .npz file ({type(exc).__name__}: {exc}); pick a file "
                              "written by kn attribute --save") from None
    layers, neurons = model.get("layers"), model.get("neurons")
    if layers is not None and neurons is not None and (layers, neurons) != scores.shape:
        raise ScoresFileError(f"{name}: the scores are {list(scores.shape)} but the file says the model has "
                              f"{layers} layers x {neurons} neurons; the file is damaged")
    return SavedScores(prompt=prompt, answer=answer, scores=scores, activations=activations, params=params,
                       model=model, prob=prob if math.isfinite(prob) else float("nan"),
                       answer_ids=tuple(int(i) for i in ids))
