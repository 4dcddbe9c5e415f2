"""A repeatable recipe experiment: fixed split and seeds, the untrained base vs a trained adapter, per dimension.

What a team (or we, choosing defaults) needs to decide a recipe: alpha of the model against each human
(averaged) next to the humans' own pairwise alpha, alpha against the consensus, accuracy, the predicted-value
histogram (collapse to one value shows), calibration of the confidences, wall time and peak memory.
"""

from __future__ import annotations

import json
import resource
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from slm_annotator.model.agreement import consensus, dimension_report, expected_calibration_error
from slm_annotator.model.dataset import Example
from slm_annotator.model.devdata import (
    DevSet,
    fixed_split,
    load_goemotions,
    load_lewidi,
    load_summeval,
    load_usr_personachat,
)
from slm_annotator.model.evaluate import scale_value
from slm_annotator.model.loader import load_base
from slm_annotator.model.prompt import PromptBuilder
from slm_annotator.model.rubric import Rubric, parse_label_config
from slm_annotator.model.scorer import Scorer, decode
from slm_annotator.model.training import TrainConfig, train_adapter


def load_devset(name: str) -> DevSet:
    """usr | summeval | goemotions | lewidi:<MD-Agreement|HS-Brexit|ConvAbuse|ArMIS>."""
    if name == "usr":
        return load_usr_personachat()
    if name == "summeval":
        return load_summeval()
    if name == "goemotions":
        return load_goemotions()
    if name.startswith("lewidi:"):
        return load_lewidi(name.split(":", 1)[1])
    raise ValueError(f"unknown dev set {name!r}: usr, summeval, goemotions or lewidi:<name>")


def examples_of(ds: DevSet, items: Sequence[Any]) -> list[Example]:
    return [
        Example(it.item_id, it.data, {r: {k: str(v) for k, v in vals.items()} for r, vals in it.ratings.items()})
        for it in items
    ]


@dataclass(frozen=True)
class Split:
    train: list[Example]
    test: list[Example]


def split_devset(ds: DevSet, test_fraction: float, seed: int, limit_train: int | None = None) -> Split:
    train_items, test_items = fixed_split(ds.items, test_fraction, seed)
    train = examples_of(ds, train_items)
    return Split(train[:limit_train] if limit_train else train, examples_of(ds, test_items))


def distributions(model: Any, tokenizer: Any, device: torch.device, rubric: Rubric, examples: Sequence[Example],
                  max_tokens: int, batch_size: int = 8) -> list[list[torch.Tensor]]:
    builder = PromptBuilder(tokenizer, rubric, max_tokens)
    encoded = [builder.encode(e.data) for e in examples]
    return Scorer(model, tokenizer, device, batch_size).distributions(encoded, [s.token_ids for s in builder.spaces])


def report(rubric: Rubric, examples: Sequence[Example], dists: list[list[torch.Tensor]],
           decoding: str = "argmax", n_boot: int = 0) -> dict[str, Any]:
    """Per dimension: dimension_report of the decoded values, plus the confidences' ECE against the consensus."""
    raters = sorted({r for e in examples for r in e.ratings})
    out: dict[str, Any] = {}
    for d, dim in enumerate(rubric.dimensions):
        mode = "expected" if decoding == "expected" and dim.level != "nominal" else "argmax"
        scores = [decode(dim.values, per_dim[d], mode) for per_dim in dists]
        human = [[scale_value(dim, e.ratings.get(r, {}).get(dim.key)) for e in examples] for r in raters]
        model_row = [scale_value(dim, s.value) for s in scores]
        domain = None if dim.level == "interval" else [float(i) for i in range(len(dim.values))]
        rep = dimension_report(human, model_row, dim.level, domain, n_boot=n_boot, rater_names=raters)
        cons = consensus(human, dim.level, domain)
        paired = [(s.confidence, m == c) for s, m, c in zip(scores, model_row, cons, strict=True) if c is not None]
        rep["ece_vs_consensus"] = expected_calibration_error(*zip(*paired, strict=True)) if paired else None
        rep["values"] = list(dim.values)
        out[dim.key] = rep
    return out


