"""Scoring tasks through the prediction cache, in chunks, within a deadline: shared by /predict and bulk jobs.

An entry is the Label Studio prediction of one task, `{"result", "score", "model_version"}`. It is cached per
(project, task id, hash of the texts the prompt reads, model version, variant), where the variant is everything
else that shapes the answer: the label config, the project's extra_params, the pre-fill bar, the ensemble and
routing policy and the decoding. A task whose text changed, a new version or a new bar is a miss.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from slm_annotator.backend.payloads import INT64
from slm_annotator.backend.routing import Routed, RoutingPolicy, route_predictions
from slm_annotator.model.annotator import Served
from slm_annotator.model.heads import data_hash
from slm_annotator.model.prompt import TaskDataError
from slm_annotator.model.results import values_from_result
from slm_annotator.model.rubric import Rubric

log = logging.getLogger(__name__)
Entry = dict[str, Any]


def variant_key(config: str, extra: dict[str, Any], bar: float | None, policy: RoutingPolicy, decoding: str) -> str:
    raw = json.dumps([config, extra, bar, policy.members, policy.route, policy.epsilon, decoding], sort_keys=True,
                     default=str)
    return hashlib.sha256(raw.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def task_id_of(task: dict[str, Any]) -> int | None:
    """A Label Studio task id the store can key on (None: never cached, never pushed)."""
    tid = task.get("id")
    if isinstance(tid, int) and not isinstance(tid, bool) and -INT64 <= tid < INT64:
        return tid
    return None


@dataclass
class Scored:
    entries: list[Entry | None]  # per task, in order; None: not scored (deadline reached, or bad data)
    cached: int = 0
    computed: int = 0
    errors: dict[int, str] = field(default_factory=dict)  # task index -> why it could not be scored
    judged: bool = False  # the judge answered some: its answers fill the hard-sample pool

    def prefix(self) -> int:
        """How many leading tasks have an entry (Label Studio pairs results with tasks by position)."""
        n = 0
        for e in self.entries:
            if e is None:
                break
            n += 1
        return n


def predict_cached(
    svc: Any, pid: str, rubric: Rubric, config: str, extra: dict[str, Any], tasks: Sequence[dict[str, Any]],
    served: Served, bar: float | None, policy: RoutingPolicy, decoding: str, deadline: float | None = None,
    chunk: int | None = None, per_task_errors: bool = False,
    on_chunk: Callable[[list[int]], None] | None = None,
) -> Scored:
    """Entries for `tasks`: cached ones at once, the misses scored in request order, chunk by chunk, until
    `deadline` (time.monotonic(); the first chunk always runs). With `per_task_errors`, a task whose data lack
    the config's fields is reported in `errors` and the others are scored; without, TaskDataError propagates."""
    version = served.model_version
    variant = variant_key(config, extra, bar, policy, decoding)
    out = Scored([None] * len(tasks))
    hashes: list[str | None] = []
    for i, task in enumerate(tasks):
        try:
            hashes.append(data_hash(rubric, task.get("data") or {}))
        except TaskDataError as exc:
            if not per_task_errors:
                raise
            hashes.append(None)
            out.errors[i] = str(exc)
    keys = {tid: h for t, h in zip(tasks, hashes, strict=True)
            if (tid := task_id_of(t)) is not None and h is not None}
    hits: dict[int, tuple[list[Any], float]] = {}
    if pid and keys:
        try:
            hits = svc.store.cached_predictions(pid, version, variant, keys)
        except Exception:
            log.exception("prediction cache of project %s unreadable; scoring every task", pid)
    misses = []
    for i, task in enumerate(tasks):
        tid = task_id_of(task)
        if tid is not None and tid in hits:
            result, score = hits[tid]
            out.entries[i] = {"result": result, "score": score, "model_version": version}
            out.cached += 1
        elif i not in out.errors:
            misses.append(i)
    size = chunk or svc.settings.predict_batch_size
    pos = 0
    while pos < len(misses):
        if deadline is not None and pos and time.monotonic() >= deadline:
            break
        part = misses[pos : pos + max(1, size)]
        started = time.monotonic()
        _score_chunk(svc, pid, rubric, tasks, part, hashes, served, bar, policy, decoding, variant, out,
                     per_task_errors)
        pos += len(part)
        if on_chunk is not None:
            on_chunk(part)
        if deadline is not None and chunk is None:  # the next chunk should end within half the time left
            rate = len(part) / max(time.monotonic() - started, 1e-3)
            size = int(min(max(1.0, rate * (deadline - time.monotonic()) / 2), 4 * svc.settings.bulk_chunk))
    return out


def _score_chunk(svc: Any, pid: str, rubric: Rubric, tasks: Sequence[dict[str, Any]], part: list[int],
                 hashes: list[str | None], served: Served, bar: float | None, policy: RoutingPolicy,
                 decoding: str, variant: str, out: Scored, per_task_errors: bool) -> None:
    chunk = [tasks[i] for i in part]
    started = time.perf_counter()
    try:
        preds = svc.annotator.predict(rubric, chunk, served, bar, policy.members, decoding)
    except TaskDataError as exc:
        if not per_task_errors:
            raise
        if len(part) == 1:
            out.errors[part[0]] = str(exc)
            return
        for i in part:  # find the bad ones; the rest are scored
            _score_chunk(svc, pid, rubric, tasks, [i], hashes, served, bar, policy, decoding, variant, out, True)
        return
    routed = route_predictions(rubric, list(chunk), preds, policy, svc.judge(), svc.store if pid else None,
                               pid or "", svc.settings, time.perf_counter() - started)
    out.judged = out.judged or any(r.route == "judge" for r in routed)
    rows = []
    for i, pred, r in zip(part, preds, routed, strict=True):
        out.entries[i] = {"result": r.result, "score": r.score, "model_version": pred.model_version}
        out.computed += 1
        tid, h = task_id_of(tasks[i]), hashes[i]
        if tid is not None and h is not None and pred.model_version == served.model_version:
            rows.append((tid, h, r.result, r.score))
    if not pid:
        return
    record(svc, pid, rubric, chunk, preds, routed)
    try:
        svc.store.cache_predictions(pid, served.model_version, variant, rows, svc.settings.predict_cache_versions)
    except Exception:
        log.exception("could not cache predictions for project %s", pid)


def record(svc: Any, pid: str, rubric: Rubric, tasks: Sequence[Any], preds: list[Any], routed: list[Routed]) -> None:
    """The predictions table (values, score, uncertainty, route): what routing and the reports read."""
    rows = []
    for task, pred, r in zip(tasks, preds, routed, strict=True):
        task_id = task_id_of(task)
        if task_id is not None:
            values = values_from_result(rubric, r.result)
            rows.append({"task_id": task_id, "model_version": pred.model_version, "values": values,
                         "score": r.score, "uncertainty": r.uncertainty, "route": r.route})
    try:
        svc.store.record_predictions(pid, rows)
    except Exception:
        log.exception("could not record predictions for project %s", pid)
