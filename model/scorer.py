"""Constrained scoring: the next-token distribution restricted to each dimension's allowed answers.

Only the hidden states at the answer positions go through the output layer, and only the rows of the
allowed answer tokens: no full-vocabulary logits, one forward pass per task for all dimensions.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from model.prompt import Encoded


def causal_lm_of(model: Any) -> Any:
    """The transformers CausalLM inside a peft wrapper (LoRA layers stay injected and active)."""
    base = getattr(model, "base_model", None)
    if base is not None and hasattr(base, "model") and base is not model and hasattr(model, "peft_config"):
        return base.model
    return model


def pad_batch(batch: Sequence[Encoded], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right padding keeps every real token at its natural position, so read positions need no shifting."""
    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, enc in enumerate(batch):
        ids[row, : len(enc.input_ids)] = torch.tensor(enc.input_ids, dtype=torch.long)
        mask[row, : len(enc.input_ids)] = 1
    return ids.to(device), mask.to(device)


def answer_logits(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    read_positions: torch.Tensor,  # (batch, dims)
    candidates: Sequence[Sequence[int]],  # per dimension, the allowed token ids
) -> list[torch.Tensor]:
    """Per dimension a (batch, n_values) logit tensor; differentiable, so training uses it too."""
    lm = causal_lm_of(model)
    decoder = getattr(lm, lm.base_model_prefix)
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    head = lm.get_output_embeddings()
    cap = getattr(lm.config, "final_logit_softcapping", None)
    out = []
    for d, cand in enumerate(candidates):
        h = hidden[rows, read_positions[:, d]]
        idx = torch.tensor(list(cand), device=hidden.device)
        weight = head.weight[idx]
        logits = torch.nn.functional.linear(h.to(weight.dtype), weight)
        if getattr(head, "bias", None) is not None:
            logits = logits + head.bias[idx]
        if cap:
            logits = torch.tanh(logits / cap) * cap
        out.append(logits.float())
    return out


@dataclass(frozen=True)
class DimensionScore:
    value: str
    index: int
    confidence: float
    probs: tuple[float, ...]


class Scorer:
    """Batches encoded tasks by length and returns per-dimension distributions in input order."""

    def __init__(self, model: Any, tokenizer: Any, device: torch.device, batch_size: int = 8) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.batch_size = max(1, batch_size)
        self.lock = threading.Lock()

    @torch.inference_mode()
    def distributions(
        self, encoded: Sequence[Encoded], candidates: Sequence[Sequence[int]]
    ) -> list[list[torch.Tensor]]:
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].input_ids))
        result: list[list[torch.Tensor]] = [[] for _ in encoded]
        with self.lock:
            for start in range(0, len(order), self.batch_size):
                chunk = order[start : start + self.batch_size]
                batch = [encoded[i] for i in chunk]
                ids, mask = pad_batch(batch, self.tokenizer.pad_token_id, self.device)
                reads = torch.tensor([e.read_positions for e in batch], device=self.device)
                logits = answer_logits(self.model, ids, mask, reads, candidates)
                probs = [torch.softmax(lg, dim=-1).cpu() for lg in logits]
                for row, i in enumerate(chunk):
                    result[i] = [p[row] for p in probs]
        return result


def decode(values: Sequence[str], probs: torch.Tensor, mode: str = "argmax") -> DimensionScore:
    """argmax for classes; 'expected' rounds the expected scale position (ordinal/interval scales)."""
    p = probs.double()
    if mode == "expected" and len(values) > 2:
        index = int(torch.round((p * torch.arange(len(values), dtype=torch.double)).sum()).item())
    else:
        index = int(torch.argmax(p).item())
    index = min(max(index, 0), len(values) - 1)
    return DimensionScore(values[index], index, float(p[index]), tuple(float(x) for x in p))
