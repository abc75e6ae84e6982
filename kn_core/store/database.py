"""SQLite under the project store: connecting (pragmas, the exclusive lock), checking a file before SQLite reads
it, mapping SQLite's errors to one-line `ProjectError`s, creating, validating and upgrading files, and `Database`,
one open connection with its SQLAlchemy sessions (one session = one SQLite transaction).

Durability: WAL journal, `synchronous=FULL`, foreign keys on, one transaction per logical change, and an
exclusive lock held while the project is open (a second process gets `ProjectLockedError`; the OS drops the
lock if the holder dies).
"""

from __future__ import annotations

import contextlib
import errno
import os
import sqlite3
import threading
from datetime import datetime
from pathlib import Path
from typing import Iterator
from urllib.parse import quote

from sqlalchemy import create_engine, event, update
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import Session
from sqlalchemy.pool import StaticPool

from . import migrations, schema
from .errors import (
    CorruptProjectError,
    NotAProjectError,
    ProjectCheckpointError,
    ProjectClosedError,
    ProjectDataError,
    ProjectDiskFullError,
    ProjectError,
    ProjectExistsError,
    ProjectLockedError,
    ProjectNotFoundError,
    ProjectReadOnlyError,
    ProjectReplacedError,
    ProjectVersionError,
)
from .filecheck import _locked, header_check, location_writable, map_sqlite_error, wal_path  # noqa: F401 - wal_path
from .records import app_version, now

SUFFIX = ".knproj"
_BUSY_TIMEOUT_S = 0.1  # the holder keeps its lock while open, so waiting longer rarely helps
# FULL: a commit survives power loss (fsync per transaction). Tests that only crash processes may use NORMAL.
SYNCHRONOUS = "FULL"


def connect(path: Path, read_only: bool) -> sqlite3.Connection:
    mode = "ro" if read_only else "rw"  # never "rwc": opening must not create a file
    uri = f"file:{quote(str(path.resolve()))}?mode={mode}"
    con = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False, timeout=_BUSY_TIMEOUT_S)
    if not read_only:
        # Before the first access: hold the file lock for the connection's life and keep WAL's index in memory
        # (no -shm file). SQLite cannot read a WAL file in this mode read-only, so readers use normal locking.
        con.execute("PRAGMA locking_mode = EXCLUSIVE")
    return con


