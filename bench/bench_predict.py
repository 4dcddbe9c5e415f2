"""Prediction benchmark: the one-pass multi-dimension scorer against a plain forward pass and two baselines.

Runs unchanged on CPU and CUDA. For each quantization (one child process each, so peak RSS and load time
are per quantization) and each batch size it measures:

  product   the ModelServer path: PromptBuilder.encode + Scorer.distributions + decode + to_ls_result
  floor     one plain forward pass over the same prompts WITHOUT the answer tail, last-position logits only
            (logits_to_keep=1), same length-sorted batching; pre-tokenised, so pure model time
  base_a    one prompt per dimension (a PromptBuilder per single-dimension sub-rubric), each scored the
            product way: len(dimensions) prompts per task
  base_b    generate-and-parse: one free-text prompt asking for "Name: value" lines, greedy
            model.generate(max_new_tokens = 8 per dimension), regex parse; a task fails if any dimension
            is missing or out of range
  invalid   product result values outside the label config (must be 0)

Examples:
  MODEL_DIR=model_dir python -m bench.bench_predict                      # CPU: smollm2, nf4+none, batches 1,32
  python -m bench.bench_predict --synthetic-config tiny --n-tasks 8       # smoke test
  python -m bench.bench_predict --synthetic-config qwen3-1.7b --device cuda --batches 1,32,128
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import logging
import os
import platform
import random
import re
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from slm_annotator.model.devdata import load_usr_personachat
from slm_annotator.model.loader import load_base
from slm_annotator.model.prompt import PromptBuilder
from slm_annotator.model.results import to_ls_result
from slm_annotator.model.rubric import Rubric, parse_label_config
from slm_annotator.model.scorer import Scorer, decode
from slm_annotator.model.serving import decode_mode

ROOT = Path(__file__).resolve().parents[1]

log = logging.getLogger("bench_predict")

SYNTHETIC = {
    "qwen3-1.7b": dict(
        hidden_size=2048, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
        intermediate_size=6144, vocab_size=151936, head_dim=128, tie_word_embeddings=True,
        max_position_embeddings=4096,
    ),
    "tiny": dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, vocab_size=0, head_dim=16, tie_word_embeddings=True,
        max_position_embeddings=4096,
    ),
}


# ------------------------------------------------------------------------------------------------------
# helpers


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def cuda_peak_mb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def reset_cuda_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def machine_info(device: torch.device) -> dict[str, Any]:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import transformers

    info: dict[str, Any] = {
        "host": socket.gethostname(),
        "cpu_model": cpu,
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "device": str(device),
    }
    try:
        import bitsandbytes

        info["bitsandbytes"] = bitsandbytes.__version__
    except Exception:
        info["bitsandbytes"] = None
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def pick(items: list[Any], n: int) -> list[Any]:
    """n items spread evenly over the set (representative lengths), in a fixed order; repeated past its end."""
    if n > len(items):
        items = items * -(-n // len(items))
    step = len(items) / n
    return [items[int(i * step)] for i in range(n)]


def strip_headers(config: str) -> str:
    """The same controls without <Header> descriptions: a compact rubric for short synthetic prompts."""
    return re.sub(r"^\s*<Header value=\"[^\"]*\"/>\s*\n", "", config, flags=re.M)


def length_batches(lengths: list[int], batch: int) -> list[list[int]]:
    """Index chunks in the Scorer's order: sorted by length, then cut every `batch`."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[s : s + batch] for s in range(0, len(order), batch)]


