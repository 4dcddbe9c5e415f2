"""Threshold to served: seconds from the label that crosses TRAIN_THRESHOLD to /predict answering with the new adapter.

What a team waits for (AutoAnnotator's beta = 2,000 labels). The product's own parts, in one run:

  1. A fresh MODEL_DIR, the default SQLite label store, the embedded Redis, the Flask app (in-process) and one
     `slm-annotator worker` subprocess already waiting on the queue, as `slm-annotator serve` runs it.
  2. POST /setup with the USR-PersonaChat rubric (6 dimensions), then --labels ANNOTATION_CREATED webhooks
     (USR texts cycled over new task ids, --raters labels per task) with TRAIN_THRESHOLD = --labels.
  3. t0 = the reply to the webhook that crossed the threshold. The worker trains (the product's default recipe
     unless --epochs/--lora-layers say otherwise), gates on held-out labels and promotes; the bench polls
     POST /setup and then calls /predict until the new model_version answers: t_served.

The run's own timings (load, training, evaluation) come from the store, so the table says what bounds the total.

  python -m bench.bench_loop --labels 200                                       # CPU, SmolLM2 NF4 (slow)
  python -m bench.bench_loop --synthetic-config qwen3-1.7b --tokenizer .dev/tok --labels 2000   # GPU
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from bench.bench_predict import machine_info, strip_headers, synthetic_dir
from slm_annotator.model.devdata import load_usr_personachat
from slm_annotator.model.loader import pick_device
from slm_annotator.model.results import DimensionScore, to_ls_result
from slm_annotator.model.rubric import parse_label_config

ROOT = Path(__file__).resolve().parents[1]

log = logging.getLogger("bench_loop")


def label_events(n_labels: int, raters: int, config: str) -> list[dict[str, Any]]:
    """Label Studio 1.23.2-shaped ANNOTATION_CREATED events carrying real USR ratings."""
    ds = load_usr_personachat()
    rubric = parse_label_config(config)
    events = []
    for n in range(n_labels):
        task_id, r = divmod(n, raters)
        item = ds.items[task_id % len(ds.items)]
        rater = sorted(item.ratings)[r % len(item.ratings)]
        values = {k: str(v) for k, v in item.ratings[rater].items()}
        scores = [DimensionScore(values[d.key], d.values.index(values[d.key]), 1.0, ())
                  for d in rubric.dimensions if values.get(d.key) in d.values]
        result, _ = to_ls_result(rubric, scores)
        events.append({
            "action": "ANNOTATION_CREATED", "project": {"id": 1},
            "task": {"id": task_id + 1, "data": item.data},
            "annotation": {"id": n + 1, "task": task_id + 1, "result": result, "was_cancelled": False,
                           "completed_by": {"email": f"rater{r}@example.com"},
                           "updated_at": f"2026-11-22T10:00:00.{n:06d}Z"},
        })
    return events


def environment(args: argparse.Namespace, model_dir: Path, base: str, redis_url: str) -> dict[str, str]:
    env = {**os.environ, "MODEL_DIR": str(model_dir), "BASE_MODEL": base, "QUANTIZATION": args.quantization,
           "DEVICE": args.device, "REDIS_URL": redis_url, "TRAIN_THRESHOLD": str(args.labels),
           "MAX_PROMPT_TOKENS": str(args.max_tokens), "PREDICT_BATCH_SIZE": str(args.predict_batch)}
    for key, value in (("TRAIN_EPOCHS", args.epochs), ("LORA_LAYERS", args.lora_layers),
                       ("TRAIN_BATCH_SIZE", args.train_batch), ("PROMOTION_TOLERANCE", args.promotion_tolerance)):
        if value is not None:
            env[key] = str(value)
    return env


def wait_served(client: Any, setup: dict[str, Any], old: str, tasks: list[dict[str, Any]], limit: float) -> str:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        version = client.post("/setup", json=setup).json["model_version"]
        if version != old:
            reply = client.post("/predict", json={**setup, "tasks": tasks})
            assert reply.status_code == 200, reply.json
            served = {r["model_version"] for r in reply.json["results"]}
            assert served == {version}, served
            return version
        time.sleep(0.2)
    raise TimeoutError(f"no new adapter served within {limit:.0f} s")


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = pick_device(args.device)
    tmp = Path(tempfile.mkdtemp(prefix="bench-loop-"))
    model_dir = tmp / "model_dir"
    model_dir.mkdir()
    ds = load_usr_personachat()
    config = strip_headers(ds.label_config) if args.synthetic_config else ds.label_config
    base = args.base
    if args.synthetic_config:
        base = str(synthetic_dir(args.synthetic_config, args.tokenizer, 0, device, tmp))
    from slm_annotator.worker.redis_conn import ensure_embedded, stop_embedded

    redis_url = ensure_embedded(model_dir)
    env = environment(args, model_dir, base, redis_url)
    os.environ.update(env)
    from slm_annotator.backend.app import create_app
    from slm_annotator.settings import load_settings
    from slm_annotator.store import Store

    settings = load_settings()
    worker = subprocess.Popen([sys.executable, "-m", "slm_annotator.cli", "worker"], env=env, cwd=ROOT)
    try:
        client = create_app(settings).test_client()
        setup = {"project": "1.1", "schema": config}
        base_version = client.post("/setup", json=setup).json["model_version"]
        events = label_events(args.labels, args.raters, config)
        probe = [{"id": e["task"]["id"], "data": e["task"]["data"]} for e in events[: args.predict_batch]]
        assert client.post("/predict", json={**setup, "tasks": probe}).status_code == 200  # base loaded, as in serve
        t_ingest = time.perf_counter()
        for event in events:
            reply = client.post("/webhook", json=event)
            assert reply.status_code == 200, reply.json
        t0, t0_wall = time.perf_counter(), datetime.now(UTC).replace(tzinfo=None)
        version = wait_served(client, setup, base_version, probe, args.timeout)
        t_served = time.perf_counter()
        run_row = Store(settings.database_url).runs("1")[-1]
        pickup = (run_row.started_at - t0_wall).total_seconds()
        finished = ((run_row.finished_at or run_row.started_at) - t0_wall).total_seconds()
        metrics = run_row.metrics or {}
    finally:
        worker.terminate()
        worker.wait(timeout=60)
        stop_embedded(model_dir)
    train = (metrics.get("train") or {})
    result = {
        "labels": args.labels, "raters_per_task": args.raters, "tasks": len({e["task"]["id"] for e in events}),
        "model": Path(base).name, "quantization": args.quantization, "device": str(device),
        "new_model_version": version, "run_status": run_row.status,
        "ingest_seconds": round(t0 - t_ingest, 2),
        "threshold_to_served_seconds": round(t_served - t0, 1),
        "job_started_after_seconds": round(pickup, 2), "run_finished_after_seconds": round(finished, 1),
        "run_wall_seconds": metrics.get("wall_seconds"), "train_seconds": train.get("seconds"),
        "train_tasks": train.get("tasks"), "train_steps": train.get("steps"),
        "train_samples_per_second": train.get("samples_per_second"), "heldout_tasks": metrics.get("heldout_tasks"),
        "recipe": {k: (metrics.get("config") or {}).get(k) for k in ("epochs", "lora_layers", "batch_size", "lr")},
        "promotion_tolerance": settings.promotion_tolerance,
        "machine": machine_info(device),
    }
    if device.type == "cuda":
        result["note"] = "peak GPU memory is the worker's (another process)"
    return result


def markdown(r: dict[str, Any]) -> str:
    m = r["machine"]
    return "\n".join([
        "| labels (tasks) | model | recipe | threshold -> served s | job started after s | run wall s "
        "| training s | samples/s | held-out tasks |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| {r['labels']} ({r['tasks']}) | {r['model']} {r['quantization']} | {json.dumps(r['recipe'])} "
        f"| {r['threshold_to_served_seconds']} | {r['job_started_after_seconds']} | {r['run_wall_seconds']} "
        f"| {r['train_seconds']} "
        f"| {r['train_samples_per_second']} | {r['heldout_tasks']} |",
        "",
        f"- {m.get('gpu') or m['cpu_model']}; torch {m['torch']}, transformers {m['transformers']}; {m['date']}",
    ])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--labels", type=int, default=2000)
    ap.add_argument("--raters", type=int, default=1, help="labels per task (1: every label is a new task)")
    ap.add_argument("--base", default="smollm2")
    ap.add_argument("--synthetic-config", default="", help="randomly initialised model of this size (GPU runs)")
    ap.add_argument("--tokenizer", default="", help="tokenizer for --synthetic-config")
    ap.add_argument("--quantization", default="nf4", choices=["nf4", "none"])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--max-tokens", type=int, default=1024)
    ap.add_argument("--predict-batch", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=None, help="TRAIN_EPOCHS (default: the product's)")
    ap.add_argument("--lora-layers", type=int, default=None, help="LORA_LAYERS (default: the product's)")
    ap.add_argument("--train-batch", type=int, default=None, help="TRAIN_BATCH_SIZE (default: the product's)")
    ap.add_argument("--promotion-tolerance", type=float, default=None,
                    help="PROMOTION_TOLERANCE (a random synthetic model's gate is a coin toss; 1 serves it)")
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "loop")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.manual_seed(0)
    result = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2, default=str))
    args.out.with_suffix(".md").write_text(markdown(result) + "\n")
    print(markdown(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
