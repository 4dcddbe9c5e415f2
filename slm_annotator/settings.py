"""All configuration, read once from the environment. Every knob is documented in the README table."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from slm_annotator.bases import short_name


def _env(name: str, default: str) -> str:
    value = os.environ.get(name)
    return default if value is None or value == "" else value


def _env_int(name: str, default: int) -> int:
    raw = _env(name, str(default))
    try:
        return int(raw)
    except ValueError as exc:
        raise ValueError(f"environment variable {name} must be an integer, got {raw!r}") from exc


def _env_ints(name: str, default: tuple[int, ...]) -> tuple[int, ...]:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return tuple(int(x) for x in raw.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"{name} must be comma-separated integers, got {raw!r}") from None


def _env_float(name: str, default: float) -> float:
    raw = _env(name, str(default))
    try:
        return float(raw)
    except ValueError as exc:
        raise ValueError(f"environment variable {name} must be a number, got {raw!r}") from exc


def _env_bar(name: str, default: float) -> float | None:
    """A bar in [-1, 1], or none/off: no bar (everything pre-filled, also by the untrained base)."""
    raw = os.environ.get(name, "").strip().lower()
    if raw in {"none", "off"}:
        return None
    value = _env_float(name, default)
    if not -1.0 <= value <= 1.0:
        raise ValueError(f"{name} must be an alpha between -1 and 1, or 'none', got {raw!r}")
    return value


ROUTES = {"none", "human", "judge"}  # where items the ensemble disagrees on go (ROUTE)
# RATER_WEIGHTING: how much each rater's vote counts in training targets (model.reliability)
RATER_WEIGHTINGS = ("off", "auto", "one_coin", "dawid_skene")


@dataclass(frozen=True)
class Settings:
    model_dir: Path
    database_url: str
    redis_url: str  # empty: embedded redis-server under MODEL_DIR
    base_model: str
    quantization: str  # nf4 | none
    device: str  # auto | cpu | cuda
    max_prompt_tokens: int
    predict_batch_size: int
    max_tasks_per_request: int
    max_body_bytes: int
    max_loaded_adapters: int
    basic_auth_user: str
    basic_auth_pass: str
    webhook_secret: str
    label_studio_url: str
    label_studio_api_key: str
    train_threshold: int
    train_job_timeout: int
    train_retries: int
    train_retry_delays: tuple[int, ...]
    heldout_fraction: float
    promotion_tolerance: float
    train_epochs: int
    train_lr: float
    train_batch_size: int
    train_micro_batch: int
    train_class_balance: float
    train_ordinal_loss: float
    train_label_mode: str
    train_val_fraction: float
    train_patience: int
    lora_r: int
    lora_alpha: int
    lora_dropout: float
    lora_targets: tuple[str, ...]
    lora_layers: int
    token_dropout: float
    token_dropout_share: float
    seed: int
    outbound_timeout: float
    log_level: str
    workers: int
    threads: int
    predict_queue_limit: int
    model_load_timeout: float
    model_wait_timeout: float
    ensemble: int = 1
    route: str = "human"
    route_epsilon: float = 0.34
    judge_url: str = ""
    judge_model: str = ""
    judge_api_key: str = ""
    judge_timeout: float = 20.0
    judge_retries: int = 2
    judge_budget: float = 0.0
    judge_concurrency: int = 4
    judge_deadline: float = 60.0
    price_judge_input: float = 2.5
    price_judge_output: float = 10.0
    price_slm_hour: float = 0.5
    price_human_item: float = 0.1
    hard_pool_size: int = 2000
    replay_ratio: float = 1.0
    forgetting_tolerance: float = 0.0
    head_every: int = 10  # HEAD_EVERY: retrain the embedding head after this many new labels (0: no heads)
    head_encoder: str = "all-MiniLM-L6-v2"  # HEAD_ENCODER: the frozen sentence encoder the heads read
    prefill_min_alpha: float | None = 0.2  # PREFILL_MIN_ALPHA: held-out alpha a dimension needs to be pre-filled
    report_queue_limit: int = 1
    outbound_deadline: float = 120.0
    predict_budget_seconds: float = 60.0  # PREDICT_BUDGET_SECONDS: /predict answers within this, the rest goes to a job
    predict_cache_versions: int = 2  # PREDICT_CACHE_VERSIONS: model versions per project the prediction cache keeps
    bulk_chunk: int = 64  # BULK_CHUNK: tasks a bulk prediction job scores and writes to Label Studio at once
    bulk_job_timeout: int = 6 * 3600  # BULK_JOB_TIMEOUT: seconds one bulk prediction job may run
    bulk_ls_patience: float = 900.0  # BULK_LS_PATIENCE: seconds a bulk job retries a Label Studio that is down
    rater_weighting: str = "auto"  # RATER_WEIGHTING: one of RATER_WEIGHTINGS (off: every vote counts 1)
    bind_host: str = "127.0.0.1"  # where `serve` listens (BIND_HOST, set from --host): not loopback needs auth

    @property
    def base_version(self) -> str:
        """The model_version served before any adapter exists; computed without loading the model.

        The name comes from the loader's own alias table (slm_annotator.bases), so BASE_MODEL=gemma3 and
        BASE_MODEL=gemma3-270m name the same versions, and they match LoadedBase.name.
        """
        return f"{short_name(self.base_model)}-{self.quantization}-base"

    @property
    def predict_slots(self) -> int:
        """Concurrent /predict requests per process: below THREADS, so a webhook always finds a free thread.

        Label Studio waits 1 s for a webhook and never retries it: if every gunicorn thread of a process could
        sit in a long prediction, labels arriving meanwhile would be lost.
        """
        return max(1, min(self.predict_queue_limit, self.threads - 1))

    def adapter_version(self, project_id: str, version: int) -> str:
        return f"{self.base_version.removesuffix('-base')}-p{project_id}-v{version}"


def load_settings() -> Settings:
    model_dir = Path(_env("MODEL_DIR", str(Path.cwd() / "model_dir"))).expanduser().resolve()
    targets = tuple(
        t.strip()
        for t in _env("LORA_TARGETS", "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj").split(",")
        if t.strip()
    )
    quant = _env("QUANTIZATION", "nf4").lower()
    if quant not in {"nf4", "none"}:
        raise ValueError(f"QUANTIZATION must be 'nf4' or 'none', got {quant!r}")
    device = _env("DEVICE", "auto").lower()
    if device not in {"auto", "cpu", "cuda"}:
        raise ValueError(f"DEVICE must be 'auto', 'cpu' or 'cuda', got {device!r}")
    label_mode = _env("TRAIN_LABEL_MODE", "soft").lower()
    if label_mode not in {"soft", "majority", "per_rater"}:
        raise ValueError(f"TRAIN_LABEL_MODE must be 'soft', 'majority' or 'per_rater', got {label_mode!r}")
    rater_weighting = _env("RATER_WEIGHTING", "auto").lower()
    if rater_weighting not in RATER_WEIGHTINGS:
        raise ValueError(f"RATER_WEIGHTING must be one of {', '.join(RATER_WEIGHTINGS)}, got {rater_weighting!r}")
    route = _env("ROUTE", "human").lower()
    if route not in ROUTES:
        raise ValueError(f"ROUTE must be one of {', '.join(sorted(ROUTES))}, got {route!r}")
    return Settings(
        model_dir=model_dir,
        database_url=_env("DATABASE_URL", f"sqlite:///{model_dir / 'labels.sqlite3'}"),
        redis_url=_env("REDIS_URL", ""),
        base_model=_env("BASE_MODEL", "smollm2"),
        quantization=quant,
        device=device,
        max_prompt_tokens=_env_int("MAX_PROMPT_TOKENS", 1024),
        predict_batch_size=_env_int("PREDICT_BATCH_SIZE", 8),
        max_tasks_per_request=_env_int("MAX_TASKS_PER_REQUEST", 1000),
        max_body_bytes=_env_int("MAX_BODY_BYTES", 32 * 1024 * 1024),
        max_loaded_adapters=_env_int("MAX_LOADED_ADAPTERS", 4),
        basic_auth_user=_env("BASIC_AUTH_USER", ""),
        basic_auth_pass=_env("BASIC_AUTH_PASS", ""),
        webhook_secret=_env("WEBHOOK_SECRET", ""),
        label_studio_url=_env("LABEL_STUDIO_URL", "").rstrip("/"),
        label_studio_api_key=_env("LABEL_STUDIO_API_KEY", ""),
        train_threshold=_env_int("TRAIN_THRESHOLD", 50),
        train_job_timeout=_env_int("TRAIN_JOB_TIMEOUT", 6 * 3600),
        train_retries=_env_int("TRAIN_RETRIES", 2),
        train_retry_delays=_env_ints("TRAIN_RETRY_DELAYS", (10, 60, 300)),
        heldout_fraction=_env_float("HELDOUT_FRACTION", 0.2),
        promotion_tolerance=_env_float("PROMOTION_TOLERANCE", 0.0),
        train_epochs=_env_int("TRAIN_EPOCHS", 8),
        train_lr=_env_float("TRAIN_LR", 5e-4),
        train_batch_size=_env_int("TRAIN_BATCH_SIZE", 8),
        train_micro_batch=_env_int("TRAIN_MICRO_BATCH", 0),
        train_class_balance=_env_float("TRAIN_CLASS_BALANCE", 1.0),
        train_ordinal_loss=_env_float("TRAIN_ORDINAL_LOSS", 0.0),
        train_label_mode=label_mode,
        train_val_fraction=_env_float("TRAIN_VAL_FRACTION", 0.0),
        train_patience=_env_int("TRAIN_PATIENCE", 1),
        lora_r=_env_int("LORA_R", 16),
        lora_alpha=_env_int("LORA_ALPHA", 32),
        lora_dropout=_env_float("LORA_DROPOUT", 0.05),
        lora_targets=targets,
        lora_layers=_env_int("LORA_LAYERS", 0),
        token_dropout=_env_float("TOKEN_DROPOUT", 0.03),
        token_dropout_share=_env_float("TOKEN_DROPOUT_SHARE", 0.5),
        seed=_env_int("SEED", 0),
        outbound_timeout=_env_float("OUTBOUND_TIMEOUT", 10.0),
        log_level=_env("LOG_LEVEL", "INFO").upper(),
        workers=_env_int("WORKERS", 1),
        threads=_env_int("THREADS", 4),
        predict_queue_limit=_env_int("PREDICT_QUEUE_LIMIT", 8),
        model_load_timeout=_env_float("MODEL_LOAD_TIMEOUT", 600.0),
        model_wait_timeout=_env_float("MODEL_WAIT_TIMEOUT", 60.0),
        ensemble=max(1, _env_int("ENSEMBLE", 1)),
        route=route,
        route_epsilon=_env_float("ROUTE_EPSILON", 0.34),
        judge_url=_env("JUDGE_URL", "").rstrip("/"),
        judge_model=_env("JUDGE_MODEL", ""),
        judge_api_key=_env("JUDGE_API_KEY", ""),
        judge_timeout=_env_float("JUDGE_TIMEOUT", 20.0),
        judge_retries=_env_int("JUDGE_RETRIES", 2),
        judge_budget=_env_float("JUDGE_BUDGET", 0.0),
        judge_concurrency=max(1, _env_int("JUDGE_CONCURRENCY", 4)),
        judge_deadline=_env_float("JUDGE_DEADLINE", 60.0),
        price_judge_input=_env_float("PRICE_JUDGE_INPUT", 2.5),
        price_judge_output=_env_float("PRICE_JUDGE_OUTPUT", 10.0),
        price_slm_hour=_env_float("PRICE_SLM_HOUR", 0.5),
        price_human_item=_env_float("PRICE_HUMAN_ITEM", 0.1),
        hard_pool_size=max(1, _env_int("HARD_POOL_SIZE", 2000)),
        replay_ratio=_env_float("REPLAY_RATIO", 1.0),
        forgetting_tolerance=_env_float("FORGETTING_TOLERANCE", 0.0),
        head_every=max(0, _env_int("HEAD_EVERY", 10)),
        head_encoder=_env("HEAD_ENCODER", "all-MiniLM-L6-v2"),
        prefill_min_alpha=_env_bar("PREFILL_MIN_ALPHA", 0.2),
        report_queue_limit=max(1, _env_int("REPORT_QUEUE_LIMIT", 1)),
        outbound_deadline=_env_float("OUTBOUND_DEADLINE", 120.0),
        predict_budget_seconds=max(0.0, _env_float("PREDICT_BUDGET_SECONDS", 60.0)),
        predict_cache_versions=max(1, _env_int("PREDICT_CACHE_VERSIONS", 2)),
        bulk_chunk=max(1, _env_int("BULK_CHUNK", 64)),
        bulk_job_timeout=max(60, _env_int("BULK_JOB_TIMEOUT", 6 * 3600)),
        bulk_ls_patience=max(0.0, _env_float("BULK_LS_PATIENCE", 900.0)),
        rater_weighting=rater_weighting,
        bind_host=_env("BIND_HOST", "127.0.0.1"),
    )
