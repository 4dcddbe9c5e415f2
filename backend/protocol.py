"""The Label Studio ML backend protocol: /health, /setup, /predict, /webhook, plus /versions."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import replace
from typing import Any

from flask import Blueprint, current_app, g, jsonify, request

from slm_annotator.backend import metrics
from slm_annotator.backend.errors import ApiError
from slm_annotator.backend.payloads import clean_text, int64, json_body, label_from, label_studio_url, project_id
from slm_annotator.backend.predicting import predict_cached, task_id_of
from slm_annotator.backend.routing import routing_policy
from slm_annotator.backend.services import Services, base_version, cached_rubric
from slm_annotator.model.prompt import TaskDataError
from slm_annotator.model.results import values_from_result
from slm_annotator.model.rubric import Rubric, RubricError, parse_extra_params
from slm_annotator.model.serving import ModelUnavailable
from slm_annotator.project_settings import ProjectSettings, ProjectSettingsError, request_overrides
from slm_annotator.worker.policy import members_for

log = logging.getLogger(__name__)
bp = Blueprint("protocol", __name__)
LABEL_ACTIONS = {"ANNOTATION_CREATED", "ANNOTATION_UPDATED"}
# Label Studio's webhook actions: the metric's label takes only these (anything else is OTHER), so a sender
# cannot grow /metrics without bound.
KNOWN_ACTIONS = LABEL_ACTIONS | {
    "ANNOTATIONS_CREATED", "ANNOTATIONS_DELETED", "TASKS_CREATED", "TASKS_DELETED", "PROJECT_CREATED",
    "PROJECT_UPDATED", "PROJECT_DELETED", "START_TRAINING", "LABEL_LINK_CREATED", "LABEL_LINK_UPDATED",
    "LABEL_LINK_DELETED", "REVIEW_CREATED", "REVIEW_UPDATED", "REVIEWS_DELETED",
}


def services() -> Services:
    return current_app.extensions["slm"]


def _rubric(config: str, extra: Any) -> Rubric:
    try:
        return cached_rubric(config, json.dumps(parse_extra_params(extra), sort_keys=True))
    except RubricError as exc:
        raise ApiError(422, f"label config: {exc}") from exc


@bp.get("/health")
@bp.get("/")
def health() -> Any:
    """Open to all (Label Studio's liveness check); the model's details only for authenticated callers."""
    svc = services()
    if not g.get("authenticated"):
        return jsonify(status="UP", model_class="SLMAnnotator")
    degraded = _degraded(svc)
    return jsonify(
        status=f"degraded: {degraded[0]}" + (f" (and {len(degraded) - 1} more)" if len(degraded) > 1 else "")
        if degraded else "UP",
        model_class="SLMAnnotator",
        model_loaded=svc.model.loaded is not None,
        model_status=svc.model.status(),
        base_model=base_version(svc.settings),
        degraded=degraded,
    )


def _degraded(svc: Services) -> list[str]:
    """Projects whose latest training run or latest sync failed: an operator sees it without reading logs."""
    try:
        failures = svc.store.latest_failures()
    except Exception as exc:
        log.warning("/health could not read the store: %s", type(exc).__name__)
        return ["the store cannot be read"]
    out = []
    for run in failures:
        what = "sync from Label Studio" if run.trigger == "sync" else "training"
        when = (run.finished_at or run.started_at).isoformat(timespec="seconds") + "Z"
        reason = (run.error or "").strip().splitlines()[-1][:200] if run.error else "no detail"
        out.append(f"project {run.project_id}: {what} failed at {when}: {reason}")
    return out + _bulk_trouble(svc)


def _bulk_trouble(svc: Services) -> list[str]:
    """Bulk prediction runs waiting for a Label Studio that is down, or failed (RQ retries them)."""
    try:
        runs = svc.store.latest_bulk_runs()
    except Exception as exc:
        log.warning("/health could not read the bulk runs: %s", type(exc).__name__)
        return []
    out = []
    for pid, run in sorted(runs.items()):
        if run.status in {"waiting", "failed"}:
            when = run.updated_at.isoformat(timespec="seconds") + "Z"
            verb = "waiting since" if run.status == "waiting" else "failed at"
            out.append(f"project {pid}: bulk prediction {verb} {when} ({run.done}/{run.total} tasks): "
                       f"{run.last_error.strip()[:200] or 'no detail'}")
    return out


@bp.post("/setup")
def setup() -> Any:
    """Called before every prediction round and on every task open: store, parse, answer; no model load."""
    svc = services()
    body = json_body(request)
    pid = project_id(body.get("project"), required=False)
    config = body.get("schema") or body.get("label_config") or ""
    if not isinstance(config, str):
        raise ApiError(400, "'schema' must be the label config XML as a string")
    project = svc.store.project(pid) if pid else None
    # Label Studio always sends its extra_params (its whole current set): those replace the stored ones. A call
    # without the key (a script, an attacker) keeps them: it must not wipe a project's settings.
    sent_extra = "extra_params" in body
    extra = _validated(body.get("extra_params")) if sent_extra else (project.extra_params if project else {})
    if config:
        _rubric(config, extra)
    if pid:
        fields: dict[str, Any] = {"extra_params": extra} if sent_extra or project is None else {}
        if config:
            fields["label_config"] = config
        fields.update(_label_studio_fields(svc, pid, body, project))
        if project is None or any(getattr(project, k) != v for k, v in fields.items()):
            svc.store.upsert_project(pid, **fields)
            _train_missing_members(svc, pid, extra)
        if config:
            svc.remember_config(pid, config)
    served = svc.served_for(pid)
    project = svc.store.project(pid) if pid else None
    bar = svc.prefill_bar(project.extra_params if project else {})
    plan = served.plan.with_bar(bar) if served.plan is not None else None
    # Label Studio reads only model_version; the rest tells an operator (or a script) what is pre-filled.
    return jsonify(model_version=served.model_version,
                   prefilled=[k for k, d in plan.dims.items() if d.prefill] if plan else ([] if bar is not None
                                                                                           else None))


def _label_studio_fields(svc: Services, pid: str, body: dict[str, Any], project: Any) -> dict[str, Any]:
    """Where sync sends the project's credentials. LABEL_STUDIO_URL pins it for every project; without it the
    first hostname stored is kept, and only an authenticated /setup (Basic auth) may move it: an unauthenticated
    one re-pointed a project at an attacker, who then received the Label Studio API key (issue 17)."""
    fields: dict[str, Any] = {}
    token = body.get("access_token")
    if isinstance(token, str) and token:
        fields["access_token"] = clean_text(token)  # only ever sent to the pinned address
    hostname = body.get("hostname")
    if svc.settings.label_studio_url or not isinstance(hostname, str) or not hostname:
        return fields
    url = label_studio_url(hostname)
    stored = project.hostname if project is not None else ""
    if stored and url != stored and g.get("via") != "basic":
        log.warning("project %s: /setup asked to move Label Studio from %s to %s without Basic auth; kept",
                    pid, stored, url)
        return fields
    fields["hostname"] = url
    return fields


def _validated(raw: Any) -> dict[str, Any]:
    """extra_params checked once, here, with bounds: a bad key is a 400 now, not a failed training hours later."""
    try:
        return ProjectSettings.parse(raw).to_extra()
    except ProjectSettingsError as exc:
        raise ApiError(400, str(exc)) from exc


def _train_missing_members(svc: Services, pid: str, extra: dict[str, Any]) -> None:
    """A project that now asks for more ensemble members than its served adapter has gets them trained now,
    not at the next threshold; until then its one adapter is read through k templates."""
    adapter, _ = svc.adapter_for(pid)
    if adapter is not None and len(adapter.paths) < members_for(svc.settings, extra):
        state = svc.trigger.maybe_train(pid, force=True, trigger="ensemble")
        metrics.TRAININGS_QUEUED.labels(state.split(":")[0]).inc()


@bp.post("/predict")
def predict() -> Any:
    svc = services()
    body = json_body(request)
    tasks = body.get("tasks")
    if not isinstance(tasks, list):
        raise ApiError(400, "missing 'tasks': expected a list of Label Studio tasks")
    if len(tasks) > svc.settings.max_tasks_per_request:
        raise ApiError(
            413, f"{len(tasks)} tasks in one request; the limit is {svc.settings.max_tasks_per_request} "
            "(MAX_TASKS_PER_REQUEST)"
        )
    for n, task in enumerate(tasks):
        if not isinstance(task, dict) or not isinstance(task.get("data"), dict):
            raise ApiError(400, f"task #{n} must be an object with a 'data' object")
    pid = project_id(body.get("project"), required=False)
    stored = svc.store.project(pid) if pid else None
    config = body.get("label_config") or (stored.label_config if stored else "")
    if not config or not isinstance(config, str):
        raise ApiError(400, "no label config: send 'label_config' or call /setup for this project first")
    params = body.get("params") if isinstance(body.get("params"), dict) else {}
    try:  # a request may change the prompt's wording, never what it costs (ensemble, routing, the judge)
        extra = {**(stored.extra_params if stored else {}), **request_overrides(params.get("extra_params"))}
    except ProjectSettingsError as exc:
        raise ApiError(400, f"params.{exc}") from exc
    rubric = _rubric(config, extra)
    served = svc.served_for(pid)
    version = served.model_version
    bar = svc.prefill_bar(stored.extra_params if stored else {})
    if not tasks:
        return jsonify(results=[], model_version=version)
    if not svc.predict_slots.acquire(timeout=0.05):
        metrics.REJECTED.inc()
        raise ApiError(503, "overloaded: too many predictions in flight (PREDICT_QUEUE_LIMIT); retry later")
    policy = routing_policy(svc.settings, extra)
    decoding = str(extra.get("decoding", "argmax"))
    # Within the budget (PREDICT_BUDGET_SECONDS, below Label Studio's 100 s): a project's tasks with ids are
    # answered with what is cached or scored in time; the rest goes to a bulk job (worker.bulk).
    ids = [task_id_of(t) for t in tasks]
    tracked = bool(pid) and None not in ids
    deadline = time.monotonic() + svc.settings.predict_budget_seconds if tracked else None
    try:  # the slot covers the judge calls too: a thread waiting on the judge must not take a webhook's place
        scored = predict_cached(svc, pid or "", rubric, config, extra, tasks, served, bar, policy, decoding,
                                deadline=deadline)
    except TaskDataError as exc:
        raise ApiError(422, str(exc)) from exc
    except ModelUnavailable as exc:
        metrics.REJECTED.inc()
        raise ApiError(503, str(exc)) from exc
    finally:
        svc.predict_slots.release()
    base = svc.model.loaded
    if base is not None:
        metrics.MODEL_LOAD.set(base.load_seconds)
    metrics.PREDICTIONS.labels(pid or "none").inc(scored.computed)
    metrics.PREDICTIONS_CACHED.inc(scored.cached)
    if pid and scored.judged:
        svc.trigger.maybe_train(pid)  # the judge's answers fill the hard-sample pool
    if not tracked:
        return jsonify(results=scored.entries, model_version=version)
    n = _reply_length(svc, pid, version, ids, scored.prefix())
    # Label Studio pairs results with tasks by position and stores nothing from a reply of another length
    # (ml/models.py, _get_predictions_from_ml_backend): every task gets an entry, and one not answered now is an
    # empty list (no prediction for that task); a bulk job writes it through the API.
    reply: dict[str, Any] = {"results": [*scored.entries[:n], *([] for _ in tasks[n:])], "model_version": version}
    if n < len(tasks):
        rest = [{"id": t["id"], "data": t["data"]} for t in tasks[n:]]
        reply["background"] = {"tasks": len(rest), "job": svc.trigger.bulk(pid, version, rest)}
        metrics.PREDICT_DEFERRED.inc(len(rest))
        log.info("project %s: /predict answered %d of %d tasks within %.0f s; the rest: %s", pid, n, len(tasks),
                 svc.settings.predict_budget_seconds, reply["background"]["job"])
    return jsonify(reply)


def _reply_length(svc: Services, pid: str, version: str, ids: list[Any], prefix: int) -> int:
    """How many leading tasks the reply answers. Tasks a bulk job holds or wrote are left to it
    (store.reply_claims), so no task gets two predictions of a version."""
    if prefix == 0:
        return 0
    try:
        return svc.store.reply_claims(pid, version, ids[:prefix])
    except Exception:
        log.exception("project %s: could not mark the tasks of a /predict reply; answering all scored ones", pid)
        return prefix


@bp.post("/webhook")
def webhook() -> Any:
    """Validate, write, maybe enqueue; never wait on training (LS waits 1 s and never retries)."""
    svc = services()
    body = json_body(request)
    action = body.get("action")
    if not isinstance(action, str) or not action:
        raise ApiError(400, "missing 'action'")
    if g.get("via") == "basic" and svc.settings.webhook_secret and action in LABEL_ACTIONS | {"ANNOTATIONS_DELETED"}:
        # Basic auth is how Label Studio's ML API calls (START_TRAINING); labels come only with the secret
        raise ApiError(401, "label events need the webhook secret (X-Webhook-Secret header), not Basic auth")
    metrics.WEBHOOKS.labels(action if action in KNOWN_ACTIONS else "OTHER").inc()
    if action in LABEL_ACTIONS:
        return jsonify(_store_annotation(svc, body))
    if action == "ANNOTATIONS_DELETED":
        return jsonify(_delete_annotations(svc, body))
    if action == "START_TRAINING":
        pid = project_id(body.get("project"))
        _remember_project(svc, pid, body.get("project"))
        svc.store.set_flags(pid, sync_requested=True)
        state = svc.trigger.maybe_train(pid, force=True, trigger="start_training")
        metrics.TRAININGS_QUEUED.labels(state.split(":")[0]).inc()
        return jsonify(status="ok", training=state)
    return jsonify(status="ignored", action=action[:64])


def _remember_project(svc: Services, pid: str, project: Any) -> str:
    """Keeps the label config that webhooks carry, so labels arriving before /setup still parse.

    Only a config that parses replaces the stored one (what /setup would accept): a forged or broken one
    must not take a project's rubric away.
    """
    config = project.get("label_config") if isinstance(project, dict) else None
    known = svc.known_config(pid)
    if isinstance(config, str) and config and config != known and _parses(config):
        stored = svc.store.project(pid)
        if stored is None or stored.label_config != config:
            svc.store.upsert_project(pid, label_config=config)
        svc.remember_config(pid, config)
        return config
    if known is not None:
        return known
    stored = svc.store.project(pid)
    svc.remember_config(pid, stored.label_config if stored else "")
    return stored.label_config if stored else ""


def _parses(config: str) -> bool:
    try:
        cached_rubric(config, "")
    except RubricError as exc:
        log.warning("webhook carries a label config that does not parse; keeping the stored one: %s", exc)
        return False
    return True


def _store_annotation(svc: Services, body: dict[str, Any]) -> dict[str, Any]:
    annotation = body.get("annotation")
    if not isinstance(annotation, dict):
        raise ApiError(400, "'annotation' must be a JSON object")
    pid = project_id(body.get("project") or annotation.get("project"))
    config = _remember_project(svc, pid, body.get("project"))
    values: dict[str, str] = {}
    if config:
        try:
            values = values_from_result(cached_rubric(config, ""), annotation.get("result"))
        except RubricError:
            values = {}  # still stored: training re-parses raw results against the config of its time
    label = label_from(annotation, body.get("task"), "webhook", values)
    routed = _was_routed(svc, pid, label.task_id)
    if routed:
        label = replace(label, hard=True)  # the ensemble disagreed on this task: a hard sample
    changed = svc.store.upsert_label(pid, label)
    if changed:
        metrics.LABELS_STORED.labels(pid).inc()
    state = svc.trigger.maybe_train(pid) if changed else "unchanged"
    metrics.TRAININGS_QUEUED.labels(state.split(":")[0]).inc()
    reply = {"status": "stored" if changed else "unchanged", "training": state}
    if changed:
        reply["head"] = _maybe_head(svc, pid)
    return reply


def _maybe_head(svc: Services, pid: str) -> str:
    """The label is stored: a failure to queue its head only delays the head to the next label."""
    try:
        return svc.trigger.maybe_head(pid)
    except Exception:
        log.exception("could not queue the head of project %s", pid)
        return "deferred: error"


def _was_routed(svc: Services, pid: str, task_id: int | None) -> bool:
    return task_id is not None and bool(svc.store.latest_route(pid, task_id))


def _delete_annotations(svc: Services, body: dict[str, Any]) -> dict[str, Any]:
    items = body.get("annotations")
    if not isinstance(items, list):
        raise ApiError(400, "'annotations' must be a list of {id} objects")
    ids: list[int] = []
    for item in items:
        ann_id = item.get("id") if isinstance(item, dict) else item
        if isinstance(ann_id, bool) or not isinstance(ann_id, int):
            raise ApiError(400, "every deleted annotation needs an integer 'id'")
        ids.append(int64(ann_id, "deleted annotation id"))
    project = body.get("project")
    if project is None and items and isinstance(items[0], dict):
        project = items[0].get("project")
    pid = project_id(project)
    changed = svc.store.delete_labels(pid, ids)
    state = svc.trigger.maybe_train(pid) if changed else "unchanged"
    return {"status": "deleted", "count": changed, "training": state}


@bp.get("/versions/<project>")
def versions(project: str) -> Any:
    svc = services()
    pid = project_id(project)
    served = svc.store.served_adapter(pid)
    project = svc.store.project(pid)
    plan = svc.served_for(pid).plan
    return jsonify(
        project=pid,
        served=served.model_version if served else base_version(svc.settings),
        serving=plan.with_bar(svc.prefill_bar(project.extra_params if project else {})).summary() if plan else None,
        adapters=[
            {
                "version": a.version,
                "model_version": a.model_version,
                "status": a.status,
                "metrics": a.metrics,
                "created_at": a.created_at.isoformat() + "Z",
                "promoted_at": a.promoted_at.isoformat() + "Z" if a.promoted_at else None,
            }
            for a in svc.store.adapters(pid)
        ],
        runs=[
            {"id": r.id, "status": r.status, "trigger": r.trigger, "n_train": r.n_train, "n_heldout": r.n_heldout,
             "error": r.error[:500], "started_at": r.started_at.isoformat() + "Z"}
            for r in svc.store.runs(pid)
        ],
        labels=svc.store.count_labels(pid),
        pending=svc.store.pending_changes(pid),
    )
