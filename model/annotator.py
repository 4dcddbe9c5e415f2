"""What /predict serves: a model version's plan applied to tasks.

A version is a plan (model.plan) plus what it reads: an embedding head, an adapter, or both. Dimensions served
by the head need no SLM at all (a head-only version answers in milliseconds on a CPU); the SLM runs only when a
dimension reads the adapter. Every dimension adds its confidence to the task score; only the dimensions that
cleared the pre-fill bar put an answer into the result. The untrained base has no measured agreement, so with
a bar nothing is pre-filled and no model is touched.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from slm_annotator.model.ensemble import Vote
from slm_annotator.model.heads import Head, features, has_head, shared_encoder
from slm_annotator.model.plan import DimPlan, Plan
from slm_annotator.model.results import DimensionScore, to_ls_result
from slm_annotator.model.rubric import Rubric
from slm_annotator.model.serving import AdapterRef, ModelServer, TaskPrediction

HEAD_DIR = "head"
MAX_HEADS = 32


@dataclass(frozen=True)
class Served:
    """The version a project serves: its name for Label Studio and what answers each dimension."""

    model_version: str
    plan: Plan | None = None  # None: the untrained base
    adapter: AdapterRef | None = None
    head_dir: Path | None = None


def served_from_folder(model_version: str, folder: Path, metrics: dict[str, Any] | None) -> Served:
    """Reads a version folder: its plan.json, or (adapters trained before plans) an adapter-only plan whose
    per-dimension alphas come from the gate's stored metrics."""
    plan = Plan.load(folder)
    if plan is None:
        gate = ((metrics or {}).get("new") or {}).get("dimensions") or {}
        dims = {k: DimPlan("adapter", alpha=v.get("alpha_model_vs_consensus")) for k, v in gate.items()}
        legacy = Plan(dims, None, folder.name, model_version, head=False)
        return Served(model_version, legacy, AdapterRef(model_version, folder), None)
    adapter = None
    if plan.adapter_dir:
        adapter = AdapterRef(plan.adapter_version or model_version, folder.parent / plan.adapter_dir)
    head = folder / HEAD_DIR if plan.head and has_head(folder / HEAD_DIR) else None
    return Served(model_version, plan, adapter, head)


