"""Rater weighting (issue 18 part 3): each rater's vote weighted by a reliability estimated from the labels alone."""

from __future__ import annotations

import json
import random
from dataclasses import replace

import pytest

from slm_annotator.model.dataset import Example, majority_values, relabel
from slm_annotator.model.plan import label_counts
from slm_annotator.model.reliability import FLOOR, MIN_SHARED, estimate
from slm_annotator.model.rubric import parse_label_config
from slm_annotator.settings import RATER_WEIGHTINGS, load_settings
from slm_annotator.store import LabelIn, Store
from slm_annotator.testing import fill, toy_label

SCALE = parse_label_config("""<View><Text name="text" value="$text"/>
  <Rating name="quality" toName="text" maxRating="5"/>
  <Choices name="fluent" toName="text"><Choice value="no"/><Choice value="yes"/></Choices></View>""")


def team(n_tasks: int, seed: int = 0, careless_labels: int | None = None) -> list[Example]:
    """Three raters who give the true value (or a neighbour, 20%) and one who answers at random.

    quality is spread over 1..5; fluent is "yes" on 90% of the tasks (a skewed scale, where a confusion matrix
    per rater has little to go on). careless_labels: the random rater labels only the first N tasks."""
    rng = random.Random(seed)
    out = []
    for t in range(n_tasks):
        truth = rng.randint(1, 5)
        fluent = "yes" if rng.random() < 0.9 else "no"
        ratings = {}
        for rater in ("ann", "bob", "cat"):
            q = min(5, max(1, truth + (rng.choice((-1, 1)) if rng.random() < 0.2 else 0)))
            ratings[rater] = {"quality": str(q), "fluent": fluent if rng.random() < 0.95 else "no"}
        if careless_labels is None or t < careless_labels:
            ratings["dan"] = {"quality": str(rng.randint(1, 5)), "fluent": rng.choice(["no", "yes"])}
        out.append(Example(str(t), {"text": f"task {t}"}, ratings))
    return out


@pytest.mark.parametrize("method", ["one_coin", "dawid_skene"])
def test_a_random_rater_counts_little_and_the_team_fully(method) -> None:
    rel = estimate(SCALE, team(150), method)
    weights = {r: w.weight for r, w in rel.dims["quality"].items()}
    assert weights["dan"] < 0.3, weights
    assert min(weights[r] for r in ("ann", "bob", "cat")) > 0.8, weights
    assert rel.dims["quality"]["dan"].labels == 150 and rel.dims["quality"]["dan"].skill < 0.2


def test_one_coin_finds_the_random_rater_on_a_skewed_scale_too() -> None:
    weights = {r: w.weight for r, w in estimate(SCALE, team(150), "one_coin").dims["fluent"].items()}
    assert weights["dan"] < 0.5 and min(weights[r] for r in ("ann", "bob", "cat")) > 0.8, weights


def test_auto_weights_only_where_a_rater_sits_far_below_the_team() -> None:
    """auto: a clean team trains exactly as with off; with a random rater it is one_coin's weighting."""
    clean = [replace(e, ratings={r: v for r, v in e.ratings.items() if r != "dan"}) for e in team(150)]
    rel = estimate(SCALE, clean, "auto")
    assert rel.dims == {} and "no rater far below the team" in rel.reasons["quality"]
    assert rel.apply(clean) == [replace(e, weights={}) for e in clean]
    noisy = estimate(SCALE, team(150), "auto")
    assert noisy.dims["quality"] == estimate(SCALE, team(150), "one_coin").dims["quality"]
    assert noisy.dims["quality"]["dan"].weight < 0.3


def test_a_rater_with_three_labels_is_barely_moved() -> None:
    """Shrinkage toward the team: three random answers are not evidence enough to silence anyone."""
    rel = estimate(SCALE, team(150, careless_labels=3), "one_coin")
    assert rel.dims["quality"]["dan"].labels == 3
    assert rel.dims["quality"]["dan"].weight > 0.7


