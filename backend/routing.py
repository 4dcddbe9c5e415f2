"""AutoAnnotator routing: items the ensemble disagrees on go to the judge or to a human; usage is counted.

An item routed to a human keeps the ensemble's answer as its pre-annotation, but its task score drops below
zero (score - 1), so Label Studio's ascending sort by prediction score puts every such item first, and each
result carries a note saying why. A judge that fails, times out or is over budget sends its items to humans.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from slm_annotator import project_settings
from slm_annotator.backend.payloads import INT64
from slm_annotator.costs import Prices, judge_spend
from slm_annotator.model.judge import Judge, JudgeConfig
from slm_annotator.model.results import DimensionScore, to_ls_result
from slm_annotator.model.rubric import Rubric
from slm_annotator.model.serving import TaskPrediction
from slm_annotator.settings import Settings
from slm_annotator.store import Store
from slm_annotator.worker.policy import members_for

log = logging.getLogger(__name__)
CHARS_PER_TOKEN = 4  # the judge's tokenizer is unknown: its texts are cut to MAX_PROMPT_TOKENS x this many characters


@dataclass(frozen=True)
class RoutingPolicy:
    members: int  # k members (adapters, templates) that vote; 1: a single scorer, no routing
    route: str  # none | human | judge
    epsilon: float  # route items with U(x) >= epsilon


@dataclass
class Routed:
    result: list[dict[str, Any]]
    score: float
    route: str  # "" (the ensemble's answer stands) | judge | human
    uncertainty: float | None


def routing_policy(settings: Settings, extra: dict[str, Any]) -> RoutingPolicy:
    """Global settings, overridden per project by extra_params "ensemble", "route", "route_epsilon" (validated
    at /setup; never per request: routing decides what the judge costs)."""
    own = project_settings.stored(extra)
    eps = settings.route_epsilon if own.route_epsilon is None else own.route_epsilon
    return RoutingPolicy(members_for(settings, extra), own.route or settings.route, eps)


def judge_config(settings: Settings) -> JudgeConfig | None:
    if not settings.judge_url or not settings.judge_model:
        return None
    return JudgeConfig(settings.judge_url, settings.judge_model, settings.judge_api_key, settings.judge_timeout,
                       settings.judge_retries, settings.judge_concurrency,
                       max_prompt_chars=settings.max_prompt_tokens * CHARS_PER_TOKEN, deadline=settings.judge_deadline)


def route_predictions(
    rubric: Rubric, tasks: list[dict[str, Any]], preds: list[TaskPrediction], policy: RoutingPolicy,
    judge: Judge | None, store: Store | None, project: str, settings: Settings, model_seconds: float,
) -> list[Routed]:
    out = [Routed(p.result, p.score, "", p.uncertainty if p.votes else None) for p in preds]
    uncertain = [i for i, p in enumerate(preds) if p.votes and policy.route != "none"
                 and p.uncertainty >= policy.epsilon]
    to_human = uncertain
    if uncertain and policy.route == "judge":
        to_human = _ask_judge(rubric, tasks, preds, uncertain, out, judge, store, project, settings)
    for i in to_human:
        _mark_for_human(out[i], preds[i])
    if store is not None and project:
        store.add_usage(project, "slm", items=len(preds), prompt_tokens=sum(p.prompt_tokens for p in preds),
                        seconds=model_seconds)
        if to_human:
            store.add_usage(project, "human", items=len(to_human))
    return out


def _ask_judge(
    rubric: Rubric, tasks: list[dict[str, Any]], preds: list[TaskPrediction], uncertain: list[int],
    out: list[Routed], judge: Judge | None, store: Store | None, project: str, settings: Settings,
) -> list[int]:
    """Sends the uncertain items to the judge; returns those left for humans (judge missing, over budget, failed)."""
    if judge is None:
        log.warning("ROUTE=judge but JUDGE_URL / JUDGE_MODEL are not set: uncertain items go to humans")
        return uncertain
    if store is not None and project and settings.judge_budget > 0:
        spent = judge_spend(store.usage(project), Prices.of(settings))
        if spent >= settings.judge_budget:
            log.warning("project %s: judge budget %.2f spent (%.2f); uncertain items go to humans", project,
                        settings.judge_budget, spent)
            return uncertain
    verdicts = judge.ask_many(rubric, [tasks[i].get("data") or {} for i in uncertain])
    left = []
    for i, verdict in zip(uncertain, verdicts, strict=True):
        if verdict.values is None:
            log.warning("judge failed on task %s: %s", tasks[i].get("id"), verdict.error)
            left.append(i)
            continue
        out[i].result, out[i].score = _judged_result(rubric, preds[i], verdict.values)
        out[i].route = "judge"
        _pool(store, project, tasks[i], f"judge:{judge.cfg.model}"[:255], verdict.values)
    if store is not None and project:
        store.add_usage(project, "judge", items=len(verdicts), failures=len(left),
                        prompt_tokens=sum(v.prompt_tokens for v in verdicts),
                        completion_tokens=sum(v.completion_tokens for v in verdicts),
                        seconds=sum(v.seconds for v in verdicts))
    return left


def _judged_result(rubric: Rubric, pred: TaskPrediction, values: dict[str, str]) -> tuple[list[dict[str, Any]], float]:
    """The judge's values; each dimension's confidence is how much probability the members gave that value."""
    scores = []
    for dim, v in zip(rubric.dimensions, pred.votes, strict=True):
        index = dim.values.index(values[dim.key])
        onehot = tuple(1.0 if j == index else 0.0 for j in range(len(dim.values)))
        scores.append(DimensionScore(values[dim.key], index, v.score.probs[index], onehot))
    result, _ = to_ls_result(rubric, scores)
    return result, round(min(s.confidence for s in scores), 6)


def _mark_for_human(routed: Routed, pred: TaskPrediction) -> None:
    note = (f"slm-annotator: the {pred.votes[0].k} ensemble members disagree (U={pred.uncertainty:.2f}); "
            "a human should check this item")
    routed.result = [{**item, "meta": {"text": [note]}} for item in routed.result]
    routed.score = round(routed.score - 1.0, 6)
    routed.route = "human"


def _pool(store: Store | None, project: str, task: dict[str, Any], annotator: str, values: dict[str, str]) -> None:
    task_id = task.get("id")
    if store is None or not project or not isinstance(task_id, int) or isinstance(task_id, bool):
        return
    if not -INT64 <= task_id < INT64:
        return
    try:
        store.add_hard_sample(project, task_id, "judge", annotator, values, task.get("data") or {})
    except Exception:
        log.exception("could not add task %s to the hard-sample pool", task_id)