def create_file(path: Path, name: str | None = None) -> None:
    """Creates a new, empty project file (closed). Refuses to overwrite an existing file.

    The file is built under a temporary name in the same folder and renamed into place, so a failure (disk
    full, read-only folder) leaves nothing behind."""
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
    stamp = now()
    try:
        con = sqlite3.connect(str(tmp), isolation_level=None)
        try:
            engine = create_engine("sqlite://", creator=lambda: con, poolclass=StaticPool)
            install_begin(engine)
            with engine.begin() as conn:
                migrations.create_all(conn, app_version(), stamp)
                conn.execute(schema.ProjectRow.__table__.insert().values(
                    id=1, name=name or path.stem, created_at=stamp, modified_at=stamp, app_version=app_version(),
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
        raise map_sqlite_error(path, exc, "creating the project") from exc
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.errno == errno.ENOSPC:
            raise ProjectDiskFullError(path, "disk full while creating the project", "free space and retry") from exc
        if exc.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
            raise ProjectReadOnlyError(path, f"cannot create the project ({exc.strerror})",
                                       "save it in a writable folder") from exc
        raise ProjectError(path, f"cannot create the project ({exc.strerror})", "check the path") from exc


def _flock(path: Path, exclusive: bool) -> int | None:
    """An advisory lock (flock) on the project file: a writer holds it exclusively while the project is open.
    SQLite's own exclusive lock comes only with the first write (taking it sooner means switching the file to
    WAL, a write), so this is what keeps a second writer or a reader out of a project opened for writing.
    Returns the descriptor holding it, or None where flock does not exist (Windows) or the file system has none;
    then the writer takes SQLite's lock at open by switching to WAL, as before."""
    try:
        import fcntl
    except ImportError:
        return None
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise _locked(path) from None
    except OSError:
        os.close(fd)
        return None
    return fd


def _identity(path: Path, fd: int | None) -> tuple[int, int] | None:
    """(device, inode) of the open file (`fd`) or of what `path` names now."""
    st = os.fstat(fd) if fd is not None else os.stat(path)
    return st.st_dev, st.st_ino


def open_database(path: Path, read_only: bool = False, upgrade: bool = True) -> tuple[Database, int]:
    """(the open Database, how many runs were left `running`) for a checked project file (see `open_project`).

    Nothing is written before every check has passed: the header checks, the project table read back and, when
    runs were left `running` (to be marked interrupted), SQLite's quick check of the two tables written then.
    Opening itself writes nothing else: an older schema is upgraded (after a backup copy), and the file is
    switched to WAL by the first save (or at open, where flock is missing or a WAL is already there)."""
    header_check(path)
    lock_fd = None
    try:
        if read_only:  # readers do not keep writers out; with a writer at work they read its last commit
            try:
                fd = _flock(path, exclusive=False)
            except ProjectLockedError:
                return _open_snapshot(path), 0
            if fd is not None:
                os.close(fd)
        else:
            lock_fd = _flock(path, exclusive=True)
        _settle_journal(path, read_only)
        con, running, wal = _connect_checked(path, read_only, upgrade, eager_wal=lock_fd is None)
    except BaseException:
        if lock_fd is not None:
            os.close(lock_fd)
        raise
    return Database(path, con, read_only, lock_fd, wal), running


def check_openable(path: Path) -> None:
    """The checks `open_database(path)` makes before it writes, run without writing or keeping anything open,
    so that `--project FILE` fails before hours of work rather than when the results are to be saved. The open
    itself checks again (the file may change in between)."""
    header_check(path)
    lock_fd = _flock(path, exclusive=True)
    try:
        _settle_journal(path, read_only=False)
        _validate(path)
        _refuse_unwritable(path)
    finally:
        if lock_fd is not None:
            os.close(lock_fd)


_SNAPSHOT_TRIES = 20


def _open_snapshot(path: Path) -> "Database":
    """A read-only view of what a running writer (which holds SQLite's exclusive lock, WAL index in its own
    memory) has committed: the file and its journal files copied to a private folder, the copy's WAL replayed
    there, and the copy opened read-only. Consistent: the WAL's header (salts) is read before and after the
    copy, and the copy is taken again if the writer restarted its WAL in between; frames of a transaction not
    yet committed fail SQLite's checksums and are ignored; a hot rollback journal is rolled back in the copy."""
    import shutil
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="kn-snapshot-"))
    copy = folder / path.name
    try:
        for _ in range(_SNAPSHOT_TRIES):
            before = _wal_header(path)
            for suffix in ("", "-journal", "-wal"):
                source = path.with_name(path.name + suffix)
                with contextlib.suppress(FileNotFoundError):
                    shutil.copyfile(source, folder / source.name)
            if _wal_header(folder / path.name) == before == _wal_header(path):
                break
        else:
            raise _locked(path)  # a writer restarting its WAL all the time: give up, as before
        _settle_journal(copy, read_only=False)
        con = connect(copy, read_only=False)
        try:  # fold the copied WAL into the copy: one self-contained file, then opened read-only
            con.execute("PRAGMA journal_mode = DELETE").fetchone()
        finally:
            con.close()
        con, _, _ = _connect_checked(copy, True, upgrade=False, eager_wal=False)
    except sqlite3.Error as exc:
        shutil.rmtree(folder, ignore_errors=True)
        raise map_sqlite_error(path, exc, "reading the last commit of a project another process writes") from exc
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    db = Database(copy, con, True)
    db.path, db.snapshot_folder = path, folder
    import weakref

    weakref.finalize(db, shutil.rmtree, folder, True)  # also when the project is never closed (at exit at the latest)
    return db


def _wal_header(path: Path) -> bytes:
    """The first 32 bytes of FILE-wal (its salts change when the writer restarts the log), b"" if none."""
    try:
        with open(path.with_name(path.name + "-wal"), "rb") as handle:
            return handle.read(32)
    except OSError:
        return b""


