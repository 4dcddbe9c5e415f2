"""The label store: every annotation, adapter version and training run, in SQLite or PostgreSQL.

Writes are idempotent and ordered by Label Studio's own `updated_at`, so a repeated or late webhook never
duplicates a label nor overwrites a newer one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import EllipsisType
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import bindparam, case, create_engine, delete, event, func, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from slm_annotator.schema import (
    AdapterVersion,
    Annotation,
    BulkRun,
    CachedPrediction,
    HardSample,
    Prediction,
    Project,
    PushedPrediction,
    RouteUsage,
    TrainingRun,
    utcnow,
)

log = logging.getLogger(__name__)
ID_BATCH = 500  # task ids per IN (...) clause
CLAIM_STALE_SECONDS = 900.0  # a bulk job's claim on a task nobody refreshed for this long: its worker died
REPLY_GRACE_SECONDS = 300.0  # a /predict reply Label Studio should have stored by now (its timeout is 100 s)
MIGRATIONS = Path(__file__).parent / "migrations"
_BULK_COUNTS = frozenset({"done", "written", "skipped", "errors"})
MIGRATION_LOCK_KEY = 0x534C4D41  # "SLMA": one advisory lock id for this app's migrations, per database


@dataclass(frozen=True)
class LabelIn:
    """One annotation as received (webhook, sync or import), already parsed against the rubric."""

    annotation_id: int
    task_id: int | None
    annotator: str
    result: list[Any]
    values: dict[str, str]
    task_data: dict[str, Any]
    cancelled: bool = False
    ls_updated_at: datetime | None = None
    source: str = "webhook"
    hard: bool = False
    ground_truth: bool = False  # Label Studio's mark of a golden answer


def _private_file(path: Path) -> None:
    """The SQLite store holds Label Studio tokens: its folder 0700 when created here, the file 0600 (SQLite gives
    its -wal and -shm files the database file's mode). An existing file is tightened, never loosened."""
    if not path.parent.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not path.exists():  # never open (and close) a database file that may be in use: closing any descriptor
        # of it drops this process's POSIX locks on it, and SQLite's other connections here would lose theirs
        with contextlib.suppress(FileExistsError):
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    with contextlib.suppress(OSError):  # a file owned by someone else: theirs to fix
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            path.chmod(mode & 0o700)


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:" and "?" not in path and not path.startswith("file:"):
            _private_file(Path(path))
        # hide_parameters: a database error's message (logged with its traceback) never carries label texts or
        # the Label Studio access token stored by /setup.
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False}, hide_parameters=True)

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.isolation_level = None  # we emit BEGIN ourselves (below), not pysqlite before DML only
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")  # readers never block the webhook writer
            cur.execute("PRAGMA synchronous=FULL")  # an acknowledged label survives power loss
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        @event.listens_for(engine, "begin")
        def _begin(conn: Any) -> None:
            # Writers take the write lock up front, so a read-check-write (an upsert ordered by updated_at)
            # is atomic across threads and processes; readers stay concurrent under WAL.
            conn.exec_driver_sql(f"BEGIN {conn.get_execution_options().get('sqlite_begin', 'DEFERRED')}")

        return engine
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://") :]
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20, hide_parameters=True)


def migrate(engine: Engine) -> None:
    """Upgrades to head; safe when several processes (gunicorn workers, the RQ worker) start at once.

    Each upgrade runs in one transaction that first takes a database-wide lock: PostgreSQL's transaction-scoped
    advisory lock, SQLite's write lock (BEGIN IMMEDIATE). The others wait, then find the schema at head.
    """
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    if engine.dialect.name == "sqlite":
        engine = engine.execution_options(sqlite_begin="IMMEDIATE")
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK_KEY})")
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


_ANNOTATIONS = Annotation.__table__
_PROJECTS = Project.__table__
_LOCK_PROJECT = select(_PROJECTS.c.label_seq).where(_PROJECTS.c.id == bindparam("p")).with_for_update()
_SET_SEQ = update(_PROJECTS).where(_PROJECTS.c.id == bindparam("p")).values(label_seq=bindparam("seq"))
_FIND_LABEL = select(
    _ANNOTATIONS.c.id, _ANNOTATIONS.c.ls_updated_at, _ANNOTATIONS.c.deleted, _ANNOTATIONS.c.result,
    _ANNOTATIONS.c["values"], _ANNOTATIONS.c.cancelled, _ANNOTATIONS.c.annotator, _ANNOTATIONS.c.ground_truth,
).where(_ANNOTATIONS.c.project_id == bindparam("p"), _ANNOTATIONS.c.annotation_id == bindparam("a"))
_TOUCH_LABEL = (
    update(_ANNOTATIONS).where(_ANNOTATIONS.c.id == bindparam("row_id"))
    .values(ls_updated_at=bindparam("ls_updated_at"))
)
_TOMBSTONE = (
    update(_ANNOTATIONS).where(_ANNOTATIONS.c.id == bindparam("row_id"))
    .values(deleted=True, seq=bindparam("new_seq"), updated_at=bindparam("now"))
)
DELETE_BATCH = 500  # annotation ids per transaction of a bulk delete
_LABEL_FIELDS = ("task_id", "annotator", "result", "values", "cancelled", "source", "ls_updated_at", "seq",
                 "updated_at", "ground_truth")


