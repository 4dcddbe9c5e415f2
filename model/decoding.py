"""Decisions that fit how agreement is measured: answers spread over the scale like the team's own labels.

Argmax collapses skewed scales onto the majority value (alpha ~0 even when the ranking is right), and
inverse-frequency weighting pushes them off the humans' distribution the other way. Instead, every scorer (the
adapter, the embedding head, their blend) gives one number per task on an ordered scale (the expected scale
position; for two values the probability of the second), and cut points fitted on data the labels did not
come from turn it into a value so that the answers follow the training labels' distribution. Classes without
an order get per-class offsets to the same end. Both are stored with the model version that uses them.
Numpy only: serving a head never imports torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

OFFSET_ROUNDS = 200


@dataclass(frozen=True)
class Decision:
    """How one dimension turns a distribution over its values into an answer.

    kind "cuts": the ordered score (expected position, or P(second value) for two values) is cut at `cuts`;
    kind "offsets": argmax of log-probability + offsets (classes without order); kind "argmax": neither fitted.
    """

    kind: str = "argmax"
    cuts: tuple[float, ...] = ()
    offsets: tuple[float, ...] = ()

    def to_dict(self) -> dict[str, object]:
        return {"kind": self.kind, "cuts": list(self.cuts), "offsets": list(self.offsets)}

    @classmethod
    def from_dict(cls, raw: dict[str, object] | None) -> Decision:
        if not raw:
            return cls()
        return cls(str(raw.get("kind", "argmax")), tuple(float(x) for x in raw.get("cuts", ()) or ()),  # type: ignore[union-attr]
                   tuple(float(x) for x in raw.get("offsets", ()) or ()))  # type: ignore[union-attr]

    def decide(self, probs: np.ndarray) -> np.ndarray:
        """Indexes of the answers for a (n, n_values) array of distributions."""
        probs = np.atleast_2d(np.asarray(probs, dtype=np.float64))
        if self.kind == "cuts" and self.cuts:
            return np.searchsorted(np.asarray(self.cuts), ordered_score(probs), side="right")
        if self.kind == "offsets" and self.offsets:
            return np.argmax(np.log(np.clip(probs, 1e-12, None)) + np.asarray(self.offsets), axis=1)
        return np.argmax(probs, axis=1)


def ordered_score(probs: np.ndarray) -> np.ndarray:
    """Expected scale position per row; for two values that is P(second value)."""
    probs = np.atleast_2d(np.asarray(probs, dtype=np.float64))
    return probs @ np.arange(probs.shape[1], dtype=np.float64)


def label_shares(counts: Sequence[float]) -> np.ndarray:
    total = float(sum(counts))
    return np.asarray(counts, dtype=np.float64) / total if total > 0 else np.full(len(counts), 1 / max(len(counts), 1))


def fit_cuts(scores: Sequence[float], target_counts: Sequence[float]) -> tuple[float, ...]:
    """Cut points so that the share of scores falling on each value matches the labels' share of it.

    Quantile matching: only the ranking of the scores matters, so a scorer whose numbers are shrunk toward the
    mean (a ridge head, an adapter trained on soft targets) still uses the whole scale the way the team does.
    """
    x = np.sort(np.asarray(scores, dtype=np.float64))
    cum = np.cumsum(label_shares(target_counts))[:-1]
    if x.size == 0:
        return tuple(float(i) + 0.5 for i in range(len(cum)))
    cuts = []
    for share in cum:
        k = round(float(share) * x.size)  # the first k scores (lowest) go below this cut
        if k <= 0:
            cuts.append(float(x[0]) - 1e-9)
        elif k >= x.size:
            cuts.append(float(x[-1]) + 1e-9)
        else:
            cuts.append(float((x[k - 1] + x[k]) / 2))
    return tuple(float(c) for c in np.maximum.accumulate(np.asarray(cuts)))


def fit_offsets(probs: np.ndarray, target_counts: Sequence[float]) -> tuple[float, ...]:
    """Per-class log offsets so that argmax answers follow the labels' class shares (classes without order)."""
    logp = np.log(np.clip(np.atleast_2d(np.asarray(probs, dtype=np.float64)), 1e-12, None))
    want = np.clip(label_shares(target_counts), 1e-3, None)
    offsets = np.zeros(logp.shape[1])
    for _ in range(OFFSET_ROUNDS):
        got = np.bincount(np.argmax(logp + offsets, axis=1), minlength=logp.shape[1]) / max(len(logp), 1)
        step = 0.5 * (np.log(want) - np.log(np.clip(got, 1e-3, None)))
        if np.abs(got - label_shares(target_counts)).max() < 0.5 / max(len(logp), 1):
            break
        offsets += step
        offsets -= offsets.mean()
    return tuple(float(o) for o in offsets)


def fit_decision(probs: np.ndarray, target_counts: Sequence[float], ordered: bool) -> Decision:
    """Cuts for ordered scales and two-valued dimensions, offsets for three or more unordered classes."""
    probs = np.atleast_2d(np.asarray(probs, dtype=np.float64))
    if probs.shape[1] < 2 or not sum(target_counts) or probs.shape[0] == 0:
        return Decision()
    if ordered or probs.shape[1] == 2:
        return Decision("cuts", cuts=fit_cuts(ordered_score(probs), target_counts))
    return Decision("offsets", offsets=fit_offsets(probs, target_counts))
