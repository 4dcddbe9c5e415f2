"""Rater weighting benchmark: does weighting each rater's vote by a Dawid-Skene reliability help the model?

For every dev set with several raters per item (bench_recipes' splits: USR, SummEval, the four LeWiDi sets;
GoEmotions has gold labels only), several seeds, four conditions of the TRAINING labels:

  clean           the raters as they are
  careless        on every training task one rater is replaced by a synthetic careless one who answers uniformly
                  at random on each dimension: the task's first rater in a seed-fixed order, so on a fixed panel
                  (USR, SummEval, HS-Brexit, ArMIS) one real rater's labels are all replaced, and on a pool
                  (MD-Agreement, ConvAbuse) the careless rater takes one seat on every task
  careless-third  the same on a third of the tasks
  biased          the replaced rater's own value one step up the scale (clipped; on yes/no: always the second)

and for each learner, weighting off vs ``dawid_skene`` (model.reliability, what a project's
``training.rater_weighting`` turns on). Test labels are never touched: every cell is alpha against the REAL
raters (mean over raters, bench_recipes.score), next to the baselines measured in the same run: the majority
value and, with --base, the untrained SLM zero-shot. Learners: the embedding head (always) and, with --adapter,
the product's QLoRA adapter (TrainConfig of the settings; a GPU makes it practical).

Also recorded per run: the weight the careless rater got and the weights of the real raters (min / median).

  python -m bench.bench_rater_weights --label cpu-head                 # head, majority; CPU, ~6 minutes
  python -m bench.bench_rater_weights --base --adapter --label gpu     # everything (GPU)

Writes bench/results/rater-weights/<label>/results.json and table.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import random
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench.bench_recipes import (
    CACHE,
    DEFAULT_ENCODER,
    CachedEncoder,
    Context,
    head_answers,
    humans_pairwise,
    machine_info,
    majority_answers,
    make_task,
    product_train_config,
    score,
    slm_distributions,
)
from slm_annotator.model.dataset import Example
from slm_annotator.model.heads import SentenceEncoder, features, is_ordered, train_head
from slm_annotator.model.reliability import Reliability, estimate
from slm_annotator.model.rubric import Rubric
from slm_annotator.settings import RATER_WEIGHTINGS

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "rater-weights"
SETS = ("usr", "summeval", "lewidi:HS-Brexit", "lewidi:MD-Agreement", "lewidi:ConvAbuse", "lewidi:ArMIS")
CONDITIONS = ("clean", "careless", "careless-third", "biased")
CARELESS = "synthetic-careless"
WEIGHTINGS = RATER_WEIGHTINGS  # off first: the others are compared with it

log = logging.getLogger("bench_rater_weights")


def inject(rubric: Rubric, train: Sequence[Example], seed: int, condition: str) -> list[Example]:
    """The training labels of a condition: each task's first rater (in a seed-fixed order of all raters) replaced
    by the synthetic rater, on every task (careless, biased) or on a third of them (careless-third). careless
    answers uniformly at random; biased gives the replaced rater's own value one step up the scale (clipped at the
    top: on a yes/no scale that is always the second value), so it still ranks items but never agrees exactly."""
    if condition == "clean":
        return list(train)
    rng = random.Random(f"careless-{seed}")
    raters = sorted({r for e in train for r in e.ratings})
    rank = {r: i for i, r in enumerate(rng.sample(raters, len(raters)))}
    out = []
    for e in train:
        if condition == "careless-third" and rng.random() >= 1 / 3:
            out.append(e)
            continue
        seat = min(e.ratings, key=rank.__getitem__)
        ratings = {r: v for r, v in e.ratings.items() if r != seat}
        own = e.ratings[seat]
        ratings[CARELESS] = {dim.key: _synthetic(dim, own[dim.key], condition, rng)
                             for dim in rubric.dimensions if own.get(dim.key) in dim.values}
        out.append(replace(e, ratings=ratings))
    return out


def _synthetic(dim: Any, own: str, condition: str, rng: random.Random) -> str:
    if condition == "biased" and is_ordered(dim):
        return dim.values[min(dim.values.index(own) + 1, len(dim.values) - 1)]
    return rng.choice(dim.values) if condition != "biased" else own


def weight_stats(rel: Reliability) -> dict[str, Any]:
    """Per dimension: the careless rater's weight and the real raters' min / median weight."""
    out: dict[str, Any] = {}
    for key, raters in rel.dims.items():
        real = [w.weight for r, w in raters.items() if r != CARELESS]
        out[key] = {"careless": raters[CARELESS].weight if CARELESS in raters else None,
                    "careless_skill": raters[CARELESS].skill if CARELESS in raters else None,
                    "real_min": min(real) if real else None,
                    "real_median": statistics.median(real) if real else None,
                    "real_below_1": sum(1 for w in real if w < 1.0), "real_raters": len(real)}
    for key, reason in rel.reasons.items():
        out[key] = {"unweighted": reason}
    return out


def run_one(ctx: Context, name: str, seed: int) -> dict[str, Any]:
    args = ctx.args
    t0 = time.perf_counter()
    task = make_task(name, seed, args.max_train, 0, 0, args.max_test)
    rubric, test = task.rubric, task.test
    assert ctx.sentence is not None
    ctx.sentence.use(name)
    x_test = features(ctx.sentence, rubric, [e.data for e in test])
    x_train = features(ctx.sentence, rubric, [e.data for e in task.train])
    ctx.sentence.save()
    methods: dict[str, dict[str, Any]] = {"majority": score(rubric, test, majority_answers(rubric, task.train,
                                                                                           len(test)))}
    if args.base:
        base = ctx.load_base()
        base_dists = slm_distributions(base, rubric, test, ctx.cfg.max_tokens, args.batch)
        methods["base"] = score(rubric, test, [p.argmax(1) for p in base_dists])
    weights: dict[str, Any] = {}
    timings: dict[str, float] = {}
    for condition in CONDITIONS:
        train = inject(rubric, task.train, seed, condition)
        for weighting in WEIGHTINGS:
            t = time.perf_counter()
            rel = estimate(rubric, train, weighting)
            timings[f"estimate-{condition}-{weighting}"] = round(time.perf_counter() - t, 2)
            if weighting != "off":
                weights.setdefault(condition, {})[weighting] = weight_stats(rel)
            weighted = rel.apply(train)
            tag = f"{condition}/{weighting}"
            head = train_head(rubric, weighted, x_train, seed=seed)
            methods[f"head {tag}"] = score(rubric, test, head_answers(head, rubric, x_test)[1])
            if args.adapter and condition in args.adapter_conditions and weighting in args.adapter_weightings:
                t = time.perf_counter()
                methods[f"adapter {tag}"] = adapter_score(ctx, rubric, weighted, test, seed)
                timings[f"adapter-{tag}"] = round(time.perf_counter() - t, 1)
    humans = humans_pairwise(rubric, test)
    dims = {dim.key: {"humans": humans[dim.key], "methods": {m: methods[m][dim.key] for m in methods}}
            for dim in rubric.dimensions}
    return {"set": name, "seed": seed, "n_train": len(task.train), "n_test": len(test), "split": task.split,
            "dimensions": dims, "weights": weights, "timings": timings,
            "seconds": round(time.perf_counter() - t0, 1)}


def adapter_score(ctx: Context, rubric: Rubric, train: Sequence[Example], test: Sequence[Example],
                  seed: int) -> dict[str, Any]:
    """The product's adapter on these (weighted) labels, decided by the fit labels' weighted shares."""
    from slm_annotator.model.dataset import split_heldout
    from slm_annotator.model.decoding import fit_decision
    from slm_annotator.model.plan import label_counts
    from slm_annotator.model.training import train_adapter

    base = ctx.load_base()
    fit, val = split_heldout(train, 0.2, salt=f"bench-rw-{seed}")
    cfg = replace(ctx.cfg, seed=seed)
    model, _ = train_adapter(base.model, base.tokenizer, rubric, fit, cfg, base.device)
    try:
        model.eval()
        a_val = slm_distributions(base, rubric, val, cfg.max_tokens, ctx.args.batch, model)
        a_test = slm_distributions(base, rubric, test, cfg.max_tokens, ctx.args.batch, model)
    finally:
        ctx.base = replace(base, model=model.unload())
    decisions = [fit_decision(a_val[d], label_counts(dim, fit), is_ordered(dim))
                 for d, dim in enumerate(rubric.dimensions)]
    return score(rubric, test, [dec.decide(p) for dec, p in zip(decisions, a_test, strict=True)])


def _fmt(values: Sequence[float]) -> str:
    if not values:
        return "n/a"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.3f} ± {sd:.3f}"


def set_mean(run: dict[str, Any], method: str) -> float | None:
    vals = [d["methods"][method]["alpha"] for d in run["dimensions"].values() if method in d["methods"]]
    vals = [v for v in vals if v is not None]
    return statistics.fmean(vals) if vals else None


def tables(runs: Sequence[dict[str, Any]]) -> str:
    """Per set: mean over seeds of the mean-over-dimensions alpha (± sd over seeds); then the paired gains."""
    sets = [s for s in SETS if any(r["set"] == s for r in runs)]
    methods = list(dict.fromkeys(m for r in runs for d in r["dimensions"].values() for m in d["methods"]))
    lines = ["| set (train / test) | seeds | humans | " + " | ".join(methods) + " |",
             "|---|---|---|" + "---|" * len(methods)]
    for s in sets:
        rs = [r for r in runs if r["set"] == s]
        hum = [statistics.fmean([d["humans"] for d in r["dimensions"].values() if d["humans"] is not None])
               for r in rs if any(d["humans"] is not None for d in r["dimensions"].values())]
        cells = [_fmt([v for r in rs if (v := set_mean(r, m)) is not None]) for m in methods]
        lines.append(f"| {s} ({rs[0]['n_train']} / {rs[0]['n_test']}) | {len(rs)} | {_fmt(hum)} | "
                     + " | ".join(cells) + " |")
    learners = sorted({m.split()[0] for m in methods if "/" in m})
    gain_lines: list[str] = []
    weight_lines: list[str] = []
    for weighting in WEIGHTINGS[1:]:
        gain_lines += ["", f"Paired gain of {weighting} over off (same set, seed and condition; mean ± sd over seeds;"
                       " wins / runs):", "", "| set | " + " | ".join(f"{lr} {c}" for lr in learners
                                                                  for c in CONDITIONS) + " |",
                       "|---|" + "---|" * (len(learners) * len(CONDITIONS))]
        overall: dict[str, list[float]] = {}
        for s in sets:
            rs = [r for r in runs if r["set"] == s]
            cells = []
            for lr in learners:
                for c in CONDITIONS:
                    diffs = [a - b for r in rs if (a := set_mean(r, f"{lr} {c}/{weighting}")) is not None
                             and (b := set_mean(r, f"{lr} {c}/off")) is not None]
                    overall.setdefault(f"{lr} {c}", []).extend(diffs)
                    cells.append(f"{_fmt(diffs)} ({sum(d > 0 for d in diffs)}/{len(diffs)})" if diffs else "n/a")
            gain_lines.append(f"| {s} | " + " | ".join(cells) + " |")
        gain_lines.append("| **all runs** | " + " | ".join(
            f"{_fmt(v)} ({sum(d > 0 for d in v)}/{len(v)})" for lr in learners for c in CONDITIONS
            for v in [overall.get(f"{lr} {c}", [])]) + " |")
        synthetic = [c for c in CONDITIONS if c != "clean"]
        weight_lines += ["", f"{weighting} weights (mean over seeds and dimensions; n/a: not weighted): the synthetic "
                         "rater's weight per condition; the real raters' lowest and median weight with a careless "
                         "rater:", "", "| set | " + " | ".join(synthetic) + " | real min | real median |",
                         "|---|" + "---|" * (len(synthetic) + 2)]
        for s in sets:
            def stats(c: str, s: str = s) -> list[dict[str, Any]]:
                return [d for r in runs if r["set"] == s for d in r["weights"].get(c, {}).get(weighting, {}).values()
                        if d.get("careless") is not None]
            cells = [_fmt([d["careless"] for d in stats(c)]) for c in synthetic]
            ws = stats("careless")
            weight_lines.append(f"| {s} | " + " | ".join(cells) + f" | {_fmt([d['real_min'] for d in ws])} | "
                                f"{_fmt([d['real_median'] for d in ws])} |")
    return "\n".join(lines + gain_lines + weight_lines) + "\n"


def write(folder: Path, result: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "results.json.tmp"
    tmp.write_text(json.dumps(result, indent=1, default=float))
    os.replace(tmp, folder / "results.json")
    m = result["machine"]
    header = (f"# Rater weighting: {result['label']}\n\n{result['started']}, {m.get('gpu') or 'CPU'} ({m['cpus']} "
              "cores). Cells: mean over seeds of the mean over dimensions of alpha vs each REAL rater (mean over "
              "raters) ± sd over seeds; `<learner> <condition>/<weighting>`.\n\n")
    (folder / "table.md").write_text(header + tables(result["runs"]))


def merge(folders: Sequence[Path], label: str, out_root: Path) -> dict[str, Any]:
    """Joins parts (one per set and seed, or per condition): the methods and weights of each (set, seed)."""
    by_key: dict[tuple[str, int], dict[str, Any]] = {}
    result: dict[str, Any] = {"label": label, "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                              "sources": [], "runs": []}
    for folder in folders:
        if not (folder / "results.json").is_file():  # a part that had not finished
            continue
        src = json.loads((folder / "results.json").read_text())
        result["sources"].append({"folder": str(folder), "command": src.get("command"), "started": src["started"]})
        result["machine"] = src["machine"]
        for run in src["runs"]:
            key = (run["set"], run["seed"])
            if key not in by_key:
                by_key[key] = run
                continue
            for dk, d in run["dimensions"].items():
                by_key[key]["dimensions"][dk]["methods"].update(d["methods"])
            by_key[key]["timings"].update(run["timings"])
    result["runs"] = [by_key[k] for k in sorted(by_key, key=lambda k: (SETS.index(k[0]), k[1]))]
    write(out_root / label, result)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sets", nargs="+", default=list(SETS), choices=SETS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    p.add_argument("--max-train", type=int, default=500)
    p.add_argument("--max-test", type=int, default=0, help="smoke runs: score only the first N test items")
    p.add_argument("--base", action="store_true", help="also the untrained SLM, zero-shot (a baseline)")
    p.add_argument("--adapter", action="store_true", help="also the QLoRA adapter, off vs dawid_skene")
    p.add_argument("--adapter-conditions", nargs="+", default=list(CONDITIONS), choices=CONDITIONS)
    p.add_argument("--adapter-weightings", nargs="+", default=["off", "one_coin"], choices=WEIGHTINGS)
    p.add_argument("--merge", nargs="+", type=Path, help="join the results.json of these folders into --label")
    p.add_argument("--label", default="cpu-head")
    p.add_argument("--out-root", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.merge:
        merge(args.merge, args.label, args.out_root)
        print((args.out_root / args.label / "table.md").read_text())
        return 0
    from slm_annotator.settings import load_settings

    settings = load_settings()
    cuda = settings.device != "cpu" and (args.base or args.adapter) and _cuda()
    args.batch = 32 if cuda else 8
    ctx = Context(args, settings, CachedEncoder(SentenceEncoder(DEFAULT_ENCODER), CACHE / DEFAULT_ENCODER),
                  cfg=product_train_config(settings) if (args.adapter or args.base) else None)
    result: dict[str, Any] = {
        "label": args.label, "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv), "machine": machine_info("cuda" if cuda else "cpu"),
        "sets": args.sets, "seeds": args.seeds, "max_train": args.max_train,
        "base_model": settings.base_model if (args.base or args.adapter) else None, "runs": [],
    }
    folder = args.out_root / args.label
    for name in args.sets:
        for seed in args.seeds:
            run = run_one(ctx, name, seed)
            result["runs"].append(run)
            write(folder, result)
            log.info("%s seed %d in %.1f s: %s", name, seed, run["seconds"],
                     {m: round(v, 3) for m in run["dimensions"][next(iter(run["dimensions"]))]["methods"]
                      if (v := set_mean(run, m)) is not None})
    result["finished"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    write(folder, result)
    print((folder / "table.md").read_text())
    return 0


def _cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


if __name__ == "__main__":
    raise SystemExit(main())
