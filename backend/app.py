"""Flask app factory: one Services object per process, JSON errors, auth, metrics, body limits."""

from __future__ import annotations

import base64
import hmac
import logging
import threading
import time
from typing import Any

from flask import Flask, Response, g, jsonify, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from backend import metrics
from backend.errors import ApiError
from backend.protocol import bp as protocol_bp
from backend.report import bp as report_bp
from backend.services import Services, build_services
from backend.store_metrics import StoreCollector
from slm_annotator import redact
from slm_annotator.costs import Prices
from slm_annotator.settings import Settings, load_settings

log = logging.getLogger(__name__)
SECRET_HEADER = "X-Webhook-Secret"


def _authorized(settings: Settings) -> bool:
    header = request.headers.get("Authorization", "")
    if not header.startswith("Basic "):
        return False
    try:
        user, _, password = base64.b64decode(header[6:]).decode("utf-8").partition(":")
    except (ValueError, UnicodeDecodeError):
        return False
    return hmac.compare_digest(user, settings.basic_auth_user) and hmac.compare_digest(
        password, settings.basic_auth_pass
    )


def _endpoint() -> str:
    rule = request.url_rule.rule if request.url_rule else "unmatched"
    return rule.split("<")[0].rstrip("/") or "/"


def create_app(settings: Settings | None = None, services: Services | None = None) -> Flask:
    settings = settings or (services.settings if services else load_settings())
    redact.install(settings)
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
        if request.path == "/webhook" and settings.webhook_secret:
            # Label Studio's event webhooks carry no credentials of their own: the secret is a custom header
            # configured on the webhook, and it is the only way in (a forged event could poison training data).
            if hmac.compare_digest(request.headers.get(SECRET_HEADER, ""), settings.webhook_secret):
                return None
            return Response(f'{{"error": "webhook secret missing or wrong ({SECRET_HEADER} header)"}}', 401,
                            {"Content-Type": "application/json"})
        if settings.basic_auth_user and not _authorized(settings):
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

    _start_flusher(svc)
    return app


def _start_flusher(svc: Services, period: float = 5.0) -> None:
    """Re-sends training requests that found Redis down; a daemon thread per app, until Services.close()."""

    def loop() -> None:
        while not svc.stopped.wait(period):
            try:
                svc.trigger.flush_all()
            except Exception:
                log.exception("training-request flusher failed")

    threading.Thread(target=loop, name="training-flusher", daemon=True).start()