_JOURNAL_MAGIC = bytes.fromhex("d9d505f920a163d7")


def _settle_journal(path: Path, read_only: bool) -> None:
    """A save cut off (a kill, a full disk) while it went through the rollback journal leaves FILE-journal
    "hot": the file may hold part of that save until SQLite rolls it back, which needs write access. A writer
    does it here, before the read-only checks (which could not); a reader is told how."""
    journal = path.with_name(path.name + "-journal")
    try:
        with open(journal, "rb") as handle:
            hot = handle.read(8) == _JOURNAL_MAGIC
    except OSError:
        return
    if not hot:
        return
    if read_only:
        raise ProjectError(path, f"a save was cut off and {journal.name} holds what it changed; the file is "
                                 f"consistent only after SQLite rolls that back, which needs write access",
                           "open it once for writing (a kn command with --project FILE, or the app) on a "
                           "writable drive")
    try:
        con = connect(path, read_only=False)
        try:
            con.execute("SELECT count(*) FROM sqlite_master").fetchone()  # the first read rolls the journal back
        finally:
            con.close()
    except sqlite3.Error as exc:
        raise map_sqlite_error(path, exc, "rolling back a save that was cut off") from exc


def _refuse_unwritable(path: Path) -> None:
    reason = location_writable(path)
    if reason:
        raise ProjectReadOnlyError(path, f"cannot open for writing: {reason}",
                                   "copy the project to a writable folder, or open it read-only")


def _connect_checked(path: Path, read_only: bool, upgrade: bool, eager_wal: bool):
    version = _validate(path)
    if not read_only:
        _refuse_unwritable(path)
    if version < schema.SCHEMA_VERSION:
        if read_only or not upgrade:
            raise ProjectVersionError(path, f"written by an older version (project schema v{version}; this app "
                                            f"uses v{schema.SCHEMA_VERSION}) and must be upgraded",
                                      "open it once for writing to upgrade it (a backup copy is kept)")
        _upgrade(path, version)
    try:
        con = connect(path, read_only)
    except sqlite3.Error as exc:
        raise map_sqlite_error(path, exc, "opening the project") from exc
    try:
        con.execute("PRAGMA foreign_keys = ON")
        # the first read takes the shared lock (kept: exclusive locking mode) and proves the tables readable
        con.execute("SELECT count(*) FROM project").fetchone()
        running = con.execute("SELECT count(*) FROM runs WHERE status = 'running'").fetchone()[0]
        if running and not read_only:  # the tables `open_project` will write to must be sound first
            for table in ("project", "runs"):
                problems = [r[0] for r in con.execute(f"PRAGMA quick_check('{table}')") if r[0] != "ok"]
                if problems:
                    raise sqlite3.DatabaseError(f"database disk image is malformed ({problems[0]})")
        wal = str(con.execute("PRAGMA journal_mode").fetchone()[0]).lower() == "wal"  # left by a crash
        if not read_only:
            con.execute(f"PRAGMA synchronous = {SYNCHRONOUS}")
            if eager_wal or wal:
                con.execute("PRAGMA journal_mode = WAL")
                con.execute("BEGIN IMMEDIATE")  # takes (and, in exclusive mode, keeps) the write lock now
                con.execute("COMMIT")
                wal = True
    except sqlite3.Error as exc:
        con.close()
        raise map_sqlite_error(path, exc, "opening the project") from exc
    return con, running, wal


def _validate(path: Path) -> int:
    """Read-only look at the file: is it ours, which schema version. Returns the version."""
    try:
        con = connect(path, read_only=True)
    except sqlite3.Error as exc:
        raise map_sqlite_error(path, exc, "opening the project") from exc
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
        raise map_sqlite_error(path, exc, "reading the project") from exc
    finally:
        con.close()


