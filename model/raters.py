"""Which annotator is off? Per annotator, per dimension and overall: agreement with the other annotators, with
the consensus of the others, with the served model and with golden (ground-truth) answers; a trend over the
annotator's labels; and a flag when the annotator sits far below the team.

The flag is decided on "alpha vs the consensus of the others" with a bootstrap interval over the annotator's
shared items: flagged when the upper end of the 95% interval lies below the team's median annotator value. An
annotator with fewer than ``MIN_LABELS`` shared items gets None with a reason ("not enough data") and is never
flagged, and nobody is flagged in a team of fewer than three annotators (with two, who is off is undecidable).

Every alpha here is between two rows (this annotator and someone else), so ``pair_alpha`` computes it directly
from the coincidence matrix: the bootstrap needs thousands of them per report. It equals ``agreement.alpha`` on a
two-row matrix (tests check it). JSON-ready: None with a reason, never NaN.
"""

from __future__ import annotations

from collections.abc import Sequence
from statistics import median
from typing import Any

import numpy as np

from slm_annotator.model.agreement import ALL_EQUAL, NOT_ENOUGH_PAIRS, AlphaResult, Level, alpha, consensus
from slm_annotator.model.annotations_io import DimSpec, Ratings

MIN_LABELS = 10  # fewer shared items than this: "not enough data", never flagged
MIN_TEAM = 3  # annotators with a value needed before anyone can be flagged
RATER_BOOT = 200  # resamples for the flag's interval when the report asks for none (n_boot=0)


def _nan_row(values: Sequence[float | None]) -> np.ndarray:
    return np.array([np.nan if v is None else float(v) for v in values], dtype=float)


def pair_alpha(x: np.ndarray, y: np.ndarray, level: Level) -> AlphaResult:
    """Krippendorff's alpha of two raters (NaN = missing): 1 - (n-1) * sum o_ck d_ck / sum n_c n_k d_ck."""
    both = ~np.isnan(x) & ~np.isnan(y)
    n = int(both.sum())
    if n == 0:
        return AlphaResult(None, NOT_ENOUGH_PAIRS)
    values, codes = np.unique(np.concatenate([x[both], y[both]]), return_inverse=True)
    k = len(values)
    if k == 1:
        return AlphaResult(None, ALL_EQUAL)
    a, b = codes[:n], codes[n:]
    o = np.bincount(a * k + b, minlength=k * k).reshape(k, k).astype(float)
    o += o.T  # every item gives the pairs (a, b) and (b, a), each weighing 1/(2-1)
    marg = o.sum(axis=1)
    if level == "nominal":
        delta = 1.0 - np.eye(k)
    elif level == "interval":
        delta = (values[:, None] - values[None, :]) ** 2
    else:  # ordinal: (sum of the marginals from c to k, minus half of each end)^2
        cum = np.concatenate([[0.0], np.cumsum(marg)])
        lo, hi = np.minimum.outer(np.arange(k), np.arange(k)), np.maximum.outer(np.arange(k), np.arange(k))
        delta = (cum[hi + 1] - cum[lo] - (marg[lo] + marg[hi]) / 2) ** 2
    expected = float((np.outer(marg, marg) * delta).sum())
    if expected <= 0:
        return AlphaResult(None, ALL_EQUAL)
    return AlphaResult(float(1.0 - (marg.sum() - 1) * float((o * delta).sum()) / expected), None)


def _res(r: AlphaResult, **extra: Any) -> dict[str, Any]:
    return {**r.to_dict(), **extra}


def _none(reason: str, **extra: Any) -> dict[str, Any]:
    return {"value": None, "reason": reason, **extra}


class _Dim:
    """One dimension as arrays: raters x items (NaN = missing), over the items any human rated on it."""

    def __init__(self, ratings: Ratings, dim: DimSpec) -> None:
        self.dim = dim
        self.items = ratings.rated_items(dim)
        self.index = {item: j for j, item in enumerate(self.items)}
        self.names, rows = ratings.matrix(dim, self.items)
        self.rows = {name: _nan_row(row) for name, row in zip(self.names, rows, strict=True)}
        self.count = np.sum([~np.isnan(r) for r in self.rows.values()], axis=0) if rows else np.zeros(0)

    def others_consensus(self, rater: str) -> np.ndarray:
        others = [[None if np.isnan(v) else float(v) for v in row] for name, row in self.rows.items()
                  if name != rater]
        if not others:
            return np.full(len(self.items), np.nan)
        return _nan_row(consensus(others, self.dim.level, self.dim.domain))