def pad(seqs: list[list[int]], pad_id: int, device: torch.device, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        sl = slice(width - len(s), width) if left else slice(0, len(s))
        ids[r, sl] = torch.tensor(s, dtype=torch.long)
        mask[r, sl] = 1
    return ids.to(device), mask.to(device)


# ------------------------------------------------------------------------------------------------------
# the measured paths


def product_predict(builder: PromptBuilder, scorer: Scorer, tasks: list[dict[str, Any]], timings: dict[str, float]):
    """ModelServer.predict without adapters, stage by stage (timings accumulate seconds per stage)."""
    rubric = builder.rubric
    dev = scorer.device
    t0 = time.perf_counter()
    encoded = builder.encode_many([t.get("data") or {} for t in tasks])
    t1 = time.perf_counter()
    candidates = [space.token_ids for space in builder.spaces]
    dists = scorer.distributions(encoded, candidates)
    sync(dev)
    t2 = time.perf_counter()
    out = []
    for per_dim in dists:
        scores = [
            decode(dim.values, probs, decode_mode(dim.level, "argmax"))
            for dim, probs in zip(rubric.dimensions, per_dim, strict=True)
        ]
        out.append(to_ls_result(rubric, scores))
    t3 = time.perf_counter()
    timings["encode"] = timings.get("encode", 0.0) + t1 - t0
    timings["score"] = timings.get("score", 0.0) + t2 - t1
    timings["decode"] = timings.get("decode", 0.0) + t3 - t2
    return out, encoded


@torch.inference_mode()
def plain_forward(model: Any, seqs: list[list[int]], batch: int, pad_id: int, device: torch.device) -> None:
    """The floor: forward over pre-tokenised sequences, last-position logits only, left padding."""
    for chunk in length_batches([len(s) for s in seqs], batch):
        ids, mask = pad([seqs[i] for i in chunk], pad_id, device, left=True)
        out = model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=1)
        out.logits.float().argmax(-1).cpu()  # touch the result (forces a sync on CUDA)


def invalid_values(rubric: Rubric, result: list[dict[str, Any]]) -> int:
    """Result values that the label config does not allow, plus required controls left out."""
    bad = 0
    by_control: dict[str, list[Any]] = {}
    for dim in rubric.dimensions:
        by_control.setdefault(dim.control, []).append(dim)
    seen = set()
    for item in result:
        dims = by_control.get(item.get("from_name"))
        if not dims:
            bad += 1
            continue
        seen.add(item["from_name"])
        dim = dims[0]
        value = item.get("value") or {}
        if item.get("type") != dim.control_type or item.get("to_name") != dim.to_name:
            bad += 1
        elif dim.control_type == "choices":
            chosen = value.get("choices")
            allowed = {d.option for d in dims} if dim.is_option else set(dim.values)
            wrong_count = not dim.is_option and isinstance(chosen, list) and len(chosen) != 1
            if not isinstance(chosen, list) or not chosen or any(c not in allowed for c in chosen) or wrong_count:
                bad += 1
        else:
            raw = value.get(dim.control_type)
            if isinstance(raw, bool) or not isinstance(raw, int | float) or not any(
                float(raw) == float(v) for v in dim.values
            ):
                bad += 1
        score = item.get("score")
        if not isinstance(score, float | int) or not 0.0 <= score <= 1.0:
            bad += 1
    for control, dims in by_control.items():
        if control not in seen and not dims[0].is_option:
            bad += 1  # a single-valued control always gets an answer
    return bad


def baseline_a(builders: list[PromptBuilder], scorer: Scorer, tasks: list[dict[str, Any]]) -> int:
    """One prompt per dimension, scored the product way; returns the number of prompts."""
    n = 0
    for builder in builders:
        _results, encoded = product_predict(builder, scorer, tasks, {})
        n += len(encoded)
    return n


def free_text_ids(builder: PromptBuilder, data: dict[str, Any]) -> list[int]:
    """The seed code's way: the same context and rubric, then a request for "Name: value" lines."""
    rubric = builder.rubric
    order = [tuple(range(len(d.values))) for d in rubric.dimensions]
    texts = [(o.name, _object_text(o, data)) for o in rubric.objects]
    names = ", ".join(d.title for d in rubric.dimensions)
    message = builder._user_message(texts, order) + (
        f"\nReply with exactly one line per criterion in the form `Name: value`, using these names in "
        f"this order: {names}. Write nothing else."
    )
    return builder._prefix_ids(message)


def _object_text(obj: Any, data: dict[str, Any]) -> str:
    from slm_annotator.model.prompt import object_text

    return object_text(obj, data)


