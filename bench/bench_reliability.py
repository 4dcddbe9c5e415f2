"""Reliability benchmark: load and faults at once, then nothing acknowledged may be lost.

Everything real, on loopback only: `slm-annotator serve --no-worker` (gunicorn, as in docker compose), a separate
`slm-annotator worker` (RQ), a redis-server of the bench's own (a private port and directory, append-only; the
shared one is never touched), SQLite or a fresh PostgreSQL schema, WEBHOOK_SECRET and basic auth on.

  1. Project 1 (training): the toy rubric's labels as webhooks until a training job is queued; the first worker
     trains it with a huge TRAIN_EPOCHS, so the job is mid-training when the worker is killed.
  2. Project 2 (load): --requests Label Studio 1.23.2-shaped webhooks (create / resend / update / delete) from
     --clients concurrent clients at --rate per second, a new connection per request as Label Studio makes,
     while --predict-clients clients call /predict on the same project without pause.
  3. Faults mid-stream, at fractions of the stream (--faults): SIGKILL of the worker's process group while it
     trains, then a new worker (short TRAIN_EPOCHS); SIGKILL of gunicorn's process group (master and workers),
     then `serve` again on the same port; Redis shut down and started again --redis-down seconds later.
     Clients never resend a failed webhook (Label Studio does not); after a transport error a client waits
     --error-backoff seconds before its next event. Failed requests are counted apart.
  4. The killed job is retried (RQ notices the dead worker once its heartbeat lapses, ~90 s; --recovery fast
     runs that cleanup at once, as tests/test_faults.py does) and must complete.
  5. Promotion crash: a worker that dies inside the promotion transaction (bench/fault_worker.py) trains project
     1 again; the previous adapter must stay served (/setup and /predict), and the retried job must promote.
  6. Checks: every acknowledged webhook's label is stored exactly once in its latest acknowledged state (refused
     ones are not; unknown ones, cut off by a kill, may be); every prediction is valid for the rubric; no secret
     in any log line; the backend healthy at the end.

Examples:
  .venv/bin/python -m bench.bench_reliability                                   # tiny test model, ~4 min
  .venv/bin/python -m bench.bench_reliability --base-model smollm2 --quantization nf4 --train-epochs 2 \\
      --requests 3000 --rate 100 --out bench/results/reliability-smollm2.json   # the real default model
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime as _dt
import json
import logging
import os
import random
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.harness import (
    Client,
    Event,
    Outcome,
    build_load,
    lat_summary,
    machine_info,
    pg_schema_url,
    training_state,
    verify_acknowledged,
)
from slm_annotator.model.devdata import DevItem
from slm_annotator.store import Store
from slm_annotator.testing import TOY_CONFIG, BackendProcess, RedisServer, free_port, toy_label
from slm_annotator.testing import WorkerProcess as Worker

ROOT = Path(__file__).resolve().parents[1]

log = logging.getLogger("bench_reliability")
TRAIN_PROJECT, LOAD_PROJECT = "1", "2"
USER, PASSWORD, WEBHOOK_SECRET = "ls", "bench-basic-PW-4d1c", "bench-hook-SECRET-93af"
SECRETS = (PASSWORD, WEBHOOK_SECRET)
DONE = {"promoted", "refused", "skipped"}
LS_TIMEOUT_S = 1.0  # Label Studio's webhook timeout: a later reply is an error in its log (the label is stored)
TINY = ROOT / ".cache" / "tiny-llama-v1"


# ------------------------------------------------------------------------------------------------------ processes
# ------------------------------------------------------------------------------------------------------ the bench
@dataclass
class Bench:
    args: argparse.Namespace
    tmp: Path
    env: dict[str, str]
    redis: RedisServer
    backend: Any
    worker: Worker
    store: Store
    config: str
    items: list[DevItem]
    timeline: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    started: float = field(default_factory=time.monotonic)
    supervised: bool = True
    stopping: bool = False

    def note(self, what: str, **detail: Any) -> None:
        entry = {"t": round(time.monotonic() - self.started, 2), "event": what, **detail}
        self.timeline.append(entry)
        log.info("%s %s", what, json.dumps(detail, default=str))

    def worker_env(self, epochs: int) -> dict[str, str]:
        return {**self.env, "TRAIN_EPOCHS": str(epochs)}

    def new_worker(self, epochs: int) -> Worker:
        return Worker(self.worker_env(epochs), self.tmp / "worker.log",
                      argv=[str(Path(sys.executable).parent / "slm-annotator"), "worker"], cwd=ROOT)


def basic_auth() -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()}


def request(port: int, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None,
            timeout: float = 120.0) -> tuple[int, Any]:
    client = Client(port, keepalive=False, timeout=timeout, headers=headers or basic_auth())
    try:
        if method == "GET":
            status, data = client.get(path)
        else:
            status, data = client.post(path, json.dumps(body).encode())
    finally:
        client.close()
    try:
        return status, json.loads(data)
    except ValueError:
        return status, data.decode(errors="replace")


def load_items() -> tuple[str, list[DevItem]]:
    """USR-PersonaChat (the shared dev data), or items with random ratings on its config where that is absent."""
    from slm_annotator.model.devdata import load_usr_personachat

    try:
        dev = load_usr_personachat()
        return dev.label_config, dev.items
    except (OSError, ValueError) as exc:
        log.info("USR data unavailable (%s): synthetic items on the USR config", exc)
    from slm_annotator.model.devdata import usr_config

    config = usr_config()  # the config the harness's payloads are written for (its control names and types)
    fixtures = ROOT / "tests" / "fixtures" / "label_configs"
    data = json.loads((fixtures / "usr_personachat.task.json").read_text())["data"]
    if isinstance(data.get("context"), list):
        data = {**data, "context": "\n".join(f"{t.get('author', '')}: {t.get('text', '')}" for t in data["context"])}
    rng = random.Random(0)
    scales = {"Understandable": (0, 1), "Natural": (1, 3), "Maintains_Context": (1, 3), "Engaging": (1, 3),
              "Uses_Knowledge": (0, 1), "Overall": (1, 5)}
    items = []
    for k in range(150):
        ratings = {f"r{r}": {c: (rng.randint(lo, hi) if c == "Overall" else str(rng.randint(lo, hi)))
                             for c, (lo, hi) in scales.items()} for r in range(3)}
        items.append(DevItem(f"syn{k}", f"g{k // 5}", {**data, "response": f"{data['response']} ({k})"}, ratings))
    return config, items


# ------------------------------------------------------------------------------------------------------ faults
def kill_worker(b: Bench) -> dict[str, Any]:
    """SIGKILL the worker's whole group while it trains (as the OOM killer would), then a new worker."""
    before = training_state(b.store, b.redis.url, TRAIN_PROJECT)
    with b.lock:
        code = b.worker.signal_group(signal.SIGKILL)
        b.worker = b.new_worker(b.args.train_epochs)
        b.worker.start()
    return {"training_before": before, "exit": code}


