"""Bulk prediction: a project's tasks scored in chunks with the served version and written to Label Studio.

Label Studio sends every selected task in one /predict and gives up after 100 s; this job takes what does not
fit (a /predict remainder, `slm-annotator predict --project P`, the refresh after a promotion) and writes it
through Label Studio's API (`POST /api/projects/<id>/import/predictions`, one prediction per task carrying
model_version and score).

Scale out: the run's chunks sit in Redis (worker.chunks); the job asks one helper job per other worker on the bulk
queue to take chunks too, and finishes once every chunk is done (a dead helper's chunk comes back to it).
Progress goes to the job's meta and to the store (bulk_runs), where /metrics, /health and the report read it.

One prediction per task and version, also across crashes, retries, concurrent jobs and /predict replies: every
task is claimed in the store (pushed_predictions) before it is scored; a claim that an earlier attempt may have
written (this job's own after a crash, a dead job's, an old /predict reply) is first looked up in Label Studio
(`GET /api/predictions?task=`/`?project=`). Chunks go through the prediction cache, so a task /predict or an
earlier job scored costs nothing. Tasks whose data lack the config's fields are reported, not fatal. A Label
Studio that is down or slow is retried for BULK_LS_PATIENCE seconds (the run shows "waiting" meanwhile).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from slm_annotator.backend.predicting import Scored, predict_cached, task_id_of
from slm_annotator.backend.routing import RoutingPolicy, routing_policy
from slm_annotator.backend.services import Services, build_services, cached_rubric
from slm_annotator.model.annotator import Served
from slm_annotator.model.rubric import Rubric, parse_extra_params
from slm_annotator.settings import Settings, load_settings
from slm_annotator.store import Store
from slm_annotator.worker.chunks import Counts, LocalChunks, RedisChunks
from slm_annotator.worker.sync import LabelStudioClient, SyncError, client_for

log = logging.getLogger(__name__)
MODES = ("missing", "all", "unlabelled", "request")
VERIFY_ONE_BY_ONE = 20  # more claims to look up than this: one project-wide read instead of one per task
MAX_HELPERS = 16
T = TypeVar("T")
Chunks = LocalChunks | RedisChunks


@dataclass
class BulkContext:
    """What every worker of one run needs to score and write a chunk."""

    svc: Services
    project_id: str
    served: Served
    rubric: Rubric
    config: str
    extra: dict[str, Any]
    bar: float | None
    policy: RoutingPolicy
    decoding: str
    client: LabelStudioClient | None
    run_id: str = ""
    mode: str = "missing"
    warm: bool = False  # the SLM (if this version needs it) is loaded

    @property
    def version(self) -> str:
        return self.served.model_version

    def served_now(self) -> str:
        row = self.svc.store.served_adapter(self.project_id)
        return row.model_version if row is not None else self.svc.settings.base_version

    def superseded(self) -> bool:
        """A newer version is served now: this run's predictions would be stale before they land (its own refresh
        job takes over). One read of the served row."""
        return self.served_now() != self.version

    def score(self, part: list[dict[str, Any]]) -> Scored:
        if not self.warm:  # a cold worker waits for the load (a GGUF conversion: minutes), not /predict's 60 s
            self.svc.annotator.warm(self.served, self.bar)
            self.warm = True
        return predict_cached(self.svc, self.project_id, self.rubric, self.config, self.extra, part, self.served,
                              self.bar, self.policy, self.decoding, chunk=len(part), per_task_errors=True)

    def patiently(self, what: str, call: Callable[[], T]) -> T:
        """`call` retried while Label Studio is down or slow, for BULK_LS_PATIENCE seconds in all; the run shows
        "waiting" and why meanwhile (/health, the report). Then the SyncError goes up: RQ retries the job later."""
        give_up = time.monotonic() + self.svc.settings.bulk_ls_patience
        pause, waited = 1.0, False
        while True:
            try:
                result = call()
            except SyncError as exc:
                if time.monotonic() + pause > give_up:
                    raise
                log.warning("bulk run %s: %s failed (%s); retrying in %.0f s", self.run_id, what, exc, pause)
                self._status("waiting", f"Label Studio: {what}: {exc}")
                waited = True
                time.sleep(pause)
                pause = min(pause * 2, 60.0)
                continue
            if waited:
                self._status("running")
            return result

    def _status(self, status: str, error: str | None = None) -> None:
        if not self.run_id:
            return
        fields: dict[str, Any] = {"status": status}
        if error is not None:
            fields["last_error"] = error[:1000]
        try:
            self.svc.store.update_bulk_run(self.run_id, **fields)
        except Exception as exc:  # informational
            log.warning("bulk run %s: status not saved: %s", self.run_id, exc)


def bulk_context(svc: Services, project_id: str, model_version: str | None, mode: str,
                 client: LabelStudioClient | None = None, need_client: bool = True) -> BulkContext | str:
    """The run's context, or the version now served when `model_version` is no longer it (superseded)."""
    store, settings = svc.store, svc.settings
    served = svc.served_for(project_id)
    if model_version and model_version != served.model_version:  # a newer promotion queued its own job
        return served.model_version
    project = store.project(project_id)
    if project is None or not project.label_config:
        raise SyncError(f"project {project_id} has no label config yet: connect it in Label Studio (/setup) first")
    config, extra = project.label_config, project.extra_params or {}
    if client is None:
        try:
            client = client_for(settings, store, project_id)
        except SyncError:
            if need_client:
                raise
    return BulkContext(svc, project_id, served, cached_rubric(config, json.dumps(parse_extra_params(extra),
                                                                                 sort_keys=True)),
                       config, extra, svc.prefill_bar(extra), routing_policy(settings, extra),
                       str(extra.get("decoding", "argmax")), client, mode=mode)