def test_too_few_raters_or_shared_tasks_keep_every_weight_and_say_why() -> None:
    two = [replace(e, ratings={r: v for r, v in e.ratings.items() if r in ("ann", "dan")}) for e in team(60)]
    rel = estimate(SCALE, two, "one_coin")
    assert rel.dims == {} and "2 rater(s)" in rel.reasons["quality"]
    few = team(MIN_SHARED - 1)
    assert "tasks with two or more raters" in estimate(SCALE, few, "one_coin").reasons["quality"]
    seat = ("ann", "bob", "cat")
    single = [replace(e, ratings={seat[n % 3]: e.ratings[seat[n % 3]]}) for n, e in enumerate(team(60))]
    assert "0 tasks with two or more raters" in estimate(SCALE, single, "one_coin").reasons["quality"]
    assert [e.targets(SCALE) for e in rel.apply(two)] == [e.targets(SCALE) for e in two]
    assert estimate(SCALE, team(60), "off").apply(team(60)) == team(60)
    with pytest.raises(ValueError, match="rater weighting must be one of"):
        estimate(SCALE, team(60), "crowd")
    assert estimate(SCALE, [], "one_coin").dims == {}


def test_an_estimate_that_fails_leaves_every_vote_at_one(monkeypatch) -> None:
    """Weighting is an option on top of training: a failed or non-finite estimate never takes a run down."""
    from slm_annotator.model import reliability

    monkeypatch.setattr(reliability, "_one_coin_skills", lambda rows, k: dict.fromkeys("abcd", float("nan")))
    rel = estimate(SCALE, team(60), "auto")
    assert rel.dims == {} and "did not converge" in rel.reasons["quality"]

    def boom(rows: object, k: int) -> dict[str, float]:
        raise ZeroDivisionError("degenerate")

    monkeypatch.setattr(reliability, "_one_coin_skills", boom)
    assert estimate(SCALE, team(60), "one_coin").apply(team(60)) == team(60)


def test_weights_reach_targets_consensus_and_label_shares_alike() -> None:
    """Example.counts is the one place votes are counted: soft targets, the consensus, the decision's shares."""
    e = Example("1", {"text": "x"}, {"a": {"quality": "4"}, "b": {"quality": "4"}, "c": {"quality": "2"},
                                     "d": {"quality": "1"}, "e": {"quality": "1"}, "f": {"quality": "1"}})
    dim = SCALE.dimensions[0]
    assert e.counts(dim) == [3.0, 1.0, 0.0, 2.0, 0.0] and majority_values(e, SCALE)["quality"] == "1"
    w = replace(e, weights={"quality": {"d": 0.1, "e": 0.1, "f": 0.1}})
    assert w.counts(dim) == pytest.approx([0.3, 1.0, 0.0, 2.0, 0.0])
    assert w.targets(SCALE)[0] == pytest.approx([0.3 / 3.3, 1 / 3.3, 0.0, 2 / 3.3, 0.0])
    assert majority_values(w, SCALE)["quality"] == "4"
    assert label_counts(dim, [w, w]) == pytest.approx([0.6, 2.0, 0.0, 4.0, 0.0])
    assert relabel([w], SCALE, "majority")[0].ratings == {"majority": {"quality": "4"}}
    assert all(x.weights == w.weights for x in relabel([w], SCALE, "per_rater"))


