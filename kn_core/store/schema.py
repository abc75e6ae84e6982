"""The project schema: SQLAlchemy 2.0 typed ORM models.

`SCHEMA_VERSION` is the version these models describe. It is written to SQLite's header field `user_version`
(and a row per applied step in `schema_migrations`); `APPLICATION_ID` marks the file as ours in the header
field `application_id`. Change the models only together with a new step in `migrations.py`.
"""

from __future__ import annotations

from typing import Any, Optional

from sqlalchemy import JSON, Boolean, Float, ForeignKey, Index, Integer, LargeBinary, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

SCHEMA_VERSION = 1
APPLICATION_ID = 0x4B4E5354  # "KNST"
RUN_STATUSES = ("running", "done", "cancelled", "failed", "interrupted")
NEURON_SET_KINDS = ("coarse", "refined", "relation", "user")


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class ProjectRow(Base):
    """Exactly one row (id 1)."""

    __tablename__ = "project"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[str] = mapped_column(String(40))
    modified_at: Mapped[str] = mapped_column(String(40))
    app_version: Mapped[str] = mapped_column(String(40))  # app that last wrote the file
    created_by: Mapped[str] = mapped_column(String(40))  # app that created it
    schema_version: Mapped[int] = mapped_column(Integer)
    notes: Mapped[str] = mapped_column(Text, default="")


class SchemaMigration(Base):
    __tablename__ = "schema_migrations"
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    applied_at: Mapped[str] = mapped_column(String(40))
    app_version: Mapped[str] = mapped_column(String(40))
    description: Mapped[str] = mapped_column(Text, default="")


class Setting(Base):
    """Free key -> JSON value store (view state, the edit stack's cursor, ...)."""

    __tablename__ = "settings"
    key: Mapped[str] = mapped_column(String(200), primary_key=True)
    value: Mapped[Any] = mapped_column(JSON)