def run_key(job: Any) -> str:
    """One run per enqueued job: its retries share the run's chunks, a later job of the same id starts afresh."""
    created = getattr(job, "created_at", None)
    return f"{job.id}@{int(created.timestamp()) if created else 0}"


def execution_owner(job: Any) -> str:
    """Who holds chunks and claims: one name per execution, so a retried job takes its dead self's work over like
    any dead worker's (worker.chunks)."""
    return f"{job.id}:{uuid.uuid4().hex[:8]}"


def bulk_predict(project_id: str, model_version: str, mode: str = "missing", tasks: list[dict[str, Any]] | None = None,
                 order: str = "") -> dict[str, Any]:
    """The RQ job (worker.policy.enqueue_bulk): progress in the job's meta and the store, the summary as its
    result. Other workers on the bulk queue are asked to help (bulk_help)."""
    from rq import get_current_job

    from slm_annotator.worker.jobs import die_with_worker

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
        if job is None:
            return run_bulk(svc, project_id, model_version, mode, tasks, order, "inline", progress)
        run_id = run_key(job)
        chunks = RedisChunks(job.connection, run_id, settings.bulk_job_timeout)
        return run_bulk(svc, project_id, model_version, mode, tasks, order, execution_owner(job), progress,
                        chunks=chunks,
                        run_id=run_id, helpers=lambda n: ask_helpers(job, settings, run_id, project_id, n, mode))
    finally:
        svc.close()


def bulk_help(run_id: str, project_id: str, model_version: str, mode: str = "missing") -> dict[str, Any]:
    """RQ job: another worker's share of a run; takes chunks until none are left (it never waits for others,
    it takes a dead one's chunk over)."""
    from rq import get_current_job

    from slm_annotator.worker.jobs import die_with_worker

    die_with_worker()
    settings = load_settings()
    job = get_current_job()
    assert job is not None, "bulk_help runs as an RQ job"
    svc = build_services(settings)
    try:
        ctx = bulk_context(svc, project_id, model_version, mode)
        if isinstance(ctx, str):
            return {"status": "superseded", "model_version": model_version, "served": ctx}
        ctx.run_id = run_id
        chunks = RedisChunks(job.connection, run_id, settings.bulk_job_timeout)
        before, owner = chunks.stats()["done"], execution_owner(job)
        while True:  # a dead worker's chunk (the run's owner killed, say) is done here too, without waiting
            if not work(ctx, chunks, owner, lambda: mirror(svc.store, run_id, chunks)):
                return {"status": "superseded", "run": run_id}
            chunks.others_working(owner)
            if not chunks.todo():
                break
        return {"status": "done", "run": run_id, "helped_with": chunks.stats()["done"] - before}
    finally:
        svc.close()


