"""Training-step mechanics on the tiny model: micro-batching and layer-limited LoRA change cost, not maths."""

from __future__ import annotations

import random

import pytest
import torch

from slm_annotator.model.dataset import Example, relabel
from slm_annotator.model.loader import load_model
from slm_annotator.model.prompt import PromptBuilder
from slm_annotator.model.rubric import parse_label_config
from slm_annotator.model.training import (
    TrainConfig,
    _accumulate,
    _encode,
    _validation_split,
    attach_lora,
    class_weights,
    train_adapter,
    validation_loss,
)
from tests.toy import BAD, CONFIG, GOOD


def _examples(n: int = 6) -> list[Example]:
    out = []
    for t in range(n):
        word = (GOOD if t % 2 == 0 else BAD)[t % 6]
        ratings = {"ann": {"sentiment": "pos" if t % 2 == 0 else "neg"}, "bob": {"sentiment": "pos"}}
        out.append(Example(str(t), {"text": " ".join([word] * (5 + 3 * t))}, ratings))
    return out


def _grads(tiny_model_dir, tokenizer, micro: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = attach_lora(load_model(str(tiny_model_dir), "none", torch.device("cpu")),
                        TrainConfig(lora_dropout=0.0), None)
    for name, p in model.named_parameters():
        if p.requires_grad and "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)  # B starts at zero: make A's gradients non-trivial
    rubric = parse_label_config(CONFIG)
    cfg = TrainConfig(micro_batch_size=micro, augment=False, token_dropout=0.0)
    builder = PromptBuilder(tokenizer, rubric, 256)
    batch = _examples()
    encoded = [_encode(builder, ex, cfg, random.Random(0), set()) for ex in batch]
    candidates = [s.token_ids for s in builder.spaces]
    _accumulate(model, tokenizer, rubric, batch, encoded, candidates, cfg, torch.device("cpu"))
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_micro_batches_give_the_whole_batch_gradient(tiny_model_dir, tokenizer) -> None:
    whole = _grads(tiny_model_dir, tokenizer, micro=6)
    split = _grads(tiny_model_dir, tokenizer, micro=1)
    assert whole.keys() == split.keys() and whole
    for name in whole:
        assert torch.allclose(whole[name], split[name], atol=1e-6, rtol=1e-4), name
    assert any(g.abs().sum() > 0 for g in whole.values())


def test_lora_layers_adapts_only_the_top_layers(tiny_model_dir) -> None:
    model = load_model(str(tiny_model_dir), "none", torch.device("cpu"))  # 2 decoder layers
    peft_model = attach_lora(model, TrainConfig(lora_layers=1), None)
    adapted = {n.split(".layers.")[1].split(".")[0] for n, _ in peft_model.named_parameters() if "lora_A" in n}
    assert adapted == {"1"}


ORDINAL = parse_label_config("""<View><Text name="text" value="$text"/>
<Choices name="q" toName="text"><Choice value="1"/><Choice value="2"/><Choice value="3"/></Choices>
<Choices name="kind" toName="text"><Choice value="a"/><Choice value="b"/></Choices></View>""")


def test_majority_breaks_ties_toward_the_raters_mean_on_ordered_scales() -> None:
    ex = Example("t", {"text": "x"}, {"r1": {"q": "1", "kind": "b"}, "r2": {"q": "3", "kind": "a"},
                                      "r3": {"q": "3", "kind": "b"}, "r4": {"q": "1"}})
    [maj] = relabel([ex], ORDINAL, "majority")
    assert maj.ratings == {"majority": {"q": "1", "kind": "b"}}  # 1 and 3 tie (mean 2): the lower one
    tie = Example("u", {"text": "x"}, {"r1": {"q": "2"}, "r2": {"q": "3"}, "r3": {"q": "3"}, "r4": {"q": "2"},
                                       "r5": {"q": "1"}})
    assert relabel([tie], ORDINAL, "majority")[0].ratings["majority"]["q"] == "2"  # mean 2.2: 2 beats 3
    assert relabel([tie], ORDINAL, "majority")[0].targets(ORDINAL)[0] == [0.0, 1.0, 0.0]
    nominal = Example("v", {"text": "x"}, {"r1": {"kind": "b"}, "r2": {"kind": "a"}})
    assert relabel([nominal], ORDINAL, "majority")[0].ratings["majority"] == {"kind": "a"}  # first in the scale


def test_per_rater_repeats_the_task_once_per_rater_and_soft_keeps_the_distribution() -> None:
    ex = Example("t", {"text": "x"}, {"r1": {"q": "1"}, "r2": {"q": "3"}, "r3": {"q": "3"}})
    per = relabel([ex], ORDINAL, "per_rater")
    assert [e.task_key for e in per] == ["t#r1", "t#r2", "t#r3"]
    assert [e.targets(ORDINAL)[0] for e in per] == [[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 1.0]]
    [soft] = relabel([ex], ORDINAL, "soft")
    assert soft.targets(ORDINAL)[0] == [pytest.approx(1 / 3), 0.0, pytest.approx(2 / 3)]
    with pytest.raises(ValueError, match="label mode"):
        relabel([ex], ORDINAL, "mean")


def _toy_examples(n: int) -> list[Example]:
    rng = random.Random(1)
    out = []
    for t in range(n):
        positive = t % 2 == 0
        word = rng.choice(GOOD if positive else BAD)
        value = "pos" if positive else "neg"
        out.append(Example(str(t), {"text": " ".join([word] * 20)}, {"ann": {"sentiment": value}}))
    return out


@pytest.mark.slow  # trains for several epochs
def test_early_stopping_keeps_the_best_epoch(tiny_model_dir, tokenizer) -> None:
    rubric = parse_label_config(CONFIG)
    examples = _toy_examples(40)
    # A learning rate this high overshoots after the first epochs: validation loss turns up, training stops.
    cfg = TrainConfig(epochs=12, lr=0.2, batch_size=4, val_fraction=0.25, patience=2, augment=False,
                      token_dropout=0.0, lora_r=4, warmup_fraction=0.0, lora_dropout=0.0)
    model = load_model(str(tiny_model_dir), "none", torch.device("cpu"))
    peft_model, stats = train_adapter(model, tokenizer, rubric, examples, cfg, torch.device("cpu"))
    assert stats.best_epoch is not None and len(stats.val_losses) < cfg.epochs, stats.val_losses  # it stopped
    assert stats.val_losses[stats.best_epoch - 1] == min(stats.val_losses)
    assert len(stats.val_losses) <= stats.best_epoch + cfg.patience  # stopped after `patience` bad epochs
    # The model handed back is the best epoch's, not the last one's.
    train, val = _validation_split(examples, cfg)
    assert 8 <= len(val) <= 12 and not {e.task_key for e in train} & {e.task_key for e in val}
    builder = PromptBuilder(tokenizer, rubric, cfg.max_tokens)
    weights = class_weights(relabel(train, rubric, cfg.label_mode), rubric, cfg.class_balance)
    final = validation_loss(peft_model, tokenizer, rubric, val, [builder.encode(e.data) for e in val],
                            [s.token_ids for s in builder.spaces], cfg, torch.device("cpu"), weights)
    assert final == pytest.approx(min(stats.val_losses), rel=1e-4, abs=1e-5)
    assert stats.steps == len(stats.val_losses) * 8  # 30 training tasks / batch 4 -> 8 steps an epoch


def test_too_few_tasks_train_every_epoch_without_a_validation_split(tiny_model_dir, tokenizer) -> None:
    cfg = TrainConfig(epochs=2, batch_size=4, val_fraction=0.2, augment=False, token_dropout=0.0, lora_r=4)
    model = load_model(str(tiny_model_dir), "none", torch.device("cpu"))
    _, stats = train_adapter(model, tokenizer, parse_label_config(CONFIG), _toy_examples(10), cfg,
                             torch.device("cpu"))
    assert stats.val_losses == [] and stats.best_epoch is None and stats.steps == 2 * 3
