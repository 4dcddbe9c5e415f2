"""Which scorer answers each dimension, how its answer is decided, and whether it is pre-filled at all.

A model version serves a plan: per dimension the source (the embedding head, the adapter, or their blend:
the mean of both distributions), the decision fitted for that source (model.decoding), the held-out alpha that
chose it, and whether that alpha clears the pre-fill bar. A dimension below the bar still contributes its
confidence to the task score (Label Studio keeps sorting by uncertainty) but gets no pre-filled answer, so
nobody is anchored on a guess. Stored as plan.json in the version's folder.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from slm_annotator.model.dataset import Example
from slm_annotator.model.decoding import Decision, fit_decision
from slm_annotator.model.heads import is_ordered
from slm_annotator.model.heldout import dimension_alpha
from slm_annotator.model.rubric import Dimension, Rubric

PLAN_FILE = "plan.json"
SOURCES = ("head", "adapter", "blend")  # in order of preference on equal alpha: cheapest first


@dataclass(frozen=True)
class DimPlan:
    source: str  # head | adapter | blend
    decision: Decision = field(default_factory=Decision)
    alpha: float | None = None  # held-out (or cross-validated, for a head alone) alpha vs the consensus
    prefill: bool = True
    alphas: dict[str, float | None] = field(default_factory=dict)  # every candidate measured

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "decision": self.decision.to_dict(), "alpha": self.alpha,
                "prefill": self.prefill, "alphas": self.alphas}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> DimPlan:
        return cls(str(raw["source"]), Decision.from_dict(raw.get("decision")), raw.get("alpha"),
                   bool(raw.get("prefill", True)), dict(raw.get("alphas") or {}))


@dataclass(frozen=True)
class Plan:
    dims: dict[str, DimPlan]
    bar: float | None = None  # the pre-fill bar it was made with
    adapter_dir: str | None = None  # the sibling version folder whose adapter this plan reads (None: no adapter)
    adapter_version: str | None = None  # that adapter's own model_version: it stays loaded across head refreshes
    head: bool = False  # the version folder holds a head (head/)

    @property
    def sources(self) -> set[str]:
        return {d.source for d in self.dims.values()}

    def needs(self, scorer: str) -> bool:
        """Does serving this plan need the head or the adapter?"""
        return any(s in (scorer, "blend") for s in self.sources)

    def to_dict(self) -> dict[str, Any]:
        return {"bar": self.bar, "dimensions": {k: d.to_dict() for k, d in self.dims.items()},
                "adapter_dir": self.adapter_dir, "adapter_version": self.adapter_version, "head": self.head}

    def summary(self) -> dict[str, Any]:
        """What /versions and the report show: per dimension the source, its alpha and whether it is pre-filled."""
        return {k: {"source": d.source, "alpha": d.alpha, "prefill": d.prefill} for k, d in self.dims.items()}

    def save(self, folder: Path) -> None:
        (folder / PLAN_FILE).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True))

    @classmethod
    def load(cls, folder: Path) -> Plan | None:
        path = folder / PLAN_FILE
        if not path.is_file():
            return None
        raw = json.loads(path.read_text())
        return cls({k: DimPlan.from_dict(v) for k, v in raw["dimensions"].items()}, raw.get("bar"),
                   raw.get("adapter_dir"), raw.get("adapter_version"), bool(raw.get("head")))

    def with_bar(self, bar: float | None) -> Plan:
        """The same choices judged against another bar (a project may set its own)."""
        dims = {k: DimPlan(d.source, d.decision, d.alpha, clears(d.alpha, bar), d.alphas) for k, d in self.dims.items()}
        return replace(self, dims=dims, bar=bar)


def clears(alpha: float | None, bar: float | None) -> bool:
    """No bar: everything is pre-filled. With a bar, an unmeasured dimension is not."""
    return bar is None or (alpha is not None and alpha >= bar)


def label_counts(dim: Dimension, examples: Sequence[Example]) -> list[float]:
    """How often the raters gave each value: the distribution decisions are fitted to."""
    counts = [0.0] * len(dim.values)
    for e in examples:
        counts = [a + b for a, b in zip(counts, e.counts(dim), strict=True)]
    return counts


def head_plan(head: Any, rubric: Rubric, bar: float | None) -> Plan:
    """A head alone: its own out-of-fold decision and cross-validated alpha (no held-out split yet)."""
    dims = {}
    for dim in rubric.dimensions:
        h = head.dims[dim.key]
        dims[dim.key] = DimPlan("head", h.decision, h.cv_alpha, clears(h.cv_alpha, bar), {"head": h.cv_alpha})
    return Plan(dims, bar, head=True)


def choose(rubric: Rubric, heldout: Sequence[Example], train: Sequence[Example],
           candidates: Mapping[str, Sequence[np.ndarray]], fixed: Mapping[str, Sequence[Decision]] | None = None,
           bar: float | None = None) -> Plan:
    """Per dimension the candidate (plus the blend of head and adapter) with the best held-out alpha.

    candidates: source -> per dimension an (n_heldout, n_values) array of distributions. A source whose
    decisions were fitted elsewhere (the head's, out of fold) passes them in `fixed`; the others get cut points
    fitted on their held-out scores against the TRAINING labels' distribution: only the ranking of held-out
    inputs is used, never their labels.
    """
    pool = dict(candidates)
    if "head" in pool and "adapter" in pool:
        pool["blend"] = [(h + a) / 2 for h, a in zip(pool["head"], pool["adapter"], strict=True)]
    dims: dict[str, DimPlan] = {}
    for d, dim in enumerate(rubric.dimensions):
        counts = label_counts(dim, train)
        best: tuple[float, str, Decision] | None = None
        alphas: dict[str, float | None] = {}
        for source in [s for s in SOURCES if s in pool]:
            probs = np.asarray(pool[source][d], dtype=np.float64)
            decision = (fixed or {}).get(source, [None] * len(rubric.dimensions))[d] or \
                fit_decision(probs, counts, is_ordered(dim))
            value = dimension_alpha(dim, heldout, [dim.values[i] for i in decision.decide(probs)])
            alphas[source] = value
            if best is None or (value is not None and value > best[0]):
                best = (value if value is not None else -np.inf, source, decision)
        assert best is not None, "choose() needs at least one candidate"
        alpha = None if best[0] == -np.inf else float(best[0])
        dims[dim.key] = DimPlan(best[1], best[2], alpha, clears(alpha, bar), alphas)
    return Plan(dims, bar)


def plan_score(plan: Plan) -> float | None:
    """The plan's summary: mean held-out alpha over the dimensions that have one."""
    vals = [d.alpha for d in plan.dims.values() if d.alpha is not None]
    return sum(vals) / len(vals) if vals else None