class Annotator:
    """Serves plans: heads loaded once per version folder, the SLM through the ModelServer."""

    def __init__(self, model: ModelServer, encoder: str, device: str = "cpu") -> None:
        self.model = model
        self.encoder_name = encoder
        self.device = device
        self._heads: OrderedDict[Path, Head] = OrderedDict()
        self._lock = threading.Lock()

    def head(self, folder: Path) -> Head:
        with self._lock:
            if folder not in self._heads:
                self._heads[folder] = Head.load(folder)
                while len(self._heads) > MAX_HEADS:
                    self._heads.popitem(last=False)
            self._heads.move_to_end(folder)
            return self._heads[folder]

    def warm(self, served: Served, bar: float | None) -> None:
        """Loads the SLM now if this version needs it, waiting as long as a load may take: a background job (a
        bulk run) has no Label Studio timeout to answer within, unlike /predict, whose wait is short."""
        if served.plan is None:
            needs = served.adapter is not None or bar is None
        else:
            plan = served.plan.with_bar(bar)
            needs = served.adapter is not None and (plan.needs("adapter") or not plan.head)
        if needs:
            self.model.ensure_loaded(wait=self.model.load_timeout)

    def predict(self, rubric: Rubric, tasks: Sequence[dict[str, Any]], served: Served, bar: float | None,
                members: int = 1, decoding: str = "argmax") -> list[TaskPrediction]:
        version = served.model_version
        if served.plan is None and served.adapter is None:
            if bar is not None:  # the untrained base: no measured agreement, nothing pre-filled, no model touched
                return [TaskPrediction([], 0.0, version) for _ in tasks]
            return self.model.predict(rubric, tasks, None, version, decoding, members)
        assert served.plan is not None
        plan = served.plan.with_bar(bar)
        if not plan.head and all(d.decision.kind == "argmax" for d in plan.dims.values()):
            preds = self.model.predict(rubric, tasks, served.adapter, version, decoding, members)  # adapter-only
            return [_only_prefilled(rubric, plan, p) for p in preds]
        return self._compose(rubric, tasks, served, plan, members)

    def _compose(self, rubric: Rubric, tasks: Sequence[dict[str, Any]], served: Served, plan: Plan,
                 members: int) -> list[TaskPrediction]:
        n = len(tasks)
        head_probs = adapter_probs = None
        tokens = [0] * n
        if plan.needs("head"):
            if served.head_dir is None:
                raise FileNotFoundError(f"version {served.model_version} has no head in its folder")
            head = self.head(served.head_dir)
            x = features(shared_encoder(head.encoder, self.device), rubric, [t.get("data") or {} for t in tasks])
            head_probs = head.distributions(rubric, x)
        k = max(1, members)
        per_member: list[list[np.ndarray]] = []  # member -> dimension -> (n, n_values)
        if plan.needs("adapter") and served.adapter is not None:
            dists, tokens = self.model.distributions(rubric, tasks, served.adapter, k)
            per_member = [[np.stack([dists[t * n + i][d].double().numpy() for i in range(n)])
                           for d in range(len(rubric.dimensions))] for t in range(k)]
            adapter_probs = [np.mean([m[d] for m in per_member], axis=0) for d in range(len(rubric.dimensions))]
        out = []
        for i in range(n):
            scores, votes = [], []
            for d, dim in enumerate(rubric.dimensions):
                step = plan.dims.get(dim.key)
                probs = _source_probs(step, d, i, head_probs, adapter_probs, len(dim.values))
                index = int(step.decision.decide(probs)[0]) if step else int(np.argmax(probs))
                score = DimensionScore(dim.values[index], index, float(probs[index]), tuple(map(float, probs)))
                scores.append(score)
                if k > 1:  # each member decides on its own blend: the AutoAnnotator vote, for routing
                    members_probs = [_source_probs(step, d, i, head_probs, pm, len(dim.values))
                                     for pm in per_member] or [probs]
                    counts = [0] * len(dim.values)
                    for mp in members_probs:
                        counts[int(step.decision.decide(mp)[0]) if step else int(np.argmax(mp))] += 1
                    votes.append(Vote(score, tuple(counts), len(members_probs)))
            pred = _prediction(rubric, plan, scores, served.model_version, tokens[i])
            out.append(replace(pred, votes=tuple(votes)) if votes else pred)
        return out


def _source_probs(step: DimPlan | None, d: int, i: int, head: list[np.ndarray] | None,
                  adapter: list[np.ndarray] | None, n_values: int) -> np.ndarray:
    source = step.source if step else "head"
    parts = []
    if source in ("head", "blend") and head is not None:
        parts.append(head[d][i])
    if source in ("adapter", "blend") and adapter is not None:
        parts.append(adapter[d][i])
    if not parts:  # the source's scorer is missing from this version: a flat distribution, never pre-filled
        return np.full(n_values, 1.0 / n_values)
    return np.mean(parts, axis=0)


def _prediction(rubric: Rubric, plan: Plan, scores: list[DimensionScore], version: str,
                tokens: int) -> TaskPrediction:
    """The task score counts every dimension (Label Studio sorts by it); the result holds the pre-filled ones."""
    _, score = to_ls_result(rubric, scores)
    drop = _held_back(rubric, plan)
    keep = [k for k, dim in enumerate(rubric.dimensions) if dim.control not in drop]
    sub = Rubric(rubric.objects, tuple(rubric.dimensions[k] for k in keep), rubric.instructions)
    result, _ = to_ls_result(sub, [scores[k] for k in keep]) if keep else ([], score)
    return TaskPrediction(result, score, version, prompt_tokens=tokens)


def _held_back(rubric: Rubric, plan: Plan) -> set[str]:
    """Controls with a dimension below the bar: a multi-choice control is pre-filled whole or not at all (a
    partial selection would read as "the other options do not apply")."""
    return {d.control for d in rubric.dimensions if not (plan.dims.get(d.key) and plan.dims[d.key].prefill)}


def _only_prefilled(rubric: Rubric, plan: Plan, pred: TaskPrediction) -> TaskPrediction:
    """An adapter-only version's prediction without the controls whose dimensions are below the bar."""
    drop = _held_back(rubric, plan)
    if not drop:
        return pred
    return TaskPrediction([r for r in pred.result if r["from_name"] not in drop], pred.score, pred.model_version,
                          pred.votes, pred.prompt_tokens)