def _upgrade(path: Path, version: int) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    backup = path.with_name(f"{path.stem}.v{version}-backup-{stamp}{path.suffix or SUFFIX}")
    try:
        con = connect(path, read_only=False)
    except sqlite3.Error as exc:
        raise map_sqlite_error(path, exc, "opening the project to upgrade it") from exc
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
        install_begin(engine)
        try:
            with engine.begin() as conn:
                migrations.upgrade(conn, version, app_version(), now())
        except ProjectError:
            raise
        except Exception as exc:
            mapped = map_sqlite_error(path, exc, f"upgrading from schema v{version}") \
                if isinstance(exc, (sqlite3.Error, DBAPIError)) else \
                ProjectError(path, f"upgrade from schema v{version} failed ({exc}); the file was left as it was",
                             f"report this; the backup copy is {backup.name}")
            raise mapped from exc
        finally:
            engine.dispose()
    finally:
        con.close()
    return backup


def install_begin(engine) -> None:
    # pysqlite's own transaction handling starts transactions late and not for DDL; take control so that a
    # SQLAlchemy transaction is exactly one SQLite transaction (SQLAlchemy's documented recipe).
    @event.listens_for(engine, "begin")
    def _begin(conn):  # pragma: no cover - trivial
        conn.exec_driver_sql("BEGIN")



