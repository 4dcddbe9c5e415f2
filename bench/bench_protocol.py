"""Quality and speed through Label Studio's protocol only: webhooks in, /predict out, default settings.

For each dev set and seed: a fresh `slm-annotator serve` (its training and heads workers, embedded Redis,
SQLite) is taught the training items' labels as ANNOTATION_CREATED webhooks, one per rater and item, in a
shuffled order; the bench records when the 20th label was acknowledged and when /setup first returned a new
model_version (the time to a served first model). After the last label it waits for the head trained on
(nearly) all of them, asks /predict for the test items, and scores the answers per dimension against each
rater (mean alpha vs each human) next to the humans' pairwise alpha and the training majority. Dimensions the
backend held back (below the pre-fill bar) are scored from a second /predict with the bar at -1, so both what
was served and what would have been are reported.

The adapter does not train here (TRAIN_THRESHOLD is set out of reach): on a 2-core CPU one adapter run on
500 items takes over 1.5 hours; what a team gets meanwhile, and what this measures, is the head.

    python -m bench.bench_protocol --sets usr,lewidi:HS-Brexit --seeds 0,1,2 --out bench/results/protocol
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.harness import (
    ls_annotation,
    ls_project,
    ls_result,
    ls_task,
    machine_info,
)
from slm_annotator.model.agreement import dimension_report
from slm_annotator.model.devdata import fixed_split
from slm_annotator.model.experiment import examples_of, load_devset
from slm_annotator.model.heldout import scale_value
from slm_annotator.model.rubric import parse_label_config
from slm_annotator.testing import BackendProcess

ROOT = Path(__file__).resolve().parents[1]

log = logging.getLogger("bench_protocol")
PID = 77


def webhooks(ds: Any, items: list[Any], seed: int) -> list[dict[str, Any]]:
    """One ANNOTATION_CREATED per (item, rater), in a shuffled order (raters label at their own pace)."""
    rng = random.Random(seed)
    start = _dt.datetime(2026, 11, 30, 8, 0, tzinfo=_dt.UTC)
    project = ls_project(PID, ds.label_config, start - _dt.timedelta(days=1))
    raters = {r: n + 1 for n, r in enumerate(sorted({r for it in items for r in it.ratings}))}
    pairs = [(k, r) for k, it in enumerate(items) for r in sorted(it.ratings)]
    rng.shuffle(pairs)
    out = []
    for n, (k, rater) in enumerate(pairs):
        item = items[k]
        stamp = start + _dt.timedelta(seconds=n)
        task_id, ann_id = 1000 + k, 100_000 + n
        ann = ls_annotation(ann_id, task_id, PID, raters[rater], ls_result(item.ratings[rater], rng), stamp, stamp,
                            rng)
        out.append({"action": "ANNOTATION_CREATED", "annotation": ann,
                    "task": ls_task(task_id, PID, item.data, start, [ann_id]), "project": project})
    return out


def served_version(backend: Any, config: str) -> str:
    return backend.post("/setup", json={"project": f"{PID}.1", "schema": config})["model_version"]


def predict(backend: Any, items: list[Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for start in range(0, len(items), 100):
        chunk = items[start:start + 100]
        tasks = [{"id": 50_000 + start + i, "data": it.data} for i, it in enumerate(chunk)]
        out += backend.post("/predict", json={"project": f"{PID}.1", "tasks": tasks}, timeout=300)["results"]
    return out


def score(rubric: Any, examples: list[Any], results: list[dict[str, Any]]) -> dict[str, Any]:
    """Per dimension: alpha vs each human (answers read back from the LS result items), humans' pairwise."""
    from slm_annotator.model.results import values_from_result

    raters = sorted({r for e in examples for r in e.ratings})
    answers = [values_from_result(rubric, r["result"]) for r in results]
    out = {}
    for dim in rubric.dimensions:
        human = [[scale_value(dim, e.ratings.get(r, {}).get(dim.key)) for e in examples] for r in raters]
        row = [scale_value(dim, a.get(dim.key)) for a in answers]
        domain = None if dim.level == "interval" else [float(i) for i in range(len(dim.values))]
        prefilled = sum(v is not None for v in row)
        rep = dimension_report(human, row, dim.level, domain, rater_names=raters) if prefilled else {}
        out[dim.key] = {"prefilled": prefilled, "n": len(row),
                        "alpha_vs_each_human": (rep.get("model_vs_each_human_mean") or {}).get("value"),
                        "human_pairwise": (rep.get("human_pairwise_mean") or {}).get("value")}
    return out


def majority(rubric: Any, train: list[Any], test: list[Any]) -> dict[str, float | None]:
    raters = sorted({r for e in test for r in e.ratings})
    out = {}
    for dim in rubric.dimensions:
        counts: dict[str, int] = {}
        for e in train:
            for rating in e.ratings.values():
                if rating.get(dim.key) in dim.values:
                    counts[rating[dim.key]] = counts.get(rating[dim.key], 0) + 1
        top = max(counts, key=counts.get) if counts else None  # type: ignore[arg-type]
        human = [[scale_value(dim, e.ratings.get(r, {}).get(dim.key)) for e in test] for r in raters]
        domain = None if dim.level == "interval" else [float(i) for i in range(len(dim.values))]
        rep = dimension_report(human, [scale_value(dim, top)] * len(test), dim.level, domain, rater_names=raters)
        out[dim.key] = (rep.get("model_vs_each_human_mean") or {}).get("value")
    return out