def kill_backend(b: Bench) -> dict[str, Any]:
    """SIGKILL gunicorn's group (master and workers, mid-request), then `serve` again on the same port."""
    t0 = time.monotonic()
    with b.lock:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(b.backend.proc.pid, signal.SIGKILL)
        b.backend.proc.wait(30)
        b.backend.start()
    return {"down_s": round(time.monotonic() - t0, 2)}


def bounce_redis(b: Bench) -> dict[str, Any]:
    t0 = time.monotonic()
    b.redis.stop()
    stopped = time.monotonic()
    time.sleep(b.args.redis_down)
    b.redis.start()
    return {"stop_s": round(stopped - t0, 2), "down_s": round(time.monotonic() - stopped, 2)}


FAULTS = {"worker": kill_worker, "backend": kill_backend, "redis": bounce_redis}


def run_faults(b: Bench, plan: list[tuple[float, str]], cursor: list[int], total: int,
               load_done: threading.Event) -> None:
    for at, name in plan:
        while cursor[0] < at * total and not load_done.is_set():
            time.sleep(0.05)
        if load_done.is_set():
            b.note(f"fault {name} skipped: the load ended first")
            continue
        b.note(f"fault {name} begins", at_event=cursor[0])
        try:
            detail = FAULTS[name](b)
        except Exception as exc:
            b.note(f"fault {name} failed", error=repr(exc))
            raise
        b.note(f"fault {name} done", at_event=cursor[0], **detail)


