"""Secrets never appear in logs or /metrics, and every call to Label Studio is bounded by OUTBOUND_TIMEOUT.

The secrets: BASIC_AUTH_PASS, WEBHOOK_SECRET, LABEL_STUDIO_API_KEY, the password in DATABASE_URL and REDIS_URL,
and the access token Label Studio passes to /setup. Each test also proves the secret was really used (auth
passes with it, the stub Label Studio received the key), so a test that never touched a secret cannot pass.
"""

from __future__ import annotations

import base64
import http.server
import json
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from slm_annotator import redact
from slm_annotator.backend.app import create_app
from slm_annotator.settings import load_settings
from slm_annotator.testing import BackendProcess, wait_for
from tests.pg import PG_URL, fresh_schema
from tests.toy import CONFIG, toy_label

PASSWORD = "basic-PW-7f3a91c2"
WEBHOOK_SECRET = "hook-SECRET-55e0c1d9"
API_KEY = "ls-API-KEY-0b9d2e11"
DB_PASSWORD = "db-PASS-c4a7f00e"
REDIS_PASSWORD = "redis-PASS-91aa3b7c"
LS_TOKEN = "ls-access-TOKEN-3e8f6a20"
SECRETS = [PASSWORD, WEBHOOK_SECRET, API_KEY, DB_PASSWORD, REDIS_PASSWORD, LS_TOKEN]
USER = "ls-user"


class _LabelStudioStub(http.server.BaseHTTPRequestHandler):
    """Records the Authorization header it gets; answers 401 to everything, or never answers (hang)."""

    seen: list[str] = []  # noqa: RUF012 (one stub per test, reset by the fixture)
    hang = threading.Event()

    def do_GET(self) -> None:
        type(self).seen.append(self.headers.get("Authorization", ""))
        if type(self).hang.is_set():
            time.sleep(30)
            return
        body = b'{"detail": "Invalid token."}'
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def label_studio() -> Iterator[str]:
    _LabelStudioStub.seen = []
    _LabelStudioStub.hang.clear()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _LabelStudioStub)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture
def pg_url_with_password() -> Iterator[str]:
    """A fresh schema, reached through a URL that carries a password (the local server trusts loopback)."""
    host = PG_URL.split("@", 1)[1]
    with fresh_schema("sec") as schema:
        yield f"postgresql://postgres:{DB_PASSWORD}@{host}?options=-csearch_path%3D{schema}"


def _auth(password: str = PASSWORD) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{USER}:{password}".encode()).decode()}


def _events(project: int, n: int) -> list[dict[str, Any]]:
    out = []
    for t in range(n):
        label = toy_label(t, 1000 + t, "ann")
        out.append({"action": "ANNOTATION_CREATED", "project": {"id": project, "label_config": CONFIG},
                    "task": {"id": label.task_id, "data": label.task_data},
                    "annotation": {"id": label.annotation_id, "task": label.task_id, "result": label.result,
                                   "completed_by": {"email": "ann@example.com"},
                                   "updated_at": f"2026-11-22T10:00:{t:02d}Z"}})
    return out


def _assert_clean(text: str, where: str) -> None:
    leaked = [s for s in SECRETS if s in text]
    assert not leaked, f"{where} contains {leaked}"


