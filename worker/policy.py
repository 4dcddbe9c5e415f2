"""When to train: a per-project watermark and threshold, and exactly one queued job per project."""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

from redis import Redis
from redis.exceptions import RedisError
from rq import Queue, Retry
from rq.exceptions import DuplicateJobError, NoSuchJobError
from rq.job import Job, JobStatus

from slm_annotator import project_settings
from slm_annotator.settings import Settings
from slm_annotator.store import Store

log = logging.getLogger(__name__)
QUEUE_NAME = "slm-annotator"
HEAD_QUEUE = "slm-annotator-heads"  # seconds-long head trainings: their own worker, never behind an adapter run
# Bulk predictions (worker.bulk): their own queue, served by the heads worker after its heads (a head never waits
# behind a queued bulk job; it may wait for one chunk-writing job to finish) and by a dedicated `--queue bulk`.
BULK_QUEUE = "slm-annotator-bulk"
QUEUES = {"training": (QUEUE_NAME,), "heads": (HEAD_QUEUE, BULK_QUEUE), "bulk": (BULK_QUEUE,),
          "all": (HEAD_QUEUE, QUEUE_NAME, BULK_QUEUE)}  # worker --queue
ACTIVE = {JobStatus.QUEUED, JobStatus.STARTED, JobStatus.SCHEDULED, JobStatus.DEFERRED}
MAX_MEMBERS = project_settings.MAX_MEMBERS  # ensemble members: each is a trained adapter and a forward pass per task
ACTIVE_CACHE_SECONDS = 2.0  # a burst of webhooks while a job is queued or running skips the Redis round trips


def job_id(project_id: str) -> str:
    return f"train-{project_id}"


def head_job_id(project_id: str) -> str:
    return f"head-{project_id}"


def threshold_for(settings: Settings, extra_params: dict[str, Any] | None) -> int:
    value = project_settings.stored(extra_params).train_threshold
    return settings.train_threshold if value is None else value


def members_for(settings: Settings, extra_params: dict[str, Any] | None) -> int:
    """k, the ensemble size (ENSEMBLE, extra_params "ensemble" per project): adapters trained, members voting."""
    return min(project_settings.stored(extra_params).ensemble or settings.ensemble, MAX_MEMBERS)


def head_every_for(settings: Settings, extra_params: dict[str, Any] | None) -> int:
    """New labels between two head trainings (HEAD_EVERY, extra_params "head_every"); 0: no heads."""
    if settings.head_every <= 0:
        return 0
    return project_settings.stored(extra_params).head_every or settings.head_every


def rater_weighting_for(settings: Settings, extra_params: dict[str, Any] | None) -> str:
    """How much each rater's vote counts in training (RATER_WEIGHTING, extra_params training.rater_weighting)."""
    return project_settings.stored(extra_params).training.rater_weighting or settings.rater_weighting


def prefill_bar_for(settings: Settings, extra_params: dict[str, Any] | None) -> float | None:
    """The alpha a dimension needs to be pre-filled (extra_params "prefill_min_alpha"; -1 pre-fills every
    measured dimension); None: no bar (PREFILL_MIN_ALPHA=none)."""
    value = project_settings.stored(extra_params).prefill_min_alpha
    return settings.prefill_min_alpha if value is None else value


def pool_size_for(settings: Settings, extra_params: dict[str, Any] | None) -> int:
    """beta: hard samples that start a continual fine-tuning run (extra_params "hard_pool_size" per project)."""
    return project_settings.stored(extra_params).hard_pool_size or settings.hard_pool_size


def pool_due(settings: Settings, store: Store, project_id: str, project: Any = None) -> bool:
    project = project if project is not None else store.project(project_id)
    extra = project.extra_params if project else {}
    return store.count_hard_pool(project_id) >= pool_size_for(settings, extra)


def due(settings: Settings, store: Store, project_id: str, project: Any = None) -> bool:
    """Enough new labels since the last training (or since what a running one took), a full hard-sample pool,
    or already requested."""
    project = project if project is not None else store.project(project_id)
    if project is not None and project.training_requested:
        return True
    extra = project.extra_params if project else {}
    if store.pending_changes(project_id) >= threshold_for(settings, extra):
        return True
    return pool_due(settings, store, project_id, project)


