"""Agreement metrics against published and hand-computed values."""

from __future__ import annotations

import json
import math

import pytest

from slm_annotator.model.agreement import (
    ALL_EQUAL,
    NOT_ENOUGH_PAIRS,
    AlphaResult,
    accuracy,
    alpha,
    bootstrap_ci,
    confusion_matrix,
    consensus,
    dimension_report,
    expected_calibration_error,
    mae,
    mean_pairwise_human_alpha,
    mean_pairwise_model_alpha,
    model_vs_consensus,
    model_vs_each_human,
    model_vs_humans,
    reliability_diagram,
)

# Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability", section C: 4 observers x 12 units,
# values 1-5, with missing data. Published: nominal .743, ordinal .815, interval .849.
K2011: list[list[float | None]] = [
    [1, 2, 3, 3, 2, 1, 4, 1, 2, None, None, None],
    [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, None, 3],
    [None, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, None],
    [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, None],
]


@pytest.mark.parametrize(("level", "expected"), [("nominal", 0.743), ("ordinal", 0.815), ("interval", 0.849)])
def test_krippendorff_2011_published_values(level: str, expected: float) -> None:
    result = alpha(K2011, level)  # type: ignore[arg-type]
    assert result.reason is None
    assert result.value is not None and round(result.value, 3) == expected


def test_perfect_agreement_is_one() -> None:
    for level in ("nominal", "ordinal", "interval"):
        assert alpha([[1, 2, 3, 1], [1, 2, 3, 1], [1, 2, None, 1]], level).value == pytest.approx(1.0)


def test_hand_computed_two_by_four_nominal() -> None:
    # A = [1, 1, 2, 2], B = [1, 2, 2, 2]. Pairable values n = 8: n_1 = 3, n_2 = 5.
    # Coincidences: o_11 = 2 (unit 1), o_12 = o_21 = 1 (unit 2), o_22 = 4 (units 3, 4).
    # alpha = 1 - (n - 1) * (o_12 + o_21) / (2 * n_1 * n_2) = 1 - 7 * 2 / 30 = 8/15 = 0.5333...
    result = alpha([[1, 1, 2, 2], [1, 2, 2, 2]], "nominal")
    assert result.value == pytest.approx(8 / 15)


def test_systematic_disagreement_is_negative() -> None:
    result = alpha([[1, 2, 1, 2], [2, 1, 2, 1]], "nominal")
    assert result.value is not None and result.value < 0


@pytest.mark.parametrize("level", ["nominal", "ordinal", "interval"])
def test_all_values_equal_is_undefined_not_nan(level: str) -> None:
    for domain in (None, [1, 2, 3]):
        result = alpha([[2, 2, 2], [2, 2, None]], level, domain)  # type: ignore[arg-type]
        assert result == AlphaResult(None, ALL_EQUAL)


def test_all_pairable_values_equal_even_if_a_lone_rating_differs() -> None:
    # Item 3 has one rating only, so it cannot be paired: the pairable values are all 1.
    assert alpha([[1, 1, 3], [1, 1, None]], "ordinal").value is None


def test_single_rater_or_no_overlap_is_undefined() -> None:
    assert alpha([[1, 2, 3]], "nominal") == AlphaResult(None, NOT_ENOUGH_PAIRS)
    assert alpha([[1, None], [None, 2]], "nominal") == AlphaResult(None, NOT_ENOUGH_PAIRS)
    assert alpha([], "nominal").reason == NOT_ENOUGH_PAIRS


def test_ragged_matrix_and_bad_level_raise() -> None:
    with pytest.raises(ValueError, match="differ in length"):
        alpha([[1, 2], [1]], "nominal")
    with pytest.raises(ValueError, match="level"):
        alpha([[1, 2], [1, 2]], "ratio")  # type: ignore[arg-type]


def test_nan_counts_as_missing() -> None:
    assert alpha([[1, 2, math.nan], [1, 2, 3]], "nominal").value == pytest.approx(1.0)


