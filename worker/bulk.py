"""Bulk prediction: a project's tasks scored in chunks with the served version and written to Label Studio.

Label Studio sends every selected task in one /predict and gives up after 100 s; this job takes what does not
fit (a /predict remainder, `slm-annotator predict --project P`, the refresh after a promotion) and writes it
through Label Studio's API (`POST /api/projects/<id>/import/predictions`, one prediction per task carrying
model_version and score).

One prediction per task and version, also across crashes, retries, concurrent jobs and /predict replies: every
task is claimed in the store (pushed_predictions) before it is scored; a claim that an earlier attempt may have
written (this job's own after a crash, a dead job's, an old /predict reply) is first looked up in Label Studio
(`GET /api/predictions?task=`/`?project=`). Chunks go through the prediction cache, so a task /predict or an
earlier job scored costs nothing. Tasks whose data lack the config's fields are reported, not fatal.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

from backend.predicting import predict_cached, task_id_of
from backend.routing import routing_policy
from backend.services import Services, build_services, cached_rubric
from model.rubric import parse_extra_params
from slm_annotator.settings import Settings, load_settings
from slm_annotator.store import Store
from worker.sync import LabelStudioClient, SyncError, client_for

log = logging.getLogger(__name__)
MODES = ("missing", "all", "unlabelled", "request")
MAX_ERRORS = 100  # per-task errors kept in the job's meta (all are counted)
VERIFY_ONE_BY_ONE = 20  # more claims to look up than this: one project-wide read instead of one per task


def bulk_predict(project_id: str, model_version: str, mode: str = "missing", tasks: list[dict[str, Any]] | None = None,
                 order: str = "") -> dict[str, Any]:
    """The RQ job (worker.policy.enqueue_bulk): progress in the job's meta, the summary as its result."""
    from rq import get_current_job

    from worker.jobs import die_with_worker

    die_with_worker()
    settings = load_settings()
    job = get_current_job()
    svc = build_services(settings)

    def progress(meta: dict[str, Any]) -> None:
        if job is not None:
            job.meta.update(meta)
            try:
                job.save_meta()
            except Exception as exc:  # informational: a Redis blip must not end the job
                log.warning("bulk progress not saved: %s", exc)

    try:
        return run_bulk(svc, project_id, model_version, mode, tasks, order, job.id if job else "inline", progress)
    finally:
        svc.close()


def run_bulk(svc: Services, project_id: str, model_version: str | None, mode: str = "missing",
             tasks: list[dict[str, Any]] | None = None, order: str = "", owner: str = "inline",
             progress: Callable[[dict[str, Any]], None] | None = None,
             client: LabelStudioClient | None = None) -> dict[str, Any]:
    settings, store = svc.settings, svc.store
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    served = svc.served_for(project_id)
    version = served.model_version
    if model_version and model_version != version:  # a newer promotion queued its own job
        return {"status": "superseded", "model_version": model_version, "served": version}
    project = store.project(project_id)
    if project is None or not project.label_config:
        raise SyncError(f"project {project_id} has no label config yet: connect it in Label Studio (/setup) first")
    config, extra = project.label_config, project.extra_params or {}
    rubric = cached_rubric(config, json.dumps(parse_extra_params(extra), sort_keys=True))
    bar = svc.prefill_bar(extra)
    policy = routing_policy(settings, extra)
    decoding = str(extra.get("decoding", "argmax"))
    if client is None:
        try:
            client = client_for(settings, store, project_id)
        except SyncError:
            if tasks is None:
                raise
            client = None  # a /predict remainder without API credentials: cached, served at the next request
    if tasks is None:
        assert client is not None
        tasks = _select(list_tasks(client, project_id), version, mode, order)
    tasks = [t for t in tasks if task_id_of(t) is not None and isinstance(t.get("data"), dict)]
    meta: dict[str, Any] = {"model_version": version, "mode": mode, "total": len(tasks), "done": 0, "written": 0,
                            "skipped": 0, "error_count": 0, "errors": [], "tasks_per_s": None, "eta_s": None}
    started = time.monotonic()
    if progress:
        progress(meta)
    for pos in range(0, len(tasks), settings.bulk_chunk):
        chunk = tasks[pos : pos + settings.bulk_chunk]
        if client is None:
            scored = predict_cached(svc, project_id, rubric, config, extra, chunk, served, bar, policy, decoding,
                                    chunk=len(chunk), per_task_errors=True)
            _errors(meta, chunk, scored.errors)
        else:
            _push_chunk(svc, client, project_id, version, owner, chunk, meta,
                        lambda part: predict_cached(svc, project_id, rubric, config, extra, part, served, bar, policy,
                                                    decoding, chunk=len(part), per_task_errors=True))
        meta["done"] += len(chunk)
        rate = meta["done"] / max(time.monotonic() - started, 1e-6)
        meta["tasks_per_s"] = round(rate, 2)
        meta["eta_s"] = round((meta["total"] - meta["done"]) / rate, 1) if rate else None
        if progress:
            progress(meta)
    meta["status"] = "done" if client is not None else "cached (no Label Studio API credentials)"
    meta["seconds"] = round(time.monotonic() - started, 2)
    log.info("bulk prediction of project %s with %s: %s", project_id, version,
             {k: meta[k] for k in ("total", "written", "skipped", "error_count")})
    return meta