class ModelRow(Base):
    __tablename__ = "models"
    __table_args__ = (UniqueConstraint("source", "sha256", "dtype"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    source: Mapped[str] = mapped_column(Text)  # HF id, local path, "default" or "in-memory"
    sha256: Mapped[str] = mapped_column(String(64))  # weights hash at load time (before any edit)
    dtype: Mapped[str] = mapped_column(String(20))
    family: Mapped[str] = mapped_column(String(40), default="")
    kind: Mapped[str] = mapped_column(String(20), default="")  # masked | causal
    layers: Mapped[Optional[int]] = mapped_column(Integer, nullable=True)
    neurons: Mapped[Optional[int]] = mapped_column(Integer, nullable=True)
    info: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # LoadedModel.describe()
    first_used: Mapped[str] = mapped_column(String(40))


class RelationRow(Base):
    __tablename__ = "relations"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key: Mapped[str] = mapped_column(String(200), unique=True)  # e.g. "P36"
    name: Mapped[str] = mapped_column(Text, default="")
    info: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class TemplateRow(Base):
    __tablename__ = "templates"
    __table_args__ = (UniqueConstraint("relation_id", "position"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    relation_id: Mapped[int] = mapped_column(ForeignKey("relations.id", ondelete="CASCADE"))
    position: Mapped[int] = mapped_column(Integer)
    text: Mapped[str] = mapped_column(Text)


class FactRow(Base):
    __tablename__ = "facts"
    __table_args__ = (UniqueConstraint("relation_id", "subject", "object"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    relation_id: Mapped[int] = mapped_column(ForeignKey("relations.id", ondelete="CASCADE"), index=True)
    subject: Mapped[str] = mapped_column(Text)
    object: Mapped[str] = mapped_column(Text)
    info: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class RunRow(Base):
    """One attribution run over one fact's prompts."""

    __tablename__ = "runs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    fact_id: Mapped[Optional[int]] = mapped_column(ForeignKey("facts.id", ondelete="RESTRICT"), index=True)
    model_id: Mapped[Optional[int]] = mapped_column(ForeignKey("models.id", ondelete="RESTRICT"), index=True)
    method: Mapped[str] = mapped_column(String(40), default="ig")
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    library_versions: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    device: Mapped[str] = mapped_column(String(40), default="")
    status: Mapped[str] = mapped_column(String(20), index=True)
    error: Mapped[str] = mapped_column(Text, default="")
    started_at: Mapped[str] = mapped_column(String(40))
    finished_at: Mapped[Optional[str]] = mapped_column(String(40), nullable=True)
    elapsed_s: Mapped[Optional[float]] = mapped_column(Float, nullable=True)
    n_prompts: Mapped[int] = mapped_column(Integer, default=0)
    info: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class RunPromptRow(Base):
    """One prompt of a run: its text and, once attributed, its probability and completeness check."""

    __tablename__ = "run_prompts"
    # (run_id, done) covers the per-run count of attributed prompts that every run listing needs: 0.1 s instead
    # of 0.7 s for 220,000 prompts. Purely additive, so schema v1 files without it gain it on their first new run.
    __table_args__ = (UniqueConstraint("run_id", "prompt_index"),
                      Index("ix_run_prompts_run_done", "run_id", "done"))
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    prompt_index: Mapped[int] = mapped_column(Integer)
    prompt: Mapped[dict[str, Any]] = mapped_column(JSON)  # text, answer, answer_ids, template, kind
    done: Mapped[bool] = mapped_column(Boolean, default=False)
    prob: Mapped[Optional[float]] = mapped_column(Float, nullable=True)
    completeness: Mapped[Optional[list[Any]]] = mapped_column(JSON, nullable=True)
    seconds: Mapped[Optional[float]] = mapped_column(Float, nullable=True)


class ScoreArrayRow(Base):
    """A layer x neuron array of one prompt ("scores" or "activations"), as compressed .npy bytes."""

    __tablename__ = "score_arrays"
    __table_args__ = (UniqueConstraint("run_id", "prompt_index", "name"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    prompt_index: Mapped[int] = mapped_column(Integer)
    name: Mapped[str] = mapped_column(String(40))
    shape: Mapped[list[Any]] = mapped_column(JSON)
    dtype: Mapped[str] = mapped_column(String(20))  # as stored (float16 when asked)
    codec: Mapped[str] = mapped_column(String(20))
    crc32: Mapped[int] = mapped_column(Integer)
    nbytes: Mapped[int] = mapped_column(Integer)  # compressed size
    data: Mapped[bytes] = mapped_column(LargeBinary)


class NeuronSetRow(Base):
    __tablename__ = "neuron_sets"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(Text, default="")
    kind: Mapped[str] = mapped_column(String(20), index=True)  # coarse | refined | relation | user
    fact_id: Mapped[Optional[int]] = mapped_column(ForeignKey("facts.id", ondelete="SET NULL"), nullable=True)
    relation_id: Mapped[Optional[int]] = mapped_column(
        ForeignKey("relations.id", ondelete="SET NULL"), nullable=True
    )
    model_id: Mapped[Optional[int]] = mapped_column(ForeignKey("models.id", ondelete="SET NULL"), nullable=True)
    run_ids: Mapped[list[Any]] = mapped_column(JSON, default=list)
    prompt_index: Mapped[Optional[int]] = mapped_column(Integer, nullable=True)  # coarse sets: which prompt
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # t, p, fraction, method, ...
    neurons: Mapped[list[Any]] = mapped_column(JSON)  # [[layer, neuron], ...]
    n_neurons: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[str] = mapped_column(String(40))
    note: Mapped[str] = mapped_column(Text, default="")


class EditRow(Base):
    """One entry of the edit history, in stack order."""

    __tablename__ = "edits"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    position: Mapped[int] = mapped_column(Integer, unique=True)
    kind: Mapped[str] = mapped_column(String(40))
    neurons: Mapped[list[Any]] = mapped_column(JSON)
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    applied: Mapped[bool] = mapped_column(Boolean, default=True)  # done (below the stack's cursor) or undone
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)  # a done edit can be switched off
    model_id: Mapped[Optional[int]] = mapped_column(ForeignKey("models.id", ondelete="RESTRICT"), nullable=True)
    extra: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # any other keys the EditStack exported
    created_at: Mapped[str] = mapped_column(String(40))


class EvaluationRow(Base):
    """Report data of one evaluation ("Knowledge edits": suppress/amplify/update/erase and their controls)."""

    __tablename__ = "evaluations"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(40), index=True)
    name: Mapped[str] = mapped_column(Text, default="")
    model_id: Mapped[Optional[int]] = mapped_column(ForeignKey("models.id", ondelete="RESTRICT"), nullable=True)
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    report: Mapped[Any] = mapped_column(JSON)
    library_versions: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    status: Mapped[str] = mapped_column(String(20), default="done")
    started_at: Mapped[str] = mapped_column(String(40))
    finished_at: Mapped[Optional[str]] = mapped_column(String(40), nullable=True)
    elapsed_s: Mapped[Optional[float]] = mapped_column(Float, nullable=True)