def test_a_careless_vote_barely_moves_a_weighted_target() -> None:
    examples = team(150)
    rel = estimate(SCALE, examples, "one_coin")
    weighted = rel.apply(examples)
    dim = SCALE.dimensions[0]
    moved_before = moved_after = 0.0
    for raw, w in zip(examples, weighted, strict=True):
        real = replace(raw, ratings={r: v for r, v in raw.ratings.items() if r != "dan"}).targets(SCALE)[0]
        moved_before += sum(abs(a - b) for a, b in zip(raw.targets(SCALE)[0], real, strict=True))
        moved_after += sum(abs(a - b) for a, b in zip(w.targets(SCALE)[0], real, strict=True))
    assert moved_after < 0.25 * moved_before
    assert all(w.weights["quality"]["dan"] >= FLOOR for w in weighted)
    summary = rel.summary()["dimensions"]["quality"]
    assert summary["raters"] == 4 and summary["down_weighted"] >= 1 and summary["lowest_weight"] < 0.3
    assert "dan" not in str(rel.summary()) and dim.key in rel.summary()["dimensions"]


def test_the_setting_is_declared_once_and_bad_values_are_refused(monkeypatch) -> None:
    monkeypatch.setenv("RATER_WEIGHTING", "Dawid-Skene")
    with pytest.raises(ValueError, match="RATER_WEIGHTING must be one of off, auto, one_coin, dawid_skene"):
        load_settings()
    monkeypatch.delenv("RATER_WEIGHTING")
    assert load_settings().rater_weighting == "auto" and set(RATER_WEIGHTINGS) == {"off", "auto", "one_coin",
                                                                                   "dawid_skene"}


@pytest.mark.slow  # the real all-MiniLM-L6-v2 weights
def test_a_project_that_asks_for_weighting_trains_its_head_on_weighted_votes(settings) -> None:
    """Through the worker's run: the default (auto) down-weights the random rater, the run's metrics and the live
    report say so; a project's training.rater_weighting "off" leaves every vote at 1 and records nothing."""
    from slm_annotator.model.report_html import render_project
    from slm_annotator.project_report import build_project_report
    from slm_annotator.worker.head_run import run_head
    from slm_annotator.worker.pipeline import load_examples

    store = Store(settings.database_url)
    rng = random.Random(3)
    for project in ("1", "2"):
        fill(store, project, n_tasks=40)
        for t in range(40):
            store.upsert_label(project, toy_label(t, 5000 + t, "cat"))
            noisy = toy_label(t, 9000 + t, "dan", flip=rng.random() < 0.5)
            store.upsert_label(project, LabelIn(**{**noisy.__dict__}))
    store.upsert_project("2", extra_params={"training": {"rater_weighting": "off"}})
    _, examples, rel = load_examples(settings, store, "1")
    assert rel.method == "auto" and examples[0].weights["sentiment"]["dan"] < 0.3
    outcome = run_head(settings, store, "1", store.start_run("1", "inline", "test").id)
    sentiment = outcome.metrics["rater_weights"]["dimensions"]["sentiment"]
    assert sentiment["down_weighted"] == 1 and sentiment["lowest_weight"] < 0.3 and sentiment["raters"] == 4
    stored = store.served_adapter("1").metrics
    assert stored["rater_weights"]["method"] == "auto"
    report = build_project_report(store, "1", settings.base_version, n_boot=50, rater_weighting="auto")
    assert report["rater_weights"]["dimensions"]["sentiment"]["down_weighted"]["dan"] < 0.3
    page = render_project(report)
    assert "Rater weighting in training (auto)" in page and "dan: 0." in page
    hidden = build_project_report(store, "1", settings.base_version, n_boot=50, hide_raters=True,
                                  rater_weighting="auto")
    assert "dan" not in json.dumps(hidden) and list(hidden["rater_weights"]["dimensions"]["sentiment"][
        "down_weighted"]) == ["rater 4"]
    _, plain, rel_off = load_examples(settings, store, "2")
    assert rel_off.method == "off" and all(e.weights == {} for e in plain)
    outcome_off = run_head(settings, store, "2", store.start_run("2", "inline", "test").id)
    assert "rater_weights" not in outcome_off.metrics
    assert "Rater weighting" not in render_project(build_project_report(store, "2", settings.base_version, n_boot=50))
