"""A live project's report from the store alone (never the model): labels, agreement of the stored
predictions with the stored labels, each adapter's held-out agreement over time, and the training runs.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from slm_annotator.costs import Prices, cost_table
from slm_annotator.model.agreement_report import build_report
from slm_annotator.model.annotations_io import Ratings, from_store, iso_stamp
from slm_annotator.model.dataset import examples_from_labels
from slm_annotator.model.reliability import estimate
from slm_annotator.model.rubric import RubricError, parse_label_config
from slm_annotator.schema import AdapterVersion, BulkRun, Project, TrainingRun
from slm_annotator.store import Store

AUTO_BOOT_ITEMS = 500  # above this many items the page skips bootstrap intervals (ask for them with ?n_boot=)
AUTO_BOOT = 100


def _iso(when: datetime | None) -> str | None:
    return iso_stamp(when) or None


def adapter_entry(a: AdapterVersion) -> dict[str, Any]:
    """One adapter with the held-out agreement the training job measured for it (``worker.pipeline``)."""
    metrics = a.metrics or {}
    if metrics.get("kind") == "head":  # a head version: cross-validated alphas, no held-out gate metrics
        return {"version": a.version, "model_version": a.model_version, "label": f"v{a.version}",
                "status": a.status, "kind": "head", "created_at": _iso(a.created_at),
                "promoted_at": _iso(a.promoted_at), "score": metrics.get("score"),
                "score_kind": "cross-validated mean alpha vs consensus", "current_score": metrics.get("current_score"),
                "replaced": metrics.get("current_version"), "mean_alpha": metrics.get("score"),
                "train_tasks": (metrics.get("head") or {}).get("tasks"), "heldout_tasks": None,
                "dimensions": {k: {"model_vs_consensus": d.get("alpha")}
                               for k, d in (metrics.get("plan") or {}).items()},
                "plan": metrics.get("plan")}
    new = metrics.get("new") or {}
    dims = {
        key: {"model_vs_consensus": d.get("alpha_model_vs_consensus"), "model_as_rater": d.get("alpha_model_as_rater"),
              "accuracy": d.get("accuracy_vs_consensus"), "n_items": d.get("n_items"), "reason": d.get("reason")}
        for key, d in (new.get("dimensions") or {}).items()
    }
    return {
        "version": a.version, "model_version": a.model_version, "label": f"v{a.version}", "status": a.status,
        "created_at": _iso(a.created_at), "promoted_at": _iso(a.promoted_at), "score": new.get("score"),
        "score_kind": new.get("score_kind"), "current_score": ((a.metrics or {}).get("current") or {}).get("score"),
        "replaced": (a.metrics or {}).get("current_version"), "mean_alpha": new.get("mean_alpha"),
        "train_tasks": ((a.metrics or {}).get("train") or {}).get("tasks"),
        "heldout_tasks": (a.metrics or {}).get("heldout_tasks"), "dimensions": dims, "kind": "adapter",
        "plan": metrics.get("plan"),
    }


def run_entry(r: TrainingRun) -> dict[str, Any]:
    return {"id": r.id, "trigger": r.trigger, "status": r.status, "started_at": _iso(r.started_at),
            "finished_at": _iso(r.finished_at), "n_train": r.n_train, "n_heldout": r.n_heldout,
            "error": (r.error or "").strip().splitlines()[-1][:300] if r.error else ""}


def bulk_entry(r: BulkRun) -> dict[str, Any]:
    return {"id": r.id, "model_version": r.model_version, "mode": r.mode, "status": r.status, "total": r.total,
            "done": r.done, "written": r.written, "skipped": r.skipped, "errors": r.errors, "workers": r.workers,
            "tasks_per_s": r.tasks_per_s, "eta_s": r.eta_s, "last_error": (r.last_error or "")[:300],
            "started_at": _iso(r.started_at), "updated_at": _iso(r.updated_at), "finished_at": _iso(r.finished_at)}


def pick_model(ratings: Ratings, served: str | None) -> str | None:
    """The served version's stored predictions if it has any, else the latest version that has some."""
    return served if served in ratings.models else ratings.latest_model()


