"""Webhook ingestion benchmark: throughput, p50/p95/p99 latency and lost labels while a training job runs.

Requirement: >= 300 webhooks/s, p99 < 100 ms, 0 lost, with 8 concurrent clients on the 2-core VM while the
worker trains. What a user of the one-command quickstart gets is what is measured:

  1. `slm-annotator serve` as a subprocess (gunicorn, WORKERS/THREADS from settings unless --workers/--threads),
     on a free loopback port, MODEL_DIR in a temp dir, the default SQLite store (or --database-url, then a
     fresh schema that is dropped afterwards), the embedded Redis (no REDIS_URL) and the RQ worker that
     `serve` starts next to gunicorn. The real default base model (smollm2, NF4) unless --base-model.
  2. Project 1 (training): POST /setup with the USR-PersonaChat rubric (6 dimensions), then real ratings as
     ANNOTATION_CREATED webhooks until TRAIN_THRESHOLD is crossed. TRAIN_EPOCHS is large (--train-epochs), so
     the job trains for the whole measurement. The bench waits until the project's training_runs row is
     'running', the RQ job is 'started' and (--min-step) the first optimizer step has finished.
  3. Project 2 (load): POST /setup, a short warm-up on project 3, then --clients threads, each with its own
     keep-alive http.client connection, send --requests webhooks shaped like Label Studio 1.23.2's
     (ANNOTATION_CREATED with duplicates, ANNOTATION_UPDATED, ANNOTATIONS_DELETED; default mix 80/15/5).
     Per request: wall-clock latency from send to the last byte of the reply.
  4. "0 lost": the store is opened with slm_annotator.store.Store; every acknowledged (2xx) annotation must be
     there with its latest result, values and updated_at, every acknowledged delete a tombstone. Requests that
     failed (non-2xx or transport error) are counted separately: Label Studio never retries a webhook.

CPU seconds of every process (gunicorn master and workers, RQ worker, its training work horse, redis-server,
a local PostgreSQL, this client) and of the whole machine are sampled around the load; other load on a shared
machine shows up as "other" and in the load average recorded with the results, and fsync latency where the
SQLite file lives is probed before and after (it varies 0.1-4 ms on the VM's virtual disk).

Also useful:
  --update-lag 0 --mix 10,85,5   concurrent clients race on the same annotations (ordering under concurrency)
  --no-keepalive                 a connection per webhook, as Label Studio's requests.post does
  --nice-worker 19               experiment, not the product: renice the trainer to see what priority buys

Examples:
  .venv/bin/python -m bench.bench_webhooks                                   # the requirement, SQLite
  .venv/bin/python -m bench.bench_webhooks --database-url postgresql://postgres@127.0.0.1:5432/test
  .venv/bin/python -m bench.bench_webhooks --base-model .cache/tiny-llama-v1 --quantization none \
      --train-epochs 100000 --min-step 0 --requests 400 --out /tmp/smoke.json   # smoke run, ~1 min
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import logging
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.harness import (
    Client,
    build_load,
    get_json,
    get_text,
    lat_summary,
    machine_info,
    pct,
    per_second,
    pg_schema_url,
    post_json,
    run_load,
    training_state,
    training_webhooks,
    verify,
    wait_training,
)
from slm_annotator.model.devdata import load_usr_personachat
from slm_annotator.store import Store
from slm_annotator.testing import BackendProcess

ROOT = Path(__file__).resolve().parents[1]

log = logging.getLogger("bench_webhooks")

TRAIN_PROJECT, LOAD_PROJECT, WARM_PROJECT = 1, 2, 3
LS_TIMEOUT_S = 1.0  # Label Studio's webhook timeout (WEBHOOK_TIMEOUT): slower replies are errors in its log
TARGETS = {"throughput_per_s": 300.0, "p99_ms": 100.0, "lost": 0}
SETTINGS_DEFAULTS = {"WORKERS": 1, "THREADS": 4}  # slm_annotator/settings.py


# ------------------------------------------------------------------------------------------------------
# Label Studio 1.23.2-shaped payloads


# ------------------------------------------------------------------------------------------------------
# HTTP


# ------------------------------------------------------------------------------------------------------
# verification


# ------------------------------------------------------------------------------------------------------
# CPU accounting


TICK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> tuple[int, int, float] | None:
    """(ppid, session id, CPU seconds) of a process."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    return int(fields[1]), int(fields[3]), (int(fields[11]) + int(fields[12])) / TICK


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def backend_processes(serve_pid: int, redis_pid: int | None) -> dict[int, str]:
    """Role of every process of the backend: its session (serve runs in its own) plus the daemonized redis."""
    procs = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            st = _stat(int(entry.name))
            if st and st[1] == serve_pid:
                procs[int(entry.name)] = st[0]
    roles = {}
    rq = {p for p in procs if procs[p] == serve_pid and " worker" in _cmdline(p)}
    for pid, ppid in procs.items():
        if pid == serve_pid:
            roles[pid] = "gunicorn master (serve)"
        elif pid in rq:
            roles[pid] = "rq worker"
        elif ppid in rq:
            roles[pid] = "rq work horse (training)"
        elif ppid == serve_pid:
            roles[pid] = "gunicorn worker"
        else:
            roles[pid] = "other (backend session)"
    if redis_pid:
        roles[redis_pid] = "redis-server (embedded)"
    for entry in Path("/proc").iterdir():  # a local PostgreSQL server works for the backend too
        if entry.name.isdigit() and _cmdline(int(entry.name)).startswith("postgres"):
            roles[int(entry.name)] = "postgresql server (local)"
    return roles


