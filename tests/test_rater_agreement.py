"""Which annotator is off? (issue 18): per-annotator agreement, the flag, golden tasks, not-enough-data cases,
the report sections. A random annotator injected into a dev set (synthetic always; USR PersonaChat when
$SLM_SHARED_DATA has it) is flagged and the real ones are not."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from slm_annotator.cli import main
from slm_annotator.model.agreement import alpha
from slm_annotator.model.agreement_report import annotator_table, build_report
from slm_annotator.model.annotations_io import DimSpec, Ratings, from_ls_tasks, read_ratings
from slm_annotator.model.raters import MIN_LABELS, annotator_report, pair_alpha
from slm_annotator.model.report_html import render_evaluate

CONFIG = ('<View><Text name="text" value="$text"/><Choices name="sentiment" toName="text">'
          '<Choice value="pos"/><Choice value="neg"/><Choice value="neutral"/></Choices></View>')
SENT = DimSpec("sentiment", "nominal", ("neg", "neu", "pos"))
QUALITY = DimSpec("quality", "ordinal", ("1", "2", "3", "4", "5"))


def _json(report: dict[str, Any]) -> dict[str, Any]:
    """The report survives strict JSON (no NaN anywhere)."""
    return json.loads(json.dumps(report, allow_nan=False, default=str))


def _with_random_rater(ratings: Ratings, seed: int = 0) -> Ratings:
    """Adds "random" who labels every item with values drawn uniformly from each scale."""
    rng = np.random.default_rng(seed)
    for item in ratings.items:
        ratings.human.setdefault("random", {})[item] = {
            d.key: d.values[int(rng.integers(0, len(d.values)))] for d in ratings.dimensions}
    return ratings


def synthetic(n_items: int = 150, n_real: int = 5, per_item: int = 3, seed: int = 0) -> Ratings:
    """Real annotators: 3 of 5 per item, each near a hidden truth (85% right on sentiment, +-1 on quality)."""
    rng = np.random.default_rng(seed)
    ratings = Ratings([SENT, QUALITY])
    names = [f"real{i}" for i in range(n_real)]
    for j in range(n_items):
        sent, quality = int(rng.integers(0, 3)), int(rng.integers(0, 5))
        for rater in rng.choice(names, per_item, replace=False):
            s = sent if rng.random() < 0.85 else int(rng.integers(0, 3))
            q = int(np.clip(quality + rng.choice([-1, 0, 0, 0, 1]), 0, 4))
            ratings.human.setdefault(str(rater), {})[f"t{j}"] = {"sentiment": SENT.values[s],
                                                                  "quality": QUALITY.values[q]}
    return ratings


def test_pair_alpha_equals_krippendorff_alpha_of_two_rows() -> None:
    rng = np.random.default_rng(3)
    for level in ("nominal", "ordinal", "interval"):
        for _ in range(40):
            n = int(rng.integers(2, 40))
            x, y = rng.integers(0, 5, n).astype(float), rng.integers(0, 5, n).astype(float)
            x[rng.random(n) < 0.2] = np.nan
            y[rng.random(n) < 0.2] = np.nan
            rows = [[None if np.isnan(v) else float(v) for v in r] for r in (x, y)]
            want = alpha(rows, level, None if level == "interval" else [0.0, 1.0, 2.0, 3.0, 4.0])
            got = pair_alpha(x, y, level)
            assert (want.value is None) == (got.value is None)
            if want.value is not None:
                assert got.value == pytest.approx(want.value, abs=1e-9)


def test_a_random_annotator_is_flagged_and_the_real_ones_are_not() -> None:
    rep = _json(annotator_report(_with_random_rater(synthetic()), None, n_boot=200))
    people = rep["annotators"]
    assert people["random"]["flagged"] and set(people["random"]["flagged_dimensions"]) == {"sentiment", "quality"}
    for name in (f"real{i}" for i in range(5)):
        assert not people[name]["flagged"] and people[name]["flagged_dimensions"] == [], name
        o = people[name]["overall"]
        assert o["vs_consensus"]["value"] > 0.6 and o["pairwise"]["value"] > 0.3
    o = people["random"]["overall"]
    assert o["vs_consensus"]["ci"][1] < rep["team_median"]["overall"]
    assert o["leave_one_out"]["value"] < 0 < people["real0"]["overall"]["leave_one_out"]["value"]
    assert o["trend"]["first_half"] is not None and o["trend"]["second_half"] is not None


def _usr() -> Ratings:
    from slm_annotator.model.devdata import load_usr_personachat

    try:
        ds = load_usr_personachat()
    except (OSError, ValueError) as exc:
        pytest.skip(f"USR PersonaChat not found under $SLM_SHARED_DATA: {exc}")
    ratings = Ratings([DimSpec(k, ds.levels[k], ds.domains[k]) for k in ds.levels])
    for it in ds.items:
        for rater, values in it.ratings.items():
            ratings.human.setdefault(rater, {})[it.item_id] = {k: str(v) for k, v in values.items()}
    return ratings


def test_real_dev_set_with_an_injected_random_annotator() -> None:
    import os

    if not os.environ.get("SLM_SHARED_DATA"):
        pytest.skip("SLM_SHARED_DATA is not set")
    ratings = _usr()
    real = list(ratings.raters)
    rep = _json(annotator_report(_with_random_rater(ratings), None, n_boot=200))
    assert rep["annotators"]["random"]["flagged"]
    assert not any(rep["annotators"][name]["flagged"] for name in real), real


def test_three_labels_are_not_enough_data_and_never_flagged() -> None:
    ratings = _with_random_rater(synthetic())
    ratings.human["newbie"] = {item: {"sentiment": "neg", "quality": "1"} for item in ratings.items[:3]}
    rep = _json(annotator_report(ratings, None, n_boot=100))
    newbie = rep["annotators"]["newbie"]
    assert newbie["n_labels"] == 3 and not newbie["flagged"] and newbie["flagged_dimensions"] == []
    for entry in [newbie["overall"], *newbie["dimensions"].values()]:
        assert entry["vs_consensus"]["value"] is None and "not enough data" in entry["vs_consensus"]["reason"]
        assert entry["flagged"] is False
    assert f"fewer than {MIN_LABELS}" in newbie["dimensions"]["sentiment"]["vs_consensus"]["reason"]
    assert rep["annotators"]["random"]["flagged"]  # the newcomer does not hide the random annotator


def test_single_rater_tasks_and_tiny_teams_are_not_enough_data() -> None:
    ratings = Ratings([SENT])
    for j in range(30):  # everyone labels their own tasks: nothing is shared
        for r in ("a", "b", "c"):
            ratings.human.setdefault(r, {})[f"{r}{j}"] = {"sentiment": SENT.values[j % 3]}
    rep = _json(build_report(ratings, n_boot=50))
    for a in rep["annotators"]["annotators"].values():
        assert not a["flagged"] and "no item shared" in a["overall"]["vs_consensus"]["reason"]
    two = Ratings([SENT])  # two annotators: who is off cannot be told
    for j in range(40):
        two.human.setdefault("a", {})[f"t{j}"] = {"sentiment": SENT.values[j % 3]}
        two.human.setdefault("b", {})[f"t{j}"] = {"sentiment": SENT.values[(j * 7) % 3]}
    rep = _json(annotator_report(two, None, n_boot=50))
    for a in rep["annotators"].values():
        assert not a["flagged"] and "a flag needs 3" in a["overall"]["flag_reason"]
    assert _json(annotator_report(Ratings([SENT]), None, n_boot=10))["annotators"] == {}


def _ann(aid: int, who: str, value: str, gold: bool = False, cancelled: bool = False) -> dict[str, Any]:
    return {"id": aid, "completed_by": {"email": who}, "ground_truth": gold, "was_cancelled": cancelled,
            "created_at": f"2024-01-{aid % 28 + 1:02d}T10:00:00Z",
            "result": [{"from_name": "sentiment", "to_name": "text", "type": "choices",
                        "value": {"choices": [value]}}]}


def _pred(value: str) -> dict[str, Any]:
    return {"model_version": "v1", "result": [{"from_name": "sentiment", "to_name": "text", "type": "choices",
                                                "value": {"choices": [value]}}]}


# Golden answers of tasks 1-5: pos, neg, neutral, pos, neg.
# a@x: pos, neg, neutral, neg, neg  -> 4 of 5 right. b@x: pos, pos, pos (tasks 1-3; task 4 cancelled) -> 1 of 3.
# The model: pos, neg, pos, pos, pos -> 3 of 5. gold@x made the golden annotations: not scored against itself.
GOLDEN_EXPORT = [
    {"id": 1, "data": {"text": "t1"}, "annotations": [_ann(10, "gold@x", "pos", True), _ann(11, "a@x", "pos"),
                                                      _ann(12, "b@x", "pos")], "predictions": [_pred("pos")]},
    {"id": 2, "data": {"text": "t2"}, "annotations": [_ann(20, "gold@x", "neg", True), _ann(21, "a@x", "neg"),
                                                      _ann(22, "b@x", "pos")], "predictions": [_pred("neg")]},
    {"id": 3, "data": {"text": "t3"}, "annotations": [_ann(30, "gold@x", "neutral", True),
                                                      _ann(31, "a@x", "neutral"), _ann(32, "b@x", "pos")],
     "predictions": [_pred("pos")]},
    {"id": 4, "data": {"text": "t4"}, "annotations": [_ann(40, "gold@x", "pos", True), _ann(41, "a@x", "neg"),
                                                      _ann(42, "b@x", "neg", cancelled=True)],
     "predictions": [_pred("pos")]},
    {"id": 5, "data": {"text": "t5"}, "annotations": [_ann(50, "gold@x", "neg", True), _ann(51, "a@x", "neg")],
     "predictions": [_pred("pos")]},
    {"id": 6, "data": {"text": "t6"}, "annotations": [_ann(61, "a@x", "pos"), _ann(62, "b@x", "pos")]},
]


def test_golden_task_accuracy_matches_hand_counts(tmp_path: Path) -> None:
    ratings = from_ls_tasks(GOLDEN_EXPORT, CONFIG, "golden.json")
    assert set(ratings.golden) == {"1", "2", "3", "4", "5"} and ratings.golden["3"][0] == "gold@x"
    rep = _json(build_report(ratings, "v1", n_boot=20))["annotators"]
    assert rep["n_golden"] == 5
    a, b = rep["annotators"]["a@x"], rep["annotators"]["b@x"]
    assert a["dimensions"]["sentiment"]["vs_golden"]["matches"] == 4
    assert a["dimensions"]["sentiment"]["vs_golden"]["n"] == 5
    assert a["overall"]["vs_golden"]["accuracy"] == pytest.approx(4 / 5)
    assert b["overall"]["vs_golden"]["accuracy"] == pytest.approx(1 / 3) and b["overall"]["vs_golden"]["n"] == 3
    gold = rep["annotators"]["gold@x"]["overall"]["vs_golden"]
    assert gold["accuracy"] is None and gold["n"] == 0  # its own answers do not count
    model = rep["model_vs_golden"]
    assert model["overall"]["accuracy"] == pytest.approx(3 / 5) and model["overall"]["n"] == 5
    assert model["dimensions"]["sentiment"]["matches"] == 3
    # alpha against the golden answers, next to accuracy: a's 5 pairs as a two-rater matrix
    codes = {"pos": 0.0, "neg": 1.0, "neutral": 2.0}
    want = alpha([[codes[v] for v in ("pos", "neg", "neutral", "pos", "neg")],
                  [codes[v] for v in ("pos", "neg", "neutral", "neg", "neg")]], "nominal", [0.0, 1.0, 2.0])
    assert a["dimensions"]["sentiment"]["vs_golden"]["value"] == pytest.approx(want.value)
    # through the CLI: JSON, terminal table, HTML
    path = tmp_path / "export.json"
    path.write_text(json.dumps(GOLDEN_EXPORT))
    (tmp_path / "config.xml").write_text(CONFIG)
    assert main(["evaluate", "--data", str(path), "--label-config", str(tmp_path / "config.xml"), "--n-boot", "20",
                 "--out", str(tmp_path / "out")]) == 0
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["annotators"]["annotators"]["a@x"]["overall"]["vs_golden"]["accuracy"] == pytest.approx(0.8)
    html = (tmp_path / "out" / "report.html").read_text()
    assert "Which annotator is off?" in html and "0.800 (n=5)" in html and "0.600 on 5 golden answers" in html


def test_the_html_section_names_the_flagged_annotator_and_escapes_names() -> None:
    ratings = _with_random_rater(synthetic(n_items=80))
    ratings.human["<b>x</b>"] = {item: {"sentiment": "neg"} for item in ratings.items[:3]}
    report = build_report(ratings, n_boot=100)
    page = render_evaluate(report)
    assert 'id="annotators"' in page and "Which annotator is off?" in page
    assert "Flagged: random" in page and "<b>flagged</b>" in page and "⚑" in page
    assert "&lt;b&gt;x&lt;/b&gt;" in page and "<b>x</b>" not in page
    assert "not enough data" in page and "team median" in page and "nan" not in page.lower().replace("nanos", "")
    assert "No golden tasks" in page
    table = annotator_table(report)
    assert table.splitlines()[2].startswith("| random |") and "FLAGGED" in table


def test_reads_ground_truth_from_a_label_studio_export_file(tmp_path: Path) -> None:
    path = tmp_path / "export.json"
    path.write_text(json.dumps(GOLDEN_EXPORT))
    ratings = read_ratings(path, CONFIG)
    assert ratings.golden["1"] == ("gold@x", {"sentiment": "pos"})
    assert ratings.times["a@x"]["1"].startswith("2024-01-")
    assert "4" not in ratings.human["b@x"]  # the cancelled annotation is no label


def test_golden_answers_from_the_webhook_path_reach_the_live_report(settings) -> None:
    """ground_truth on an annotation is stored (migration 0005), a toggle alone updates it, and the project's
    report scores the annotators against it."""
    from slm_annotator.labelstudio.annotations import label_from_annotation
    from slm_annotator.model.annotations_io import from_store, result_values
    from slm_annotator.model.rubric import parse_label_config
    from slm_annotator.project_report import build_project_report
    from slm_annotator.store import Store

    store = Store(settings.database_url)
    store.upsert_project("g1", label_config=CONFIG)
    rubric = parse_label_config(CONFIG)
    for task in GOLDEN_EXPORT:
        for ann in task["annotations"]:
            ann = {**ann, "updated_at": "2024-02-01T00:00:00Z"}
            store.upsert_label("g1", label_from_annotation(ann, task, "webhook", result_values(rubric, ann["result"])))
    assert set(from_store(store, "g1").golden) == {"1", "2", "3", "4", "5"}
    toggled = {**GOLDEN_EXPORT[0]["annotations"][0], "ground_truth": False, "updated_at": "2024-03-01T00:00:00Z"}
    assert store.upsert_label("g1", label_from_annotation(toggled, GOLDEN_EXPORT[0], "webhook", {"sentiment": "pos"}))
    assert set(from_store(store, "g1").golden) == {"2", "3", "4", "5"}
    report = build_project_report(store, "g1", "base", n_boot=10, hide_raters=True)
    people = report["agreement"]["annotators"]["annotators"]
    assert people["rater 2"]["overall"]["vs_golden"]["accuracy"] == pytest.approx(3 / 4)  # a@x without task 1