def enqueue_once(conn: Redis, queue_name: str, func: str, *args: Any, job_id: str, **options: Any) -> str:
    """Queues `func` under a fixed job id once: a job of that id already queued or running absorbs the request;
    a finished or failed one frees its id for the next. "queued" or "already queued"."""
    queue = Queue(queue_name, connection=conn)
    for _ in range(3):
        try:
            queue.enqueue(func, *args, job_id=job_id, unique=True, **options)
            return "queued"
        except DuplicateJobError:
            try:
                job = Job.fetch(job_id, connection=conn)
            except NoSuchJobError:
                continue
            if job.get_status(refresh=True) in ACTIVE:
                return "already queued"
            _free_job_id(conn, job)
    return "already queued"


def enqueue_training(conn: Redis, settings: Settings, project_id: str, trigger: str) -> str:
    """Queues the project's training job once; a job already queued or running absorbs the trigger."""
    delays = list(settings.train_retry_delays) or 0
    retry = Retry(max=settings.train_retries, interval=delays) if settings.train_retries else None
    return enqueue_once(conn, QUEUE_NAME, "slm_annotator.worker.jobs.train_project", project_id, trigger,
                        job_id=job_id(project_id), job_timeout=settings.train_job_timeout, result_ttl=86400,
                        failure_ttl=7 * 86400, retry=retry,
                        description=f"train adapter for project {project_id} ({trigger})")


def enqueue_head(conn: Redis, settings: Settings, project_id: str) -> str:
    """Queues the project's head training once (seconds of CPU); one already queued absorbs the request."""
    return enqueue_once(conn, HEAD_QUEUE, "slm_annotator.worker.jobs.train_head", project_id,
                        job_id=head_job_id(project_id), job_timeout=600, result_ttl=3600, failure_ttl=86400,
                        description=f"train embedding head for {project_id}")


def bulk_job_id(project_id: str, model_version: str, mode: str, task_ids: list[int] | None = None) -> str:
    """One job per project, version and mode; a /predict remainder per its task ids."""
    key = model_version + ("" if task_ids is None else ":" + ",".join(map(str, task_ids)))
    return f"bulk-{project_id}-{mode}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def enqueue_bulk(conn: Redis, settings: Settings, project_id: str, model_version: str, mode: str,
                 tasks: list[dict[str, Any]] | None = None, order: str = "") -> tuple[str, str]:
    """Queues a bulk prediction job (slm_annotator.worker.bulk.bulk_predict) once; returns (state, job id). Retried
    after a failure (Label Studio down): every retry first checks what an earlier attempt already wrote."""
    ids = [t["id"] for t in tasks] if tasks is not None else None
    jid = bulk_job_id(project_id, model_version, mode, ids)
    state = enqueue_once(conn, BULK_QUEUE, "slm_annotator.worker.bulk.bulk_predict", project_id, model_version, mode,
                         tasks, order, job_id=jid, job_timeout=settings.bulk_job_timeout, result_ttl=86400,
                         failure_ttl=7 * 86400, retry=Retry(max=3, interval=[30, 120, 600]),
                         description=f"predict {mode} tasks of project {project_id} with {model_version}")
    return state, jid


def _free_job_id(conn: Redis, job: Job) -> None:
    """Deletes a finished job; RQ's delete trips over executions a killed worker left behind ("Execution ... not
    found in Redis"), and then only the job's key goes, which is all that unique=True looks at."""
    try:
        job.delete()
    except (RedisError, OSError):
        raise
    except Exception as exc:
        log.warning("finished job %s did not delete cleanly (%s); removing its key", job.id, exc)
        conn.delete(job.key)