def _pairwise(d: _Dim, rater: str) -> dict[str, Any]:
    """Alpha with each other annotator, averaged weighted by the items the two share."""
    x = d.rows[rater]
    values, weights, per = [], [], {}
    for other, y in d.rows.items():
        if other == rater:
            continue
        shared = int((~np.isnan(x) & ~np.isnan(y)).sum())
        if shared == 0:
            continue
        r = pair_alpha(x, y, d.dim.level)
        per[other] = _res(r, n=shared)
        if r.value is not None:
            values.append(r.value)
            weights.append(shared)
    if not values:
        return _none("not enough data: no other annotator shares an item with a defined alpha", per_rater=per)
    return {"value": float(np.average(values, weights=weights)), "reason": None, "per_rater": per}


def _leave_one_out(d: _Dim, rater: str) -> dict[str, Any]:
    """Alpha of the whole team minus alpha without this annotator (negative: the team agrees better without)."""
    def rows(skip: str | None) -> list[list[float | None]]:
        return [[None if np.isnan(v) else float(v) for v in row] for name, row in d.rows.items() if name != skip]

    full, without = alpha(rows(None), d.dim.level, d.dim.domain), alpha(rows(rater), d.dim.level, d.dim.domain)
    if full.value is None or without.value is None:
        return _none(full.reason or without.reason or "not enough data")
    return {"value": full.value - without.value, "reason": None, "team": full.value, "without": without.value}


def _golden_rows(ratings: Ratings, d: _Dim, rater: str | None) -> np.ndarray:
    """The golden value per item (NaN: none); items whose golden annotation this rater made are skipped."""
    gold = np.full(len(d.items), np.nan)
    for item, (author, values) in ratings.golden.items():
        j = d.index.get(item)
        if j is not None and d.dim.key in values and author != rater:
            v = d.dim.number(values[d.dim.key])
            gold[j] = np.nan if v is None else v
    return gold


def _vs_golden(gold: np.ndarray, x: np.ndarray, level: Level) -> dict[str, Any]:
    both = ~np.isnan(gold) & ~np.isnan(x)
    n = int(both.sum())
    if n == 0:
        return _none("no golden task rated", n=0)
    out = _res(pair_alpha(gold, x, level), n=n, matches=None, accuracy=None)
    if level != "interval":
        matches = int((gold[both] == x[both]).sum())
        out.update(matches=matches, accuracy=matches / n)
    if out["value"] is None and out["accuracy"] is not None:
        out["reason"] = f"{out['reason']} (accuracy still defined)"
    return out


def _ci(samples: list[float], n_boot: int) -> list[float] | None:
    if n_boot <= 0 or len(samples) < 0.5 * n_boot:
        return None
    lo, hi = np.quantile(samples, [0.025, 0.975])
    return [float(lo), float(hi)]


def _trend(x: np.ndarray, cons: np.ndarray, order: list[int], level: Level) -> dict[str, Any]:
    """Alpha vs the others' consensus on the annotator's first half of labels and on the second half."""
    shared = [j for j in order if not np.isnan(x[j]) and not np.isnan(cons[j])]
    if len(shared) < 2 * MIN_LABELS:
        return {"first_half": None, "second_half": None, "change": None,
                "reason": f"not enough data: {len(shared)} shared items (a trend needs {2 * MIN_LABELS})"}
    half = len(shared) // 2
    parts = []
    for idx in (shared[:half], shared[half:]):
        r = pair_alpha(x[idx], cons[idx], level)
        parts.append(_res(r, n=len(idx)))
    a, b = parts[0]["value"], parts[1]["value"]
    return {"first_half": parts[0], "second_half": parts[1], "change": None if a is None or b is None else b - a,
            "reason": None if a is not None and b is not None else "undefined on one half"}