def _push_chunk(svc: Services, client: LabelStudioClient, project_id: str, version: str, owner: str,
                chunk: list[dict[str, Any]], meta: dict[str, Any],
                score: Callable[[list[dict[str, Any]]], Any]) -> None:
    store = svc.store
    by_id = {task_id_of(t): t for t in chunk}
    fresh, verify = store.claim_pushes(project_id, version, list(by_id), owner, recheck_done=meta["mode"] == "all")
    if verify:  # an earlier attempt may have written these: Label Studio says
        there = existing_predictions(client, project_id, version, verify) & set(verify)
        store.finish_pushes(project_id, version, sorted(there), owner)
        fresh += [t for t in verify if t not in there]
    meta["skipped"] += len(by_id) - len(fresh)
    if not fresh:
        return
    part = [by_id[t] for t in fresh]
    scored = score(part)
    _errors(meta, part, scored.errors)
    bad = [task_id_of(part[i]) for i in scored.errors]
    if bad:
        store.release_pushes(project_id, version, bad, owner)
    rows = [{"task": task_id_of(t), "result": e["result"], "score": e["score"], "model_version": version}
            for t, e in zip(part, scored.entries, strict=True) if e is not None]
    written = write_predictions(client, project_id, rows, meta)
    store.finish_pushes(project_id, version, written, owner)
    rejected = [r["task"] for r in rows if r["task"] not in set(written)]
    if rejected:
        store.release_pushes(project_id, version, rejected, owner)
    meta["written"] += len(written)


def _errors(meta: dict[str, Any], tasks: list[dict[str, Any]], errors: dict[int, str]) -> None:
    for i, why in errors.items():
        meta["error_count"] += 1
        if len(meta["errors"]) < MAX_ERRORS:
            meta["errors"].append({"task": task_id_of(tasks[i]), "error": why[:300]})


def write_predictions(client: LabelStudioClient, project_id: str, rows: list[dict[str, Any]],
                      meta: dict[str, Any]) -> list[int]:
    """Writes rows through `import/predictions`; returns the task ids written. A 400 (a task deleted meanwhile)
    is retried task by task, so one bad task does not cost its chunk. Unreachable: SyncError (the job retries)."""
    if not rows:
        return []
    path = f"/api/projects/{project_id}/import/predictions"
    status, body = client.post(path, rows)
    if status in (200, 201):
        return [r["task"] for r in rows]
    if status != 400 or len(rows) == 1:
        if status == 400:
            _errors(meta, [{"id": rows[0]["task"]}], {0: f"Label Studio refused the prediction: {str(body)[:200]}"})
            return []
        raise SyncError(f"Label Studio answered {status} to {path}")
    written: list[int] = []
    for row in rows:
        written += write_predictions(client, project_id, [row], meta)
    return written


