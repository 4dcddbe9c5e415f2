"""Agreement of predicted values with held-out labels: the measure the gate promotes on and the pre-fill bar reads.

Torch-free, so the embedding head's cross-validation and the reports use it without loading a model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from slm_annotator.model.agreement import consensus, model_vs_consensus, model_vs_humans
from slm_annotator.model.dataset import Example
from slm_annotator.model.rubric import Dimension, Rubric


def scale_value(dim: Dimension, value: str | None) -> float | None:
    """Numbers for alpha: scale position for ordinal/nominal, the number itself for interval."""
    if value is None or value not in dim.values:
        return None
    if dim.level == "interval":
        return float(value)
    return float(dim.values.index(value))


def agreement(rubric: Rubric, examples: Sequence[Example], predicted: Sequence[Sequence[str]]) -> dict[str, Any]:
    """Per dimension alpha (model as one more rater) and alpha with the consensus; plus one summary score."""
    raters = sorted({r for e in examples for r in e.ratings})
    per_dim: dict[str, Any] = {}
    scores: list[float] = []
    for d, dim in enumerate(rubric.dimensions):
        human = [[scale_value(dim, e.ratings.get(r, {}).get(dim.key)) for e in examples] for r in raters]
        model_row = [scale_value(dim, p[d]) for p in predicted]
        domain = None if dim.level == "interval" else [float(i) for i in range(len(dim.values))]
        as_rater = model_vs_humans(human, model_row, dim.level, domain)
        with_consensus = model_vs_consensus(human, model_row, dim.level, domain)
        cons = consensus(human, dim.level, domain)
        pairs = [(c, m) for c, m in zip(cons, model_row, strict=True) if c is not None and m is not None]
        acc = sum(1.0 for c, m in pairs if c == m) / len(pairs) if pairs else None
        per_dim[dim.key] = {
            "level": dim.level,
            "alpha_model_as_rater": as_rater.value,
            "alpha_model_vs_consensus": with_consensus.value,
            "reason": as_rater.reason or with_consensus.reason,
            "accuracy_vs_consensus": acc,
            "n_items": len(pairs),
        }
        # The gate uses model-vs-consensus: "model as one more rater" is inflated by the humans' own
        # agreement (a constant answer scores well above 0 when the humans agree with each other).
        if with_consensus.value is not None:
            scores.append(with_consensus.value)
    accs = [v["accuracy_vs_consensus"] for v in per_dim.values() if v["accuracy_vs_consensus"] is not None]
    summary = sum(scores) / len(scores) if scores else None
    return {
        "dimensions": per_dim,
        "mean_alpha": summary,
        "mean_accuracy": sum(accs) / len(accs) if accs else None,
        "score": summary if summary is not None else (sum(accs) / len(accs) if accs else 0.0),
        "score_kind": "mean_alpha_vs_consensus" if summary is not None else "mean_accuracy",
        "n_items": len(examples),
    }


def dimension_alpha(dim: Dimension, examples: Sequence[Example], values: Sequence[str | None]) -> float | None:
    """One dimension's answers against the examples' consensus, as the gate measures it."""
    report = agreement(Rubric((), (dim,)), examples, [[v] for v in values])
    return report["dimensions"][dim.key]["alpha_model_vs_consensus"]