def annotator_report(ratings: Ratings, model: str | None = None, n_boot: int = 1000, seed: int = 0
                     ) -> dict[str, Any]:
    """Per annotator: labels, per dimension and overall agreement, golden-task scores, trend, flag."""
    n_boot = n_boot or RATER_BOOT
    dims = [_Dim(ratings, d) for d in ratings.dimensions]
    out: dict[str, Any] = {}
    for rater in ratings.raters:
        out[rater] = _one_rater(ratings, dims, rater, model, n_boot, seed)
    team = _team_medians(out, [d.dim.key for d in dims])
    enough = {k: sum(1 for a in out.values() if _value(a, k) is not None) for k in team}
    for a in out.values():
        for key in team:
            entry = a["overall"] if key == "overall" else a["dimensions"].get(key)
            if entry is None:
                continue
            entry["flagged"], entry["flag_reason"] = _decide(entry["vs_consensus"], team[key], enough[key])
        a["flagged"] = a["overall"]["flagged"]
        a["flagged_dimensions"] = [k for k, e in a["dimensions"].items() if e.get("flagged")]
    return {
        "min_labels": MIN_LABELS,
        "n_boot": n_boot,
        "rule": f"flagged when the upper end of the 95% bootstrap interval of alpha vs the others' consensus lies "
                f"below the team's median annotator value (at least {MIN_TEAM} annotators with "
                f"{MIN_LABELS}+ shared items)",
        "team_median": team,
        "annotators": out,
        "n_golden": len(ratings.golden),
        "model_vs_golden": _model_golden(ratings, dims, model),
        "model": model,
    }


def _value(a: dict[str, Any], key: str) -> float | None:
    entry = a["overall"] if key == "overall" else a["dimensions"].get(key) or {}
    return (entry.get("vs_consensus") or {}).get("value")


def _team_medians(out: dict[str, Any], keys: list[str]) -> dict[str, float | None]:
    team: dict[str, float | None] = {}
    for key in [*keys, "overall"]:
        values = [v for a in out.values() if (v := _value(a, key)) is not None]
        team[key] = float(median(values)) if values else None
    return team


def _decide(entry: dict[str, Any], team: float | None, n_team: int) -> tuple[bool, str | None]:
    if entry.get("value") is None:
        return False, entry.get("reason") or "not enough data"
    if n_team < MIN_TEAM or team is None:
        return False, f"not enough data: {n_team} annotator(s) with a value (a flag needs {MIN_TEAM})"
    ci = entry.get("ci")
    if not ci:
        return False, "not enough data: no bootstrap interval"
    if ci[1] < team:
        return True, f"95% interval [{ci[0]:.2f}, {ci[1]:.2f}] lies below the team median {team:.2f}"
    return False, None


def _one_rater(ratings: Ratings, dims: list[_Dim], rater: str, model: str | None, n_boot: int, seed: int
               ) -> dict[str, Any]:
    by_item = ratings.human.get(rater, {})
    times = ratings.times.get(rater, {})
    entry: dict[str, Any] = {"n_labels": len(by_item), "dimensions": {}}
    cons_rows: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    golden_pooled = [0, 0]
    for d in dims:
        key = d.dim.key
        if rater not in d.rows:
            continue
        x = d.rows[rater]
        cons = d.others_consensus(rater)
        shared = int((~np.isnan(x) & ~np.isnan(cons)).sum())
        e: dict[str, Any] = {"n_labels": int((~np.isnan(x)).sum()), "n_shared": shared}
        gold = _golden_rows(ratings, d, rater)
        e["vs_golden"] = _vs_golden(gold, x, d.dim.level)
        if e["vs_golden"].get("matches") is not None:
            golden_pooled[0] += e["vs_golden"]["matches"]
            golden_pooled[1] += e["vs_golden"]["n"]
        if model:
            e["vs_model"] = _res(pair_alpha(x, _nan_row(ratings.model_row(model, d.dim, d.items)), d.dim.level))
        else:
            e["vs_model"] = _none("no model predictions")
        if shared < MIN_LABELS:
            why = (f"not enough data: {shared} item(s) shared with other annotators (fewer than {MIN_LABELS})"
                   if shared else "not enough data: no item shared with another annotator")
            e.update(vs_consensus=_none(why, ci=None), pairwise=_none(why), leave_one_out=_none(why),
                     trend={"first_half": None, "second_half": None, "change": None, "reason": why})
        else:
            e["vs_consensus"] = _res(pair_alpha(x, cons, d.dim.level), ci=None)
            e["pairwise"] = _pairwise(d, rater)
            e["leave_one_out"] = _leave_one_out(d, rater)
            order = sorted(range(len(d.items)), key=lambda j: (times.get(d.items[j], ""), j))
            e["trend"] = _trend(x, cons, order, d.dim.level)
            if e["vs_consensus"]["value"] is not None:
                cons_rows[key] = (x, cons)
        entry["dimensions"][key] = e
    _bootstrap(entry, dims, cons_rows, n_boot, seed)
    entry["overall"] = _overall(entry, golden_pooled)
    return entry