def _update_label(with_task_data: bool, hard: bool) -> tuple[Any, tuple[str, ...]]:
    """An update without task data keeps the stored data; "hard" is only ever set, never cleared.

    Execute it with exactly its columns: Core adds any other column named in the parameters to the SET clause.
    """
    columns = _LABEL_FIELDS + (("task_data",) if with_task_data else ()) + (("hard",) if hard else ())
    stmt = update(_ANNOTATIONS).where(_ANNOTATIONS.c.id == bindparam("row_id")).values(
        {c: bindparam(c) for c in columns}
    )
    return stmt, columns


_UPDATE_LABEL = {(t, h): _update_label(t, h) for t in (False, True) for h in (False, True)}


def _ensure_project(s: Session, project_id: str) -> None:
    """Predictions, usage and judge answers may arrive before /setup or any label created the project row."""
    if s.get(Project, project_id) is None:
        s.add(Project(id=project_id))
        s.flush()


def _put_hard_sample(s: Session, project_id: str, task_id: int, source: str, annotator: str,
                     values: dict[str, Any], task_data: dict[str, Any]) -> None:
    row = s.scalars(select(HardSample).where(
        HardSample.project_id == project_id, HardSample.task_id == task_id, HardSample.source == source,
        HardSample.annotator == annotator,
    )).first()
    if row is None:
        s.add(HardSample(project_id=project_id, task_id=task_id, source=source, annotator=annotator, values=values,
                         task_data=task_data or {}))
        s.flush()
    else:
        row.values, row.task_data = values, task_data or row.task_data


class ServedChanged(RuntimeError):
    """The served version is not the one a run compared itself with: a rollback or another run came between."""

    def __init__(self, project_id: str, expected: int | None, current: AdapterVersion | None) -> None:
        self.expected, self.current = expected, current
        was = f"v{expected}" if expected is not None else "the base model"
        now = f"v{current.version}" if current is not None else "the base model"
        super().__init__(f"project {project_id}: the served version changed from {was} to {now} during the run")

    @property
    def by_a_run(self) -> bool:
        """The newly served version was promoted by its own run (not re-served by a rollback): comparing with it
        again is what that run would have met had it started later."""
        cur = self.current
        return cur is not None and cur.promoted_at is not None and cur.promoted_at == cur.created_at and \
            (self.expected is None or cur.version > self.expected)


def _check_served(s: Session, project_id: str, expected: int | None) -> None:
    """Compare-and-set's compare, the project's row locked (PostgreSQL; SQLite's write lock is already held)."""
    s.execute(_LOCK_PROJECT, {"p": project_id})
    current = s.scalars(select(AdapterVersion).where(AdapterVersion.project_id == project_id,
                                                     AdapterVersion.status == "served")).first()
    if (current.version if current is not None else None) != expected:
        if current is not None:
            s.expunge(current)  # readable after the rollback that the exception brings
        raise ServedChanged(project_id, expected, current)


