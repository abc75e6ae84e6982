"""Strict JSON for everything the engine writes or prints (report.json, `kn ... --json`).

JSON has no NaN or Infinity, and a number silently dropped is the worst bug for a user who publishes it, so:
a non-finite number becomes ``null`` and its dict gets a sibling ``"<key>_note"`` saying what it was
(``"x": null, "x_note": "NaN"``). A list holding non-finite numbers (at any depth) becomes nulls at those
places, and the dict holding the list notes them (``"after_note": "non-finite values written as null:
[2]=NaN"``). numpy scalars and arrays become plain numbers and lists; tuples become lists; keys become strings.
"""

from __future__ import annotations

import json
import math
import numbers

_NOTE_LIMIT = 8  # positions named in one list note; the count is always given


def _non_finite_name(value: float) -> str:
    return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")


def _convert(obj, path: str, found: list):
    """`obj` made JSON-safe; every non-finite number is appended to `found` as (path, name)."""
    if isinstance(obj, dict):
        return _convert_dict(obj)
    if hasattr(obj, "tolist") and not isinstance(obj, (str, bytes)):  # numpy/torch arrays and scalars
        obj = obj.tolist()
    if isinstance(obj, (list, tuple)):
        return [_convert(v, f"{path}[{k}]", found) for k, v in enumerate(obj)]
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, numbers.Integral):
        return int(obj)
    if isinstance(obj, numbers.Real):
        value = float(obj)
        if math.isfinite(value):
            return value
        found.append((path, _non_finite_name(value)))
        return None
    return obj


def _convert_dict(obj: dict) -> dict:
    out: dict = {}
    notes: dict = {}
    for key, value in obj.items():
        key = str(key)
        found: list = []
        out[key] = _convert(value, "", found)
        if found:
            if not (len(found) == 1 and found[0][0] == ""):  # inside a list or a nested value
                shown = ", ".join(f"{p}={name}" for p, name in found[:_NOTE_LIMIT])
                more = f" and {len(found) - _NOTE_LIMIT} more" if len(found) > _NOTE_LIMIT else ""
                notes[f"{key}_note"] = f"{len(found)} non-finite value(s) written as null: {shown}{more}"
            else:
                notes[f"{key}_note"] = found[0][1]
    for key, note in notes.items():
        if key not in out:  # an existing field of that name wins; the null stays
            out[key] = note
    return out


def jsonable(obj):
    """`obj` as plain JSON data under the rules above (non-finite numbers -> null with a note)."""
    return _convert(obj, "", [])


def dumps(obj, **kwargs) -> str:
    """Strict JSON text (never NaN/Infinity) of `obj` under the rules above."""
    kwargs.setdefault("ensure_ascii", False)
    return json.dumps(jsonable(obj), allow_nan=False, **kwargs)


def write_text_atomic(path, text: str) -> None:
    """Writes `text` (UTF-8) to `path` through a temporary file in the same folder renamed over it: a full disk
    or a kill leaves the earlier file whole (never a truncated report.json), and no temporary file behind."""
    import os
    from pathlib import Path

    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
