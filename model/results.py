"""Label Studio result items from dimension scores, and dimension values from LS annotation results."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from slm_annotator.model.rubric import Dimension, Rubric


@dataclass(frozen=True)
class DimensionScore:
    """One dimension's answer: the value, its index in the scale, the confidence and the full distribution."""

    value: str
    index: int
    confidence: float
    probs: tuple[float, ...]


def _typed(dim: Dimension, value: str) -> Any:
    if dim.control_type == "rating":
        return int(value)
    if dim.control_type == "number":
        number = float(value)
        return int(number) if number.is_integer() else number
    return value


def to_ls_result(rubric: Rubric, scores: Sequence[DimensionScore]) -> tuple[list[dict[str, Any]], float]:
    """One result item per control (multi-choice options merged) and the task score: the lowest confidence."""
    items: dict[str, dict[str, Any]] = {}
    confidences: list[float] = []
    option_best: dict[str, tuple[float, str]] = {}
    for dim, score in zip(rubric.dimensions, scores, strict=True):
        if dim.is_option:
            p_yes = score.probs[dim.values.index("yes")]
            confidences.append(max(p_yes, 1 - p_yes))
            best = option_best.get(dim.control)
            if best is None or p_yes > best[0]:
                option_best[dim.control] = (p_yes, str(dim.option))
            item = items.setdefault(dim.control, _item(dim, "choices", {"choices": []}))
            item["_conf"].append(max(p_yes, 1 - p_yes))
            if score.value == "yes":  # the decided answer (argmax: p_yes > 0.5; fitted cut points: their own)
                item["value"]["choices"].append(dim.option)
            continue
        confidences.append(score.confidence)
        key = {"choices": "choices", "rating": "rating", "number": "number"}[dim.control_type]
        payload = [score.value] if key == "choices" else _typed(dim, score.value)
        item = _item(dim, dim.control_type, {key: payload})
        item["_conf"].append(score.confidence)
        items[dim.control] = item
    out = []
    for control, item in items.items():
        if item["type"] == "choices" and not item["value"]["choices"]:
            dim = next(d for d in rubric.dimensions if d.control == control)
            if not dim.required:
                continue  # multi-label with nothing above 0.5: the valid answer is "none selected"
            item["value"]["choices"] = [option_best[control][1]]
        conf = item.pop("_conf")
        item["score"] = round(float(min(conf)), 6)
        out.append(item)
    task_score = round(float(min(confidences)), 6) if confidences else 0.0
    return out, task_score


def _item(dim: Dimension, kind: str, value: dict[str, Any]) -> dict[str, Any]:
    return {
        "from_name": dim.control,
        "to_name": dim.to_name,
        "type": kind,
        "value": value,
        "origin": "prediction",
        "_conf": [],
    }


def values_from_result(rubric: Rubric, result: Any) -> dict[str, str]:
    """Per dimension key, the value an annotation gave (as in Dimension.values); unknown parts are ignored."""
    out: dict[str, str] = {}
    if not isinstance(result, list):
        return out
    by_control: dict[str, list[Dimension]] = {}
    for dim in rubric.dimensions:
        by_control.setdefault(dim.control, []).append(dim)
    for item in result:
        if not isinstance(item, dict) or item.get("from_name") not in by_control:
            continue
        value = item.get("value") or {}
        if not isinstance(value, dict):
            continue
        for dim in by_control[item["from_name"]]:
            found = _value_for(dim, value)
            if found is not None:
                out[dim.key] = found
    return out


def _value_for(dim: Dimension, value: dict[str, Any]) -> str | None:
    if dim.control_type == "choices":
        chosen = value.get("choices")
        if not isinstance(chosen, list):
            return None
        chosen = [str(c) for c in chosen]
        if dim.is_option:
            return "yes" if dim.option in chosen else "no"
        return chosen[0] if chosen and chosen[0] in dim.values else None
    raw = value.get(dim.control_type)
    if isinstance(raw, bool) or not isinstance(raw, int | float):
        return None
    try:
        number = float(raw)
    except OverflowError:  # an int beyond any float: no value of the scale
        return None
    return nearest(dim.values, number) if math.isfinite(number) else None


def nearest(values: Sequence[str], x: float) -> str | None:
    """Map a stored number onto the dimension's answer grid (Number grids may be coarser than the step)."""
    numeric = [(abs(float(v) - x), v) for v in values]
    best = min(numeric)
    return best[1]


def result_item(dim: Dimension, raw: Any) -> dict[str, Any] | None:
    """The LS result item a flat cell stands for (an import row, a CSV column): choices as a list or a comma/semicolon
    separated string, ratings and numbers as numbers; None for an empty cell. A bad number raises ValueError."""
    if raw is None or raw == "":
        return None
    kind = dim.control_type
    if kind == "choices":
        choices = raw if isinstance(raw, list) else [c.strip() for c in str(raw).replace(";", ",").split(",")]
        value: dict[str, Any] = {"choices": [str(c) for c in choices if str(c)]}
    else:
        value = {kind: float(raw) if kind == "number" else int(float(raw))}
    return {"from_name": dim.control, "to_name": dim.to_name, "type": kind, "value": value}
