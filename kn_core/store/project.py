"""A project file: one SQLite database holding facts, attribution runs, score arrays, neuron sets, the edit
history and evaluation reports. This module is the only code that talks to SQLite; the CLI and the GUI use the
`Project` methods, which take and return plain Python data (dicts, lists, numpy arrays, small dataclasses).

Durability: WAL journal, `synchronous=FULL`, foreign keys on, one transaction per logical change, and an
exclusive lock held while the project is open (a second process gets `ProjectLockedError`; the OS drops the
lock if the holder dies). A run is committed as `running` before its first prompt and `done` after its last
scores; a run found `running` when the file is opened belonged to a process that died, and is marked
`interrupted` (everything committed before the crash stays).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import importlib.metadata
import os
import platform
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator
from urllib.parse import quote

import numpy as np
from sqlalchemy import create_engine, delete, event, func, select, update
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import Session
from sqlalchemy.pool import StaticPool

from . import migrations, schema
from .codec import CODEC, ArrayCodecError, decode_array, encode_array
from .errors import (
    CorruptProjectError,
    NotAProjectError,
    ProjectClosedError,
    ProjectDataError,
    ProjectDiskFullError,
    ProjectError,
    ProjectExistsError,
    ProjectLockedError,
    ProjectNotFoundError,
    ProjectReadOnlyError,
    ProjectVersionError,
)
from .schema import (
    EditRow,
    EvaluationRow,
    FactRow,
    ModelRow,
    NeuronSetRow,
    ProjectRow,
    RelationRow,
    RunPromptRow,
    RunRow,
    ScoreArrayRow,
    Setting,
    TemplateRow,
)

SUFFIX = ".knproj"
_SQLITE_MAGIC = b"SQLite format 3\x00"
_BUSY_TIMEOUT_S = 0.1  # the holder keeps its lock while open, so waiting longer rarely helps
# FULL: a commit survives power loss (fsync per transaction). Tests that only crash processes may use NORMAL.
SYNCHRONOUS = "FULL"
_EDIT_STATE_KEY = "edit_history.state"
_INTERRUPTED = "the process stopped before this run finished (killed, crashed or powered off)"


def app_version() -> str:
    try:
        from kn_core import __version__

        return __version__
    except Exception:  # pragma: no cover
        return "unknown"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def library_versions() -> dict[str, str]:
    """Versions of the libraries a number depends on (read from package metadata; imports nothing)."""
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


def _get(obj, *names, default=None):
    for name in names:
        if isinstance(obj, dict):
            if name in obj:
                return obj[name]
        elif hasattr(obj, name):
            return getattr(obj, name)
    return default


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _jsonable(dataclasses.asdict(value))
    if hasattr(value, "to_dict"):
        return _jsonable(value.to_dict())
    return str(value)  # torch.dtype, torch.device, ...


def _neurons(neurons) -> list[list[int]]:
    out = []
    for n in neurons:
        layer, index = n
        out.append([int(layer), int(index)])
    return out


def _prompt_dict(prompt) -> dict:
    if isinstance(prompt, str):
        return {"text": prompt}
    if isinstance(prompt, dict):
        return _jsonable(prompt)
    out = {}
    for name in ("text", "answer", "answer_ids", "template", "kind"):
        if hasattr(prompt, name):
            out[name] = _jsonable(getattr(prompt, name))
    return out


def _model_fields(model) -> dict:
    if hasattr(model, "describe") and callable(model.describe):
        info = _jsonable(model.describe())
    elif isinstance(model, dict):
        info = _jsonable(model)
    else:
        info = {k: _jsonable(getattr(model, k)) for k in ("source", "sha256", "dtype", "family", "kind")
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


# ---------------------------------------------------------------------------------------------- low level


def _sqlite_code(exc: BaseException) -> int | None:
    orig = getattr(exc, "orig", exc)
    code = getattr(orig, "sqlite_errorcode", None)
    return None if code is None else code & 0xFF


def _map_sqlite_error(path, exc: BaseException, doing: str) -> ProjectError:
    code = _sqlite_code(exc)
    msg = str(getattr(exc, "orig", exc))
    if code == sqlite3.SQLITE_FULL or "disk is full" in msg:
        return ProjectDiskFullError(path, f"disk full while {doing}; that change was rolled back, the project "
                                          f"holds everything saved before it",
                                    "free space on that drive (or save the project elsewhere) and retry")
    if code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED) or "database is locked" in msg:
        return ProjectLockedError(path, "the project is open in another process (Knowledge Neuron Studio or "
                                        "another program has it locked)",
                                  "close it there, or work on a copy of the file")
    if code == sqlite3.SQLITE_READONLY:
        return ProjectReadOnlyError(path, f"cannot write while {doing}: the file or its folder is read-only",
                                    "copy the project to a writable folder, or open it read-only")
    if code == sqlite3.SQLITE_NOTADB:
        return NotAProjectError(path, "not a SQLite file (or its header is destroyed)",
                                "open a .knproj project file; a damaged project can be restored from a backup copy")
    if code == sqlite3.SQLITE_CORRUPT or "malformed" in msg:
        return CorruptProjectError(path, f"the file is damaged or truncated ({msg}) while {doing}",
                                   "restore it from a backup copy (the .vN-backup files next to it, or your own)")
    if code == sqlite3.SQLITE_CANTOPEN:
        return ProjectError(path, f"cannot open the file ({msg})", "check that the path and its folder exist and "
                                                                   "are accessible")
    if code == sqlite3.SQLITE_IOERR:
        return ProjectError(path, f"disk I/O error while {doing} ({msg}); the change was rolled back",
                            "check the drive (removed? network share gone?) and retry")
    return ProjectError(path, f"SQLite error while {doing}: {msg}", "report this if it persists")


def _connect(path: Path, read_only: bool) -> sqlite3.Connection:
    mode = "ro" if read_only else "rw"  # never "rwc": opening must not create a file
    uri = f"file:{quote(str(path.resolve()))}?mode={mode}"
    con = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False, timeout=_BUSY_TIMEOUT_S)
    if not read_only:
        # Before the first access: hold the file lock for the connection's life and keep WAL's index in memory
        # (no -shm file). SQLite cannot read a WAL file in this mode read-only, so readers use normal locking.
        con.execute("PRAGMA locking_mode = EXCLUSIVE")
    return con


def _header_check(path: Path) -> None:
    """Cheap checks on the raw file before SQLite sees it: exists, is SQLite, is not truncated."""
    if not path.exists():
        raise ProjectNotFoundError(path, "no such project file", "check the path, or create a new project")
    if path.is_dir():
        raise ProjectNotFoundError(path, "is a folder, not a project file", "pass the .knproj file inside it")
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            header = f.read(100)
    except PermissionError as exc:
        raise ProjectReadOnlyError(path, f"cannot read the file ({exc.strerror})",
                                   "check its permissions") from exc
    except OSError as exc:
        raise ProjectError(path, f"cannot read the file ({exc.strerror})", "check the drive and the path") from exc
    if size == 0 or not header.startswith(_SQLITE_MAGIC[:6]):
        raise NotAProjectError(path, "not a Knowledge Neuron Studio project (not a SQLite file)",
                               "open a .knproj file saved by the app")
    if not header.startswith(_SQLITE_MAGIC) or len(header) < 100:
        raise CorruptProjectError(path, "the SQLite header is damaged", "restore the project from a backup copy")
    page_size = int.from_bytes(header[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    pages = int.from_bytes(header[28:32], "big")
    counter_ok = header[24:28] == header[92:96]  # the in-header size is valid only when these match
    if page_size < 512 or page_size & (page_size - 1):
        raise CorruptProjectError(path, "the SQLite header is damaged (bad page size)",
                                  "restore the project from a backup copy")
    if counter_ok and pages and size < pages * page_size:
        raise CorruptProjectError(path, f"the file is truncated ({size} bytes; its header says "
                                        f"{pages * page_size})",
                                  "copy it again from where it came from, or restore a backup copy")


def _location_writable(path: Path) -> str | None:
    """None when the file and its folder can be written (WAL needs sidecar files next to it); else why not."""
    folder = path.resolve().parent
    try:
        if os.statvfs(folder).f_flag & os.ST_RDONLY:
            return "it is on a read-only file system"
    except (AttributeError, OSError):  # no statvfs on Windows
        pass
    if not os.access(path, os.W_OK):
        return "the file is read-only"
    if not os.access(folder, os.W_OK):
        return "its folder is read-only (the app writes a journal file next to the project)"
    return None


# ---------------------------------------------------------------------------------------------- open / create


def create_project(path, name: str | None = None) -> "Project":
    """Creates a new, empty project file and opens it. Refuses to overwrite an existing file.

    The file is built under a temporary name in the same folder and renamed into place, so a failure (disk
    full, read-only folder) leaves nothing behind."""
    path = Path(path).expanduser()
    if path.exists():
        raise ProjectExistsError(path, "a file with that name already exists",
                                 "open it, choose another name, or delete it first")
    folder = path.resolve().parent
    if not folder.is_dir():
        raise ProjectNotFoundError(path, "its folder does not exist", "create the folder first")
    reason = None
    try:
        if os.statvfs(folder).f_flag & os.ST_RDONLY:
            reason = "the folder is on a read-only file system"
    except (AttributeError, OSError):
        pass
    if reason is None and not os.access(folder, os.W_OK):
        reason = "the folder is read-only"
    if reason:
        raise ProjectReadOnlyError(path, f"cannot create the project: {reason}", "save it in a writable folder")
    tmp = folder / f".{path.name}.{os.getpid()}.creating"
    now = _now()
    try:
        con = sqlite3.connect(str(tmp), isolation_level=None)
        try:
            engine = create_engine("sqlite://", creator=lambda: con, poolclass=StaticPool)
            _install_begin(engine)
            with engine.begin() as conn:
                migrations.create_all(conn, app_version(), now)
                conn.execute(ProjectRow.__table__.insert().values(
                    id=1, name=name or path.stem, created_at=now, modified_at=now, app_version=app_version(),
                    created_by=app_version(), schema_version=schema.SCHEMA_VERSION, notes=""))
            engine.dispose()
        finally:
            con.close()
        if path.exists():
            raise ProjectExistsError(path, "a file with that name appeared while creating the project",
                                     "choose another name")
        os.replace(tmp, path)
    except ProjectError:
        tmp.unlink(missing_ok=True)
        raise
    except (sqlite3.Error, DBAPIError) as exc:
        tmp.unlink(missing_ok=True)
        raise _map_sqlite_error(path, exc, "creating the project") from exc
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.errno == errno.ENOSPC:
            raise ProjectDiskFullError(path, "disk full while creating the project", "free space and retry") from exc
        if exc.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
            raise ProjectReadOnlyError(path, f"cannot create the project ({exc.strerror})",
                                       "save it in a writable folder") from exc
        raise ProjectError(path, f"cannot create the project ({exc.strerror})", "check the path") from exc
    return open_project(path)


def open_project(path, read_only: bool = False, upgrade: bool = True) -> "Project":
    """Opens a project. Checks, in this order and before writing anything: the file exists and is an
    untruncated SQLite file, it is a project, its schema is not newer than this app's, nobody else has it open,
    and (unless `read_only`) it can be written. An older schema is upgraded after a backup copy
    (`NAME.vN-backup-STAMP.knproj` next to it). Runs left `running` by a dead process become `interrupted`."""
    path = Path(path).expanduser()
    _header_check(path)
    version = _validate(path)
    if not read_only:
        reason = _location_writable(path)
        if reason:
            raise ProjectReadOnlyError(path, f"cannot open for writing: {reason}",
                                       "copy the project to a writable folder, or open it read-only")
    if version < schema.SCHEMA_VERSION:
        if read_only or not upgrade:
            raise ProjectVersionError(path, f"written by an older version (project schema v{version}; this app "
                                            f"uses v{schema.SCHEMA_VERSION}) and must be upgraded",
                                      "open it once for writing to upgrade it (a backup copy is kept)")
        _upgrade(path, version)
    try:
        con = _connect(path, read_only)
    except sqlite3.Error as exc:
        raise _map_sqlite_error(path, exc, "opening the project") from exc
    try:
        con.execute("PRAGMA foreign_keys = ON")
        if not read_only:
            con.execute("PRAGMA journal_mode = WAL")
            con.execute(f"PRAGMA synchronous = {SYNCHRONOUS}")
            con.execute("BEGIN IMMEDIATE")  # takes (and, in exclusive mode, keeps) the write lock now
            con.execute("COMMIT")
        else:
            con.execute("SELECT count(*) FROM project").fetchone()  # takes the read lock now
    except sqlite3.Error as exc:
        con.close()
        raise _map_sqlite_error(path, exc, "opening the project") from exc
    project = Project(path, con, read_only)
    if not read_only:
        project._mark_interrupted()
    return project


def open_or_create_project(path, name: str | None = None) -> "Project":
    """What `--project FILE` does: open the file if it exists, else create it."""
    path = Path(path).expanduser()
    return open_project(path) if path.exists() else create_project(path, name)


def _validate(path: Path) -> int:
    """Read-only look at the file: is it ours, which schema version. Returns the version."""
    try:
        con = _connect(path, read_only=True)
    except sqlite3.Error as exc:
        raise _map_sqlite_error(path, exc, "opening the project") from exc
    try:
        app_id = con.execute("PRAGMA application_id").fetchone()[0]
        version = con.execute("PRAGMA user_version").fetchone()[0]
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if app_id != schema.APPLICATION_ID or "project" not in tables:
            raise NotAProjectError(path, "a SQLite database, but not a Knowledge Neuron Studio project",
                                   "open a .knproj file saved by the app (this file was left unchanged)")
        if version > schema.SCHEMA_VERSION:
            raise ProjectVersionError(path, f"written by a newer version of Knowledge Neuron Studio (project "
                                            f"schema v{version}; this app reads up to v{schema.SCHEMA_VERSION})",
                                      "update the app (pip install -U knowledge-neuron-studio); the file was "
                                      "left unchanged")
        if version < 1:
            raise CorruptProjectError(path, "the project has no schema version (its creation never finished)",
                                      "create the project again")
        con.execute("SELECT count(*) FROM project").fetchone()
        return version
    except sqlite3.Error as exc:
        raise _map_sqlite_error(path, exc, "reading the project") from exc
    finally:
        con.close()


def _upgrade(path: Path, version: int) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    backup = path.with_name(f"{path.stem}.v{version}-backup-{stamp}{path.suffix or SUFFIX}")
    try:
        con = _connect(path, read_only=False)
    except sqlite3.Error as exc:
        raise _map_sqlite_error(path, exc, "opening the project to upgrade it") from exc
    try:
        try:
            dst = sqlite3.connect(str(backup))
            try:
                con.backup(dst)
            finally:
                dst.close()
        except (sqlite3.Error, OSError) as exc:
            backup.unlink(missing_ok=True)
            raise ProjectError(path, f"could not write the backup copy {backup.name} before upgrading ({exc})",
                               "free space in that folder and open the project again") from exc
        engine = create_engine("sqlite://", creator=lambda: con, poolclass=StaticPool)
        _install_begin(engine)
        try:
            with engine.begin() as conn:
                migrations.upgrade(conn, version, app_version(), _now())
        except ProjectError:
            raise
        except Exception as exc:
            mapped = _map_sqlite_error(path, exc, f"upgrading from schema v{version}") \
                if isinstance(exc, (sqlite3.Error, DBAPIError)) else \
                ProjectError(path, f"upgrade from schema v{version} failed ({exc}); the file was left as it was",
                             f"report this; the backup copy is {backup.name}")
            raise mapped from exc
        finally:
            engine.dispose()
    finally:
        con.close()
    return backup


def _install_begin(engine) -> None:
    # pysqlite's own transaction handling starts transactions late and not for DDL; take control so that a
    # SQLAlchemy transaction is exactly one SQLite transaction (SQLAlchemy's documented recipe).
    @event.listens_for(engine, "begin")
    def _begin(conn):  # pragma: no cover - trivial
        conn.exec_driver_sql("BEGIN")


# ---------------------------------------------------------------------------------------------- the project


class Project:
    """An open project. Use `create_project`, `open_project` or `open_or_create_project`; close it (or use
    `with`). Methods are safe to call from several threads (one lock), but keep writes on one thread."""

    def __init__(self, path: Path, con: sqlite3.Connection, read_only: bool):
        self.path = path
        self.read_only = read_only
        self._con = con
        self._lock = threading.RLock()
        self._engine = create_engine("sqlite://", creator=lambda: con, poolclass=StaticPool)
        _install_begin(self._engine)
        self._closed = False
        self._clock: dict[int, float] = {}

    # -- lifecycle
    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            single_file = False
            try:
                if not self.read_only:
                    # Checkpoint the WAL into the file and leave it in rollback-journal mode: a closed project
                    # is one self-contained file (safe to copy; readable from read-only media).
                    mode = self._con.execute("PRAGMA journal_mode = DELETE").fetchone()
                    single_file = bool(mode) and str(mode[0]).lower() == "delete"
                self._engine.dispose()
                self._con.close()
            except sqlite3.Error:  # pragma: no cover - the WAL stays and is replayed on the next open
                with contextlib.suppress(sqlite3.Error):
                    self._con.close()
            if single_file:  # a reader in normal locking mode may have left an index file; nobody needs it now
                with contextlib.suppress(OSError):
                    Path(str(self.path) + "-shm").unlink(missing_ok=True)

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> "Project":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Project({str(self.path)!r}{', read-only' if self.read_only else ''}{', closed' if self._closed else ''})"

    @contextlib.contextmanager
    def _session(self, doing: str, write: bool = False) -> Iterator[Session]:
        if self._closed:
            raise ProjectClosedError(self.path, "the project was closed", "open it again")
        if write and self.read_only:
            raise ProjectReadOnlyError(self.path, f"opened read-only, cannot save while {doing}",
                                       "open it for writing")
        with self._lock:
            try:
                with Session(self._engine, expire_on_commit=False) as session, session.begin():
                    yield session
                    if write:
                        session.execute(update(ProjectRow).values(modified_at=_now(), app_version=app_version()))
            except IntegrityError as exc:
                raise ProjectDataError(self.path, f"rejected while {doing}: {exc.orig}",
                                       "check the ids and values passed") from exc
            except DBAPIError as exc:
                raise _map_sqlite_error(self.path, exc, doing) from exc

    def _mark_interrupted(self) -> None:
        with self._session("recovering interrupted runs", write=True) as s:
            s.execute(update(RunRow).where(RunRow.status == "running").values(status="interrupted",
                                                                              error=_INTERRUPTED))

    # -- project level
    def info(self) -> dict:
        with self._session("reading the project") as s:
            p = s.get(ProjectRow, 1)
            migrated = [dict(version=m.version, applied_at=m.applied_at, app_version=m.app_version,
                             description=m.description)
                        for m in s.scalars(select(schema.SchemaMigration).order_by(schema.SchemaMigration.version))]
            return {"file": str(self.path), "name": p.name, "created_at": p.created_at, "modified_at": p.modified_at,
                    "app_version": p.app_version, "created_by": p.created_by, "schema_version": p.schema_version,
                    "notes": p.notes, "migrations": migrated}

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
            for rid, run_id, idx, name, crc, blob, codec in s.execute(select(
                    ScoreArrayRow.id, ScoreArrayRow.run_id, ScoreArrayRow.prompt_index, ScoreArrayRow.name,
                    ScoreArrayRow.crc32, ScoreArrayRow.data, ScoreArrayRow.codec)):
                try:
                    decode_array(blob, crc, codec)
                except ArrayCodecError as exc:
                    problems.append(f"run {run_id} prompt {idx} {name}: {exc}")
        return problems

    # -- settings (view state and the like)
    def get_setting(self, key: str, default=None):
        with self._session("reading a setting") as s:
            row = s.get(Setting, key)
            return default if row is None else row.value

    def set_setting(self, key: str, value) -> None:
        with self._session("saving a setting", write=True) as s:
            s.merge(Setting(key=key, value=_jsonable(value)))

    # -- models
    def _model_id(self, s: Session, model) -> int | None:
        if model is None:
            return None
        if isinstance(model, (int, np.integer)):
            if s.get(ModelRow, int(model)) is None:
                raise ProjectDataError(self.path, f"no model with id {model}", "add the model first")
            return int(model)
        f = _model_fields(model)
        found = s.scalar(select(ModelRow.id).where(ModelRow.source == f["source"], ModelRow.sha256 == f["sha256"],
                                                   ModelRow.dtype == f["dtype"]))
        if found is not None:
            return found
        row = ModelRow(first_used=_now(), **f)
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
        key = relation if isinstance(relation, str) else _get(relation, "id", "key")
        if not isinstance(key, str) or not key:
            raise ProjectDataError(self.path, f"cannot tell which relation {relation!r} is",
                                   "pass a Relation, a relation key like 'P36', or a relation id")
        found = s.scalar(select(RelationRow.id).where(RelationRow.key == key))
        if found is not None:
            return found
        if not create:
            raise ProjectDataError(self.path, f"no relation {key!r}", "add it first")
        name = "" if isinstance(relation, str) else str(_get(relation, "name", default="") or "")
        row = RelationRow(key=key, name=name, info={})
        s.add(row)
        s.flush()
        templates = () if isinstance(relation, str) else (_get(relation, "templates", default=()) or ())
        for i, t in enumerate(templates):
            s.add(TemplateRow(relation_id=row.id, position=i, text=str(t)))
        return row.id

    def add_relation(self, relation, name: str | None = None, templates: Iterable[str] | None = None,
                     info: dict | None = None) -> int:
        """Adds or updates a relation: a facts.Relation, a dict {id, name, templates}, or a key string with
        `name`/`templates`. Given templates replace the stored ones (in order). Returns its id."""
        key = relation if isinstance(relation, str) else _get(relation, "id", "key")
        if name is None and not isinstance(relation, str):
            name = _get(relation, "name")
        if templates is None and not isinstance(relation, str):
            templates = _get(relation, "templates")
        with self._session("saving a relation", write=True) as s:
            rid = self._relation_id(s, str(key))
            row = s.get(RelationRow, rid)
            if name is not None:
                row.name = str(name)
            if info is not None:
                row.info = _jsonable(info)
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
        rel = relation if relation is not None else _get(fact, "relation")
        subject, obj = _get(fact, "subject"), _get(fact, "object")
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
        row = FactRow(relation_id=rid, subject=str(subject), object=str(obj), info=_jsonable(_get(fact, "info") or {}))
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
                rel = _get(fact, "relation")
                key = rel if isinstance(rel, (str, int)) else _get(rel, "id", "key")
                if key not in rel_ids:
                    rel_ids[key] = self._relation_id(s, rel)
                triple = (rel_ids[key], str(_get(fact, "subject")), str(_get(fact, "object")))
                if triple not in existing:
                    row = FactRow(relation_id=triple[0], subject=triple[1], object=triple[2],
                                  info=_jsonable(_get(fact, "info") or {}))
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
                        FactRow.info).join(RelationRow, RelationRow.id == FactRow.relation_id).order_by(FactRow.id))
            if relation is not None:
                try:
                    q = q.where(FactRow.relation_id == self._relation_id(s, relation, create=False))
                except ProjectDataError:
                    return []
            return [FactRecord(*row) for row in s.execute(q)]

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
                relation if isinstance(relation, str) else _get(relation, "id", "key"))))
            if rid is None:
                return None
            return s.scalar(select(FactRow.id).where(FactRow.relation_id == rid, FactRow.subject == subject,
                                                     FactRow.object == obj))

    # -- attribution runs
    def start_run(self, fact=None, prompts: Iterable = (), params: dict | Any = None, model=None,
                  method: str | None = None, device: str = "", relation=None,
                  library_versions: dict | None = None, info: dict | None = None) -> int:
        """Commits a new run with status `running` (before any computation) and its prompts. `fact`: a fact
        id, Fact or dict; `prompts`: facts.Prompt objects, dicts or strings; `params`: a dict or an object with
        `to_dict()` (AttributionParams); `model`: a model id, LoadedModel or dict. Returns the run id."""
        params = _jsonable(params.to_dict() if hasattr(params, "to_dict") else (params or {}))
        prompts = [_prompt_dict(p) for p in prompts]
        if not device and model is not None and not isinstance(model, (int, dict)) and hasattr(model, "device"):
            device = str(model.device)
        with self._session("starting a run", write=True) as s:
            row = RunRow(fact_id=None if fact is None else self._fact_id(s, fact, relation),
                         model_id=self._model_id(s, model), method=method or str(params.get("method", "ig")),
                         params=params, library_versions=library_versions or library_versions_default(),
                         device=str(device), status="running", error="", started_at=_now(),
                         n_prompts=len(prompts), info=_jsonable(info or {}))
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
        as compressed .npy bytes (`float16=True` halves them, lossy). Re-adding a prompt replaces it."""
        if result is not None:
            scores = scores if scores is not None else _get(result, "scores")
            activations = activations if activations is not None else _get(result, "activations")
            prob = prob if prob is not None else _get(result, "prob")
            completeness = completeness if completeness is not None else _get(result, "completeness")
            seconds = seconds if seconds is not None else _get(result, "seconds")
        if scores is None:
            raise ProjectDataError(self.path, "a prompt result needs its scores array", "pass scores=")
        arrays = {"scores": scores}
        if activations is not None:
            arrays["activations"] = activations
        arrays.update(extra_arrays or {})
        encoded = {}
        for name, arr in arrays.items():
            arr = _to_numpy(arr)
            blob, crc = encode_array(arr, float16=float16)
            encoded[name] = (list(arr.shape), str(np.float16 if float16 and arr.dtype.kind == "f" else arr.dtype),
                             blob, crc)
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
            pr.completeness = None if completeness is None else _jsonable(completeness)
            s.execute(delete(ScoreArrayRow).where(ScoreArrayRow.run_id == run_id,
                                                  ScoreArrayRow.prompt_index == prompt_index))
            for name, (shape, dtype, blob, crc) in encoded.items():
                s.add(ScoreArrayRow(run_id=run_id, prompt_index=prompt_index, name=name, shape=shape,
                                    dtype=dtype, codec=CODEC, crc32=crc, nbytes=len(blob), data=blob))

    def finish_run(self, run_id: int, status: str = "done", error: str = "", elapsed_s: float | None = None) -> None:
        """Marks a run done / cancelled / failed. `elapsed_s` defaults to the time since start_run (this
        process) or the wall-clock difference."""
        if status not in ("done", "cancelled", "failed"):
            raise ProjectDataError(self.path, f"unknown final run status {status!r}",
                                   "use done, cancelled or failed")
        finished = _now()
        with self._session(f"finishing run {run_id}", write=True) as s:
            row = s.get(RunRow, run_id)
            if row is None:
                raise ProjectDataError(self.path, f"no run with id {run_id}", "start the run first")
            if elapsed_s is None:
                start = self._clock.pop(run_id, None)
                elapsed_s = time.monotonic() - start if start is not None else (
                    datetime.fromisoformat(finished) - datetime.fromisoformat(row.started_at)).total_seconds()
            row.status, row.error, row.finished_at, row.elapsed_s = status, str(error or ""), finished, float(elapsed_s)

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
        for r in s.scalars(select(RunRow).where(*where).order_by(RunRow.id)):
            status = "interrupted" if (self.read_only and r.status == "running") else r.status
            error = _INTERRUPTED if status != r.status else r.error
            out.append(RunRecord(r.id, r.fact_id, r.model_id, r.method, r.params, r.library_versions, r.device,
                                 status, error, r.started_at, r.finished_at, r.elapsed_s, r.n_prompts,
                                 done.get(r.id, 0), r.info))
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

    def load_array(self, run_id: int, prompt_index: int, name: str = "scores") -> np.ndarray:
        with self._session("reading a score array") as s:
            row = s.execute(select(ScoreArrayRow.data, ScoreArrayRow.crc32, ScoreArrayRow.codec)
                            .where(ScoreArrayRow.run_id == run_id, ScoreArrayRow.prompt_index == prompt_index,
                                   ScoreArrayRow.name == name)).first()
            if row is None:
                raise ProjectDataError(self.path, f"run {run_id} has no {name} for prompt {prompt_index}",
                                       "get_run() lists what each prompt holds")
            return self._decode(row, f"run {run_id} prompt {prompt_index} {name}")

    def load_scores(self, run_id: int, name: str = "scores") -> dict[int, np.ndarray]:
        """{prompt_index: array} for every prompt of the run that has the named array."""
        with self._session("reading score arrays") as s:
            if s.get(RunRow, run_id) is None:
                raise ProjectDataError(self.path, f"no run with id {run_id}", "list the runs to see their ids")
            rows = s.execute(select(ScoreArrayRow.prompt_index, ScoreArrayRow.data, ScoreArrayRow.crc32,
                                    ScoreArrayRow.codec)
                             .where(ScoreArrayRow.run_id == run_id, ScoreArrayRow.name == name)
                             .order_by(ScoreArrayRow.prompt_index)).all()
            return {idx: self._decode((data, crc, codec), f"run {run_id} prompt {idx} {name}")
                    for idx, data, crc, codec in rows}

    def _decode(self, row, what: str) -> np.ndarray:
        try:
            return decode_array(*row)
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

    # -- neuron sets
    def add_neuron_set(self, kind: str, neurons, params: dict | None = None, name: str = "", fact=None,
                       relation=None, run_ids: Iterable[int] = (), model=None, prompt_index: int | None = None,
                       note: str = "") -> int:
        """kind: coarse (one prompt), refined (one fact), relation (one relation) or user. `neurons`:
        [(layer, neuron), ...]; `params`: what made them (t, p, fraction, method, ...)."""
        if kind not in schema.NEURON_SET_KINDS:
            raise ProjectDataError(self.path, f"unknown neuron-set kind {kind!r}",
                                   f"use one of {', '.join(schema.NEURON_SET_KINDS)}")
        neurons = _neurons(neurons)
        with self._session("saving a neuron set", write=True) as s:
            row = NeuronSetRow(name=name, kind=kind, neurons=neurons, n_neurons=len(neurons),
                               params=_jsonable(params or {}),
                               fact_id=None if fact is None else self._fact_id(s, fact),
                               relation_id=None if relation is None else self._relation_id(s, relation),
                               model_id=self._model_id(s, model), run_ids=[int(r) for r in run_ids],
                               prompt_index=prompt_index, created_at=_now(), note=note)
            s.add(row)
            s.flush()
            return row.id

    def _set_record(self, r: NeuronSetRow) -> NeuronSetRecord:
        return NeuronSetRecord(r.id, r.name, r.kind, tuple((int(a), int(b)) for a, b in r.neurons), r.params,
                               r.fact_id, r.relation_id, r.model_id, tuple(r.run_ids), r.prompt_index,
                               r.created_at, r.note)

    def list_neuron_sets(self, kind: str | None = None, fact=None, relation=None) -> list[NeuronSetRecord]:
        with self._session("listing neuron sets") as s:
            q = select(NeuronSetRow).order_by(NeuronSetRow.id)
            if kind is not None:
                q = q.where(NeuronSetRow.kind == kind)
            try:
                if fact is not None:
                    q = q.where(NeuronSetRow.fact_id == self._fact_id(s, fact, create=False))
                if relation is not None:
                    q = q.where(NeuronSetRow.relation_id == self._relation_id(s, relation, create=False))
            except ProjectDataError:
                return []
            return [self._set_record(r) for r in s.scalars(q)]

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
        if isinstance(state, dict):
            entries = list(state.get("entries", []))
            cursor = int(state.get("cursor", len(entries)))
            extras = {k: v for k, v in state.items() if k != "entries"}
            rows = []
            for i, e in enumerate(entries):
                edit = dict(e.get("edit", e))
                rows.append((edit, i < cursor, bool(e.get("enabled", True)),
                             {k: v for k, v in e.items() if k not in ("edit", "enabled")}))
        else:
            extras = {"format": "list"}
            rows = []
            for e in state:
                edit = dict(e)
                applied = bool(edit.pop("applied", True))
                enabled = bool(edit.pop("enabled", True))
                params = edit.pop("params", None)
                if params:
                    edit.update(params)
                rows.append((edit, applied, enabled, {}))
        now = _now()
        with self._session("saving the edit history", write=True) as s:
            model_id = self._model_id(s, model)
            s.execute(delete(EditRow))
            s.flush()
            for pos, (edit, applied, enabled, extra) in enumerate(rows):
                kind = str(edit.pop("kind"))
                neurons = _neurons(edit.pop("neurons", []))
                s.add(EditRow(position=pos, kind=kind, neurons=neurons, params=_jsonable(edit), applied=applied,
                              enabled=enabled, model_id=model_id, extra=_jsonable(extra), created_at=now))
            s.merge(Setting(key=_EDIT_STATE_KEY, value=_jsonable(extras)))

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
            saved = s.get(Setting, _EDIT_STATE_KEY)
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
                                params=_jsonable(params or {}), report=_jsonable(report),
                                library_versions=library_versions or library_versions_default(), status=status,
                                started_at=started_at or _now(), finished_at=_now(), elapsed_s=elapsed_s)
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


library_versions_default = library_versions


class RunRecorder:
    def __init__(self, project: Project, run_id: int):
        self.project = project
        self.run_id = run_id

    def add(self, prompt_index: int, result=None, **kwargs) -> None:
        self.project.add_prompt_result(self.run_id, prompt_index, result, **kwargs)


def _to_numpy(arr) -> np.ndarray:
    if isinstance(arr, np.ndarray):
        return arr
    if hasattr(arr, "detach"):  # torch tensor, without importing torch
        return arr.detach().cpu().numpy()
    return np.asarray(arr)


# Module-level spellings of the edit-history helpers (the brief's names).
def load_edit_history(project: Project) -> tuple[dict, str | None]:
    return project.load_edit_history()


def edit_history_applies(project: Project, loaded_sha256: str | None) -> HistoryCheck:
    return project.edit_history_applies(loaded_sha256)
