"""Proves the Label Studio harness (tests/e2e/labelstudio.py) against a real LS 1.23.2.

No real backend is involved: a throwaway stub ML backend (http.server) answers /health, /setup,
/predict and /webhook and records everything LS sends, which is printed (run with -s) as
documentation of the wire format.
"""

from __future__ import annotations

import json
import threading
import time
import xml.etree.ElementTree as ET
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "label_configs"
STUB_VERSION = "stub-1"


# --------------------------------------------------------------------------- stub ML backend
def first_choice(label_config: str) -> tuple[str, str, str] | None:
    """(from_name, to_name, first choice value) of the first <Choices> in a config."""
    root = ET.fromstring(label_config)
    for el in root.iter("Choices"):
        choice = next(el.iter("Choice"), None)
        if choice is not None:
            return el.get("name"), el.get("toName"), choice.get("value")
    return None


class StubBackend:
    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # keep pytest output clean
                pass

            def _record(self, body):
                with stub.lock:
                    stub.requests.append(
                        {
                            "t": time.time(),
                            "method": self.command,
                            "path": self.path,
                            "auth": self.headers.get("Authorization"),
                            "content_type": self.headers.get("Content-Type"),
                            "body": body,
                        }
                    )

            def _reply(self, code, obj):
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._record(None)
                if self.path.rstrip("/") in ("/health", ""):
                    self._reply(200, {"status": "UP", "model_class": "stub"})
                else:
                    self._reply(404, {"error": "not found"})

            def do_POST(self):
                n = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(n) if n else b""
                try:
                    body = json.loads(raw) if raw else None
                except ValueError:
                    body = raw.decode(errors="replace")
                self._record(body)
                path = self.path.split("?")[0].rstrip("/")
                if path == "/setup":
                    self._reply(200, {"model_version": STUB_VERSION})
                elif path == "/predict":
                    fc = first_choice(body.get("label_config") or "")
                    results = []
                    for _task in body.get("tasks", []):
                        result = []
                        if fc:
                            result = [{"from_name": fc[0], "to_name": fc[1], "type": "choices",
                                       "value": {"choices": [fc[2]]}}]  # fmt: skip
                        results.append({"result": result, "score": 0.5, "model_version": STUB_VERSION})
                    self._reply(200, {"results": results})
                elif path == "/webhook":
                    self._reply(200, {"status": "ok"})
                else:
                    self._reply(404, {"error": "not found"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def seen(self, path: str) -> list[dict]:
        with self.lock:
            return [r for r in self.requests if r["path"].split("?")[0].rstrip("/") == path]

    def wait_for(self, pred, timeout: float = 15.0) -> list[dict]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                hits = [r for r in self.requests if pred(r)]
            if hits:
                return hits
            time.sleep(0.1)
        return []


def _abbrev(obj, limit: int = 120):
    """Shorten long strings / lists so the wire dump stays readable."""
    if isinstance(obj, str):
        return obj if len(obj) <= limit else obj[:limit] + f"...<{len(obj)} chars>"
    if isinstance(obj, list):
        out = [_abbrev(x, limit) for x in obj[:3]]
        return out + ([f"...<{len(obj)} items>"] if len(obj) > 3 else [])
    if isinstance(obj, dict):
        return {k: _abbrev(v, limit) for k, v in obj.items()}
    return obj


def load_fixture(name: str) -> tuple[str, dict]:
    return (FIXTURES / f"{name}.xml").read_text(), json.loads((FIXTURES / f"{name}.task.json").read_text())


# --------------------------------------------------------------------------- tests
@pytest.mark.parametrize("name", sorted(p.stem for p in FIXTURES.glob("*.xml")))
def test_fixture_config_accepted_by_label_studio(label_studio, name):
    """Every fixture config is a valid LS 1.23.2 config and its example task imports."""
    config, task = load_fixture(name)
    pid = label_studio.create_project(f"fixture {name}", config)
    summary = label_studio.import_tasks(pid, [task])
    assert summary["task_count"] == 1, summary
    (stored,) = label_studio.list_tasks(pid)
    assert stored["data"] == task["data"]


def test_harness_end_to_end(label_studio):
    t0 = time.monotonic()
    ls = label_studio
    config, task = load_fixture("text_classification")
    pid = ls.create_project("harness e2e", config)
    texts = [
        task["data"]["text"],
        "The plot was dull and the acting was worse.",
        "It is a film. It has a runtime.",
    ]
    summary = ls.import_tasks(pid, [{"data": {"text": t}} for t in texts])
    assert summary["task_count"] == 3
    tasks = ls.list_tasks(pid)
    assert sorted(t["data"]["text"] for t in tasks) == sorted(texts)
    task_ids = sorted(t["id"] for t in tasks)

    with StubBackend() as stub:
        # no webhook before an ML backend is connected
        hooks = ls.list_webhooks(pid)
        assert isinstance(hooks, list)
        assert not [h for h in hooks if h.get("url", "").startswith(stub.url)], hooks

        ml_id = ls.connect_ml_backend(pid, stub.url, title="stub backend")
        assert isinstance(ml_id, int)
        assert stub.seen("/health") and stub.seen("/setup"), stub.requests
        (ml,) = ls.list_ml_backends(pid)
        print(f"\n[e2e] ML backend as stored by LS: {json.dumps(_abbrev(ml))}")

        hooks = ls.list_webhooks(pid)
        print(f"[e2e] webhooks after connect: {json.dumps(_abbrev(hooks))}")
        assert [h for h in hooks if h.get("url") == stub.url + "/webhook"], hooks

        # predictions: one /predict call with all tasks, stored with the version /setup returned
        r = ls.retrieve_predictions(pid)
        print(f"[e2e] retrieve_tasks_predictions response: {r}")
        assert len(stub.seen("/predict")) == 1
        assert len(stub.seen("/predict")[0]["body"]["tasks"]) == 3
        preds = ls.list_predictions(project=pid)
        assert sorted(p["task"] for p in preds) == task_ids
        assert {p["model_version"] for p in preds} == {STUB_VERSION}
        assert all(p["result"][0]["value"] == {"choices": ["Positive"]} for p in preds)
        by_task = {t["id"]: t for t in ls.list_tasks(pid)}
        assert all(by_task[i]["predictions"][0]["model_version"] == STUB_VERSION for i in task_ids)

        # annotations: create one and read it back; LS fires ANNOTATION_CREATED to <backend>/webhook
        result = [{"from_name": "sentiment", "to_name": "text", "type": "choices",
                   "value": {"choices": ["Negative"]}}]  # fmt: skip
        ann = ls.create_annotation(task_ids[1], result)
        (back,) = ls.list_annotations(task_ids[1])
        assert back["id"] == ann["id"] and back["result"][0]["value"] == {"choices": ["Negative"]}
        created = stub.wait_for(
            lambda r: r["path"].startswith("/webhook") and (r["body"] or {}).get("action") == "ANNOTATION_CREATED"
        )
        assert created, [x["path"] for x in stub.requests]

        # "Start training" -> START_TRAINING webhook
        ls.start_training(ml_id)
        training = stub.wait_for(
            lambda r: r["path"].startswith("/webhook") and (r["body"] or {}).get("action") == "START_TRAINING"
        )
        assert training, [(x["path"], (x["body"] or {}).get("action")) for x in stub.requests]

        time.sleep(1.0)  # let trailing webhooks arrive before dumping
        print(f"[e2e] LS -> stub backend, {len(stub.requests)} requests:")
        for req in stub.requests:
            body = req["body"]
            tag = body.get("action") if isinstance(body, dict) and "action" in body else ""
            print(f"--- {req['method']} {req['path']} {tag} auth={req['auth']!r} ct={req['content_type']!r}")
            if body is not None:
                print(json.dumps(_abbrev(body), indent=1, ensure_ascii=False)[:4000])
    print(f"[e2e] harness test body took {time.monotonic() - t0:.1f}s")
