"""Training benchmark: the product's trainer against a naive full-sequence-loss LoRA trainer, same data.

Both train LoRA (r=16, alpha=32, all attention and MLP projections unless --lora-layers says otherwise) on
the same base (NF4 by default) with AdamW, batch 8 (--batch-size), on USR-PersonaChat tasks (6 dimensions, 3 raters):

  product   model.training.train_adapter: one sequence per task carrying every dimension, soft targets
            from all its raters, logits only at the answer positions and only for the allowed values,
            micro-batches of TRAIN_MICRO_BATCH (default: 2 on CPU, the whole batch on CUDA)
  naive     the seed code's way: one sequence per (task, rater) with the answer written as text
            ("Understandable: 1\\n..."), the standard causal-LM loss over the whole sequence (full-vocabulary
            logits at every position), the whole batch in one forward/backward

Each trainer runs in its own child process (peak RSS is per trainer), for --steps timed steps after one
warm-up step. Throughput is counted in annotations (one rater's labels of one task, all dimensions) per
second, and in sequences and prompt tokens per second.

  MODEL_DIR=model_dir python -m bench.bench_train                 # CPU: smollm2 nf4, product vs naive
  python -m bench.bench_train --synthetic-config qwen3-1.7b --device cuda --max-tokens 256
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import resource
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from bench.bench_predict import cuda_peak_mb, machine_info, reset_cuda_peak, synthetic_dir
from slm_annotator.model.dataset import Example
from slm_annotator.model.experiment import load_devset, split_devset
from slm_annotator.model.loader import load_base, pick_device, resolve_base
from slm_annotator.model.prompt import PromptBuilder
from slm_annotator.model.rubric import parse_label_config
from slm_annotator.model.training import TrainConfig, attach_lora, train_adapter

ROOT = Path(__file__).resolve().parents[1]

log = logging.getLogger("bench_train")


def usr_examples() -> tuple[Any, list[Example]]:
    """The USR training split of the experiment command (fixed by context, seed 0)."""
    ds = load_devset("usr")
    return parse_label_config(ds.label_config), split_devset(ds, 1 / 3, 0).train


def run_product(base: Any, rubric: Any, examples: list[Example], args: argparse.Namespace) -> dict[str, Any]:
    bs = args.batch_size
    cfg = TrainConfig(epochs=1, batch_size=bs, micro_batch_size=args.micro_batch, lora_layers=args.lora_layers,
                      max_tokens=args.max_tokens, augment=True, seed=0, lora_dropout=args.lora_dropout,
                      targets=tuple(args.lora_targets.split(",")))
    stamps: list[float] = []
    n = bs * (args.steps + 1)

    def tick(_update: dict[str, Any]) -> None:
        sync(base.device)
        stamps.append(time.perf_counter())
        if args.profile and len(stamps) == 2:
            prof.start()

    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if base.device.type == "cuda" else [])
    prof = profile(activities=activities)
    train_adapter(base.model, base.tokenizer, rubric, examples[:n], cfg, base.device, progress=tick)
    if args.profile:
        prof.stop()
        key = "cuda_time_total" if base.device.type == "cuda" else "cpu_time_total"
        print(prof.key_averages().table(sort_by=key, row_limit=25), file=sys.stderr)
    builder = PromptBuilder(base.tokenizer, rubric, args.max_tokens)
    timed = examples[bs:n]
    return {
        "seconds": stamps[-1] - stamps[0],
        "sequences": len(timed),
        "annotations": sum(len(e.ratings) for e in timed),
        "tokens": sum(len(builder.encode(e.data).input_ids) for e in timed),
    }


def naive_sequences(tokenizer: Any, rubric: Any, examples: list[Example], max_tokens: int) -> list[list[int]]:
    """Prompt (the product's, without the answer slots) + one rater's answers as text, as the seed code does."""
    builder = PromptBuilder(tokenizer, rubric, max_tokens)
    seqs = []
    for ex in examples:
        enc = builder.encode(ex.data)
        prompt = enc.input_ids[: enc.prefix_len]
        for rating in ex.ratings.values():
            answer = "\n".join(f"{d.title}: {rating.get(d.key, '?')}" for d in rubric.dimensions)
            seqs.append(prompt + tokenizer.encode(answer + "<|im_end|>", add_special_tokens=False))
    return seqs


def run_naive(base: Any, rubric: Any, examples: list[Example], args: argparse.Namespace) -> dict[str, Any]:
    cfg = TrainConfig(lora_layers=args.lora_layers)
    model = attach_lora(base.model, cfg, None)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr)
    seqs = naive_sequences(base.tokenizer, rubric, examples, args.max_tokens)
    random.Random(0).shuffle(seqs)
    pad = base.tokenizer.pad_token_id
    stamps = []
    for step in range(args.steps + 1):
        batch = seqs[step * args.batch_size : (step + 1) * args.batch_size]
        width = max(len(s) for s in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(batch):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
        labels = ids.masked_fill(mask == 0, -100)
        out = model(input_ids=ids.to(base.device), attention_mask=mask.to(base.device), labels=labels.to(base.device))
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sync(base.device)
        stamps.append(time.perf_counter())
    timed = seqs[args.batch_size : args.batch_size * (args.steps + 1)]
    return {"seconds": stamps[-1] - stamps[0], "sequences": len(timed), "annotations": len(timed),
            "tokens": sum(len(s) for s in timed)}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def child(args: argparse.Namespace) -> dict[str, Any]:
    device = pick_device(args.device)
    rubric, examples = usr_examples()
    source = args.base_model
    args.model_dir.mkdir(parents=True, exist_ok=True)
    if args.synthetic_config:
        tok_source, _ = resolve_base(args.tokenizer_from, args.model_dir)
        source = str(synthetic_dir(args.synthetic_config, tok_source, 0, device, args.model_dir))
    base = load_base(source, args.model_dir, args.quantization, args.device)
    reset_cuda_peak(device)
    result = (run_product if args.trainer == "product" else run_naive)(base, rubric, examples, args)
    result.update({
        "trainer": args.trainer, "quantization": args.quantization, "lora_layers": args.lora_layers,
        "micro_batch": args.micro_batch if args.trainer == "product" else args.batch_size, "steps": args.steps,
        "lora_dropout": args.lora_dropout, "lora_targets": args.lora_targets,
        "batch_size": args.batch_size,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_gpu_mb": cuda_peak_mb(device), "machine": machine_info(device),
    })
    for unit in ("annotations", "sequences", "tokens"):
        result[f"{unit}_per_s"] = result[unit] / result["seconds"]
    return result


def table(rows: list[dict[str, Any]]) -> str:
    naive = next((r for r in rows if r["trainer"] == "naive"), None)
    lines = ["| trainer | quant | batch | LoRA layers (targets, dropout) | s/step | annotations/s | sequences/s "
             "| prompt tok/s | peak RSS MB "
             "| peak GPU MB | vs naive |", "|" + "---|" * 11]
    for r in rows:
        step = r["seconds"] / r["steps"]
        speed = f"{r['annotations_per_s'] / naive['annotations_per_s']:.2f}x" if naive else "-"
        gpu = f"{r['peak_gpu_mb']:.0f}" if r.get("peak_gpu_mb") else "-"
        lora = f"{r['lora_layers'] or 'all'} ({_targets(r.get('lora_targets'))}, {r.get('lora_dropout', 0.05)})"
        lines.append(f"| {r['trainer']} | {r['quantization']} | {r.get('batch_size', 8)} | {lora} | {step:.2f} "
                     f"| {r['annotations_per_s']:.2f} | {r['sequences_per_s']:.2f} | {r['tokens_per_s']:.0f} "
                     f"| {r['peak_rss_mb']:.0f} | {gpu} | {speed} |")
    return "\n".join(lines)


def _targets(targets: str | None) -> str:
    names = (targets or ",".join(TrainConfig.targets)).split(",")
    return "all 7 projections" if set(names) == set(TrainConfig.targets) else "+".join(names)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trainer", choices=["product", "naive"], help="(internal) run one trainer in this process")
    ap.add_argument("--runs", default="naive:0,product:0,product:10",
                    help="trainer:lora_layers pairs to run, each in its own process")
    ap.add_argument("--lora-layers", type=int, default=0)
    ap.add_argument("--micro-batch", type=int, default=0, help="0: the product's default (CPU 2, CUDA whole batch)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lora-dropout", type=float, default=TrainConfig.lora_dropout)
    ap.add_argument("--lora-targets", default=",".join(TrainConfig.targets))
    ap.add_argument("--profile", action="store_true", help="torch profiler over the timed steps (to stderr)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=512)
    ap.add_argument("--quantization", default="nf4", choices=["nf4", "none"])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--base-model", default="smollm2")
    ap.add_argument("--synthetic-config", default="", help="randomly initialised model of this size (GPU runs)")
    ap.add_argument("--tokenizer-from", default="smollm2")
    ap.add_argument("--model-dir", type=Path, default=Path(os.environ.get("MODEL_DIR", ROOT / "model_dir")))
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "train-vm")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING)
    if args.trainer:
        print("RESULT " + json.dumps(child(args)), flush=True)
        return 0
    rows: list[dict[str, Any]] = []
    failures: list[str] = []
    for spec in args.runs.split(","):
        trainer, layers = spec.split(":")
        cmd = [sys.executable, "-m", "bench.bench_train", "--trainer", trainer, "--lora-layers", layers,
               "--micro-batch", str(args.micro_batch), "--steps", str(args.steps), "--batch-size", str(args.batch_size),
               "--max-tokens", str(args.max_tokens), "--quantization", args.quantization, "--device", args.device,
               "--base-model", args.base_model, "--synthetic-config", args.synthetic_config,
               "--tokenizer-from", args.tokenizer_from, "--model-dir", str(args.model_dir),
               "--lora-dropout", str(args.lora_dropout), "--lora-targets", args.lora_targets]
        cmd += ["--profile"] if args.profile else []
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if args.profile:
            print(done.stderr[-12000:], file=sys.stderr)
        found = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
        if done.returncode != 0 or not found:
            why = "killed (SIGKILL: out of memory?)" if done.returncode == -9 else f"failed (rc {done.returncode})"
            print(f"{spec} {why}: {done.stderr[-2000:]}", file=sys.stderr)
            failures.append(f"{trainer} (LoRA layers {layers or 'all'}): {why}")
            continue
        rows.append(json.loads(found[-1][7:]))
        print(table(rows).splitlines()[-1], flush=True)
    md = table(rows)
    print(md)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=2))
    meta = rows[0]["machine"] if rows else {}
    args.out.with_suffix(".md").write_text(
        f"# Training throughput\n\n{meta.get('cpu_model', '')} ({meta.get('cpu_cores')} cores), "
        f"{meta.get('device')}, torch {meta.get('torch')}, {meta.get('date')}; "
        f"USR-PersonaChat, batch {args.batch_size}, "
        f"prompts up to {args.max_tokens} tokens, {args.steps} timed steps.\n\n{md}\n"
        + "".join(f"\n- {f}" for f in failures) + ("\n" if failures else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
