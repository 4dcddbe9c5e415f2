"""Every input format of `evaluate` read into the same ratings: a Label Studio export (with and without a label
config), CSV long, JSONL, CSV wide; level overrides; errors that name the problem."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from slm_annotator.model.annotations_io import (
    InputError,
    RowOptions,
    apply_levels,
    parse_levels,
    read_ratings,
    to_devset,
)
from slm_annotator.model.experiment import examples_of

REPORTS = Path(__file__).parent / "fixtures" / "reports"
RUBRIC = (REPORTS / "rubric.xml").read_text()
RATERS = ["1", "bea@example.com", "3"]


def _values(ratings, dims=("sentiment", "quality", "score")) -> dict:
    """rater -> item -> dim -> value for the given dimensions, for comparing formats."""
    return {r: {i: {d: v for d, v in vals.items() if d in dims} for i, vals in by_item.items()}
            for r, by_item in ratings.human.items()}


def test_ls_export_with_label_config() -> None:
    r = read_ratings(REPORTS / "ls_export.json", RUBRIC)
    assert [(d.key, d.level) for d in r.dimensions] == [
        ("sentiment", "nominal"), ("quality", "ordinal"), ("score", "interval"), ("tags::funny", "nominal"),
        ("tags::rude", "nominal")]
    assert r.raters == RATERS  # completed_by as an id and as a user object with an email
    assert r.items == ["1", "2", "3", "4", "5", "6"]
    assert "4" not in r.human["3"]  # the cancelled annotation is no rating
    assert r.human["1"]["5"] == {"sentiment": "pos", "quality": "5", "score": "88", "tags::funny": "yes",
                                 "tags::rude": "no"}  # 88 exact, not snapped to the 5-point prediction grid
    assert "tags::funny" not in r.human["1"]["3"]  # nothing chosen: LS stores no result item
    assert r.data["2"] == {"text": "review number 2"}
    assert list(r.models) == ["v1", "v2"] and r.latest_model() == "v2"
    assert r.models["v1"]["6"] == {"sentiment": "pos", "quality": "3", "score": "50"}
    score = r.dimensions[2]
    assert score.values[0] == "10" and "88" in score.values and score.number("88") == 88.0
    names, matrix = r.matrix(r.dimensions[0], r.items)
    assert names == RATERS and matrix[2] == [0.0, 2.0, 0.0, None, None, None]


def test_ls_export_without_label_config_infers_the_rubric() -> None:
    with_config = read_ratings(REPORTS / "ls_export.json", RUBRIC)
    inferred = read_ratings(REPORTS / "ls_export.json")
    levels = {d.key: d.level for d in inferred.dimensions}
    assert levels == {"sentiment": "nominal", "quality": "ordinal", "score": "interval", "tags::funny": "nominal",
                      "tags::rude": "nominal"}
    assert inferred.human == with_config.human and inferred.models == with_config.models
    assert inferred.dimensions[1].values == ("1", "2", "3", "4", "5")


def test_csv_long_jsonl_and_wide_read_the_same_ratings() -> None:
    ls = read_ratings(REPORTS / "ls_export.json", RUBRIC)
    long = read_ratings(REPORTS / "long.csv", RUBRIC, RowOptions(model_raters=("v2",)))
    assert long.human == ls.human  # tags "funny;rude" cells become the per-option yes/no dimensions
    assert {i: v for i, v in long.models["v2"].items()} == ls.models["v2"]
    assert long.data["4"] == {"text": "review number 4"}
    jsonl = read_ratings(REPORTS / "long.jsonl", RUBRIC)
    assert jsonl.human == ls.human and not jsonl.models
    wide = read_ratings(REPORTS / "wide.csv")
    assert _values(wide) == _values(ls)
    assert {d.key: d.level for d in wide.dimensions} == {"sentiment": "nominal", "quality": "ordinal",
                                                         "score": "interval"}


def test_csv_without_config_infers_levels_and_skips_text() -> None:
    r = read_ratings(REPORTS / "long.csv", None, RowOptions(model_raters=("v2",)))
    assert [(d.key, d.level) for d in r.dimensions] == [
        ("sentiment", "nominal"), ("quality", "ordinal"), ("score", "interval"), ("tags", "nominal")]
    assert r.dimensions[0].values == ("neg", "neutral", "pos")
    assert r.human["1"]["4"]["tags"] == "funny;rude" and r.data["1"] == {"text": "review number 1"}
    only = read_ratings(REPORTS / "long.csv", None, RowOptions(dimensions=("quality",), model_raters=("v2",)))
    assert [d.key for d in only.dimensions] == ["quality"]


def test_level_overrides() -> None:
    r = read_ratings(REPORTS / "wide.csv")
    assert parse_levels(["quality=interval", "nominal"]) == {"quality": "interval", "*": "nominal"}
    changed = apply_levels(r, parse_levels(["quality=interval", "score=ordinal"]))
    assert {d.key: d.level for d in changed.dimensions}["quality"] == "interval"
    assert changed.dimensions[2].level == "ordinal" and changed.dimensions[2].number("90") is not None
    assert {d.level for d in apply_levels(r, parse_levels(["nominal"])).dimensions} == {"nominal"}
    with pytest.raises(InputError, match="not all numbers"):
        apply_levels(r, parse_levels(["sentiment=interval"]))
    with pytest.raises(InputError, match="unknown dimensions"):
        apply_levels(r, parse_levels(["nope=ordinal"]))
    with pytest.raises(InputError, match="must be one of"):
        parse_levels(["quality=ratio"])


def test_errors_name_the_problem(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("rater,quality\nann,3\n")
    with pytest.raises(InputError, match="no item column"):
        read_ratings(bad)
    typo = tmp_path / "typo.csv"
    typo.write_text("item,rater,sentiment\n1,ann,postive\n")
    with pytest.raises(InputError, match="'postive' is not one of"):
        read_ratings(typo, RUBRIC)
    with pytest.raises(InputError, match="--model-rater"):
        read_ratings(REPORTS / "long.csv", None, RowOptions(model_raters=("gpt",)))
    broken = tmp_path / "x.json"
    broken.write_text("{not json")
    with pytest.raises(InputError, match="cannot be parsed"):
        read_ratings(broken)
    obj = tmp_path / "obj.json"
    obj.write_text(json.dumps({"tasks": []}))
    with pytest.raises(InputError, match="expected a JSON list"):
        read_ratings(obj)


def test_to_devset_snaps_numbers_to_the_prediction_grid() -> None:
    ds = to_devset(read_ratings(REPORTS / "ls_export.json", RUBRIC), "fixture")
    assert len(ds.items) == 6 and ds.items[0].data == {"text": "review number 1"}
    assert ds.items[4].ratings["1"]["score"] == "90"  # 88 on the 21-point grid 0, 5, ..., 100
    examples = examples_of(ds, ds.items)
    assert examples[4].ratings["bea@example.com"]["quality"] == "5"
    with pytest.raises(InputError, match="label config"):
        to_devset(read_ratings(REPORTS / "wide.csv"), "no-config")