def supervise(b: Bench) -> None:
    """Restarts a process that exits on its own, as docker compose's `restart: unless-stopped` would."""
    while not b.stopping:
        time.sleep(0.5)
        with b.lock:
            if not b.supervised or b.stopping:
                continue
            if b.worker.proc is not None and b.worker.proc.poll() is not None:
                b.note("worker exited on its own; restarted", code=b.worker.proc.returncode)
                b.worker = b.new_worker(b.args.train_epochs)
                b.worker.start()
            if b.backend.proc is not None and b.backend.proc.poll() is not None:
                b.note("backend exited on its own; restarted", code=b.backend.proc.returncode)
                b.backend.start()


# ------------------------------------------------------------------------------------------------------ load
@dataclass
class PredictStats:
    outcomes: list[Outcome] = field(default_factory=list)
    invalid: list[str] = field(default_factory=list)
    tasks: int = 0


def check_prediction(rubric: Any, reply: Any, n_tasks: int) -> str | None:
    """None if every task got a result whose every value the rubric allows."""
    results = reply.get("results") if isinstance(reply, dict) else None
    if not isinstance(results, list) or len(results) != n_tasks:
        return f"{n_tasks} tasks, results: {str(reply)[:200]}"
    allowed = {d.control: set(d.values) for d in rubric.dimensions}
    for entry in results:
        for item in entry["result"]:
            value = item["value"].get("choices", [item["value"].get(item["type"])])[0]
            if str(value) not in allowed.get(item["from_name"], set()):
                return f"{item['from_name']}={value!r} not in the rubric"
    return None


def predictor(b: Bench, port: int, rubric: Any, stats: PredictStats, stop: threading.Event, seed: int) -> None:
    rng = random.Random(seed)
    while not stop.is_set():
        picks = rng.sample(range(len(b.items)), b.args.predict_tasks)
        tasks = [{"id": 20_000 + k, "data": b.items[k].data} for k in picks]
        rec = Outcome()
        t0 = time.perf_counter()
        try:
            rec.status, reply = request(port, "POST", "/predict", {"project": f"{LOAD_PROJECT}.1700000000",
                                                                    "tasks": tasks}, timeout=300)
        except Exception as exc:
            rec.error = f"{type(exc).__name__}: {exc}"[:200]
            reply = None
            time.sleep(b.args.error_backoff)
        rec.latency = time.perf_counter() - t0
        rec.done = time.monotonic() - b.started
        stats.outcomes.append(rec)
        if rec.status == 200:
            stats.tasks += len(tasks)
            problem = check_prediction(rubric, reply, len(tasks))
            if problem:
                stats.invalid.append(problem)
        elif rec.status:
            rec.error = str(reply)[:200]


# ------------------------------------------------------------------------------------------------------ training
def toy_webhooks(n_tasks: int) -> list[dict[str, Any]]:
    out = []
    for t in range(n_tasks):
        for r, rater in enumerate(["ann", "bob"]):
            label = toy_label(t, 1 + t * 2 + r, rater)
            out.append({"action": "ANNOTATION_CREATED", "project": {"id": 1, "label_config": TOY_CONFIG},
                        "task": {"id": label.task_id, "data": label.task_data},
                        "annotation": {"id": label.annotation_id, "task": label.task_id, "result": label.result,
                                       "completed_by": {"email": f"{rater}@example.com"},
                                       "updated_at": f"2026-11-22T09:{t // 60:02d}:{t % 60:02d}.{r}Z"}})
    return out


