"""Bulk prediction throughput (issue 15): tasks/s with 1 and 2 workers, and promotion -> all unlabelled refreshed.

Real parts: SQLite store, an embedded redis-server, `slm-annotator worker --queue bulk` processes, the served
version's real scorer; Label Studio's API is the stub in slm_annotator.testing (it answers at once, so
what is timed is the backend's side: scoring, claims, the cache and the HTTP writes).

Scenarios (USR texts, repeated to N tasks; USR's six-dimension rubric):
- refresh: 60 USR items labelled, a head trained and promoted inline; the promotion queues the refresh of every
  unlabelled task; timed from the promotion to the run's "done".
- slm: the untrained SmolLM2-135M base with no pre-fill bar (every task scored by the SLM); `missing` mode.

    SLM_SHARED_DATA=../shared/data python -m bench.bench_bulk --tasks 2000 --slm-tasks 200 --workers 1 2
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from slm_annotator.model.experiment import load_devset
from slm_annotator.model.results import result_item
from slm_annotator.model.rubric import parse_label_config
from slm_annotator.settings import Settings, load_settings
from slm_annotator.store import LabelIn, Store
from slm_annotator.testing import STUB_TOKEN as TOKEN
from slm_annotator.testing import StubLabelStudio

PROJECT = "7"
RESULTS = Path(__file__).parent / "results" / "bulk"


def usr_tasks(n: int) -> tuple[Any, list[dict[str, Any]]]:
    """USR's dev set and n tasks with its texts (repeated, each made unique so no cache answers for another)."""
    ds = load_devset("usr")
    tasks = []
    for i in range(n):
        item = ds.items[i % len(ds.items)]
        data = dict(item.data)
        data["response"] = f"{data.get('response', '')} ({i})"
        tasks.append({"id": 1 + i, "data": data})
    return ds, tasks


def label(store: Store, ds: Any, tasks: list[dict[str, Any]], n: int) -> None:
    """Every rater's label of the first n items, as the webhook would have stored them."""
    rubric = parse_label_config(ds.label_config)
    dims = {d.control: d for d in rubric.dimensions}
    ann = 0
    for task, item in zip(tasks[:n], ds.items[:n], strict=True):
        for rater, values in item.ratings.items():
            ann += 1
            result = [r for k, v in values.items() if k in dims and (r := result_item(dims[k], v))]
            store.upsert_label(PROJECT, LabelIn(ann, task["id"], rater, result, {k: str(v) for k, v in values.items()},
                                                task["data"]))