def ask_helpers(job: Any, settings: Settings, run_id: str, project_id: str, n_chunks: int, mode: str) -> int:
    """One helper job per other worker listening on the bulk queue (at most one per chunk beyond the first)."""
    from rq import Queue, Retry, Worker

    from slm_annotator.worker.policy import BULK_QUEUE, enqueue_once

    try:
        workers = Worker.all(queue=Queue(BULK_QUEUE, connection=job.connection))
    except Exception as exc:
        log.warning("bulk run %s: workers not listed (%s); working alone", run_id, exc)
        return 0
    n = max(0, min(len(workers) - 1, n_chunks - 1, MAX_HELPERS))
    for i in range(n):
        enqueue_once(job.connection, BULK_QUEUE, "slm_annotator.worker.bulk.bulk_help", run_id, project_id, job.args[1],
                     mode, job_id=f"{job.id}-help-{i}", job_timeout=settings.bulk_job_timeout, result_ttl=3600,
                     failure_ttl=86400, retry=Retry(max=3, interval=[10, 30, 60]),
                     description=f"help with bulk run {run_id}")
    return n


def run_bulk(svc: Services, project_id: str, model_version: str | None, mode: str = "missing",
             tasks: list[dict[str, Any]] | None = None, order: str = "", owner: str = "inline",
             progress: Callable[[dict[str, Any]], None] | None = None,
             client: LabelStudioClient | None = None, chunks: Chunks | None = None, run_id: str = "",
             helpers: Callable[[int], int] | None = None) -> dict[str, Any]:
    """A whole run: select the tasks, publish the chunks, work, wait for the helpers, report."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    ctx = bulk_context(svc, project_id, model_version, mode, client, need_client=tasks is None)
    if isinstance(ctx, str):
        return {"status": "superseded", "model_version": model_version, "served": ctx}
    ctx.run_id = run_id = run_id or f"inline-{uuid.uuid4().hex[:12]}"
    chunks = chunks if chunks is not None else LocalChunks()
    if tasks is None:
        assert ctx.client is not None
        listed = ctx.patiently("reading the project's tasks", lambda: list_tasks(ctx.client, project_id))
        tasks = select(listed, ctx.version, mode, order)
    tasks = [t for t in tasks if task_id_of(t) is not None and isinstance(t.get("data"), dict)]
    total = chunks.publish(tasks, svc.settings.bulk_chunk)
    svc.store.start_bulk_run(run_id, project_id, ctx.version, mode, total)
    tracker = Tracker(svc.store, run_id, chunks, ctx.version, mode, progress)
    if helpers is not None and ctx.client is not None:
        helpers(-(-total // svc.settings.bulk_chunk))
    try:
        while True:
            if not work(ctx, chunks, owner, tracker.update):
                return _superseded(svc, ctx, run_id, chunks, tracker)
            busy = chunks.others_working(owner)  # hands a dead helper's chunk back to the queue
            if not busy and not chunks.todo():
                break
            if busy:
                time.sleep(1.0)
                tracker.update()
    except Exception as exc:
        svc.store.update_bulk_run(run_id, status="failed", last_error=f"{type(exc).__name__}: {exc}"[:1000])
        raise
    status = "done" if ctx.client is not None else "cached (no Label Studio API credentials)"
    meta = tracker.finish(status)
    chunks.close()
    log.info("bulk prediction of project %s with %s: %s", project_id, ctx.version,
             {k: meta[k] for k in ("total", "written", "skipped", "error_count")})
    return meta


def _superseded(svc: Services, ctx: BulkContext, run_id: str, chunks: Chunks, tracker: Tracker) -> dict[str, Any]:
    """A newer version was served mid-run: stop here (its own refresh re-predicts the tasks)."""
    meta = {**tracker.meta(), "status": "superseded", "served": ctx.served_now()}
    mirror(svc.store, run_id, chunks, status="superseded", eta_s=None, finished=True)
    chunks.close()
    log.info("bulk run %s of project %s stopped: %s is served now", run_id, ctx.project_id, meta["served"])
    return meta


class Tracker:
    """The run's progress, from the shared counts: rate and ETA of this attempt, to the job's meta and the store."""

    def __init__(self, store: Store, run_id: str, chunks: Chunks, version: str, mode: str,
                 progress: Callable[[dict[str, Any]], None] | None) -> None:
        self.store, self.run_id, self.chunks, self.progress = store, run_id, chunks, progress
        self.started = time.monotonic()
        self.done_before = chunks.stats()["done"]  # a retried run carries on from here
        self.base = {"run": run_id, "model_version": version, "mode": mode}
        self.update()

    def meta(self) -> dict[str, Any]:
        stats, total = self.chunks.stats(), self.chunks.total
        rate = (stats["done"] - self.done_before) / max(time.monotonic() - self.started, 1e-6)
        return {**self.base, "total": total, "done": stats["done"], "written": stats["written"],
                "skipped": stats["skipped"], "error_count": stats["errors"], "errors": self.chunks.errors(),
                "workers": self.chunks.owners(), "tasks_per_s": round(rate, 2),
                "eta_s": round((total - stats["done"]) / rate, 1) if rate > 0 else None}

    def update(self) -> None:
        meta = self.meta()
        mirror(self.store, self.run_id, self.chunks, tasks_per_s=meta["tasks_per_s"], eta_s=meta["eta_s"])
        if self.progress:
            self.progress(meta)

    def finish(self, status: str) -> dict[str, Any]:
        meta = {**self.meta(), "status": status, "seconds": round(time.monotonic() - self.started, 2), "eta_s": 0}
        mirror(self.store, self.run_id, self.chunks, status="done", eta_s=0.0, tasks_per_s=meta["tasks_per_s"],
               finished=True)
        if self.progress:
            self.progress(meta)
        return meta


def mirror(store: Store, run_id: str, chunks: Chunks, finished: bool = False, **fields: Any) -> None:
    """The shared counts into the store's row of the run (absolute values: any worker may write them)."""
    stats = chunks.stats()
    try:
        store.update_bulk_run(run_id, done=stats["done"], written=stats["written"], skipped=stats["skipped"],
                              errors=stats["errors"], workers=chunks.owners(), finished=finished, **fields)
    except Exception as exc:  # informational: the work goes on
        log.warning("bulk run %s: progress not saved: %s", run_id, exc)


