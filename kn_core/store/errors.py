"""Errors raised by the project store. Each message is one line that names the file and says what to do."""

from __future__ import annotations

from pathlib import Path


class ProjectError(Exception):
    """Base class: any problem opening, reading or writing a project file."""

    def __init__(self, path: str | Path | None, problem: str, fix: str = ""):
        self.path = str(path) if path is not None else None
        self.problem = problem
        self.fix = fix
        where = f"{self.path}: " if self.path else ""
        message = f"{where}{problem}" + (f"; {fix}" if fix else "")
        super().__init__(message)


class ProjectNotFoundError(ProjectError):
    """The path does not exist (or is a folder)."""


class ProjectExistsError(ProjectError):
    """create_project was asked to write over an existing file."""


class NotAProjectError(ProjectError):
    """The file is not SQLite, or is SQLite but not a Knowledge Neuron Studio project."""


class CorruptProjectError(ProjectError):
    """The file is truncated or damaged (SQLite reports a malformed image, or a stored array fails its checksum)."""


class ProjectVersionError(ProjectError):
    """The project was written by a newer version of the app (or needs an upgrade it cannot get read-only)."""


class ProjectLockedError(ProjectError):
    """Another process has the project open."""


class ProjectReadOnlyError(ProjectError):
    """The file or its folder cannot be written."""


class ProjectDiskFullError(ProjectError):
    """The disk (or the SQLite size limit) is full; the failed change was rolled back."""


class ProjectCheckpointError(ProjectError):
    """Closing could not copy the saved changes from the `-wal` file into the project file (usually a full disk).
    Nothing is lost: they stay in the `-wal`, which SQLite replays on the next open; `recover_project` (or
    `kn project recover FILE`) finishes the copy once there is room."""


class ProjectClosedError(ProjectError):
    """The Project object was used after close()."""


class ProjectDataError(ProjectError):
    """A request names something the project does not hold (unknown run, fact, ...), or bad data was passed."""


class ProjectReplacedError(ProjectError):
    """The project file was moved, replaced or deleted while it was open for writing: the save that found it so
    was not made (a save into the old, unlinked file would be lost with it)."""
