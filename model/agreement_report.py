"""The numbers of an agreement report: per dimension, how well humans agree and how well the model agrees
with them, from ``Ratings`` of any source. JSON-ready: undefined values are None with a reason, never NaN.

The maths is ``model.agreement.dimension_report``; this module chooses the items and raters per dimension,
names scale positions by their values, and adds the per-model-version history.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from slm_annotator.model.agreement import alpha, bootstrap_ci, dimension_report, model_vs_consensus, model_vs_humans
from slm_annotator.model.annotations_io import DimSpec, Ratings
from slm_annotator.model.raters import annotator_report

MODEL_KEYS = ("model_alpha_as_rater", "model_vs_consensus", "model_vs_each_human_mean", "model_vs_each_human",
              "accuracy_vs_consensus", "confusion_vs_consensus", "mae_vs_consensus", "predicted_histogram",
              "n_model_predictions")
SUMMARY_KEYS = ("human_alpha", "human_pairwise_mean", "model_alpha_as_rater", "model_vs_consensus",
                "model_vs_each_human_mean", "accuracy_vs_consensus", "mae_vs_consensus")


def _named(dim: DimSpec, keys: list[str]) -> list[str]:
    """Scale positions ("0", "1") back to the values people chose ("Positive", "Negative")."""
    if dim.level == "interval":
        return keys
    return [dim.values[int(k)] if k.isdigit() and int(k) < len(dim.values) else k for k in keys]


def _rename(dim: DimSpec, rep: dict[str, Any]) -> dict[str, Any]:
    for hist in ("human_histogram", "predicted_histogram"):
        if hist in rep:
            rep[hist] = dict(zip(_named(dim, list(rep[hist])), rep[hist].values(), strict=True))
    confusion = rep.get("confusion_vs_consensus")
    if confusion:
        confusion["labels"] = _named(dim, confusion["labels"])
    return rep


def dimension_entry(ratings: Ratings, dim: DimSpec, model: str | None, n_boot: int, seed: int) -> dict[str, Any]:
    """Humans vs humans always; the model's figures when it predicted any item the humans rated."""
    items = ratings.rated_items(dim)
    names, human = ratings.matrix(dim, items)
    row = ratings.model_row(model, dim, items) if model else [None] * len(items)
    has_model = any(v is not None for v in row)
    rep = dimension_report(human, row, dim.level, dim.domain, n_boot=n_boot if has_model else 0, seed=seed,
                           rater_names=names)
    if not has_model:
        for key in MODEL_KEYS:
            rep.pop(key, None)
        rep["model_reason"] = "no model" if not model else f"{model} predicted none of the rated items"
        rep["human_alpha"]["ci"] = _human_ci(human, dim, n_boot, seed) if rep["human_alpha"]["value"] is not None \
            else None
    rep.update(title=dim.title or dim.key, values=list(dim.values), raters=names)
    return _rename(dim, rep)


def _human_ci(human: list[list[float | None]], dim: DimSpec, n_boot: int, seed: int) -> list[float] | None:
    """The humans' interval alone (what dimension_report computes, without the model's three)."""
    n = len(human[0]) if human else 0
    ci = bootstrap_ci(lambda idx: alpha([[row[i] for i in idx] for row in human], dim.level, dim.domain).value,
                      n, n_boot, seed)
    return list(ci) if ci else None


def version_history(ratings: Ratings) -> list[dict[str, Any]]:
    """Per model version, oldest first: alpha against the humans on the items it predicted (no interval)."""
    versions = sorted(ratings.models, key=lambda v: (ratings.model_times.get(v, ""), list(ratings.models).index(v)))
    out = []
    for version in versions:
        per_dim: dict[str, Any] = {}
        for dim in ratings.dimensions:
            items = [i for i in ratings.rated_items(dim) if dim.key in ratings.models[version].get(i, {})]
            _, human = ratings.matrix(dim, items)
            row = ratings.model_row(version, dim, items)
            per_dim[dim.key] = {
                "n_items": len(items),
                "model_alpha_as_rater": model_vs_humans(human, row, dim.level, dim.domain).to_dict() if items
                else {"value": None, "reason": "no predicted item was rated"},
                "model_vs_consensus": model_vs_consensus(human, row, dim.level, dim.domain).to_dict() if items
                else {"value": None, "reason": "no predicted item was rated"},
            }
        out.append({"model_version": version, "time": ratings.model_times.get(version) or None,
                    "dimensions": per_dim, "mean_model_vs_consensus": _mean(per_dim, "model_vs_consensus")})
    return out


