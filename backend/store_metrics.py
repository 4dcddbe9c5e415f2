"""Per-project gauges read from the store at scrape time: labels stored, served adapter version, its held-out
model-vs-human alpha per dimension, training runs by outcome, and the latest bulk prediction run's progress.

A collector rather than gauges set in request handlers: gunicorn runs several processes and the worker is
another one, but the store is the one place that always knows.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from slm_annotator.costs import Prices, cost_table
from slm_annotator.store import Store

log = logging.getLogger(__name__)
ALPHA_MEASURES = {"alpha_model_vs_consensus": "model_vs_consensus", "alpha_model_as_rater": "model_as_rater"}


class StoreCollector(Collector):
    def __init__(self, store: Store, prices: Prices | None = None) -> None:
        self.store = store
        self.prices = prices

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
        for project in self.store.projects():
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
        return [labels, version, alpha, runs, last, *self._bulk_families(), *self._route_families()]

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