@pytest.mark.postgres
def test_no_secret_in_logs_or_metrics_in_process(settings, monkeypatch, caplog, label_studio,
                                                 pg_url_with_password) -> None:
    monkeypatch.setenv("BASIC_AUTH_USER", USER)
    monkeypatch.setenv("BASIC_AUTH_PASS", PASSWORD)
    monkeypatch.setenv("WEBHOOK_SECRET", WEBHOOK_SECRET)
    monkeypatch.setenv("LABEL_STUDIO_URL", label_studio)
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", API_KEY)
    monkeypatch.setenv("DATABASE_URL", pg_url_with_password)
    monkeypatch.setenv("REDIS_URL", f"redis://:{REDIS_PASSWORD}@127.0.0.1:1/0")  # down: its errors get logged
    caplog.set_level(logging.DEBUG)
    settings = load_settings()
    redact.install(settings)  # what every process entry point does (cli._logging); create_app touches no global
    app = create_app(settings)
    client = app.test_client()
    svc = app.extensions["slm"]

    assert client.get("/versions/51").status_code == 401
    assert client.get("/versions/51", headers=_auth(PASSWORD + "x")).status_code == 401
    assert client.get("/versions/51", headers=_auth()).status_code == 200  # the password works
    reply = client.post("/setup", headers=_auth(), json={"project": "51.1", "schema": CONFIG,
                                                         "hostname": "http://ls", "access_token": LS_TOKEN})
    assert reply.status_code == 200
    assert svc.store.project("51").access_token == LS_TOKEN  # stored (a secret of the database's)
    event = _events(51, 1)[0]
    assert client.post("/webhook", json=event).status_code == 401
    assert client.post("/webhook", json=event, headers={"X-Webhook-Secret": WEBHOOK_SECRET[:-1]}).status_code == 401
    secret = {"X-Webhook-Secret": WEBHOOK_SECRET}
    for e in _events(51, 6):
        assert client.post("/webhook", json=e, headers=secret).status_code == 200
    reply = client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 51}}, headers=secret)
    assert reply.json["training"].startswith("deferred")  # Redis (with its password) is down
    assert client.post("/predict", data=b"{oops", headers=_auth(), content_type="application/json").status_code == 400
    assert client.post("/predict", headers=_auth(), json={"project": "51", "tasks": [
        {"id": 1, "data": {"text": "great"}}]}).status_code == 200

    def failing(*_: Any) -> Any:  # a library error that echoes its connection URL, as some drivers do
        raise RuntimeError(f"could not reach {pg_url_with_password} nor {svc.settings.redis_url}")

    monkeypatch.setattr(svc.store, "served_adapter", failing)
    reply = client.get("/versions/51", headers=_auth())
    assert reply.status_code == 500 and reply.json["error"] == "internal error: RuntimeError"

    from slm_annotator.worker.jobs import train_project  # the worker's side: sync with Label Studio, then train

    assert train_project("51")["status"] in {"skipped", "promoted", "refused"}
    assert _LabelStudioStub.seen and all(h == f"Token {API_KEY}" for h in _LabelStudioStub.seen)

    metrics = client.get("/metrics", headers=_auth()).get_data(as_text=True)
    assert "slm_requests_total" in metrics
    _assert_clean(metrics, "/metrics")
    assert "could not reach" in caplog.text and "Label Studio refused the API key" in caplog.text
    _assert_clean(caplog.text, "the captured log")
    for record in caplog.records:
        _assert_clean(record.getMessage() + (record.exc_text or ""), f"log record {record.name}")


