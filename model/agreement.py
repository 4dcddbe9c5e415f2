"""Agreement metrics for rubric annotation: is the model as reliable a rater as the humans are?

Krippendorff's alpha is the yardstick because it handles any number of raters, missing ratings and the
nominal / ordinal / interval levels that rubric dimensions come in. The model is judged three ways:
as one more rater next to the humans, against the human consensus, and against each human separately
(comparable to the human-human pairwise figure). Undefined values are ``None`` with a reason, never NaN,
so every report can go straight into JSON.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from collections.abc import Callable, Hashable, Sequence
from dataclasses import asdict, dataclass
from itertools import combinations
from typing import Any, Literal

import krippendorff
import numpy as np

Level = Literal["nominal", "ordinal", "interval"]
LEVELS: tuple[Level, ...] = ("nominal", "ordinal", "interval")

Matrix = Sequence[Sequence[float | None]]

NOT_ENOUGH_PAIRS = "not enough data: fewer than two raters on any item"
ALL_EQUAL = "not enough data: all values equal"


@dataclass
class AlphaResult:
    """An alpha value, or None with the reason it is undefined (so reports never carry NaN)."""

    value: float | None
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _missing(v: float | None) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _check_level(level: str) -> None:
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")


def _check_matrix(reliability: Matrix) -> int:
    """Number of items; ragged matrices are programming errors and raise."""
    widths = {len(row) for row in reliability}
    if len(widths) > 1:
        raise ValueError(f"reliability matrix rows differ in length: {sorted(widths)}")
    return widths.pop() if widths else 0


def _present(values: Sequence[float | None]) -> list[float]:
    """The non-missing values as floats."""
    return [float(v) for v in values if v is not None and not math.isnan(v)]


def _finite(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def alpha(reliability: Matrix, level: Level, value_domain: Sequence[float] | None = None) -> AlphaResult:
    """Krippendorff's alpha of a raters x items matrix (None = missing).

    For ordinal data pass the dimension's full ordered scale as ``value_domain``: it fixes the order and
    rejects out-of-scale values. (Krippendorff's ordinal distance weighs categories by how often they are
    used, so an unused category adds nothing; the domain does not change alpha, but makes it well defined.)
    """
    _check_level(level)
    n_items = _check_matrix(reliability)
    pairable: set[float] = set()
    for j in range(n_items):
        col = _present([row[j] for row in reliability])
        if len(col) >= 2:
            pairable.update(col)
    if not pairable:
        return AlphaResult(None, NOT_ENOUGH_PAIRS)
    if len(pairable) == 1:
        # Expected disagreement is zero: alpha is 0/0, not "perfect".
        return AlphaResult(None, ALL_EQUAL)
    data = np.array([[np.nan if _missing(v) else float(v) for v in row] for row in reliability], dtype=float)
    domain = None if value_domain is None else np.asarray(sorted(float(v) for v in value_domain))
    if domain is not None:
        outside = sorted(set(data[~np.isnan(data)].tolist()) - set(domain.tolist()))
        if outside:
            return AlphaResult(None, f"values outside value_domain: {outside[:10]}")
    try:
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            value = float(
                krippendorff.alpha(reliability_data=data, level_of_measurement=level, value_domain=domain)
            )
    except (ValueError, ZeroDivisionError, FloatingPointError) as exc:
        return AlphaResult(None, f"not enough data: {exc}")
    if not math.isfinite(value):
        return AlphaResult(None, ALL_EQUAL)
    return AlphaResult(value, None)


def _check_model(human: Matrix, model: Sequence[float | None]) -> int:
    n_items = _check_matrix(human)
    if human and len(model) != n_items:
        raise ValueError(f"model has {len(model)} predictions for {n_items} items")
    return len(model)


def model_vs_humans(
    human: Matrix, model: Sequence[float | None], level: Level, value_domain: Sequence[float] | None = None
) -> AlphaResult:
    """Alpha with the model as one more rater: drops below human-human alpha if the model is an outlier."""
    _check_model(human, model)
    return alpha([*human, list(model)], level, value_domain)


def _round_to_domain(x: float, domain: Sequence[float]) -> float:
    """Nearest domain value; a tie goes to the lower value so results are deterministic."""
    return min(sorted(domain), key=lambda d: (abs(d - x), d))


def consensus(human: Matrix, level: Level, value_domain: Sequence[float] | None = None) -> list[float | None]:
    """Per-item human consensus: majority (ties -> smallest value) for nominal, median rounded to the
    nearest domain value for ordinal (ties -> lower), mean for interval. None where no human rated."""
    _check_level(level)
    n_items = _check_matrix(human)
    observed = sorted({v for row in human for v in _present(row)})
    domain = sorted(float(v) for v in value_domain) if value_domain is not None else observed
    out: list[float | None] = []
    for j in range(n_items):
        col = _present([row[j] for row in human])
        if not col:
            out.append(None)
        elif level == "nominal":
            counts = Counter(col)
            top = max(counts.values())
            out.append(min(v for v, c in counts.items() if c == top))
        elif level == "ordinal":
            out.append(_round_to_domain(float(np.median(col)), domain))
        else:
            out.append(float(np.mean(col)))
    return out


def model_vs_consensus(
    human: Matrix, model: Sequence[float | None], level: Level, value_domain: Sequence[float] | None = None
) -> AlphaResult:
    """Alpha between the model and the human consensus: does it predict the label a team would settle on?"""
    _check_model(human, model)
    return alpha([consensus(human, level, value_domain), list(model)], level, value_domain)


def model_vs_each_human(
    human: Matrix, model: Sequence[float | None], level: Level, value_domain: Sequence[float] | None = None
) -> list[AlphaResult]:
    """Alpha of the model against each human rater alone (2-row matrices), in rater order."""
    _check_model(human, model)
    return [alpha([list(row), list(model)], level, value_domain) for row in human]


def _mean_defined(results: Sequence[AlphaResult], what: str) -> AlphaResult:
    values = [r.value for r in results if r.value is not None]
    if values:
        return AlphaResult(float(np.mean(values)), None)
    first = next((r.reason for r in results if r.reason), None)
    return AlphaResult(None, f"undefined for every {what}" + (f" ({first})" if first else ""))


def mean_pairwise_model_alpha(
    human: Matrix, model: Sequence[float | None], level: Level, value_domain: Sequence[float] | None = None
) -> AlphaResult:
    """Model vs each human, averaged over raters where defined: compare with mean human-human pairs."""
    return _mean_defined(model_vs_each_human(human, model, level, value_domain), "rater")


def mean_pairwise_human_alpha(
    human: Matrix, level: Level, value_domain: Sequence[float] | None = None
) -> AlphaResult:
    """Mean alpha over pairs of human raters (pairs sharing no item are skipped): the bar for the model."""
    _check_matrix(human)
    results = [alpha([list(a), list(b)], level, value_domain) for a, b in combinations(human, 2)]
    return _mean_defined(results, "pair of raters")


def bootstrap_ci(
    fn: Callable[[list[int]], float | None],
    n_items: int,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float] | None:
    """Percentile CI from resampling items with replacement; ``fn`` gets the resampled item indices.

    Resamples where ``fn`` is undefined (None/NaN) are ignored; if fewer than half are defined the interval
    would describe a different population, so None is returned.
    """
    if n_items <= 0 or n_boot <= 0:
        return None
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    rng = np.random.default_rng(seed)
    values: list[float] = []
    for _ in range(n_boot):
        v = _finite(fn(rng.integers(0, n_items, size=n_items).tolist()))
        if v is not None:
            values.append(v)
    if len(values) < 0.5 * n_boot:
        return None
    tail = (1 - level) / 2
    lo, hi = np.quantile(values, [tail, 1 - tail])
    return float(lo), float(hi)


def _pairs(truth: Sequence[Any], pred: Sequence[Any]) -> list[tuple[Any, Any]]:
    if len(truth) != len(pred):
        raise ValueError(f"truth has {len(truth)} values, pred {len(pred)}")
    return [(t, p) for t, p in zip(truth, pred, strict=True) if not _missing(t) and not _missing(p)]


def confusion_matrix(
    truth: Sequence[Hashable | None], pred: Sequence[Hashable | None], labels: Sequence[Hashable]
) -> list[list[int]]:
    """Counts with rows = truth, columns = prediction, in ``labels`` order; None pairs are skipped.

    A value outside ``labels`` raises: silently dropping it would hide a mismatched label set.
    """
    index = {label: i for i, label in enumerate(labels)}
    out = [[0] * len(labels) for _ in labels]
    for t, p in _pairs(truth, pred):
        for v in (t, p):
            if v not in index:
                raise ValueError(f"value {v!r} is not in labels {list(labels)}")
        out[index[t]][index[p]] += 1
    return out


def accuracy(truth: Sequence[Any], pred: Sequence[Any]) -> float | None:
    """Share of exact matches over pairs where both are given; None if there are none."""
    pairs = _pairs(truth, pred)
    return sum(t == p for t, p in pairs) / len(pairs) if pairs else None


def mae(truth: Sequence[float | None], pred: Sequence[float | None]) -> float | None:
    """Mean absolute error over pairs where both are given; None if there are none."""
    pairs = _pairs(truth, pred)
    return float(np.mean([abs(float(t) - float(p)) for t, p in pairs])) if pairs else None


def _check_calibration(confidences: Sequence[float], correct: Sequence[bool], n_bins: int) -> None:
    if len(confidences) != len(correct):
        raise ValueError(f"{len(confidences)} confidences for {len(correct)} outcomes")
    if n_bins < 1:
        raise ValueError("n_bins must be at least 1")
    bad = [c for c in confidences if not 0.0 <= c <= 1.0]
    if bad:
        raise ValueError(f"confidences must lie in [0, 1], got {bad[:5]}")


def reliability_diagram(
    confidences: Sequence[float], correct: Sequence[bool], n_bins: int = 10
) -> list[dict[str, Any]]:
    """Equal-width confidence bins [lo, hi) (the last includes 1.0) with count, mean confidence and accuracy.

    Empty bins have None for the means, so the list can be plotted or serialised as is.
    """
    _check_calibration(confidences, correct, n_bins)
    bins: list[list[tuple[float, bool]]] = [[] for _ in range(n_bins)]
    for c, ok in zip(confidences, correct, strict=True):
        bins[min(int(c * n_bins), n_bins - 1)].append((float(c), bool(ok)))
    return [
        {
            "lo": i / n_bins,
            "hi": (i + 1) / n_bins,
            "count": len(b),
            "mean_confidence": float(np.mean([c for c, _ in b])) if b else None,
            "accuracy": float(np.mean([ok for _, ok in b])) if b else None,
        }
        for i, b in enumerate(bins)
    ]


def expected_calibration_error(
    confidences: Sequence[float], correct: Sequence[bool], n_bins: int = 10
) -> float:
    """ECE: count-weighted mean |accuracy - confidence| over equal-width bins. Raises on empty input."""
    if not confidences:
        raise ValueError("expected_calibration_error needs at least one prediction")
    total = len(confidences)
    return float(
        sum(
            b["count"] / total * abs(b["accuracy"] - b["mean_confidence"])
            for b in reliability_diagram(confidences, correct, n_bins)
            if b["count"]
        )
    )


def _key(v: Any) -> str:
    """JSON key for a value: 3.0 -> "3", 2.5 -> "2.5"."""
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def _histogram(values: Sequence[Any], labels: Sequence[Any]) -> dict[str, int]:
    counts = Counter(v for v in values if not _missing(v))
    keys = list(labels) + sorted((v for v in counts if v not in labels), key=str)
    return {_key(k): counts.get(k, 0) for k in keys}


def dimension_report(
    human: Matrix,
    model: Sequence[float | None],
    level: Level,
    value_domain: Sequence[float] | None = None,
    labels: Sequence[float] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    rater_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Everything needed to judge the model on one dimension, as one JSON-serialisable dict.

    Alphas carry a bootstrap CI over items (``n_boot=0`` skips it). Accuracy and the confusion matrix are
    against the human consensus (nominal/ordinal); MAE for ordinal/interval.
    """
    _check_level(level)
    n_items = _check_model(human, model)
    model = list(model)
    domain = None if value_domain is None else [float(v) for v in value_domain]
    cons = consensus(human, level, domain)

    def with_ci(result: AlphaResult, fn: Callable[[list[int]], float | None]) -> dict[str, Any]:
        ci = bootstrap_ci(fn, n_items, n_boot, seed) if result.value is not None else None
        return {**result.to_dict(), "ci": list(ci) if ci else None}

    def sub(rows: Matrix, idx: list[int]) -> list[list[float | None]]:
        return [[row[i] for i in idx] for row in rows]

    human_alpha = alpha(human, level, domain)
    report: dict[str, Any] = {
        "level": level,
        "n_items": n_items,
        "n_raters": len(human),
        "n_items_with_two_ratings": sum(
            1 for j in range(n_items) if sum(not _missing(row[j]) for row in human) >= 2
        ),
        "n_model_predictions": sum(not _missing(v) for v in model),
        "human_alpha": with_ci(human_alpha, lambda idx: alpha(sub(human, idx), level, domain).value),
        "human_pairwise_mean": mean_pairwise_human_alpha(human, level, domain).to_dict(),
        "model_alpha_as_rater": with_ci(
            model_vs_humans(human, model, level, domain),
            lambda idx: model_vs_humans(sub(human, idx), [model[i] for i in idx], level, domain).value,
        ),
        "model_vs_consensus": with_ci(
            alpha([cons, model], level, domain),
            lambda idx: alpha(sub([cons, model], idx), level, domain).value,
        ),
        "model_vs_each_human_mean": with_ci(
            mean_pairwise_model_alpha(human, model, level, domain),
            lambda idx: (
                mean_pairwise_model_alpha(sub(human, idx), [model[i] for i in idx], level, domain).value
            ),
        ),
    }
    per_rater = model_vs_each_human(human, model, level, domain)
    names = list(rater_names) if rater_names is not None else [f"rater{i}" for i in range(len(human))]
    report["model_vs_each_human"] = {name: r.to_dict() for name, r in zip(names, per_rater, strict=True)}

    if level in ("nominal", "ordinal"):
        acc = accuracy(cons, model)
        report["accuracy_vs_consensus"] = {
            "value": acc,
            "reason": None if acc is not None else "no paired items",
        }
        observed = {v for row in human for v in _present(row)} | set(_present(model))
        cm_labels = [float(v) for v in labels] if labels is not None else sorted(set(domain or []) | observed)
        try:
            matrix = confusion_matrix(cons, model, cm_labels)
            report["confusion_vs_consensus"] = {
                "labels": [_key(v) for v in cm_labels],
                "matrix": matrix,
                "rows": "consensus",
                "columns": "model",
            }
        except ValueError as exc:
            report["confusion_vs_consensus"] = {
                "labels": [_key(v) for v in cm_labels],
                "matrix": None,
                "reason": str(exc),
            }
    if level in ("ordinal", "interval"):
        err = mae(cons, model)
        report["mae_vs_consensus"] = {"value": err, "reason": None if err is not None else "no paired items"}
    hist_labels = [float(v) for v in labels] if labels is not None else list(domain or [])
    report["predicted_histogram"] = _histogram(_present(model), hist_labels)
    report["human_histogram"] = _histogram([v for row in human for v in _present(row)], hist_labels)
    return report