def test_value_domain_for_ordinal() -> None:
    data: list[list[float | None]] = [[1, 2, 3, 3, 2], [1, 3, 3, 2, 2], [2, 2, 3, 3, None]]
    bare = alpha(data, "ordinal")
    wide = alpha(data, "ordinal", [1, 2, 3, 4, 5])
    # Krippendorff's ordinal distance sums the marginals of the categories in between; unused categories
    # have marginal 0, so the full scale leaves alpha unchanged (the package's own doctest shows the same).
    assert bare.value is not None and wide.value == pytest.approx(bare.value)
    # Unordered domain input is sorted; out-of-scale values are reported, not raised.
    assert alpha(data, "ordinal", [5, 4, 3, 2, 1]).value == pytest.approx(bare.value)
    out = alpha(data, "ordinal", [1, 2])
    assert out.value is None and out.reason is not None and "outside value_domain" in out.reason
    # Ordinal differs from nominal here: a 2-vs-3 disagreement costs less than 1-vs-3.
    assert alpha(data, "nominal").value != pytest.approx(bare.value)


def test_consensus_rules() -> None:
    human: list[list[float | None]] = [
        [1, 3, 1, None, 2],
        [2, 3, 3, None, 3],
        [2, 1, None, None, None],
    ]
    # Nominal: majority; item 3 is a 1-vs-3 tie -> smallest value; item 4 has no rating.
    assert consensus(human, "nominal") == [2, 3, 1, None, 2]
    # Ordinal: medians 2, 3, 2 (1 and 3), 2.5 -> tie between 2 and 3 goes to the lower.
    assert consensus(human, "ordinal") == [2, 3, 2, None, 2]
    # With a domain lacking 2, medians of 2 are 1-vs-3 ties (-> 1); 2.5 rounds to 3.
    assert consensus(human, "ordinal", [1, 3, 5]) == [1, 3, 1, None, 3]
    assert consensus(human, "interval") == pytest.approx([5 / 3, 7 / 3, 2, None, 2.5])


def test_model_alphas() -> None:
    human: list[list[float | None]] = [[1, 2, 3, 1, 2, 3], [1, 2, 3, 1, 2, 2]]
    perfect = [1, 2, 3, 1, 2, 3]
    assert model_vs_humans(human, perfect, "nominal").value == pytest.approx(
        alpha([*human, perfect], "nominal").value
    )
    assert model_vs_consensus(human, perfect, "ordinal").value is not None
    each = model_vs_each_human(human, perfect, "ordinal")
    assert each[0].value == pytest.approx(1.0)
    mean = mean_pairwise_model_alpha(human, perfect, "ordinal")
    assert mean.value == pytest.approx((each[0].value + each[1].value) / 2)  # type: ignore[operator]
    with pytest.raises(ValueError, match="predictions"):
        model_vs_humans(human, [1, 2], "nominal")


def test_mean_pairwise_skips_undefined_raters() -> None:
    # Rater 2 shares no item with the model: its alpha is undefined and left out of the mean.
    human: list[list[float | None]] = [[1, 2, 1, 2], [None, None, None, None]]
    result = mean_pairwise_model_alpha(human, [1, 2, 1, 2], "nominal")
    assert result.value == pytest.approx(1.0)
    none = mean_pairwise_model_alpha([[None, None]], [1, 2], "nominal")
    assert none.value is None and "undefined" in (none.reason or "")
    assert mean_pairwise_human_alpha([[1, 2, 1], [1, 2, 1], [1, 2, 2]], "nominal").value is not None


def test_bootstrap_ci_contains_point_estimate() -> None:
    human = [[1, 2, 3, 1, 2, 3, 1, 2, 3, 2] * 3, [1, 2, 3, 1, 2, 2, 1, 2, 3, 2] * 3]
    point = alpha(human, "ordinal").value
    assert point is not None
    ci = bootstrap_ci(
        lambda idx: alpha([[r[i] for i in idx] for r in human], "ordinal").value,
        n_items=30,
        n_boot=300,
        seed=1,
    )
    assert ci is not None and ci[0] <= point <= ci[1] and ci[0] < ci[1]
    assert ci == bootstrap_ci(
        lambda idx: alpha([[r[i] for i in idx] for r in human], "ordinal").value,
        n_items=30,
        n_boot=300,
        seed=1,
    )


def test_bootstrap_ci_undefined() -> None:
    assert bootstrap_ci(lambda idx: None, n_items=10, n_boot=50) is None
    assert bootstrap_ci(lambda idx: math.nan, n_items=10, n_boot=50) is None
    assert bootstrap_ci(lambda idx: 1.0, n_items=0) is None
    # Mostly-undefined resamples (here: whenever item 0 is not drawn first) -> None.
    assert bootstrap_ci(lambda idx: 1.0 if idx[0] == 0 else None, n_items=10, n_boot=100) is None


