"""How many labels do we need? Train on 25, 50, 100, 200, ... labelled items (nested subsets, fixed seeds) and
measure alpha per dimension on one fixed held-out set, next to the humans' own pairwise alpha, the untrained
base model and a majority-class baseline.

Built on ``model.experiment`` (split, distributions, report): the numbers mean what they mean there.
"""

from __future__ import annotations

import gc
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from slm_annotator.model.dataset import Example
from slm_annotator.model.devdata import DevSet
from slm_annotator.model.experiment import distributions, report, split_devset
from slm_annotator.model.loader import load_base
from slm_annotator.model.plan import label_counts
from slm_annotator.model.rubric import Rubric, parse_label_config
from slm_annotator.model.training import TrainConfig, train_adapter

log = logging.getLogger(__name__)
DEFAULT_SIZES = (25, 50, 100, 200, 400, 800, 1600, 3200, 6400, 12800)
MEASURE = "model_vs_each_human_mean"  # comparable with the humans' pairwise mean
OnPoint = Callable[[dict[str, Any]], None]


def plan_sizes(requested: Sequence[int] | None, n_train: int) -> list[int]:
    """Requested sizes that fit the training set, and the whole training set as the last point."""
    if n_train <= 0:
        raise ValueError("the training split is empty")
    wanted = sorted({int(s) for s in (requested or DEFAULT_SIZES)})
    if wanted and wanted[0] <= 0:
        raise ValueError(f"sizes must be positive, got {wanted}")
    sizes = [s for s in wanted if s < n_train]
    return [*sizes, n_train] if requested is None or wanted[-1] >= n_train else sizes


def nested_subset(train: Sequence[Example], n: int, seed: int) -> list[Example]:
    """The first n of one seeded shuffle: each size contains every smaller one (a curve, not noise)."""
    order = list(train)
    random.Random(seed).shuffle(order)
    return order[:n]


def majority_distributions(rubric: Rubric, train: Sequence[Example], n_test: int) -> list[list[torch.Tensor]]:
    """One-hot on each dimension's most frequent training label (ties: scale order), for every test item."""
    per_dim = []
    for dim in rubric.dimensions:
        counts = label_counts(dim, train)
        top = max(dim.values, key=lambda v: (counts[dim.values.index(v)], -dim.values.index(v)))
        per_dim.append(torch.nn.functional.one_hot(torch.tensor(dim.values.index(top)), len(dim.values)).float())
    return [list(per_dim) for _ in range(n_test)]


def _value(entry: dict[str, Any] | None) -> float | None:
    return (entry or {}).get("value")


def _point_dims(adapter_runs: list[dict[str, Any]], majority: dict[str, Any]) -> dict[str, Any]:
    """Per dimension: the adapter's alpha (mean over seeds) with its interval, and the majority baseline."""
    out = {}
    for key in majority:
        values = [_value(run[key][MEASURE]) for run in adapter_runs]
        present = [v for v in values if v is not None]
        single = len(adapter_runs) == 1
        ci = adapter_runs[0][key][MEASURE].get("ci") if single else ([min(present), max(present)] if present else None)
        out[key] = {
            "adapter": sum(present) / len(present) if present else None,
            "adapter_ci": ci, "adapter_interval": "bootstrap 95%" if single else "range over seeds",
            "adapter_seeds": values,
            "adapter_vs_consensus": [_value(run[key]["model_vs_consensus"]) for run in adapter_runs],
            "accuracy_vs_consensus": [_value(run[key].get("accuracy_vs_consensus")) for run in adapter_runs],
            "predicted_histogram": [run[key]["predicted_histogram"] for run in adapter_runs],
            "majority": _value(majority[key][MEASURE]),
            "reason": adapter_runs[0][key][MEASURE].get("reason"),
        }
    return out


def _mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


