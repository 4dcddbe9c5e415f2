"""Decoding for an OpenAI-compatible judge: a JSON object of string enums, or plain greedy text.

The JSON text is emitted piece by piece: fixed pieces (`{"key": "`, `", "next": "`, `"}`) and one chosen enum
value between each pair. Each piece and each value is tokenized on its own, so the completion's tokens are
exactly what was scored. A value is scored together with the fixed piece that follows it (its closing quote
and the next key): without the closing quote, "Sad" would always beat "Sadness" (log-probabilities only fall
as tokens are added). Choices are made property by property, in schema order; decoding is deterministic.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import torch

SCORE_BATCH = 32  # candidates per forward pass: typical rubrics (<= 21 values) score in one

def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def json_pieces(keys: Sequence[str]) -> list[str]:
    """The fixed text around the values: piece k comes before value k, the last piece closes the object."""
    pieces = [("{" if i == 0 else '", ') + json.dumps(key, ensure_ascii=False) + ': "' for i, key in enumerate(keys)]
    return [*pieces, '"}']


def value_text(value: str) -> str:
    """A value as it appears between the quotes (escaped, so any string yields valid JSON)."""
    return json.dumps(value, ensure_ascii=False)[1:-1]


@torch.inference_mode()
def continuation_logprobs(
    model: Any, device: torch.device, context: Sequence[int], candidates: Sequence[Sequence[int]], pad_id: int
) -> list[float]:
    """Sum of each candidate's token log-probabilities after `context`: right-padded forward passes of at most
    SCORE_BATCH candidates (memory bounded whatever the number of values), only the candidates' logits computed."""
    if len(candidates) > SCORE_BATCH:
        return [x for start in range(0, len(candidates), SCORE_BATCH)
                for x in continuation_logprobs(model, device, context, candidates[start : start + SCORE_BATCH], pad_id)]
    width = max(len(c) for c in candidates)
    n = len(context)
    ids = torch.full((len(candidates), n + width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    ids[:, :n] = torch.tensor(list(context), dtype=torch.long)
    for row, cand in enumerate(candidates):
        ids[row, n : n + len(cand)] = torch.tensor(list(cand), dtype=torch.long)
        mask[row, : n + len(cand)] = 1
    # The last width + 1 positions are n - 1 .. n + width - 1; position n - 1 + j predicts candidate token j.
    out = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False, logits_to_keep=width + 1)
    logprobs = torch.log_softmax(out.logits[:, :width].float(), dim=-1).cpu()
    picked = logprobs.gather(-1, ids[:, n:].unsqueeze(-1)).squeeze(-1)
    return (picked * mask[:, n:]).sum(dim=-1).tolist()


def decode_enum_json(
    model: Any, tokenizer: Any, device: torch.device, prompt_ids: list[int], properties: list[tuple[str, list[str]]]
) -> tuple[dict[str, str], int]:
    """The chosen value of each property, and the number of tokens of the emitted JSON text."""
    pieces = json_pieces([key for key, _ in properties])
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    completion = _encode(tokenizer, pieces[0])
    chosen: dict[str, str] = {}
    for k, (key, values) in enumerate(properties):
        tail = _encode(tokenizer, pieces[k + 1])
        candidates = [_encode(tokenizer, value_text(v)) + tail for v in values]
        scores = continuation_logprobs(model, device, prompt_ids + completion, candidates, pad_id)
        best = max(range(len(values)), key=lambda i: scores[i])  # the first of equal scores: deterministic
        chosen[key] = values[best]
        completion += candidates[best]
    return chosen, len(completion)


def max_json_tokens(tokenizer: Any, properties: Sequence[tuple[str, Sequence[str]]]) -> int:
    """The most tokens decode_enum_json can emit for these properties (to check the context before decoding)."""
    fixed = sum(len(_encode(tokenizer, p)) for p in json_pieces([key for key, _ in properties]))
    return fixed + sum(max(len(_encode(tokenizer, value_text(v))) for v in values) for _, values in properties)


def render_json(chosen: dict[str, str]) -> str:
    """The exact text decode_enum_json scored and counted."""
    pieces = json_pieces(list(chosen))
    return "".join(p + value_text(v) for p, v in zip(pieces, chosen.values(), strict=False)) + pieces[-1]


@torch.inference_mode()
def generate_text(model: Any, tokenizer: Any, device: torch.device, prompt_ids: list[int], max_tokens: int
                  ) -> tuple[str, int]:
    """Greedy text and its token count, a final end-of-sequence token not counted: a count below max_tokens
    means the model stopped by itself."""
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                         do_sample=False, pad_token_id=pad_id)
    new = out[0, len(prompt_ids):].tolist()
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos]) | {tokenizer.eos_token_id}
    if new and new[-1] in eos_ids:
        new = new[:-1]
    return tokenizer.decode(new, skip_special_tokens=True), len(new)