def test_confusion_matrix_accuracy_mae() -> None:
    truth = [1, 1, 2, 3, None, 3]
    pred = [1, 2, 2, 3, 1, None]
    assert confusion_matrix(truth, pred, [1, 2, 3]) == [[1, 1, 0], [0, 1, 0], [0, 0, 1]]
    assert accuracy(truth, pred) == pytest.approx(3 / 4)
    assert mae(truth, pred) == pytest.approx(1 / 4)
    assert accuracy([None], [1]) is None and mae([], []) is None
    with pytest.raises(ValueError, match="not in labels"):
        confusion_matrix([1], [4], [1, 2, 3])
    assert confusion_matrix(["a", "b"], ["b", "b"], ["a", "b"]) == [[0, 1], [0, 1]]


def test_ece_hand_example() -> None:
    # 2 bins. Bin [0, .5): conf .2, .4 (mean .3), correct 0/2 -> |0 - .3| = .3, weight 2/5.
    # Bin [.5, 1]: conf .6, .8, 1.0 (mean .8), correct 2/3 -> |.667 - .8| = .1333, weight 3/5.
    # ECE = .4 * .3 + .6 * .13333 = .12 + .08 = .2
    conf = [0.2, 0.4, 0.6, 0.8, 1.0]
    correct = [False, False, True, False, True]
    assert expected_calibration_error(conf, correct, n_bins=2) == pytest.approx(0.2)
    bins = reliability_diagram(conf, correct, n_bins=2)
    assert [b["count"] for b in bins] == [2, 3]
    assert bins[1]["mean_confidence"] == pytest.approx(0.8) and bins[1]["accuracy"] == pytest.approx(2 / 3)
    assert expected_calibration_error([0.9, 0.9], [True, True], n_bins=10) == pytest.approx(0.1)
    assert reliability_diagram([0.05], [True], n_bins=10)[5]["accuracy"] is None
    with pytest.raises(ValueError):
        expected_calibration_error([], [])
    with pytest.raises(ValueError):
        expected_calibration_error([1.5], [True])


def test_dimension_report_is_json_without_nan() -> None:
    human: list[list[float | None]] = [
        [1, 2, 3, 3, 2, 1, 2, 3, None, 1],
        [1, 2, 3, 2, 2, 1, 2, 3, 3, 1],
        [1, 3, 3, 3, None, 1, 2, 2, 3, 2],
    ]
    model: list[float | None] = [1, 2, 3, 3, 2, 2, 2, 3, None, 1]
    report = dimension_report(
        human, model, "ordinal", value_domain=[1, 2, 3, 4, 5], n_boot=100, rater_names=["a", "b", "c"]
    )
    text = json.dumps(report, allow_nan=False)
    assert "NaN" not in text
    assert report["n_items"] == 10 and report["n_raters"] == 3
    assert report["human_alpha"]["value"] == pytest.approx(alpha(human, "ordinal").value)
    assert report["human_alpha"]["ci"] is not None
    assert set(report["model_vs_each_human"]) == {"a", "b", "c"}
    assert report["confusion_vs_consensus"]["labels"] == ["1", "2", "3", "4", "5"]
    assert report["predicted_histogram"] == {"1": 2, "2": 4, "3": 3, "4": 0, "5": 0}
    assert sum(report["human_histogram"].values()) == 28
    assert report["accuracy_vs_consensus"]["value"] is not None and "mae_vs_consensus" in report


def test_dimension_report_undefined_everything() -> None:
    report = dimension_report([[2, 2, 2]], [2, 2, 2], "nominal", n_boot=50)
    json.dumps(report, allow_nan=False)
    assert report["human_alpha"] == {"value": None, "reason": NOT_ENOUGH_PAIRS, "ci": None}
    assert report["model_alpha_as_rater"]["reason"] == ALL_EQUAL
    assert report["accuracy_vs_consensus"]["value"] == 1.0
    assert "mae_vs_consensus" not in report
    interval = dimension_report([[1.5, 2.0], [1.0, 2.5]], [None, None], "interval", n_boot=20)
    assert interval["mae_vs_consensus"] == {"value": None, "reason": "no paired items"}
    assert "confusion_vs_consensus" not in interval