class CurveRunner:
    """Loads a fresh base model for every training run, so each point is independent of the ones before."""

    def __init__(self, base_model: str, model_dir: Path, quantization: str, device: str) -> None:
        self.args = (base_model, model_dir, quantization, device)

    def base(self) -> Any:
        return load_base(*self.args)

    def train_and_score(self, rubric: Rubric, train: Sequence[Example], test: Sequence[Example], cfg: TrainConfig,
                        n_boot: int) -> tuple[dict[str, Any], float]:
        base = self.base()
        t0 = time.perf_counter()
        model, _ = train_adapter(base.model, base.tokenizer, rubric, train, cfg, base.device)
        seconds = time.perf_counter() - t0
        dists = distributions(model, base.tokenizer, base.device, rubric, test, cfg.max_tokens)
        per_dim = report(rubric, test, dists, n_boot=n_boot)
        del model, base
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return per_dim, seconds


def run_learning_curve(ds: DevSet, cfg: TrainConfig, runner: CurveRunner, sizes: Sequence[int] | None = None,
                       seeds: Sequence[int] = (0,), test_fraction: float = 1 / 3, split_seed: int = 0,
                       n_boot: int = 200, on_point: OnPoint | None = None) -> dict[str, Any]:
    """Fixed held-out set (``split_devset``), nested training subsets per seed, one adapter per (size, seed)."""
    started = time.perf_counter()
    rubric = parse_label_config(ds.label_config)
    split = split_devset(ds, test_fraction, split_seed)
    plan = plan_sizes(sizes, len(split.train))
    base = runner.base()
    base_report = report(rubric, split.test, distributions(base.model, base.tokenizer, base.device, rubric,
                                                           split.test, cfg.max_tokens))
    result: dict[str, Any] = {
        "kind": "learning_curve", "title": f"Learning curve: {ds.name}", "dataset": ds.name,
        "base_model": base.name, "quantization": base.quantization, "device": str(base.device),
        "recipe": asdict(cfg), "seeds": list(seeds), "sizes": plan, "n_train_total": len(split.train),
        "n_test": len(split.test), "test_items": [e.task_key for e in split.test], "measure": MEASURE,
        "split": {"test_fraction": test_fraction, "seed": split_seed, "by": "group"}, "n_boot": n_boot,
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "dimensions": {d.key: {"title": d.title, "level": d.level,
                               "human_pairwise": _value(base_report[d.key]["human_pairwise_mean"]),
                               "base": _value(base_report[d.key][MEASURE])} for d in rubric.dimensions},
        "points": [],
    }
    del base
    result["base_mean"] = _mean([d["base"] for d in result["dimensions"].values()])
    result["human_pairwise_mean"] = _mean([d["human_pairwise"] for d in result["dimensions"].values()])
    for n in plan:
        result["points"].append(_point(rubric, split.train, split.test, n, seeds, cfg, runner, n_boot))
        result["wall_seconds"] = round(time.perf_counter() - started, 1)
        if on_point:
            on_point(result)
    return result


def _point(rubric: Rubric, train: Sequence[Example], test: Sequence[Example], n: int, seeds: Sequence[int],
           cfg: TrainConfig, runner: CurveRunner, n_boot: int) -> dict[str, Any]:
    runs, seconds, labels = [], [], []
    for seed in seeds:
        subset = nested_subset(train, n, seed)
        per_dim, took = runner.train_and_score(rubric, subset, test, replace(cfg, seed=seed), n_boot)
        runs.append(per_dim)
        seconds.append(round(took, 1))
        labels.append(sum(len(e.ratings) for e in subset))
        log.info("learning curve: %d items, seed %d: mean alpha %s (%.0f s)", n, seed,
                 _mean([_value(d[MEASURE]) for d in per_dim.values()]), took)
    majority = report(rubric, test, majority_distributions(rubric, nested_subset(train, n, seeds[0]), len(test)))
    dims = _point_dims(runs, majority)
    return {"n_train": n, "n_labels": labels, "train_seconds": seconds, "dimensions": dims,
            "adapter_mean": _mean([d["adapter"] for d in dims.values()]),
            "majority_mean": _mean([d["majority"] for d in dims.values()])}
