"""What the project store takes and returns: the record dataclasses handed to callers, and the coercion of the
inputs callers pass (facts.Fact or dicts, LoadedModel or dicts, tensors or arrays, AttributionParams or dicts) into
the plain JSON-able values the schema stores."""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import json
import platform
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ProjectDataError

def app_version() -> str:
    try:
        from kn_core import __version__

        return __version__
    except Exception:  # pragma: no cover
        return "unknown"


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def library_versions() -> dict[str, str]:
    """Versions of the libraries a number depends on (read from package metadata; imports nothing)."""
    return dict(_library_versions())


@functools.lru_cache(maxsize=1)
def _library_versions() -> dict[str, str]:
    # read once per process: parsing five packages' metadata took ~10 ms, a quarter of storing a fact
    out = {"python": platform.python_version(), "knowledge-neuron-studio": app_version()}
    for dist in ("torch", "transformers", "numpy", "tokenizers", "sqlalchemy"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


# ---------------------------------------------------------------------------------------------- records


@dataclass(frozen=True)
class RelationRecord:
    id: int
    key: str
    name: str
    templates: tuple[str, ...]
    info: dict = field(default_factory=dict)


@dataclass(frozen=True)
class FactRecord:
    id: int
    relation_id: int
    relation: str  # the relation's key, e.g. "P36"
    subject: str
    object: str
    info: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ModelRecord:
    id: int
    source: str
    sha256: str
    dtype: str
    family: str
    kind: str
    layers: int | None
    neurons: int | None
    info: dict
    first_used: str


@dataclass(frozen=True)
class PromptRecord:
    prompt_index: int
    prompt: dict
    done: bool
    prob: float | None
    completeness: list | None
    seconds: float | None
    arrays: tuple[str, ...] = ()  # names of the stored arrays ("scores", "activations")


class JsonMemo:
    """Decodes stored JSON text once per distinct text (the runs of one fact-set attribution share their
    parameters and library versions, which makes listing 27,600 runs several times faster). Every call returns
    its own object: flat dicts and lists are copied, anything nested is decoded afresh."""

    def __init__(self):
        self._flat: dict[str, Any] = {}

    def __call__(self, text):
        if text is None:
            return None
        hit = self._flat.get(text)
        if hit is None:
            value = json.loads(text)
            items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else None
            if items is None or any(isinstance(v, (dict, list)) for v in items):
                return value
            self._flat[text] = hit = value
        return dict(hit) if isinstance(hit, dict) else list(hit)


@dataclass(frozen=True)
class RunRecord:
    id: int
    fact_id: int | None
    model_id: int | None
    method: str
    params: dict
    library_versions: dict
    device: str
    status: str
    error: str
    started_at: str
    finished_at: str | None
    elapsed_s: float | None
    n_prompts: int
    n_done: int
    info: dict
    prompts: tuple[PromptRecord, ...] = ()  # filled by get_run, empty in list_runs


@dataclass(frozen=True)
class NeuronSetRecord:
    id: int
    name: str
    kind: str
    neurons: tuple[tuple[int, int], ...]
    params: dict
    fact_id: int | None
    relation_id: int | None
    model_id: int | None
    run_ids: tuple[int, ...]
    prompt_index: int | None
    created_at: str
    note: str


@dataclass(frozen=True)
class EvaluationRecord:
    id: int
    kind: str
    name: str
    model_id: int | None
    params: dict
    report: Any
    library_versions: dict
    status: str
    started_at: str
    finished_at: str | None
    elapsed_s: float | None


class HistoryCheck:
    """Result of `edit_history_applies`: truthy when the saved edits may be re-applied; `.reason` says why not
    (or what will happen). Never a bare string, so `if check:` cannot mistake a reason for a yes."""

    def __init__(self, ok: bool, reason: str):
        self.ok = bool(ok)
        self.reason = reason

    def __bool__(self) -> bool:
        return self.ok

    def __repr__(self) -> str:
        return f"HistoryCheck(ok={self.ok}, reason={self.reason!r})"


def record_to_dict(record) -> dict:
    """Any record above -> a JSON-able dict."""
    return dataclasses.asdict(record) if dataclasses.is_dataclass(record) else dict(record)


# ---------------------------------------------------------------------------------------------- input shapes


def get_field(obj, *names, default=None):
    for name in names:
        if isinstance(obj, dict):
            if name in obj:
                return obj[name]
        elif hasattr(obj, name):
            return getattr(obj, name)
    return default


def jsonable(value):
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return jsonable(dataclasses.asdict(value))
    if hasattr(value, "to_dict"):
        return jsonable(value.to_dict())
    return str(value)  # torch.dtype, torch.device, ...


def neuron_list(neurons) -> list[list[int]]:
    out = []
    for n in neurons:
        layer, index = n
        out.append([int(layer), int(index)])
    return out


def prompt_dict(prompt) -> dict:
    if isinstance(prompt, str):
        return {"text": prompt}
    if isinstance(prompt, dict):
        return jsonable(prompt)
    out = {}
    for name in ("text", "answer", "answer_ids", "template", "kind"):
        if hasattr(prompt, name):
            out[name] = jsonable(getattr(prompt, name))
    return out


def model_fields(model) -> dict:
    if hasattr(model, "describe") and callable(model.describe):
        info = jsonable(model.describe())
    elif isinstance(model, dict):
        info = jsonable(model)
    else:
        info = {k: jsonable(getattr(model, k)) for k in ("source", "sha256", "dtype", "family", "kind")
                if hasattr(model, k)}
    if not info.get("source") and not info.get("sha256"):
        raise ProjectDataError(None, f"cannot tell which model {model!r} is",
                               "pass a model id, a LoadedModel, or a dict with source, sha256, dtype")
    return {
        "source": str(info.get("source", "")),
        "sha256": str(info.get("sha256") or ""),  # "" = unknown weights: saved edits will never auto-apply
        "dtype": str(info.get("dtype", "")).replace("torch.", ""),
        "family": str(info.get("family", "")),
        "kind": str(info.get("kind", "")),
        "layers": info.get("layers"),
        "neurons": info.get("neurons"),
        "info": info,
    }


def to_numpy(arr) -> np.ndarray:
    if isinstance(arr, np.ndarray):
        return arr
    if hasattr(arr, "detach"):  # torch tensor, without importing torch
        return arr.detach().cpu().numpy()
    return np.asarray(arr)


def edit_rows(state) -> tuple[dict, list[tuple[dict, bool, bool, dict]]]:
    """An edit history as `save_edit_history` takes it -> (extra state, [(edit, applied, enabled, extra)]).
    `state`: `EditStack.to_dict()` ({version, cursor, entries: [{edit: {kind, neurons, ...}, enabled}]}) or a
    plain list of edit dicts ({kind, neurons, params?, applied?, enabled?})."""
    rows = []
    if isinstance(state, dict):
        entries = list(state.get("entries", []))
        cursor = int(state.get("cursor", len(entries)))
        for i, e in enumerate(entries):
            edit = dict(e.get("edit", e))
            rows.append((edit, i < cursor, bool(e.get("enabled", True)),
                         {k: v for k, v in e.items() if k not in ("edit", "enabled")}))
        return {k: v for k, v in state.items() if k != "entries"}, rows
    for e in state:
        edit = dict(e)
        applied = bool(edit.pop("applied", True))
        enabled = bool(edit.pop("enabled", True))
        params = edit.pop("params", None)
        if params:
            edit.update(params)
        rows.append((edit, applied, enabled, {}))
    return {"format": "list"}, rows