def _mean(per_dim: dict[str, Any], key: str) -> float | None:
    values = [d[key]["value"] for d in per_dim.values() if (d.get(key) or {}).get("value") is not None]
    return sum(values) / len(values) if values else None


def build_report(ratings: Ratings, model: str | None = None, n_boot: int = 1000, seed: int = 0,
                 title: str = "") -> dict[str, Any]:
    """The whole report: per dimension entries, their means, and the model-version history."""
    if model is not None and model not in ratings.models:
        raise ValueError(f"no model rater {model!r}; found {sorted(ratings.models) or 'none'}")
    dims = {d.key: dimension_entry(ratings, d, model, n_boot, seed) for d in ratings.dimensions}
    return {
        "kind": "evaluate",
        "title": title or f"Agreement report: {Path(ratings.source).name or ratings.source}",
        "source": ratings.source,
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "n_items": len(ratings.items),
        "raters": ratings.raters,
        "model": model,
        "models": list(ratings.models),
        "n_boot": n_boot,
        "dimensions": dims,
        "summary": {f"mean_{k}": _mean(dims, k) for k in SUMMARY_KEYS},
        "versions": version_history(ratings),
        "annotators": annotator_report(ratings, model, n_boot, seed),
    }


def fmt(entry: dict[str, Any] | None) -> str:
    """A table cell: the value, or "n/a" (never "nan")."""
    if not entry or entry.get("value") is None:
        return "n/a"
    ci = entry.get("ci")
    return f"{entry['value']:.3f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")


def text_table(report: dict[str, Any]) -> str:
    """A Markdown table of the headline numbers, for the terminal and for pasting into an issue."""
    rows = ["| dimension | level | items | raters | humans α | model as rater | model vs consensus | accuracy | MAE |",
            "|" + "---|" * 9]
    for key, d in report["dimensions"].items():
        rows.append(f"| {key} | {d['level']} | {d['n_items']} | {d['n_raters']} | {fmt(d['human_alpha'])} "
                    f"| {fmt(d.get('model_alpha_as_rater'))} | {fmt(d.get('model_vs_consensus'))} "
                    f"| {fmt(d.get('accuracy_vs_consensus'))} | {fmt(d.get('mae_vs_consensus'))} |")
    return "\n".join(rows)


def _cell(entry: dict[str, Any] | None) -> str:
    return fmt(entry) if entry and entry.get("value") is not None else "n/a"


def annotator_table(report: dict[str, Any]) -> str:
    """Per annotator (overall): the figures that say who is off, flagged ones first."""
    section = report.get("annotators") or {}
    rows = ["| annotator | labels | vs others' consensus | pairwise | leave-one-out | vs model | golden accuracy "
            "| flag |", "|" + "---|" * 8]
    for name, a in sorted((section.get("annotators") or {}).items(), key=lambda kv: not kv[1]["flagged"]):
        o = a["overall"]
        gold = o["vs_golden"].get("accuracy")
        golden = "n/a" if gold is None else f"{gold:.3f} (n={o['vs_golden']['n']})"
        flag = "FLAGGED" if a["flagged"] else (o["vs_consensus"].get("reason") or "")
        rows.append(f"| {name} | {a['n_labels']} | {_cell(o['vs_consensus'])} | {_cell(o['pairwise'])} "
                    f"| {_cell(o['leave_one_out'])} | {_cell(o['vs_model'])} "
                    f"| {golden} | {flag} |")
    return "\n".join(rows)