def start_workers(settings: Settings, ls: StubLabelStudio, n: int, logs: Path, env: dict[str, str]) -> list[Any]:
    base = {**os.environ, "MODEL_DIR": str(settings.model_dir), "DATABASE_URL": settings.database_url,
            "REDIS_URL": settings.redis_url or "", "LABEL_STUDIO_URL": ls.url, "LABEL_STUDIO_API_KEY": TOKEN,
            "HEAD_EVERY": "0", **env}
    gpus = gpu_count()
    procs = []
    for i in range(n):
        own = {"CUDA_VISIBLE_DEVICES": str(i % gpus)} if gpus > 1 else {}  # a GPU per worker where there are several
        with open(logs / f"worker{i}.log", "w") as log:
            procs.append(subprocess.Popen([sys.executable, "-m", "slm_annotator.cli", "worker", "--queue", "bulk",
                                           "--name", f"bench-bulk-{os.getpid()}-{i}"], env={**base, **own},
                                          stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
    return procs


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def wait_workers(redis_url: str, n: int, timeout: float = 300) -> None:
    from redis import Redis
    from rq import Queue, Worker

    from slm_annotator.worker.policy import BULK_QUEUE

    queue = Queue(BULK_QUEUE, connection=Redis.from_url(redis_url))
    until = time.monotonic() + timeout
    while len(Worker.all(queue=queue)) < n:
        if time.monotonic() > until:
            raise RuntimeError(f"{n} bulk workers did not start within {timeout:.0f} s")
        time.sleep(0.5)


def wait_done(store: Store, version: str, timeout: float) -> Any:
    until = time.monotonic() + timeout
    while time.monotonic() < until:
        runs = [r for r in store.bulk_runs(PROJECT) if r.model_version == version and r.mode != "request"]
        if runs and runs[0].status == "done":
            return runs[0]
        if runs and runs[0].status == "failed":
            raise RuntimeError(f"bulk run failed: {runs[0].last_error}")
        time.sleep(0.2)
    raise RuntimeError(f"bulk run of {version} not done within {timeout:.0f} s")


def warm_up(s: Settings, redis_url: str, version: str, tasks: list[dict[str, Any]], workers: int) -> None:
    """A bulk request of one chunk per worker (distinct ids): each worker loads the base before the timed run."""
    from redis import Redis

    from slm_annotator.worker.policy import enqueue_bulk

    warm = [{"id": 10**9 + i, "data": tasks[i]["data"]} for i in range(workers * s.bulk_chunk)]
    store = Store(s.database_url)
    enqueue_bulk(Redis.from_url(redis_url), s, PROJECT, version, "request", warm)
    until = time.monotonic() + 1200
    while not any(r.mode == "request" and r.status == "done" for r in store.bulk_runs(PROJECT)):
        if time.monotonic() > until:
            raise RuntimeError("warm-up run not done in 20 min")
        time.sleep(0.5)


def stop(procs: list[Any]) -> None:
    import signal

    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGTERM)
            p.wait(30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(p.pid, signal.SIGKILL)


def fresh(root: Path, redis_url: str, env: dict[str, str]) -> Settings:
    """Settings on a fresh store under `root`, the shared Redis, the env the workers get too."""
    os.environ.update(env)
    s = load_settings()
    return replace(s, model_dir=root, database_url=f"sqlite:///{root}/store.db", redis_url=redis_url)


def one_run(scenario: str, workers: int, n: int, chunk: int, redis_url: str, timeout: float) -> dict[str, Any]:
    from slm_annotator.backend.services import build_services
    from slm_annotator.worker.head_run import run_head
    from slm_annotator.worker.policy import enqueue_bulk

    with tempfile.TemporaryDirectory(prefix=f"bench-bulk-{scenario}-") as tmp:
        root = Path(tmp)
        env = {"MODEL_DIR": str(root), "DATABASE_URL": f"sqlite:///{root}/store.db", "BULK_CHUNK": str(chunk),
               "PREFILL_MIN_ALPHA": "0.2" if scenario == "refresh" else "none"}
        s = fresh(root, redis_url, env)
        ds, tasks = usr_tasks(n)
        labelled = 60 if scenario == "refresh" else 0
        ls = StubLabelStudio(PROJECT, [{**t, "annotations": [{"id": t["id"], "result": []}]} if i < labelled else t
                                       for i, t in enumerate(tasks)])
        s = replace(s, label_studio_url=ls.url, label_studio_api_key=TOKEN)
        store = Store(s.database_url)
        store.upsert_project(PROJECT, label_config=ds.label_config)
        procs = start_workers(s, ls, workers, root, env)
        try:
            wait_workers(redis_url, workers)
            started = time.monotonic()
            if scenario == "refresh":
                label(store, ds, tasks, labelled)
                run = store.start_run(PROJECT, "bench", "head")
                outcome = run_head(s, store, PROJECT, run.id)
                assert outcome.status == "promoted", outcome.detail
                version, promoted = outcome.model_version, time.monotonic()
            else:
                from redis import Redis

                svc = build_services(s)
                version = svc.served_for(PROJECT).model_version
                svc.close()
                warm_up(s, redis_url, version, tasks, workers)  # every worker loads the model first: not timed
                enqueue_bulk(Redis.from_url(redis_url), s, PROJECT, version, "missing")
                promoted = time.monotonic()
            done = wait_done(store, version, timeout)
            seconds = time.monotonic() - promoted
            per_task = ls.per_task(version)
            assert sum(per_task.values()) == n - labelled and max(per_task.values()) == 1, "not one prediction per task"
            return {"scenario": scenario, "workers": workers, "tasks": done.total, "seconds": round(seconds, 2),
                    "tasks_per_s": round(done.total / seconds, 2), "head_seconds": round(promoted - started, 2),
                    "workers_that_took_chunks": done.workers, "version": version}
        finally:
            stop(procs)
            ls.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=int, default=2000, help="tasks in the refresh scenario")
    ap.add_argument("--slm-tasks", type=int, default=200, help="tasks in the SLM scenario (0: skip it)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--label", default="cpu-2core")
    ap.add_argument("--slm-chunk", type=int, default=16, help="BULK_CHUNK in the SLM scenario")
    args = ap.parse_args()
    from slm_annotator.worker.redis_conn import ensure_embedded, stop_embedded

    redis_dir = Path(tempfile.mkdtemp(prefix="bench-bulk-redis-"))
    redis_url = ensure_embedded(redis_dir)
    rows = []
    try:
        for workers in args.workers:
            rows.append(one_run("refresh", workers, args.tasks, args.chunk, redis_url, args.timeout))
            print(json.dumps(rows[-1]), flush=True)
            if args.slm_tasks:
                rows.append(one_run("slm", workers, args.slm_tasks, args.slm_chunk, redis_url, args.timeout))
                print(json.dumps(rows[-1]), flush=True)
    finally:
        stop_embedded(redis_dir)
    write(rows, args.label)
    return 0


def machine() -> dict[str, Any]:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "gpu": gpu, "torch": torch.__version__,
            "python": platform.python_version(), "date": _dt.date.today().isoformat()}


def write(rows: list[dict[str, Any]], label: str) -> None:
    out = RESULTS / label
    out.mkdir(parents=True, exist_ok=True)
    info = machine()
    (out / "results.json").write_text(json.dumps({"machine": info, "runs": rows}, indent=2) + "\n")
    lines = [f"Machine: {info['cpu']} ({info['cores']} cores), GPU {info['gpu']}, torch {info['torch']}, "
             f"{info['date']}", "", "| scenario | workers | tasks | seconds | tasks/s | workers that took chunks |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['scenario']} | {r['workers']} | {r['tasks']} | {r['seconds']} | {r['tasks_per_s']} | "
              f"{r['workers_that_took_chunks']} |" for r in rows]
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