def start_training(b: Bench) -> None:
    port = b.backend.port
    status, reply = request(port, "POST", "/setup", {"project": f"{TRAIN_PROJECT}.1700000000", "schema": TOY_CONFIG,
                                                      "hostname": "http://127.0.0.1:1", "access_token": "x"})
    assert status == 200, reply
    answers = []
    for event in toy_webhooks(b.args.train_tasks):
        status, reply = request(port, "POST", "/webhook", event, headers={"X-Webhook-Secret": WEBHOOK_SECRET})
        assert status == 200, reply
        answers.append(reply["training"])
    if "queued" not in answers:
        raise RuntimeError(f"no training job queued: {sorted(set(answers))}")
    deadline = time.monotonic() + b.args.train_timeout
    while time.monotonic() < deadline:
        state = training_state(b.store, b.redis.url, TRAIN_PROJECT)
        if state["run_status"] == "running" and (state.get("step") or 0) >= 1:
            b.note("training running", **state)
            return
        time.sleep(0.5)
    raise RuntimeError(f"training never reached step 1: {state}\n{b.backend.log_tail(40)}")


def recover_now(b: Bench) -> None:
    """--recovery fast: RQ's cleanup of abandoned jobs as if their heartbeat had lapsed (once: it would also take
    a healthy running job for abandoned)."""
    from redis import Redis
    from rq import Queue
    from rq.registry import StartedJobRegistry

    from slm_annotator.worker.policy import QUEUE_NAME

    conn = Redis.from_url(b.redis.url)
    StartedJobRegistry(queue=Queue(QUEUE_NAME, connection=conn)).cleanup(timestamp=time.time() + 300)
    b.note("abandoned jobs cleaned up now (--recovery fast)")


def wait_for_run(b: Bench, after_id: int, timeout: float) -> Any:
    """The first training run of project 1 newer than `after_id` that completes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = [r for r in b.store.runs(TRAIN_PROJECT) if r.id > after_id and r.status in DONE]
        if done:
            return done[0]
        time.sleep(1.0)
    raise RuntimeError(f"no training run of project 1 completed within {timeout:.0f} s: "
                       f"{[(r.id, r.status) for r in b.store.runs(TRAIN_PROJECT)]}")


def load_project_training(b: Bench) -> dict[str, Any]:
    """The load project's training request (met by the Redis outage, re-sent by the flusher) ran to the end."""
    deadline = time.monotonic() + b.args.train_timeout
    while time.monotonic() < deadline:
        runs = b.store.runs(LOAD_PROJECT)
        project = b.store.project(LOAD_PROJECT)
        if runs and runs[-1].status in DONE | {"failed"} and project and not project.training_requested:
            break
        time.sleep(1.0)
    runs = b.store.runs(LOAD_PROJECT)
    out = {"runs": [(r.id, r.status, r.trigger) for r in runs], "completed": any(r.status in DONE for r in runs)}
    b.note("load project training", **out)
    return out


def served_now(b: Bench) -> dict[str, Any]:
    """What the running backend serves project 1: /setup's version and /predict's."""
    port = b.backend.port
    _, setup = request(port, "POST", "/setup", {"project": f"{TRAIN_PROJECT}.1700000000"})
    status, pred = request(port, "POST", "/predict", {"project": f"{TRAIN_PROJECT}.1700000000",
                                                      "tasks": [{"id": 1, "data": {"text": "great " * 20}}]})
    return {"setup": setup.get("model_version"), "predict_status": status,
            "predict": pred.get("model_version") if isinstance(pred, dict) else str(pred)[:200]}


