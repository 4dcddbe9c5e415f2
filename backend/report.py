"""GET /report/<project> (HTML) and /report/<project>.json: a project's live agreement report.

Reads the store only, never the model, so it is safe to open while the backend serves predictions. The page
is cached per process for a few seconds and until a label changes (bootstrap intervals cost seconds).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from flask import Blueprint, Response, current_app, g, jsonify, request

from slm_annotator.backend import metrics
from slm_annotator.backend.errors import ApiError
from slm_annotator.backend.payloads import project_id
from slm_annotator.backend.services import Services
from slm_annotator.costs import Prices
from slm_annotator.model.report_html import CSP, render_project
from slm_annotator.project_report import build_project_report
from slm_annotator.worker.policy import rater_weighting_for

bp = Blueprint("report", __name__)
CACHE_SECONDS = 30.0
MAX_BOOT = 1000
MAX_CACHED = 64
_cache: dict[tuple[str, int | None, bool], tuple[int, float, dict[str, Any]]] = {}
_lock = threading.Lock()


def _n_boot() -> int | None:
    raw = request.args.get("n_boot")
    if raw is None:
        return None
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 6 or int(raw) > MAX_BOOT:  # "²".isdigit() is True
        raise ApiError(400, f"n_boot must be an integer from 0 to {MAX_BOOT}")
    return int(raw)


@contextmanager
def _slot(svc: Services) -> Iterator[None]:
    """Bootstrap intervals cost seconds to minutes: four reports held every thread for 2 minutes and 97 of 121
    webhooks timed out (issue 17). At most REPORT_QUEUE_LIMIT at once, and each also takes a /predict slot, so
    predictions and reports together leave a webhook its thread; more get a 503 at once."""
    if not svc.report_slots.acquire(timeout=0.05):
        metrics.REJECTED.inc()
        raise ApiError(503, "overloaded: too many reports being computed (REPORT_QUEUE_LIMIT); retry later")
    try:
        if not svc.predict_slots.acquire(timeout=0.05):
            metrics.REJECTED.inc()
            raise ApiError(503, "overloaded: too many predictions and reports in flight (PREDICT_QUEUE_LIMIT); "
                                "retry later")
        try:
            yield
        finally:
            svc.predict_slots.release()
    finally:
        svc.report_slots.release()


def _report(project: str) -> dict[str, Any]:
    svc: Services = current_app.extensions["slm"]
    pid = project_id(project)
    stored = svc.store.project(pid)
    if stored is None:
        raise ApiError(404, f"unknown project {pid!r}: nothing is stored for it (connect it in Label Studio, "
                            "or import labels with `slm-annotator train --data`)")
    # annotators' e-mails only to callers who sent Basic auth; anyone else (an open loopback backend too) sees
    # "rater 1", "rater 2"...
    hide = g.get("via") != "basic"
    key, seq = (pid, _n_boot(), hide), stored.label_seq
    with _lock:
        hit = _cache.get(key)
    if hit and hit[0] == seq and time.monotonic() < hit[1]:
        return hit[2]
    with _slot(svc):
        report = build_project_report(svc.store, pid, svc.settings.base_version, key[1],
                                      prices=Prices.of(svc.settings), hide_raters=hide,
                                      rater_weighting=rater_weighting_for(svc.settings, stored.extra_params))
    report["json_url"] = f"/report/{pid}.json"
    with _lock:
        if len(_cache) >= MAX_CACHED:
            _cache.clear()
        _cache[key] = (seq, time.monotonic() + CACHE_SECONDS, report)
    return report


@bp.get("/report/<project>.json")
def report_json(project: str) -> Any:
    return jsonify(_report(project))


@bp.get("/report/<project>")
def report_page(project: str) -> Any:
    html = render_project(_report(project))
    return Response(html, 200, {"Content-Type": "text/html; charset=utf-8", "Content-Security-Policy": CSP,
                                "Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"})
