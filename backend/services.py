"""What request handlers share in one process: settings, the store, the model, the training trigger."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slm_annotator.backend.routing import judge_config
from slm_annotator.lru import SizedLRU
from slm_annotator.model.annotator import Annotator, Served, served_from_folder
from slm_annotator.model.heads import encoder_device
from slm_annotator.model.judge import Judge
from slm_annotator.model.rubric import Rubric, parse_label_config
from slm_annotator.model.serving import AdapterRef, ModelServer
from slm_annotator.settings import Settings
from slm_annotator.store import Store
from slm_annotator.worker.policy import Trigger, prefill_bar_for
from slm_annotator.worker.redis_conn import connect

CONFIG_CACHE_SECONDS = 5.0
SERVED_CACHE = 256  # versions whose plans a process keeps read


def base_version(settings: Settings) -> str:
    return settings.base_version


# Bounded by entries and by the characters of the configs they key on (a config may be 1M characters).
CACHE_ENTRIES = 256
CACHE_CHARS = 8_000_000
_rubrics: SizedLRU[tuple[str, str], Rubric] = SizedLRU(CACHE_ENTRIES, CACHE_CHARS, lambda k, _: len(k[0]) + len(k[1]))


def cached_rubric(label_config: str, extra_json: str) -> Rubric:
    """parse_label_config, cached per process (LRU); a config that does not parse raises every time."""
    key = (label_config, extra_json)
    hit = _rubrics.get(key)
    if hit is None:
        hit = parse_label_config(label_config, extra_json or None)
        _rubrics.put(key, hit)
    return hit


@dataclass
class Services:
    settings: Settings
    store: Store
    model: ModelServer
    trigger: Trigger
    judge_client: Judge | None = None  # built from JUDGE_URL / JUDGE_MODEL on first use
    predict_slots: threading.BoundedSemaphore = field(init=False)
    stopped: threading.Event = field(init=False, default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.annotator = Annotator(self.model, self.settings.head_encoder, encoder_device(self.settings.device))
        self.predict_slots = threading.BoundedSemaphore(self.settings.predict_slots)
        # a report computed (not cached) takes one of these AND a predict slot: together they leave a thread free
        self.report_slots = threading.BoundedSemaphore(self.settings.report_queue_limit)
        self._configs: SizedLRU[str, tuple[str, float]] = SizedLRU(CACHE_ENTRIES * 4, CACHE_CHARS,
                                                                    lambda k, v: len(k) + len(v[0]))
        self._served: dict[str, Served] = {}
        self._judge_lock = threading.Lock()

    def judge(self) -> Judge | None:
        """The OpenAI-compatible judge, if one is configured (the client is cheap: no connection until asked)."""
        if self.judge_client is None:
            cfg = judge_config(self.settings)
            if cfg is None:
                return None
            with self._judge_lock:
                if self.judge_client is None:
                    self.judge_client = Judge(cfg)
        return self.judge_client

    def close(self) -> None:
        """Stops the background flusher, if start_flusher started one for these services: an app that is done with
        (tests, reloads) stops touching a database and a queue that may be gone or belong to someone else."""
        self.stopped.set()

    def known_config(self, project_id: str) -> str | None:
        """The project's label config as this process last saw it, for a few seconds (one read per webhook less)."""
        hit = self._configs.get(project_id)
        return hit[0] if hit and time.monotonic() < hit[1] else None

    def remember_config(self, project_id: str, config: str) -> None:
        self._configs.put(project_id, (config, time.monotonic() + CONFIG_CACHE_SECONDS))

    def adapter_for(self, project_id: str) -> tuple[AdapterRef | None, str]:
        served = self.served_for(project_id)
        return served.adapter, served.model_version

    def served_for(self, project_id: str) -> Served:
        """The project's served version: its plan, head and adapter (the untrained base when none is served)."""
        row = self.store.served_adapter(project_id) if project_id else None
        if row is None:
            return Served(base_version(self.settings))
        hit = self._served.get(row.model_version)  # a promoted folder never changes: read its plan once
        if hit is None:
            hit = served_from_folder(row.model_version, Path(row.path), row.metrics)
            self._served[row.model_version] = hit
            while len(self._served) > SERVED_CACHE:
                self._served.pop(next(iter(self._served)))
        return hit

    def prefill_bar(self, extra: dict[str, Any] | None) -> float | None:
        """The project's pre-fill bar (extra_params "prefill_min_alpha", "none" for no bar), else PREFILL_MIN_ALPHA."""
        return prefill_bar_for(self.settings, extra)


def build_services(settings: Settings, model: ModelServer | None = None, store: Store | None = None) -> Services:
    store = store or Store(settings.database_url)
    model = model or ModelServer(
        settings.base_model,
        settings.model_dir,
        settings.quantization,
        settings.device,
        settings.predict_batch_size,
        settings.max_prompt_tokens,
        settings.max_loaded_adapters,
        load_timeout=settings.model_load_timeout,
        wait_timeout=settings.model_wait_timeout,
    )

    def conn_factory() -> Any:
        return connect(settings.redis_url, settings.model_dir, fast_fail=True)

    return Services(settings, store, model, Trigger(settings, store, conn_factory))