def promotion_crash(b: Bench) -> dict[str, Any]:
    """A worker dies inside the promotion transaction: the previous adapter stays served; the retry promotes."""
    before = served_now(b)
    last_run = max(r.id for r in b.store.runs(TRAIN_PROJECT))
    adapters_before = [(a.version, a.status) for a in b.store.adapters(TRAIN_PROJECT)]
    marker = b.tmp / "fault-worker.marker"
    with b.lock:
        b.supervised = False
        b.worker.signal_group(signal.SIGTERM)  # a warm shutdown: it is idle
        faulty = Worker({**b.worker_env(b.args.train_epochs), "FAULT_MARKER": str(marker)}, b.tmp / "worker.log",
                        argv=[sys.executable, "-m", "bench.fault_worker"], cwd=ROOT)
        faulty.start()
    status, reply = request(b.backend.port, "POST", "/webhook", {"action": "START_TRAINING", "project": {"id": 1}},
                            headers={"X-Webhook-Secret": WEBHOOK_SECRET})
    assert status == 200, reply
    assert faulty.proc is not None
    code = faulty.proc.wait(b.args.train_timeout)
    during = served_now(b)
    adapters_during = [(a.version, a.status) for a in b.store.adapters(TRAIN_PROJECT)]
    with b.lock:
        b.worker = b.new_worker(b.args.train_epochs)
        b.worker.start()
        b.supervised = True
    run = wait_for_run(b, last_run, b.args.train_timeout)
    after = served_now(b)
    return {
        "crashed": marker.exists(), "crash_marker": marker.read_text().strip() if marker.exists() else None,
        "fault_worker_exit": code, "served_before": before, "served_after_crash": during,
        "adapters_before": adapters_before, "adapters_after_crash": adapters_during,
        "retry_run": {"id": run.id, "status": run.status}, "served_after_retry": after,
        "ok": bool(marker.exists() and during["setup"] == before["setup"] == during["predict"]
                   and adapters_during == adapters_before and run.status == "promoted"
                   and after["setup"] == after["predict"] != before["setup"]),
    }


# ------------------------------------------------------------------------------------------------------ report
def scan_logs(paths: list[Path]) -> dict[str, Any]:
    text = "\n".join(p.read_text(errors="replace") for p in paths if p.exists())
    return {"lines": text.count("\n"), "tracebacks": text.count("Traceback (most recent call last)"),
            "secrets_found": [s for s in SECRETS if s in text],
            "worker_exits_on_redis": text.count("Redis connection timeout, quitting"),
            "redis_unavailable_warnings": text.count("redis unavailable")}


