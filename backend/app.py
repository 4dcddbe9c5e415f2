"""Flask app factory: one Services object per process, JSON errors, auth, metrics, body limits."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from flask import Flask, Response, g, jsonify, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from slm_annotator.backend import metrics
from slm_annotator.backend.auth import OPEN_PATHS, SECRET_HEADER, basic_auth_on, basic_ok, check_posture, secret_ok
from slm_annotator.backend.errors import ApiError
from slm_annotator.backend.protocol import bp as protocol_bp
from slm_annotator.backend.report import bp as report_bp
from slm_annotator.backend.services import Services, build_services
from slm_annotator.backend.store_metrics import StoreCollector
from slm_annotator.costs import Prices
from slm_annotator.settings import Settings, load_settings

log = logging.getLogger(__name__)


def _endpoint() -> str:
    rule = request.url_rule.rule if request.url_rule else "unmatched"
    return rule.split("<")[0].rstrip("/") or "/"


def create_app(settings: Settings | None = None, services: Services | None = None) -> Flask:
    """The app and nothing else: no thread, no process-wide state. The process that serves it installs log
    redaction (cli._logging) and calls start_background(app)."""
    settings = settings or (services.settings if services else load_settings())
    check_posture(settings)  # exposed without credentials: refuse to start, naming BASIC_AUTH_USER/PASS
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    svc = services or build_services(settings)
    app.extensions["slm"] = svc
    app.register_blueprint(protocol_bp)
    app.register_blueprint(report_bp)
    store_metrics = StoreCollector(svc.store, Prices.of(settings))

    @app.before_request
    def _auth_and_timer() -> Any:
        g.started = time.perf_counter()
        authed = basic_ok(request.headers.get("Authorization", ""), settings)
        g.authenticated = authed or not basic_auth_on(settings)  # nothing configured: loopback only, all open
        g.via = "basic" if authed else ""
        if request.path in OPEN_PATHS:
            return None  # /health answers details only when g.authenticated
        if request.path == "/webhook" and settings.webhook_secret:
            # Label Studio's event webhooks carry no credentials of their own: the secret is a custom header
            # configured on the webhook, and it is the only way to write labels (a forged event could poison
            # training data). Its ML API (START_TRAINING) carries Basic auth instead: webhook() checks the action.
            if secret_ok(request.headers.get(SECRET_HEADER, ""), settings):
                g.via = "secret"
                return None
            if authed:
                return None
            return Response(f'{{"error": "webhook secret missing or wrong ({SECRET_HEADER} header)"}}', 401,
                            {"Content-Type": "application/json"})
        if not g.authenticated:
            return Response(
                '{"error": "authentication required"}',
                401,
                {"WWW-Authenticate": 'Basic realm="slm-annotator"', "Content-Type": "application/json"},
            )
        return None

    @app.after_request
    def _observe(response: Response) -> Response:
        endpoint = _endpoint()
        metrics.REQUESTS.labels(endpoint, request.method, str(response.status_code)).inc()
        metrics.LATENCY.labels(endpoint).observe(time.perf_counter() - g.get("started", time.perf_counter()))
        return response

    @app.errorhandler(ApiError)
    def _api_error(exc: ApiError) -> Any:
        log.warning("%s %s -> %d: %s", request.method, request.path, exc.status, exc.message)
        return jsonify(error=exc.message), exc.status

    @app.errorhandler(RequestEntityTooLarge)
    def _too_large(_exc: RequestEntityTooLarge) -> Any:
        message = f"request body is larger than {settings.max_body_bytes} bytes (MAX_BODY_BYTES)"
        log.warning("%s %s -> 413: %s", request.method, request.path, message)
        return jsonify(error=message), 413

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Any:
        return jsonify(error=exc.description or exc.name), exc.code or 500

    @app.errorhandler(Exception)
    def _crash(exc: Exception) -> Any:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return jsonify(error=f"internal error: {type(exc).__name__}"), 500

    @app.get("/metrics")
    def _metrics() -> Any:
        body, content_type = metrics.render(store_metrics)
        return Response(body, 200, {"Content-Type": content_type})

    return app


FLUSH_PERIOD_S = 5.0  # a training request that found Redis down is re-sent within this many seconds of its return


def start_background(app: Flask) -> None:
    """What a serving process runs beside its requests: the training-request flusher, and the model's load (at
    boot: /health and /setup stay instant, and Label Studio's first /predict, 100 s timeout, does not pay for it)."""
    svc: Services = app.extensions["slm"]
    start_flusher(svc)
    svc.model.start_loading()


def start_flusher(svc: Services, period: float = FLUSH_PERIOD_S) -> threading.Thread:
    """Re-sends training requests that found Redis down; a daemon thread, until Services.close()."""

    def loop() -> None:
        while not svc.stopped.wait(period):
            try:
                svc.trigger.flush_all()
            except Exception:
                log.exception("training-request flusher failed")

    thread = threading.Thread(target=loop, name="training-flusher", daemon=True)
    thread.start()
    return thread
