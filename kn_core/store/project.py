"""The `Project` facade: a project file's facts, attribution runs, score arrays, neuron sets, edit history and
evaluation reports behind methods that take and return plain Python data (dicts, lists, numpy arrays, the
records of `records.py`). The CLI and the GUI use only these; SQLite lives in `database.py`.

A run is committed as `running` before its first prompt and `done` after its last scores; a run found
`running` when the file is opened belonged to a process that died, and is marked `interrupted` (everything
committed before the crash stays).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Iterable

import numpy as np
from sqlalchemy import Text, delete, func, select, type_coerce, update
from sqlalchemy.orm import Session

from . import database, records, schema
from .codec import ArrayCodecError
from .errors import ProjectDataError, ProjectDiskFullError, ProjectError
from .records import (
    EvaluationRecord,
    FactRecord,
    HistoryCheck,
    JsonMemo,
    ModelRecord,
    NeuronSetRecord,
    RelationRecord,
    get_field,
    jsonable,
    model_fields,
    neuron_list,
    now,
)
from .runs import INTERRUPTED, RunStore, decode_stored
from .schema import (
    EditRow,
    EvaluationRow,
    FactRow,
    ModelRow,
    NeuronSetRow,
    ProjectRow,
    RelationRow,
    RunRow,
    ScoreArrayRow,
    Setting,
    TemplateRow,
)

EDIT_STATE_SETTING = "edit_history.state"


def create_project(path, name: str | None = None) -> "Project":
    """Creates a new, empty project file and opens it. Refuses to overwrite an existing file.

    The file is built under a temporary name in the same folder and renamed into place, so a failure (disk
    full, read-only folder) leaves nothing behind."""
    path = Path(path).expanduser()
    database.create_file(path, name)
    return open_project(path)


def open_project(path, read_only: bool = False, upgrade: bool = True) -> "Project":
    """Opens a project. Checks, in this order and before writing anything: the file exists and is a regular,
    untruncated SQLite file (a `-wal` left next to it is replayed first), it is a project, its schema is not
    newer than this app's, its tables read back, nobody else has it open, and (unless `read_only`) it can be
    written. An older schema is upgraded after a backup copy (`NAME.vN-backup-STAMP.knproj` next to it). Runs
    left `running` by a dead process become `interrupted` (the only write an open makes on its own; the file
    switches to WAL mode with the first save, and back to one self-contained file at close)."""
    path = Path(path).expanduser()
    db, running = database.open_database(path, read_only, upgrade)
    project = Project(db)
    if running and not read_only:
        try:
            project._mark_interrupted()
        except BaseException:
            project._db.abandon()
            raise
    return project


def recover_project(path) -> dict:
    """Finishes what a failed close left (ProjectCheckpointError): replays the project's `-wal`, copies it into
    the file (needs about the `-wal`'s size free on that drive), then runs the full integrity check read-only.
    Returns {file, wal_bytes (before), integrity: [problems] or ["ok"], counts}. On a file without a `-wal` it
    only checks. Raises ProjectDiskFullError before touching anything when the drive has less room than the
    `-wal`'s size, ProjectCheckpointError if the copy still fails; either way nothing is lost."""
    path = Path(path).expanduser()
    wal = database.wal_path(path)
    wal_bytes = wal.stat().st_size if wal.is_file() else 0
    free = shutil.disk_usage(path.resolve().parent).free if wal_bytes else 0
    if free < wal_bytes:  # the file grows by up to the WAL's size
        raise ProjectDiskFullError(path, f"recovering needs up to {wal_bytes / 1e6:.1f} MB free on its drive, "
                                         f"{free / 1e6:.1f} MB are; nothing is lost: every saved change is still "
                                         f"in {wal.name}",
                                   f"free space there (or copy both files to a drive with room) and run "
                                   f"`kn project recover {path}` again")
    with open_project(path):
        pass  # opening replays the WAL; closing copies it into the file
    with open_project(path, read_only=True) as project:
        problems = project.check_integrity()
        counts = project.counts()
    return {"file": str(path), "wal_bytes": wal_bytes, "integrity": problems or ["ok"], "counts": counts}


def open_or_create_project(path, name: str | None = None) -> "Project":
    """What `--project FILE` does: open the file if it exists, else create it."""
    path = Path(path).expanduser()
    return open_project(path) if path.exists() else create_project(path, name)


def check_project_file(path) -> None:
    """Raises the ProjectError that `open_or_create_project(path)` would raise at its checks (not a project,
    damaged, newer, read-only, open elsewhere), without writing anything: for checking `--project FILE` before
    the work whose results it is to hold. A missing file passes (it will be created)."""
    path = Path(path).expanduser()
    if path.exists():
        database.check_openable(path)


class Project(RunStore):
    """An open project. Use `create_project`, `open_project` or `open_or_create_project`; close it (or use
    `with`). Methods are safe to call from several threads (one lock), but keep writes on one thread."""

    def __init__(self, db: database.Database):
        self.path = db.path
        self.read_only = db.read_only
        self._db = db
        self._con = db.con
        self._clock: dict[int, float] = {}

    # -- lifecycle
    def close(self) -> None:
        self._db.close()

    @property
    def closed(self) -> bool:
        return self._db.closed

    def __enter__(self) -> "Project":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Project({str(self.path)!r}{', read-only' if self.read_only else ''}{', closed' if self.closed else ''})"

    def _session(self, doing: str, write: bool = False):
        return self._db.session(doing, write)

    def atomic(self, doing: str = "saving"):
        """`with project.atomic("storing a fact"):` every save inside commits together when the block ends, or
        none of them (an exception, a killed process): e.g. a run, its prompts' scores and its neuron set at once.
        Keep the block to writing: the project's lock is held until it ends."""
        return self._db.atomic(doing)

    def _mark_interrupted(self) -> None:
        with self._session("recovering interrupted runs", write=True) as s:
            s.execute(update(RunRow).where(RunRow.status == "running").values(status="interrupted",
                                                                              error=INTERRUPTED))

    # -- project level
    def at_its_path(self) -> bool:
        """False when the file was moved, replaced or deleted since it was opened for writing."""
        try:
            self._db.check_not_replaced("checking the file")
        except ProjectError:
            return False
        return True

    def info(self) -> dict:
        with self._session("reading the project") as s:
            p = s.get(ProjectRow, 1)
            migrated = [dict(version=m.version, applied_at=m.applied_at, app_version=m.app_version,
                             description=m.description)
                        for m in s.scalars(select(schema.SchemaMigration).order_by(schema.SchemaMigration.version))]
            return {"file": str(self.path), "name": p.name, "created_at": p.created_at, "modified_at": p.modified_at,
                    "app_version": p.app_version, "created_by": p.created_by, "schema_version": p.schema_version,
                    "notes": p.notes, "migrations": migrated,
                    "read_while_written": self._db.snapshot_folder is not None}  # its last commit, another writes

    def set_name(self, name: str, notes: str | None = None) -> None:
        with self._session("renaming the project", write=True) as s:
            values = {"name": name} if notes is None else {"name": name, "notes": notes}
            s.execute(update(ProjectRow).values(**values))

    def counts(self) -> dict:
        with self._session("counting") as s:
            def n(model, *where):
                return s.scalar(select(func.count()).select_from(model).where(*where))

            runs = dict(s.execute(select(RunRow.status, func.count()).group_by(RunRow.status)).all())
            if self.read_only and "running" in runs:  # we hold the lock: nobody is running them
                runs["interrupted"] = runs.get("interrupted", 0) + runs.pop("running")
            sets = dict(s.execute(select(NeuronSetRow.kind, func.count()).group_by(NeuronSetRow.kind)).all())
            return {
                "relations": n(RelationRow), "templates": n(TemplateRow), "facts": n(FactRow), "models": n(ModelRow),
                "runs": sum(runs.values()), "runs_by_status": runs,
                "score_arrays": n(ScoreArrayRow),
                "score_bytes": int(s.scalar(select(func.coalesce(func.sum(ScoreArrayRow.nbytes), 0)))),
                "neuron_sets": sum(sets.values()), "neuron_sets_by_kind": sets,
                "edits": n(EditRow), "edits_applied": n(EditRow, EditRow.applied.is_(True)),
                "evaluations": n(EvaluationRow),
            }

    def check_integrity(self) -> list[str]:
        """SQLite's full integrity check plus every stored array's checksum; [] when all is well (slow on big
        projects: it reads the whole file)."""
        problems = []
        with self._session("checking integrity") as s:
            rows = s.connection().exec_driver_sql("PRAGMA integrity_check").all()
            problems += [r[0] for r in rows if r[0] != "ok"]
            for rid, run_id, idx, name, crc, blob, codec, shape in s.execute(select(
                    ScoreArrayRow.id, ScoreArrayRow.run_id, ScoreArrayRow.prompt_index, ScoreArrayRow.name,
                    ScoreArrayRow.crc32, ScoreArrayRow.data, ScoreArrayRow.codec, ScoreArrayRow.shape)):
                try:
                    decode_stored(blob, crc, codec, shape)
                except ArrayCodecError as exc:
                    problems.append(f"run {run_id} prompt {idx} {name}: {exc}")
        return problems

    # -- settings (view state and the like)
    def get_setting(self, key: str, default=None):
        with self._session("reading a setting") as s:
            row = s.get(Setting, key)
            return default if row is None else row.value

    def settings(self) -> dict:
        """Every setting, key -> value (what a front end that rewrites the file must carry over)."""
        with self._session("reading the settings") as s:
            return {row.key: row.value for row in s.scalars(select(Setting))}

    def set_setting(self, key: str, value) -> None:
        with self._session("saving a setting", write=True) as s:
            s.merge(Setting(key=key, value=jsonable(value)))

    # -- models
    def _model_id(self, s: Session, model) -> int | None:
        if model is None:
            return None
        if isinstance(model, (int, np.integer)):
            if s.get(ModelRow, int(model)) is None:
                raise ProjectDataError(self.path, f"no model with id {model}", "add the model first")
            return int(model)
        f = model_fields(model)
        found = s.scalar(select(ModelRow.id).where(ModelRow.source == f["source"], ModelRow.sha256 == f["sha256"],
                                                   ModelRow.dtype == f["dtype"]))
        if found is not None:
            return found
        row = ModelRow(first_used=now(), **f)
        s.add(row)
        s.flush()
        return row.id

    def add_model(self, model) -> int:
        """A LoadedModel, or a dict with source, sha256, dtype (family, kind, layers, neurons optional).
        Returns its id (existing row when the same source, weights and dtype were seen before)."""
        with self._session("recording a model", write=True) as s:
            return self._model_id(s, model)

    def list_models(self) -> list[ModelRecord]:
        with self._session("listing models") as s:
            return [ModelRecord(r.id, r.source, r.sha256, r.dtype, r.family, r.kind, r.layers, r.neurons,
                                r.info, r.first_used) for r in s.scalars(select(ModelRow).order_by(ModelRow.id))]

    # -- relations and facts
    def _relation_id(self, s: Session, relation, create: bool = True) -> int:
        if isinstance(relation, (int, np.integer)):
            if s.get(RelationRow, int(relation)) is None:
                raise ProjectDataError(self.path, f"no relation with id {relation}", "add the relation first")
            return int(relation)
        key = relation if isinstance(relation, str) else get_field(relation, "id", "key")
        if not isinstance(key, str) or not key:
            raise ProjectDataError(self.path, f"cannot tell which relation {relation!r} is",
                                   "pass a Relation, a relation key like 'P36', or a relation id")
        found = s.scalar(select(RelationRow.id).where(RelationRow.key == key))
        if found is not None:
            return found
        if not create:
            raise ProjectDataError(self.path, f"no relation {key!r}", "add it first")
        name = "" if isinstance(relation, str) else str(get_field(relation, "name", default="") or "")
        row = RelationRow(key=key, name=name, info={})
        s.add(row)
        s.flush()
        templates = () if isinstance(relation, str) else (get_field(relation, "templates", default=()) or ())
        for i, t in enumerate(templates):
            s.add(TemplateRow(relation_id=row.id, position=i, text=str(t)))
        return row.id

    def add_relation(self, relation, name: str | None = None, templates: Iterable[str] | None = None,
                     info: dict | None = None) -> int:
        """Adds or updates a relation: a facts.Relation, a dict {id, name, templates}, or a key string with
        `name`/`templates`. Given templates replace the stored ones (in order). Returns its id."""
        key = relation if isinstance(relation, str) else get_field(relation, "id", "key")
        if name is None and not isinstance(relation, str):
            name = get_field(relation, "name")
        if templates is None and not isinstance(relation, str):
            templates = get_field(relation, "templates")
        with self._session("saving a relation", write=True) as s:
            rid = self._relation_id(s, str(key))
            row = s.get(RelationRow, rid)
            if name is not None:
                row.name = str(name)
            if info is not None:
                row.info = jsonable(info)
            if templates is not None:
                s.execute(delete(TemplateRow).where(TemplateRow.relation_id == rid))
                s.flush()
                for i, t in enumerate(templates):
                    s.add(TemplateRow(relation_id=rid, position=i, text=str(t)))
            return rid

    def _fact_id(self, s: Session, fact, relation=None, create: bool = True) -> int:
        if isinstance(fact, (int, np.integer)):
            if s.get(FactRow, int(fact)) is None:
                raise ProjectDataError(self.path, f"no fact with id {fact}", "add the fact first")
            return int(fact)
        rel = relation if relation is not None else get_field(fact, "relation")
        subject, obj = get_field(fact, "subject"), get_field(fact, "object")
        if rel is None or subject is None or obj is None:
            raise ProjectDataError(self.path, f"cannot tell which fact {fact!r} is",
                                   "pass a Fact, a dict {relation, subject, object}, or a fact id")
        rid = self._relation_id(s, rel, create=create)
        found = s.scalar(select(FactRow.id).where(FactRow.relation_id == rid, FactRow.subject == subject,
                                                  FactRow.object == obj))
        if found is not None:
            return found
        if not create:
            raise ProjectDataError(self.path, f"no fact {rel}: {subject!r} -> {obj!r}", "add it first")
        row = FactRow(relation_id=rid, subject=str(subject), object=str(obj), info=jsonable(get_field(fact, "info") or {}))
        s.add(row)
        s.flush()
        return row.id

    def add_fact(self, fact, relation=None) -> int:
        """A facts.Fact or dict {relation, subject, object}; an unknown relation key is created bare.
        Adding the same triple again returns the existing id."""
        with self._session("saving a fact", write=True) as s:
            return self._fact_id(s, fact, relation)

    def add_facts(self, facts: Iterable, relations: dict | Iterable | None = None) -> list[int]:
        """Many facts in one transaction (relations first, if given). Returns their ids in order."""
        with self._session("saving facts", write=True) as s:
            if relations:
                for rel in (relations.values() if isinstance(relations, dict) else relations):
                    self._relation_id(s, rel)
            rel_ids: dict = {}
            existing = {(r, subj, obj): i for i, r, subj, obj in
                        s.execute(select(FactRow.id, FactRow.relation_id, FactRow.subject, FactRow.object))}
            ids, new = [], []
            for fact in facts:
                rel = get_field(fact, "relation")
                key = rel if isinstance(rel, (str, int)) else get_field(rel, "id", "key")
                if key not in rel_ids:
                    rel_ids[key] = self._relation_id(s, rel)
                triple = (rel_ids[key], str(get_field(fact, "subject")), str(get_field(fact, "object")))
                if triple not in existing:
                    row = FactRow(relation_id=triple[0], subject=triple[1], object=triple[2],
                                  info=jsonable(get_field(fact, "info") or {}))
                    s.add(row)
                    new.append((triple, row))
                    existing[triple] = None
                ids.append(triple)
            s.flush()
            for triple, row in new:
                existing[triple] = row.id
            return [existing[t] for t in ids]

    def import_factset(self, factset) -> list[int]:
        """A facts.FactSet (relations with templates, then facts), in one transaction."""
        return self.add_facts(factset.facts, factset.relations)

    def list_relations(self) -> list[RelationRecord]:
        with self._session("listing relations") as s:
            templates: dict[int, list[str]] = {}
            for rid, text in s.execute(select(TemplateRow.relation_id, TemplateRow.text)
                                       .order_by(TemplateRow.relation_id, TemplateRow.position)):
                templates.setdefault(rid, []).append(text)
            return [RelationRecord(r.id, r.key, r.name, tuple(templates.get(r.id, ())), r.info)
                    for r in s.scalars(select(RelationRow).order_by(RelationRow.id))]

    def list_facts(self, relation=None) -> list[FactRecord]:
        with self._session("listing facts") as s:
            q = (select(FactRow.id, FactRow.relation_id, RelationRow.key, FactRow.subject, FactRow.object,
                        type_coerce(FactRow.info, Text))
                 .join(RelationRow, RelationRow.id == FactRow.relation_id).order_by(FactRow.id))
            if relation is not None:
                try:
                    q = q.where(FactRow.relation_id == self._relation_id(s, relation, create=False))
                except ProjectDataError:
                    return []
            decode = JsonMemo()
            return [FactRecord(*row[:5], decode(row[5])) for row in s.execute(q)]

    def get_fact(self, fact_id: int) -> FactRecord:
        with self._session("reading a fact") as s:
            row = s.execute(select(FactRow.id, FactRow.relation_id, RelationRow.key, FactRow.subject,
                                   FactRow.object, FactRow.info)
                            .join(RelationRow, RelationRow.id == FactRow.relation_id)
                            .where(FactRow.id == fact_id)).first()
            if row is None:
                raise ProjectDataError(self.path, f"no fact with id {fact_id}", "list the facts to see their ids")
            return FactRecord(*row)

    def find_fact(self, relation, subject: str, obj: str) -> int | None:
        with self._session("finding a fact") as s:
            rid = s.scalar(select(RelationRow.id).where(RelationRow.key == (
                relation if isinstance(relation, str) else get_field(relation, "id", "key"))))
            if rid is None:
                return None
            return s.scalar(select(FactRow.id).where(FactRow.relation_id == rid, FactRow.subject == subject,
                                                     FactRow.object == obj))

    # -- neuron sets
    def add_neuron_set(self, kind: str, neurons, params: dict | None = None, name: str = "", fact=None,
                       relation=None, run_ids: Iterable[int] = (), model=None, prompt_index: int | None = None,
                       note: str = "") -> int:
        """kind: coarse (one prompt), refined (one fact), relation (one relation) or user. `neurons`:
        [(layer, neuron), ...]; `params`: what made them (t, p, fraction, method, ...)."""
        if kind not in schema.NEURON_SET_KINDS:
            raise ProjectDataError(self.path, f"unknown neuron-set kind {kind!r}",
                                   f"use one of {', '.join(schema.NEURON_SET_KINDS)}")
        neurons = neuron_list(neurons)
        with self._session("saving a neuron set", write=True) as s:
            row = NeuronSetRow(name=name, kind=kind, neurons=neurons, n_neurons=len(neurons),
                               params=jsonable(params or {}),
                               fact_id=None if fact is None else self._fact_id(s, fact),
                               relation_id=None if relation is None else self._relation_id(s, relation),
                               model_id=self._model_id(s, model), run_ids=[int(r) for r in run_ids],
                               prompt_index=prompt_index, created_at=now(), note=note)
            s.add(row)
            s.flush()
            return row.id

    def _set_record(self, r: NeuronSetRow) -> NeuronSetRecord:
        return NeuronSetRecord(r.id, r.name, r.kind, tuple((int(a), int(b)) for a, b in r.neurons), r.params,
                               r.fact_id, r.relation_id, r.model_id, tuple(r.run_ids), r.prompt_index,
                               r.created_at, r.note)

    def list_neuron_sets(self, kind: str | None = None, fact=None, relation=None) -> list[NeuronSetRecord]:
        with self._session("listing neuron sets") as s:
            raw = [type_coerce(c, Text) for c in (NeuronSetRow.neurons, NeuronSetRow.params, NeuronSetRow.run_ids)]
            q = select(NeuronSetRow.id, NeuronSetRow.name, NeuronSetRow.kind, *raw, NeuronSetRow.fact_id,
                       NeuronSetRow.relation_id, NeuronSetRow.model_id, NeuronSetRow.prompt_index,
                       NeuronSetRow.created_at, NeuronSetRow.note).order_by(NeuronSetRow.id)
            if kind is not None:
                q = q.where(NeuronSetRow.kind == kind)
            try:
                if fact is not None:
                    q = q.where(NeuronSetRow.fact_id == self._fact_id(s, fact, create=False))
                if relation is not None:
                    q = q.where(NeuronSetRow.relation_id == self._relation_id(s, relation, create=False))
            except ProjectDataError:
                return []
            decode = JsonMemo()  # columns and memoized JSON, as list_runs: tens of thousands of sets stay fast
            return [NeuronSetRecord(set_id, name, kind_, tuple((int(a), int(b)) for a, b in json.loads(neurons)),
                                    decode(params), fact_id, relation_id, model_id, tuple(decode(run_ids) or ()),
                                    prompt_index, created, note)
                    for set_id, name, kind_, neurons, params, run_ids, fact_id, relation_id, model_id, prompt_index,
                    created, note in s.execute(q)]

    def get_neuron_set(self, set_id: int) -> NeuronSetRecord:
        with self._session("reading a neuron set") as s:
            row = s.get(NeuronSetRow, set_id)
            if row is None:
                raise ProjectDataError(self.path, f"no neuron set with id {set_id}", "list them to see their ids")
            return self._set_record(row)

    def delete_neuron_set(self, set_id: int) -> None:
        with self._session("deleting a neuron set", write=True) as s:
            s.execute(delete(NeuronSetRow).where(NeuronSetRow.id == set_id))

    # -- edit history
    def save_edit_history(self, state, model=None) -> None:
        """Replaces the stored history in one transaction. `state`: `EditStack.to_dict()` ({version, cursor,
        entries: [{edit: {kind, neurons, ...}, enabled}]}) or a plain list of edit dicts ({kind, neurons,
        params?, applied?}). `model`: the model the edits apply to (id, LoadedModel or dict), whose sha256
        must be the weights *before* any edit (LoadedModel.sha256 is taken at load time)."""
        extras, rows = records.edit_rows(state)
        stamp = now()
        with self._session("saving the edit history", write=True) as s:
            model_id = self._model_id(s, model)
            s.execute(delete(EditRow))
            s.flush()
            for pos, (edit, applied, enabled, extra) in enumerate(rows):
                kind = str(edit.pop("kind"))
                neurons = neuron_list(edit.pop("neurons", []))
                s.add(EditRow(position=pos, kind=kind, neurons=neurons, params=jsonable(edit), applied=applied,
                              enabled=enabled, model_id=model_id, extra=jsonable(extra), created_at=stamp))
            s.merge(Setting(key=EDIT_STATE_SETTING, value=jsonable(extras)))

    def list_edits(self) -> list[dict]:
        """The stored history as rows: position, kind, neurons, params, applied (done), enabled, model_id."""
        with self._session("reading the edit history") as s:
            return [{"position": r.position, "kind": r.kind, "neurons": r.neurons, "params": r.params,
                     "applied": r.applied, "enabled": r.enabled, "model_id": r.model_id, "extra": r.extra,
                     "created_at": r.created_at}
                    for r in s.scalars(select(EditRow).order_by(EditRow.position))]

    def load_edit_history(self) -> tuple[dict, str | None]:
        """(state, model_sha256): `state` has the shape of `EditStack.to_dict()` and round-trips what
        save_edit_history stored; model_sha256 is the un-edited weights' hash the edits were made on (None
        when no history). Feed `state` to `EditStack.load_dict` only if `edit_history_applies` says yes."""
        with self._session("reading the edit history") as s:
            rows = list(s.scalars(select(EditRow).order_by(EditRow.position)))
            saved = s.get(Setting, EDIT_STATE_SETTING)
            extras = dict((saved.value if saved is not None else None) or {})
            sha = None
            model_ids = {r.model_id for r in rows if r.model_id is not None}
            if model_ids:
                sha = s.get(ModelRow, min(model_ids)).sha256
        entries = []
        for r in rows:
            entry = {"edit": {"kind": r.kind, "neurons": r.neurons, **r.params}, "enabled": r.enabled, **r.extra}
            entries.append(entry)
        extras.pop("format", None)
        state = {**extras, "entries": entries}
        state["cursor"] = sum(1 for r in rows if r.applied)  # done entries are the ones below the cursor
        return state, sha

    def edit_history_applies(self, loaded_sha256: str | None) -> HistoryCheck:
        """Whether the saved edits may be re-applied to a model whose (un-edited) weights hash is
        `loaded_sha256`. Falsy result with `.reason` on a mismatch: tell the user, keep the history."""
        state, sha = self.load_edit_history()
        if not state["entries"]:
            return HistoryCheck(True, "no saved edits")
        if not sha:
            return HistoryCheck(False, "the saved edits do not record which model they were made on; they are "
                                       "kept but not applied")
        if loaded_sha256 != sha:
            return HistoryCheck(False, f"the saved edits were made on weights {sha[:12]}..., the loaded model's "
                                       f"weights are {str(loaded_sha256)[:12]}...; they are kept but not applied "
                                       f"(load that model to apply them)")
        return HistoryCheck(True, f"{len(state['entries'])} saved edit(s) match the loaded model")

    # -- evaluations
    def add_evaluation(self, kind: str, report, params: dict | None = None, model=None, name: str = "",
                       status: str = "done", started_at: str | None = None, elapsed_s: float | None = None,
                       library_versions: dict | None = None) -> int:
        """Stores one evaluation's report data (any JSON-able structure, e.g. the "Knowledge edits" report)."""
        with self._session("saving an evaluation", write=True) as s:
            row = EvaluationRow(kind=kind, name=name, model_id=self._model_id(s, model),
                                params=jsonable(params or {}), report=jsonable(report),
                                library_versions=library_versions or records.library_versions(), status=status,
                                started_at=started_at or now(), finished_at=now(), elapsed_s=elapsed_s)
            s.add(row)
            s.flush()
            return row.id

    def _eval_record(self, r: EvaluationRow) -> EvaluationRecord:
        return EvaluationRecord(r.id, r.kind, r.name, r.model_id, r.params, r.report, r.library_versions, r.status,
                                r.started_at, r.finished_at, r.elapsed_s)

    def list_evaluations(self, kind: str | None = None) -> list[EvaluationRecord]:
        with self._session("listing evaluations") as s:
            q = select(EvaluationRow).order_by(EvaluationRow.id)
            if kind is not None:
                q = q.where(EvaluationRow.kind == kind)
            return [self._eval_record(r) for r in s.scalars(q)]

    def get_evaluation(self, eval_id: int) -> EvaluationRecord:
        with self._session("reading an evaluation") as s:
            row = s.get(EvaluationRow, eval_id)
            if row is None:
                raise ProjectDataError(self.path, f"no evaluation with id {eval_id}", "list them to see their ids")
            return self._eval_record(row)
