"""Training-step mechanics on the tiny model: micro-batching and layer-limited LoRA change cost, not maths."""

from __future__ import annotations

import random

import torch

from model.dataset import Example
from model.loader import load_model
from model.prompt import PromptBuilder
from model.rubric import parse_label_config
from model.training import TrainConfig, _accumulate, _encode, attach_lora
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
