"""Training examples from stored labels: one example per task, soft targets from all its raters.

``Example`` is the per-task view of who rated what that training, the promotion gate and the dev-set experiments
read; ``examples_from_labels`` builds it from stored labels (anything shaped like ``StoredLabel``: the store's rows
as they come from ``Store.labels``). Which shape is for what: see ``model.annotations_io``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from slm_annotator.model.results import values_from_result
from slm_annotator.model.rubric import Dimension, Rubric


@dataclass
class Example:
    task_key: str
    data: dict[str, Any]
    ratings: dict[str, dict[str, str]] = field(default_factory=dict)  # rater -> dimension key -> value
    hard: bool = False
    # dimension key -> rater -> weight of that rater's vote (model.reliability); a missing weight counts 1
    weights: dict[str, dict[str, float]] = field(default_factory=dict)

    def counts(self, dim: Dimension) -> list[float]:
        """The raters' votes per value of one dimension, each rater's vote weighted by its reliability.

        The one place votes are counted: soft targets, the consensus, the head's targets and the label shares
        that decisions are fitted to all read it, so a rater weighting reaches every learner the same way.
        """
        out = [0.0] * len(dim.values)
        weights = self.weights.get(dim.key, {})
        for rater, rating in self.ratings.items():
            value = rating.get(dim.key)
            if value in dim.values:
                out[dim.values.index(value)] += weights.get(rater, 1.0)
        return out

    def targets(self, rubric: Rubric) -> list[list[float] | None]:
        """Per dimension, the raters' (weighted) distribution over its values (None when nobody rated it)."""
        out: list[list[float] | None] = []
        for dim in rubric.dimensions:
            counts = self.counts(dim)
            total = sum(counts)
            out.append([c / total for c in counts] if total > 0 else None)
        return out


class StoredLabel(Protocol):
    """What training reads of a stored label: the store's rows (``Store.labels``) and ``LabelIn`` are ones."""

    @property
    def task_id(self) -> int | None: ...
    @property
    def annotator(self) -> str: ...
    @property
    def result(self) -> list[Any]: ...
    @property
    def task_data(self) -> dict[str, Any]: ...
    @property
    def hard(self) -> bool: ...


def examples_from_labels(rubric: Rubric, labels: Iterable[StoredLabel]) -> list[Example]:
    """Re-parses raw results against today's rubric, so a changed config never trains on stale values."""
    by_task: dict[str, Example] = {}
    for n, label in enumerate(labels):
        key = str(label.task_id) if label.task_id is not None else f"annotation-{n}"
        example = by_task.setdefault(key, Example(key, {}))
        if label.task_data:
            example.data = label.task_data
        values = values_from_result(rubric, label.result)
        if values:
            rater = label.annotator or f"anonymous-{n}"
            example.ratings.setdefault(rater, {}).update(values)
        example.hard = example.hard or label.hard
    missing = set(rubric.data_keys)
    return [e for e in by_task.values() if e.ratings and e.data and missing <= flat_keys(e.data)]


LABEL_MODES = ("soft", "majority", "per_rater")


def relabel(examples: Sequence[Example], rubric: Rubric, mode: str) -> list[Example]:
    """What the model learns from several raters: their distribution (soft), the consensus, or each rater.

    soft keeps one example per task with the raters' distribution as target (disagreement is signal);
    majority trains on the consensus value; per_rater repeats the task once per rater (the seed recipe).
    """
    if mode == "soft":
        return list(examples)
    if mode == "per_rater":
        return [Example(f"{e.task_key}#{r}", e.data, {r: v}, e.hard, e.weights) for e in examples
                for r, v in e.ratings.items()]
    if mode == "majority":
        return [Example(e.task_key, e.data, {"majority": majority_values(e, rubric)}, e.hard) for e in examples]
    raise ValueError(f"label mode must be one of {LABEL_MODES}, got {mode!r}")


def majority_values(example: Example, rubric: Rubric) -> dict[str, str]:
    """Most frequent value per dimension; ties go to the tied value nearest the raters' mean (lowest first)."""
    out: dict[str, str] = {}
    for dim, dist in zip(rubric.dimensions, example.targets(rubric), strict=True):
        if dist is None:
            continue
        top = max(dist)
        tied = [i for i, p in enumerate(dist) if p == top]
        mean = sum(i * p for i, p in enumerate(dist))
        pick = min(tied, key=lambda i: (abs(i - mean), i)) if dim.level != "nominal" else tied[0]
        out[dim.key] = dim.values[pick]
    return out


def flat_keys(data: dict[str, Any]) -> set[str]:
    keys = set(data)
    for key, value in data.items():
        if isinstance(value, dict):
            keys |= {f"{key}.{k}" for k in value}
    return keys


def _bucket(salt: str, key: str) -> float:
    digest = hashlib.sha256(f"{salt}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_heldout(
    examples: Sequence[Example], fraction: float, salt: str
) -> tuple[list[Example], list[Example]]:
    """Whole tasks, by a hash of the task id: a task stays on its side as the label set grows."""
    if not examples or fraction <= 0:
        return list(examples), []
    held = [e for e in examples if _bucket(salt, e.task_key) < fraction]
    want = max(1, round(fraction * len(examples))) if len(examples) >= 5 else 0
    if len(held) < want:  # small sets: top up with the next tasks in hash order
        ranked = sorted(examples, key=lambda e: _bucket(salt, e.task_key))
        held = ranked[:want]
    held_keys = {e.task_key for e in held}
    return [e for e in examples if e.task_key not in held_keys], list(held)