def summarize(b: Bench, events: list[Event], outcomes: list[Outcome], wall: float,
              preds: PredictStats) -> dict[str, Any]:
    acked = [r.latency for r in outcomes if r.status // 100 == 2]
    pred_ok = [r.latency for r in preds.outcomes if r.status == 200]
    by_status: dict[str, int] = {}
    for r in outcomes + preds.outcomes:
        key = str(r.status) if r.status else (r.error.split(":")[0] or "error")
        by_status[key] = by_status.get(key, 0) + 1
    return {
        "webhooks": {"sent": len(outcomes), "wall_s": round(wall, 1), "sent_per_s": round(len(outcomes) / wall, 1),
                     "acknowledged_per_s": round(len(acked) / wall, 1), "latency_acknowledged": lat_summary(acked),
                     "acknowledged_after_ls_timeout": sum(1 for x in acked if x > LS_TIMEOUT_S),
                     "training_answers": {k: sum(1 for r in outcomes if r.training == k)
                                          for k in sorted({r.training for r in outcomes if r.training})},
                     "events": {k: sum(1 for e in events if e.kind == k) for k in ("create", "dup", "update",
                                                                                 "delete")}},
        "predict": {"requests": len(preds.outcomes), "ok": len(pred_ok), "tasks": preds.tasks,
                    "status_503": sum(1 for r in preds.outcomes if r.status == 503),
                    "status_5xx": sum(1 for r in preds.outcomes if r.status >= 500),
                    "failed": sum(1 for r in preds.outcomes if r.status != 200),
                    "invalid": len(preds.invalid), "invalid_examples": preds.invalid[:5],
                    "latency_ok": lat_summary(pred_ok)},
        "status_counts": by_status,
    }


def report(res: dict[str, Any]) -> str:
    w, p, v, c = res["load"]["webhooks"], res["load"]["predict"], res["verify"], res["promotion_crash"]
    lat = w["latency_acknowledged"]
    faults = "; ".join(f"{e['event'].removeprefix('fault ').removesuffix(' done')} at event {e.get('at_event')}"
                       + (f" (down {e['down_s']} s)" if "down_s" in e else "")
                       for e in res["timeline"] if e["event"].endswith(" done"))
    lines = [
        "| webhooks sent | acknowledged/s | p50 / p99 ms | failed (transport / 5xx) | acknowledged labels | stored "
        "exactly once | lost | predictions ok / failed / invalid | faults | training | promotion crash |",
        "|" + "---|" * 11,
        f"| {w['sent']} | {w['acknowledged_per_s']} | {lat.get('p50_ms', 0):.1f} / {lat.get('p99_ms', 0):.1f} | "
        f"{v['failed_transport']} / {v['failed_5xx']} | {v['acknowledged_annotations']} | "
        f"{v['stored_as_acknowledged']} | {v['lost']} | {p['ok']} / {p['failed']} / {p['invalid']} | {faults} | "
        f"{res['training']['status']} (run {res['training']['run_id']}) | "
        f"{'previous adapter kept, retry promoted' if c.get('ok') else 'FAILED: ' + json.dumps(c)[:300]} |",
        "",
        f"- config: {json.dumps(res['config'])}",
        f"- failed but applied anyway (cut off by a kill after the commit): {v['failed_but_applied']}; refused "
        f"(4xx) {v['refused_4xx']}; duplicate rows {v['duplicate_rows']}; unexpected rows {len(v['unexpected_rows'])}",
        f"- logs: {json.dumps(res['logs'])}",
        f"- machine: {res['machine']['cpu_model']} x{res['machine']['cpu_cores']}, {res['machine']['date']}, load "
        f"average {res['loadavg'][0][0]:.1f} before the load, {res['loadavg'][1][0]:.1f} after (a shared machine)",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------ main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=3000, help="webhooks in the load stream")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--rate", type=float, default=100.0, help="webhooks per second (0: as fast as they go)")
    p.add_argument("--keepalive", action="store_true", help="keep-alive connections (Label Studio opens one per call)")
    p.add_argument("--mix", default="80,15,5", help="created,updated,deleted percentages")
    p.add_argument("--predict-clients", type=int, default=2)
    p.add_argument("--predict-tasks", type=int, default=4, help="tasks per /predict")
    p.add_argument("--faults", default="0.15:worker,0.35:backend,0.6:redis",
                   help="fraction:fault,... with faults worker, backend, redis ('' for none)")
    p.add_argument("--redis-down", type=float, default=5.0, help="seconds Redis stays down")
    p.add_argument("--error-backoff", type=float, default=1.0, help="a client's pause after a transport error")
    p.add_argument("--recovery", choices=["natural", "fast"], default="natural",
                   help="natural: RQ finds the killed job when its heartbeat lapses (~90 s); fast: clean up at once")
    p.add_argument("--retry-delays", default="10", help="TRAIN_RETRY_DELAYS (0: retried jobs skip the scheduler)")
    p.add_argument("--no-crash", dest="crash", action="store_false", help="skip the promotion-crash phase")
    p.add_argument("--base-model", default=str(TINY))
    p.add_argument("--quantization", default="none", choices=["nf4", "none"])
    p.add_argument("--train-tasks", type=int, default=30, help="toy tasks (2 labels each) for the training project")
    p.add_argument("--train-epochs", type=int, default=8, help="TRAIN_EPOCHS of every worker after the first")
    p.add_argument("--load-threshold", type=int, default=200,
                   help="train_threshold of the load project (0: never trains); its trigger meets the Redis outage")
    p.add_argument("--train-timeout", type=float, default=900.0)
    p.add_argument("--database-url", default=None, help="PostgreSQL URL (a fresh schema, dropped after)")
    p.add_argument("--workers", type=int, default=None, help="WORKERS (gunicorn processes); default the setting's")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--redis-server", default=shutil.which("redis-server") or "")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", action="store_true")
    p.add_argument("--out", default=None, help="default bench/results/reliability-<host>[-postgresql].json")
    args = p.parse_args(argv)
    args.plan = sorted((float(a), n) for a, n in (x.split(":") for x in args.faults.split(",") if x))
    if unknown := {n for _, n in args.plan} - set(FAULTS):
        p.error(f"unknown faults {unknown}")
    mix = [float(x) for x in args.mix.split(",")]
    args.mix_tuple = tuple(x / sum(mix) for x in mix)
    if Path(args.base_model).exists():
        args.base_model = str(Path(args.base_model).resolve())
    if not args.redis_server:
        from slm_annotator.worker.redis_conn import server_binary

        args.redis_server = server_binary()
    return args


