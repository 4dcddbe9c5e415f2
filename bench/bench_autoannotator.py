"""AutoAnnotator trade-off on a dev set: single SLM, k-member votes, vote + routing to a judge, the judge alone.

Everything goes through the product's code: ensemble members trained by the worker's train_members (member t:
its own adapter, seed + t, prompt template t), predictions by ModelServer.predict, routing by
backend.routing.route_predictions with the real OpenAI client against a real OpenAI-compatible server
(`slm-annotator judge-serve`), usage and cost by the store's route totals and slm_annotator.costs. The judge
here is the same small base model with an adapter trained on every training item (a stronger annotator than
the members, which see --n-train items); its tokens are priced as a big API model's (PRICE_JUDGE_*), which is
the trade-off a team makes.

  python -m bench.bench_autoannotator --dataset lewidi:HS-Brexit --n-train 100 --out bench/results/autoannotator
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from slm_annotator.backend.routing import RoutingPolicy, route_predictions
from slm_annotator.costs import Prices, cost_table
from slm_annotator.model.agreement import dimension_report
from slm_annotator.model.dataset import Example
from slm_annotator.model.evaluate import scale_value
from slm_annotator.model.experiment import load_devset, split_devset, summary
from slm_annotator.model.judge import Judge, JudgeConfig
from slm_annotator.model.loader import load_base
from slm_annotator.model.members import member_paths
from slm_annotator.model.results import values_from_result
from slm_annotator.model.rubric import Rubric, parse_label_config
from slm_annotator.model.serving import AdapterRef, ModelServer
from slm_annotator.model.svg_charts import PALETTE, Series, line_chart
from slm_annotator.model.training import TrainConfig
from slm_annotator.store import Store
from slm_annotator.testing import JudgeProcess
from slm_annotator.worker.pipeline import train_members


def train_to(path: Path, args: argparse.Namespace, rubric: Rubric, train: list[Example], members: int) -> float:
    """Trains `members` adapters into one version folder, as the worker does; a folder already there is reused
    (train in one call, evaluate in the next: each stays under a time limit)."""
    if (path / "slm_adapter.json").exists() and len(member_paths(path)) >= members:
        return json.loads((path / "slm_adapter.json").read_text()).get("train_seconds", 0.0)
    base = load_base(args.base_model, args.model_dir, args.quantization, args.device)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    started = time.perf_counter()
    train_members(base, rubric, train, TrainConfig(epochs=args.epochs, seed=args.seed), members, tmp, None, None,
                  {"n_train": len(train)})
    seconds = round(time.perf_counter() - started, 1)
    meta = json.loads((tmp / "slm_adapter.json").read_text())
    (tmp / "slm_adapter.json").write_text(json.dumps({**meta, "train_seconds": seconds}))
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    del base
    return seconds


def start_judge(adapter: Path, args: argparse.Namespace, log: Path) -> JudgeProcess:
    env = {**os.environ, "BASE_MODEL": args.base_model, "QUANTIZATION": args.quantization, "DEVICE": args.device,
           "MODEL_DIR": str(args.model_dir), "LOG_LEVEL": "WARNING"}
    return JudgeProcess(env, log, ("--adapter", str(adapter), "--model-name", "judge"), startup_timeout=600,
                        read_timeout=60).start()


def agreement(rubric: Rubric, examples: list[Example], values: list[dict[str, str]]) -> dict[str, Any]:
    raters = sorted({r for e in examples for r in e.ratings})
    per_dim = {}
    for dim in rubric.dimensions:
        human = [[scale_value(dim, e.ratings.get(r, {}).get(dim.key)) for e in examples] for r in raters]
        model_row = [scale_value(dim, v.get(dim.key)) for v in values]
        domain = None if dim.level == "interval" else [float(i) for i in range(len(dim.values))]
        per_dim[dim.key] = dimension_report(human, model_row, dim.level, domain, rater_names=raters)
    return summary(per_dim)


def consensus_values(rubric: Rubric, examples: list[Example]) -> list[dict[str, str]]:
    from slm_annotator.model.dataset import majority_values

    return [majority_values(e, rubric) for e in examples]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="lewidi:HS-Brexit")
    p.add_argument("--n-train", type=int, default=100, help="training items of the ensemble's adapter")
    p.add_argument("--judge-train", type=int, default=0, help="training items of the judge's adapter (0: all)")
    p.add_argument("--members", default="3,5")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--limit-test", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--base-model", default="smollm2")
    p.add_argument("--quantization", default="nf4")
    p.add_argument("--device", default="auto")
    p.add_argument("--model-dir", type=Path, default=Path(os.environ.get("MODEL_DIR", "model_dir")))
    p.add_argument("--price-judge-input", type=float, default=2.5, help="per million tokens (GPT-4o list price)")
    p.add_argument("--price-judge-output", type=float, default=10.0)
    p.add_argument("--price-slm-hour", type=float, default=2.5, help="an H100 hour")
    p.add_argument("--price-human-item", type=float, default=0.10)
    p.add_argument("--out", type=Path, default=Path("bench/results/autoannotator"))
    p.add_argument("--train-only", choices=["all", "members", "judge"], default="",
                   help="train (or keep) these adapters and stop: two processes can train both at once")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    prices = Prices(args.price_judge_input, args.price_judge_output, args.price_slm_hour, args.price_human_item)
    ds = load_devset(args.dataset)
    rubric = parse_label_config(ds.label_config)
    split = split_devset(ds, 1 / 3, args.seed)
    test = split.test[: args.limit_test] if args.limit_test else split.test
    members = [int(k) for k in args.members.split(",")]
    adapters = args.out / "adapters"
    seconds = {}  # member 0 is the single scorer: the same seed and template
    if args.train_only in ("", "all", "members"):
        seconds[f"{max(members)} members"] = train_to(adapters / "members", args, rubric,
                                                      split.train[: args.n_train], max(members))
    if args.train_only in ("", "all", "judge"):
        seconds["judge"] = train_to(adapters / "judge", args, rubric, split.train[: args.judge_train or None], 1)
    if args.train_only:
        print(json.dumps(seconds))
        return
    server = ModelServer(args.base_model, args.model_dir, args.quantization, args.device, 32, 1024, 4)
    tasks = [{"id": i, "data": e.data} for i, e in enumerate(test)]
    runs: dict[str, tuple[Any, float]] = {}
    plan = [("single", "members", 1)] + [(f"vote-k{k}", "members", k) for k in members]
    for name, adapter, k in plan:
        ref = AdapterRef(f"bench-{adapter}", adapters / adapter)
        server.predict(rubric, tasks[:8], ref, ref.name, members=k)  # load and warm up
        started = time.perf_counter()
        preds = server.predict(rubric, tasks, ref, ref.name, members=k)
        runs[name] = (preds, time.perf_counter() - started)
    judge_proc = start_judge(adapters / "judge", args, args.out / "judge-serve.log")
    judge = Judge(JudgeConfig(judge_proc.url, "judge", timeout=60, retries=2, concurrency=8))
    store = Store(f"sqlite:///{args.out / 'usage.sqlite3'}")
    rows: list[dict[str, Any]] = []
    human_values = consensus_values(rubric, test)
    try:
        for name, (preds, secs) in runs.items():
            k = (len(preds[0].votes) and preds[0].votes[0].k) or 1
            levels = sorted({round(p.uncertainty, 4) for p in preds if p.uncertainty > 0})
            configs = [(name, RoutingPolicy(k, "none", 1.0), "none")]
            if k > 1:
                configs += [(f"{name} + judge (U >= {eps:.2f})", RoutingPolicy(k, "judge", eps - 1e-6), "judge")
                            for eps in levels]
                configs += [(f"{name} + humans (U >= {levels[0]:.2f}, simulated)",
                             RoutingPolicy(k, "human", levels[0] - 1e-6), "human")] if levels else []
            for label, policy, route in configs:
                project = label
                routed = route_predictions(rubric, tasks, preds, policy, judge, store,
                                           project, _settings(prices), secs)
                values = [values_from_result(rubric, r.result) for r in routed]
                if route == "human":  # a human gives the consensus label on the items routed to them
                    values = [human_values[i] if r.route == "human" else v
                              for i, (r, v) in enumerate(zip(routed, values, strict=True))]
                costs = cost_table(store.usage(project), prices)
                rows.append(_row(label, k, policy, routed, agreement(rubric, test, values), costs, len(tasks)))
        started = time.perf_counter()
        verdicts = judge.ask_many(rubric, [t["data"] for t in tasks])
        judge_seconds = time.perf_counter() - started
    finally:
        judge_proc.stop()
    values = [v.values or {} for v in verdicts]
    tokens_in, tokens_out = sum(v.prompt_tokens for v in verdicts), sum(v.completion_tokens for v in verdicts)
    judge_cost = (tokens_in * prices.judge_input + tokens_out * prices.judge_output) / 1e6
    rows.append({"name": "judge alone", "k": 0, "epsilon": None, "routed_share": 1.0,
                 "failures": sum(1 for v in verdicts if v.values is None), **agreement(rubric, test, values),
                 "cost": round(judge_cost, 6), "cost_per_1000": round(judge_cost / len(tasks) * 1000, 4),
                 "judge_tokens": [tokens_in, tokens_out], "judge_seconds": round(judge_seconds, 2)})
    humans = agreement(rubric, test, human_values)
    result = {"dataset": args.dataset, "n_train": min(args.n_train, len(split.train)),
              "judge_train": len(split.train[: args.judge_train or None]), "n_test": len(tasks), "epochs": args.epochs,
              "base_model": args.base_model, "quantization": args.quantization, "device": str(server.loaded.device),
              "train_seconds": {k: round(v, 1) for k, v in seconds.items()}, "prices": vars(prices),
              "human_pairwise_mean": humans["human_pairwise_mean"], "configs": rows}
    (args.out / "autoannotator.json").write_text(json.dumps(result, indent=2, default=str))
    (args.out / "autoannotator.md").write_text(markdown(result))
    (args.out / "cost_vs_agreement.svg").write_text(chart(result))
    print(markdown(result))


def _settings(prices: Prices) -> Any:
    from slm_annotator.settings import load_settings

    return replace(load_settings(), judge_budget=0.0, price_judge_input=prices.judge_input,
                   price_judge_output=prices.judge_output, price_slm_hour=prices.slm_hour,
                   price_human_item=prices.human_item)


def _row(label: str, k: int, policy: RoutingPolicy, routed: list[Any], agree: dict[str, Any], costs: dict[str, Any],
         n: int) -> dict[str, Any]:
    judged = sum(1 for r in routed if r.route == "judge")
    to_human = sum(1 for r in routed if r.route == "human")
    return {"name": label, "k": k, "epsilon": None if policy.route == "none" else round(policy.epsilon, 4),
            "routed_share": round((judged + to_human) / n, 4), "judged": judged, "to_humans": to_human,
            "failures": costs["routes"].get("judge", {}).get("failures", 0), **agree,
            "cost": costs["total_cost"], "cost_per_1000": round(costs["total_cost"] / n * 1000, 4),
            "all_to_judge_cost": costs["all_to_judge_cost"], "routes": costs["routes"]}


def markdown(result: dict[str, Any]) -> str:
    lines = [f"{result['dataset']}: members trained on {result['n_train']} items, judge on {result['judge_train']}, "
             f"{result['n_test']} test items, {result['base_model']} {result['quantization']} on {result['device']}; "
             f"humans' pairwise α {_f(result['human_pairwise_mean'])}", "",
             "| configuration | routed | α vs each human | α vs consensus | accuracy vs consensus "
             "| est. cost / 1000 items |",
             "|---|---|---|---|---|---|"]
    for r in result["configs"]:
        lines.append(f"| {r['name']} | {r['routed_share']:.0%} | {_f(r['model_vs_each_human_mean'])} | "
                     f"{_f(r['model_vs_consensus'])} | {_f(r['accuracy_vs_consensus'])} | {r['cost_per_1000']:.4f} |")
    return "\n".join(lines) + "\n"


def chart(result: dict[str, Any]) -> str:
    series = []
    for n, r in enumerate(result["configs"]):
        series.append(Series(r["name"], [(max(r["cost_per_1000"], 1e-4), r["model_vs_each_human_mean"], None)],
                             PALETTE[n % len(PALETTE)]))
    costs = sorted({max(r["cost_per_1000"], 1e-4) for r in result["configs"]})
    ticks = [(c, f"{c:.3g}") for c in costs]
    refs = [("humans' pairwise α", result["human_pairwise_mean"], "#6b7280")] if result["human_pairwise_mean"] else []
    return line_chart(series, ticks, "estimated cost per 1000 items (log scale)", "α vs each human (mean)",
                      log_x=True, references=refs, chart="cost-vs-agreement")


def _f(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


if __name__ == "__main__":
    main()
