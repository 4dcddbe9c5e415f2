"""Pieces shared by the load benchmarks (bench_webhooks.py, bench_reliability.py) and their tests.

Label Studio 1.23.2-shaped webhook payloads and load streams, a keep-alive HTTP client and a load driver,
the store check that every acknowledged label is there, training-state polling, latency statistics and a
description of the machine. Moved here from bench_webhooks.py unchanged, apart from run_load's optional
pacing, headers and back-off and verify's tolerance of failed requests that the server applied anyway.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import http.client
import importlib.metadata
import importlib.util
import itertools
import json
import logging
import os
import platform
import random
import socket
import string
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slm_annotator.model.devdata import DevItem
from slm_annotator.store import Store

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("bench")


def ls_time(stamp: _dt.datetime) -> str:
    return stamp.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def region_id(rng: random.Random) -> str:
    return "".join(rng.choices(string.ascii_letters + string.digits + "_-", k=10))


def ls_result(ratings: dict[str, Any], rng: random.Random) -> list[dict[str, Any]]:
    """One result region per control, as the LS editor submits them (Choices strings, Rating an int)."""
    out = []
    for control, value in ratings.items():
        kind = "rating" if control == "Overall" else "choices"
        out.append({
            "value": {"rating": int(value)} if kind == "rating" else {"choices": [str(value)]},
            "id": region_id(rng), "from_name": control, "to_name": "response", "type": kind, "origin": "manual",
        })
    return out


def expected_values(result: list[dict[str, Any]]) -> dict[str, str]:
    """What the store should hold as `values` for a result (control name -> value as a string)."""
    out = {}
    for item in result:
        value = item["value"]
        out[item["from_name"]] = str(value["rating"] if item["type"] == "rating" else value["choices"][0])
    return out


def perturb(ratings: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    """An annotator changes one or two answers (an ANNOTATION_UPDATED)."""
    scales = {"Understandable": (0, 1), "Natural": (1, 3), "Maintains_Context": (1, 3), "Engaging": (1, 3),
              "Uses_Knowledge": (0, 1), "Overall": (1, 5)}
    out = dict(ratings)
    for control in rng.sample(sorted(scales), rng.choice([1, 2])):
        lo, hi = scales[control]
        choices = [v for v in range(lo, hi + 1) if str(v) != str(out.get(control))] or [lo]
        value = rng.choice(choices)
        out[control] = value if control == "Overall" else str(value)
    return out


def ls_project(pid: int, config: str, created: _dt.datetime) -> dict[str, Any]:
    """The `project` object LS 1.23.2 puts in every webhook (ProjectSerializer: label_config and friends)."""
    controls = {c: {"type": "Rating" if c == "Overall" else "Choices", "labels": {}, "overall": 1.0}
                for c in ("Understandable", "Natural", "Maintains_Context", "Engaging", "Uses_Knowledge", "Overall")}
    return {
        "id": pid, "title": f"USR PersonaChat bench {pid}", "description": "", "label_config": config,
        "expert_instruction": "", "show_instruction": False, "show_skip_button": True,
        "enable_empty_annotation": True, "show_annotation_history": False, "organization": 1, "color": "#FFFFFF",
        "maximum_annotations": 3, "is_published": False, "model_version": "", "is_draft": False,
        "created_by": {"id": 1, "first_name": "", "last_name": "", "email": "admin@example.com", "avatar": None},
        "created_at": ls_time(created), "min_annotations_to_start_training": 0,
        "start_training_on_annotation_update": False, "show_collab_predictions": True,
        "num_tasks_with_annotations": None, "task_number": None, "useful_annotation_number": None,
        "ground_truth_number": None, "skipped_annotations_number": None, "total_annotations_number": None,
        "total_predictions_number": None, "sampling": "Sequential sampling", "show_ground_truth_first": False,
        "show_overlap_first": False, "overlap_cohort_percentage": 100, "task_data_login": None,
        "task_data_password": None, "control_weights": controls, "parsed_label_config": {
            c: {"type": v["type"], "to_name": ["response"], "inputs": [{"type": "Text", "value": "response"}],
                "labels": []} for c, v in controls.items()},
        "evaluate_predictions_automatically": False, "config_has_control_tags": True,
        "skip_queue": "REQUEUE_FOR_OTHERS",
        "reveal_preannotations_interactively": False, "pinned_at": None, "finished_task_number": None,
        "queue_total": None, "queue_done": None, "config_suitable_for_bulk_annotation": False,
    }


def ls_task(task_id: int, pid: int, data: dict[str, Any], created: _dt.datetime, ann_ids: list[int]) -> dict[str, Any]:
    return {
        "id": task_id, "data": data, "meta": {}, "created_at": ls_time(created), "updated_at": ls_time(created),
        "is_labeled": True, "overlap": 1, "inner_id": task_id, "total_annotations": len(ann_ids),
        "cancelled_annotations": 0, "total_predictions": 0, "comment_count": 0, "unresolved_comment_count": 0,
        "last_comment_updated_at": None, "project": pid, "updated_by": None, "file_upload": None,
        "comment_authors": [], "annotations": ann_ids,
    }


def ls_annotation(ann_id: int, task_id: int, pid: int, user: int, result: list[dict[str, Any]],
                  created: _dt.datetime, updated: _dt.datetime, rng: random.Random) -> dict[str, Any]:
    return {
        "id": ann_id, "result": result, "created_username": f" user{user}@example.com, {user}",
        "created_ago": "0\xa0minutes", "completed_by": user, "was_cancelled": False, "ground_truth": False,
        "created_at": ls_time(created), "updated_at": ls_time(updated), "draft_created_at": None,
        "lead_time": round(rng.uniform(5, 120), 3), "import_id": None, "last_action": None,
        "bulk_created": False, "task": task_id, "project": pid, "updated_by": user, "parent_prediction": None,
        "parent_annotation": None, "last_created_by": None,
    }


@dataclass
class Event:
    kind: str  # create | dup | update | delete
    action: str
    ann_id: int
    body: bytes
    updated_at: _dt.datetime | None = None
    result: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class AnnState:
    task_id: int
    item: int
    user: int
    created_at: _dt.datetime
    ratings: dict[str, Any]
    born: int  # event index of its create
    create_event: int


def build_load(n: int, items: list[DevItem], config: str, pid: int, mix: tuple[float, float, float],
               dup_fraction: float, seed: int, start: _dt.datetime, first_ann: int, first_task: int,
               lag: int) -> list[Event]:
    """A realistic stream: new annotations on random tasks by 4 annotators, exact resends (duplicates),
    updates and deletes of annotations created at least `lag` events earlier. Times grow 1 ms per event."""
    rng = random.Random(seed)
    project = ls_project(pid, config, start - _dt.timedelta(days=1))
    p_create, p_update, _p_delete = mix
    events: list[Event] = []
    creates: list[Event] = []
    live: dict[int, AnnState] = {}
    next_ann = first_ann
    for i in range(n):
        now = start + _dt.timedelta(milliseconds=i)
        eligible = [a for a, s in live.items() if s.born <= i - lag]
        r = rng.random()
        if r < p_create or not eligible:
            if creates and rng.random() < dup_fraction:
                src = rng.choice(creates[-200:])
                events.append(Event("dup", "ANNOTATION_CREATED", src.ann_id, src.body, src.updated_at, src.result))
                continue
            k = rng.randrange(len(items))
            item = items[k]
            user = rng.randint(1, 4)
            rater = rng.choice(sorted(item.ratings))
            st = AnnState(first_task + k, k, user, now, dict(item.ratings[rater]), i, len(events))
            result = ls_result(st.ratings, rng)
            ann = ls_annotation(next_ann, st.task_id, pid, user, result, now, now, rng)
            body = {"action": "ANNOTATION_CREATED", "annotation": ann,
                    "task": ls_task(st.task_id, pid, item.data, start - _dt.timedelta(hours=1), [next_ann]),
                    "project": project}
            events.append(Event("create", "ANNOTATION_CREATED", next_ann, json.dumps(body).encode(), now, result))
            creates.append(events[-1])
            live[next_ann] = st
            next_ann += 1
        elif r < p_create + p_update:
            ann_id = rng.choice(eligible)
            st = live[ann_id]
            st.ratings = perturb(st.ratings, rng)
            result = ls_result(st.ratings, rng)
            ann = ls_annotation(ann_id, st.task_id, pid, st.user, result, st.created_at, now, rng)
            body = {"action": "ANNOTATION_UPDATED", "annotation": ann,
                    "task": ls_task(st.task_id, pid, items[st.item].data, start - _dt.timedelta(hours=1), [ann_id]),
                    "project": project}
            events.append(Event("update", "ANNOTATION_UPDATED", ann_id, json.dumps(body).encode(), now, result))
        else:
            ann_id = rng.choice(eligible)
            del live[ann_id]
            body = {"action": "ANNOTATIONS_DELETED", "annotations": [{"id": ann_id}], "project": project}
            events.append(Event("delete", "ANNOTATIONS_DELETED", ann_id, json.dumps(body).encode()))
    return events


def training_webhooks(items: list[DevItem], config: str, pid: int, n: int, start: _dt.datetime,
                      seed: int) -> list[bytes]:
    """Real ratings (one rater per task) for the training project, as ANNOTATION_CREATED webhooks."""
    rng = random.Random(seed)
    project = ls_project(pid, config, start - _dt.timedelta(days=1))
    out = []
    for k, item in enumerate(items[:n]):
        rater = sorted(item.ratings)[0]
        stamp = start + _dt.timedelta(milliseconds=k)
        ann_id, task_id = 10_000 + k, 10_000 + k
        ann = ls_annotation(ann_id, task_id, pid, 1, ls_result(item.ratings[rater], rng), stamp, stamp, rng)
        body = {"action": "ANNOTATION_CREATED", "annotation": ann,
                "task": ls_task(task_id, pid, item.data, start, [ann_id]), "project": project}
        out.append(json.dumps(body).encode())
    return out


class Client:
    """One keep-alive HTTP/1.1 connection (or a fresh one per request, like Label Studio's requests.post)."""

    def __init__(self, port: int, keepalive: bool = True, timeout: float = 30.0,
                 headers: dict[str, str] | None = None) -> None:
        self.port, self.keepalive, self.timeout = port, keepalive, timeout
        self.headers = dict(headers or {})  # e.g. X-Webhook-Secret or Authorization, on every request
        self.conn: http.client.HTTPConnection | None = None

    def connect(self) -> None:
        if self.conn is None:
            self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
            self.conn.connect()
            self.conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        self.connect()
        assert self.conn is not None
        headers = {"Content-Type": "application/json", **self.headers}
        if not self.keepalive:
            headers["Connection"] = "close"
        try:
            self.conn.request("POST", path, body=body, headers=headers)
            resp = self.conn.getresponse()
            data = resp.read()
        except BaseException:
            self.close()
            raise
        if not self.keepalive or resp.will_close:
            self.close()
        return resp.status, data

    def get(self, path: str) -> tuple[int, bytes]:
        self.connect()
        assert self.conn is not None
        try:
            self.conn.request("GET", path, headers=self.headers)
            resp = self.conn.getresponse()
            data = resp.read()
        except BaseException:
            self.close()
            raise
        if resp.will_close:
            self.close()
        return resp.status, data


def post_json(port: int, path: str, obj: Any) -> Any:
    client = Client(port, keepalive=False)
    status, data = client.post(path, json.dumps(obj).encode())
    if status // 100 != 2:
        raise RuntimeError(f"POST {path} -> {status}: {data[:500]!r}")
    return json.loads(data)


def get_json(port: int, path: str) -> Any:
    client = Client(port, keepalive=False)
    try:
        status, data = client.get(path)
    finally:
        client.close()
    if status != 200:
        raise RuntimeError(f"GET {path} -> {status}: {data[:500]!r}")
    return json.loads(data)


def get_text(port: int, path: str) -> str:
    client = Client(port, keepalive=False)
    try:
        return client.get(path)[1].decode(errors="replace")
    finally:
        client.close()


@dataclass
class Outcome:
    status: int = 0  # HTTP status; 0 = transport error
    latency: float = 0.0
    done: float = 0.0
    reply: str = ""
    training: str = ""
    error: str = ""


def run_load(port: int, events: list[Event], clients: int, keepalive: bool, timeout: float,
             rate: float = 0.0, error_backoff: float = 0.0, headers: dict[str, str] | None = None,
             cursor: list[int] | None = None) -> tuple[list[Outcome], float]:
    """`clients` threads take the next event in stream order, POST it, and record its latency.

    `rate` > 0 paces the stream (event i is sent no earlier than i / rate s after the start); after a
    transport error a client waits `error_backoff` s before its next event (the failed one is not resent:
    Label Studio never retries a webhook). `cursor[0]` is the next event's index, for a watcher of progress.
    """
    out = [Outcome() for _ in events]
    lock = threading.Lock()
    cursor = cursor if cursor is not None else [0]
    barrier = threading.Barrier(clients + 1)
    failures: list[BaseException] = []
    began = [0.0]

    def worker() -> None:
        client = Client(port, keepalive, timeout, headers)
        try:
            if keepalive:
                client.connect()
            barrier.wait()
            while True:
                with lock:
                    i = cursor[0]
                    cursor[0] += 1
                if i >= len(events):
                    return
                if rate > 0:
                    time.sleep(max(0.0, began[0] + i / rate - time.perf_counter()))
                rec = out[i]
                t0 = time.perf_counter()
                try:
                    status, data = client.post("/webhook", events[i].body)
                except Exception as exc:
                    rec.done = time.perf_counter()
                    rec.latency = rec.done - t0
                    rec.error = f"{type(exc).__name__}: {exc}"[:200]
                    time.sleep(error_backoff)
                    continue
                rec.done = time.perf_counter()
                rec.latency = rec.done - t0
                rec.status = status
                try:
                    reply = json.loads(data)
                    rec.reply = str(reply.get("status", ""))
                    rec.training = str(reply.get("training", ""))
                except ValueError:
                    rec.error = data[:200].decode(errors="replace")
        except BaseException as exc:  # reported by the caller
            failures.append(exc)
            with contextlib.suppress(threading.BrokenBarrierError):
                barrier.abort()
        finally:
            client.close()

    threads = [threading.Thread(target=worker, name=f"client-{k}", daemon=True) for k in range(clients)]
    for t in threads:
        t.start()
    began[0] = time.perf_counter()
    barrier.wait(timeout=60)
    t_start = time.perf_counter()
    for t in threads:
        t.join()
    if failures:
        raise RuntimeError(f"client thread failed: {failures[0]!r}")
    for rec in out:
        rec.done -= t_start
    return out, t_start


def verify(store: Store, pid: str, events: list[Event], outcomes: list[Outcome]) -> dict[str, Any]:
    """Every acknowledged label in the store with its latest values; acknowledged deletes are tombstones."""
    want: dict[int, dict[str, Any]] = {}
    for ev, rec in zip(events, outcomes, strict=True):
        if rec.status // 100 != 2:
            continue
        w = want.setdefault(ev.ann_id, {"deleted": False, "updated_at": None, "result": None})
        if ev.kind == "delete":
            w["deleted"] = True
        elif w["updated_at"] is None or ev.updated_at > w["updated_at"]:
            w["updated_at"], w["result"] = ev.updated_at, ev.result
    rows = {r.annotation_id: r for r in store.labels(pid, include_inactive=True)}
    lost: list[dict[str, Any]] = []
    for ann_id, w in sorted(want.items()):
        row = rows.get(ann_id)
        problem = None
        if row is None:
            problem = "missing"
        elif w["deleted"]:
            if not row.deleted:
                problem = "not deleted"
        elif row.deleted:
            problem = "deleted but never acknowledged as deleted"
        elif row.ls_updated_at != w["updated_at"].replace(tzinfo=None):
            problem = f"stale updated_at {row.ls_updated_at} != {w['updated_at']}"
        elif row.result != w["result"]:
            problem = "stale result"
        elif row.values != expected_values(w["result"]):
            problem = f"values {row.values} != {expected_values(w['result'])}"
        if problem:
            lost.append({"annotation_id": ann_id, "problem": problem})
    sent_ids = {ev.ann_id for ev in events}
    spans: dict[int, list[tuple[float, float, int]]] = {}
    for k, (ev, rec) in enumerate(zip(events, outcomes, strict=True)):
        spans.setdefault(ev.ann_id, []).append((rec.done - rec.latency, rec.done, k))
    overlaps = reordered = 0  # two events of one annotation in flight at once (and answered out of order)
    for group in spans.values():
        group.sort()
        for a, b in itertools.pairwise(group):
            if b[0] < a[1]:
                overlaps += 1
                reordered += (a[2] < b[2]) != (a[1] < b[1])
    return {
        "same_annotation_in_flight_pairs": overlaps,
        "same_annotation_answered_out_of_order": reordered,
        "acknowledged_annotations": len(want),
        "expected_live": sum(1 for w in want.values() if not w["deleted"]),
        "expected_deleted": sum(1 for w in want.values() if w["deleted"]),
        "stored_rows": len(rows),
        "stored_live": sum(1 for r in rows.values() if not r.deleted and not r.cancelled),
        "stored_deleted": sum(1 for r in rows.values() if r.deleted),
        "unexpected_rows": sorted(set(rows) - sent_ids)[:20],
        "lost": len(lost),
        "lost_examples": lost[:20],
    }


def training_state(store: Store, redis_url: str, pid: str) -> dict[str, Any]:
    from redis import Redis
    from rq.exceptions import NoSuchJobError
    from rq.job import Job

    from slm_annotator.worker.policy import job_id

    runs = store.runs(pid)
    state: dict[str, Any] = {"run_status": runs[-1].status if runs else None, "runs": len(runs)}
    try:
        job = Job.fetch(job_id(pid), connection=Redis.from_url(redis_url))
        meta = job.get_meta(refresh=True) if hasattr(job, "get_meta") else job.meta
        state.update(job_status=str(job.get_status(refresh=True).value), **{
            k: meta.get(k) for k in ("epoch", "step", "total_steps", "loss", "eta_seconds", "phase") if k in meta})
    except NoSuchJobError:
        state["job_status"] = None
    return state


def wait_training(store: Store, redis_url: str, pid: str, min_step: int, timeout: float,
                  backend: Any) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    t0 = time.monotonic()
    state: dict[str, Any] = {}
    last = ""
    while time.monotonic() < deadline:
        if backend.proc is None or backend.proc.poll() is not None:
            raise RuntimeError(f"backend exited while waiting for training:\n{backend.log_tail()}")
        state = training_state(store, redis_url, pid)
        if state["run_status"] in {"failed", "promoted", "refused", "skipped"} and state.get("job_status") != "started":
            raise RuntimeError(f"training run ended before the load: {state}\n{backend.log_tail(60)}")
        running = state["run_status"] == "running" and state.get("job_status") == "started"
        if running and (state.get("step") or 0) >= min_step:
            state["waited_s"] = round(time.monotonic() - t0, 1)
            return state
        desc = json.dumps(state, default=str)
        if desc != last:
            log.info("waiting for training: %s", desc)
            last = desc
        time.sleep(1.0)
    raise RuntimeError(f"training not running (step >= {min_step}) after {timeout:.0f}s: {state}\n"
                       f"{backend.log_tail(60)}")


def pct(sorted_vals: list[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values."""
    if not sorted_vals:
        return float("nan")
    k = max(0, min(len(sorted_vals) - 1, int(-(-q * len(sorted_vals) // 100)) - 1))
    return sorted_vals[k]


def lat_summary(lat_s: list[float]) -> dict[str, float]:
    ms = sorted(x * 1000 for x in lat_s)
    if not ms:
        return {"n": 0}
    return {"n": len(ms), "mean_ms": sum(ms) / len(ms), "p50_ms": pct(ms, 50), "p90_ms": pct(ms, 90),
            "p95_ms": pct(ms, 95), "p99_ms": pct(ms, 99), "p999_ms": pct(ms, 99.9), "max_ms": ms[-1]}


def per_second(outcomes: list[Outcome]) -> list[dict[str, Any]]:
    bins: dict[int, list[float]] = {}
    for rec in outcomes:
        bins.setdefault(int(rec.done), []).append(rec.latency * 1000)
    rows = []
    for sec in sorted(bins):
        ms = sorted(bins[sec])
        rows.append({"second": sec, "done": len(ms), "p50_ms": round(pct(ms, 50), 2), "p99_ms": round(pct(ms, 99), 2),
                     "max_ms": round(ms[-1], 2)})
    return rows


def machine_info() -> dict[str, Any]:
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_gb = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem_gb = round(int(Path("/proc/meminfo").read_text().split()[1]) / 2**20, 1)

    def version(pkg: str) -> str | None:
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return None

    import sqlite3

    return {
        "host": socket.gethostname(), "cpu_model": cpu, "cpu_cores": os.cpu_count(), "mem_gb": mem_gb,
        "python": platform.python_version(), "torch": version("torch"), "transformers": version("transformers"),
        "gunicorn": version("gunicorn"), "flask": version("flask"), "sqlalchemy": version("sqlalchemy"),
        "rq": version("rq"), "redis_py": version("redis"), "sqlite": sqlite3.sqlite_version,
        "psycopg": version("psycopg"), "kernel": platform.release(),
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }


def pg_schema_url(url: str, keep: bool) -> tuple[str, Any]:
    """A fresh schema in the given database, so that nothing there is touched; returns (url, dropper)."""
    from sqlalchemy import create_engine, text

    schema = f"bench_{uuid.uuid4().hex[:10]}"
    plain = url.replace("postgresql+psycopg://", "postgresql://")
    admin = create_engine(plain.replace("postgresql://", "postgresql+psycopg://", 1))
    with admin.begin() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
    scoped = plain + ("&" if "?" in plain else "?") + f"options=-csearch_path%3D{schema}"

    def drop() -> None:
        if keep:
            log.info("kept PostgreSQL schema %s", schema)
        else:
            with admin.begin() as conn:
                conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()

    return scoped, drop


def _state(row: Any) -> tuple[Any, ...]:
    return ("deleted",) if row.deleted else (row.ls_updated_at, json.dumps(row.result, sort_keys=True))


def _event_state(ev: Event) -> tuple[Any, ...]:
    if ev.kind == "delete":
        return ("deleted",)
    assert ev.updated_at is not None
    return (ev.updated_at.replace(tzinfo=None), json.dumps(ev.result, sort_keys=True))


def verify_acknowledged(store: Store, pid: str, events: list[Event], outcomes: list[Outcome]) -> dict[str, Any]:
    """Every acknowledged label is stored exactly once, in its latest acknowledged state, with faults in between.

    A 2xx was acknowledged: it must be in the store. A 4xx was refused: it must not be. A transport error or a
    5xx is unknown (the server may have committed it just before it was killed): the store may hold its state
    instead, if that is newer than the last acknowledged one. Deletes are final (tombstones).
    """
    acked: dict[int, list[Event]] = {}
    unknown: dict[int, list[Event]] = {}
    for ev, rec in zip(events, outcomes, strict=True):
        if rec.status // 100 == 2:
            acked.setdefault(ev.ann_id, []).append(ev)
        elif rec.status == 0 or rec.status >= 500:
            unknown.setdefault(ev.ann_id, []).append(ev)
    rows = store.labels(pid, include_inactive=True)
    by_id: dict[int, list[Any]] = {}
    for row in rows:
        by_id.setdefault(row.annotation_id, []).append(row)
    lost: list[dict[str, Any]] = []
    applied_unacked = 0
    for ann_id, evs in sorted(acked.items()):
        found = by_id.get(ann_id, [])
        if len(found) != 1:
            lost.append({"annotation_id": ann_id, "problem": f"{len(found)} rows"})
            continue
        stored = _state(found[0])
        want = _latest(evs)
        maybe = {_event_state(e) for e in unknown.get(ann_id, []) if _newer(_event_state(e), want)}
        row = found[0]
        if stored != want and stored not in maybe:
            lost.append({"annotation_id": ann_id, "problem": f"stored {stored[:1]} != acknowledged {want[:1]}"})
        elif not row.deleted and row.values != expected_values(row.result):
            lost.append({"annotation_id": ann_id, "problem": f"values {row.values} != {expected_values(row.result)}"})
        elif stored != want:
            applied_unacked += 1
    sent = {ev.ann_id for ev in events}
    only_unknown = set(unknown) - set(acked)
    refused_but_stored = sorted(set(by_id) - set(acked) - only_unknown)
    return {
        "acknowledged_annotations": len(acked),
        "acknowledged_requests": sum(1 for r in outcomes if r.status // 100 == 2),
        "stored_as_acknowledged": len(acked) - len(lost),
        "stored_rows": len(rows),
        "duplicate_rows": sum(1 for v in by_id.values() if len(v) > 1),
        "failed_requests": sum(1 for r in outcomes if r.status // 100 != 2),
        "failed_transport": sum(1 for r in outcomes if r.status == 0),
        "failed_5xx": sum(1 for r in outcomes if r.status >= 500),
        "refused_4xx": sum(1 for r in outcomes if 400 <= r.status < 500),
        "failed_but_applied": applied_unacked + sum(1 for a in only_unknown if a in by_id),
        "unexpected_rows": sorted(set(by_id) - sent)[:20],
        "refused_but_stored": refused_but_stored[:20],
        "lost": len(lost),
        "lost_examples": lost[:20],
    }


def _latest(evs: list[Event]) -> tuple[Any, ...]:
    """The state the store must hold after these acknowledged events: a delete wins, else the newest update."""
    if any(e.kind == "delete" for e in evs):
        return ("deleted",)
    return max((_event_state(e) for e in evs), key=lambda s: s[0])


def _newer(state: tuple[Any, ...], than: tuple[Any, ...]) -> bool:
    if than == ("deleted",):
        return False
    return state == ("deleted",) or state[0] > than[0]
