"""Issue 15: the prediction cache, /predict within a budget, bulk prediction jobs that write to Label Studio's
API, and the refresh after a promotion. Tiny model, a stub Label Studio API recording what is written."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from dataclasses import replace
from typing import Any

import pytest

from slm_annotator.backend.app import create_app
from slm_annotator.store import Store
from slm_annotator.testing import STUB_TOKEN as TOKEN
from slm_annotator.testing import StubLabelStudio
from tests.toy import worker_env

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
@pytest.fixture
def stub_ls():
    made: list[StubLabelStudio] = []

    def make(project: str, tasks: list[dict[str, Any]]) -> StubLabelStudio:
        made.append(StubLabelStudio(project, tasks))
        return made[-1]

    yield make
    for stub in made:
        stub.close()


def _ls_settings(settings, redis_url: str, ls: StubLabelStudio, **changes: Any):
    return replace(settings, redis_url=redis_url, label_studio_url=ls.url, label_studio_api_key=TOKEN, **changes)


def _clear_bulk_queue(redis_url: str) -> Any:
    from redis import Redis
    from rq import Queue

    from slm_annotator.worker.policy import BULK_QUEUE

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
    results = reply["results"]
    n = sum(isinstance(r, dict) for r in results)
    # one entry per task (Label Studio stores nothing from a reply of another length): answers first, then []
    assert len(results) == 20 and all(r == [] for r in results[n:])
    assert 2 <= n < 20 and reply["background"] == {"tasks": 20 - n, "job": "queued"}
    ls.store([{**r, "task": t["id"]} for t, r in zip(tasks, results, strict=True) if isinstance(r, dict)])  # as LS
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
    assert again["results"] == [[], [], []] and ls.per_task(version) == {t["id"]: 1 for t in tasks}


@pytest.mark.slow  # a bulk job over a whole project, run twice
def test_bulk_job_reports_bad_tasks_survives_a_crash_and_writes_each_task_once(
        settings, embedded_redis_url, stub_ls, monkeypatch) -> None:
    from slm_annotator.backend.services import build_services
    from slm_annotator.worker.bulk import run_bulk

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

    from slm_annotator.backend.services import build_services
    from slm_annotator.worker.bulk import run_bulk
    from slm_annotator.worker.head_run import run_head
    from slm_annotator.worker.policy import BULK_QUEUE
    from tests.toy import CONFIG as TOY
    from tests.toy import fill

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


# ------------------------------------------------------------------ 5. scale out, 6. faults
def _start_workers(s, ls: StubLabelStudio, n: int, tmp_path) -> list[subprocess.Popen]:
    env = worker_env(s, LABEL_STUDIO_URL=ls.url, LABEL_STUDIO_API_KEY=TOKEN, HEAD_EVERY="0", BULK_CHUNK="4")
    procs = []
    for i in range(n):
        with open(tmp_path / f"worker{i}.log", "w") as log:
            procs.append(subprocess.Popen([sys.executable, "-m", "slm_annotator.cli", "worker", "--queue", "bulk",
                                           "--name", f"bulk-{i}-{tmp_path.name}"], env=env, start_new_session=True,
                                          stdout=log, stderr=subprocess.STDOUT))
    return procs


def _stop(procs: list[subprocess.Popen]) -> None:
    import os
    import signal

    for p in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
        p.wait(30)


@pytest.mark.slow  # two worker processes, one SIGKILLed
def test_two_workers_share_one_job_and_a_killed_one_loses_nothing(
        settings, embedded_redis_url, stub_ls, tmp_path) -> None:
    """Two worker processes on the bulk queue: the job's chunks go to both; the helper's worker is SIGKILLed
    mid-job; its chunk is taken over once its heartbeat lapses, and Label Studio ends with one prediction per task."""
    from rq import Queue, Worker
    from rq.job import Job

    from slm_annotator.testing import wait_for
    from slm_annotator.worker.policy import BULK_QUEUE, enqueue_bulk

    tasks = _tasks(120)
    ls = stub_ls("41", tasks)
    ls.delay = 0.25  # 30 chunks of 4: ~8 s of writing for one worker
    conn = _clear_bulk_queue(embedded_redis_url)
    s = _ls_settings(settings, embedded_redis_url, ls, bulk_chunk=4)
    store = Store(s.database_url)
    store.upsert_project("41", label_config=CONFIG)
    version = s.base_version
    procs = _start_workers(s, ls, 2, tmp_path)
    try:
        queue = Queue(BULK_QUEUE, connection=conn)
        wait_for(lambda: len(Worker.all(queue=queue)) == 2, 120, "two bulk workers")
        state, jid = enqueue_bulk(conn, s, "41", version, "missing")
        assert state == "queued"
        helper = wait_for(lambda: _started(conn, f"{jid}-help-0"), 60, "the helper job to start")
        wait_for(lambda: sum(ls.per_task(version).values()) >= 20, 60, "some predictions written")
        wait_for(lambda: any(conn.llen(k) for k in conn.keys(f"slm-annotator:bulk:*:doing:{jid}-help-0:*")), 60,
                 "the helper to hold a chunk")
        victim = next(p for p in procs if p.pid == helper.worker_pid)
        _stop([victim])  # the helper's worker and its work horse, mid-chunk
        job = Job.fetch(jid, connection=conn)
        wait_for(lambda: job.get_status(refresh=True) == "finished", 120, "the job to finish without its helper")
        assert ls.per_task(version) == {t["id"]: 1 for t in tasks}
        run = store.bulk_runs("41")[0]
        assert (run.status, run.done, run.total, run.errors) == ("done", 120, 120, 0)
        assert run.written + run.skipped == 120  # what the killed one wrote before dying is found, not rewritten
        assert run.workers == 2  # both took chunks
        assert conn.smembers(f"slm-annotator:bulk:{run.id}:dead")  # the killed one's chunk was taken over
        assert job.return_value()["workers"] == 2 and job.return_value()["done"] == 120
    finally:
        _stop(procs)


def _started(conn, job_id: str) -> Any:
    from rq.exceptions import NoSuchJobError
    from rq.job import Job
    from rq.worker import Worker

    try:
        job = Job.fetch(job_id, connection=conn)
    except NoSuchJobError:
        return None
    if job.get_status(refresh=True) != "started" or not job.worker_name:
        return None
    worker = Worker.find_by_key(Worker.redis_worker_namespace_prefix + job.worker_name, connection=conn)
    if worker is None:
        return None
    job.worker_pid = worker.pid
    return job


def test_label_studio_down_makes_the_run_wait_visibly_and_nothing_is_written_twice(
        settings, embedded_redis_url, stub_ls) -> None:
    """503s for a while: the run shows "waiting" (store, /health) and carries on when Label Studio is back; a write
    that landed before its error is not written again. Down for longer than the patience: "failed" on /health."""
    from slm_annotator.backend.services import build_services
    from slm_annotator.worker.bulk import run_bulk
    from slm_annotator.worker.sync import SyncError

    tasks = _tasks(12)
    ls = stub_ls("41", tasks)
    s = _ls_settings(settings, embedded_redis_url, ls, bulk_chunk=4, bulk_ls_patience=30.0)
    app = create_app(s)
    client = app.test_client()
    svc = build_services(s)
    svc.store.upsert_project("41", label_config=CONFIG)
    version = svc.served_for("41").model_version
    seen: list[tuple[str, list[str]]] = []
    ls.failing, ls.land_then_fail = 3, 1  # chunk 1 lands but errs; chunk 2 fails twice
    ls.on_fail = lambda: seen.append((svc.store.latest_bulk_runs()["41"].status,
                                      client.get("/health").json["degraded"]))
    meta = run_bulk(svc, "41", version, "missing")
    assert meta["written"] == 12 and ls.per_task(version) == {t["id"]: 1 for t in tasks}
    assert len(seen) == 3 and seen[2][0] == "waiting"
    assert any("bulk prediction waiting" in d and "503" in d for d in seen[2][1])
    run = svc.store.latest_bulk_runs()["41"]
    assert run.status == "done" and "503" in run.last_error
    assert not any("bulk" in d for d in client.get("/health").json["degraded"])
    # down for good, a patience of 0: the run fails, visibly
    more = _tasks(4, start=200)
    ls.tasks.update({t["id"]: {**t, "annotations": []} for t in more})
    ls.failing, ls.land_then_fail = 10**6, 0
    svc.settings = replace(s, bulk_ls_patience=0.0)
    with pytest.raises(SyncError):
        run_bulk(svc, "41", version, "missing")
    assert any("bulk prediction failed" in d for d in client.get("/health").json["degraded"])
    ls.failing = 0
    svc.close()


def test_bulk_progress_is_in_metrics_and_the_report(settings, embedded_redis_url, stub_ls) -> None:
    from slm_annotator.backend.services import build_services
    from slm_annotator.worker.bulk import run_bulk

    tasks = [*_tasks(9), {"id": 99, "data": {"other": "no text"}}]
    ls = stub_ls("41", tasks)
    s = _ls_settings(settings, embedded_redis_url, ls, bulk_chunk=4)
    svc = build_services(s)
    svc.store.upsert_project("41", label_config=CONFIG)
    run_bulk(svc, "41", svc.served_for("41").model_version, "missing")
    svc.close()
    client = create_app(s).test_client()
    text = client.get("/metrics").get_data(as_text=True)
    assert 'slm_bulk_tasks{project="41",state="total"} 10.0' in text
    assert 'slm_bulk_tasks{project="41",state="written"} 9.0' in text
    assert 'slm_bulk_tasks{project="41",state="errors"} 1.0' in text
    assert 'slm_bulk_run_status{project="41",status="done"} 1.0' in text
    report = client.get("/report/41.json").json
    assert report["bulk"][0]["done"] == 10 and report["bulk"][0]["status"] == "done"
    assert "Bulk predictions" in client.get("/report/41").get_data(as_text=True)


def test_a_run_stops_when_a_newer_version_is_served_mid_run(settings, embedded_redis_url, stub_ls,
                                                            monkeypatch) -> None:
    """Two promotions in a row (a head every 10 labels): the first refresh stops at its next chunk instead of
    writing predictions of a version nobody serves any more; the run says superseded."""
    from types import SimpleNamespace

    from slm_annotator.backend.services import build_services
    from slm_annotator.worker.bulk import run_bulk

    tasks = _tasks(12)
    ls = stub_ls("41", tasks)
    svc = build_services(_ls_settings(settings, embedded_redis_url, ls, bulk_chunk=4))
    svc.store.upsert_project("41", label_config=CONFIG)
    version = svc.served_for("41").model_version
    real_store = ls.store

    def promote_after_first_write(items: list[dict[str, Any]]) -> None:
        real_store(items)
        monkeypatch.setattr(svc.store, "served_adapter", lambda pid: SimpleNamespace(model_version="newer"))

    ls.store = promote_after_first_write  # type: ignore[method-assign]
    meta = run_bulk(svc, "41", version, "missing")
    assert meta["status"] == "superseded" and meta["served"] == "newer"
    assert meta["written"] == 4 and sum(ls.per_task(version).values()) == 4
    run = svc.store.latest_bulk_runs()["41"]
    assert run.status == "superseded" and run.finished_at is not None
    monkeypatch.undo()
    svc.close()