def _bootstrap(entry: dict[str, Any], dims: list[_Dim], cons_rows: dict[str, tuple[np.ndarray, np.ndarray]],
               n_boot: int, seed: int) -> None:
    """One resampling of the annotator's shared items (by item id, across dimensions): per dimension CIs and
    the overall (mean over dimensions) CI come from the same resamples."""
    if not cons_rows:
        entry["_overall_ci"] = None
        return
    item_ids = sorted({d.items[j] for d in dims if d.dim.key in cons_rows
                       for j in np.flatnonzero(~np.isnan(cons_rows[d.dim.key][0])
                                               & ~np.isnan(cons_rows[d.dim.key][1]))})
    cols = {d.dim.key: np.array([d.index.get(i, -1) for i in item_ids]) for d in dims if d.dim.key in cons_rows}
    levels = {d.dim.key: d.dim.level for d in dims}
    rng = np.random.default_rng(seed)
    samples: dict[str, list[float]] = {k: [] for k in cons_rows}
    overall: list[float] = []
    for _ in range(n_boot):
        pick = rng.integers(0, len(item_ids), size=len(item_ids))
        values = []
        for key, (x, cons) in cons_rows.items():
            j = cols[key][pick]
            j = j[j >= 0]
            v = pair_alpha(x[j], cons[j], levels[key]).value
            if v is not None:
                samples[key].append(v)
                values.append(v)
        if len(values) == len(cons_rows):
            overall.append(float(np.mean(values)))
    for key in cons_rows:
        entry["dimensions"][key]["vs_consensus"]["ci"] = _ci(samples[key], n_boot)
    entry["_overall_ci"] = _ci(overall, n_boot)


def _mean_of(entry: dict[str, Any], key: str) -> dict[str, Any]:
    values = [e[key]["value"] for e in entry["dimensions"].values() if (e.get(key) or {}).get("value") is not None]
    if values:
        return {"value": float(np.mean(values)), "reason": None, "n_dimensions": len(values)}
    first = next((e[key].get("reason") for e in entry["dimensions"].values() if (e.get(key) or {}).get("reason")),
                 None)
    return _none(first or "not enough data")


def _overall(entry: dict[str, Any], golden_pooled: list[int]) -> dict[str, Any]:
    """Means over the dimensions; the interval of the mean from the shared resamples; golden accuracy pooled."""
    vs_cons = _mean_of(entry, "vs_consensus")
    ci = entry.pop("_overall_ci", None)
    n_dims = sum(1 for e in entry["dimensions"].values() if e["vs_consensus"].get("value") is not None)
    vs_cons["ci"] = ci if n_dims else None
    matches, n = golden_pooled
    golden = _mean_of(entry, "vs_golden")
    golden.update(accuracy=matches / n if n else None, n=n)
    trend_first = _mean_trend(entry, "first_half")
    trend_second = _mean_trend(entry, "second_half")
    return {
        "n_shared": max((e["n_shared"] for e in entry["dimensions"].values()), default=0),
        "vs_consensus": vs_cons, "pairwise": _mean_of(entry, "pairwise"),
        "leave_one_out": _mean_of(entry, "leave_one_out"), "vs_model": _mean_of(entry, "vs_model"),
        "vs_golden": golden,
        "trend": {"first_half": trend_first, "second_half": trend_second,
                  "change": None if trend_first is None or trend_second is None else trend_second - trend_first},
    }


def _mean_trend(entry: dict[str, Any], half: str) -> float | None:
    values = [e["trend"][half]["value"] for e in entry["dimensions"].values()
              if (e["trend"].get(half) or {}).get("value") is not None]
    return float(np.mean(values)) if values else None


def _model_golden(ratings: Ratings, dims: list[_Dim], model: str | None) -> dict[str, Any]:
    """The model against the golden answers, per dimension and pooled."""
    if not ratings.golden:
        return {"dimensions": {}, "overall": _none("no golden tasks")}
    if not model:
        return {"dimensions": {}, "overall": _none("no model predictions")}
    per = {}
    matches = n = 0
    for d in dims:
        gold = _golden_rows(ratings, d, None)
        per[d.dim.key] = _vs_golden(gold, _nan_row(ratings.model_row(model, d.dim, d.items)), d.dim.level)
        if per[d.dim.key].get("matches") is not None:
            matches += per[d.dim.key]["matches"]
            n += per[d.dim.key]["n"]
    values = [e["value"] for e in per.values() if e.get("value") is not None]
    overall = {"value": float(np.mean(values)) if values else None,
               "reason": None if values else "no golden task predicted", "accuracy": matches / n if n else None,
               "n": n}
    return {"dimensions": per, "overall": overall}
