"""learning-curve on the tiny model: sizes, nested subsets, baselines, determinism, the CLI's HTML + JSON."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from slm_annotator.cli import main
from slm_annotator.model.annotations_io import read_ratings, to_devset
from slm_annotator.model.dataset import Example
from slm_annotator.model.experiment import recipe_from
from slm_annotator.model.learning_curve import (
    CurveRunner,
    majority_distributions,
    nested_subset,
    plan_sizes,
    run_learning_curve,
)
from slm_annotator.model.rubric import parse_label_config
from tests.toy import CONFIG, toy_label

FAST = {"epochs": 1, "lr": 1e-2, "lora_r": 4, "token_dropout_share": 0.0, "max_tokens": 128, "batch_size": 4}


def _toy_csv(path: Path, n_items: int = 24) -> Path:
    """Two raters who agree except on every 3rd item (so alpha is defined and below 1)."""
    with path.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["item", "rater", "text", "sentiment"])
        for t in range(n_items):
            for rater in ("ann", "bob"):
                label = toy_label(t, 0, rater, flip=rater == "bob" and t % 3 == 0)
                out.writerow([t + 1, rater, label.task_data["text"], label.values["sentiment"]])
    return path


def test_plan_sizes_and_nested_subsets() -> None:
    assert plan_sizes(None, 130) == [25, 50, 100, 130]
    assert plan_sizes(None, 20) == [20]
    assert plan_sizes([10, 500], 130) == [10, 130]
    assert plan_sizes([20, 10], 130) == [10, 20]
    with pytest.raises(ValueError):
        plan_sizes([0, 5], 10)
    train = [Example(str(i), {}) for i in range(50)]
    small, large = nested_subset(train, 10, 3), nested_subset(train, 30, 3)
    assert large[:10] == small and len({e.task_key for e in large}) == 30
    assert nested_subset(train, 10, 4) != small


def test_majority_baseline_predicts_the_most_frequent_training_label() -> None:
    rubric = parse_label_config(CONFIG)
    train = [Example("1", {}, {"a": {"sentiment": "neg"}, "b": {"sentiment": "neg"}}),
             Example("2", {}, {"a": {"sentiment": "pos"}})]
    dists = majority_distributions(rubric, train, 3)
    assert len(dists) == 3 and dists[0][0].tolist() == [0.0, 1.0]  # values ("pos", "neg")


@pytest.mark.slow  # trains adapters
def test_same_seed_same_curve(settings, tmp_path: Path) -> None:
    ds = to_devset(read_ratings(_toy_csv(tmp_path / "toy.csv", 16), CONFIG), "toy")
    runner = CurveRunner(settings.base_model, settings.model_dir, settings.quantization, settings.device)
    runs = [run_learning_curve(ds, recipe_from(FAST), runner, [6], [1], 0.25, 0, n_boot=0) for _ in range(2)]
    first, second = (r["points"][0]["dimensions"]["sentiment"] for r in runs)
    assert first["adapter_seeds"] == second["adapter_seeds"]
    assert first["predicted_histogram"] == second["predicted_histogram"]
    assert runs[0]["test_items"] == runs[1]["test_items"] and len(runs[0]["test_items"]) == 4


@pytest.mark.slow  # trains adapters
def test_learning_curve_cli_writes_the_curve(settings, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data, config, out = _toy_csv(tmp_path / "toy.csv"), tmp_path / "toy.xml", tmp_path / "curve"
    config.write_text(CONFIG)
    code = main(["learning-curve", "--data", str(data), "--label-config", str(config), "--sizes", "4,8,1000",
                 "--seeds", "0,1", "--recipe", json.dumps(FAST), "--test-fraction", "0.25", "--n-boot", "0",
                 "--out", str(out)])
    assert code == 0
    result = json.loads((out / "learning_curve.json").read_text(), parse_constant=lambda c: 1 / 0)
    assert result["sizes"] == [4, 8, 18] and result["n_test"] == 6 and result["seeds"] == [0, 1]
    assert [p["n_labels"] for p in result["points"]] == [[8, 8], [16, 16], [36, 36]]
    sentiment = result["dimensions"]["sentiment"]
    assert sentiment["human_pairwise"] is not None and sentiment["human_pairwise"] < 1.0
    for point in result["points"]:
        dim = point["dimensions"]["sentiment"]
        assert len(dim["adapter_seeds"]) == 2 and dim["adapter_interval"] == "range over seeds"
        assert dim["majority"] is not None and dim["majority"] <= 0.0  # a constant rater never agrees beyond chance
        if dim["adapter"] is not None:
            assert dim["adapter_ci"][0] <= dim["adapter"] <= dim["adapter_ci"][1]
    page = (out / "learning_curve.html").read_text()
    assert page.count('data-chart="learning-curve"') == 1
    assert page.count('<circle class="point" data-series="majority baseline"') == 3
    assert 'class="reference"' in page and "<script" not in page
    printed = capsys.readouterr().out
    assert "18 items: adapter" in printed and "humans pairwise" in printed
