"""Constrained scoring: the next-token distribution restricted to each dimension's allowed answers.

Only the hidden states at the answer positions go through the output layer, and only the rows of the
allowed answer tokens: no full-vocabulary logits, one forward pass per task for all dimensions.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Sequence
from typing import Any

import torch

from model.prompt import Encoded
from model.results import DimensionScore


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
    return to_device(ids, device), to_device(mask, device)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Pinned and asynchronous on CUDA: a copy from pageable memory would wait for all queued GPU work."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


@functools.lru_cache(maxsize=256)
def _index(token_ids: tuple[int, ...], device: torch.device) -> torch.Tensor:
    return to_device(torch.tensor(token_ids, dtype=torch.long), device)


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
        idx = _index(tuple(cand), hidden.device)
        weight = head.weight[idx]
        logits = torch.nn.functional.linear(h.to(weight.dtype), weight)
        if getattr(head, "bias", None) is not None:
            logits = logits + head.bias[idx]
        if cap:
            logits = torch.tanh(logits / cap) * cap
        out.append(logits.float())
    return out


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
        """Length-sorted batches; batch k+1 is padded and launched before batch k's results are read back,
        so on a GPU the host-side work overlaps the device's."""
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].input_ids))
        result: list[list[torch.Tensor]] = [[] for _ in encoded]
        pending: tuple[list[int], list[torch.Tensor]] | None = None
        with self.lock:
            for start in range(0, len(order), self.batch_size):
                chunk = order[start : start + self.batch_size]
                batch = [encoded[i] for i in chunk]
                ids, mask = pad_batch(batch, self.tokenizer.pad_token_id, self.device)
                reads = to_device(torch.tensor([e.read_positions for e in batch]), self.device)
                logits = answer_logits(self.model, ids, mask, reads, candidates)
                launched = (chunk, [torch.softmax(lg, dim=-1) for lg in logits])
                if pending is not None:
                    _collect(pending, result)
                pending = launched
            if pending is not None:
                _collect(pending, result)
        return result


def _collect(done: tuple[list[int], list[torch.Tensor]], result: list[list[torch.Tensor]]) -> None:
    chunk, probs = done
    host = [p.cpu() for p in probs]
    for row, i in enumerate(chunk):
        result[i] = [p[row] for p in host]


def decode(values: Sequence[str], probs: torch.Tensor, mode: str = "argmax") -> DimensionScore:
    """argmax for classes; 'expected' rounds the expected scale position (ordinal/interval scales)."""
    p = probs.double()
    if mode == "expected" and len(values) > 2:
        index = int(torch.round((p * torch.arange(len(values), dtype=torch.double)).sum()).item())
    else:
        index = int(torch.argmax(p).item())
    index = min(max(index, 0), len(values) - 1)
    return DimensionScore(values[index], index, float(p[index]), tuple(float(x) for x in p))