def auto_boot(n_items: int) -> int:
    return AUTO_BOOT if n_items <= AUTO_BOOT_ITEMS else 0


def aliases(ratings: Ratings) -> dict[str, str]:
    """The human raters' pseudonyms, "rater 1", "rater 2"... in first-seen order."""
    return {name: f"rater {n}" for n, name in enumerate(ratings.human, 1)}


def pseudonymous(ratings: Ratings) -> Ratings:
    """The human raters as "rater 1", "rater 2"... in first-seen order: their e-mails are for authenticated eyes."""
    alias = aliases(ratings)
    ratings.human = {alias[name]: by_item for name, by_item in ratings.human.items()}
    ratings.times = {alias.get(name, "rater ?"): t for name, t in ratings.times.items()}
    ratings.golden = {item: (alias.get(author, "rater ?"), values) for item, (author, values) in ratings.golden.items()}
    return ratings


def rater_weights(store: Store, project: Project, method: str, alias: dict[str, str] | None) -> dict[str, Any]:
    """How much each annotator's vote would count if the project trained now (model.reliability), per dimension:
    the annotators counted less than a full vote (by pseudonym where alias is given), or why nobody was."""
    rubric = parse_label_config(project.label_config, project.extra_params)
    rel = estimate(rubric, examples_from_labels(rubric, store.labels(project.id)), method)
    name = (lambda r: alias.get(r, "rater ?")) if alias is not None else str
    dims: dict[str, Any] = {key: {"down_weighted": {name(r): w.weight for r, w in sorted(
        raters.items(), key=lambda x: x[1].weight) if w.weight < 1.0}} for key, raters in rel.dims.items()}
    dims.update({key: {"unweighted": reason} for key, reason in rel.reasons.items()})
    return {"method": method, "dimensions": dims}


def build_project_report(store: Store, project_id: str, base_version: str, n_boot: int | None = None,
                         seed: int = 0, prices: Prices | None = None, hide_raters: bool = False,
                         rater_weighting: str = "off") -> dict[str, Any]:
    """Raises KeyError for an unknown project. hide_raters: annotators (e-mails) replaced by pseudonyms.
    rater_weighting: the project's RATER_WEIGHTING, whose weights on today's labels the report shows."""
    project = store.project(project_id)
    if project is None:
        raise KeyError(project_id)
    served = store.served_adapter(project_id)
    served_version = served.model_version if served else base_version
    report: dict[str, Any] = {"kind": "project", "generated_at": datetime.now(UTC).isoformat(timespec="seconds")}
    try:
        ratings: Ratings | None = from_store(store, project_id)
    except RubricError as exc:
        ratings, report["agreement_reason"] = None, f"no usable label config yet: {exc}"
    if ratings is not None and rater_weighting != "off":
        report["rater_weights"] = rater_weights(store, project, rater_weighting,
                                                aliases(ratings) if hide_raters else None)
    if ratings is not None and hide_raters:
        ratings = pseudonymous(ratings)
    if ratings is not None:
        model = pick_model(ratings, served_version)
        boot = auto_boot(len(ratings.items)) if n_boot is None else n_boot
        report["agreement"] = build_report(ratings, model, boot, seed, title=f"project {project_id}")
    report["project"] = {
        "id": project_id, "served": served_version, "labels": store.count_labels(project_id),
        "tasks": len(ratings.items) if ratings else 0, "raters": len(ratings.raters) if ratings else 0,
        "pending": store.pending_changes(project_id),
        "serving": (served.metrics or {}).get("plan") if served else None,  # per dimension: source, alpha, prefill
    }
    report["adapters"] = [adapter_entry(a) for a in store.adapters(project_id)]
    report["runs"] = [run_entry(r) for r in store.runs(project_id)]
    report["bulk"] = [bulk_entry(r) for r in store.bulk_runs(project_id)]
    usage = store.usage(project_id)
    if usage and prices is not None:
        report["costs"] = cost_table(usage, prices)
    report["hard_pool"] = store.count_hard_pool(project_id)
    return report
