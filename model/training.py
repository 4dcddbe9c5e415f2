"""QLoRA adapter training with the loss at the answer positions only, over the allowed values only.

One sequence per task carries every dimension (soft targets from all its raters), and the output layer is
applied to a handful of hidden states: this is what makes CPU training practical.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from slm_annotator.model.dataset import Example, relabel, split_heldout
from slm_annotator.model.prompt import ADAPTER_META, PROMPT_FORMAT, Encoded, PromptBuilder
from slm_annotator.model.rubric import Rubric
from slm_annotator.model.scorer import answer_logits, pad_batch

log = logging.getLogger(__name__)
Progress = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 8
    lr: float = 5e-4
    batch_size: int = 8
    micro_batch_size: int = 0  # sequences per forward/backward; 0: 2 on CPU (8 x 500 tokens need ~17 GB), all on GPU
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    lora_layers: int = 0  # adapt only the top N decoder layers (0 = all): no backward pass below them
    augment: bool = True
    token_dropout: float = 0.03  # share of prompt tokens dropped...
    token_dropout_share: float = 0.5  # ...in this share of examples (never answer tokens)
    seed: int = 0
    max_tokens: int = 1024
    weight_decay: float = 0.0
    class_balance: float = 1.0  # weight each value by prior^-x (0: plain; 1: inverse frequency) against collapse
    ordinal_loss: float = 0.0  # weight of the squared error of the expected scale position (ordered scales)
    warmup_fraction: float = 0.1
    label_mode: str = "soft"  # soft: the raters' distribution | majority: the consensus | per_rater: one each
    val_fraction: float = 0.0  # share of training tasks held out for early stopping (0: train all epochs)
    patience: int = 1  # epochs without a better validation loss before stopping; the best epoch is kept
    template: int = 0  # the prompt template this adapter learns (ensemble member t: template t)
    templates: int = 1  # > 1: each example in one of templates template .. template + templates - 1, at random


@dataclass
class TrainStats:
    steps: int = 0
    labels_seen: int = 0
    seconds: float = 0.0
    losses: list[float] = field(default_factory=list)
    val_losses: list[float] = field(default_factory=list)
    best_epoch: int | None = None

    @property
    def samples_per_second(self) -> float:
        return self.labels_seen / self.seconds if self.seconds else 0.0


def soft_cross_entropy_sum(
    logits: Sequence[torch.Tensor], targets: Sequence[torch.Tensor | None],
    weights: Sequence[torch.Tensor | None] | None = None, ordinal: Sequence[bool] | None = None,
    ordinal_weight: float = 0.0,
) -> tuple[torch.Tensor, int]:
    """(summed loss, number of labelled pairs): micro-batches add up to the whole batch's mean.

    Per (example, dimension): -sum(w * target * log p) over the allowed values, plus, on ordered scales,
    ordinal_weight * (E_p[position] - E_target[position])^2 on a 0..1 scale, so near misses cost less.
    """
    total = torch.zeros((), dtype=torch.float32, device=logits[0].device)
    count = 0
    for d, (lg, tgt) in enumerate(zip(logits, targets, strict=True)):
        if tgt is None:
            continue
        mask = tgt.sum(-1) > 0
        if not bool(mask.any()):
            continue
        t = tgt[mask]
        logp = torch.log_softmax(lg[mask], dim=-1)
        w = weights[d] if weights is not None and weights[d] is not None else None
        nll = -((t * w) if w is not None else t).mul(logp).sum(-1)
        if ordinal_weight and ordinal is not None and ordinal[d] and lg.shape[-1] > 2:
            pos = torch.linspace(0.0, 1.0, lg.shape[-1], device=lg.device)
            nll = nll + ordinal_weight * ((logp.exp() * pos).sum(-1) - (t * pos).sum(-1)).pow(2)
        total = total + nll.sum()
        count += int(mask.sum())
    return total, count


def class_weights(examples: Sequence[Example], rubric: Rubric, power: float) -> list[torch.Tensor | None]:
    """Per dimension prior^-power over its values, scaled so the prior-weighted mean weight is 1."""
    if not power:
        return [None] * len(rubric.dimensions)
    out: list[torch.Tensor | None] = []
    per_example = [ex.targets(rubric) for ex in examples]
    for d in range(len(rubric.dimensions)):
        rows = [t[d] for t in per_example if t[d] is not None]
        if not rows:
            out.append(None)
            continue
        prior = torch.tensor(rows, dtype=torch.float32).mean(0).clamp_min(1.0 / (10 * len(rows)))
        w = prior.pow(-power)
        out.append(w / (prior * w).sum())
    return out


def token_dropout(enc: Encoded, rate: float, rng: random.Random, protected: set[int]) -> Encoded:
    """Deletes prompt tokens (not special ones, never the answer tail) and shifts the read positions."""
    keep = [
        i
        for i, tok in enumerate(enc.input_ids)
        if i >= enc.prefix_len or tok in protected or rng.random() >= rate
    ]
    dropped = len(enc.input_ids) - len(keep)
    ids = [enc.input_ids[i] for i in keep]
    return Encoded(ids, enc.prefix_len - dropped, [p - dropped for p in enc.read_positions], enc.option_orders)


def _targets_tensor(batch: Sequence[Example], rubric: Rubric, orders: Sequence[Encoded]) -> list[torch.Tensor | None]:
    per_example = [ex.targets(rubric) for ex in batch]
    out: list[torch.Tensor | None] = []
    for d, dim in enumerate(rubric.dimensions):
        rows = [t[d] if t[d] is not None else [0.0] * len(dim.values) for t in per_example]
        tensor = torch.tensor(rows, dtype=torch.float32)
        out.append(tensor if tensor.sum() > 0 else None)
    return out


def attach_lora(model: Any, cfg: TrainConfig, init_adapter: Path | None) -> Any:
    from peft import LoraConfig, PeftModel, get_peft_model

    if init_adapter is not None:
        return PeftModel.from_pretrained(model, str(init_adapter), is_trainable=True)
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    targets = [t for t in cfg.targets if t in names]
    if not targets:
        raise ValueError(f"none of the LoRA targets {cfg.targets} exist in this model")
    n_layers = int(getattr(model.config, "num_hidden_layers", 0) or 0)
    top = range(n_layers - cfg.lora_layers, n_layers) if 0 < cfg.lora_layers < n_layers else None
    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=targets,
        layers_to_transform=list(top) if top else None,
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def train_adapter(
    model: Any,
    tokenizer: Any,
    rubric: Rubric,
    examples: Sequence[Example],
    cfg: TrainConfig,
    device: torch.device,
    init_adapter: Path | None = None,
    progress: Progress | None = None,
) -> tuple[Any, TrainStats]:
    """Returns the peft model (adapter 'default' trained) and statistics; the base weights stay frozen.

    With val_fraction > 0 a share of the tasks is held out, the loss on it is measured after every epoch,
    training stops after `patience` epochs without improvement and the best epoch's adapter is kept.
    """
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    train, val = _validation_split(examples, cfg)
    train = relabel(train, rubric, cfg.label_mode)
    peft_model = attach_lora(model, cfg, init_adapter)
    peft_model.train()
    builders = [PromptBuilder(tokenizer, rubric, cfg.max_tokens, cfg.template + t)
                for t in range(max(1, cfg.templates))]
    builder = builders[0]
    candidates = [s.token_ids for s in builder.spaces]
    protected = set(tokenizer.all_special_ids)
    weights = class_weights(train, rubric, cfg.class_balance)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    total = max(1, steps_per_epoch * cfg.epochs)
    warmup = max(1, int(total * cfg.warmup_fraction))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * max(0.05, 1 - s / total)
    )
    val_encoded = [builder.encode(ex.data) for ex in val]
    best: dict[str, torch.Tensor] | None = None
    stats = TrainStats()
    start = time.perf_counter()
    for epoch in range(cfg.epochs):
        order = list(train)
        rng.shuffle(order)
        for b in range(0, len(order), cfg.batch_size):
            batch = order[b : b + cfg.batch_size]
            encoded = [_encode(rng.choice(builders) if len(builders) > 1 else builder, ex, cfg, rng, protected)
                       for ex in batch]
            optimizer.zero_grad(set_to_none=True)
            loss = _accumulate(peft_model, tokenizer, rubric, batch, encoded, candidates, cfg, device, weights)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            stats.steps += 1
            stats.labels_seen += sum(len(ex.ratings) for ex in batch)
            stats.losses.append(loss)
            stats.seconds = time.perf_counter() - start
            if progress:
                eta = stats.seconds / stats.steps * (total - stats.steps)
                progress({"epoch": epoch + 1, "step": stats.steps, "total_steps": total,
                          "loss": round(stats.losses[-1], 4), "eta_seconds": round(eta, 1)})
        if not val:
            continue
        stats.val_losses.append(validation_loss(peft_model, tokenizer, rubric, val, val_encoded, candidates, cfg,
                                                device, weights))
        if stats.val_losses[-1] <= min(stats.val_losses):
            stats.best_epoch, best = epoch + 1, _trainable_state(peft_model)
        if progress:
            progress({"epoch": epoch + 1, "val_loss": round(stats.val_losses[-1], 4), "best_epoch": stats.best_epoch})
        if epoch + 1 - (stats.best_epoch or 0) >= cfg.patience:
            break
    stats.seconds = time.perf_counter() - start
    if best is not None:
        peft_model.load_state_dict(best, strict=False)
    peft_model.eval()
    return peft_model, stats


def _validation_split(examples: Sequence[Example], cfg: TrainConfig) -> tuple[list[Example], list[Example]]:
    """Whole tasks by hash, as the promotion gate splits; too few tasks to spare: no early stopping."""
    if cfg.val_fraction <= 0 or len(examples) * cfg.val_fraction < 4:
        return list(examples), []
    return split_heldout(examples, cfg.val_fraction, salt=f"early-stopping-{cfg.seed}")


def _trainable_state(model: Any) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def validation_loss(
    model: Any, tokenizer: Any, rubric: Rubric, examples: Sequence[Example], encoded: Sequence[Encoded],
    candidates: Sequence[Sequence[int]], cfg: TrainConfig, device: torch.device,
    weights: Sequence[torch.Tensor | None] | None = None,
) -> float:
    """The training objective (same weights, no dropout, no augmentation) on held-out tasks."""
    model.eval()
    targets = _targets_tensor(examples, rubric, encoded)
    dev_weights = [w.to(device) if w is not None else None for w in weights] if weights is not None else None
    total, count = 0.0, 0
    step = max(cfg.batch_size, 1)
    for m in range(0, len(examples), step):
        rows = list(range(m, min(m + step, len(examples))))
        loss_sum, n = _rows_loss(model, tokenizer, rubric, encoded, rows, targets, candidates, cfg, device,
                                 dev_weights)
        total += float(loss_sum)
        count += n
    model.train()
    return total / max(count, 1)


def _rows_loss(
    model: Any, tokenizer: Any, rubric: Rubric, encoded: Sequence[Encoded], rows: list[int],
    targets: Sequence[torch.Tensor | None], candidates: Sequence[Sequence[int]], cfg: TrainConfig,
    device: torch.device, weights: Sequence[torch.Tensor | None] | None,
) -> tuple[torch.Tensor, int]:
    """(summed loss, labelled pairs) of one forward pass over these rows of a batch."""
    ids, mask = pad_batch([encoded[i] for i in rows], tokenizer.pad_token_id, device)
    reads = torch.tensor([encoded[i].read_positions for i in rows], device=device)
    logits = answer_logits(model, ids, mask, reads, candidates)
    index = torch.tensor(rows)
    part = [t[index].to(device) if t is not None else None for t in targets]
    ordinal = [dim.level != "nominal" for dim in rubric.dimensions]
    return soft_cross_entropy_sum(logits, part, weights, ordinal, cfg.ordinal_loss)


def _encode(builder: PromptBuilder, ex: Example, cfg: TrainConfig, rng: random.Random, protected: set[int]) -> Encoded:
    enc = builder.encode(ex.data, rng if cfg.augment else None)
    if cfg.token_dropout > 0 and rng.random() < cfg.token_dropout_share:
        enc = token_dropout(enc, cfg.token_dropout, rng, protected)
    return enc


def _accumulate(
    model: Any, tokenizer: Any, rubric: Rubric, batch: Sequence[Example], encoded: Sequence[Encoded],
    candidates: Sequence[Sequence[int]], cfg: TrainConfig, device: torch.device,
    weights: Sequence[torch.Tensor | None] | None = None,
) -> float:
    """Backward over micro-batches (length-sorted, so little padding); gradients equal the whole batch's mean."""
    targets = _targets_tensor(batch, rubric, encoded)
    n_labelled = sum(int((t.sum(-1) > 0).sum()) for t in targets if t is not None)
    order = sorted(range(len(batch)), key=lambda i: len(encoded[i].input_ids))
    step = cfg.micro_batch_size or (len(batch) if device.type == "cuda" else 2)
    weights = [w.to(device) if w is not None else None for w in weights] if weights is not None else None
    total = 0.0
    for m in range(0, len(order), step):
        rows = order[m : m + step]
        loss_sum, count = _rows_loss(model, tokenizer, rubric, encoded, rows, targets, candidates, cfg, device,
                                     weights)
        if count:
            (loss_sum / max(n_labelled, 1)).backward()
            total += float(loss_sum.detach())
    return total / max(n_labelled, 1)


def save_adapter(peft_model: Any, target: Path, meta: dict[str, Any]) -> None:
    """The adapter and what it was trained with, the prompt format included (serving checks it)."""
    peft_model.save_pretrained(str(target))
    meta = {**meta, "prompt_format": PROMPT_FORMAT}
    (target / ADAPTER_META).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))


def config_dict(cfg: TrainConfig) -> dict[str, Any]:
    return asdict(cfg)
