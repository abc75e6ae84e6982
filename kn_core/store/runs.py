"""Attribution runs and their score arrays: the part of `Project` (which mixes `RunStore` in) that records a run
prompt by prompt and reads it back. Uses the project's `_session`, `_fact_id`, `_model_id`, `path`, `read_only`."""

from __future__ import annotations

import contextlib
import dataclasses
import re
import time
import zlib
from datetime import datetime
from typing import Any, Iterable, Iterator

import numpy as np
from sqlalchemy import Text, delete, func, select, text, type_coerce, update
from sqlalchemy.orm import Session

from . import records
from .codec import CODEC, ArrayCodecError, decode_array, encode_array
from .errors import CorruptProjectError, ProjectDataError, ProjectError
from .records import JsonMemo, PromptRecord, RunRecord, get_field, jsonable, model_fields, now, prompt_dict, to_numpy
from .schema import ModelRow, RunPromptRow, RunRow, ScoreArrayRow
from .topscores import DEFAULT_FLOOR, DEFAULT_GUARD, TOP_CODEC, TopScores, decode_top, encode_top

# array names become file names in exports: one plain name part
_ARRAY_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")
INTERRUPTED = "the process stopped before this run finished (killed, crashed or powered off)"
SCORE_STORAGE = "store.scores"  # the setting: {"form": full|float16|top, "floor": .., "guard": ..}
STORAGE_FORMS = ("full", "float16", "top")
_DONE_INDEX = "CREATE INDEX IF NOT EXISTS ix_run_prompts_run_done ON run_prompts (run_id, done)"