def parse_scores(rubric: Rubric, text: str) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for dim in rubric.dimensions:
        names = {dim.title, dim.key, dim.control, dim.key.replace("_", " ")}
        alt = "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))
        m = re.search(rf"(?im)^[\s\-*#]*\**(?:{alt})\**\s*[:=\-]\s*\**\s*([^\s,;*()]+)", text)
        value = None
        if m:
            raw = m.group(1).strip(".`'\"")
            if raw in dim.values:
                value = raw
            else:
                try:
                    x = float(raw)
                    value = next((v for v in dim.values if _num(v) == x), None)
                except ValueError:
                    value = None
        out[dim.key] = value
    return out


def _num(v: str) -> float | None:
    try:
        return float(v)
    except ValueError:
        return None


@torch.inference_mode()
def baseline_b(model: Any, tokenizer: Any, seqs: list[list[int]], batch: int, device: torch.device,
               max_new: int) -> tuple[list[str], int]:
    texts: list[str] = [""] * len(seqs)
    new_tokens = 0
    pad_id = tokenizer.pad_token_id
    for chunk in length_batches([len(s) for s in seqs], batch):
        ids, mask = pad([seqs[i] for i in chunk], pad_id, device, left=True)
        gen = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False,
            temperature=None, top_p=None, top_k=None, pad_token_id=pad_id,
        )
        tail = gen[:, ids.shape[1]:].cpu()
        for row, i in enumerate(chunk):
            toks = tail[row].tolist()
            if tokenizer.eos_token_id in toks:
                toks = toks[: toks.index(tokenizer.eos_token_id)]
            new_tokens += len(toks)
            texts[i] = tokenizer.decode(toks, skip_special_tokens=True)
    return texts, new_tokens


# ------------------------------------------------------------------------------------------------------
# synthetic model


def synthetic_dir(name: str, tokenizer_source: str, seed: int, device: torch.device, root: Path) -> Path:
    """A randomly initialised model of the named size with the SmolLM2 tokenizer, saved once (seeded)."""
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    target = root / f"synthetic-{name}-seed{seed}"
    if (target / "config.json").exists():
        return target
    tok = AutoTokenizer.from_pretrained(tokenizer_source)
    spec = dict(SYNTHETIC[name])
    spec["vocab_size"] = max(len(tok), spec["vocab_size"])
    cfg = Qwen3Config(
        **spec, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
    )
    torch.manual_seed(seed)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with torch.device(device):
        model = Qwen3ForCausalLM(cfg).to(dtype)
    tmp = Path(tempfile.mkdtemp(prefix=".synth-", dir=root))
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    del model
    os.replace(tmp, target)
    return target


# ------------------------------------------------------------------------------------------------------
# one quantization (child process)


