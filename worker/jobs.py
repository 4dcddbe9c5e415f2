"""RQ job entry points. Each one is safe to run twice: retries after a crash start over cleanly."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import traceback
from typing import Any

from redis.exceptions import RedisError
from rq import get_current_job

from slm_annotator.model.rubric import RubricError
from slm_annotator.settings import Settings, load_settings
from slm_annotator.store import Store
from slm_annotator.worker.pipeline import run_training
from slm_annotator.worker.policy import due, head_every_for, pool_due
from slm_annotator.worker.sync import SyncError, sync_project

log = logging.getLogger(__name__)
PR_SET_PDEATHSIG = 1


def promoted_version(store: Store, project_id: str, outcome: Any) -> int | None:
    """The adapter version a run promoted (recorded on the run), None when it promoted nothing."""
    if outcome.status != "promoted":
        return None
    served = store.served_adapter(project_id)
    return served.version if served is not None and served.model_version == outcome.model_version else None


def die_with_worker() -> None:
    """The RQ work horse running this job dies when its worker dies, even by SIGKILL (Linux).

    RQ forks the horse into a process group of its own, so killing the worker (or its group) would leave the
    horse training on, unseen, while RQ retries the job elsewhere: two trainings of one project at once.
    """
    if get_current_job() is None or not sys.platform.startswith("linux"):
        return  # inline (CLI, tests): no worker to die with
    worker = os.getppid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError) as exc:
        log.warning("cannot tie the work horse to its worker: %s", exc)
        return
    if os.getppid() != worker:  # the worker died before prctl took effect
        os._exit(1)


def _progress(update: dict[str, Any]) -> None:
    """Progress goes to the job's meta in Redis: informational, so a Redis blip must not end the training."""
    job = get_current_job()
    step = update.get("step")
    if step and (step == 1 or step % 5 == 0 or step == update.get("total_steps")):
        log.info("training progress %s", update)
    if job is not None:
        job.meta.update(update)
        try:
            job.save_meta()
        except RedisError as exc:
            log.warning("training progress not saved (Redis unreachable: %s); training goes on", exc)


def train_project(project_id: str, trigger: str = "threshold", continual: bool = False) -> dict[str, Any]:
    die_with_worker()
    settings = load_settings()
    store = Store(settings.database_url)
    job = get_current_job()
    project = store.project(project_id)
    if project is not None and project.sync_requested:  # before the run's watermark snapshot: synced labels count
        try:
            synced = sync_project(settings, store, project_id)
            log.info("synced project %s before training: %s", project_id, synced)
        except SyncError as exc:
            log.warning("sync before training skipped: %s", exc)
        store.set_flags(project_id, sync_requested=False)
    if job is not None and trigger == "recovered" and _already_taken(settings, store, project_id):
        log.info("project %s: nothing due and the last run finished; duplicate request skipped", project_id)
        return {"status": "skipped", "detail": "nothing new since the last run (a duplicate request)"}
    continual = continual or pool_due(settings, store, project_id)  # a full pool: fine-tune on it, not from scratch
    run = store.start_run(project_id, job.id if job else "inline", "hard_pool" if continual else trigger)
    store.set_flags(project_id, training_requested=False)  # this run takes the request; later labels re-trigger
    try:
        outcome = run_training(settings, store, project_id, run.id, _progress, continual=continual)
    except RubricError as exc:
        store.finish_run(run.id, "failed", error=str(exc))
        return {"status": "failed", "detail": str(exc)}
    except Exception:
        store.finish_run(run.id, "failed", error=traceback.format_exc()[-4000:])
        raise  # RQ records it and retries if retries are left
    store.finish_run(
        run.id, outcome.status, advance_watermark=not continual,
        error="" if outcome.status != "skipped" else outcome.detail,
        metrics=outcome.metrics or {}, adapter_version=promoted_version(store, project_id, outcome),
        n_train=(outcome.metrics or {}).get("train", {}).get("tasks", 0),
        n_heldout=(outcome.metrics or {}).get("heldout_tasks", 0),
    )
    log.info("project %s training %s: %s", project_id, outcome.status, outcome.detail)
    if due(settings, store, project_id):  # labels that arrived during this run: the backend queues the next one
        store.set_flags(project_id, training_requested=True)
    return {"status": outcome.status, "detail": outcome.detail, "model_version": outcome.model_version}


MAX_HEAD_ROUNDS = 20  # labels that keep streaming in get a new head each round, a few seconds apart


def train_head(project_id: str) -> dict[str, Any]:
    """The fast first learner (worker.head_run): seconds on a CPU, each round recorded as a run. HEAD_EVERY
    labels that arrived while a round trained get another round at once (webhooks meanwhile found this job
    running), so a burst is learnt whole even when no further label comes to trigger a head."""
    die_with_worker()
    settings = load_settings()
    store = Store(settings.database_url)
    job = get_current_job()
    result: dict[str, Any] = {}
    project = store.project(project_id)
    every = max(1, head_every_for(settings, project.extra_params if project else {}))
    for _ in range(MAX_HEAD_ROUNDS):
        result = _head_round(settings, store, project_id, job.id if job else "inline")
        if result["status"] not in {"promoted", "refused"} or \
                store.count_labels(project_id) - result["labels"] < every:
            break
    return result


def _head_round(settings: Settings, store: Store, project_id: str, job_id: str) -> dict[str, Any]:
    from slm_annotator.worker.head_run import (
        run_head,  # the heads worker imports it up front; the training worker never
    )

    run = store.start_run(project_id, job_id, "head")
    try:
        outcome = run_head(settings, store, project_id, run.id)
    except RubricError as exc:
        store.finish_run(run.id, "failed", advance_watermark=False, error=str(exc))
        return {"status": "failed", "detail": str(exc), "labels": 0}
    except Exception:
        store.finish_run(run.id, "failed", advance_watermark=False, error=traceback.format_exc()[-4000:])
        raise
    head = (outcome.metrics or {}).get("head", {})
    store.finish_run(run.id, outcome.status, advance_watermark=False,
                     error="" if outcome.status != "skipped" else outcome.detail, metrics=outcome.metrics or {},
                     n_train=head.get("tasks", 0), adapter_version=promoted_version(store, project_id, outcome))
    log.info("project %s head %s: %s", project_id, outcome.status, outcome.detail)
    return {"status": outcome.status, "detail": outcome.detail, "model_version": outcome.model_version,
            "labels": head.get("labels", 0)}


def _already_taken(settings: Settings, store: Store, project_id: str) -> bool:
    """A flusher's re-send of a request that a finished run already served (the flusher, here or in another
    backend process, read the flag just before that run cleared it). Explicit requests always run, and so does a
    retry after a crash: its last run did not finish."""
    if due(settings, store, project_id):
        return False
    runs = store.runs(project_id)
    return bool(runs) and runs[-1].status in {"promoted", "refused", "skipped"}
