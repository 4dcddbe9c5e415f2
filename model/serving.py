"""The model a backend process serves: the base loaded once, lazily; project adapters swapped, not reloaded."""

from __future__ import annotations

import hashlib
import logging
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slm_annotator.model.ensemble import Vote, task_uncertainty, vote
from slm_annotator.model.loader import LoadedBase, load_base
from slm_annotator.model.members import member_of, member_paths
from slm_annotator.model.prompt import Encoded, PromptBuilder, PromptFormatError, TaskDataError, check_prompt_format
from slm_annotator.model.results import to_ls_result
from slm_annotator.model.rubric import Rubric
from slm_annotator.model.scorer import Scorer, decode

log = logging.getLogger(__name__)


MAX_HUNG_LOADS = 2  # abandoned base-model loads whose threads may still run: no new attempt beyond this


class ModelUnavailable(RuntimeError):
    """The model cannot answer now (still loading, load failed or timed out, busy); /predict answers 503."""


@dataclass
class _LoadAttempt:
    started: float
    done: threading.Event = field(default_factory=threading.Event)
    error: str = ""
    thread: threading.Thread | None = None


@dataclass(frozen=True)
class AdapterRef:
    name: str  # the model_version it is served under
    path: Path

    @property
    def paths(self) -> tuple[Path, ...]:
        """The trained ensemble members' adapters, member 0 (this folder) first."""
        return member_paths(self.path)


@dataclass(frozen=True)
class TaskPrediction:
    result: list[dict[str, Any]]
    score: float
    model_version: str
    votes: tuple[Vote, ...] = ()  # per dimension, with an ensemble (k > 1)
    prompt_tokens: int = 0  # over all members: what scoring this task cost

    @property
    def uncertainty(self) -> float:
        return task_uncertainty(self.votes)


def decode_mode(level: str, decoding: str) -> str:
    return "expected" if decoding == "expected" and level != "nominal" else "argmax"


class AdapterSet:
    """Keeps at most `capacity` LoRA adapters on one base model, least recently used evicted."""

    def __init__(self, base_model: Any, capacity: int) -> None:
        self.base_model = base_model
        self.model: Any = base_model
        self.capacity = max(1, capacity)
        self.loaded: OrderedDict[str, list[str]] = OrderedDict()  # model_version -> its members' peft slots

    def activate(self, ref: AdapterRef | None, member: int = 0) -> Any:
        """Returns a context-free model with the member's adapter active; call under the scorer lock."""
        if ref is None:
            return None
        if ref.name not in self.loaded:
            self._load(ref)
        self.loaded.move_to_end(ref.name)
        slots = self.loaded[ref.name]
        self.model.set_adapter(slots[member_of(len(slots), member)])
        return self.model

    def _load(self, ref: AdapterRef) -> None:
        """Loads every member of the version: one version is one unit for the LRU capacity."""
        from peft import PeftModel

        slots = [member_slot(ref.name, m) for m in range(len(ref.paths))]
        for path in ref.paths:  # all or none: no member is loaded if one was trained on another prompt format
            check_prompt_format(path)
        for slot, path in zip(slots, ref.paths, strict=True):
            if self.model is self.base_model:
                self.model = PeftModel.from_pretrained(self.base_model, str(path), adapter_name=slot)
            else:
                self.model.load_adapter(str(path), adapter_name=slot)
        self.model.eval()
        self.loaded[ref.name] = slots
        while len(self.loaded) > self.capacity:
            oldest, old_slots = self.loaded.popitem(last=False)
            self.model.set_adapter(slots[0])
            for old in old_slots:
                self.model.delete_adapter(old)
            log.info("evicted adapter %s", oldest)


def slot_name(model_version: str) -> str:
    """peft adapter names become module names: no dots (a base called "Qwen3-1.7B" has one in every version)."""
    safe = re.sub(r"[^A-Za-z0-9_-]", "_", model_version)
    return f"{safe}_{hashlib.sha1(model_version.encode()).hexdigest()[:8]}"