@pytest.mark.slow  # `serve` and its worker, for real
@pytest.mark.postgres
def test_no_secret_in_the_logs_of_a_real_server_and_worker(tmp_path: Path, tiny_model_dir: Path, label_studio: str,
                                                            pg_url_with_password: str) -> None:
    """`slm-annotator serve` under gunicorn (access log on) with its RQ worker: every line they write."""
    env = {"BASE_MODEL": str(tiny_model_dir), "QUANTIZATION": "none", "BASIC_AUTH_USER": USER,
           "BASIC_AUTH_PASS": PASSWORD, "WEBHOOK_SECRET": WEBHOOK_SECRET, "LABEL_STUDIO_URL": label_studio,
           "LABEL_STUDIO_API_KEY": API_KEY, "DATABASE_URL": pg_url_with_password, "LOG_LEVEL": "DEBUG",
           "TRAIN_EPOCHS": "1", "TRAIN_THRESHOLD": "1000"}
    backend = BackendProcess(tmp_path / "model_dir", env, auth=(USER, PASSWORD), startup_timeout=180)
    with backend:
        url = backend.url
        assert requests.get(f"{url}/versions/52", timeout=10).status_code == 401
        assert requests.get(f"{url}/versions/52", auth=(USER, "wrong"), timeout=10).status_code == 401
        assert requests.get(f"{url}/health?token={PASSWORD[:-1]}", auth=(USER, PASSWORD), timeout=10).ok
        backend.post("/setup", json={"project": "52.1", "schema": CONFIG, "access_token": LS_TOKEN,
                                     "hostname": "http://ls"})
        hook = {"X-Webhook-Secret": WEBHOOK_SECRET}
        assert requests.post(f"{url}/webhook", json=_events(52, 1)[0], timeout=10).status_code == 401
        for e in _events(52, 8):
            assert requests.post(f"{url}/webhook", json=e, headers=hook, timeout=10).status_code == 200
        reply = requests.post(f"{url}/webhook", json={"action": "START_TRAINING", "project": {"id": 52}},
                              headers=hook, timeout=10)
        assert reply.json()["training"] == "queued"
        backend.post("/predict", json={"tasks": "nope"}, expect=(400,))

        def finished() -> list[dict[str, Any]] | None:
            runs = [r for r in backend.get("/versions/52")["runs"] if r["trigger"] != "sync"]  # syncs: own runs
            return runs if runs and runs[-1]["status"] != "running" else None

        runs = wait_for(finished, 120, "project 52's training run to end", 0.5)
        assert runs[-1]["status"] in {"promoted", "refused", "skipped"}, runs
        metrics = requests.get(f"{url}/metrics", auth=(USER, PASSWORD), timeout=10).text
    log = backend.log_text()
    assert '"GET /versions/52' in log and "401" in log, "the gunicorn access log must be in the captured output"
    assert "Label Studio refused the API key" in log  # the worker's sync ran and logged its failure
    assert _LabelStudioStub.seen and all(h == f"Token {API_KEY}" for h in _LabelStudioStub.seen)
    _assert_clean(log, "the server and worker log")
    _assert_clean(metrics, "/metrics")
    _assert_clean(json.dumps(runs), "/versions")


def test_label_studio_calls_are_bounded_by_outbound_timeout(settings, monkeypatch, label_studio) -> None:
    from slm_annotator.store import Store
    from slm_annotator.worker.sync import SyncError, sync_project

    _LabelStudioStub.hang.set()  # accepts the connection, never answers
    monkeypatch.setenv("LABEL_STUDIO_URL", label_studio)
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", API_KEY)
    monkeypatch.setenv("OUTBOUND_TIMEOUT", "0.5")
    s = load_settings()
    started = time.monotonic()
    with pytest.raises(SyncError, match="unreachable: ReadTimeout"):
        sync_project(s, Store(s.database_url), "53")
    assert time.monotonic() - started < 3
    assert _LabelStudioStub.seen == [f"Token {API_KEY}"]


def test_evaluate_scrubs_the_database_password_from_its_log(monkeypatch, caplog, tmp_path: Path) -> None:
    """`evaluate --project` opens DATABASE_URL: its log goes through the CLI's one setup, with redaction."""
    import slm_annotator.store
    from slm_annotator.cli import main

    url = f"postgresql://labels:{DB_PASSWORD}@127.0.0.1:1/labels"
    monkeypatch.setenv("DATABASE_URL", url)

    class UnreachableStore:  # a driver that echoes its connection URL in a warning, as some do
        def __init__(self, database_url: str, **_: Any) -> None:
            logging.getLogger("sqlalchemy.pool").warning("could not connect to %s, giving up", database_url)
            raise OSError("database unreachable")

    monkeypatch.setattr(slm_annotator.store, "Store", UnreachableStore)
    caplog.set_level(logging.INFO)
    assert main(["evaluate", "--project", "1", "--out", str(tmp_path)]) == 2
    assert "could not connect to postgresql://labels:***@127.0.0.1:1/labels" in caplog.text
    _assert_clean(caplog.text, "evaluate's log")
