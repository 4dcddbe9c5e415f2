"""Estimated cost per route from the running usage totals and the configured price table.

Prices are applied when the totals are read, so changing PRICE_* re-prices history too. "All to the judge"
is what the same items would have cost if every one had been sent to the judge, at the judge's observed
tokens per answered item (unknown until the judge has answered one).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from slm_annotator.settings import Settings


@dataclass(frozen=True)
class Prices:
    judge_input: float  # per million prompt tokens
    judge_output: float  # per million completion tokens
    slm_hour: float  # per hour of the small model's compute
    human_item: float  # per item a human labels

    @classmethod
    def of(cls, settings: Settings) -> Prices:
        return cls(settings.price_judge_input, settings.price_judge_output, settings.price_slm_hour,
                   settings.price_human_item)


def route_cost(route: str, row: Any, prices: Prices) -> float:
    if route == "judge":
        return (row.prompt_tokens * prices.judge_input + row.completion_tokens * prices.judge_output) / 1e6
    if route == "slm":
        return row.seconds / 3600 * prices.slm_hour
    if route == "human":
        return row.items * prices.human_item
    return 0.0


def cost_table(rows: Iterable[Any], prices: Prices) -> dict[str, Any]:
    """Per route items, failures, tokens, seconds, estimated cost; totals; and the all-to-judge estimate."""
    routes: dict[str, dict[str, Any]] = {}
    for row in rows:
        routes[row.route] = {
            "items": int(row.items), "failures": int(row.failures), "prompt_tokens": int(row.prompt_tokens),
            "completion_tokens": int(row.completion_tokens), "seconds": round(float(row.seconds), 3),
            "cost": round(route_cost(row.route, row, prices), 6),
        }
    total = round(sum(r["cost"] for r in routes.values()), 6)
    everything = all_to_judge(routes, prices)
    return {"routes": routes, "total_cost": total,
            "all_to_judge_cost": None if everything is None else round(everything, 6)}


def all_to_judge(routes: dict[str, dict[str, Any]], prices: Prices) -> float | None:
    slm, judge = routes.get("slm"), routes.get("judge")
    answered = judge["items"] - judge["failures"] if judge else 0
    if not judge or answered <= 0:
        return None
    items = slm["items"] if slm else judge["items"]
    per_in, per_out = judge["prompt_tokens"] / answered, judge["completion_tokens"] / answered
    return items * (per_in * prices.judge_input + per_out * prices.judge_output) / 1e6


def judge_spend(rows: Iterable[Any], prices: Prices) -> float:
    return sum(route_cost("judge", r, prices) for r in rows if r.route == "judge")
