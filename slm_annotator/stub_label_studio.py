"""A stub of the few Label Studio 1.23.2 API endpoints bulk prediction uses (export, predictions, import
predictions), recording every prediction written: for the tests and the bulk benchmark, which need a Label Studio
that can be slowed down, taken down, and counted exactly. The end-to-end tests use a real Label Studio."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

TOKEN = "stub-token-123"


class StubLabelStudio:
    """The few Label Studio 1.23.2 endpoints bulk prediction uses, recording every prediction written."""

    def __init__(self, project: str, tasks: list[dict[str, Any]]) -> None:
        self.project = project
        self.tasks = {t["id"]: {**t, "annotations": t.get("annotations", [])} for t in tasks}
        self.predictions: list[dict[str, Any]] = []
        self.writes = 0
        self.lock = threading.Lock()
        self.delay = 0.0  # seconds each prediction write takes
        self.failing = 0  # the next N writes answer 503 (Label Studio down)...
        self.land_then_fail = 0  # ...the first N of them after storing them all the same (a timeout after it landed)
        self.on_fail: Any = None  # called (in the server thread) at each failed write
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, status: int, body: Any) -> None:
                raw = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def do_GET(self) -> None:
                if self.headers.get("Authorization") != f"Token {TOKEN}":
                    return self._send(401, {"detail": "no"})
                url = urlsplit(self.path)
                q = {k: v[0] for k, v in parse_qs(url.query).items()}
                with stub.lock:
                    if url.path == f"/api/projects/{stub.project}/export":
                        return self._send(200, [{**t, "predictions": [p for p in stub.predictions
                                                                       if p["task"] == t["id"]]}
                                                for t in stub.tasks.values()])
                    if url.path == "/api/predictions":
                        if "task" in q:
                            return self._send(200, [p for p in stub.predictions if p["task"] == int(q["task"])])
                        return self._send(200, list(stub.predictions))
                return self._send(404, {})

            def do_POST(self) -> None:
                if self.headers.get("Authorization") != f"Token {TOKEN}":
                    return self._send(401, {"detail": "no"})
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path != f"/api/projects/{stub.project}/import/predictions":
                    return self._send(404, {})
                time.sleep(stub.delay)
                with stub.lock:
                    if any(item.get("task") not in stub.tasks for item in body):
                        return self._send(400, {"detail": "invalid task"})
                    failing = stub.failing > 0
                    stub.failing -= failing
                    if not failing or stub.land_then_fail > 0:
                        stub.land_then_fail -= failing
                        stub.writes += 1
                        stub.store(body)
                if failing:
                    if stub.on_fail:
                        stub.on_fail()
                    return self._send(503, {"detail": "down"})
                return self._send(201, {"created": len(body)})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def store(self, items: list[dict[str, Any]]) -> None:
        for item in items:
            self.predictions.append({"id": len(self.predictions) + 1, "task": item["task"], "result": item["result"],
                                     "score": item.get("score"), "model_version": item.get("model_version")})

    def per_task(self, version: str) -> dict[int, int]:
        return {tid: sum(1 for p in self.predictions if p["task"] == tid and p["model_version"] == version)
                for tid in self.tasks}

    def close(self) -> None:
        self.server.shutdown()
