"""A project's own settings (Label Studio's *Extra params*), validated once, at /setup, with bounds.

Each field has a default (None: the server's setting), a type, bounds and a help text, like peft's LoraConfig.
`/setup` parses strictly: an unknown key, a wrong type or a value out of bounds is a 400 naming the key, not a
failure hours later inside a training (`{"epochs": 1000000, "lr": 1e9}` started 8 x 5,000,000 steps; issue 17).
Readers (the training trigger, routing, the training run) parse leniently: a row stored before validation existed
keeps working, its bad values replaced by the server's settings (out-of-bounds numbers clamped).
"""

from __future__ import annotations

import functools
import json
import logging
import math
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from slm_annotator.settings import RATER_WEIGHTINGS

log = logging.getLogger(__name__)
MAX_MEMBERS = 8  # ensemble members: each is a trained adapter and a forward pass per task
ROUTES = ("none", "human", "judge")
MAX_TEXT_CHARS = 20_000  # instructions, each rubric text: they go into every prompt
MAX_RUBRIC_ENTRIES = 256


class ProjectSettingsError(ValueError):
    """A bad extra param; `key` is its dotted name (e.g. training.epochs)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"extra_params {key!r}: {message}")
        self.key = key


def _opt(kind: type, lo: float | None = None, hi: float | None = None, choices: tuple[str, ...] = (),
         help: str = "") -> Any:
    return field(default=None, metadata={"type": kind, "bounds": (lo, hi), "choices": choices, "help": help})


@dataclass(frozen=True)
class TrainingOverrides:
    """extra_params["training"]: the project's training recipe; None keeps the server's (TRAIN_*, LORA_*)."""

    epochs: int | None = _opt(int, 1, 50, help="passes over the labels (TRAIN_EPOCHS)")
    lr: float | None = _opt(float, 1e-6, 1e-2, help="learning rate (TRAIN_LR)")
    batch_size: int | None = _opt(int, 1, 256, help="examples per optimizer step (TRAIN_BATCH_SIZE)")
    micro_batch_size: int | None = _opt(int, 0, 256, help="sequences per forward pass, 0 = auto (TRAIN_MICRO_BATCH)")
    max_tokens: int | None = _opt(int, 32, 8192, help="prompt tokens per example while training (MAX_PROMPT_TOKENS)")
    lora_r: int | None = _opt(int, 1, 256, help="LoRA rank (LORA_R)")
    lora_alpha: int | None = _opt(int, 1, 1024, help="LoRA scaling (LORA_ALPHA)")
    lora_dropout: float | None = _opt(float, 0.0, 0.9, help="LoRA dropout (LORA_DROPOUT)")
    lora_layers: int | None = _opt(int, 0, 1000, help="adapt only the top N layers, 0 = all (LORA_LAYERS)")
    class_balance: float | None = _opt(float, 0.0, 2.0, help="loss weight exponent per value (TRAIN_CLASS_BALANCE)")
    ordinal_loss: float | None = _opt(float, 0.0, 10.0, help="extra loss on scale position (TRAIN_ORDINAL_LOSS)")
    label_mode: str | None = _opt(str, choices=("soft", "majority", "per_rater"), help="TRAIN_LABEL_MODE")
    val_fraction: float | None = _opt(float, 0.0, 0.5, help="share held out for early stopping (TRAIN_VAL_FRACTION)")
    patience: int | None = _opt(int, 1, 20, help="epochs without improvement before stopping (TRAIN_PATIENCE)")
    token_dropout: float | None = _opt(float, 0.0, 0.5, help="share of prompt tokens dropped (TOKEN_DROPOUT)")
    token_dropout_share: float | None = _opt(float, 0.0, 1.0, help="share of examples with dropout")
    seed: int | None = _opt(int, 0, 2**31 - 1, help="training seed (SEED)")
    augment: bool | None = _opt(bool, help="shuffle texts and options while training")
    weight_decay: float | None = _opt(float, 0.0, 1.0, help="AdamW weight decay")
    warmup_fraction: float | None = _opt(float, 0.0, 0.5, help="share of steps warming the learning rate up")
    templates: int | None = _opt(int, 1, 8, help="prompt templates an adapter learns")
    rater_weighting: str | None = _opt(str, choices=RATER_WEIGHTINGS, help="weight each rater's vote by a "
                                       "reliability estimated from the labels (RATER_WEIGHTING)")


@dataclass(frozen=True)
class ProjectSettings:
    """Label Studio's *Extra params* of one project; None everywhere means the server's settings."""

    train_threshold: int | None = _opt(int, 10, 10**9, help="new or changed labels that start a training "
                                                            "(TRAIN_THRESHOLD; 10**9: never)")
    ensemble: int | None = _opt(int, 1, MAX_MEMBERS, help="k adapters trained and voting on every item (ENSEMBLE)")
    route: str | None = _opt(str, choices=ROUTES, help="where items the ensemble disagrees on go (ROUTE)")
    route_epsilon: float | None = _opt(float, 0.0, 1.0, help="route items with uncertainty >= this (ROUTE_EPSILON)")
    hard_pool_size: int | None = _opt(int, 10, 10**9, help="hard samples that start a continual fine-tuning "
                                                             "(HARD_POOL_SIZE)")
    decoding: str | None = _opt(str, choices=("argmax", "expected"), help="how a scale's answer is read")
    instructions: str | None = _opt(str, help="annotation guidelines, shown in every prompt")
    prefill_min_alpha: float | None = _opt(float, -1.0, 1.0, help="a dimension whose held-out alpha is below this "
                                                                   "is not pre-filled; None = the server's "
                                                                   "PREFILL_MIN_ALPHA")
    head_every: int | None = _opt(int, 1, 10_000, help="train the fast embedding head after this many new labels; "
                                                       "None = server default")
    rubric: dict[str, str] | None = field(default=None, metadata={
        "type": dict, "help": "dimension name -> its description in the prompt"})
    training: TrainingOverrides = field(default_factory=TrainingOverrides, metadata={
        "type": TrainingOverrides, "help": "the project's training recipe"})

    @classmethod
    def parse(cls, raw: Any, strict: bool = True) -> ProjectSettings:
        """From extra_params (a JSON object or its text). strict: raise ProjectSettingsError; else log and default."""
        return _parse(cls, as_object(raw, strict), "", strict)

    def to_extra(self) -> dict[str, Any]:
        """The set fields only, as stored and as read back by parse()."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, TrainingOverrides):
                nested = {g.name: getattr(value, g.name) for g in fields(value) if getattr(value, g.name) is not None}
                if nested:
                    out[f.name] = nested
            elif value is not None:
                out[f.name] = value
        return out

    def training_overrides(self) -> dict[str, Any]:
        return {f.name: getattr(self.training, f.name) for f in fields(self.training)
                if getattr(self.training, f.name) is not None}


