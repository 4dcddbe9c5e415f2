"""Tables of the label store. Changes go through an Alembic migration in slm_annotator/migrations."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    false,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {dict[str, Any]: JSON, list[Any]: JSON}


class Project(Base):
    __tablename__ = "projects"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    label_config: Mapped[str] = mapped_column(Text, default="")
    extra_params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    hostname: Mapped[str] = mapped_column(String(512), default="")
    access_token: Mapped[str] = mapped_column(Text, default="")  # a secret: never logged or exported
    label_seq: Mapped[int] = mapped_column(BigInteger, default=0)
    trained_seq: Mapped[int] = mapped_column(BigInteger, default=0)
    training_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    sync_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)


class Annotation(Base):
    __tablename__ = "annotations"
    __table_args__ = (UniqueConstraint("project_id", "annotation_id", name="uq_annotation"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id"), index=True)
    annotation_id: Mapped[int] = mapped_column(BigInteger)
    task_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True, index=True)
    annotator: Mapped[str] = mapped_column(String(255), default="")
    result: Mapped[list[Any]] = mapped_column(JSON, default=list)
    values: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    task_data: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    cancelled: Mapped[bool] = mapped_column(Boolean, default=False)
    deleted: Mapped[bool] = mapped_column(Boolean, default=False)
    hard: Mapped[bool] = mapped_column(Boolean, default=False)
    ground_truth: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())  # a golden answer
    source: Mapped[str] = mapped_column(String(16), default="webhook")
    ls_updated_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    seq: Mapped[int] = mapped_column(BigInteger, default=0, index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)


class AdapterVersion(Base):
    __tablename__ = "adapters"
    __table_args__ = (UniqueConstraint("project_id", "version", name="uq_adapter_version"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id"), index=True)
    version: Mapped[int] = mapped_column(Integer)
    model_version: Mapped[str] = mapped_column(String(255), unique=True)
    path: Mapped[str] = mapped_column(String(1024))
    status: Mapped[str] = mapped_column(String(16))  # served | refused | retired
    base_model: Mapped[str] = mapped_column(String(255), default="")
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    training_run_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    promoted_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)


class TrainingRun(Base):
    __tablename__ = "training_runs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id"), index=True)
    job_id: Mapped[str] = mapped_column(String(255), default="")
    trigger: Mapped[str] = mapped_column(String(32), default="threshold")
    status: Mapped[str] = mapped_column(String(16), default="running")  # running|promoted|refused|failed|skipped
    seq_snapshot: Mapped[int] = mapped_column(BigInteger, default=0)
    n_train: Mapped[int] = mapped_column(Integer, default=0)
    n_heldout: Mapped[int] = mapped_column(Integer, default=0)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    error: Mapped[str] = mapped_column(Text, default="")
    adapter_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    started_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)


class Prediction(Base):
    __tablename__ = "predictions"
    __table_args__ = (UniqueConstraint("project_id", "task_id", "model_version", name="uq_prediction"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id"), index=True)
    task_id: Mapped[int] = mapped_column(BigInteger)
    model_version: Mapped[str] = mapped_column(String(255))
    values: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    score: Mapped[float] = mapped_column(Float, default=0.0)
    uncertainty: Mapped[float | None] = mapped_column(Float, nullable=True)  # U(x) of an ensemble's vote
    route: Mapped[str] = mapped_column(String(16), default="")  # "" | judge | human: where the item was sent
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class HardSample(Base):
    """An item the ensemble disagreed on, resolved by the judge or a human: the continual fine-tuning pool."""

    __tablename__ = "hard_samples"
    __table_args__ = (UniqueConstraint("project_id", "task_id", "source", "annotator", name="uq_hard_sample"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id"), index=True)
    task_id: Mapped[int] = mapped_column(BigInteger)
    source: Mapped[str] = mapped_column(String(16))  # judge | human
    annotator: Mapped[str] = mapped_column(String(255), default="")
    values: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    task_data: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    run_id: Mapped[int | None] = mapped_column(Integer, nullable=True)  # the continual run that trained on it
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class RouteUsage(Base):
    """Running totals per project and route (slm | judge | human), priced at read time from the price table."""

    __tablename__ = "route_usage"
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id"), primary_key=True)
    route: Mapped[str] = mapped_column(String(16), primary_key=True)
    items: Mapped[int] = mapped_column(BigInteger, default=0)
    failures: Mapped[int] = mapped_column(BigInteger, default=0)
    prompt_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    completion_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    seconds: Mapped[float] = mapped_column(Float, default=0.0)


class CachedPrediction(Base):
    """What /predict answered for a task: served again while the task's text, the version and the way it was
    asked (config, settings, pre-fill bar: `variant`) are unchanged. Old model versions are evicted."""

    __tablename__ = "prediction_cache"
    __table_args__ = (
        UniqueConstraint("project_id", "task_id", "model_version", "variant", name="uq_prediction_cache"),
        Index("ix_prediction_cache_version", "project_id", "model_version"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id"))
    task_id: Mapped[int] = mapped_column(BigInteger)
    data_hash: Mapped[str] = mapped_column(String(64))  # model.heads.data_hash: the texts the prompt reads
    model_version: Mapped[str] = mapped_column(String(255))
    variant: Mapped[str] = mapped_column(String(32))  # label config, extra_params, bar, members, decoding, routing
    result: Mapped[list[Any]] = mapped_column(JSON, default=list)
    score: Mapped[float] = mapped_column(Float, default=0.0)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class PushedPrediction(Base):
    """One row per (task, version) that went, or is going, to Label Studio: one writer per task and version.

    state: "claimed" (a bulk job took it; `owner` is the job), "done" (written through the API), "replied" (sent
    back in a /predict reply, which Label Studio stores itself).
    """

    __tablename__ = "pushed_predictions"
    __table_args__ = (UniqueConstraint("project_id", "model_version", "task_id", name="uq_pushed_prediction"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id"), index=True)
    task_id: Mapped[int] = mapped_column(BigInteger)
    model_version: Mapped[str] = mapped_column(String(255))
    state: Mapped[str] = mapped_column(String(16))
    owner: Mapped[str] = mapped_column(String(255), default="")
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class BulkRun(Base):
    """One bulk prediction job (worker.bulk): its progress, mirrored from the workers that share its chunks, so
    /metrics, /health and the report read it from the store.

    status: "running", "waiting" (Label Studio unreachable or slow: retrying until the patience runs out), "done",
    "failed" (RQ retries the job), "superseded" (a newer version was served first).
    """

    __tablename__ = "bulk_runs"
    id: Mapped[str] = mapped_column(String(255), primary_key=True)  # the RQ job id (or "inline-...")
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id"), index=True)
    model_version: Mapped[str] = mapped_column(String(255))
    mode: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), default="running")
    total: Mapped[int] = mapped_column(Integer, default=0)
    done: Mapped[int] = mapped_column(Integer, default=0)
    written: Mapped[int] = mapped_column(Integer, default=0)
    skipped: Mapped[int] = mapped_column(Integer, default=0)
    errors: Mapped[int] = mapped_column(Integer, default=0)
    workers: Mapped[int] = mapped_column(Integer, default=1)
    tasks_per_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    eta_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    last_error: Mapped[str] = mapped_column(Text, default="")
    started_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