def summary(per_dim: dict[str, Any]) -> dict[str, Any]:
    def mean(key: str) -> float | None:
        vals = [d[key]["value"] for d in per_dim.values() if d.get(key, {}).get("value") is not None]
        return sum(vals) / len(vals) if vals else None

    collapsed = [k for k, d in per_dim.items() if sum(1 for v in d["predicted_histogram"].values() if v) <= 1]
    return {"model_vs_each_human_mean": mean("model_vs_each_human_mean"),
            "human_pairwise_mean": mean("human_pairwise_mean"), "model_vs_consensus": mean("model_vs_consensus"),
            "accuracy_vs_consensus": mean("accuracy_vs_consensus"), "collapsed_dimensions": collapsed}


def run_experiment(dataset: str, cfg: TrainConfig, base_model: str, model_dir: Path, quantization: str,
                   device: str, test_fraction: float = 1 / 3, split_seed: int = 0, limit_train: int | None = None,
                   evaluate_base: bool = True) -> dict[str, Any]:
    ds = load_devset(dataset)
    rubric = parse_label_config(ds.label_config)
    split = split_devset(ds, test_fraction, split_seed, limit_train)
    started = time.perf_counter()
    base = load_base(base_model, model_dir, quantization, device)
    result: dict[str, Any] = {
        "dataset": dataset, "base_model": base.name, "quantization": quantization, "device": str(base.device),
        "recipe": asdict(cfg), "n_train": len(split.train), "n_test": len(split.test),
        "split": {"test_fraction": test_fraction, "seed": split_seed, "by": "group (dialogue context)"},
    }
    if evaluate_base:
        dists = distributions(base.model, base.tokenizer, base.device, rubric, split.test, cfg.max_tokens)
        per_dim = report(rubric, split.test, dists)
        result["base"] = {"dimensions": per_dim, "summary": summary(per_dim)}
    t0 = time.perf_counter()
    model, stats = train_adapter(base.model, base.tokenizer, rubric, split.train, cfg, base.device)
    result["train_seconds"] = round(time.perf_counter() - t0, 1)
    result["train_steps"] = stats.steps
    result["final_loss"] = stats.losses[-1] if stats.losses else None
    dists = distributions(model, base.tokenizer, base.device, rubric, split.test, cfg.max_tokens)
    for decoding in ("argmax", "expected"):
        per_dim = report(rubric, split.test, dists, decoding)
        result[f"adapter_{decoding}"] = {"dimensions": per_dim, "summary": summary(per_dim)}
    result["wall_seconds"] = round(time.perf_counter() - started, 1)
    result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    if base.device.type == "cuda":
        result["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated(base.device) / 2**20)
    return result


def recipe_from(overrides: dict[str, Any], base: TrainConfig | None = None) -> TrainConfig:
    base = base or TrainConfig()
    unknown = set(overrides) - set(asdict(base))
    if unknown:
        raise ValueError(f"unknown recipe fields {sorted(unknown)}; known: {sorted(asdict(base))}")
    if "targets" in overrides:
        overrides = {**overrides, "targets": tuple(overrides["targets"])}
    return replace(base, **overrides)


def markdown(result: dict[str, Any]) -> str:
    rows = ["| dimension | human pairwise α | base vs each human | adapter vs each human (argmax / expected) "
            "| adapter vs consensus | accuracy | predicted histogram | ECE |", "|" + "---|" * 8]
    adapter = result["adapter_argmax"]["dimensions"]
    expected = result["adapter_expected"]["dimensions"]
    base = result.get("base", {}).get("dimensions", {})
    for key, dim in adapter.items():
        rows.append(
            f"| {key} | {_f(dim['human_pairwise_mean'])} | {_f(base.get(key, {}).get('model_vs_each_human_mean'))} "
            f"| {_f(dim['model_vs_each_human_mean'])} / {_f(expected[key]['model_vs_each_human_mean'])} "
            f"| {_f(dim['model_vs_consensus'])} | {_f(dim.get('accuracy_vs_consensus'))} "
            f"| {json.dumps(dim['predicted_histogram'])} | {_num(dim.get('ece_vs_consensus'))} |")
    return "\n".join(rows)


def _f(entry: dict[str, Any] | None) -> str:
    return "n/a" if not entry or entry.get("value") is None else f"{entry['value']:.3f}"


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"
