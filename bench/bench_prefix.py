"""Shared-prefix KV reuse benchmark: Scorer.distributions with and without reuse on the real SmolLM2-135M.

USR rubric and data (model/devdata.py via SLM_SHARED_DATA), on the CPU. Per prompt template and batch size:

  plain   reuse off: one pass over every task's whole prompt (the path before this change)
  reuse   reuse on, a fresh prefix cache per call: the shared prefix runs once per call, then only suffixes
  warm    reuse on, the prefix already cached by an earlier call (what a served adapter sees after its first call)
  forced  texts-first templates only: the reuse rule switched off (MIN_SAVED_SHARE = 0, MIN_PREFIX_TOKENS = 1),
          to show what their short shared prefix would give (warm is left out there: the rule rejects their
          prefix, cached or not, so it would run the plain path)

Modes are interleaved per round (the machine is shared) and the fastest round is reported.

  SLM_SHARED_DATA=/work/shared/data MODEL_DIR=/tmp/models python -m bench.bench_prefix
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import slm_annotator.model.prefix as prefix_rule
from slm_annotator.model.experiment import load_devset
from slm_annotator.model.loader import load_base
from slm_annotator.model.prefix import PrefixCache
from slm_annotator.model.prompt import Encoded, PromptBuilder
from slm_annotator.model.rubric import parse_label_config
from slm_annotator.model.scorer import Scorer

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE_NAMES = {0: "texts first (default)", 1: "rubric first"}


def machine() -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "")
    import transformers

    return {"cpu_model": cpu, "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "loadavg_start": os.getloadavg()}


def shared_prefix(encoded: list[Encoded]) -> int:
    cap = min(min(e.read_positions) for e in encoded)
    return prefix_rule.shared_length([e.input_ids for e in encoded], cap)


class Rule:
    """Sets the reuse rule's thresholds for one mode (forced) and restores them."""

    def __init__(self, forced: bool) -> None:
        self.forced = forced
        self.saved = (prefix_rule.MIN_PREFIX_TOKENS, prefix_rule.MIN_SAVED_SHARE)

    def __enter__(self) -> None:
        if self.forced:
            prefix_rule.MIN_PREFIX_TOKENS, prefix_rule.MIN_SAVED_SHARE = 1, 0.0

    def __exit__(self, *exc: object) -> None:
        prefix_rule.MIN_PREFIX_TOKENS, prefix_rule.MIN_SAVED_SHARE = self.saved


def mode_runner(base: Any, encoded: list[Encoded], cands: Any, batch: int, mode: str) -> Callable[[], Any]:
    """A call that scores all tasks in the given mode; returns (seconds, distributions, stats)."""
    warm_cache = PrefixCache()
    if mode == "warm":  # an earlier call of two tasks left the shared prefix in the cache
        Scorer(base.model, base.tokenizer, base.device, 2, prefixes=warm_cache).distributions(encoded[:2], cands)

    def run() -> tuple[float, Any, Any]:
        cache = warm_cache if mode == "warm" else PrefixCache()
        scorer = Scorer(base.model, base.tokenizer, base.device, batch, reuse=mode != "plain", prefixes=cache)
        with Rule(mode == "forced"):
            start, cpu = time.perf_counter(), time.process_time()
            dists = scorer.distributions(encoded, cands)
            seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        return seconds, cpu, dists, scorer.stats

    return run


def max_diff(a: Any, b: Any) -> float:
    return max(float((x - y).abs().max()) for ta, tb in zip(a, b, strict=True) for x, y in zip(ta, tb, strict=True))


def bench_one(base: Any, encoded: list[Encoded], cands: Any, batch: int, modes: list[str],
              rounds: int) -> list[dict[str, Any]]:
    runners = {m: mode_runner(base, encoded, cands, batch, m) for m in modes}
    times: dict[str, list[float]] = {m: [] for m in modes}
    cpus: dict[str, list[float]] = {m: [] for m in modes}
    last: dict[str, Any] = {}
    for _ in range(rounds):
        for m in modes:
            seconds, cpu, dists, stats = runners[m]()
            times[m].append(seconds)
            cpus[m].append(cpu)
            last[m] = (dists, stats)
    n = len(encoded)
    plain_best, plain_cpu = min(times["plain"]), min(cpus["plain"])
    rows = []
    for m in modes:
        best = min(times[m])
        stats = last[m][1]
        ran = stats.batch_tokens + stats.prefix_tokens
        rows.append({"mode": m, "batch": batch, "n_tasks": n, "seconds": times[m], "best_s": best,
                     "tasks_per_s": n / best, "ms_per_task": 1000 * best / n, "speedup": plain_best / best,
                     "cpu_s": cpus[m], "cpu_ms_per_task": 1000 * min(cpus[m]) / n,
                     "cpu_speedup": plain_cpu / min(cpus[m]),
                     "reuse_batches": stats.reuse_batches, "plain_batches": stats.plain_batches,
                     "prefix_runs": stats.prefix_runs, "tokens_run_per_task": ran / n,
                     "max_abs_diff_vs_plain": max_diff(last["plain"][0], last[m][0])})
    return rows


