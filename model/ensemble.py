"""Voting of k scorers per dimension, and the uncertainty that decides where an item goes (AutoAnnotator).

U(x) = 1 - (votes for the winning value) / k, the paper's measure: 0 when all members agree, up to 1 - 1/k.
A task's uncertainty is its most uncertain dimension's: one contested answer is enough to route it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from slm_annotator.model.results import DimensionScore
from slm_annotator.model.scorer import decode


@dataclass(frozen=True)
class Vote:
    score: DimensionScore  # the winning value; confidence = the members' mean probability of it
    votes: tuple[int, ...]  # per value, how many members chose it
    k: int

    @property
    def uncertainty(self) -> float:
        return 1.0 - max(self.votes) / self.k


def vote(values: Sequence[str], member_probs: Sequence[torch.Tensor], mode: str = "argmax") -> Vote:
    """Each member decodes its own answer; the most voted value wins, ties go to the higher mean probability."""
    k = len(member_probs)
    if k == 0:
        raise ValueError("a vote needs at least one member")
    counts = [0] * len(values)
    for probs in member_probs:
        counts[decode(values, probs, mode).index] += 1
    mean = torch.stack([p.double() for p in member_probs]).mean(0)
    winner = max(range(len(values)), key=lambda i: (counts[i], float(mean[i])))
    score = DimensionScore(values[winner], winner, float(mean[winner]), tuple(float(x) for x in mean))
    return Vote(score, tuple(counts), k)


def task_uncertainty(votes: Sequence[Vote]) -> float:
    return max((v.uncertainty for v in votes), default=0.0)
