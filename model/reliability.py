"""How much each rater's vote counts in training: a reliability per rater and dimension, from the labels alone.

One careless rater in three pulls every soft target toward noise. crowd-kit's one-coin Dawid-Skene EM estimates,
from who agreed with whom, one accuracy per rater against a latent true label; rescaled so that a rater who
answers at random scores 0 and a perfect one 1, that is the rater's skill (``dawid_skene`` reads a full
confusion matrix per rater as Cohen's kappa against the latent label instead). A rater's vote then counts
skill / team median skill, capped at 1: nobody counts more than one vote, a rater as good as the middle of the
team counts fully, a random one almost nothing.

Guards, so that a handful of labels never moves anything: skills are shrunk toward the team's median by
``PRIOR_LABELS`` pseudo-labels; a dimension with fewer than ``MIN_RATERS`` raters, or fewer than ``MIN_SHARED``
tasks rated by two or more, keeps every weight at 1 (two raters who disagree cannot say which one is off).
Weights change targets only (``Example.counts``); agreement is always measured against the raters' own labels.

Methods (RATER_WEIGHTING, a project's ``training.rater_weighting``): ``one_coin`` (one accuracy per rater; the
measured choice), ``dawid_skene`` (a confusion matrix per rater; unstable on skewed scales), ``auto`` (one-coin
weights on a dimension only where some rater counts less than ``AUTO_BELOW``, i.e. sits far below the team; a
team without such a rater trains exactly as with ``off``), and ``off``.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from slm_annotator.model.dataset import Example
from slm_annotator.model.rubric import Dimension, Rubric
from slm_annotator.settings import RATER_WEIGHTINGS

log = logging.getLogger(__name__)

MIN_RATERS = 3
MIN_SHARED = 10  # tasks with two or more raters
PRIOR_LABELS = 10.0  # pseudo-labels at the team's median skill added to every rater's estimate
FLOOR = 0.02  # the least a vote counts: a task rated only by a careless rater keeps a target
AUTO_BELOW = 0.5  # auto: a dimension is weighted only where some rater's weight falls below this
SMOOTHING = 1.0  # Dirichlet pseudo-count on each confusion cell (more on the diagonal), so EM is stable


@dataclass(frozen=True)
class RaterWeight:
    labels: int
    skill: float | None  # chance-corrected accuracy against the latent label, before shrinkage
    weight: float


@dataclass
class Reliability:
    """Per dimension, each rater's weight; ``reasons`` says why a dimension kept every weight at 1."""

    method: str
    dims: dict[str, dict[str, RaterWeight]] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)

    def apply(self, examples: Sequence[Example]) -> list[Example]:
        """The same examples with each rater's weight attached (a copy; the inputs are not changed)."""
        table = {key: {r: w.weight for r, w in raters.items()} for key, raters in self.dims.items()}
        return [replace(e, weights={k: {r: w[r] for r in e.ratings if r in w} for k, w in table.items()})
                for e in examples]

    def summary(self) -> dict[str, Any]:
        """For a training run's metrics (served by /versions, so no annotator names: those are e-mails): per
        dimension how many raters counted less than a full vote and the least weight; where nothing was, why."""
        out: dict[str, Any] = {"method": self.method, "dimensions": {}}
        for key, raters in self.dims.items():
            out["dimensions"][key] = {"raters": len(raters),
                                      "down_weighted": sum(1 for w in raters.values() if w.weight < 1.0),
                                      "lowest_weight": min(w.weight for w in raters.values())}
        for key, reason in self.reasons.items():
            out["dimensions"][key] = {"unweighted": reason}
        return out


def estimate(rubric: Rubric, examples: Sequence[Example], method: str = "one_coin") -> Reliability:
    """Every rater's weight on every dimension; ``off`` (or too little data) leaves all at 1."""
    if method not in RATER_WEIGHTINGS:
        raise ValueError(f"rater weighting must be one of {RATER_WEIGHTINGS}, got {method!r}")
    out = Reliability(method)
    if method == "off":
        return out
    for dim in rubric.dimensions:
        rows = _votes(dim, examples)
        reason = _too_little(rows)
        if reason:
            out.reasons[dim.key] = reason
            continue
        try:  # an estimate is an option on top of training: it may give up, never take the run down
            skills = (_dawid_skene_skills if method == "dawid_skene" else _one_coin_skills)(rows, len(dim.values))
        except (ValueError, ArithmeticError, KeyError, IndexError) as exc:
            log.warning("rater reliability on %s failed, every vote counts 1: %s", dim.key, exc)
            skills = {}
        if not skills or not all(math.isfinite(v) for v in skills.values()):
            out.reasons[dim.key] = "the reliability estimate did not converge to finite values"
            continue
        weights = _weights(skills, rows)
        lowest = min(w.weight for w in weights.values())
        if method == "auto" and lowest >= AUTO_BELOW:
            out.reasons[dim.key] = f"no rater far below the team (lowest weight {lowest:.2f} >= {AUTO_BELOW})"
            continue
        out.dims[dim.key] = weights
    return out