def base_env(args: argparse.Namespace, redis_url: str, database_url: str) -> dict[str, str]:
    env = {"BASE_MODEL": args.base_model, "QUANTIZATION": args.quantization, "REDIS_URL": redis_url,
           "DATABASE_URL": database_url, "BASIC_AUTH_USER": USER, "BASIC_AUTH_PASS": PASSWORD,
           "WEBHOOK_SECRET": WEBHOOK_SECRET, "TRAIN_THRESHOLD": "40", "TRAIN_RETRIES": "3",
           "TRAIN_RETRY_DELAYS": args.retry_delays, "PROMOTION_TOLERANCE": "1.0", "HELDOUT_FRACTION": "0.25",
           "TRAIN_LR": "0.01", "LORA_R": "8", "TOKEN_DROPOUT_SHARE": "0", "MAX_PROMPT_TOKENS": "384",
           "PREDICT_BATCH_SIZE": "4"}
    if args.workers:
        env["WORKERS"] = str(args.workers)
    if args.threads:
        env["THREADS"] = str(args.threads)
    return env


def run(args: argparse.Namespace, tmp: Path) -> tuple[dict[str, Any], Bench]:
    from slm_annotator.model.rubric import parse_label_config

    model_dir = tmp / "model_dir"
    redis = RedisServer(tmp / "redis", free_port(), args.redis_server)
    redis.start()
    database_url, drop = (pg_schema_url(args.database_url, args.keep) if args.database_url
                          else (f"sqlite:///{model_dir / 'labels.sqlite3'}", None))
    backend = BackendProcess(model_dir, base_env(args, redis.url, database_url), startup_timeout=600,
                                serve_args=("--no-worker",), auth=(USER, PASSWORD))
    config, items = load_items()
    idle = Worker({}, tmp / "worker.log", argv=[], cwd=ROOT)  # replaced by new_worker once the backend is up
    b = Bench(args, tmp, {}, redis, backend, idle, Store(database_url), config, items)
    try:
        backend.start()
        b.env = backend.env()
        b.worker = b.new_worker(100_000)  # the first run outlasts the load: it is killed mid-training
        b.worker.start()
        threading.Thread(target=supervise, args=(b,), daemon=True).start()
        start_training(b)
        killed_run = max(r.id for r in b.store.runs(TRAIN_PROJECT))
        res = load_with_faults(b, parse_label_config(config))
        if args.recovery == "fast" and "worker" in {n for _, n in args.plan}:
            recover_now(b)
        run_ = wait_for_run(b, killed_run - 1, args.train_timeout)
        killed_at = next((e["t"] for e in b.timeline if e["event"] == "fault worker done"), None)
        res["training"] = {"run_id": run_.id, "status": run_.status,
                           "runs": [(r.id, r.status) for r in b.store.runs(TRAIN_PROJECT)],
                           "completed_s_after_worker_kill": None if killed_at is None else
                           round(time.monotonic() - b.started - killed_at, 1)}
        b.note("training completed", **res["training"])
        res["load_project_training"] = load_project_training(b) if args.load_threshold else None
        res["promotion_crash"] = promotion_crash(b) if args.crash else {"ok": None, "skipped": True}
        res["health_end"] = request(backend.port, "GET", "/health")[1]
        return res, b
    except BaseException:
        log.error("backend log tail:\n%s", backend.log_tail(60))
        raise
    finally:
        b.stopping = True
        with b.lock:
            b.worker.signal_group(signal.SIGTERM, timeout=30)
            backend.stop(timeout=30)
        redis.stop()
        b.store.engine.dispose()
        if drop is not None:
            with contextlib.suppress(Exception):
                drop()