class RunStore:
    """Mixed into `Project`: attribution runs (started, one prompt per transaction, finished; or all of it in one
    `Project.atomic` block) and their arrays."""

    _clock: dict[int, float]  # run id -> time.monotonic() at start_run in this process
    _storage: dict | None = None  # the score storage setting, cached: while we write, nobody else can change it

    # -- how score arrays are stored (a project setting, read at every save)
    def set_score_storage(self, form: str = "full", floor: float = DEFAULT_FLOOR, guard: int = DEFAULT_GUARD) -> None:
        """How later prompt results store their `scores`: "full" (float32 as computed), "float16" (every array at
        half precision, lossy) or "top" (per prompt the top scores only, exact for coarse selection at any
        t >= floor with up to `guard` excluded neurons; see topscores.py; other arrays at float16). Arrays
        already stored keep their form."""
        if form not in STORAGE_FORMS:
            raise ProjectDataError(self.path, f"unknown score storage {form!r}", "use full, float16 or top")
        if not (isinstance(floor, (int, float)) and 0 < floor <= 1):
            raise ProjectDataError(self.path, f"score storage floor {floor!r} is outside (0, 1]",
                                   "use the smallest t you will want, e.g. 0.1")
        if not (isinstance(guard, int) and 0 <= guard <= 4096):
            raise ProjectDataError(self.path, f"score storage guard {guard!r} is outside 0..4096",
                                   "use how many flagged neurons may be excluded, e.g. 16")
        self._storage = None
        self.set_setting(SCORE_STORAGE, {"form": form, "floor": float(floor), "guard": int(guard)})

    def score_storage(self) -> dict:
        if self._storage is None:
            self._storage = self.get_setting(SCORE_STORAGE, None) or {"form": "full", "floor": DEFAULT_FLOOR,
                                                                      "guard": DEFAULT_GUARD}
        return dict(self._storage)

    # -- attribution runs
    def start_run(self, fact=None, prompts: Iterable = (), params: dict | Any = None, model=None,
                  method: str | None = None, device: str = "", relation=None,
                  library_versions: dict | None = None, info: dict | None = None) -> int:
        """Commits a new run with status `running` (before any computation) and its prompts. `fact`: a fact
        id, Fact or dict; `prompts`: facts.Prompt objects, dicts or strings; `params`: a dict or an object with
        `to_dict()` (AttributionParams); `model`: a model id, LoadedModel or dict. Returns the run id."""
        params = jsonable(params.to_dict() if hasattr(params, "to_dict") else (params or {}))
        prompts = [prompt_dict(p) for p in prompts]
        if not device and model is not None and not isinstance(model, (int, dict)) and hasattr(model, "device"):
            device = str(model.device)
        with self._session("starting a run", write=True) as s:
            s.execute(text(_DONE_INDEX))  # files created before the index existed get it with their next run
            row = RunRow(fact_id=None if fact is None else self._fact_id(s, fact, relation),
                         model_id=self._model_id(s, model), method=method or str(params.get("method", "ig")),
                         params=params, library_versions=library_versions or records.library_versions(),
                         device=str(device), status="running", error="", started_at=now(),
                         n_prompts=len(prompts), info=jsonable(info or {}))
            s.add(row)
            s.flush()
            for i, p in enumerate(prompts):
                s.add(RunPromptRow(run_id=row.id, prompt_index=i, prompt=p, done=False))
            run_id = row.id
        self._clock[run_id] = time.monotonic()
        return run_id

    def add_prompt_result(self, run_id: int, prompt_index: int, result=None, *, scores=None, activations=None,
                          prob: float | None = None, completeness: list | None = None, seconds: float | None = None,
                          float16: bool = False, extra_arrays: dict | None = None) -> None:
        """Commits one prompt's results in one transaction: `result` may be an attribution.PromptScores
        (scores, activations, prob, completeness, seconds); keywords override its fields. Arrays are stored
        as compressed .npy bytes (`float16=True` halves them, lossy). Re-adding a prompt replaces it. `scores` may
        be a TopScores (read back from a compact project): it is stored as it is, whatever the project's form."""
        if result is not None:
            scores = scores if scores is not None else get_field(result, "scores")
            activations = activations if activations is not None else get_field(result, "activations")
            prob = prob if prob is not None else get_field(result, "prob")
            completeness = completeness if completeness is not None else get_field(result, "completeness")
            seconds = seconds if seconds is not None else get_field(result, "seconds")
        if scores is None:
            raise ProjectDataError(self.path, "a prompt result needs its scores array", "pass scores=")
        arrays = {"scores": scores}
        if activations is not None:
            arrays["activations"] = activations
        arrays.update(extra_arrays or {})
        for name in arrays:
            if not isinstance(name, str) or not _ARRAY_NAME.fullmatch(name) or ".." in name:
                raise ProjectDataError(self.path, f"bad array name {name!r}",
                                       "use 1-64 letters, digits, '_', '-' or '.' (not leading, no '..')")
        storage = self.score_storage()
        float16 = float16 or storage["form"] != "full"
        encoded = {}
        for name, arr in arrays.items():
            if isinstance(arr, TopScores):  # already compact: re-compressing its dense form could not add scores
                encoded[name] = (list(arr.shape), str(arr.values.dtype), *encode_top(arr), TOP_CODEC)
                continue
            arr = to_numpy(arr)
            if name == "scores" and storage["form"] == "top":
                top = TopScores.compress(arr, storage["floor"], storage["guard"])
                encoded[name] = (list(arr.shape), str(arr.dtype), *encode_top(top), TOP_CODEC)
                continue
            blob, crc = encode_array(arr, float16=float16)
            encoded[name] = (list(arr.shape), str(np.float16 if float16 and arr.dtype.kind == "f" else arr.dtype),
                             blob, crc, CODEC)
        with self._session(f"saving run {run_id} prompt {prompt_index}", write=True) as s:
            pr = s.scalar(select(RunPromptRow).where(RunPromptRow.run_id == run_id,
                                                     RunPromptRow.prompt_index == prompt_index))
            if pr is None:
                if s.get(RunRow, run_id) is None:
                    raise ProjectDataError(self.path, f"no run with id {run_id}", "start the run first")
                pr = RunPromptRow(run_id=run_id, prompt_index=prompt_index, prompt={})
                s.add(pr)
                s.execute(update(RunRow).where(RunRow.id == run_id)
                          .values(n_prompts=func.max(RunRow.n_prompts, prompt_index + 1)))
            pr.done, pr.prob, pr.seconds = True, None if prob is None else float(prob), \
                None if seconds is None else float(seconds)
            pr.completeness = None if completeness is None else jsonable(completeness)
            s.execute(delete(ScoreArrayRow).where(ScoreArrayRow.run_id == run_id,
                                                  ScoreArrayRow.prompt_index == prompt_index))
            for name, (shape, dtype, blob, crc, codec) in encoded.items():
                s.add(ScoreArrayRow(run_id=run_id, prompt_index=prompt_index, name=name, shape=shape,
                                    dtype=dtype, codec=codec, crc32=crc, nbytes=len(blob), data=blob))

    def finish_run(self, run_id: int, status: str = "done", error: str = "", elapsed_s: float | None = None) -> None:
        """Marks a run done / cancelled / failed. `elapsed_s` defaults to the time since start_run (this
        process) or the wall-clock difference."""
        if status not in ("done", "cancelled", "failed"):
            raise ProjectDataError(self.path, f"unknown final run status {status!r}",
                                   "use done, cancelled or failed")
        finished = now()
        with self._session(f"finishing run {run_id}", write=True) as s:
            row = s.get(RunRow, run_id)
            if row is None:
                raise ProjectDataError(self.path, f"no run with id {run_id}", "start the run first")
            start = self._clock.pop(run_id, None)
            if elapsed_s is None:
                elapsed_s = time.monotonic() - start if start is not None else (
                    datetime.fromisoformat(finished) - datetime.fromisoformat(row.started_at)).total_seconds()
            row.status, row.error, row.finished_at, row.elapsed_s = status, str(error or ""), finished, float(elapsed_s)

    def add_run_params(self, run_id: int, extra: dict) -> None:
        """Adds results decided after a run finished to its parameters (e.g. its subject control, which the app
        keeps in the same place), replacing keys of the same name."""
        with self._session(f"updating run {run_id}", write=True) as s:
            row = s.get(RunRow, run_id)
            if row is None:
                raise ProjectDataError(self.path, f"no run with id {run_id}", "list the runs to see their ids")
            row.params = {**(row.params or {}), **jsonable(extra)}

    @contextlib.contextmanager
    def recording_run(self, **start_kwargs) -> Iterator["RunRecorder"]:
        """`with project.recording_run(fact=..., prompts=..., params=..., model=...) as rec:` then
        `rec.add(i, prompt_scores)` per prompt. Ends `done`; `cancelled` on an exception whose class is named
        Cancelled/KeyboardInterrupt; `failed` (with the message) on any other exception, which propagates."""
        run_id = self.start_run(**start_kwargs)
        recorder = RunRecorder(self, run_id)
        try:
            yield recorder
        except BaseException as exc:
            cancelled = type(exc).__name__ in ("Cancelled", "KeyboardInterrupt")
            with contextlib.suppress(ProjectError):
                self.finish_run(run_id, "cancelled" if cancelled else "failed",
                                "" if cancelled else f"{type(exc).__name__}: {exc}")
            raise
        self.finish_run(run_id, "done")

    def _run_records(self, s: Session, where) -> list[RunRecord]:
        done = dict(s.execute(select(RunPromptRow.run_id, func.count()).where(RunPromptRow.done.is_(True))
                              .group_by(RunPromptRow.run_id)).all())
        out = []
        decode = JsonMemo()
        raw = [type_coerce(c, Text) for c in (RunRow.params, RunRow.library_versions, RunRow.info)]
        # columns, not ORM objects, and JSON decoded once per distinct text: listing 27,600 runs stays fast
        for (run_id, fact_id, model_id, method, params, versions, device, status, error, started, finished,
             elapsed, n_prompts, info) in s.execute(
                select(RunRow.id, RunRow.fact_id, RunRow.model_id, RunRow.method, raw[0], raw[1], RunRow.device,
                       RunRow.status, RunRow.error, RunRow.started_at, RunRow.finished_at, RunRow.elapsed_s,
                       RunRow.n_prompts, raw[2]).where(*where).order_by(RunRow.id)):
            shown = "interrupted" if (self.read_only and status == "running") else status
            out.append(RunRecord(run_id, fact_id, model_id, method, decode(params), decode(versions), device, shown,
                                 INTERRUPTED if shown != status else error, started, finished, elapsed, n_prompts,
                                 done.get(run_id, 0), decode(info)))
        return out

    def list_runs(self, fact=None, status: str | None = None) -> list[RunRecord]:
        """Runs (without prompts or arrays), oldest first; optionally of one fact (id) and/or one status."""
        with self._session("listing runs") as s:
            where = []
            if fact is not None:
                try:
                    where.append(RunRow.fact_id == self._fact_id(s, fact, create=False))
                except ProjectDataError:
                    return []
            if status is not None:
                where.append(RunRow.status == status)
            return self._run_records(s, where)

    def completed_runs(self, model, params) -> dict[int, int]:
        """{fact id: id of its latest run} over the runs that finished `done` with every prompt attributed, on
        weights with the same sha256 and dtype as `model` (a LoadedModel, dict or model id) and with exactly these
        `params` (a dict or an object with `to_dict()`). What a resumed fact-set attribution may skip; a model of
        unknown weights (no sha256) never matches. Reads only."""
        params = jsonable(params.to_dict() if hasattr(params, "to_dict") else (params or {}))
        with self._session("finding completed runs") as s:
            if isinstance(model, (int, np.integer)):
                row = s.get(ModelRow, int(model))
                if row is None:
                    return {}
                sha, dtype = row.sha256, row.dtype
            else:
                f = model_fields(model)
                sha, dtype = f["sha256"], f["dtype"]
            if not sha:
                return {}
            done = (select(func.count()).where(RunPromptRow.run_id == RunRow.id, RunPromptRow.done.is_(True))
                    .scalar_subquery())
            rows = s.execute(select(RunRow.fact_id, RunRow.id, RunRow.params)
                             .join(ModelRow, ModelRow.id == RunRow.model_id)
                             .where(ModelRow.sha256 == sha, ModelRow.dtype == dtype, RunRow.status == "done",
                                    RunRow.fact_id.is_not(None), RunRow.n_prompts > 0, done == RunRow.n_prompts)
                             .order_by(RunRow.id))
            return {fact_id: run_id for fact_id, run_id, stored in rows if stored == params}

    def get_run(self, run_id: int) -> RunRecord:
        """One run with its prompts (text, prob, completeness, which arrays are stored)."""
        with self._session("reading a run") as s:
            recs = self._run_records(s, [RunRow.id == run_id])
            if not recs:
                raise ProjectDataError(self.path, f"no run with id {run_id}", "list the runs to see their ids")
            names: dict[int, list[str]] = {}
            for idx, name in s.execute(select(ScoreArrayRow.prompt_index, ScoreArrayRow.name)
                                       .where(ScoreArrayRow.run_id == run_id).order_by(ScoreArrayRow.id)):
                names.setdefault(idx, []).append(name)
            prompts = tuple(PromptRecord(p.prompt_index, p.prompt, p.done, p.prob, p.completeness, p.seconds,
                                         tuple(names.get(p.prompt_index, ())))
                            for p in s.scalars(select(RunPromptRow).where(RunPromptRow.run_id == run_id)
                                               .order_by(RunPromptRow.prompt_index)))
            return dataclasses.replace(recs[0], prompts=prompts)

    def load_stored(self, run_id: int, prompt_index: int, name: str = "scores") -> np.ndarray | TopScores:
        """One array as stored: a numpy array, or a TopScores for scores saved in the "top" form."""
        with self._session("reading a score array") as s:
            row = s.execute(select(ScoreArrayRow.data, ScoreArrayRow.crc32, ScoreArrayRow.codec, ScoreArrayRow.shape)
                            .where(ScoreArrayRow.run_id == run_id, ScoreArrayRow.prompt_index == prompt_index,
                                   ScoreArrayRow.name == name)).first()
            if row is None:
                raise ProjectDataError(self.path, f"run {run_id} has no {name} for prompt {prompt_index}",
                                       "get_run() lists what each prompt holds")
            return self._decode(row, f"run {run_id} prompt {prompt_index} {name}")

    def load_array(self, run_id: int, prompt_index: int, name: str = "scores") -> np.ndarray:
        return self._dense_only(self.load_stored(run_id, prompt_index, name), run_id)

    def load_top_scores(self, run_id: int, name: str = "scores") -> dict[int, TopScores]:
        """{prompt_index: TopScores} for every prompt of the run with the named array, whatever its stored form
        (a full array is a TopScores keeping everything): what coarse/refined selection over stored runs reads
        (`topscores.refined_neurons(list(...values()), t, p, exclude)`)."""
        return {idx: a if isinstance(a, TopScores) else TopScores.keep_all(a)
                for idx, a in self._load_all(run_id, name).items()}

    def load_scores(self, run_id: int, name: str = "scores") -> dict[int, np.ndarray]:
        """{prompt_index: array} for every prompt of the run that has the named array (full arrays only)."""
        return {idx: self._dense_only(a, run_id) for idx, a in self._load_all(run_id, name).items()}

    def _load_all(self, run_id: int, name: str) -> dict[int, np.ndarray | TopScores]:
        with self._session("reading score arrays") as s:
            if s.get(RunRow, run_id) is None:
                raise ProjectDataError(self.path, f"no run with id {run_id}", "list the runs to see their ids")
            rows = s.execute(select(ScoreArrayRow.prompt_index, ScoreArrayRow.data, ScoreArrayRow.crc32,
                                    ScoreArrayRow.codec, ScoreArrayRow.shape)
                             .where(ScoreArrayRow.run_id == run_id, ScoreArrayRow.name == name)
                             .order_by(ScoreArrayRow.prompt_index)).all()
            return {idx: self._decode((data, crc, codec, shape), f"run {run_id} prompt {idx} {name}")
                    for idx, data, crc, codec, shape in rows}

    def _dense_only(self, array, run_id: int) -> np.ndarray:
        if isinstance(array, TopScores):
            raise ProjectDataError(self.path, f"run {run_id} stores only its top scores (>= {array.floor} x the "
                                   f"{array.guard + 1}th largest), not the full array",
                                   "read them with load_top_scores(), or re-run into a project storing full scores")
        return array

    def _decode(self, row, what: str) -> np.ndarray | TopScores:
        try:
            return decode_stored(*row)
        except ArrayCodecError as exc:
            raise CorruptProjectError(self.path, f"{what}: {exc}",
                                      "re-run that attribution, or restore the project from a backup copy") from exc

    def delete_run(self, run_id: int) -> None:
        """Deletes a run with its prompts and arrays (neuron sets keep their neurons and forget the run id)."""
        with self._session(f"deleting run {run_id}", write=True) as s:
            if s.get(RunRow, run_id) is None:
                raise ProjectDataError(self.path, f"no run with id {run_id}", "list the runs to see their ids")
            s.execute(delete(ScoreArrayRow).where(ScoreArrayRow.run_id == run_id))
            s.execute(delete(RunPromptRow).where(RunPromptRow.run_id == run_id))
            s.execute(delete(RunRow).where(RunRow.id == run_id))


def decode_stored(data: bytes, crc: int | None, codec: str, shape) -> np.ndarray | TopScores:
    """A stored array's bytes back to a numpy array or TopScores; ArrayCodecError when damaged."""
    if codec != TOP_CODEC:
        return decode_array(data, crc, codec)
    blob = bytes(data)
    if crc is not None and zlib.crc32(blob) != crc:
        raise ArrayCodecError("stored array fails its CRC-32 check")
    try:
        return decode_top(zlib.decompress(blob), shape)
    except Exception as exc:  # zlib.error, ValueError from a bad npy header or shape
        raise ArrayCodecError(f"stored top scores cannot be decoded ({exc})") from exc


class RunRecorder:
    def __init__(self, project: RunStore, run_id: int):
        self.project = project
        self.run_id = run_id

    def add(self, prompt_index: int, result=None, **kwargs) -> None:
        self.project.add_prompt_result(self.run_id, prompt_index, result, **kwargs)