class Store:
    def __init__(self, url: str, run_migrations: bool = True) -> None:
        self.url = url
        self.engine = make_engine(url)
        if run_migrations:
            migrate(self.engine)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)
        self.is_sqlite = url.startswith("sqlite")
        writer = self.engine.execution_options(sqlite_begin="IMMEDIATE") if self.is_sqlite else self.engine
        self.writer_sessions = sessionmaker(writer, expire_on_commit=False)
        self._write_lock: Any = threading.Lock() if self.is_sqlite else contextlib.nullcontext()

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self.sessions.begin() as s:
            yield s

    @contextmanager
    def write_session(self) -> Iterator[Session]:
        """A transaction that writes: SQLite's write lock from its first statement (BEGIN IMMEDIATE).

        On SQLite, this process's writers also queue on a lock, woken at once, instead of in SQLite's busy
        handler, which sleeps in growing steps (the p99 of webhooks under concurrency).
        """
        with self._write_lock, self.writer_sessions.begin() as s:
            yield s

    def upsert_project(self, project_id: str, **fields: Any) -> Project:
        fields = {k: v for k, v in fields.items() if v is not None}
        for attempt in range(2):
            try:
                with self.write_session() as s:
                    project = s.get(Project, project_id)
                    if project is None:
                        project = Project(id=project_id, **fields)
                        s.add(project)
                    else:
                        for key, value in fields.items():
                            setattr(project, key, value)
                    s.flush()
                    return project
            except IntegrityError:
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def project(self, project_id: str) -> Project | None:
        with self.session() as s:
            return s.get(Project, project_id)

    def projects(self) -> list[Project]:
        with self.session() as s:
            return list(s.scalars(select(Project).order_by(Project.id)))

    def upsert_label(self, project_id: str, label: LabelIn) -> bool:
        """True when the store changed. Equal or older `updated_at` than stored: no-op."""
        for attempt in range(3):
            try:
                with self.write_session() as s:
                    return self._upsert_label(s, project_id, label)
            except IntegrityError:
                if attempt == 2:
                    raise
        return False

    def _upsert_label(self, s: Session, project_id: str, label: LabelIn) -> bool:
        """Prebuilt Core statements, not the ORM unit of work: this runs once per webhook (a few ms matter)."""
        seq = self._lock_seq(s, project_id)
        row = s.execute(_FIND_LABEL, {"p": project_id, "a": label.annotation_id}).first()
        if row is not None and row.ls_updated_at and label.ls_updated_at and label.ls_updated_at <= row.ls_updated_at:
            return False
        if row is not None and row.deleted:
            return False  # Label Studio never updates a deleted annotation: this one is late
        now = utcnow()
        if row is not None and (row.result, row.cancelled, row[4], row.annotator, row.ground_truth) == (
            label.result, label.cancelled, label.values, label.annotator, label.ground_truth
        ):
            if label.ls_updated_at:
                s.execute(_TOUCH_LABEL, {"row_id": row.id, "ls_updated_at": label.ls_updated_at})
            return False
        fields = {
            "task_id": label.task_id, "annotator": label.annotator, "result": label.result, "values": label.values,
            "cancelled": label.cancelled, "source": label.source, "ls_updated_at": label.ls_updated_at,
            "seq": seq + 1, "updated_at": now, "task_data": label.task_data, "hard": label.hard,
            "ground_truth": label.ground_truth,
        }
        if row is None:
            s.execute(_ANNOTATIONS.insert(), {**fields, "project_id": project_id, "annotation_id": label.annotation_id,
                                               "task_data": label.task_data or {}, "deleted": False,
                                               "created_at": now})
        else:
            stmt, columns = _UPDATE_LABEL[bool(label.task_data), label.hard]
            s.execute(stmt, {**{c: fields[c] for c in columns}, "row_id": row.id})
        s.execute(_SET_SEQ, {"p": project_id, "seq": seq + 1})
        if label.hard and label.values and not label.cancelled and label.task_id is not None:
            # a human's answer to an item the ensemble disagreed on joins the pool in the label's own transaction
            _put_hard_sample(s, project_id, label.task_id, "human", label.annotator, label.values, label.task_data)
        return True

    def _lock_seq(self, s: Session, project_id: str) -> int:
        """The project's label_seq, its row locked (PostgreSQL) and created if missing."""
        seq = s.execute(_LOCK_PROJECT, {"p": project_id}).scalar_one_or_none()
        if seq is None:
            now = utcnow()
            s.execute(_PROJECTS.insert(), {
                "id": project_id, "label_seq": 0, "trained_seq": 0, "training_requested": False,
                "sync_requested": False, "created_at": now, "updated_at": now,
            })  # a concurrent creator: IntegrityError, the caller retries
            return 0
        return int(seq)

    def delete_labels(self, project_id: str, annotation_ids: list[int]) -> int:
        """Marks deleted (a tombstone even if the create never arrived, so a late create stays dead).

        In transactions of DELETE_BATCH ids: one transaction for 20,000 ids held SQLite's write lock for 31 s and
        28 of 39 webhooks arriving meanwhile timed out (Label Studio waits 1 s). A waiting writer gets in between.
        """
        ids = list(dict.fromkeys(annotation_ids))
        changed = 0
        for start in range(0, len(ids), DELETE_BATCH):
            if start:
                time.sleep(0.002)  # this process's write lock is not fair: let a waiting webhook take it
            for attempt in range(3):
                try:
                    with self.write_session() as s:
                        changed += self._delete_batch(s, project_id, ids[start : start + DELETE_BATCH])
                    break
                except IntegrityError:  # a concurrent creator of the project row or of a tombstone: again
                    if attempt == 2:
                        raise
        return changed

    def _delete_batch(self, s: Session, project_id: str, ids: list[int]) -> int:
        seq = self._lock_seq(s, project_id)
        found = {r.annotation_id: r for r in s.execute(
            select(_ANNOTATIONS.c.id, _ANNOTATIONS.c.annotation_id, _ANNOTATIONS.c.deleted).where(
                _ANNOTATIONS.c.project_id == project_id, _ANNOTATIONS.c.annotation_id.in_(ids)))}
        now, inserts, updates = utcnow(), [], []
        for ann_id in ids:
            row = found.get(ann_id)
            if row is not None and row.deleted:
                continue
            seq += 1
            if row is None:
                inserts.append({"project_id": project_id, "annotation_id": ann_id, "task_id": None, "annotator": "",
                                "result": [], "values": {}, "task_data": {}, "cancelled": False, "deleted": True,
                                "hard": False, "source": "webhook", "ls_updated_at": now, "seq": seq,
                                "created_at": now, "updated_at": now})
            else:
                updates.append({"row_id": row.id, "new_seq": seq, "now": now})
        if inserts:
            s.execute(_ANNOTATIONS.insert(), inserts)
        if updates:
            s.execute(_TOMBSTONE, updates)
        if inserts or updates:
            s.execute(_SET_SEQ, {"p": project_id, "seq": seq})
        return len(inserts) + len(updates)

    def labels(self, project_id: str, include_inactive: bool = False) -> list[Annotation]:
        with self.session() as s:
            q = select(Annotation).where(Annotation.project_id == project_id)
            if not include_inactive:
                q = q.where(Annotation.deleted.is_(False), Annotation.cancelled.is_(False))
            return list(s.scalars(q.order_by(Annotation.task_id, Annotation.annotation_id)))

    def count_labels(self, project_id: str) -> int:
        with self.session() as s:
            return int(
                s.scalar(
                    select(func.count()).where(
                        Annotation.project_id == project_id,
                        Annotation.deleted.is_(False),
                        Annotation.cancelled.is_(False),
                    )
                )
                or 0
            )

    def pending_changes(self, project_id: str) -> int:
        """Labels added or changed since the last successful training, or since what a running one took."""
        with self.session() as s:
            project = s.get(Project, project_id)
            if project is None:
                return 0
            running = s.scalar(
                select(func.max(TrainingRun.seq_snapshot)).where(
                    TrainingRun.project_id == project_id, TrainingRun.status == "running"
                )
            )
            mark = max(project.trained_seq, running or 0)
            return int(
                s.scalar(select(func.count()).where(Annotation.project_id == project_id, Annotation.seq > mark))
                or 0
            )

    def set_flags(self, project_id: str, **flags: bool) -> None:
        with self.write_session() as s:
            s.execute(update(Project).where(Project.id == project_id).values(**flags))

    def requested(self) -> list[Project]:
        with self.session() as s:
            return list(
                s.scalars(
                    select(Project).where(Project.training_requested.is_(True) | Project.sync_requested.is_(True))
                )
            )

    # -- training runs and adapters -------------------------------------------------------------------
    def start_run(self, project_id: str, job_id: str, trigger: str) -> TrainingRun:
        with self.write_session() as s:
            stale = s.scalars(
                select(TrainingRun).where(TrainingRun.project_id == project_id, TrainingRun.status == "running")
            )
            for run in stale:  # a previous attempt of this job was killed: it never finished
                run.status = "abandoned"
                run.finished_at = utcnow()
            project = s.get(Project, project_id)
            snapshot = project.label_seq if project else 0
            run = TrainingRun(project_id=project_id, job_id=job_id, trigger=trigger, seq_snapshot=snapshot)
            s.add(run)
            s.flush()
            return run

    def finish_run(self, run_id: int, status: str, advance_watermark: bool = True, **fields: Any) -> None:
        """advance_watermark=False (continual runs on the hard pool): labels that came meanwhile stay pending."""
        with self.write_session() as s:
            run = s.get(TrainingRun, run_id)
            if run is None:
                return
            run.status = status
            run.finished_at = utcnow()
            for key, value in fields.items():
                setattr(run, key, value)
            if status in {"promoted", "refused", "skipped"} and advance_watermark:
                project = s.get(Project, run.project_id)
                if project is not None and run.seq_snapshot > project.trained_seq:
                    project.trained_seq = run.seq_snapshot
                    project.training_requested = False

    def interrupt_runs(self, job_id: str) -> int:
        """The job's running runs end as `interrupted` (its worker was stopped); RQ retries the job later."""
        with self.write_session() as s:
            runs = list(s.scalars(select(TrainingRun).where(TrainingRun.job_id == job_id,
                                                            TrainingRun.status == "running")))
            for run in runs:
                run.status, run.finished_at = "interrupted", utcnow()
                run.error = "the worker was stopped (SIGTERM) during the run; the job is retried later"
            return len(runs)

    def record_run(self, project_id: str, trigger: str, status: str, error: str = "") -> TrainingRun:
        """A run that is over as it starts (a failed sync): running runs are left alone, the watermark too."""
        with self.write_session() as s:
            _ensure_project(s, project_id)
            now = utcnow()
            run = TrainingRun(project_id=project_id, job_id=trigger, trigger=trigger, status=status, error=error,
                              started_at=now, finished_at=now)
            s.add(run)
            s.flush()
            return run

    def latest_failures(self, limit: int = 20) -> list[TrainingRun]:
        """Per project, its latest training run and its latest sync if they failed: /health's "degraded"."""
        with self.session() as s:
            # syncs apart: a training that ran on the stored labels does not make a failing sync good
            latest = select(func.max(TrainingRun.id)).group_by(
                TrainingRun.project_id, TrainingRun.trigger == "sync").scalar_subquery()
            return list(s.scalars(select(TrainingRun).where(TrainingRun.id.in_(latest), TrainingRun.status == "failed")
                                  .order_by(TrainingRun.finished_at).limit(limit)))

    def runs(self, project_id: str) -> list[TrainingRun]:
        with self.session() as s:
            return list(
                s.scalars(select(TrainingRun).where(TrainingRun.project_id == project_id).order_by(TrainingRun.id))
            )

    def next_adapter_version(self, project_id: str) -> int:
        with self.session() as s:
            top = s.scalar(select(func.max(AdapterVersion.version)).where(AdapterVersion.project_id == project_id))
            return int(top or 0) + 1

    def add_adapter(self, adapter: AdapterVersion, serve: bool,
                    expected_served: int | EllipsisType | None = ...) -> AdapterVersion:
        """Records a trained adapter; `serve` makes it the project's one served adapter in one transaction.

        `expected_served`: the version the run's gate compared with (None: the base). A compare-and-set: if
        another version is served now (a rollback, another run), ServedChanged is raised and nothing is stored,
        so a rollback made during a run is never undone unseen.
        """
        with self.write_session() as s:
            if serve and expected_served is not ...:
                _check_served(s, adapter.project_id, expected_served)
            if serve:
                s.execute(
                    update(AdapterVersion)
                    .where(AdapterVersion.project_id == adapter.project_id, AdapterVersion.status == "served")
                    .values(status="retired")
                )
                adapter.promoted_at = adapter.created_at = utcnow()  # equal: promoted by its run, not re-served
            s.add(adapter)
            s.flush()
            return adapter

    def head_labels(self, project_id: str) -> int:
        """How many labels the project's newest embedding head was trained on (0: none yet)."""
        found = [(a.metrics or {}).get("head", {}).get("labels", 0) for a in self.adapters(project_id)]
        return max((int(n) for n in found if isinstance(n, int | float)), default=0)

    def all_label_counts(self) -> dict[str, int]:
        """Active labels per project, in one query (/metrics scrapes every project at once)."""
        with self.session() as s:
            rows = s.execute(select(Annotation.project_id, func.count()).where(
                Annotation.deleted.is_(False), Annotation.cancelled.is_(False)).group_by(Annotation.project_id))
            return {pid: int(n) for pid, n in rows}

    def all_served(self) -> dict[str, AdapterVersion]:
        """Every project's served version, in one query."""
        with self.session() as s:
            return {a.project_id: a for a in s.scalars(select(AdapterVersion).where(AdapterVersion.status == "served"))}

    def all_run_counts(self) -> dict[tuple[str, str], int]:
        """Runs per (project, status), in one query."""
        with self.session() as s:
            rows = s.execute(select(TrainingRun.project_id, TrainingRun.status, func.count())
                             .group_by(TrainingRun.project_id, TrainingRun.status))
            return {(pid, status): int(n) for pid, status, n in rows}

    def all_latest_finished(self) -> dict[str, TrainingRun]:
        """Per project its latest finished run, in one query."""
        latest = select(TrainingRun.project_id, func.max(TrainingRun.finished_at).label("at")).where(
            TrainingRun.finished_at.is_not(None)).group_by(TrainingRun.project_id).subquery()
        with self.session() as s:
            rows = s.scalars(select(TrainingRun).join(latest, (TrainingRun.project_id == latest.c.project_id)
                                                      & (TrainingRun.finished_at == latest.c.at)))
            return {r.project_id: r for r in rows}

    def served_adapter(self, project_id: str) -> AdapterVersion | None:
        with self.session() as s:
            return s.scalars(
                select(AdapterVersion).where(
                    AdapterVersion.project_id == project_id, AdapterVersion.status == "served"
                )
            ).first()

    def adapters(self, project_id: str) -> list[AdapterVersion]:
        with self.session() as s:
            return list(
                s.scalars(
                    select(AdapterVersion)
                    .where(AdapterVersion.project_id == project_id)
                    .order_by(AdapterVersion.version)
                )
            )

    def serve_version(self, project_id: str, version: int) -> AdapterVersion:
        """Rollback (or forward) to a stored adapter: one transaction flips which one is served."""
        with self.write_session() as s:
            s.execute(_LOCK_PROJECT, {"p": project_id})  # serialised with a run's compare-and-set (PostgreSQL)
            target = s.scalars(
                select(AdapterVersion).where(
                    AdapterVersion.project_id == project_id, AdapterVersion.version == version
                )
            ).first()
            if target is None:
                raise KeyError(f"project {project_id} has no adapter version {version}")
            s.execute(
                update(AdapterVersion)
                .where(AdapterVersion.project_id == project_id, AdapterVersion.status == "served")
                .values(status="retired")
            )
            target.status = "served"
            target.promoted_at = utcnow()
            return target

    def unserve(self, project_id: str) -> None:
        with self.write_session() as s:
            s.execute(_LOCK_PROJECT, {"p": project_id})  # serialised with a run's compare-and-set (PostgreSQL)
            s.execute(
                update(AdapterVersion)
                .where(AdapterVersion.project_id == project_id, AdapterVersion.status == "served")
                .values(status="retired")
            )

    # -- predictions ---------------------------------------------------------------------------------
    def record_predictions(self, project_id: str, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        with self.write_session() as s:
            _ensure_project(s, project_id)
            for row in rows:
                existing = s.scalars(
                    select(Prediction).where(
                        Prediction.project_id == project_id,
                        Prediction.task_id == row["task_id"],
                        Prediction.model_version == row["model_version"],
                    )
                ).first()
                if existing is None:
                    s.add(Prediction(project_id=project_id, **row))
                else:
                    for key in ("values", "score", "uncertainty", "route"):
                        if key in row:
                            setattr(existing, key, row[key])

    def latest_route(self, project_id: str, task_id: int) -> str:
        """Where the task's latest prediction was sent ("" when it was not routed or never predicted)."""
        with self.session() as s:
            route = s.scalar(
                select(Prediction.route).where(Prediction.project_id == project_id, Prediction.task_id == task_id)
                .order_by(Prediction.id.desc()).limit(1)
            )
            return route or ""

    # -- the hard-sample pool and per-route usage -------------------------------------------------------
    def add_hard_sample(self, project_id: str, task_id: int, source: str, annotator: str, values: dict[str, Any],
                        task_data: dict[str, Any]) -> None:
        """One sample per (task, source, annotator); a newer answer replaces the older one."""
        for attempt in range(2):
            try:
                with self.write_session() as s:
                    _ensure_project(s, project_id)
                    _put_hard_sample(s, project_id, task_id, source, annotator, values, task_data)
                    return
            except IntegrityError:
                if attempt:
                    raise

    def hard_pool(self, project_id: str, unused_only: bool = True) -> list[HardSample]:
        with self.session() as s:
            q = select(HardSample).where(HardSample.project_id == project_id)
            if unused_only:
                q = q.where(HardSample.run_id.is_(None))
            return list(s.scalars(q.order_by(HardSample.id)))

    def count_hard_pool(self, project_id: str) -> int:
        """Pool items not yet trained on, counted by task (a judge's and a human's answer are one item)."""
        with self.session() as s:
            return int(s.scalar(
                select(func.count(func.distinct(HardSample.task_id)))
                .where(HardSample.project_id == project_id, HardSample.run_id.is_(None))
            ) or 0)

    def mark_pool_used(self, project_id: str, ids: list[int], run_id: int) -> None:
        if not ids:
            return
        with self.write_session() as s:
            s.execute(update(HardSample).where(HardSample.project_id == project_id, HardSample.id.in_(ids))
                      .values(run_id=run_id))

    def add_usage(self, project_id: str, route: str, items: int = 0, failures: int = 0, prompt_tokens: int = 0,
                  completion_tokens: int = 0, seconds: float = 0.0) -> None:
        """Adds to the running totals in one statement, so concurrent requests and processes never lose counts."""
        delta = {"items": items, "failures": failures, "prompt_tokens": prompt_tokens,
                 "completion_tokens": completion_tokens, "seconds": seconds}
        table = RouteUsage.__table__
        stmt = update(table).where(table.c.project_id == project_id, table.c.route == route).values(
            {k: table.c[k] + v for k, v in delta.items()})
        for attempt in range(3):
            try:
                with self.write_session() as s:
                    if s.execute(stmt).rowcount:
                        return
                    _ensure_project(s, project_id)
                    s.execute(table.insert(), {"project_id": project_id, "route": route, **delta})
                    return
            except IntegrityError:
                if attempt == 2:
                    raise

    def usage(self, project_id: str | None = None) -> list[RouteUsage]:
        with self.session() as s:
            q = select(RouteUsage)
            if project_id is not None:
                q = q.where(RouteUsage.project_id == project_id)
            return list(s.scalars(q.order_by(RouteUsage.project_id, RouteUsage.route)))

    def predictions(self, project_id: str, model_version: str | None = None) -> list[Prediction]:
        with self.session() as s:
            q = select(Prediction).where(Prediction.project_id == project_id)
            if model_version:
                q = q.where(Prediction.model_version == model_version)
            return list(s.scalars(q.order_by(Prediction.task_id)))

    # -- the prediction cache ---------------------------------------------------------------------------
    # In the SQL store rather than Redis: it must survive a restart (a re-opened project costs nothing the
    # day after), it is read and written next to the predictions it mirrors, and SQLite needs no extra service.
    # Redis here is a queue (an LRU-evicting Redis would silently drop jobs); the cache is bounded by evicting
    # whole model versions instead (PREDICT_CACHE_VERSIONS per project), which is also when entries go stale.
    def cached_predictions(self, project_id: str, model_version: str, variant: str,
                           keys: dict[int, str]) -> dict[int, tuple[list[Any], float]]:
        """{task_id: (result, score)} for the tasks whose cached entry was computed from the same texts."""
        out: dict[int, tuple[list[Any], float]] = {}
        ids = list(keys)
        with self.session() as s:
            for start in range(0, len(ids), ID_BATCH):
                rows = s.execute(select(
                    CachedPrediction.task_id, CachedPrediction.data_hash, CachedPrediction.result,
                    CachedPrediction.score,
                ).where(CachedPrediction.project_id == project_id, CachedPrediction.model_version == model_version,
                        CachedPrediction.variant == variant,
                        CachedPrediction.task_id.in_(ids[start : start + ID_BATCH])))
                for row in rows:
                    if keys.get(row.task_id) == row.data_hash:
                        out[row.task_id] = (row.result, row.score)
        return out

    def cache_predictions(self, project_id: str, model_version: str, variant: str,
                          rows: list[tuple[int, str, list[Any], float]], keep_versions: int = 2) -> None:
        """Stores (task_id, data_hash, result, score) rows; the first row of a new version evicts all but the
        `keep_versions` newest versions of the project."""
        rows = list({r[0]: r for r in rows}.values())  # a task sent twice in one request: one entry, the last
        if not rows:
            return
        ids = [r[0] for r in rows]
        table = CachedPrediction.__table__
        for attempt in range(3):
            try:
                with self.write_session() as s:
                    _ensure_project(s, project_id)
                    new = s.scalar(select(CachedPrediction.id).where(
                        CachedPrediction.project_id == project_id, CachedPrediction.model_version == model_version,
                    ).limit(1)) is None
                    if new:
                        self._evict_versions(s, project_id, max(0, keep_versions - 1))
                    for start in range(0, len(ids), ID_BATCH):
                        s.execute(delete(table).where(
                            table.c.project_id == project_id, table.c.model_version == model_version,
                            table.c.variant == variant, table.c.task_id.in_(ids[start : start + ID_BATCH])))
                    now = utcnow()
                    s.execute(table.insert(), [
                        {"project_id": project_id, "task_id": t, "data_hash": h, "model_version": model_version,
                         "variant": variant, "result": result, "score": float(score), "created_at": now}
                        for t, h, result, score in rows
                    ])
                    return
            except IntegrityError:  # a concurrent writer of the same entries: take theirs or write again
                if attempt == 2:
                    raise

    def _evict_versions(self, s: Session, project_id: str, keep: int) -> None:
        newest = [r[0] for r in s.execute(
            select(CachedPrediction.model_version).where(CachedPrediction.project_id == project_id)
            .group_by(CachedPrediction.model_version).order_by(func.max(CachedPrediction.created_at).desc()))]
        gone = newest[keep:]
        if gone:
            s.execute(delete(CachedPrediction).where(CachedPrediction.project_id == project_id,
                                                     CachedPrediction.model_version.in_(gone)))

    def cached_versions(self, project_id: str) -> dict[str, int]:
        with self.session() as s:
            return {v: int(n) for v, n in s.execute(
                select(CachedPrediction.model_version, func.count()).where(CachedPrediction.project_id == project_id)
                .group_by(CachedPrediction.model_version))}

    # -- predictions pushed to Label Studio: one writer per (task, version) --------------------------------
    def _push_rows(self, s: Session, project_id: str, model_version: str, ids: list[int]) -> dict[int, Any]:
        found: dict[int, Any] = {}
        for start in range(0, len(ids), ID_BATCH):
            for row in s.execute(select(
                PushedPrediction.id, PushedPrediction.task_id, PushedPrediction.state, PushedPrediction.owner,
                PushedPrediction.updated_at,
            ).where(PushedPrediction.project_id == project_id, PushedPrediction.model_version == model_version,
                    PushedPrediction.task_id.in_(ids[start : start + ID_BATCH]))):
                found[row.task_id] = row
        return found

    def _take(self, s: Session, row: Any, state: str, owner: str) -> bool:
        """Moves a row to (state, owner) if nobody changed it since it was read."""
        table = PushedPrediction.__table__
        return bool(s.execute(update(table).where(
            table.c.id == row.id, table.c.state == row.state, table.c.owner == row.owner,
            table.c.updated_at == row.updated_at,
        ).values(state=state, owner=owner, updated_at=utcnow())).rowcount)

    def reply_claims(self, project_id: str, model_version: str, task_ids: list[int],
                     stale_seconds: float = CLAIM_STALE_SECONDS) -> int:
        """How many of `task_ids` (in order) a /predict reply may carry, marked "replied": it stops before the
        first task that a bulk job wrote or holds, so Label Studio and the job never both store one."""
        table = PushedPrediction.__table__
        for attempt in range(3):
            try:
                with self.write_session() as s:
                    _ensure_project(s, project_id)
                    rows = self._push_rows(s, project_id, model_version, task_ids)
                    now, allowed, inserts, mine = utcnow(), 0, [], set()
                    for tid in task_ids:
                        if tid in mine:  # the same task twice in one request: already this reply's
                            allowed += 1
                            continue
                        mine.add(tid)
                        row = rows.get(tid)
                        if row is None:
                            inserts.append({"project_id": project_id, "task_id": tid, "model_version": model_version,
                                            "state": "replied", "owner": "predict", "updated_at": now})
                        else:
                            held = row.state == "done" or (
                                row.state == "claimed" and (now - row.updated_at).total_seconds() < stale_seconds)
                            if held or not self._take(s, row, "replied", "predict"):
                                break
                        allowed += 1
                    if inserts:
                        s.execute(table.insert(), inserts)
                    return allowed
            except IntegrityError:  # a bulk job claimed one of them meanwhile: read again
                if attempt == 2:
                    raise
        return 0

    def claim_pushes(self, project_id: str, model_version: str, task_ids: list[int], owner: str,
                     stale_seconds: float = CLAIM_STALE_SECONDS,
                     reply_grace: float = REPLY_GRACE_SECONDS,
                     recheck_done: bool = False, dead_owners: Collection[str] = ()) -> tuple[list[int], list[int]]:
        """Claims tasks for `owner` (a bulk job) before it scores and writes them.

        Returns (fresh, verify): `fresh` nobody ever wrote; `verify` Label Studio may already hold (this job's
        own claim from a crashed attempt, a dead job's stale claim, an old /predict reply): look before writing.
        Tasks already written, held by a live job, or just replied to /predict are left out; with `recheck_done`
        the written ones are looked up again too (someone may have deleted them in Label Studio). Claims of
        `dead_owners` (workers of the run whose heartbeat lapsed) are taken over at once, not after stale_seconds.
        """
        table = PushedPrediction.__table__
        for attempt in range(3):
            try:
                with self.write_session() as s:
                    _ensure_project(s, project_id)
                    rows = self._push_rows(s, project_id, model_version, task_ids)
                    now, fresh, verify, inserts = utcnow(), [], [], []
                    for tid in dict.fromkeys(task_ids):
                        row = rows.get(tid)
                        if row is None:
                            inserts.append({"project_id": project_id, "task_id": tid, "model_version": model_version,
                                            "state": "claimed", "owner": owner, "updated_at": now})
                            fresh.append(tid)
                            continue
                        age = (now - row.updated_at).total_seconds()
                        mine = row.state == "claimed" and row.owner == owner
                        stale = (row.state == "claimed" and (age >= stale_seconds or row.owner in dead_owners)) or \
                            (row.state == "replied" and age >= reply_grace) or (row.state == "done" and recheck_done)
                        if (mine or stale) and self._take(s, row, "claimed", owner):
                            verify.append(tid)
                    if inserts:
                        s.execute(table.insert(), inserts)
                    return fresh, verify
            except IntegrityError:
                if attempt == 2:
                    raise
        return [], []

    def finish_pushes(self, project_id: str, model_version: str, task_ids: list[int], owner: str) -> None:
        """The owner's claimed tasks are in Label Studio now."""
        self._set_claimed(project_id, model_version, task_ids, owner, "done")

    def release_pushes(self, project_id: str, model_version: str, task_ids: list[int], owner: str) -> None:
        """The owner gives tasks up unwritten (bad data, an error): another request or job may take them."""
        self._set_claimed(project_id, model_version, task_ids, owner, None)

    def unreply(self, project_id: str, model_version: str, task_ids: list[int]) -> None:
        """A /predict reply that will not carry these tasks after all (reply_claims marked them)."""
        self._set_claimed(project_id, model_version, task_ids, "predict", None, held="replied")

    def _set_claimed(self, project_id: str, model_version: str, task_ids: list[int], owner: str,
                     state: str | None, held: str = "claimed") -> None:
        table = PushedPrediction.__table__
        with self.write_session() as s:
            for start in range(0, len(task_ids), ID_BATCH):
                where = (table.c.project_id == project_id, table.c.model_version == model_version,
                         table.c.owner == owner, table.c.state == held,
                         table.c.task_id.in_(task_ids[start : start + ID_BATCH]))
                if state is None:
                    s.execute(delete(table).where(*where))
                else:
                    s.execute(update(table).where(*where).values(state=state, updated_at=utcnow()))

    # -- bulk prediction runs --------------------------------------------------------------------------
    def start_bulk_run(self, run_id: str, project_id: str, model_version: str, mode: str, total: int) -> None:
        """A run (or its retry: the counts carry on, they live with its chunks) is running."""
        with self.write_session() as s:
            _ensure_project(s, project_id)
            run = s.get(BulkRun, run_id)
            if run is None:
                s.add(BulkRun(id=run_id, project_id=project_id, model_version=model_version, mode=mode, total=total,
                              status="running", last_error=""))
            else:
                run.status, run.total, run.finished_at, run.updated_at = "running", total, None, utcnow()

    def update_bulk_run(self, run_id: str, finished: bool = False, **fields: Any) -> None:
        """Sets the given columns; counts never go back (workers mirror them in any order)."""
        table = BulkRun.__table__
        values: dict[str, Any] = {"updated_at": utcnow()}
        for key, value in fields.items():
            column = table.c[key]
            values[key] = case((column < value, value), else_=column) if key in _BULK_COUNTS else value
        if finished:
            values["finished_at"] = utcnow()
        with self.write_session() as s:
            s.execute(update(table).where(table.c.id == run_id).values(**values))

    def bulk_runs(self, project_id: str, limit: int = 10) -> list[BulkRun]:
        """The project's latest runs, newest first."""
        with self.session() as s:
            return list(s.scalars(select(BulkRun).where(BulkRun.project_id == project_id)
                                  .order_by(BulkRun.started_at.desc(), BulkRun.id.desc()).limit(limit)))

    def latest_bulk_runs(self) -> dict[str, BulkRun]:
        """Per project, its latest run (/metrics, /health): one grouped query."""
        with self.session() as s:
            newest = (select(BulkRun.project_id, func.max(BulkRun.started_at).label("at"))
                      .group_by(BulkRun.project_id).subquery())
            rows = s.scalars(select(BulkRun).join(newest, (BulkRun.project_id == newest.c.project_id)
                                                  & (BulkRun.started_at == newest.c.at)))
            return {r.project_id: r for r in rows}

    def push_states(self, project_id: str, model_version: str) -> dict[int, str]:
        with self.session() as s:
            return {r.task_id: r.state for r in s.execute(
                select(PushedPrediction.task_id, PushedPrediction.state)
                .where(PushedPrediction.project_id == project_id, PushedPrediction.model_version == model_version))}