# Per /predict request, only what shapes the prompt and the reading of answers; never cost or resources
# (ensemble, route, route_epsilon, training...): a request could otherwise send every item to the paid judge.
PER_REQUEST = frozenset({"decoding", "instructions", "rubric"})


def request_overrides(raw: Any) -> dict[str, Any]:
    """/predict's params.extra_params: validated, and only PER_REQUEST keys."""
    extra = as_object(raw, True)
    refused = sorted(k for k in extra if k not in PER_REQUEST)
    if refused:
        raise ProjectSettingsError(refused[0], "cannot be set per request (cost and resources are per project: "
                                               f"set it in the project's extra params); allowed: {sorted(PER_REQUEST)}")
    return ProjectSettings.parse(extra).to_extra()


def stored(extra: Any) -> ProjectSettings:
    """A stored project's settings, leniently (rows from before validation, or written by other tools)."""
    if not extra:
        return _EMPTY
    try:
        key = json.dumps(extra, sort_keys=True)
    except (TypeError, ValueError):
        return ProjectSettings.parse(extra, strict=False)
    return _stored(key)


@functools.lru_cache(maxsize=256)
def _stored(extra_json: str) -> ProjectSettings:
    """Cached: read on every webhook (the training threshold), and a bad stored value is logged once."""
    return ProjectSettings.parse(extra_json, strict=False)


_EMPTY = ProjectSettings()


