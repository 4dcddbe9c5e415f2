"""Faults with real parts: a worker SIGKILLed mid-training, and a Redis server stopped while labels arrive."""

from __future__ import annotations

import hashlib
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from redis import Redis
from rq import Queue
from rq.job import Job, JobStatus
from rq.registry import StartedJobRegistry

from slm_annotator.backend.app import create_app, start_flusher
from slm_annotator.schema import utcnow
from slm_annotator.store import Store
from slm_annotator.testing import CLI, RedisServer, WorkerProcess, redis_up
from slm_annotator.testing import descendants as _descendants
from slm_annotator.testing import wait_for as _wait
from slm_annotator.worker.pipeline import run_training
from slm_annotator.worker.policy import QUEUE_NAME, enqueue_training, job_id
from tests.toy import CONFIG, fill, toy_label, worker_env

pytestmark = pytest.mark.slow  # real RQ workers, a redis-server stopped and started, training runs

WORKER = [*CLI, "worker"]


def _digest(path: Path) -> str:
    return hashlib.sha256((path / "adapter_model.safetensors").read_bytes()).hexdigest()


@pytest.fixture
def private_redis(tmp_path) -> Iterator[RedisServer]:
    """A redis-server of this test's own (append-only): stop() then start() is an outage that hurts no one else."""
    with RedisServer(tmp_path / "redis-home") as redis:
        yield redis