def work(ctx: BulkContext, chunks: Chunks, owner: str, on_chunk: Callable[[], None]) -> bool:
    """Takes chunks until none are left in the queue; False when a newer version was served meanwhile."""
    with chunks.working(owner):
        while True:
            if ctx.superseded():
                return False
            item = chunks.take(owner)
            if item is None:
                return True
            index, part = item
            chunks.finish(owner, index, process_chunk(ctx, owner, part, chunks.dead()))
            on_chunk()


def process_chunk(ctx: BulkContext, owner: str, chunk: list[dict[str, Any]], dead: set[str] | None = None) -> Counts:
    """Claims, scores and writes one chunk; what it came to. `dead`: owners whose claims are to be taken over."""
    dead = dead or set()
    counts = Counts(done=len(chunk))
    if ctx.client is None:  # a /predict remainder without API credentials: cached, served at the next request
        _errors(counts, chunk, ctx.score(chunk).errors)
        return counts
    store, client, version = ctx.svc.store, ctx.client, ctx.version
    by_id = {task_id_of(t): t for t in chunk}
    fresh, verify = store.claim_pushes(ctx.project_id, version, list(by_id), owner, recheck_done=ctx.mode == "all",
                                       dead_owners=dead)
    if verify:  # an earlier attempt may have written these: Label Studio says
        there = ctx.patiently("looking up earlier predictions",
                              lambda: existing_predictions(client, ctx.project_id, version, verify)) & set(verify)
        store.finish_pushes(ctx.project_id, version, sorted(there), owner)
        fresh += [t for t in verify if t not in there]
    counts.skipped = len(by_id) - len(fresh)
    if not fresh:
        return counts
    part = [by_id[t] for t in fresh]
    scored = ctx.score(part)
    _errors(counts, part, scored.errors)
    bad = [task_id_of(part[i]) for i in scored.errors]
    if bad:
        store.release_pushes(ctx.project_id, version, bad, owner)
    rows = [{"task": task_id_of(t), "result": e["result"], "score": e["score"], "model_version": version}
            for t, e in zip(part, scored.entries, strict=True) if e is not None]
    written = ctx.patiently("writing predictions", _writer(client, ctx.project_id, version, rows, counts))
    store.finish_pushes(ctx.project_id, version, written, owner)
    rejected = [r["task"] for r in rows if r["task"] not in set(written)]
    if rejected:
        store.release_pushes(ctx.project_id, version, rejected, owner)
    counts.written = len(written)
    return counts


