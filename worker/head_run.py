"""One head run of one project: every label -> embedding head -> a version served within seconds.

The head is the fast first learner: it trains on the CPU in seconds whenever HEAD_EVERY new labels arrived, so
Label Studio re-predicts with a model that learnt from the latest labels long before an adapter could. Its
per-dimension alpha is cross-validated on the training labels (no held-out split is spent on it); a new head
replaces a head-only version without a gate (the same recipe on more labels), and dimensions
the served version answers with its adapter (or the blend) keep doing so, and keep their adapter, until the
next adapter run re-chooses on held-out labels. Written to a temp folder and renamed, like adapter versions.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

from slm_annotator.model.annotator import HEAD_DIR, served_from_folder
from slm_annotator.model.heads import MIN_TASKS, features, shared_encoder, train_head
from slm_annotator.model.plan import Plan, head_plan, plan_score
from slm_annotator.schema import AdapterVersion
from slm_annotator.settings import Settings
from slm_annotator.store import Store
from slm_annotator.worker.pipeline import RunOutcome, load_examples, project_dir, record_adapter
from slm_annotator.worker.policy import prefill_bar_for


def run_head(settings: Settings, store: Store, project_id: str, run_id: int) -> RunOutcome:
    started = time.perf_counter()
    project = store.project(project_id)
    extra = project.extra_params if project else {}
    rubric, examples, reliability = load_examples(settings, store, project_id)
    labels = store.count_labels(project_id)
    if len(examples) < MIN_TASKS:
        return RunOutcome("skipped", f"{len(examples)} labelled tasks: a head needs at least {MIN_TASKS}")
    x = features(shared_encoder(settings.head_encoder), rubric, [e.data for e in examples])
    head = train_head(rubric, examples, x, settings.head_encoder, settings.seed)
    bar = prefill_bar_for(settings, extra)
    served = store.served_adapter(project_id)
    current = served_from_folder(served.model_version, Path(served.path), served.metrics).plan if served else None
    plan = merge(head_plan(head, rubric, bar), current)
    new, old = plan_score(plan), plan_score(current) if current is not None else None
    # Over a head-only version the new head is the same recipe on a superset of the labels: served (their
    # cross-validated alphas come from different label sets and differ by noise; the bar guards each dimension).
    # Over a version with an adapter the plan's mean alpha must not drop.
    head_only = current is None or current.adapter_dir is None
    promote = head_only or old is None or new is None or new >= old - settings.promotion_tolerance
    version = store.next_adapter_version(project_id)
    model_version = settings.adapter_version(project_id, version)
    tmp = project_dir(settings, project_id) / f".tmp-head{run_id}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    head.save(tmp / HEAD_DIR)
    plan.save(tmp)
    target = project_dir(settings, project_id) / f"v{version}"
    if target.exists():  # an orphan of a run killed between rename and commit: never served
        shutil.rmtree(target)
    os.replace(tmp, target)
    metrics: dict[str, Any] = {
        "kind": "head", "head": {"labels": labels, "tasks": len(examples), "encoder": settings.head_encoder},
        "plan": plan.summary(), "score": new, "current_score": old,
        "current_version": served.model_version if served else settings.base_version,
        "wall_seconds": round(time.perf_counter() - started, 2),
    }
    if reliability.method != "off":
        metrics["rater_weights"] = reliability.summary()
    promote, changed = record_adapter(store, AdapterVersion(
        project_id=project_id, version=version, model_version=model_version, path=str(target),
        status="served" if promote else "refused", base_model=settings.base_model, metrics=metrics,
        training_run_id=run_id), promote, served)  # seconds old: a version served meanwhile is not re-compared
    if promote:  # issue 15: re-predict the unlabelled tasks in Label Studio with the new version
        from slm_annotator.worker.bulk import refresh_after_promotion

        refresh_after_promotion(settings, store, project_id)
    detail = f"head on {len(examples)} tasks: cross-validated alpha {_fmt(new)} vs current {_fmt(old)}"
    return RunOutcome("promoted" if promote else "refused", f"{detail}; {changed}" if changed else detail,
                      model_version, metrics)


def merge(fresh: Plan, current: Plan | None) -> Plan:
    """The new head answers the dimensions the head answered (or all, before any adapter); dimensions the
    current version answers with its adapter or the blend keep that, with the current adapter."""
    if current is None or current.adapter_dir is None:
        return fresh
    dims = {k: (current.dims[k] if k in current.dims and current.dims[k].source != "head" else d)
            for k, d in fresh.dims.items()}
    return Plan(dims, fresh.bar, current.adapter_dir, current.adapter_version, head=True)


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"
