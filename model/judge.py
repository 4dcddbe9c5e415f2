"""The bigger judge: any OpenAI-compatible chat-completions endpoint, asked for the rubric's closed answers.

The request carries a JSON schema whose properties are the rubric's dimensions, each an enum of its allowed
values (structured outputs), and the answer is validated against the rubric all the same: a judge that answers
outside the rubric counts as a failure, never as a label.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

from slm_annotator.model.prompt import object_text
from slm_annotator.model.rubric import Rubric

SYSTEM = ("You are an expert annotator. Judge the input on every criterion of the rubric exactly as the "
          "annotation guidelines say. Answer with a JSON object only.")


@dataclass(frozen=True)
class JudgeConfig:
    url: str  # the API base, e.g. https://api.openai.com/v1 or http://judge:8081/v1
    model: str
    api_key: str = ""
    timeout: float = 20.0
    retries: int = 2
    concurrency: int = 4
    max_tokens: int = 256
    max_prompt_chars: int = 16_384  # the task texts, cut fairly like the model's prompts (MAX_PROMPT_TOKENS x 4)
    deadline: float = 60.0  # seconds for all the items of one /predict, retries included (JUDGE_DEADLINE)


@dataclass(frozen=True)
class Verdict:
    values: dict[str, str] | None  # per dimension key; None when the judge failed
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    error: str = ""


class JudgeAnswerError(ValueError):
    """The judge answered, but not with one allowed value per dimension."""


def answer_schema(rubric: Rubric) -> dict[str, Any]:
    properties = {d.key: {"type": "string", "enum": list(d.values)} for d in rubric.dimensions}
    return {"type": "object", "properties": properties, "required": list(properties),
            "additionalProperties": False}


def cut_texts(texts: list[str], budget: int) -> list[str]:
    """Water-fills a character budget over the texts, so one long field cannot crowd out the others (the model's
    prompts do the same in tokens); a cut text ends in " [...]"."""
    if sum(len(t) for t in texts) <= budget:
        return texts
    limits, remaining = [0] * len(texts), max(budget, 0)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    for n, i in enumerate(order):
        limits[i] = min(len(texts[i]), remaining // (len(order) - n))
        remaining -= limits[i]
    return [t if limits[i] >= len(t) else t[: limits[i]] + " [...]" for i, t in enumerate(texts)]


def judge_messages(rubric: Rubric, data: dict[str, Any], max_chars: int = 16_384) -> list[dict[str, str]]:
    cut = cut_texts([object_text(o, data) for o in rubric.objects], max_chars)
    texts = "\n\n".join(f"### {o.name}\n{t}" for o, t in zip(rubric.objects, cut, strict=True))
    criteria = []
    for d in rubric.dimensions:
        desc = f" {d.description.strip()}" if d.description.strip() else ""
        criteria.append(f'- "{d.key}": {d.title}.{desc} Allowed: {", ".join(json.dumps(v) for v in d.values)}')
    guidelines = f"Guidelines:\n{rubric.instructions.strip()}\n\n" if rubric.instructions else ""
    user = (f"{guidelines}{texts}\n\n### Rubric\n" + "\n".join(criteria)
            + "\n\nReply with one JSON object that has exactly these keys, each set to one allowed value.")
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


def parse_answer(rubric: Rubric, content: str | None) -> dict[str, str]:
    """One allowed value per dimension; a value differing only in case or surrounding spaces is accepted."""
    try:
        answer = json.loads(content or "")
    except json.JSONDecodeError as exc:
        raise JudgeAnswerError(f"the judge's answer is not JSON: {str(content)[:80]!r}") from exc
    if not isinstance(answer, dict):
        raise JudgeAnswerError("the judge's answer is not a JSON object")
    out = {}
    for dim in rubric.dimensions:
        given = answer.get(dim.key)
        allowed = {v.strip().lower(): v for v in dim.values}
        match = allowed.get(str(given).strip().lower()) if given is not None else None
        if match is None:
            raise JudgeAnswerError(f"the judge gave {given!r} for {dim.key!r}, not one of {list(dim.values)}")
        out[dim.key] = match
    return out


class Judge:
    """A thin client: the official openai package does the timeouts, retries and backoff."""

    def __init__(self, cfg: JudgeConfig) -> None:
        from openai import OpenAI

        self.cfg = cfg
        self.client = OpenAI(base_url=cfg.url, api_key=cfg.api_key or "unused", timeout=cfg.timeout,
                             max_retries=max(0, cfg.retries))

    def ask(self, rubric: Rubric, data: dict[str, Any]) -> Verdict:
        from openai import OpenAIError

        started = time.perf_counter()
        try:
            response = self.client.chat.completions.create(
                model=self.cfg.model, messages=judge_messages(rubric, data, self.cfg.max_prompt_chars), temperature=0,  # type: ignore[arg-type]
                max_tokens=self.cfg.max_tokens,
                response_format={"type": "json_schema", "json_schema": {  # type: ignore[typeddict-item]
                    "name": "annotation", "strict": True, "schema": answer_schema(rubric)}},
            )
        except OpenAIError as exc:
            return Verdict(None, seconds=time.perf_counter() - started, error=f"{type(exc).__name__}: {exc}"[:300])
        usage = response.usage
        tokens = (usage.prompt_tokens, usage.completion_tokens) if usage else (0, 0)
        seconds = time.perf_counter() - started
        try:
            values = parse_answer(rubric, response.choices[0].message.content if response.choices else None)
        except JudgeAnswerError as exc:
            return Verdict(None, *tokens, seconds, str(exc))
        return Verdict(values, *tokens, seconds)

    def ask_many(self, rubric: Rubric, datas: Sequence[dict[str, Any]]) -> list[Verdict]:
        """One verdict per item within `deadline` seconds in all (the client's timeout is per read and per
        attempt): an item the judge has not answered by then is a failure, and goes to a human."""
        if not datas:
            return []
        pool = ThreadPoolExecutor(min(self.cfg.concurrency, len(datas)), thread_name_prefix="judge")
        futures = [pool.submit(self.ask, rubric, d) for d in datas]
        done, _ = wait(futures, timeout=self.cfg.deadline)
        pool.shutdown(wait=False, cancel_futures=True)  # a call still hanging ends with its own read timeout
        late = Verdict(None, seconds=self.cfg.deadline,
                       error=f"no answer within {self.cfg.deadline:g} s (JUDGE_DEADLINE)")
        return [f.result() if f in done else late for f in futures]