@dataclass
class Trigger:
    """Decides and enqueues from the request path without ever making Label Studio wait on Redis."""

    settings: Settings
    store: Store
    conn_factory: Any
    _down_until: float = 0.0

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._conn: Redis | None = None
        self._active_until: dict[str, float] = {}
        self._head_marks: dict[str, int] = {}  # labels counted when this process last queued a head
        self._head_busy_until: dict[str, float] = {}

    def _connection(self) -> Redis:
        if self._conn is None:
            self._conn = self.conn_factory()
        return self._conn

    def maybe_train(self, project_id: str, force: bool = False, trigger: str = "threshold") -> str:
        if not force and time.monotonic() < self._active_until.get(project_id, 0.0):
            return "already queued"  # a job was seen queued or running within the last seconds: no DB/Redis work
        project = self.store.project(project_id)
        if not force and not due(self.settings, self.store, project_id, project):
            return "below threshold"
        if project is None or not project.training_requested:
            self.store.set_flags(project_id, training_requested=True)  # durable intent before touching Redis
        state = self.flush(project_id, trigger)
        if state in {"queued", "already queued"}:
            self._active_until[project_id] = time.monotonic() + ACTIVE_CACHE_SECONDS
        return state

    def flush(self, project_id: str, trigger: str = "threshold") -> str:
        if time.monotonic() < self._down_until:
            return "deferred: redis unavailable"
        try:
            with self._lock:
                state = enqueue_training(self._connection(), self.settings, project_id, trigger)
        except (RedisError, OSError) as exc:
            self._down_until = time.monotonic() + 2.0
            self._conn = None
            log.warning("redis unavailable, training of project %s stays requested: %s", project_id, exc)
            return "deferred: redis unavailable"
        except Exception:  # the label is stored: a queue problem must not fail its webhook; the flusher retries
            log.exception("could not queue training of project %s; it stays requested", project_id)
            return "deferred: queue error"
        return state

    def maybe_head(self, project_id: str) -> str:
        """Queues a head training once HEAD_EVERY labels arrived since the last one (a label count, not a
        watermark: heads retrain on everything in seconds, so a missed trigger only waits for the next label)."""
        project = self.store.project(project_id)
        every = head_every_for(self.settings, project.extra_params if project else {})
        if every <= 0:
            return "off"
        count = self.store.count_labels(project_id)
        last = self._head_marks.get(project_id)
        if last is None:
            last = self.store.head_labels(project_id)
        if count - last < every:
            return "below threshold"
        if time.monotonic() < self._head_busy_until.get(project_id, 0.0):
            return "already queued"
        if time.monotonic() < self._down_until:
            return "deferred: redis unavailable"
        try:
            with self._lock:
                state = enqueue_head(self._connection(), self.settings, project_id)
        except (RedisError, OSError) as exc:
            self._down_until = time.monotonic() + 2.0
            self._conn = None
            log.warning("redis unavailable, head of project %s waits for the next label: %s", project_id, exc)
            return "deferred: redis unavailable"
        if state == "queued":
            self._head_marks[project_id] = count
        else:  # a head is running: it re-trains on what arrives meanwhile; ask again in a moment, not per label
            self._head_busy_until[project_id] = time.monotonic() + ACTIVE_CACHE_SECONDS
        return state

    def bulk(self, project_id: str, model_version: str, tasks: list[dict[str, Any]]) -> str:
        """Queues the tasks a /predict could not score within its budget; never raises (the reply goes out)."""
        if time.monotonic() < self._down_until:
            return "deferred: redis unavailable"
        try:
            with self._lock:
                return enqueue_bulk(self._connection(), self.settings, project_id, model_version, "request",
                                    tasks)[0]
        except (RedisError, OSError) as exc:
            self._down_until = time.monotonic() + 2.0
            self._conn = None
            log.warning("redis unavailable: %d tasks of project %s were not queued for prediction: %s",
                        len(tasks), project_id, exc)
            return "deferred: redis unavailable"
        except Exception:
            log.exception("could not queue the bulk prediction of project %s", project_id)
            return "deferred: queue error"

    def flush_all(self) -> None:
        """Re-sends requests that could not reach Redis earlier (called periodically)."""
        for project in self.store.requested():
            if project.training_requested:
                self.flush(project.id, "recovered")