def run_one(name: str, seed: int, n_train: int, n_test: int, env: dict[str, str]) -> dict[str, Any]:
    ds = load_devset(name)
    rubric = parse_label_config(ds.label_config)
    train_items, test_items = fixed_split(ds.items, 1 / 3, seed)
    train_items, test_items = train_items[:n_train], test_items[:n_test]
    events = webhooks(ds, train_items, seed)
    with tempfile.TemporaryDirectory(prefix="bench-protocol-") as tmp:
        backend = BackendProcess(Path(tmp) / "model_dir", env={"TRAIN_THRESHOLD": "1000000", **env},
                                 startup_timeout=300).start()
        try:
            return _teach_and_ask(backend, ds, rubric, events, train_items, test_items, name, seed)
        finally:
            backend.stop()


def wait_for_workers(backend: Any, n: int = 2, timeout: float = 300) -> float:
    """A team labels into a backend that has been up for a while: its workers are registered before label 1."""
    from redis import Redis
    from rq import Worker

    started = time.monotonic()
    conn = Redis(unix_socket_path=str(backend.redis_socket()))
    while time.monotonic() - started < timeout:
        if len(Worker.all(connection=conn)) >= n:
            return time.monotonic() - started
        time.sleep(0.5)
    raise RuntimeError(f"{n} RQ workers did not register within {timeout:.0f} s")


def _teach_and_ask(backend: Any, ds: Any, rubric: Any, events: list[dict[str, Any]], train_items: list[Any],
                   test_items: list[Any], name: str, seed: int) -> dict[str, Any]:
    workers_up = wait_for_workers(backend)
    base = served_version(backend, ds.label_config)
    t20 = first = None
    started = time.perf_counter()
    for n, event in enumerate(events, 1):
        backend.post("/webhook", json=event)
        if n == 20:
            t20 = time.perf_counter()
        if t20 is not None and first is None and served_version(backend, ds.label_config) != base:
            first = time.perf_counter() - t20
    sent = time.perf_counter() - started
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:  # the head on (nearly) every label: the last trigger fires within 10
        if first is None and served_version(backend, ds.label_config) != base:
            first = time.perf_counter() - (t20 or started)
        served = [a for a in backend.get(f"/versions/{PID}")["adapters"] if a["status"] == "served"]
        if served and served[0]["metrics"].get("head", {}).get("labels", 0) >= len(events) - 10:
            break
        time.sleep(1)
    versions = backend.get(f"/versions/{PID}")
    examples = examples_of(ds, test_items)
    with_bar = score(rubric, examples, predict(backend, test_items))
    backend.post("/setup", json={"project": f"{PID}.1", "schema": ds.label_config,
                                 "extra_params": {"prefill_min_alpha": -1}})
    without_bar = score(rubric, examples, predict(backend, test_items))
    base_majority = majority(rubric, examples_of(ds, train_items), examples)
    return {"dataset": name, "seed": seed, "train_items": len(train_items), "labels": len(events),
            "test_items": len(test_items), "seconds_to_send": round(sent, 1),
            "first_model_seconds_after_20th_label": None if first is None else round(first, 1),
            "workers_ready_seconds": round(workers_up, 1),
            "head_job_seconds": [a["metrics"].get("wall_seconds") for a in versions["adapters"]],
            "serving": versions.get("serving"), "served": with_bar, "all_dimensions": without_bar,
            "majority": base_majority, "versions": len(versions["adapters"])}


def summary(runs: list[dict[str, Any]]) -> str:
    rows = ["| dev set | seeds | humans | majority | head, all dims | served dims: alpha (held back) | "
            "first model after 20th label (s) |", "|---|---|---|---|---|---|---|"]
    for name in dict.fromkeys(r["dataset"] for r in runs):
        mine = [r for r in runs if r["dataset"] == name]

        def mean_of(get: Any, rs: list[dict[str, Any]] = mine) -> str:
            vals = [v for v in (get(r) for r in rs) if v is not None]
            if not vals:
                return "n/a"
            sd = statistics.pstdev(vals) if len(vals) > 1 else 0.0
            return f"{statistics.mean(vals):.3f} ± {sd:.3f}"

        def dims_mean(r: dict[str, Any], part: str, key: str) -> float | None:
            vals = [d[key] for d in r[part].values() if d[key] is not None]
            return statistics.mean(vals) if vals else None

        held = statistics.mean(sum(1 for d in r["served"].values() if not d["prefilled"]) for r in mine)
        n_dims = len(mine[0]["served"])
        rows.append(
            f"| {name} | {len(mine)} | {mean_of(lambda r: dims_mean(r, 'all_dimensions', 'human_pairwise'))} "
            f"| {mean_of(lambda r: statistics.mean([v for v in r['majority'].values() if v is not None] or [0]))} "
            f"| {mean_of(lambda r: dims_mean(r, 'all_dimensions', 'alpha_vs_each_human'))} "
            f"| {mean_of(lambda r: dims_mean(r, 'served', 'alpha_vs_each_human'))} ({held:.1f} of {n_dims}) "
            f"| {mean_of(lambda r: r['first_model_seconds_after_20th_label'])} |")
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", default="usr,lewidi:HS-Brexit")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--train", type=int, default=500, help="training items (each with all its raters)")
    parser.add_argument("--test", type=int, default=300)
    parser.add_argument("--env", action="append", default=[], help="KEY=VALUE for the backend, e.g. HEAD_EVERY=20")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "protocol")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    env = dict(kv.split("=", 1) for kv in args.env)
    runs = []
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.sets.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            log.info("%s seed %d", name, seed)
            runs.append(run_one(name, seed, args.train, args.test, env))
            (args.out / "runs.json").write_text(json.dumps({"machine": machine_info(), "runs": runs}, indent=1))
    table = summary(runs)
    (args.out / "summary.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
