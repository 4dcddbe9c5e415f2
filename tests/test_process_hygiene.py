"""`serve` leaves nothing behind and keeps its embedded Redis up (issue 17, review findings #11, #17, #23).

Real processes: `python -m slm_annotator.cli serve` (this checkout's code) with its gunicorn worker, RQ workers,
their schedulers and work horses, and the embedded redis-server; SIGTERM and SIGKILL sent to serve alone, as a
container runtime or an operator's `kill` would.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest
import requests

from slm_annotator.cli import STOP_GRACE_S
from slm_annotator.store import Store
from slm_annotator.testing import CLI, BackendProcess
from slm_annotator.testing import descendants as _descendants
from slm_annotator.testing import wait_for as _wait
from tests.toy import fill

pytestmark = [pytest.mark.slow,  # `serve` with its workers and Redis, signalled and restarted
              pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and PR_SET_PDEATHSIG")]


class Serve(BackendProcess):
    """BackendProcess on this checkout's code (`python -m`, not the console script of the installed tree)."""

    def argv(self) -> list[str]:
        return [*CLI, "serve", "--host", "127.0.0.1", "--port", str(self.port), *self.serve_args]

    def env(self) -> dict[str, str]:
        return {**super().env(), "PYTHONPATH": str(Path(__file__).resolve().parents[1])}


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def _family(serve: Serve) -> dict[int, str]:
    """Every process serve started (its descendants, whatever their process group) and its redis-server."""
    pids = set(_descendants(serve.proc.pid))
    if serve.redis_pid():
        pids.add(serve.redis_pid())
    return {p: _cmdline(p) for p in pids if _running(p)}


@pytest.fixture
def serve_env(settings, tmp_path):
    return {"DATABASE_URL": settings.database_url, "BASE_MODEL": settings.base_model, "QUANTIZATION": "none",
            "HEAD_EVERY": "10", "TRAIN_EPOCHS": "400", "TRAIN_LR": "1e-2", "HELDOUT_FRACTION": "0.25", "LORA_R": "8",
            "TOKEN_DROPOUT_SHARE": "0", "THREADS": "2"}


def _kinds(family: dict[int, str]) -> list[str]:
    return sorted({"redis" if "redis-server" in c else "worker" if " worker " in f"{c} " else "serve"
                   for c in family.values()})


def _leftovers(family: dict[int, str]) -> dict[int, str]:
    return {p: c for p, c in family.items() if _running(p) and _cmdline(p) == c}


def test_sigterm_of_serve_mid_training_stops_everything_within_the_grace_period(settings, serve_env, tmp_path):
    store = Store(settings.database_url)
    fill(store, "9")
    serve = Serve(settings.model_dir, serve_env)
    try:
        serve.start()
        reply = serve.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 9}})
        assert reply["training"] == "queued", reply
        _wait(lambda: [r for r in store.runs("9") if r.status == "running"], 120, "the training run to start")
        time.sleep(3)  # the work horse is training (400 epochs: minutes)
        family = _family(serve)
        assert _kinds(family) == ["redis", "serve", "worker"], family
        assert sum(" worker " in f"{c} " for c in family.values()) >= 4, family  # 2 workers, a horse, schedulers
        started = time.monotonic()
        os.kill(serve.proc.pid, signal.SIGTERM)
        serve.proc.wait(timeout=STOP_GRACE_S + 15)
        took = time.monotonic() - started
        _wait(lambda: not _leftovers(family), 10, "serve's children to be gone")
    finally:
        log = serve.log_tail()
        serve.stop()
    assert took <= STOP_GRACE_S, (took, log)
    assert not _leftovers(family), (_leftovers(family), log)
    run = [r for r in store.runs("9")][-1]
    assert run.status == "interrupted" and run.finished_at is not None, (run.status, log)


def test_sigkill_of_serve_leaves_no_orphans(settings, serve_env, tmp_path):
    serve = Serve(settings.model_dir, serve_env)
    try:
        serve.start()
        time.sleep(3)  # the RQ workers have started their schedulers
        family = _family(serve)
        assert _kinds(family) == ["redis", "serve", "worker"], family
        os.kill(serve.proc.pid, signal.SIGKILL)
        serve.proc.wait(timeout=10)
        _wait(lambda: not _leftovers(family), 20, "serve's children to die with it")
    finally:
        log = serve.log_tail()
        serve.stop()
    assert not _leftovers(family), (_leftovers(family), log)


def _train_state(serve: Serve, project: int) -> str:
    return serve.post("/webhook", json={"action": "START_TRAINING", "project": {"id": project}})["training"]


def test_a_killed_embedded_redis_is_restarted_and_training_queues_again(settings, serve_env):
    serve = Serve(settings.model_dir, serve_env, serve_args=("--no-worker",))
    try:
        serve.start()
        assert _train_state(serve, 20) == "queued"
        time.sleep(2.5)  # appendfsync everysec: a write may wait up to 2 s for the append-only file
        first = serve.redis_pid()
        os.kill(first, signal.SIGKILL)
        _wait(lambda: not _running(first), 5, "redis-server to die")
        project = iter(range(21, 10_000))
        started = time.monotonic()
        _wait(lambda: _train_state(serve, next(project)) == "queued", 20, "a training request queued again", 0.5)
        took = time.monotonic() - started
        second = serve.redis_pid()
        assert second != first and _running(second) and "redis-server" in _cmdline(second)
        from redis import Redis
        from rq import Queue

        from slm_annotator.worker.policy import QUEUE_NAME

        queued = Queue(QUEUE_NAME, connection=Redis.from_url(f"unix://{serve.redis_socket()}")).job_ids
        assert "train-20" in queued, queued  # the append-only file kept the queue
    finally:
        log = serve.log_tail()
        serve.stop()
    assert took < 15, (took, log)


def _webhooks_counted(serve: Serve) -> float:
    text = requests.get(serve.url + "/metrics", timeout=10).text
    for line in text.splitlines():
        if line.startswith('slm_webhooks_total{action="OTHER"}'):
            return float(line.split()[-1])
    return 0.0


def test_two_serves_on_one_model_dir_keep_their_own_metrics(settings, serve_env, tmp_path):
    first = Serve(settings.model_dir, serve_env, serve_args=("--no-worker",))
    second = Serve(settings.model_dir, serve_env, serve_args=("--no-worker",))
    try:
        first.start()
        for _ in range(3):
            first.post("/webhook", json={"action": "SOMETHING_ELSE"})
        assert _webhooks_counted(first) == 3.0
        second.start()  # used to delete the first's live *.db files at start
        second.post("/webhook", json={"action": "SOMETHING_ELSE"})
        assert _webhooks_counted(first) == 3.0
        assert _webhooks_counted(second) == 1.0
        dead = settings.model_dir / "prometheus" / "999999999"  # a serve that is gone: its folder goes
        dead.mkdir()
        (dead / ".alive").touch()
        second.stop()
        third = Serve(settings.model_dir, serve_env, serve_args=("--no-worker",))
        third.start()
        third.stop()
        assert not dead.exists()
        assert _webhooks_counted(first) == 3.0
    finally:
        first.stop()
        second.stop()