def _writer(client: LabelStudioClient, project_id: str, version: str, rows: list[dict[str, Any]],
            counts: Counts) -> Callable[[], list[int]]:
    """The chunk's write; a repeat (the last one failed: it may have landed all the same, e.g. a timeout on a slow
    Label Studio) first looks up what Label Studio holds, so nothing is written twice."""
    attempts = [0]

    def write() -> list[int]:
        todo, there = rows, []
        if attempts[0]:
            held = existing_predictions(client, project_id, version, [r["task"] for r in rows])
            there = [r["task"] for r in rows if r["task"] in held]
            todo = [r for r in rows if r["task"] not in held]
        attempts[0] += 1
        return there + write_predictions(client, project_id, todo, counts)

    return write


def _errors(counts: Counts, tasks: list[dict[str, Any]], errors: dict[int, str]) -> None:
    counts.errors += [{"task": task_id_of(tasks[i]), "error": why[:300]} for i, why in errors.items()]


def write_predictions(client: LabelStudioClient, project_id: str, rows: list[dict[str, Any]],
                      counts: Counts) -> list[int]:
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
            _errors(counts, [{"id": rows[0]["task"]}], {0: f"Label Studio refused the prediction: {str(body)[:200]}"})
            return []
        raise SyncError(f"Label Studio answered {status} to {path}")
    written: list[int] = []
    for row in rows:
        written += write_predictions(client, project_id, [row], counts)
    return written


def list_tasks(client: LabelStudioClient, project_id: str) -> list[dict[str, Any]]:
    """Every task of the project with its annotations and predictions (Label Studio's JSON export)."""
    tasks = client.get(f"/api/projects/{project_id}/export", exportType="JSON", download_all_tasks="true")
    if not isinstance(tasks, list):
        raise SyncError("Label Studio's export is not a list of tasks")
    return [t for t in tasks if isinstance(t, dict)]


def select(tasks: list[dict[str, Any]], version: str, mode: str, order: str) -> list[dict[str, Any]]:
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
        from slm_annotator.worker.redis_conn import connect

        served = store.served_adapter(project_id)
        if served is None:
            return "skipped: nothing served"
        from rq import get_current_job

        job = get_current_job()  # in a worker: its Redis; elsewhere only a configured one (never start one here)
        if job is None and not settings.redis_url:
            return "skipped: no Redis"
        conn = job.connection if job is not None else connect(settings.redis_url, settings.model_dir)
        from slm_annotator.worker.policy import enqueue_bulk

        state, jid = enqueue_bulk(conn, settings, project_id, served.model_version, "unlabelled", order="uncertain")
        log.info("project %s: refresh with %s %s (%s)", project_id, served.model_version, state, jid)
        return state
    except Exception:
        log.exception("could not queue the refresh of project %s after its promotion", project_id)
        return "failed"
