"""The project store: one SQLite file (.knproj) per project, through SQLAlchemy. See docs/STORE.md.

Only this package talks to SQLite. The CLI and the GUI use `Project` methods with plain Python data.
"""

from .codec import decode_array, encode_array
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
from .export import export_project
from .project import (
    SUFFIX,
    EvaluationRecord,
    FactRecord,
    HistoryCheck,
    ModelRecord,
    NeuronSetRecord,
    Project,
    PromptRecord,
    RelationRecord,
    RunRecord,
    RunRecorder,
    create_project,
    edit_history_applies,
    library_versions,
    load_edit_history,
    open_or_create_project,
    open_project,
    record_to_dict,
)
from .schema import APPLICATION_ID, SCHEMA_VERSION

__all__ = [
    "APPLICATION_ID", "SCHEMA_VERSION", "SUFFIX",
    "Project", "create_project", "open_project", "open_or_create_project", "export_project",
    "load_edit_history", "edit_history_applies", "HistoryCheck", "library_versions", "record_to_dict",
    "encode_array", "decode_array", "RunRecorder",
    "RelationRecord", "FactRecord", "ModelRecord", "PromptRecord", "RunRecord", "NeuronSetRecord", "EvaluationRecord",
    "ProjectError", "ProjectNotFoundError", "ProjectExistsError", "NotAProjectError", "CorruptProjectError",
    "ProjectVersionError", "ProjectLockedError", "ProjectReadOnlyError", "ProjectDiskFullError",
    "ProjectClosedError", "ProjectDataError",
]
