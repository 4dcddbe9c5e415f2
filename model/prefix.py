"""Shared-prefix reuse for serving: run the tokens every task of a batch starts with once, keep their KV.

The prompt layout puts the same chat header, hint (and, for rubric-first templates, the whole rubric) before
each task's texts. Their keys and values do not depend on what follows, so a batch can run that prefix once
(batch 1), expand its KV cache to the batch and run only the suffixes. A small LRU keeps prefixes across calls,
keyed by the model's adapter state: a different active adapter gives a different KV.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

# bench/results/prefix/cpu-2core.md: CPU time falls with the tokens skipped (rubric first, 50% shared: 1.5-1.8x),
# but the default layout's 10% share gave ~1.1x, inside the shared machine's noise. The bar keeps reuse (and its
# extra batch-1 pass, which on a GPU costs kernel launches rather than FLOPs) to prefixes that clearly pay.
MIN_PREFIX_TOKENS = 32
MIN_SAVED_SHARE = 0.15  # skipped tokens over the plain path's (padded) tokens
CACHE_ENTRIES = 4  # per entry ~12 MB for SmolLM2-135M in fp32 at 266 prefix tokens


@dataclass(frozen=True)
class PrefixKV:
    """A prefix's token ids and, per decoder layer, its (1, kv_heads, len, head_dim) keys and values."""

    ids: tuple[int, ...]
    layers: tuple[tuple[torch.Tensor, torch.Tensor], ...]


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens a and b share."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def shared_length(rows: Sequence[Sequence[int]], cap: int) -> int:
    """The leading tokens all rows share, at most cap."""
    first = rows[0][:cap]
    return min((common_prefix(first, r) for r in rows[1:]), default=len(first))


def saves_enough(prefix: int, batch: int, width: int, fresh: bool) -> bool:
    """The reuse rule: a prefix long enough to outweigh its fixed costs and a meaningful share of the batch.

    `fresh`: the prefix still has to be run (once), so it saves (batch - 1) * prefix tokens, not batch * prefix.
    """
    if prefix < MIN_PREFIX_TOKENS or width <= 0:
        return False
    saved = (batch - 1 if fresh else batch) * prefix
    return saved >= MIN_SAVED_SHARE * batch * width


def _tuner_layer(model: Any) -> Any:
    """The first peft tuner layer (LoRA etc.) in the model, None for a plain model."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return None
    return next((m for m in model.modules() if isinstance(m, BaseTunerLayer)), None)


def model_state(model: Any, lm: Any) -> tuple[Any, ...]:
    """What the prefix KV depends on besides its tokens: the model and its active, enabled adapter weights.

    An adapter switch (set_adapter), disable_adapter() and an in-place update of the LoRA weights (training
    bumps the tensors' version counters) all change the key.
    """
    layer = _tuner_layer(model)
    if layer is None:
        return (id(lm),)
    active = tuple(layer.active_adapters)
    lora = getattr(layer, "lora_A", {})
    weights = [lora[name].weight for name in active if name in lora]
    marks = tuple((w.data_ptr(), w._version) for w in weights)
    return (id(lm), active, bool(layer.disable_adapters), bool(getattr(layer, "merged", False)), marks)


def reuse_supported(lm: Any) -> bool:
    """Only plain full-attention decoders: sliding or chunked windows, bidirectional or encoder-decoder models
    would see a different mask once the prefix lives in a cache, so they keep the one-pass path."""
    config = getattr(lm, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return False
    if getattr(config, "use_bidirectional_attention", False) or getattr(config, "attention_chunk_size", None):
        return False
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return False
    try:
        from transformers.cache_utils import DynamicCache, DynamicLayer

        layers = DynamicCache(config=config).layers
    except Exception:
        return False
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


def run_prefix(decoder: Any, config: Any, ids: Sequence[int], device: torch.device) -> PrefixKV:
    """One batch-1 pass over the prefix with a KV cache; only the cache is kept."""
    from transformers.cache_utils import DynamicCache

    cache = DynamicCache(config=config)
    tokens = torch.tensor([list(ids)], dtype=torch.long, device=device)
    decoder(input_ids=tokens, attention_mask=torch.ones_like(tokens), past_key_values=cache, use_cache=True)
    return PrefixKV(tuple(ids), tuple((layer.keys, layer.values) for layer in cache.layers))


def expanded_cache(prefix: PrefixKV, length: int, batch: int, config: Any) -> Any:
    """A fresh DynamicCache holding the prefix's first `length` tokens for every row (the stored KV is not
    touched: DynamicLayer.update concatenates into new tensors)."""
    from transformers.cache_utils import DynamicCache

    data = [
        (k[:, :, :length].expand(batch, -1, -1, -1), v[:, :, :length].expand(batch, -1, -1, -1))
        for k, v in prefix.layers
    ]
    return DynamicCache(ddp_cache_data=data, config=config)


class PrefixCache:
    """A small LRU of prefix KVs by (model state, token ids); its own lock guards the table, entries are
    never changed after they are made."""

    def __init__(self, entries: int = CACHE_ENTRIES) -> None:
        self.entries = max(0, entries)
        self._table: OrderedDict[tuple[Any, tuple[int, ...]], PrefixKV] = OrderedDict()
        self._lock = threading.Lock()

    def best(self, state: tuple[Any, ...], ids: Sequence[int]) -> tuple[PrefixKV, int] | None:
        """The entry of this state that shares the most leading tokens with ids, and how many it shares."""
        with self._lock:
            found = [(kv, common_prefix(kv.ids, ids), key) for key, kv in self._table.items() if key[0] == state]
            if not found:
                return None
            kv, n, key = max(found, key=lambda f: f[1])
            self._table.move_to_end(key)
        return (kv, n) if n else None

    def put(self, state: tuple[Any, ...], kv: PrefixKV) -> None:
        if not self.entries:
            return
        with self._lock:
            self._table[(state, kv.ids)] = kv
            self._table.move_to_end((state, kv.ids))
            while len(self._table) > self.entries:
                self._table.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._table.clear()
