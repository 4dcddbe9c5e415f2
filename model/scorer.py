"""Constrained scoring: the next-token distribution restricted to each dimension's allowed answers.

Only the hidden states at the answer positions go through the output layer, and only the rows of the
allowed answer tokens: no full-vocabulary logits, one forward pass per task for all dimensions.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from slm_annotator.model.prefix import (
    PrefixCache,
    PrefixKV,
    expanded_cache,
    model_state,
    reuse_supported,
    run_prefix,
    saves_enough,
    shared_length,
)
from slm_annotator.model.prompt import Encoded
from slm_annotator.model.results import DimensionScore


def causal_lm_of(model: Any) -> Any:
    """The transformers CausalLM inside a peft wrapper (LoRA layers stay injected and active)."""
    base = getattr(model, "base_model", None)
    if base is not None and hasattr(base, "model") and base is not model and hasattr(model, "peft_config"):
        return base.model
    return model


def pad_batch(
    batch: Sequence[Encoded], pad_id: int, device: torch.device, skip: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right padding keeps every real token at its natural position, so read positions need no shifting.

    `skip` leaves out each row's first tokens (a shared prefix whose KV is already cached)."""
    width = max(len(e.input_ids) for e in batch) - skip
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, enc in enumerate(batch):
        n = len(enc.input_ids) - skip
        ids[row, :n] = torch.tensor(enc.input_ids[skip:], dtype=torch.long)
        mask[row, :n] = 1
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
    return head_logits(lm, hidden, read_positions, candidates)


def suffix_logits(
    model: Any,
    prefix: PrefixKV,
    length: int,  # how many of the prefix's tokens the batch shares
    input_ids: torch.Tensor,  # the tokens after them, right padded
    attention_mask: torch.Tensor,
    read_positions: torch.Tensor,  # in the full sequence
    candidates: Sequence[Sequence[int]],
) -> list[torch.Tensor]:
    """answer_logits for a batch whose first `length` tokens are in `prefix`: only the suffixes run."""
    lm = causal_lm_of(model)
    decoder = getattr(lm, lm.base_model_prefix)
    batch = input_ids.shape[0]
    cache = expanded_cache(prefix, length, batch, lm.config)
    ones = torch.ones((batch, length), dtype=attention_mask.dtype, device=attention_mask.device)
    mask = torch.cat([ones, attention_mask], dim=1)
    hidden = decoder(input_ids=input_ids, attention_mask=mask, past_key_values=cache, use_cache=True).last_hidden_state
    return head_logits(lm, hidden, read_positions - length, candidates)


def head_logits(
    lm: Any, hidden: torch.Tensor, read_positions: torch.Tensor, candidates: Sequence[Sequence[int]]
) -> list[torch.Tensor]:
    """The output layer on the read positions only, and only its rows of the allowed answer tokens."""
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


@dataclass
class ScoreStats:
    """Tokens each path ran (not counting padding's absence): how a test or benchmark sees reuse engage."""

    plain_batches: int = 0
    reuse_batches: int = 0
    prefix_runs: int = 0  # batch-1 prefix passes (cache misses that paid)
    prefix_tokens: int = 0  # tokens of those passes
    batch_tokens: int = 0  # padded tokens of the batched passes (whole sequences or suffixes)


class Scorer:
    """Batches encoded tasks by length and returns per-dimension distributions in input order.

    With `reuse` a batch whose tasks share a long enough leading prefix runs that prefix once (model/prefix.py);
    `prefixes` keeps those KVs across calls (pass the serving scorer's to a per-call Scorer to share it).
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        device: torch.device,
        batch_size: int = 8,
        reuse: bool = True,
        prefixes: PrefixCache | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.batch_size = max(1, batch_size)
        self.lock = threading.Lock()
        self.reuse = reuse
        self.prefixes = prefixes if prefixes is not None else PrefixCache()
        self.stats = ScoreStats()

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
            state = self._reuse_state()
            for start in range(0, len(order), self.batch_size):
                chunk = order[start : start + self.batch_size]
                logits = self._batch_logits([encoded[i] for i in chunk], candidates, state)
                launched = (chunk, [torch.softmax(lg, dim=-1) for lg in logits])
                if pending is not None:
                    _collect(pending, result)
                pending = launched
            if pending is not None:
                _collect(pending, result)
        return result

    def _reuse_state(self) -> tuple[Any, ...] | None:
        """The prefix cache key's model part, or None where reuse is off or the model needs the plain path."""
        if not self.reuse:
            return None
        lm = causal_lm_of(self.model)
        return model_state(self.model, lm) if reuse_supported(lm) else None

    def _batch_logits(
        self, batch: list[Encoded], candidates: Sequence[Sequence[int]], state: tuple[Any, ...] | None
    ) -> list[torch.Tensor]:
        plan = self._prefix_for(batch, state) if state is not None else None
        if plan is None:
            ids, mask = pad_batch(batch, self.tokenizer.pad_token_id, self.device)
            reads = to_device(torch.tensor([e.read_positions for e in batch]), self.device)
            self.stats.plain_batches += 1
            self.stats.batch_tokens += ids.numel()
            return answer_logits(self.model, ids, mask, reads, candidates)
        prefix, length = plan
        ids, mask = pad_batch(batch, self.tokenizer.pad_token_id, self.device, skip=length)
        reads = to_device(torch.tensor([e.read_positions for e in batch]), self.device)
        self.stats.reuse_batches += 1
        self.stats.batch_tokens += ids.numel()
        return suffix_logits(self.model, prefix, length, ids, mask, reads, candidates)

    def _prefix_for(self, batch: list[Encoded], state: tuple[Any, ...]) -> tuple[PrefixKV, int] | None:
        """A cached prefix, or a freshly run one, if the reuse rule says it pays for this batch; else None.

        The prefix stops before the first answer position (its hidden state must come out of the suffix pass).
        A single task has nothing to share within its batch: it only uses a prefix cached by an earlier batch.
        """
        rows = [e.input_ids for e in batch]
        cap = min(min(e.read_positions, default=len(e.input_ids) - 1) for e in batch)
        shared = shared_length(rows, cap)
        width = max(len(r) for r in rows)
        hit = self.prefixes.best(state, rows[0][:shared])
        cached = min(hit[1], shared) if hit else 0
        fresh = shared if len(batch) > 1 else 0
        use_hit = hit is not None and saves_enough(cached, len(batch), width, fresh=False)
        run_new = saves_enough(fresh, len(batch), width, fresh=True)
        if use_hit and (not run_new or cached * len(batch) >= fresh * (len(batch) - 1)):
            assert hit is not None
            return hit[0], cached
        if not run_new:
            return None
        lm = causal_lm_of(self.model)
        kv = run_prefix(getattr(lm, lm.base_model_prefix), lm.config, rows[0][:fresh], self.device)
        self.prefixes.put(state, kv)
        self.stats.prefix_runs += 1
        self.stats.prefix_tokens += fresh
        return kv, fresh


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