def as_object(raw: Any, strict: bool) -> dict[str, Any]:
    if raw is None or raw == "":
        return {}
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError:
            return _fail(strict, "", "is not JSON", {})
    if not isinstance(raw, dict):
        return _fail(strict, "", f"must be a JSON object, got {type(raw).__name__}", {})
    return raw


def _fail(strict: bool, key: str, message: str, fallback: Any) -> Any:
    if strict:
        raise ProjectSettingsError(key or "extra_params", message)
    log.warning("stored extra_params %r %s; the server's setting is used", key, message)
    return fallback


def _parse(cls: type, raw: dict[str, Any], prefix: str, strict: bool) -> Any:
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(str(k) for k in raw if k not in known)
    if unknown:
        _fail(strict, prefix + unknown[0], f"is not a setting; known: {', '.join(sorted(known))}", None)
    values: dict[str, Any] = {}
    for name, f in known.items():
        if name not in raw:
            continue
        key = prefix + name
        default = f.default_factory() if f.default_factory is not MISSING else f.default  # type: ignore[misc]
        values[name] = _value(f.metadata, raw[name], key, strict, default)
    return cls(**values)


def _value(meta: Any, value: Any, key: str, strict: bool, default: Any) -> Any:
    kind, (lo, hi), choices = meta["type"], meta.get("bounds", (None, None)), meta.get("choices", ())
    if value is None:
        return default
    if kind is TrainingOverrides:
        if not isinstance(value, dict):
            return _fail(strict, key, "must be a JSON object", default)
        return _parse(TrainingOverrides, value, key + ".", strict)
    if kind is dict:
        return _rubric(value, key, strict)
    if kind is str:
        if not isinstance(value, str):
            return _fail(strict, key, f"must be a string, got {type(value).__name__}", default)
        if choices:
            if value.strip().lower() not in choices:
                return _fail(strict, key, f"must be one of {', '.join(choices)}, got {value[:40]!r}", default)
            return value.strip().lower()
        if len(value) > MAX_TEXT_CHARS:
            return _fail(strict, key, f"is {len(value)} characters; at most {MAX_TEXT_CHARS}", default)
        return value
    number = _number(value, kind)
    if number is None:
        return _fail(strict, key, f"must be {'a boolean' if kind is bool else 'a number'}, got {str(value)[:40]!r}",
                     default)
    if kind is bool:
        return number
    if (lo is not None and number < lo) or (hi is not None and number > hi):
        clamped = min(max(number, lo), hi)
        return _fail(strict, key, f"{number} is out of bounds [{lo}, {hi}]", kind(clamped))
    return number


def _number(value: Any, kind: type) -> Any:
    """int/float from a JSON number or its text ("4" -> 4); None if it is not one of that type."""
    if kind is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower() if isinstance(value, str | int) else ""
        return {"true": True, "1": True, "false": False, "0": False}.get(text)
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value.strip()) if kind is float else int(value.strip())
        except ValueError:
            return None
    if not isinstance(value, int | float) or not math.isfinite(value):
        return None
    if kind is int:
        return int(value) if float(value).is_integer() else None
    return float(value)


def _rubric(value: Any, key: str, strict: bool) -> dict[str, str] | None:
    if not isinstance(value, dict):
        return _fail(strict, key, "must be an object of dimension name -> description", None)
    if len(value) > MAX_RUBRIC_ENTRIES:
        return _fail(strict, key, f"has {len(value)} entries; at most {MAX_RUBRIC_ENTRIES}", None)
    out = {}
    for name, text in value.items():
        if not isinstance(text, str) or len(text) > MAX_TEXT_CHARS:
            return _fail(strict, f"{key}.{name}", f"must be a string of at most {MAX_TEXT_CHARS} characters", None)
        out[str(name)] = text
    return out


def describe() -> list[tuple[str, str, str]]:
    """(key, bounds or choices, help) per setting: the README table's source."""
    rows = []
    for cls, prefix in ((ProjectSettings, ""), (TrainingOverrides, "training.")):
        for f in fields(cls):
            if f.name == "training":
                continue
            lo, hi = f.metadata.get("bounds", (None, None))
            rng = " / ".join(f.metadata.get("choices", ())) or (f"{lo} .. {hi}" if lo is not None else "")
            rows.append((prefix + f.name, rng, f.metadata["help"]))
    return rows