def machine_busy() -> tuple[float, float]:
    """(busy CPU seconds, total CPU seconds) over all cores since boot."""
    vals = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = vals[3] + vals[4]
    return (sum(vals[:8]) - idle) / TICK, sum(vals[:8]) / TICK


def cpu_snapshot(roles: dict[int, str]) -> dict[str, Any]:
    per = {}
    for pid in roles:
        st = _stat(pid)
        per[pid] = st[2] if st else None
    t = os.times()
    busy, total = machine_busy()
    return {"per_pid": per, "self": t.user + t.system, "busy": busy, "total": total, "wall": time.perf_counter()}


def cpu_shares(roles: dict[int, str], a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Cores used per role between two snapshots (1.0 = one core busy all the time)."""
    wall = b["wall"] - a["wall"]
    by_role: dict[str, float] = {}
    for pid, role in roles.items():
        x, y = a["per_pid"].get(pid), b["per_pid"].get(pid)
        if x is not None and y is not None:
            by_role[role] = by_role.get(role, 0.0) + (y - x) / wall
    by_role["bench clients (this process)"] = (b["self"] - a["self"]) / wall
    machine = (b["busy"] - a["busy"]) / wall
    by_role["other processes"] = max(0.0, machine - sum(by_role.values()))
    return {"wall_s": wall, "machine_cores_busy": machine, "cores": os.cpu_count(),
            "by_role": {k: round(v, 3) for k, v in sorted(by_role.items(), key=lambda kv: -kv[1])}}


# ------------------------------------------------------------------------------------------------------
# training state


# ------------------------------------------------------------------------------------------------------
# statistics and report


def server_histogram(metrics_text: str, endpoint: str = "/webhook") -> dict[str, Any]:
    """slm_request_seconds for one endpoint from /metrics: count, mean and the share under each bucket."""
    buckets: dict[float, float] = {}
    total = count = 0.0
    pat = re.compile(r'^slm_request_seconds_(bucket|sum|count)\{([^}]*)\}\s+([0-9.eE+-]+)$')
    for line in metrics_text.splitlines():
        m = pat.match(line)
        if not m or f'endpoint="{endpoint}"' not in m.group(2):
            continue
        if m.group(1) == "bucket":
            le = re.search(r'le="([^"]+)"', m.group(2))
            if le:
                buckets[float(le.group(1))] = buckets.get(float(le.group(1)), 0.0) + float(m.group(3))
        elif m.group(1) == "sum":
            total += float(m.group(3))
        else:
            count += float(m.group(3))
    return {"count": count, "mean_ms": 1000 * total / count if count else None,
            "cumulative": {str(k): v for k, v in sorted(buckets.items())}}


def diff_hist(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    count = b["count"] - a["count"]
    mean_sum = (b["mean_ms"] or 0) * b["count"] - (a["mean_ms"] or 0) * a["count"]
    cum = {k: v - a["cumulative"].get(k, 0.0) for k, v in b["cumulative"].items()}
    p99_bucket = next((k for k, v in cum.items() if count and v >= 0.99 * count), None)
    return {"count": count, "mean_ms": mean_sum / count if count else None,
            "p99_upper_bound_ms": float(p99_bucket) * 1000 if p99_bucket and p99_bucket != "inf" else None,
            "cumulative": cum}


def fsync_probe(folder: Path, n: int = 100) -> dict[str, float]:
    """4 KiB write + fsync latency where the SQLite store lives (synchronous=FULL pays one per commit)."""
    path = folder / ".fsync-probe"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    times = []
    try:
        for _ in range(n):
            os.write(fd, b"x" * 4096)
            t = time.perf_counter()
            os.fsync(fd)
            times.append((time.perf_counter() - t) * 1000)
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)
    times.sort()
    return {"p50_ms": round(pct(times, 50), 3), "p99_ms": round(pct(times, 99), 3)}


def fmt(x: Any, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def report(res: dict[str, Any]) -> str:
    L, V, T = res["latency_all"], res["verify"], res["targets"]
    tr0, tr1 = res["training_before"], res["training_after"]
    ok = {k: "pass" if v["pass"] else "MISS" for k, v in T.items()}
    head = ("| store | gunicorn | clients | conn | requests | webhooks/s | p50 ms | p95 ms | p99 ms | max ms | errors "
            "| lost | > 1 s | training during load | load avg (1 min) |")
    row = "| " + " | ".join([
        res["config"]["store"], f"{res['config']['workers']}x{res['config']['threads']} gthread",
        str(res["config"]["clients"]), "keep-alive" if res["config"]["keepalive"] else "new per request",
        str(res["requests"]), f"{res['throughput_per_s']:.0f} ({ok['throughput_per_s']})",
        fmt(L["p50_ms"]), fmt(L["p95_ms"]), f"{L['p99_ms']:.1f} ({ok['p99_ms']})", fmt(L["max_ms"], ".0f"),
        str(res["errors"]), f"{V['lost']} ({ok['lost']})", str(res["over_ls_timeout"]),
        f"{tr0['run_status']}/{tr0.get('job_status')}, step {tr0.get('step')} -> {tr1.get('step')} "
        f"of {tr1.get('total_steps')}, still {tr1['run_status']}",
        f"{res['loadavg_start'][0]:.1f} -> {res['loadavg_end'][0]:.1f}",
    ]) + " |"
    lines = [head, "|" + "|".join(["---"] * 15) + "|", row, ""]
    if res["config"].get("nice_worker") is not None:
        nice = res["config"]["nice_worker"]
        lines.append(f"EXPERIMENT: the bench reniced the RQ worker and training horse to {nice} (serve does not).\n")
    lines.append(
        f"Targets: >= {TARGETS['throughput_per_s']:.0f} webhooks/s, p99 < {TARGETS['p99_ms']:.0f} ms, "
        f"{TARGETS['lost']} lost (acknowledged but not stored, or failed: Label Studio never retries). "
        f"Latency: client wall-clock, send to last byte, {res['config']['clients']} concurrent clients.")
    lines.append("")
    by = res["latency_by_kind"]
    lines.append("- by event: " + "; ".join(
        f"{k} n={v['n']} p50 {v['p50_ms']:.1f} / p99 {v['p99_ms']:.1f} ms" for k, v in by.items() if v.get("n")))
    lines.append(f"- replies: {res['replies']}; training trigger answers: {res['training_answers']}")
    srv = res["server_side"]
    lines.append(
        f"- server-side (/metrics, handler only): mean {fmt(srv['mean_ms'])} ms, p99 <= "
        f"{fmt(srv['p99_upper_bound_ms'], '.0f')} ms (bucket bound) over {srv['count']:.0f} requests")
    lines.append(
        f"- store check: {V['acknowledged_annotations']} acknowledged annotations ({V['expected_live']} live, "
        f"{V['expected_deleted']} deleted) vs {V['stored_rows']} rows ({V['stored_live']} live, "
        f"{V['stored_deleted']} deleted); lost {V['lost']}, unexpected rows {len(V['unexpected_rows'])}; "
        f"{V['same_annotation_in_flight_pairs']} pairs of events of one annotation were in flight at once")
    cpu = res["cpu"]
    lines.append(
        f"- CPU during the load ({cpu['wall_s']:.1f} s, {cpu['cores']} cores, machine {cpu['machine_cores_busy']:.2f} "
        "cores busy): " + ", ".join(f"{k} {v:.2f}" for k, v in cpu["by_role"].items()))
    worst = max(res["per_second"], key=lambda r: r["p99_ms"]) if res["per_second"] else None
    if worst:
        lines.append(f"- worst second: #{worst['second']} ({worst['done']} done, p99 {worst['p99_ms']:.0f} ms, "
                     f"max {worst['max_ms']:.0f} ms)")
    t = res["training_setup"]
    lines.append(
        f"- training job: {t['annotations']} annotations on project {TRAIN_PROJECT} -> run "
        f"'{tr0['run_status']}', RQ job '{tr0.get('job_status')}' after {tr0.get('waited_s')} s; base model "
        f"{res['config']['base_model']} {res['config']['quantization']}, TRAIN_EPOCHS={res['config']['train_epochs']}")
    fs = res["fsync_4k"]
    lines.append(
        f"- disk: fsync of 4 KiB under MODEL_DIR p50 {fs['before']['p50_ms']:.2f} / p99 "
        f"{fs['before']['p99_ms']:.2f} ms before the load, {fs['after']['p50_ms']:.2f} / "
        f"{fs['after']['p99_ms']:.2f} ms after (SQLite synchronous=FULL pays one per write transaction)")
    m = res["machine"]
    lines.append(
        f"- {m['cpu_model']} x{m['cpu_cores']}, {m['mem_gb']} GB; Python {m['python']}, torch {m['torch']}, "
        f"gunicorn {m['gunicorn']}, Flask {m['flask']}, SQLAlchemy {m['sqlalchemy']}, SQLite {m['sqlite']}, "
        f"rq {m['rq']}; {m['date']}; load avg {' '.join(f'{x:.2f}' for x in res['loadavg_start'])} before, "
        f"{' '.join(f'{x:.2f}' for x in res['loadavg_end'])} after")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=4000, help="webhooks in the measured load")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients, one connection each")
    p.add_argument("--mix", default="80,15,5", help="created,updated,deleted percentages")
    p.add_argument("--dup-fraction", type=float, default=0.1,
                   help="share of the 'created' events that resend an earlier ANNOTATION_CREATED verbatim")
    p.add_argument("--update-lag", type=int, default=None,
                   help="updates/deletes only touch annotations created this many events earlier (default 2x clients; "
                        "0 lets concurrent clients race on one annotation)")
    p.add_argument("--no-keepalive", dest="keepalive", action="store_false",
                   help="a new connection per request (what Label Studio's requests.post does)")
    p.add_argument("--warmup", type=int, default=80, help="unmeasured webhooks on another project first")
    p.add_argument("--database-url", default=None,
                   help="PostgreSQL URL (a fresh schema is created in it and dropped after); default SQLite")
    p.add_argument("--workers", type=int, default=None, help="WORKERS for serve (default: the settings default)")
    p.add_argument("--threads", type=int, default=None, help="THREADS for serve (default: the settings default)")
    p.add_argument("--base-model", default="smollm2", help="BASE_MODEL for the training job")
    p.add_argument("--quantization", default="nf4", choices=["nf4", "none"])
    p.add_argument("--train-epochs", type=int, default=200, help="large: the job must outlast the measurement")
    p.add_argument("--train-annotations", type=int, default=60, help="training-project labels (> TRAIN_THRESHOLD)")
    p.add_argument("--min-step", type=int, default=1,
                   help="start the load once the job finished this many optimizer steps (0: once it runs)")
    p.add_argument("--train-timeout", type=float, default=1500.0, help="seconds to wait for the training job")
    p.add_argument("--request-timeout", type=float, default=30.0)
    p.add_argument("--nice-worker", type=int, default=None,
                   help="experiment, not the product: renice the RQ worker and its training horse (all threads) "
                        "to this niceness before the load, to see what a lower-priority trainer would give")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", action="store_true", help="keep the temp MODEL_DIR (and PostgreSQL schema)")
    p.add_argument("--out", default=None, help="default bench/results/webhooks-<host>[-postgresql].json")
    args = p.parse_args(argv)
    mix = [float(x) for x in args.mix.split(",")]
    if len(mix) != 3 or any(x < 0 for x in mix) or sum(mix) <= 0:
        p.error("--mix needs three non-negative percentages")
    args.mix_tuple = tuple(x / sum(mix) for x in mix)
    if args.update_lag is None:
        args.update_lag = 2 * args.clients
    if Path(args.base_model).exists():  # the server runs in the temp dir: a relative path would miss
        args.base_model = str(Path(args.base_model).resolve())
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # cleanup in `finally` on kill too
    dev = load_usr_personachat()
    config = dev.label_config
    items = dev.items

    tmp = Path(tempfile.mkdtemp(prefix="bench-webhooks-"))
    model_dir = tmp / "model_dir"
    drop_schema = None
    backend = None
    store_name = "postgresql" if args.database_url else "sqlite"
    try:
        env = {"BASE_MODEL": args.base_model, "QUANTIZATION": args.quantization,
               "TRAIN_EPOCHS": str(args.train_epochs)}
        workers = args.workers or SETTINGS_DEFAULTS["WORKERS"]
        threads = args.threads or SETTINGS_DEFAULTS["THREADS"]
        env["WORKERS"], env["THREADS"] = str(workers), str(threads)
        if args.database_url:
            database_url, drop_schema = pg_schema_url(args.database_url, args.keep)
            env["DATABASE_URL"] = database_url
        else:
            database_url = f"sqlite:///{model_dir / 'labels.sqlite3'}"
        backend = BackendProcess(model_dir, env, startup_timeout=600)
        t0 = time.monotonic()
        backend.start()
        port = backend.port
        log.info("backend up on %s in %.1f s (log %s)", backend.url, time.monotonic() - t0, backend.log_path)
        from slm_annotator.worker.redis_conn import embedded_url

        redis_url = embedded_url(model_dir)
        store = Store(database_url, run_migrations=False)

        # ---- 1. the training job
        now = _dt.datetime.now(_dt.UTC).replace(tzinfo=None)
        post_json(port, "/setup", {"project": f"{TRAIN_PROJECT}.1700000000", "schema": config,
                                   "hostname": "http://127.0.0.1:1", "access_token": "bench", "extra_params": ""})
        train_bodies = training_webhooks(items, config, TRAIN_PROJECT, args.train_annotations,
                                         now - _dt.timedelta(hours=2), args.seed)
        answers = []
        for body in train_bodies:
            status, data = Client(port, keepalive=False).post("/webhook", body)
            if status != 200:
                raise RuntimeError(f"training webhook -> {status}: {data[:300]!r}")
            answers.append(json.loads(data)["training"])
        if "queued" not in answers:
            raise RuntimeError(f"no training job queued by {len(answers)} labels: {sorted(set(answers))}")
        log.info("training queued after label %d of %d", answers.index("queued") + 1, len(answers))
        training_before = wait_training(store, redis_url, str(TRAIN_PROJECT), args.min_step, args.train_timeout,
                                        backend)
        log.info("training running: %s", training_before)
        deadline = time.monotonic() + 600
        health = get_json(port, "/health")
        while not health.get("model_loaded") and time.monotonic() < deadline:
            time.sleep(1.0)  # the boot-time model load in gunicorn must not be measured as webhook cost
            health = get_json(port, "/health")

        # ---- 2. the load project, warm-up
        for pid in (LOAD_PROJECT, WARM_PROJECT):
            post_json(port, "/setup", {"project": f"{pid}.1700000000", "schema": config,
                                       "hostname": "http://127.0.0.1:1", "access_token": "bench", "extra_params": ""})
        start = now - _dt.timedelta(minutes=30)
        if args.warmup:
            warm = build_load(args.warmup, items, config, WARM_PROJECT, args.mix_tuple, args.dup_fraction,
                              args.seed + 1, start, 500_000, 50_000, args.update_lag)
            run_load(port, warm, args.clients, args.keepalive, args.request_timeout)
        events = build_load(args.requests, items, config, LOAD_PROJECT, args.mix_tuple, args.dup_fraction,
                            args.seed, start, 100_000, 20_000, args.update_lag)

        # ---- 3. the measurement
        roles = backend_processes(backend.proc.pid, backend.redis_pid())
        fsync_before = fsync_probe(model_dir)
        if args.nice_worker is not None:
            for pid, role in roles.items():
                if role.startswith("rq "):
                    for task in Path(f"/proc/{pid}/task").iterdir():
                        with contextlib.suppress(OSError):
                            os.setpriority(os.PRIO_PROCESS, int(task.name), args.nice_worker)
            log.info("reniced the RQ worker and work horse to %d (experiment)", args.nice_worker)
        hist_before = server_histogram(get_text(port, "/metrics"))
        load_start = os.getloadavg()
        cpu_a = cpu_snapshot(roles)
        outcomes, _ = run_load(port, events, args.clients, args.keepalive, args.request_timeout)
        cpu_b = cpu_snapshot(roles)
        load_end = os.getloadavg()
        wall = max(r.done for r in outcomes)
        training_after = training_state(store, redis_url, str(TRAIN_PROJECT))
        fsync_after = fsync_probe(model_dir)
        hist_after = server_histogram(get_text(port, "/metrics"))

        # ---- 4. lost?
        verdict = verify(store, str(LOAD_PROJECT), events, outcomes)
        acked = sum(1 for r in outcomes if r.status // 100 == 2)
        errors = len(outcomes) - acked
        lat = [r.latency for r in outcomes]
        by_kind = {k: lat_summary([r.latency for r, e in zip(outcomes, events, strict=True) if e.kind == k])
                   for k in ("create", "dup", "update", "delete")}
        replies: dict[str, int] = {}
        trainings: dict[str, int] = {}
        error_kinds: dict[str, int] = {}
        for r in outcomes:
            replies[r.reply or str(r.status)] = replies.get(r.reply or str(r.status), 0) + 1
            if r.training:
                trainings[r.training] = trainings.get(r.training, 0) + 1
            if r.status // 100 != 2:
                key = f"{r.status} {r.error[:80]}"
                error_kinds[key] = error_kinds.get(key, 0) + 1
        latency_all = lat_summary(lat)
        throughput = len(outcomes) / wall
        res: dict[str, Any] = {
            "config": {
                "store": store_name, "workers": workers, "threads": threads, "clients": args.clients,
                "keepalive": args.keepalive, "requests": args.requests, "mix": args.mix,
                "dup_fraction": args.dup_fraction, "update_lag": args.update_lag, "base_model": args.base_model,
                "quantization": args.quantization, "train_epochs": args.train_epochs, "redis": "embedded",
                "nice_worker": args.nice_worker,
                "payload_bytes_mean": round(sum(len(e.body) for e in events) / len(events)),
                "events": {k: sum(1 for e in events if e.kind == k) for k in ("create", "dup", "update", "delete")},
            },
            "requests": len(outcomes), "acknowledged": acked, "errors": errors, "error_kinds": error_kinds,
            "wall_s": wall, "throughput_per_s": throughput, "acknowledged_per_s": acked / wall,
            "latency_all": latency_all, "latency_by_kind": by_kind,
            "over_ls_timeout": sum(1 for x in lat if x > LS_TIMEOUT_S),
            "replies": replies, "training_answers": trainings,
            "server_side": diff_hist(hist_before, hist_after),
            "verify": verdict, "training_setup": {"annotations": len(train_bodies),
                                                  "queued_at_label": answers.index("queued") + 1},
            "training_before": training_before, "training_after": training_after,
            "cpu": cpu_shares(roles, cpu_a, cpu_b), "processes": {str(k): v for k, v in roles.items()},
            "loadavg_start": load_start, "loadavg_end": load_end,
            "fsync_4k": {"before": fsync_before, "after": fsync_after},
            "backend_startup_s": backend.startup_seconds, "health": health,
            "per_second": per_second(outcomes),
            "machine": machine_info(),
        }
        res["targets"] = {
            "throughput_per_s": {"target": f">= {TARGETS['throughput_per_s']}", "value": throughput,
                                 "pass": throughput >= TARGETS["throughput_per_s"]},
            "p99_ms": {"target": f"< {TARGETS['p99_ms']}", "value": latency_all["p99_ms"],
                       "pass": latency_all["p99_ms"] < TARGETS["p99_ms"]},
            "lost": {"target": "0 (acknowledged but not stored) + 0 failed", "value": verdict["lost"] + errors,
                     "pass": verdict["lost"] == 0 and errors == 0},
        }
        md = report(res)
        res["table"] = md
        default = f"webhooks-{socket.gethostname()}" + ("-postgresql" if args.database_url else "")
        out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"{default}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=2, default=str))
        out.with_suffix(".md").write_text(md + "\n")
        print(md)
        print(f"\nwrote {out} and {out.with_suffix('.md')}")
        if training_after.get("job_status") != "started":
            log.warning("the training job was not running any more at the end of the load: %s", training_after)
        return 0 if all(t["pass"] for t in res["targets"].values()) else 1
    except BaseException:
        if backend is not None:
            log.error("backend log tail:\n%s", backend.log_tail(80))
        raise
    finally:
        if backend is not None:
            t = time.monotonic()
            backend.stop(timeout=30)
            log.info("backend, worker and embedded redis stopped (%.1f s)", time.monotonic() - t)
        if drop_schema is not None:
            with contextlib.suppress(Exception):
                drop_schema()
        if args.keep:
            log.info("kept %s", tmp)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
