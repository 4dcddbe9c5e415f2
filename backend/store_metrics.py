"""Per-project gauges read from the store at scrape time: labels stored, served adapter version, its held-out
model-vs-human alpha per dimension, training runs by outcome, and the latest bulk prediction run's progress.

A collector rather than gauges set in request handlers: gunicorn runs several processes and the worker is
another one, but the store is the one place that always knows.

Per annotator (issue 18): alpha against the others' consensus per dimension and overall, the flag, the number of
labels. Those need every label and a bootstrap, too much for every scrape of every project, so each process keeps
them per project and recomputes a project only when its label count (read anyway) has changed and its figures
are older than ANNOTATOR_TTL; the labels of the projects due come from one grouped query, and a scrape spends at
most ANNOTATOR_BUDGET seconds on them (the rest keep their previous figures until a later scrape). Annotators
appear under the pseudonyms of the unauthenticated report page ("rater 1", ...): /metrics carries no e-mails.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from typing import Any

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import select

from slm_annotator.costs import Prices, cost_table
from slm_annotator.model.annotations_io import from_labels
from slm_annotator.model.raters import MIN_LABELS, RATER_BOOT, annotator_report
from slm_annotator.model.rubric import RubricError
from slm_annotator.project_report import pseudonymous
from slm_annotator.schema import Annotation, Project
from slm_annotator.store import Store

log = logging.getLogger(__name__)
ALPHA_MEASURES = {"alpha_model_vs_consensus": "model_vs_consensus", "alpha_model_as_rater": "model_as_rater"}
ANNOTATOR_TTL = 600.0  # seconds: a project's per-annotator figures are recomputed at most this often
ANNOTATOR_BUDGET = 2.0  # seconds per scrape spent recomputing them
ANNOTATOR_BATCH = 5  # projects whose labels one scrape reads (in one query)
AnnotatorRow = tuple[str, str, float | None, bool | None, int]


class StoreCollector(Collector):
    def __init__(self, store: Store, prices: Prices | None = None) -> None:
        self.store = store
        self.prices = prices
        self._annotators: dict[str, tuple[int, float, list[AnnotatorRow]]] = {}

    def collect(self) -> Iterator[Any]:
        up = GaugeMetricFamily("slm_store_up", "1 if the label store could be read for this scrape")
        try:
            families = self._families()
        except Exception:  # a scrape must still answer (and say the store is down)
            log.exception("reading the store for /metrics failed")
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from families

    def _families(self) -> list[GaugeMetricFamily]:
        labels = GaugeMetricFamily("slm_project_labels", "Active labels stored (not deleted or cancelled)",
                                   labels=["project"])
        version = GaugeMetricFamily("slm_served_adapter_version", "Adapter version served (0: the base model)",
                                    labels=["project"])
        alpha = GaugeMetricFamily("slm_model_human_alpha", "Held-out Krippendorff alpha of the served adapter "
                                  "against the human labels, per dimension", labels=["project", "dimension", "measure"])
        runs = GaugeMetricFamily("slm_training_runs", "Training runs by outcome", labels=["project", "status"])
        last = GaugeMetricFamily("slm_training_last_finished_timestamp_seconds",
                                 "When the latest finished training run ended, by its outcome",
                                 labels=["project", "status"])
        # A few grouped queries, not three per project: 5,000 projects took 12 s per scrape (issue 17).
        counts, served_all = self.store.all_label_counts(), self.store.all_served()
        run_counts, latest_all = self.store.all_run_counts(), self.store.all_latest_finished()
        projects = self.store.projects()
        for project in projects:
            pid = project.id
            labels.add_metric([pid], counts.get(pid, 0))
            served = served_all.get(pid)
            version.add_metric([pid], served.version if served else 0)
            dims = (((served.metrics or {}).get("new") or {}).get("dimensions") or {}) if served else {}
            for dim, values in dims.items():
                for key, measure in ALPHA_MEASURES.items():
                    if isinstance(values.get(key), int | float):
                        alpha.add_metric([pid, str(dim), measure], float(values[key]))
        for (pid, status), count in sorted(run_counts.items()):
            runs.add_metric([pid, status], count)
        for pid, latest in sorted(latest_all.items()):
            last.add_metric([pid, latest.status], latest.finished_at.timestamp())  # type: ignore[union-attr]
        return [labels, version, alpha, runs, last, *self._annotator_families(projects, counts),
                *self._bulk_families(), *self._route_families()]

    def _annotator_families(self, projects: Sequence[Project], counts: dict[str, int]) -> list[GaugeMetricFamily]:
        """Per annotator: alpha vs the others' consensus, flagged or not (per dimension and "overall"), labels."""
        self._refresh_annotators(projects, counts)
        alpha = GaugeMetricFamily("slm_annotator_alpha", "Krippendorff alpha of the annotator against the consensus "
                                  "of the other annotators, per dimension and overall (mean over dimensions)",
                                  labels=["project", "annotator", "dimension"])
        flagged = GaugeMetricFamily("slm_annotator_flagged", "1 when the annotator sits far below the team (upper end "
                                    "of the 95% bootstrap interval below the team median)",
                                    labels=["project", "annotator", "dimension"])
        n_labels = GaugeMetricFamily("slm_annotator_labels", "Tasks the annotator labelled",
                                     labels=["project", "annotator"])
        for pid, (_, _, rows) in sorted(self._annotators.items()):
            for annotator, dim, value, flag, n in rows:
                if dim == "overall":
                    n_labels.add_metric([pid, annotator], n)
                if value is not None:
                    alpha.add_metric([pid, annotator, dim], value)
                if flag is not None:
                    flagged.add_metric([pid, annotator, dim], 1.0 if flag else 0.0)
        return [alpha, flagged, n_labels]

    def _refresh_annotators(self, projects: Sequence[Project], counts: dict[str, int]) -> None:
        now = time.monotonic()
        by_id = {p.id: p for p in projects if counts.get(p.id, 0) >= MIN_LABELS}
        for pid in set(self._annotators) - set(by_id):
            del self._annotators[pid]
        due = [pid for pid in by_id if pid not in self._annotators
               or (self._annotators[pid][0] != counts[pid] and now - self._annotators[pid][1] > ANNOTATOR_TTL)]
        due = sorted(due, key=lambda pid: self._annotators.get(pid, (0, -1.0))[1])[:ANNOTATOR_BATCH]
        if not due:
            return
        with self.store.session() as s:
            rows = list(s.scalars(select(Annotation).where(
                Annotation.project_id.in_(due), Annotation.deleted.is_(False), Annotation.cancelled.is_(False))
                .order_by(Annotation.project_id, Annotation.task_id, Annotation.annotation_id)))
        labels: dict[str, list[Annotation]] = {}
        for row in rows:
            labels.setdefault(row.project_id, []).append(row)
        for pid in due:
            if time.monotonic() - now > ANNOTATOR_BUDGET:
                break
            self._annotators[pid] = (counts[pid], time.monotonic(), _annotator_rows(by_id[pid], labels.get(pid, [])))


    def _bulk_families(self) -> list[GaugeMetricFamily]:
        """The latest bulk prediction run per project (worker.bulk): tasks by state, rate, ETA, running or not."""
        tasks = GaugeMetricFamily("slm_bulk_tasks", "Tasks of the project's latest bulk prediction run, by state "
                                  "(total, done, written, skipped, errors)", labels=["project", "state"])
        rate = GaugeMetricFamily("slm_bulk_tasks_per_second", "Throughput of the latest bulk run", labels=["project"])
        eta = GaugeMetricFamily("slm_bulk_eta_seconds", "Estimated seconds left in the latest bulk run",
                                labels=["project"])
        status = GaugeMetricFamily("slm_bulk_run_status", "1 for the latest bulk run's status (running, waiting: "
                                   "Label Studio unreachable, done, failed, superseded)", labels=["project", "status"])
        for pid, run in sorted(self.store.latest_bulk_runs().items()):
            for state in ("total", "done", "written", "skipped", "errors"):
                tasks.add_metric([pid, state], getattr(run, state))
            if run.tasks_per_s is not None:
                rate.add_metric([pid], run.tasks_per_s)
            if run.eta_s is not None:
                eta.add_metric([pid], run.eta_s)
            status.add_metric([pid, run.status], 1)
        return [tasks, rate, eta, status]

    def _route_families(self) -> list[GaugeMetricFamily]:
        """Per project and route (slm | judge | human): items, tokens, compute seconds, estimated cost."""
        names = {"items": "Items sent to the route", "failures": "Items the route failed on (judge errors)",
                 "prompt_tokens": "Prompt tokens", "completion_tokens": "Completion tokens",
                 "seconds": "Compute / wall seconds spent"}
        fams = {k: GaugeMetricFamily(f"slm_route_{k}", text, labels=["project", "route"]) for k, text in names.items()}
        cost = GaugeMetricFamily("slm_route_cost_estimate", "Estimated cost from the PRICE_* table",
                                 labels=["project", "route"])
        everything = GaugeMetricFamily(
            "slm_all_to_judge_cost_estimate",
            "What sending every predicted item to the judge would have cost (once the judge has answered one)",
            labels=["project"])
        by_project: dict[str, list[Any]] = {}
        for row in self.store.usage():
            by_project.setdefault(row.project_id, []).append(row)
            for key, fam in fams.items():
                fam.add_metric([row.project_id, row.route], float(getattr(row, key)))
        if self.prices is not None:
            for pid, rows in by_project.items():
                table = cost_table(rows, self.prices)
                for route, r in table["routes"].items():
                    cost.add_metric([pid, route], r["cost"])
                if table["all_to_judge_cost"] is not None:
                    everything.add_metric([pid], table["all_to_judge_cost"])
        return [*fams.values(), cost, everything]


def _annotator_rows(project: Project, labels: list[Annotation]) -> list[AnnotatorRow]:
    """(annotator pseudonym, dimension or "overall", alpha vs consensus, flagged (None: undecidable), labels)."""
    try:
        ratings = pseudonymous(from_labels(project, labels))
    except RubricError:
        return []
    report = annotator_report(ratings, None, RATER_BOOT)
    out = []
    for name, a in report["annotators"].items():
        for dim, e in [("overall", a["overall"]), *a["dimensions"].items()]:
            value = e["vs_consensus"].get("value")
            decided = value is not None and not (e.get("flag_reason") or "").startswith("not enough data")
            out.append((name, dim, value, bool(e.get("flagged")) if decided else None, a["n_labels"]))
    return out
