"""The model a backend process serves: the base loaded once, lazily; project adapters swapped, not reloaded."""

from __future__ import annotations

import hashlib
import logging
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model.loader import LoadedBase, load_base
from model.prompt import PromptBuilder
from model.results import to_ls_result
from model.rubric import Rubric
from model.scorer import Scorer, decode

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AdapterRef:
    name: str  # the model_version it is served under
    path: Path


@dataclass(frozen=True)
class TaskPrediction:
    result: list[dict[str, Any]]
    score: float
    model_version: str


def decode_mode(level: str, decoding: str) -> str:
    return "expected" if decoding == "expected" and level != "nominal" else "argmax"


class AdapterSet:
    """Keeps at most `capacity` LoRA adapters on one base model, least recently used evicted."""

    def __init__(self, base_model: Any, capacity: int) -> None:
        self.base_model = base_model
        self.model: Any = base_model
        self.capacity = max(1, capacity)
        self.loaded: OrderedDict[str, Path] = OrderedDict()

    def activate(self, ref: AdapterRef | None) -> Any:
        """Returns a context-free model ready to score; call under the scorer lock."""
        if ref is None:
            return None
        if ref.name not in self.loaded:
            self._load(ref)
        self.loaded.move_to_end(ref.name)
        self.model.set_adapter(slot_name(ref.name))
        return self.model

    def _load(self, ref: AdapterRef) -> None:
        from peft import PeftModel

        slot = slot_name(ref.name)
        if self.model is self.base_model:
            self.model = PeftModel.from_pretrained(self.base_model, str(ref.path), adapter_name=slot)
        else:
            self.model.load_adapter(str(ref.path), adapter_name=slot)
        self.model.eval()
        self.loaded[ref.name] = ref.path
        while len(self.loaded) > self.capacity:
            oldest, _ = self.loaded.popitem(last=False)
            self.model.set_adapter(slot)
            self.model.delete_adapter(slot_name(oldest))
            log.info("evicted adapter %s", oldest)


def slot_name(model_version: str) -> str:
    """peft adapter names become module names: no dots (a base called "Qwen3-1.7B" has one in every version)."""
    safe = re.sub(r"[^A-Za-z0-9_-]", "_", model_version)
    return f"{safe}_{hashlib.sha1(model_version.encode()).hexdigest()[:8]}"


class ModelServer:
    def __init__(
        self,
        base_model: str,
        model_dir: Path,
        quantization: str,
        device: str,
        batch_size: int,
        max_tokens: int,
        max_adapters: int,
        loader: Callable[[], LoadedBase] | None = None,
    ) -> None:
        self._loader = loader or (lambda: load_base(base_model, model_dir, quantization, device))
        self.batch_size = batch_size
        self.max_tokens = max_tokens
        self.max_adapters = max_adapters
        self._base: LoadedBase | None = None
        self._scorer: Scorer | None = None
        self._adapters: AdapterSet | None = None
        self._builders: OrderedDict[tuple[int, int], PromptBuilder] = OrderedDict()
        self._load_lock = threading.Lock()
        self.base_name = base_model

    @property
    def loaded(self) -> LoadedBase | None:
        return self._base

    def ensure_loaded(self) -> LoadedBase:
        if self._base is None:
            with self._load_lock:
                if self._base is None:
                    base = self._loader()
                    self._scorer = Scorer(base.model, base.tokenizer, base.device, self.batch_size)
                    self._adapters = AdapterSet(base.model, self.max_adapters)
                    self._base = base
        return self._base

    def builder(self, rubric: Rubric) -> PromptBuilder:
        base = self.ensure_loaded()
        key = (hash(rubric), self.max_tokens)
        if key not in self._builders:
            self._builders[key] = PromptBuilder(base.tokenizer, rubric, self.max_tokens)
            while len(self._builders) > 64:
                self._builders.popitem(last=False)
        self._builders.move_to_end(key)
        return self._builders[key]

    def predict(
        self,
        rubric: Rubric,
        tasks: Sequence[dict[str, Any]],
        adapter: AdapterRef | None,
        model_version: str,
        decoding: str = "argmax",
    ) -> list[TaskPrediction]:
        """Valid by construction: every value comes from the dimension's own closed set."""
        base = self.ensure_loaded()
        builder = self.builder(rubric)
        encoded = builder.encode_many([task.get("data") or {} for task in tasks])  # TaskDataError -> 4xx
        candidates = [space.token_ids for space in builder.spaces]
        assert self._scorer is not None and self._adapters is not None
        with self._scorer.lock:
            model = self._adapters.activate(adapter)
            scorer = self._scorer
            if model is None and self._adapters.model is not base.model:
                with self._adapters.model.disable_adapter():
                    dists = _score_unlocked(scorer, self._adapters.model, encoded, candidates)
            else:
                dists = _score_unlocked(scorer, model or base.model, encoded, candidates)
        out = []
        for per_dim in dists:
            scores = [
                decode(dim.values, probs, decode_mode(dim.level, decoding))
                for dim, probs in zip(rubric.dimensions, per_dim, strict=True)
            ]
            result, score = to_ls_result(rubric, scores)
            out.append(TaskPrediction(result, score, model_version))
        return out


def _score_unlocked(scorer: Scorer, model: Any, encoded: Any, candidates: Any) -> Any:
    """The caller holds scorer.lock; Scorer.distributions would take it again, so bypass it."""
    inner = Scorer(model, scorer.tokenizer, scorer.device, scorer.batch_size)
    return inner.distributions(encoded, candidates)
