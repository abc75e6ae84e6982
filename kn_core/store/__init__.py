"""The project store: one SQLite file (.knproj) per project, through SQLAlchemy. See docs/STORE.md.

Only this package talks to SQLite. The CLI and the GUI use `Project` methods with plain Python data.
Modules: `records` (what goes in and comes out), `database` (SQLite: checks, connection, errors, create/upgrade),
`project` (the `Project` facade) with `runs` (attribution runs and arrays), `export`, `codec`, `schema`,
`migrations`, `errors`, `topscores` (compact score storage).
"""

from .codec import decode_array, encode_array
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
from .export import export_project
from .database import SUFFIX
from .project import (EDIT_STATE_SETTING, Project, check_project_file, create_project, open_or_create_project, open_project,
                      recover_project)
from .records import (
    EvaluationRecord,
    FactRecord,
    HistoryCheck,
    ModelRecord,
    NeuronSetRecord,
    PromptRecord,
    RelationRecord,
    RunRecord,
    library_versions,
    record_to_dict,
)
from .runs import SCORE_STORAGE, RunRecorder
from .topscores import ScoresTooCoarseError, TopScores
from .schema import APPLICATION_ID, SCHEMA_VERSION

__all__ = [
    "APPLICATION_ID", "EDIT_STATE_SETTING", "SCORE_STORAGE", "SCHEMA_VERSION", "SUFFIX",
    "Project", "create_project", "open_project", "open_or_create_project", "check_project_file", "recover_project",
    "export_project",
    "HistoryCheck", "library_versions", "record_to_dict",
    "encode_array", "decode_array", "RunRecorder", "TopScores", "ScoresTooCoarseError",
    "RelationRecord", "FactRecord", "ModelRecord", "PromptRecord", "RunRecord", "NeuronSetRecord", "EvaluationRecord",
    "ProjectError", "ProjectNotFoundError", "ProjectExistsError", "NotAProjectError", "CorruptProjectError",
    "ProjectVersionError", "ProjectLockedError", "ProjectReadOnlyError", "ProjectReplacedError", "ProjectDiskFullError",
    "ProjectCheckpointError", "ProjectClosedError", "ProjectDataError",
]