class Database:
    """One open project connection: SQLAlchemy sessions over it (one session = one SQLite transaction, behind
    one lock) and closing it. Methods are safe to call from several threads, but keep writes on one thread."""

    def __init__(self, path: Path, con: sqlite3.Connection, read_only: bool, lock_fd: int | None = None,
                 wal: bool = False):
        self.path = path
        self.read_only = read_only
        self.con = con
        self._lock_fd = lock_fd  # the writer's flock (see _flock), released at close
        self._wal = wal  # in WAL mode: switched by the first save, or already at open
        self.lock = threading.RLock()
        self._engine = create_engine("sqlite://", creator=lambda: con, poolclass=StaticPool)
        install_begin(self._engine)
        self.closed = False
        self._joined: Session | None = None  # the session of the `atomic` block in progress (its thread holds lock)
        self._identity = _identity(path, lock_fd)  # the file this connection writes to (see check_not_replaced)
        self._saved = False  # a write transaction committed since the open
        self.snapshot_folder: Path | None = None  # a read-only open of a copy while a writer works (_open_snapshot)

    def check_not_replaced(self, doing: str) -> None:
        """Before each commit: the path still names the file opened (same device and inode). `mv other p.knproj`
        or `rm p.knproj` under a running writer would otherwise let it go on committing into an unlinked file
        and report success while the path holds none of it."""
        try:
            now_there = _identity(self.path, None)
        except OSError:
            now_there = None
        if self._identity is not None and now_there != self._identity:
            what = "deleted or moved away" if now_there is None else "replaced by another file"
            raise ProjectReplacedError(self.path, f"the project file was {what} while open for writing; stopped "
                                                  f"before {doing}, which was not stored",
                                       "do not move, replace or delete a project while a program writes to it; "
                                       "run the command again on the file you want the results in")

    def close(self) -> None:
        """Checkpoints the WAL into the file and leaves it in rollback-journal mode, so that a closed project is
        one self-contained file (safe to copy; readable from read-only media). Raises ProjectCheckpointError
        when that copy fails (disk full): the changes then stay, safe, in the `-wal` file."""
        with self.lock:
            if self.closed:
                return
            self.closed = True
            failure = None
            if self._wal and not self.read_only:
                try:
                    mode = self.con.execute("PRAGMA journal_mode = DELETE").fetchone()
                    if not mode or str(mode[0]).lower() != "delete":
                        failure = f"SQLite stayed in {mode[0] if mode else 'an unknown'} journal mode"
                except sqlite3.Error as exc:
                    failure = str(exc)
            self.abandon()
            wal = wal_path(self.path)
            if failure is not None and wal.exists():
                size = wal.stat().st_size
                raise ProjectCheckpointError(
                    self.path, f"closing could not copy the saved changes into the file ({failure}); nothing is "
                               f"lost: every saved change is in {wal.name} ({size / 1e6:.1f} MB)",
                    f"keep {wal.name} next to it, free {size / 1e6:.1f} MB on that drive (or copy both files to "
                    f"one with room) and run `kn project recover {self.path}`")
            if failure is None:  # a reader in normal locking mode may have left an index file; nobody needs it now
                with contextlib.suppress(OSError):
                    Path(str(self.path) + "-shm").unlink(missing_ok=True)

    def abandon(self) -> None:
        """Closes the connection without checkpointing first: what is committed stays in the file or its WAL."""
        self.closed = True
        with contextlib.suppress(sqlite3.Error):
            self._engine.dispose()
        with contextlib.suppress(sqlite3.Error):
            self.con.close()
        if self._lock_fd is not None:  # after SQLite let go of the file
            os.close(self._lock_fd)
            self._lock_fd = None
        if self.snapshot_folder is not None:
            import shutil

            shutil.rmtree(self.snapshot_folder, ignore_errors=True)
            self.snapshot_folder = None

    def _enter_wal(self, doing: str) -> None:
        # The first save: WAL from here on (this takes SQLite's exclusive lock and keeps it until close).
        try:
            mode = self.con.execute("PRAGMA journal_mode = WAL").fetchone()
        except sqlite3.Error as exc:
            raise map_sqlite_error(self.path, exc, doing) from exc
        if not mode or str(mode[0]).lower() != "wal":
            raise _locked(self.path)
        self._wal = True

    @contextlib.contextmanager
    def session(self, doing: str, write: bool = False, first_in_place: bool = False) -> Iterator[Session]:
        """A session in one transaction, committed when the block ends; SQLite's errors become `ProjectError`s
        that say what was being done (`doing`). A write also stamps the project's modified_at. Inside an
        `atomic` block (on its thread) the session is that block's: nothing commits before the block ends.
        `first_in_place`: if nothing was saved since the open, this transaction goes through SQLite's rollback
        journal instead of switching the file to WAL first (a switch rewrites header bytes), so that a block
        that fails leaves the file byte-identical; WAL starts with the next save."""
        if self.closed:
            raise ProjectClosedError(self.path, "the project was closed", "open it again")
        if write and self.read_only:
            raise ProjectReadOnlyError(self.path, f"opened read-only, cannot save while {doing}",
                                       "open it for writing")
        with self.lock:
            if self._joined is not None:  # only the atomic block's thread gets here while it holds the lock
                with self._mapped_errors(doing):
                    yield self._joined
                    self._joined.flush()  # a rejected row is reported as what this block was doing
                return
            if write:
                self.check_not_replaced(doing)
            if write and not self._wal and not (first_in_place and not self._saved):
                self._enter_wal(doing)
            with self._mapped_errors(doing):
                with Session(self._engine, expire_on_commit=False) as session, session.begin():
                    yield session
                    if write:
                        session.execute(update(schema.ProjectRow).values(modified_at=now(),
                                                                         app_version=app_version()))
                        self.check_not_replaced(doing)  # raising here rolls the transaction back
            self._saved = self._saved or write

    @contextlib.contextmanager
    def atomic(self, doing: str) -> Iterator[None]:
        """Every save made inside the block (on this thread) joins one transaction: all of them are committed
        when the block ends, none if it ends with an exception or the process dies first. One commit instead of
        one per save (each waits for the disk: synchronous=FULL). Nested blocks join the outer one. A block that
        fails before anything else was saved leaves the file byte-identical (`session`'s first_in_place)."""
        with self.lock:
            if self._joined is not None:
                yield
                return
            with self.session(doing, write=True, first_in_place=True) as session:
                self._joined = session
                try:
                    yield
                finally:
                    self._joined = None

    @contextlib.contextmanager
    def _mapped_errors(self, doing: str) -> Iterator[None]:
        try:
            yield
        except IntegrityError as exc:
            raise ProjectDataError(self.path, f"rejected while {doing}: {exc.orig}",
                                   "check the ids and values passed") from exc
        except DBAPIError as exc:
            if not self.read_only:  # SQLite's own I/O error on a file deleted under it says less than this
                self.check_not_replaced(doing)
            # After a failed write (a full disk) in rollback-journal mode SQLite leaves the pager in its error
            # state and the journal hot; the next read rolls it back, while this connection holds the lock.
            with contextlib.suppress(sqlite3.Error):
                self.con.execute("SELECT count(*) FROM project").fetchone()
            raise map_sqlite_error(self.path, exc, doing) from exc