def template_tokens(encoded: list[Encoded]) -> dict[str, float]:
    lengths = [len(e.input_ids) for e in encoded]
    shared = shared_prefix(encoded)
    return {"prompt_tokens_mean": statistics.mean(lengths), "prompt_tokens_min": min(lengths),
            "prompt_tokens_max": max(lengths), "shared_prefix_tokens": shared,
            "suffix_tokens_mean": statistics.mean(lengths) - shared,
            "prefix_share": shared / statistics.mean(lengths)}


def markdown(meta: dict[str, Any], results: list[dict[str, Any]]) -> str:
    lines = [
        "# Shared-prefix KV reuse, CPU",
        "",
        f"SmolLM2-135M-Instruct fp32 (the offline base), USR rubric ({meta['n_tasks']} tasks of the USR dev set), "
        f"`python -m bench.bench_prefix`. Machine: {meta['machine']['cpu_model']}, "
        f"{meta['machine']['cpu_cores']} cores shared with other jobs (load average at start "
        f"{meta['machine']['loadavg_start'][0]:.1f}), torch {meta['machine']['torch']}, transformers "
        f"{meta['machine']['transformers']}. Fastest of {meta['rounds']} interleaved rounds.",
        "",
        "| template | prompt tok/task | shared prefix | suffix tok/task | batch | mode | tokens run/task | tasks/s "
        "| ms/task | speedup | CPU ms/task | CPU speedup | max abs diff |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for t in results:
        tok = t["tokens"]
        for r in t["rows"]:
            lines.append(
                f"| {t['template']} {TEMPLATE_NAMES.get(t['template'], '')} | {tok['prompt_tokens_mean']:.0f} "
                f"| {tok['shared_prefix_tokens']} ({100 * tok['prefix_share']:.0f}%) | {tok['suffix_tokens_mean']:.0f} "
                f"| {r['batch']} | {r['mode']} | {r['tokens_run_per_task']:.0f} | {r['tasks_per_s']:.2f} "
                f"| {r['ms_per_task']:.0f} | {r['speedup']:.2f}x | {r['cpu_ms_per_task']:.0f} "
                f"| {r['cpu_speedup']:.2f}x | {r['max_abs_diff_vs_plain']:.1e} |")
    lines += ["", "tokens run/task: padded tokens of the batched passes plus the batch-1 prefix passes, per task. "
              "CPU ms/task: the process's CPU time, less sensitive than wall time to the other jobs on the cores.",
              ""]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="smollm2")
    p.add_argument("--n-tasks", type=int, default=32)
    p.add_argument("--batches", default="8,32")
    p.add_argument("--templates", default="0,1")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=1024)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "prefix" / "cpu-2core"))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    model_dir = Path(os.environ.get("MODEL_DIR", ROOT / "model_dir"))
    base = load_base(args.base, model_dir, "none", "cpu")
    ds = load_devset("usr")
    rubric = parse_label_config(ds.label_config)
    datas = [it.data for it in ds.items[: args.n_tasks]]
    meta = {"machine": machine(), "base": base.name, "n_tasks": len(datas), "rounds": args.rounds,
            "rule": {"MIN_PREFIX_TOKENS": prefix_rule.MIN_PREFIX_TOKENS,
                     "MIN_SAVED_SHARE": prefix_rule.MIN_SAVED_SHARE}}
    results = []
    for template in (int(t) for t in args.templates.split(",")):
        builder = PromptBuilder(base.tokenizer, rubric, args.max_tokens, template)
        encoded = builder.encode_many(datas)
        cands = [s.token_ids for s in builder.spaces]
        # texts first: the rule rejects its short prefix, so warm runs the plain path too; forced shows the price
        modes = ["plain", "reuse", "forced"] if template % 2 == 0 else ["plain", "reuse", "warm"]
        rows = []
        for batch in (int(b) for b in args.batches.split(",")):
            rows += bench_one(base, encoded, cands, batch, modes, args.rounds)
            print(json.dumps(rows[-len(modes):]), flush=True)
        results.append({"template": template, "tokens": template_tokens(encoded), "rows": rows})
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(meta, results))
    print(markdown(meta, results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