def _votes(dim: Dimension, examples: Sequence[Example]) -> list[tuple[str, str, int]]:
    """(task, rater, value index) for every rating of this dimension."""
    return [(e.task_key, rater, dim.values.index(v)) for e in examples for rater, rating in e.ratings.items()
            if (v := rating.get(dim.key)) in dim.values]


def _too_little(rows: Sequence[tuple[str, str, int]]) -> str:
    raters = {r for _, r, _ in rows}
    per_task: dict[str, int] = {}
    for task, _, _ in rows:
        per_task[task] = per_task.get(task, 0) + 1
    shared = sum(1 for n in per_task.values() if n >= 2)
    if len(raters) < MIN_RATERS:
        return f"{len(raters)} rater(s): at least {MIN_RATERS} are needed to tell which one is off"
    if shared < MIN_SHARED:
        return f"{shared} tasks with two or more raters: at least {MIN_SHARED} are needed"
    return ""


def _dawid_skene_skills(rows: Sequence[tuple[str, str, int]], k: int) -> dict[str, float]:
    """Dawid-Skene's confusion matrices (crowd-kit), read as each rater's kappa against the latent label."""
    import pandas as pd
    from crowdkit.aggregation import DawidSkene

    data = pd.DataFrame(rows, columns=["task", "worker", "label"])
    workers = data["worker"].unique()
    index = pd.MultiIndex.from_product([workers, range(k)], names=["worker", "label"])
    prior = np.tile(np.full((k, k), SMOOTHING / k) + np.eye(k) * SMOOTHING, (len(workers), 1))
    initial = pd.DataFrame(prior, index=index, columns=pd.Index(range(k), name="label"))
    ds = DawidSkene(n_iter=100, tol=1e-6, initial_error_strategy="addition").fit(data, initial_error=initial)
    priors = ds.priors_.reindex(range(k)).fillna(0.0).to_numpy(dtype=float)
    skills: dict[str, float] = {}
    for worker in workers:
        conf = ds.errors_.loc[worker].reindex(index=range(k), columns=range(k)).fillna(0.0).to_numpy(dtype=float)
        # conf[observed, true] = P(observed | true)
        accuracy = float(np.sum(priors * np.diag(conf)))
        marginal = conf @ priors  # P(observed)
        chance = float(np.sum(priors * marginal))
        skills[str(worker)] = (accuracy - chance) / (1 - chance) if chance < 1 else 0.0
    return skills


def _one_coin_skills(rows: Sequence[tuple[str, str, int]], k: int) -> dict[str, float]:
    """One-coin Dawid-Skene (one accuracy per rater, errors spread evenly): fewer parameters than a confusion
    matrix, so it stays put on skewed scales; the accuracy is rescaled so that a random rater is 0."""
    import pandas as pd
    from crowdkit.aggregation import OneCoinDawidSkene

    data = pd.DataFrame(rows, columns=["task", "worker", "label"])
    ds = OneCoinDawidSkene(n_iter=100, tol=1e-6).fit(data)
    return {str(w): (float(s) - 1 / k) / (1 - 1 / k) for w, s in ds.skills_.items()}


def _weights(skills: dict[str, float], rows: Sequence[tuple[str, str, int]]) -> dict[str, RaterWeight]:
    counts: dict[str, int] = {}
    for _, rater, _ in rows:
        counts[rater] = counts.get(rater, 0) + 1
    median = statistics.median(skills.values())
    out = {}
    for rater, skill in skills.items():
        n = counts[rater]
        shrunk = (n * skill + PRIOR_LABELS * median) / (n + PRIOR_LABELS)
        weight = 1.0 if median <= 0 else min(1.0, max(FLOOR, shrunk / median))
        out[rater] = RaterWeight(n, round(skill, 4), round(weight, 4))
    return out