def rounds(n: int, batch: int, wanted: int) -> int:
    """How many interleaved rounds: at most `wanted`, and never a round smaller than one batch."""
    return max(1, min(wanted, n // max(batch, 1)))


# Dense bf16 tensor-core peaks (no sparsity), TFLOP/s, from NVIDIA's data sheets; matched on the device name.
BF16_PEAK_TFLOPS = {"H100 80GB HBM3": 989.0, "H100 SXM": 989.0, "H100 NVL": 835.0, "H100 PCIe": 756.0,
                    "H200": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0}


def bf16_peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)


def prefill_flops(config: Any, lengths: list[int]) -> float:
    """Matmul FLOPs of one forward pass over these sequences: 2 x linear weights per token, plus causal
    attention (QK^T and AV) 2 x n^2 x heads x head_dim per layer; the output layer is left out (the floor
    reads one position, the product six rows)."""
    h, layers = config.hidden_size, config.num_hidden_layers
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    linear = h * heads * head_dim * 2 + h * kv * head_dim * 2 + 3 * h * config.intermediate_size
    return float(sum(2 * linear * layers * n + 2 * layers * heads * head_dim * n * n for n in lengths))


class Clock:
    """Wall and process-CPU seconds per method; methods run interleaved (ABC, CBA, ...) on task chunks so
    that load from other processes on a shared machine hits all of them alike."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    def interleave(self, methods: dict[str, Any], idx: list[int], n_rounds: int) -> None:
        size = -(-len(idx) // n_rounds)
        names = list(methods)
        for r, start in enumerate(range(0, len(idx), size)):
            chunk = idx[start : start + size]
            for name in names if r % 2 == 0 else names[::-1]:
                sync(self.device)
                w, c = time.perf_counter(), time.process_time()
                methods[name](chunk)
                sync(self.device)
                self.wall[name] = self.wall.get(name, 0.0) + time.perf_counter() - w
                self.cpu[name] = self.cpu.get(name, 0.0) + time.process_time() - c

    def summary(self, name: str, n: int, tokens: int | None = None) -> dict[str, float]:
        sec = self.wall[name]
        out = {"seconds": sec, "cpu_seconds": self.cpu[name], "tasks_per_s": n / sec, "ms_per_task": 1000 * sec / n}
        if tokens is not None:
            out["prompt_tokens_per_s"] = tokens / sec
        return out


def run_one(args: argparse.Namespace, quant: str, source: str) -> dict[str, Any]:
    model_dir = Path(os.environ.get("MODEL_DIR", ROOT / "model_dir"))
    base = load_base(source, model_dir, quant, args.device)
    device, model, tok = base.device, base.model, base.tokenizer
    rss_after_load = rss_mb()
    cuda_after_load = cuda_peak_mb(device)
    log.info("loaded %s %s on %s in %.1f s (RSS %.0f MB)", base.name, quant, device, base.load_seconds, rss_after_load)

    ds = load_usr_personachat()
    config = strip_headers(ds.label_config) if args.synthetic_config else ds.label_config
    rubric = parse_label_config(config)
    max_tokens = args.prompt_tokens if args.synthetic_config else args.max_tokens
    builder = PromptBuilder(tok, rubric, max_tokens)
    sub_builders = [PromptBuilder(tok, replace(rubric, dimensions=(d,)), max_tokens) for d in rubric.dimensions]
    tail_len = len(builder._answer_tail()[0])
    tasks = [{"data": it.data} for it in pick(ds.items, args.n_tasks)]
    btasks = [{"data": it.data} for it in pick(ds.items, args.n_baseline)]
    max_new = args.new_tokens_per_dim * len(rubric.dimensions)

    # tokenisation done once outside the timers for the floor and base_b (pure model time)
    enc_all = [builder.encode(t["data"]) for t in tasks]
    prompts = [e.input_ids[:-tail_len] for e in enc_all]
    full = [e.input_ids for e in enc_all]
    b_enc = [builder.encode(t["data"]) for t in btasks]
    free_ids = [free_text_ids(builder, t["data"]) for t in btasks]
    if args.synthetic_config:  # keep the free-text prompt the same length as the scored one
        free_ids = [f[: len(e.input_ids) - tail_len] for f, e in zip(free_ids, b_enc, strict=True)]
    mean_full = statistics.mean(len(s) for s in full)
    mean_prompt = statistics.mean(len(s) for s in prompts)
    sub_lens = [len(b.encode(btasks[0]["data"]).input_ids) for b in sub_builders]

    rows = []
    for batch in args.batch_list:
        scorer = Scorer(model, tok, device, batch)
        nwarm = args.warmup_tasks or batch
        reset_cuda_peak(device)
        row: dict[str, Any] = {"quant": quant, "batch": batch, "n_tasks": len(tasks), "n_baseline": len(btasks),
                               "loadavg_start": os.getloadavg()}
        clock = Clock(device)
        stages: dict[str, float] = {}
        results: list[Any] = []
        idx = list(range(len(tasks)))

        def product(ix: list[int], tk: list[dict[str, Any]] = tasks, st: dict[str, float] = stages) -> None:
            results.extend(product_predict(builder, scorer, [tk[i] for i in ix], st)[0])

        def floor(ix: list[int]) -> None:
            plain_forward(model, [prompts[i] for i in ix], batch, tok.pad_token_id, device)

        def floor_tail(ix: list[int]) -> None:
            plain_forward(model, [full[i] for i in ix], batch, tok.pad_token_id, device)

        # warm up once, then 1., 2. (and the floor incl. tail) interleaved round by round
        product(idx[:nwarm], st={})
        floor(idx[:nwarm])
        results.clear()
        methods = {"product": product, "floor": floor}
        if args.profile:
            methods["floor_with_tail"] = floor_tail
        clock.interleave(methods, idx, rounds(len(idx), batch, args.rounds))
        n = len(tasks)
        row["product"] = clock.summary("product", n, sum(len(s) for s in full))
        row["product"]["stage_ms_per_task"] = {k: 1000 * v / n for k, v in stages.items()}
        row["floor"] = clock.summary("floor", n, sum(len(s) for s in prompts))
        if args.profile:
            row["floor_with_tail"] = clock.summary("floor_with_tail", n, sum(len(s) for s in full))
        row["product_over_floor"] = clock.wall["product"] / clock.wall["floor"]
        peak = bf16_peak_tflops(device)
        for name, seqs in (("floor", prompts), ("product", full)):
            tflops = prefill_flops(model.config, [len(x) for x in seqs]) / clock.wall[name] / 1e12
            row[name]["tflops"] = tflops
            row[name]["fraction_of_bf16_peak"] = tflops / peak if peak else None
        row["product_over_floor_cpu"] = clock.cpu["product"] / clock.cpu["floor"]
        # 5. invalid outputs
        row["invalid_values"] = sum(invalid_values(rubric, r) for r, _score in results)
        row["score_range_ok"] = len(results) == n and all(0.0 <= s <= 1.0 for _r, s in results)

        if not args.skip_baselines:
            bidx = list(range(len(btasks)))
            texts: list[str] = [""] * len(btasks)
            new_tokens = [0]

            def product_b(ix: list[int]) -> None:
                product_predict(builder, scorer, [btasks[i] for i in ix], {})

            def base_a(ix: list[int]) -> None:  # 3. one prompt per dimension
                baseline_a(sub_builders, scorer, [btasks[i] for i in ix])

            def base_b(ix: list[int]) -> None:  # 4. generate, then parse
                out, k = baseline_b(model, tok, [free_ids[i] for i in ix], batch, device, max_new)
                for i, t in zip(ix, out, strict=True):
                    texts[i] = t
                new_tokens[0] += k
                for t in out:
                    parse_scores(rubric, t)

            product_b(bidx[:1])
            base_a(bidx[: min(nwarm, len(bidx))])
            base_b(bidx[: min(nwarm, len(bidx))])
            new_tokens[0] = 0
            bclock = Clock(device)
            bclock.interleave({"product": product_b, "base_a": base_a, "base_b": base_b}, bidx,
                              rounds(len(bidx), batch, args.rounds))
            nb = len(btasks)
            row["product_on_baseline_tasks"] = bclock.summary("product", nb)
            row["baseline_a"] = bclock.summary("base_a", nb)
            row["baseline_a"]["prompts"] = nb * len(sub_builders)
            row["baseline_a"]["over_product"] = bclock.wall["base_a"] / bclock.wall["product"]
            row["baseline_a"]["over_product_cpu"] = bclock.cpu["base_a"] / bclock.cpu["product"]
            parsed = [parse_scores(rubric, t) for t in texts]
            fails = sum(1 for p in parsed if any(v is None for v in p.values()))
            row["baseline_b"] = bclock.summary("base_b", nb)
            row["baseline_b"].update({
                "parse_failures": fails, "parse_failure_rate": fails / nb,
                "mean_new_tokens": new_tokens[0] / nb, "max_new_tokens": max_new,
                "mean_prompt_tokens": statistics.mean(len(s) for s in free_ids),
                "over_product": bclock.wall["base_b"] / bclock.wall["product"],
                "over_product_cpu": bclock.cpu["base_b"] / bclock.cpu["product"],
                "sample_output": texts[0][:300],
            })
        row["loadavg_end"] = os.getloadavg()  # other processes on the machine skew CPU timings
        row["peak_rss_mb"] = rss_mb()
        row["cuda_peak_mb"] = cuda_peak_mb(device)
        rows.append(row)
        log.info("%s", json.dumps({k: v for k, v in row.items() if k != "baseline_b"}, default=str)[:600])
        gc.collect()

    return {
        "quant": quant,
        "model": base.name,
        "load_seconds": base.load_seconds,
        "rss_after_load_mb": rss_after_load,
        "cuda_after_load_mb": cuda_after_load,
        "mean_prompt_tokens": mean_prompt,
        "mean_tokens_with_tail": mean_full,
        "tail_tokens": tail_len,
        "baseline_a_prompt_tokens_task0": sub_lens,
        "baseline_tasks_mean_tokens_with_tail": statistics.mean(len(e.input_ids) for e in b_enc),
        "dimensions": [d.key for d in rubric.dimensions],
        "rows": rows,
    }


# ------------------------------------------------------------------------------------------------------
# report


def fmt(x: Any, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def ratio(wall: float | None, cpu: float | None) -> str:
    return "-" if wall is None else f"{wall:.2f} ({cpu:.2f})"


def table(results: list[dict[str, Any]]) -> str:
    head = (
        "| quant | batch | product tasks/s | product ms/task | prompt tok/s | floor ms/task | product/floor "
        "| base a ms/task | a/product | base b tasks/s | b/product | b parse fail | invalid | peak RSS MB "
        "| CUDA peak MB | load s | floor TFLOP/s (% bf16 peak) | product TFLOP/s (%) |"
    )
    lines = [head, "|" + "|".join(["---"] * 18) + "|"]
    for res in results:
        for r in res["rows"]:
            a, b = r.get("baseline_a"), r.get("baseline_b")
            lines.append(
                "| " + " | ".join([
                    res["quant"], str(r["batch"]),
                    fmt(r["product"]["tasks_per_s"], ".2f"), fmt(r["product"]["ms_per_task"], ".0f"),
                    fmt(r["product"]["prompt_tokens_per_s"], ".0f"), fmt(r["floor"]["ms_per_task"], ".0f"),
                    ratio(r["product_over_floor"], r["product_over_floor_cpu"]),
                    fmt(a and a["ms_per_task"], ".0f"), ratio(a and a["over_product"], a and a["over_product_cpu"]),
                    fmt(b and b["tasks_per_s"], ".2f"), ratio(b and b["over_product"], b and b["over_product_cpu"]),
                    "-" if not b else f"{b['parse_failures']}/{r['n_baseline']}",
                    str(r["invalid_values"]), fmt(r["peak_rss_mb"], ".0f"), fmt(r["cuda_peak_mb"], ".0f"),
                    fmt(res["load_seconds"], ".1f"), _tflops(r["floor"]), _tflops(r["product"]),
                ]) + " |"
            )
    lines.append("")
    lines.append("Ratios: wall-clock (process CPU time in brackets). ms/task and tasks/s are wall-clock.")
    return "\n".join(lines)


def _tflops(entry: dict[str, Any]) -> str:
    if "tflops" not in entry:
        return "-"
    frac = entry.get("fraction_of_bf16_peak")
    return f"{entry['tflops']:.1f}" + (f" ({100 * frac:.0f}%)" if frac else "")


def notes(results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    out = []
    for res in results:
        out.append(
            f"- {res['model']} {res['quant']}: mean prompt {res['mean_prompt_tokens']:.0f} tokens "
            f"(+{res['tail_tokens']} answer-tail tokens = {res['mean_tokens_with_tail']:.0f}); baseline tasks "
            f"{res['baseline_tasks_mean_tokens_with_tail']:.0f} tokens; per-dimension prompts (task 0) "
            f"{res['baseline_a_prompt_tokens_task0']}"
        )
        for r in res["rows"]:
            st = r["product"]["stage_ms_per_task"]
            extra = ""
            la = f" (load avg {r['loadavg_start'][0]:.1f} -> {r['loadavg_end'][0]:.1f})"
            if "floor_with_tail" in r:
                extra = f", floor incl. tail {r['floor_with_tail']['ms_per_task']:.1f}"
            if "product_on_baseline_tasks" in r:
                extra += f", product on baseline tasks {r['product_on_baseline_tasks']['ms_per_task']:.1f}"
            out.append(
                f"  - batch {r['batch']}: ms/task encode {st['encode']:.2f}, score {st['score']:.1f}, "
                f"decode+result {st['decode']:.2f}{extra}{la}"
            )
    m = meta
    out.append(
        f"- {m['cpu_model']} x{m['cpu_cores']} ({m['torch_threads']} threads)"
        + (f", {m['gpu']}" if m.get("gpu") else "")
        + f"; torch {m['torch']}, transformers {m['transformers']}, bitsandbytes {m['bitsandbytes']}; {m['date']}"
    )
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--quant", default="both", choices=["nf4", "none", "both"])
    p.add_argument("--base", default="smollm2", help="smollm2, a local path or an HF id")
    p.add_argument("--synthetic-config", choices=sorted(SYNTHETIC), default=None,
                   help="random weights of this size with the SmolLM2 tokenizer (--base gives the tokenizer)")
    p.add_argument("--tokenizer", default=None,
                   help="synthetic: tokenizer dir (default: that of --base, e.g. the converted SmolLM2)")
    p.add_argument("--prompt-tokens", type=int, default=256, help="synthetic: prompt length budget")
    p.add_argument("--max-tokens", type=int, default=1024, help="PromptBuilder max_tokens (real model)")
    p.add_argument("--batches", default="1,32")
    p.add_argument("--n-tasks", type=int, default=None, help="product and floor (default: cpu 32, cuda 512)")
    p.add_argument("--n-baseline", type=int, default=None, help="baselines a, b (default: cpu 8, cuda 128)")
    p.add_argument("--new-tokens-per-dim", type=int, default=8)
    p.add_argument("--warmup-tasks", type=int, default=None,
                   help="tasks in each warm-up call (default: cpu 2, cuda one full batch)")
    p.add_argument("--profile", action="store_true", help="also time the plain forward pass incl. the answer tail")
    p.add_argument("--skip-baselines", action="store_true")
    p.add_argument("--rounds", type=int, default=4, help="interleaved rounds per measurement (shared machines)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="default bench/results/predict-<host>.json")
    p.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--source", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.batch_list = [int(b) for b in args.batches.split(",") if b.strip()]
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if args.n_tasks is None:
        args.n_tasks = 512 if cuda else 32
    if args.n_baseline is None:
        args.n_baseline = 128 if cuda else 8
    if args.warmup_tasks is None and not cuda:
        args.warmup_tasks = 2
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    args = parse_args(argv)
    random.seed(args.seed)
    torch.manual_seed(args.seed)

    if args.child_out:  # one quantization in this process
        res = run_one(args, args.quant, args.source or args.base)
        Path(args.child_out).write_text(json.dumps(res, default=str))
        return 0

    from slm_annotator.model.loader import pick_device, resolve_base

    device = pick_device(args.device)
    model_dir = Path(os.environ.get("MODEL_DIR", ROOT / "model_dir"))
    tok_source = args.tokenizer or (resolve_base(args.base, model_dir)[0] if args.synthetic_config else None)
    source = args.base
    if args.synthetic_config:
        root = model_dir / "bench"
        root.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        source = str(synthetic_dir(args.synthetic_config, tok_source, args.seed, device, root))
        log.info("synthetic model %s at %s (%.1f s)", args.synthetic_config, source, time.perf_counter() - t)
    quants = ["nf4", "none"] if args.quant == "both" else [args.quant]
    results = []
    passthrough = [a for a in (argv if argv is not None else sys.argv[1:])]
    for q in quants:
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as fh:
            child_out = fh.name
        cmd = [sys.executable, "-m", "bench.bench_predict", *passthrough, "--quant", q,
               "--child-out", child_out, "--source", source]
        log.info("running %s", " ".join(cmd[3:]))
        t = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT)
        if proc.returncode != 0:
            log.error("quantization %s failed (exit %s)", q, proc.returncode)
            continue
        res = json.loads(Path(child_out).read_text())
        res["wall_seconds"] = time.perf_counter() - t
        os.unlink(child_out)
        results.append(res)

    meta = machine_info(device)
    meta["args"] = {k: v for k, v in vars(args).items() if k not in ("child_out", "source")}
    meta["model_source"] = source
    md = table(results) + "\n\n" + notes(results, meta)
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"predict-{socket.gethostname()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": meta, "results": results, "table": md}, indent=2, default=str))
    out.with_suffix(".md").write_text(md + "\n")
    print(md)
    print(f"\nwrote {out} and {out.with_suffix('.md')}")
    return 0 if len(results) == len(quants) else 1


if __name__ == "__main__":
    raise SystemExit(main())