def list_tasks(client: LabelStudioClient, project_id: str) -> list[dict[str, Any]]:
    """Every task of the project with its annotations and predictions (Label Studio's JSON export)."""
    tasks = client.get(f"/api/projects/{project_id}/export", exportType="JSON", download_all_tasks="true")
    if not isinstance(tasks, list):
        raise SyncError("Label Studio's export is not a list of tasks")
    return [t for t in tasks if isinstance(t, dict)]


def _select(tasks: list[dict[str, Any]], version: str, mode: str, order: str) -> list[dict[str, Any]]:
    """Tasks without a prediction of `version` (one per task and version, whatever the mode); "unlabelled": and
    without a completed annotation. order "uncertain": lowest latest score first, never predicted before all."""
    out = []
    for task in tasks:
        preds = [p for p in task.get("predictions") or [] if isinstance(p, dict)]
        if any(p.get("model_version") == version for p in preds):
            continue
        if mode == "unlabelled" and any(isinstance(a, dict) and not a.get("was_cancelled")
                                        for a in task.get("annotations") or []):
            continue
        out.append(task)
    if order == "uncertain":
        def latest_score(task: dict[str, Any]) -> float:
            preds = [p for p in task.get("predictions") or [] if isinstance(p, dict)]
            if not preds:
                return -1.0
            last = max(preds, key=lambda p: (str(p.get("created_at") or ""), p.get("id") or 0))
            score = last.get("score")
            return float(score) if isinstance(score, int | float) else -1.0

        out.sort(key=latest_score)
    return [{"id": t.get("id"), "data": t.get("data")} for t in out]


def existing_predictions(client: LabelStudioClient, project_id: str, version: str, task_ids: list[int]) -> set[int]:
    """The tasks among `task_ids` that hold a prediction of `version` in Label Studio."""
    if len(task_ids) <= VERIFY_ONE_BY_ONE:
        found: list[Any] = []
        for tid in task_ids:
            found += _items(client.get("/api/predictions", task=tid))
    else:
        found = _items(client.get("/api/predictions", project=project_id))
    return {p.get("task") for p in found if isinstance(p, dict) and p.get("model_version") == version}


def _items(reply: Any) -> list[Any]:
    if isinstance(reply, dict):  # a paginated answer
        reply = reply.get("results")
    return reply if isinstance(reply, list) else []


def refresh_after_promotion(settings: Settings, store: Store, project_id: str) -> str:
    """Queues the re-prediction of the project's unlabelled tasks, most uncertain first, with the version just
    promoted; only when the operator configured the Label Studio API (LABEL_STUDIO_URL + LABEL_STUDIO_API_KEY), not
    from the hostname and token /setup passed: a job that cannot write would hold its tasks' claims, and Label
    Studio's own "Retrieve predictions" would get no answer for them meanwhile. Never raises."""
    if not (settings.label_studio_url and settings.label_studio_api_key):
        return "skipped: LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY are not set"
    try:
        client_for(settings, store, project_id)
    except SyncError:
        return "skipped: no Label Studio API credentials"
    try:
        from worker.redis_conn import connect

        served = store.served_adapter(project_id)
        if served is None:
            return "skipped: nothing served"
        from rq import get_current_job

        job = get_current_job()  # in a worker: its Redis; elsewhere only a configured one (never start one here)
        if job is None and not settings.redis_url:
            return "skipped: no Redis"
        conn = job.connection if job is not None else connect(settings.redis_url, settings.model_dir)
        from worker.policy import enqueue_bulk

        state, jid = enqueue_bulk(conn, settings, project_id, served.model_version, "unlabelled", order="uncertain")
        log.info("project %s: refresh with %s %s (%s)", project_id, served.model_version, state, jid)
        return state
    except Exception:
        log.exception("could not queue the refresh of project %s after its promotion", project_id)
        return "failed"
