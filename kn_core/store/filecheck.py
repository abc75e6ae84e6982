"""The project file before SQLite opens it, and SQLite's errors as one line: `header_check` (exists, regular, SQLite,
not truncated; special files refused without opening them), `location_writable`, `wal_path`, and
`map_sqlite_error` (SQLite's result codes -> the `ProjectError` that names the problem and the fix). Split from
`database.py`, which connects, creates, upgrades and holds the open connection."""

from __future__ import annotations

import os
import sqlite3
import stat
from pathlib import Path

from .errors import (
    CorruptProjectError,
    NotAProjectError,
    ProjectDiskFullError,
    ProjectError,
    ProjectLockedError,
    ProjectNotFoundError,
    ProjectReadOnlyError,
)

_SQLITE_MAGIC = b"SQLite format 3\x00"


def _sqlite_code(exc: BaseException) -> int | None:
    orig = getattr(exc, "orig", exc)
    code = getattr(orig, "sqlite_errorcode", None)
    return None if code is None else code & 0xFF


def _locked(path) -> ProjectLockedError:
    return ProjectLockedError(path, "the project is open in another process (Knowledge Neuron Studio or another "
                                    "program has it locked)", "close it there, or work on a copy of the file")


def map_sqlite_error(path, exc: BaseException, doing: str) -> ProjectError:
    code = _sqlite_code(exc)
    msg = str(getattr(exc, "orig", exc))
    if code == sqlite3.SQLITE_FULL or "disk is full" in msg:
        return ProjectDiskFullError(path, f"disk full while {doing}; that change was rolled back, the project "
                                          f"holds everything saved before it",
                                    "free space on that drive (or save the project elsewhere) and retry")
    if code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED) or "database is locked" in msg:
        return _locked(path)
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
    wal = wal_path(Path(path)) if path is not None else None
    if code == sqlite3.SQLITE_IOERR and wal is not None and wal.exists():
        return ProjectError(path, f"disk I/O error while {doing} ({msg}); nothing is lost: the saved changes are "
                                  f"in {wal.name}",
                            f"if the drive is full, free space (or copy both files to a drive with room) and run "
                            f"`kn project recover {path}`")
    if code == sqlite3.SQLITE_IOERR:
        return ProjectError(path, f"disk I/O error while {doing} ({msg}); the change was rolled back",
                            "check the drive (removed? network share gone?) and retry")
    return ProjectError(path, f"SQLite error while {doing}: {msg}", "report this if it persists")


def wal_path(path: Path) -> Path:
    """The write-ahead log SQLite keeps next to an open project (and leaves behind after a crash or a failed
    close): it holds committed changes not yet copied into the file."""
    return path.with_name(path.name + "-wal")


def _special_kind(mode: int) -> str | None:
    if stat.S_ISREG(mode):
        return None
    return {stat.S_IFIFO: "a named pipe (FIFO)", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
            stat.S_IFSOCK: "a socket", stat.S_IFDIR: "a folder"}.get(stat.S_IFMT(mode), "not a regular file")


def header_check(path: Path) -> None:
    """Cheap checks on the raw file before SQLite sees it: exists, is a regular file, is SQLite, is not
    truncated. Special files are refused without opening them for reading (a FIFO would block forever). When a
    `-wal` holds committed pages, SQLite replays it before the size means anything, so truncation is then left
    to SQLite (a real hole shows up as CorruptProjectError on the first read)."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise ProjectNotFoundError(path, "no such project file", "check the path, or create a new project") from None
    except OSError as exc:
        raise ProjectError(path, f"cannot read the file ({exc.strerror})", "check the drive and the path") from exc
    if stat.S_ISDIR(mode):
        raise ProjectNotFoundError(path, "is a folder, not a project file", "pass the .knproj file inside it")
    kind = _special_kind(mode)
    if kind:
        raise NotAProjectError(path, f"is {kind}, not a project file", "pass a .knproj file saved by the app")
    wal = wal_path(path)
    wal_kind = _special_kind(wal.lstat().st_mode) if wal.exists() or wal.is_symlink() else None
    if wal_kind:
        raise NotAProjectError(path, f"its journal {wal.name} is {wal_kind}", f"move {wal.name} away")
    try:
        # O_NONBLOCK: should the path have become a FIFO since the stat, opening still does not wait for a writer
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        try:
            kind = _special_kind(os.fstat(fd).st_mode)
            if kind:
                raise NotAProjectError(path, f"is {kind}, not a project file", "pass a .knproj file saved by the app")
            size = os.fstat(fd).st_size
            header = os.pread(fd, 100, 0) if hasattr(os, "pread") else os.read(fd, 100)
        finally:
            os.close(fd)
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
    has_wal = wal.is_file() and wal.stat().st_size > 0
    if counter_ok and pages and size < pages * page_size and not has_wal:
        raise CorruptProjectError(path, f"the file is truncated ({size} bytes; its header says "
                                        f"{pages * page_size})",
                                  f"if a {wal.name} file belonged with it, put it next to it and run "
                                  f"`kn project recover {path}`; else copy the file again or restore a backup copy")


def location_writable(path: Path) -> str | None:
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