def load_with_faults(b: Bench, rubric: Any) -> dict[str, Any]:
    from bench.harness import run_load

    args, port = b.args, b.backend.port
    # Crossed mid-load: its training request meets the Redis outage. A short recipe: that it runs is the point.
    extra = {"train_threshold": args.load_threshold or 10**9,
             "training": {"epochs": 1, "batch_size": 32, "lora_layers": 1, "max_tokens": 256}}
    status, reply = request(port, "POST", "/setup", {"project": f"{LOAD_PROJECT}.1700000000", "schema": b.config,
                                                      "extra_params": extra})
    assert status == 200, reply
    start = _dt.datetime(2026, 11, 22, 10, 0, 0)
    events = build_load(args.requests, b.items, b.config, int(LOAD_PROJECT), args.mix_tuple, 0.1, args.seed, start,
                        100_000, 20_000, 2 * args.clients)
    cursor, load_done, stop_predict = [0], threading.Event(), threading.Event()
    preds = PredictStats()
    predictors = [threading.Thread(target=predictor, args=(b, port, rubric, preds, stop_predict, args.seed + k),
                                   daemon=True) for k in range(args.predict_clients)]
    faults = threading.Thread(target=run_faults, args=(b, args.plan, cursor, len(events), load_done), daemon=True)
    for t in predictors:
        t.start()
    b.note("load begins", webhooks=len(events), rate=args.rate, clients=args.clients)
    faults.start()
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    outcomes, _ = run_load(port, events, args.clients, args.keepalive, 30.0, rate=args.rate,
                           error_backoff=args.error_backoff, headers={"X-Webhook-Secret": WEBHOOK_SECRET},
                           cursor=cursor)
    wall = time.perf_counter() - t0
    load_done.set()
    faults.join()
    stop_predict.set()
    for t in predictors:
        t.join(600)
    b.note("load ends", wall_s=round(wall, 1))
    return {"load": summarize(b, events, outcomes, wall, preds), "loadavg": [load_before, os.getloadavg()],
            "verify": verify_acknowledged(b.store, LOAD_PROJECT, events, outcomes)}


def verdict(res: dict[str, Any]) -> dict[str, bool]:
    v = res["verify"]
    return {
        "acknowledged == stored exactly once": v["lost"] == 0 and v["duplicate_rows"] == 0
        and v["acknowledged_annotations"] == v["stored_as_acknowledged"],
        "nothing refused or unknown was invented": not v["unexpected_rows"] and not v["refused_but_stored"],
        "no 5xx on webhooks, no 500 on predictions": v["failed_5xx"] == 0
        and res["load"]["status_counts"].get("500", 0) == 0,
        "predictions valid": res["load"]["predict"]["invalid"] == 0 and res["load"]["predict"]["ok"] > 0,
        "a training run completed after the faults": res["training"]["status"] in DONE,
        "the training request met by the Redis outage ran later": (res["load_project_training"] or {}).get(
            "completed", True),
        "promotion crash kept the previous adapter": res["promotion_crash"].get("ok") is not False,
        "no secret in any log": not res["logs"]["secrets_found"],
        "no process exited on its own": not [e for e in res["timeline"] if "exited on its own" in e["event"]],
    }


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="bench-reliability-"))
    try:
        res, b = run(args, tmp)
        res["logs"] = scan_logs([*tmp.glob("backend-*.log"), tmp / "worker.log"])
    finally:
        if args.keep:
            log.info("kept %s", tmp)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    res.update(timeline=b.timeline, machine=machine_info(), config={
        k: v for k, v in vars(args).items() if k not in {"plan", "mix_tuple"}})
    res["checks"] = verdict(res)
    res["table"] = report(res)
    store = "-postgresql" if args.database_url else ""
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"reliability-{socket.gethostname()}{store}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2, default=str))
    out.with_suffix(".md").write_text(res["table"] + "\n\n" + "\n".join(
        f"- {k}: {'pass' if ok else 'FAIL'}" for k, ok in res["checks"].items()) + "\n")
    print(res["table"])
    print(json.dumps(res["checks"], indent=2))
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0 if all(res["checks"].values()) else 1


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # cleanup in `finally` on kill too
    raise SystemExit(main())