def test_worker_killed_mid_training_keeps_the_served_adapter_and_the_job_recovers(settings, private_redis,
                                                                                  tmp_path) -> None:
    url = private_redis.url
    settings = replace(settings, redis_url=url, train_epochs=8, train_lr=1e-2, heldout_fraction=0.25,
                       token_dropout_share=0.0, lora_r=8, train_retries=1, train_retry_delays=(0,))
    store = Store(settings.database_url)
    fill(store, "9")
    run = store.start_run("9", "inline", "test")
    first = run_training(settings, store, "9", run.id)
    assert first.status == "promoted", first.detail
    store.finish_run(run.id, first.status)
    served = store.served_adapter("9")
    before = _digest(Path(served.path))
    conn = Redis.from_url(url)
    enqueue_training(conn, settings, "9", "test")
    # A long run (400 epochs) so the kill lands mid-training, whatever the machine's speed.
    worker = WorkerProcess(worker_env(settings, TRAIN_EPOCHS="400"), tmp_path / "worker.log").start()
    try:
        job = Job.fetch(job_id("9"), connection=conn)
        _wait(lambda: job.get_meta(refresh=True).get("step", 0) >= 3, 180, "training steps in the job's meta")
        family = _descendants(worker.pid)  # the work horse (in a process group of its own) and the scheduler
    finally:
        worker.signal_group(signal.SIGKILL, 30)  # the worker's group, as a supervisor would
    assert family, "the worker had no work horse"
    _wait(lambda: not [p for p in family if _running(p)], 10, "the work horse to die with its worker")
    assert job.get_status(refresh=True) == JobStatus.STARTED  # abandoned: nobody will finish it
    assert store.served_adapter("9").version == served.version and _digest(Path(served.path)) == before
    assert [a.version for a in store.adapters("9")] == [1]
    # RQ's maintenance finds the job once its heartbeat lapses (~90 s): run that cleanup as if the time had
    # passed, then a fresh worker retries the job from the start.
    queue = Queue(QUEUE_NAME, connection=conn)
    StartedJobRegistry(queue=queue).cleanup(timestamp=time.time() + 300)
    job.refresh()
    assert job.get_status() == JobStatus.QUEUED and job.retries_left == 0
    done = subprocess.run([*WORKER, "--burst"], env=worker_env(settings), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert job.get_status(refresh=True) == JobStatus.FINISHED
    runs = store.runs("9")
    assert [r.status for r in runs][:2] == ["promoted", "abandoned"]
    assert runs[2].status in {"promoted", "refused"}
    assert len([a for a in store.adapters("9") if a.status == "served"]) == 1
    assert not list(Path(served.path).parent.glob(".tmp-*"))  # nothing half-written was left behind


def test_redis_stopped_while_webhooks_arrive_loses_nothing_and_trains_after(settings, private_redis, request) -> None:
    url = private_redis.url
    settings = replace(settings, redis_url=url, train_threshold=40, train_epochs=2, train_lr=1e-2,
                       heldout_fraction=0.25, token_dropout_share=0.0, lora_r=8)
    app = create_app(settings)
    start_flusher(app.extensions["slm"])  # as `serve` does (start_background) in each of its processes
    request.addfinalizer(app.extensions["slm"].close)  # the flusher stops with the test
    client = app.test_client()
    client.post("/setup", json={"project": "11.5", "schema": CONFIG})
    store = Store(settings.database_url)
    events = []
    for t in range(30):
        for r, rater in enumerate(["ann", "bob"]):
            label = toy_label(t, 100 + t * 2 + r, rater)
            events.append({"action": "ANNOTATION_CREATED", "project": {"id": 11},
                           "task": {"id": label.task_id, "data": label.task_data},
                           "annotation": {"id": label.annotation_id, "task": label.task_id, "result": label.result,
                                          "completed_by": {"email": f"{rater}@x"},
                                          "updated_at": f"2026-11-22T10:{t:02d}:0{r}Z"}})
    for event in events[:10]:
        assert client.post("/webhook", json=event).status_code == 200
    private_redis.stop()
    _wait(lambda: not redis_up(url), 10, "redis to stop")
    for event in events[10:]:  # threshold crossed while Redis is down
        started = time.perf_counter()
        reply = client.post("/webhook", json=event)
        assert reply.status_code == 200 and reply.json["status"] == "stored", reply.json
        assert time.perf_counter() - started < 1.0  # Label Studio waits 1 s and never retries
    assert len(store.labels("11")) == 60
    assert store.project("11").training_requested
    private_redis.start()  # Redis is back; the backend's own flusher thread re-sends the request
    conn = Redis.from_url(url)
    _wait(lambda: job_id("11") in Queue(QUEUE_NAME, connection=conn).job_ids, 30, "the training job to be queued")
    assert Queue(QUEUE_NAME, connection=conn).job_ids.count(job_id("11")) == 1
    done = subprocess.run([*WORKER, "--burst"], env=worker_env(settings), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [r.status for r in store.runs("11")] in (["promoted"], ["refused"])
    assert not store.project("11").training_requested and store.pending_changes("11") == 0


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return state[state.rindex(")") + 2] != "Z"


def test_an_idle_worker_runs_its_maintenance_every_minute(settings, private_redis) -> None:
    """RQ runs maintenance (abandoned-job retries, scheduler restarts) only between blocking dequeues."""
    from slm_annotator.cli import build_worker

    worker = build_worker(replace(settings, redis_url=private_redis.url))
    assert worker.maintenance_interval == 60 and worker.dequeue_timeout <= 30


def test_a_worker_outlives_redis_going_away_mid_job(settings, private_redis, tmp_path) -> None:
    """RQ's worker quits when Redis vanishes under a running job; `slm-annotator worker` starts a new one."""
    url = private_redis.url
    conn = Redis.from_url(url)
    queue = Queue(QUEUE_NAME, connection=conn)
    first = queue.enqueue("time.sleep", 20, job_timeout=120)
    worker = WorkerProcess(worker_env(replace(settings, redis_url=url)), tmp_path / "worker.log").start()
    try:
        _wait(lambda: first.get_status(refresh=True) == JobStatus.STARTED, 60, "the first job to start")
        private_redis.stop()
        _wait(lambda: "starting a new one" in worker.log_text(), 90, "the worker to notice")
        assert worker.running(), worker.log_text()[-3000:]
        private_redis.start()
        second = Queue(QUEUE_NAME, connection=Redis.from_url(url)).enqueue("math.sqrt", 16.0)
        _wait(lambda: second.get_status(refresh=True) == JobStatus.FINISHED, 90, "a new job done after Redis is back")
        assert second.return_value() == 4.0
    finally:
        worker.signal_group(signal.SIGKILL, 30)


def test_a_redis_outage_during_training_does_not_end_the_run(settings, private_redis, tmp_path) -> None:
    """Progress and heartbeats miss Redis for a few seconds; the training run goes on and promotes once."""
    url = private_redis.url
    settings = replace(settings, redis_url=url, train_epochs=25, train_lr=1e-2, heldout_fraction=0.25,
                       token_dropout_share=0.0, lora_r=8, train_retries=0)
    store = Store(settings.database_url)
    fill(store, "12", n_tasks=20)
    conn = Redis.from_url(url)
    enqueue_training(conn, settings, "12", "test")
    worker = WorkerProcess(worker_env(settings), tmp_path / "worker.log").start()
    try:
        job = Job.fetch(job_id("12"), connection=conn)
        _wait(lambda: job.get_meta(refresh=True).get("step", 0) >= 2, 180, "training steps")
        stopped = utcnow()
        private_redis.stop()
        time.sleep(5)  # progress reports fail meanwhile
        private_redis.start()
        _wait(lambda: store.runs("12") and store.runs("12")[-1].status != "running", 300, "the run to end")
        assert [r.status for r in store.runs("12")] == ["promoted"], store.runs("12")[-1].error[-2000:]
        assert store.runs("12")[0].finished_at > stopped, "the run ended before the outage: nothing was tested"
        assert worker.running(), worker.log_text()[-3000:]
    finally:
        worker.signal_group(signal.SIGKILL, 30)


def test_a_worker_started_while_redis_is_down_waits_for_it(settings, tmp_path) -> None:
    """RQ's Worker talks to Redis as it is built: a worker (re)started during an outage used to exit with 1
    (found by bench_reliability once the heads worker's imports made its start slower than the outage)."""
    redis = RedisServer(tmp_path / "redis-later", persist=False)  # its port, not listening yet
    worker = WorkerProcess(worker_env(replace(settings, redis_url=redis.url)), tmp_path / "worker.log",
                           ("--queue", "training")).start()
    try:
        time.sleep(8)
        assert worker.running(), worker.log_text()[-2000:]
        redis.start()
        job = Queue(QUEUE_NAME, connection=Redis.from_url(redis.url)).enqueue("math.sqrt", 16.0)
        _wait(lambda: job.get_status(refresh=True) == JobStatus.FINISHED, 30, "the waiting worker to run a job")
    finally:
        worker.signal_group(signal.SIGKILL, 30)
        redis.stop()
