"""Issue 15: the prediction cache, /predict within a budget, bulk prediction jobs that write to Label Studio's
API, and the refresh after a promotion. Tiny model, a stub Label Studio API recording what is written."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from backend.app import create_app
from slm_annotator.store import Store
from tests.toy import worker_env

TOKEN = "stub-token-123"

CONFIG = """<View><Text name="text" value="$text"/>
<Choices name="sentiment" toName="text"><Choice value="pos"/><Choice value="neg"/></Choices>
<Rating name="quality" toName="text" maxRating="3"/></View>"""


def _tasks(n: int, start: int = 1, word: str = "review") -> list[dict[str, Any]]:
    return [{"id": i, "data": {"text": f"{word} number {i}"}} for i in range(start, start + n)]


class Counting:
    """Wraps Annotator.predict: how many tasks each call scored."""

    def __init__(self, annotator: Any) -> None:
        self.real = annotator.predict
        self.calls: list[list[int]] = []
        annotator.predict = self

    def __call__(self, rubric, tasks, *args, **kwargs):
        self.calls.append([t.get("id") for t in tasks])
        return self.real(rubric, tasks, *args, **kwargs)

    @property
    def scored(self) -> int:
        return sum(len(c) for c in self.calls)


def _app(settings, redis_url: str, **changes: Any):
    app = create_app(replace(settings, redis_url=redis_url, **changes))
    app.testing = True
    client = app.test_client()
    assert client.post("/setup", json={"project": "41.1", "schema": CONFIG}).status_code == 200
    return app, client, Counting(app.extensions["slm"].annotator)


def _predict(client, tasks: list[dict[str, Any]]) -> dict[str, Any]:
    reply = client.post("/predict", json={"project": "41.1", "tasks": tasks})
    assert reply.status_code == 200, reply.json
    return reply.json


# ------------------------------------------------------------------------------------------ 1. the cache
def test_a_repeated_predict_is_answered_from_the_cache_also_after_a_restart(settings, embedded_redis_url) -> None:
    _, client, count = _app(settings, embedded_redis_url)
    tasks = _tasks(6)
    first = _predict(client, tasks)["results"]
    assert count.scored == 6 and len(first) == 6
    assert _predict(client, tasks)["results"] == first and count.scored == 6  # nothing scored again
    changed = [dict(t) for t in tasks]
    changed[2] = {"id": 3, "data": {"text": "a different text now"}}
    again = _predict(client, changed)["results"]
    assert count.calls[-1] == [3] and again[:2] == first[:2] and again[3:] == first[3:]
    # another process (a restart) on the same store: still cached
    _, client2, count2 = _app(settings, embedded_redis_url)
    assert _predict(client2, tasks[:2] + tasks[3:])["results"] == first[:2] + first[3:] and count2.scored == 0
    # a different pre-fill bar is a different answer: a miss
    _, client3, count3 = _app(settings, embedded_redis_url, prefill_min_alpha=0.5)
    _predict(client3, tasks[:2])
    assert count3.scored == 2


def test_the_cache_keeps_only_the_newest_versions(settings) -> None:
    store = Store(settings.database_url)
    for n, version in enumerate(["v1", "v2", "v3"]):
        store.cache_predictions("5", version, "x", [(1, "h", [], 0.1 * n), (2, "h", [], 0.2)], keep_versions=2)
    assert store.cached_versions("5") == {"v2": 2, "v3": 2}
    assert store.cached_predictions("5", "v3", "x", {1: "h", 2: "other"}) == {1: ([], pytest.approx(0.2))}


# ------------------------------------------------------------------------------- a stub Label Studio API
class StubLS:
    """The few Label Studio 1.23.2 endpoints bulk prediction uses, recording every prediction written."""

    def __init__(self, project: str, tasks: list[dict[str, Any]]) -> None:
        self.project = project
        self.tasks = {t["id"]: {**t, "annotations": t.get("annotations", [])} for t in tasks}
        self.predictions: list[dict[str, Any]] = []
        self.writes = 0
        self.lock = threading.Lock()
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
                with stub.lock:
                    if any(item.get("task") not in stub.tasks for item in body):
                        return self._send(400, {"detail": "invalid task"})
                    stub.writes += 1
                    stub.store(body)
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


@pytest.fixture
def stub_ls():
    made: list[StubLS] = []

    def make(project: str, tasks: list[dict[str, Any]]) -> StubLS:
        made.append(StubLS(project, tasks))
        return made[-1]

    yield make
    for stub in made:
        stub.close()


def _ls_settings(settings, redis_url: str, ls: StubLS, **changes: Any):
    return replace(settings, redis_url=redis_url, label_studio_url=ls.url, label_studio_api_key=TOKEN, **changes)


def _clear_bulk_queue(redis_url: str) -> Any:
    from redis import Redis
    from rq import Queue

    from worker.policy import BULK_QUEUE

    conn = Redis.from_url(redis_url)
    Queue(BULK_QUEUE, connection=conn).empty()
    for key in conn.scan_iter("rq:job:bulk-*"):
        conn.delete(key)
    return conn


# ------------------------------------------------------------------ 2. /predict within its budget, 3. bulk jobs
@pytest.mark.slow  # a real worker process
def test_predict_past_its_budget_answers_a_prefix_and_a_worker_writes_the_rest(
        settings, embedded_redis_url, stub_ls, monkeypatch) -> None:
    """A zero budget: the first chunk is answered, the rest goes to a bulk job that a real worker process runs;
    Label Studio ends with exactly one prediction of the served version per task, none lost, none twice."""
    tasks = _tasks(20)
    ls = stub_ls("41", tasks)
    conn = _clear_bulk_queue(embedded_redis_url)
    s = _ls_settings(settings, embedded_redis_url, ls, predict_budget_seconds=0.0, predict_batch_size=4)
    app = create_app(s)
    client = app.test_client()
    version = client.post("/setup", json={"project": "41.1", "schema": CONFIG}).json["model_version"]
    reply = _predict(client, tasks)
    n = len(reply["results"])
    assert 2 <= n < 20 and reply["background"] == {"tasks": 20 - n, "job": "queued"}
    ls.store([{**r, "task": t["id"]} for t, r in zip(tasks, reply["results"], strict=False)])  # what LS does
    assert len(conn.lrange("rq:queue:slm-annotator-bulk", 0, -1)) == 1
    env = worker_env(s, LABEL_STUDIO_URL=ls.url, LABEL_STUDIO_API_KEY=TOKEN, HEAD_EVERY="0")
    done = subprocess.run([sys.executable, "-m", "slm_annotator.cli", "worker", "--burst", "--queue", "bulk"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert ls.per_task(version) == {t["id"]: 1 for t in tasks}
    from rq.job import Job

    job = Job.fetch(conn.keys("rq:job:bulk-41-request-*")[0].decode().split("rq:job:")[1], connection=conn)
    assert job.meta["done"] == job.meta["total"] == 20 - n and job.meta["written"] == 20 - n
    assert job.meta["tasks_per_s"] > 0 and job.meta["eta_s"] == 0
    # pressed again: Label Studio sends nothing new; a re-sent task is not answered twice by anyone
    again = _predict(client, tasks[n:n + 3])  # a job wrote these: a reply must not carry them too
    assert again["results"] == [] and ls.per_task(version) == {t["id"]: 1 for t in tasks}


@pytest.mark.slow  # a bulk job over a whole project, run twice
def test_bulk_job_reports_bad_tasks_survives_a_crash_and_writes_each_task_once(
        settings, embedded_redis_url, stub_ls, monkeypatch) -> None:
    from backend.services import build_services
    from worker.bulk import run_bulk

    tasks = [*_tasks(30), {"id": 99, "data": {"other": "no text field"}}]
    ls = stub_ls("41", tasks)
    s = _ls_settings(settings, embedded_redis_url, ls, bulk_chunk=8)
    svc = build_services(s)
    svc.store.upsert_project("41", label_config=CONFIG)
    version = svc.served_for("41").model_version
    real_finish = svc.store.finish_pushes
    calls = {"n": 0}

    def crash_after_second_write(*args: Any, **kwargs: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("worker killed between writing to Label Studio and recording it")
        real_finish(*args, **kwargs)

    monkeypatch.setattr(svc.store, "finish_pushes", crash_after_second_write)
    with pytest.raises(RuntimeError):
        run_bulk(svc, "41", version, "missing", owner="job-1")
    assert ls.writes == 2
    monkeypatch.setattr(svc.store, "finish_pushes", real_finish)
    seen: list[dict[str, Any]] = []
    meta = run_bulk(svc, "41", version, "missing", owner="job-1", progress=lambda m: seen.append(dict(m)))  # retry
    assert ls.per_task(version) == {**{t["id"]: 1 for t in tasks}, 99: 0}
    assert meta["error_count"] == 1 and meta["errors"][0]["task"] == 99 and "text" in meta["errors"][0]["error"]
    assert meta["done"] == meta["total"] and seen[-1]["done"] == meta["total"]
    # once more, as another job and with --all: everything is there, nothing is written twice
    before = ls.writes
    assert run_bulk(svc, "41", version, "all", owner="job-2")["written"] == 0
    assert ls.writes == before and ls.per_task(version)[5] == 1
    svc.close()


def test_cli_predict_inline_shows_progress_and_fills_the_project(
        settings, embedded_redis_url, stub_ls, monkeypatch, capsys) -> None:
    from slm_annotator import cli

    tasks = _tasks(12)
    ls = stub_ls("41", tasks)
    Store(settings.database_url).upsert_project("41", label_config=CONFIG)
    for key, value in {"REDIS_URL": embedded_redis_url, "LABEL_STUDIO_URL": ls.url, "LABEL_STUDIO_API_KEY": TOKEN,
                       "BULK_CHUNK": "5"}.items():
        monkeypatch.setenv(key, value)
    assert cli.main(["predict", "--project", "41", "--inline"]) == 0
    out = capsys.readouterr()
    assert "12/12 tasks" in out.err and json.loads(out.out.strip().splitlines()[-1])["written"] == 12
    version = settings.base_version
    assert ls.per_task(version) == {t["id"]: 1 for t in tasks}


# ------------------------------------------------------------------------ 4. refresh after a promotion
@pytest.mark.slow  # trains a head, then refreshes every task
def test_a_promoted_head_refreshes_every_unlabelled_task_most_uncertain_first(
        settings, embedded_redis_url, stub_ls) -> None:
    from rq.job import Job

    from backend.services import build_services
    from tests.toy import CONFIG as TOY
    from tests.toy import fill
    from worker.bulk import run_bulk
    from worker.head_run import run_head
    from worker.policy import BULK_QUEUE

    s = replace(settings, redis_url=embedded_redis_url, head_every=10, prefill_min_alpha=0.2)
    store = Store(s.database_url)
    fill(store, "42", 40)  # tasks 1..40 labelled
    unlabelled = [{"id": 100 + i, "data": {"text": f"it was {w} {w}"}} for i, w in
                  enumerate(["great", "awful", "happy", "sad", "superb", "nasty"])]
    labelled = [{"id": t, "data": {"text": "x"}, "annotations": [{"id": t, "result": []}]} for t in range(1, 41)]
    old = [{"task": 100 + i, "result": [], "score": sc, "model_version": "old"} for i, sc in
           enumerate([0.9, 0.2, 0.8, 0.1, 0.7, 0.6])]
    ls = stub_ls("42", labelled + unlabelled)
    ls.store(old)
    s = _ls_settings(s, embedded_redis_url, ls)
    conn = _clear_bulk_queue(embedded_redis_url)
    store.upsert_project("42", label_config=TOY)
    outcome = run_head(s, store, "42", store.start_run("42", "inline", "head").id)
    assert outcome.status == "promoted", outcome.detail
    queued = conn.lrange(f"rq:queue:{BULK_QUEUE}", 0, -1)
    assert len(queued) == 1
    job = Job.fetch(queued[0].decode(), connection=conn)
    assert job.args[1:] == (outcome.model_version, "unlabelled", None, "uncertain")
    svc = build_services(s)
    written: list[int] = []
    real = ls.store
    ls.store = lambda items: (written.extend(i["task"] for i in items), real(items))  # type: ignore[method-assign]
    meta = run_bulk(svc, *job.args[:4], order=job.args[4], owner=job.id)
    svc.close()
    assert meta["written"] == 6
    counts = ls.per_task(outcome.model_version)
    assert all(counts[t["id"]] == 1 for t in unlabelled) and all(counts[t] == 0 for t in range(1, 41))
    assert written == [103, 101, 105, 104, 102, 100]  # lowest previous score first