def member_slot(model_version: str, member: int) -> str:
    return slot_name(model_version) if member == 0 else f"{slot_name(model_version)}_m{member}"


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
        load_timeout: float = 600.0,
        wait_timeout: float = 60.0,
    ) -> None:
        self._loader = loader or (lambda: load_base(base_model, model_dir, quantization, device))
        self.batch_size = batch_size
        self.max_tokens = max_tokens
        self.max_adapters = max_adapters
        self.load_timeout = load_timeout  # a base-model load running longer is abandoned (MODEL_LOAD_TIMEOUT)
        self.wait_timeout = wait_timeout  # the longest a request waits for the model (MODEL_WAIT_TIMEOUT)
        self._base: LoadedBase | None = None
        self._scorer: Scorer | None = None
        self._adapters: AdapterSet | None = None
        self._builders: OrderedDict[tuple[int, int, int], PromptBuilder] = OrderedDict()
        self._load_lock = threading.Lock()
        self._attempt: _LoadAttempt | None = None
        self._abandoned: list[threading.Thread] = []
        self.base_name = base_model

    @property
    def loaded(self) -> LoadedBase | None:
        return self._base

    def status(self) -> str:
        """loaded | not loaded | loading | failed | timed out: for /health, never blocks."""
        attempt = self._attempt
        if self._base is not None:
            return "loaded"
        if attempt is None:
            return "not loaded"
        if attempt.done.is_set():
            return "failed"
        return "timed out" if self._expired(attempt) else "loading"

    def start_loading(self) -> None:
        """Starts loading the base model in the background (serve does at boot) unless loaded or loading."""
        with self._load_lock:
            self._begin_attempt()

    def ensure_loaded(self, wait: float | None = None) -> LoadedBase:
        """The base model; a load in progress is waited for at most `wait` seconds (default wait_timeout).

        The load itself runs in a thread of its own: a load that hangs (a stuck file system, a hub download)
        costs a request at most its wait, never the thread forever. Past MODEL_LOAD_TIMEOUT the attempt is
        abandoned and the next request starts a fresh one; a failed attempt is retried by the next request too.
        """
        if self._base is not None:
            return self._base
        with self._load_lock:
            attempt = self._begin_attempt()
        if attempt is None and self._base is not None:
            return self._base
        assert attempt is not None
        left = attempt.started + self.load_timeout - time.monotonic()
        attempt.done.wait(max(0.0, min(self.wait_timeout if wait is None else wait, left)))
        if self._base is not None:
            return self._base
        raise ModelUnavailable(self._unavailable_message(attempt))

    def _unavailable_message(self, attempt: _LoadAttempt) -> str:
        elapsed = time.monotonic() - attempt.started
        if attempt.done.is_set():
            return f"the base model {self.base_name!r} failed to load ({attempt.error}); the next request retries"
        if self._expired(attempt):
            return (f"loading the base model {self.base_name!r} timed out after {self.load_timeout:.0f} s "
                    "(MODEL_LOAD_TIMEOUT); the next request starts a new load")
        return f"the base model {self.base_name!r} is still loading ({elapsed:.0f} s so far); retry shortly"

    def _expired(self, attempt: _LoadAttempt) -> bool:
        return not attempt.done.is_set() and time.monotonic() - attempt.started >= self.load_timeout

    def _begin_attempt(self) -> _LoadAttempt | None:
        """The running attempt, or a new one if none runs or the last failed or timed out; call under _load_lock."""
        if self._base is not None:
            return None
        current = self._attempt
        if current is not None and not current.done.is_set():
            if not self._expired(current):
                return current
            self._abandoned = [t for t in self._abandoned if t.is_alive()]
            if len(self._abandoned) >= MAX_HUNG_LOADS:
                return current  # enough hung threads: report the timeout, start no more
            if current.thread is not None:
                self._abandoned.append(current.thread)
            log.error("loading the base model timed out after %.0f s; starting a new attempt", self.load_timeout)
        attempt = _LoadAttempt(time.monotonic())
        attempt.thread = threading.Thread(target=self._load, args=(attempt,), name="model-load", daemon=True)
        self._attempt = attempt
        attempt.thread.start()
        return attempt

    def _load(self, attempt: _LoadAttempt) -> None:
        try:
            base = self._loader()
            scorer = Scorer(base.model, base.tokenizer, base.device, self.batch_size)
            adapters = AdapterSet(base.model, self.max_adapters)
            with self._load_lock:
                if self._base is None:  # a late abandoned attempt that finishes is as good as any
                    self._scorer, self._adapters, self._base = scorer, adapters, base
        except Exception as exc:
            log.exception("loading the base model %s failed", self.base_name)
            attempt.error = f"{type(exc).__name__}: {str(exc)[:300]}"
        finally:
            attempt.done.set()

    def builder(self, rubric: Rubric, template: int = 0) -> PromptBuilder:
        base = self.ensure_loaded()
        key = (hash(rubric), self.max_tokens, template)
        if key not in self._builders:
            self._builders[key] = PromptBuilder(base.tokenizer, rubric, self.max_tokens, template)
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
        members: int = 1,
    ) -> list[TaskPrediction]:
        """Valid by construction: every value comes from the dimension's own closed set.

        With members > 1 member t scores every task with prompt template t and its own trained adapter (or the
        served adapter, if it was trained as a single scorer); the members vote.
        """
        members = max(1, members)
        dists, tokens = self.distributions(rubric, tasks, adapter, members)
        n = len(tasks)
        out = []
        for i in range(n):
            runs = [dists[t * n + i] for t in range(members)]
            if members == 1:
                scores = [decode(dim.values, probs, decode_mode(dim.level, decoding))
                          for dim, probs in zip(rubric.dimensions, runs[0], strict=True)]
                result, score = to_ls_result(rubric, scores)
                out.append(TaskPrediction(result, score, model_version, prompt_tokens=tokens[i]))
                continue
            votes = tuple(vote(dim.values, [run[d] for run in runs], decode_mode(dim.level, decoding))
                          for d, dim in enumerate(rubric.dimensions))
            result, score = to_ls_result(rubric, [v.score for v in votes])
            out.append(TaskPrediction(result, score, model_version, votes, tokens[i]))
        return out

    def distributions(self, rubric: Rubric, tasks: Sequence[dict[str, Any]], adapter: AdapterRef | None,
                      members: int = 1) -> tuple[list[Any], list[int]]:
        """Per member and task (member-major), the SLM's per-dimension distributions; and each task's prompt
        tokens over all members (what scoring it cost)."""
        base = self.ensure_loaded()
        datas = [task.get("data") or {} for task in tasks]
        builder = self.builder(rubric)
        encoded = [e for t in range(members) for e in self.builder(rubric, t).encode_many(datas)]  # 4xx on bad data
        _check_context(base, encoded)
        candidates = [space.token_ids for space in builder.spaces]
        assert self._scorer is not None and self._adapters is not None
        lock = self._scorer.lock
        if not lock.acquire(timeout=self.wait_timeout):
            raise ModelUnavailable(f"the model has been busy for {self.wait_timeout:.0f} s (MODEL_WAIT_TIMEOUT: "
                                   "a long prediction, or an adapter load that hangs); retry later")
        handed_off = False
        try:
            if adapter is not None and adapter.name not in self._adapters.loaded:
                self._load_adapter(adapter, lock)
            dists = self._score_members(adapter, base, encoded, candidates, members, len(tasks))
        except _HandedOff:
            handed_off = True
            raise
        finally:
            if not handed_off:
                lock.release()
        n = len(tasks)
        tokens = [sum(len(encoded[t * n + i].input_ids) for t in range(members)) for i in range(n)]
        return dists, tokens

    def _score_members(self, adapter: AdapterRef | None, base: LoadedBase, encoded: Sequence[Encoded],
                       candidates: Any, members: int, n: int) -> list[Any]:
        """One batched pass per distinct adapter: members that share one are scored together."""
        assert self._scorer is not None and self._adapters is not None
        adapters = self._adapters
        owner = [member_of(len(adapter.paths), t) if adapter is not None else 0 for t in range(members)]
        dists: list[Any] = [None] * len(encoded)
        for who in sorted(set(owner)):
            rows = [t * n + i for t in range(members) if owner[t] == who for i in range(n)]
            model = adapters.activate(adapter, who)
            part = [encoded[r] for r in rows]
            if model is None and adapters.model is not base.model:
                with adapters.model.disable_adapter():
                    scored = _score_unlocked(self._scorer, adapters.model, part, candidates)
            else:
                scored = _score_unlocked(self._scorer, model or base.model, part, candidates)
            for r, d in zip(rows, scored, strict=True):
                dists[r] = d
        return dists

    def _load_adapter(self, ref: AdapterRef, lock: threading.Lock) -> None:
        """Loads an adapter in a helper thread for at most wait_timeout (the caller holds the scorer lock).

        Past that, the request gets a 503 and the helper keeps the lock until the load returns, so no other
        request touches the half-changed model; they get 503s (busy) instead of hanging.
        """
        assert self._adapters is not None
        adapters = self._adapters
        state = {"finished": False, "abandoned": False}
        guard = threading.Lock()
        errors: list[BaseException] = []

        def run() -> None:
            try:
                adapters.activate(ref)
            except Exception as exc:
                errors.append(exc)
            finally:
                with guard:
                    state["finished"] = True
                    abandoned = state["abandoned"]
                if abandoned:
                    lock.release()
                    log.warning("adapter %s finished loading after its request gave up", ref.name)

        helper = threading.Thread(target=run, name=f"adapter-load-{ref.name}", daemon=True)
        helper.start()
        helper.join(self.wait_timeout)
        with guard:
            if not state["finished"]:
                state["abandoned"] = True
        if state["abandoned"]:
            log.error("adapter %s did not load within %.0f s (%s)", ref.name, self.wait_timeout, ref.path)
            raise _HandedOff(f"adapter {ref.name} did not load within {self.wait_timeout:.0f} s "
                             "(MODEL_WAIT_TIMEOUT); retry later")
        if errors:
            why = str(errors[0]) if isinstance(errors[0], PromptFormatError) else type(errors[0]).__name__
            raise ModelUnavailable(f"adapter {ref.name} could not be loaded from {ref.path.name}: {why}; serve "
                                   "another one with `slm-annotator rollback`")


class _HandedOff(ModelUnavailable):
    """The scorer lock now belongs to a helper thread: the request must not release it."""


def _check_context(base: LoadedBase, encoded: Sequence[Encoded]) -> None:
    """A prompt past the model's context would fail inside the forward pass: name the cause instead."""
    limit = getattr(getattr(base.model, "config", None), "max_position_embeddings", None)
    longest = max((len(e.input_ids) for e in encoded), default=0)
    if isinstance(limit, int) and longest > limit:
        raise TaskDataError(f"the prompt needs {longest} tokens, more than the model's context of {limit}: the "
                            "rubric alone is too long for this model (MAX_PROMPT_TOKENS cuts only the texts)")


def _score_unlocked(scorer: Scorer, model: Any, encoded: Any, candidates: Any) -> Any:
    """The caller holds scorer.lock; Scorer.distributions would take it again, so bypass it. The prefix cache is
    the serving scorer's: its keys carry the active adapter, so members and versions never mix."""
    inner = Scorer(model, scorer.tokenizer, scorer.device, scorer.batch_size, scorer.reuse, scorer.prefixes)
    return inner.distributions(encoded, candidates)
