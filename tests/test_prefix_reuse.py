"""Shared-prefix KV reuse (model/prefix.py) gives the plain one-pass path's distributions, and engages only
where the rule says it pays."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from slm_annotator.model.loader import load_base
from slm_annotator.model.prefix import PrefixCache, model_state, reuse_supported
from slm_annotator.model.prompt import Encoded, PromptBuilder
from slm_annotator.model.scorer import Scorer, causal_lm_of
from tests.toy import QA_RUBRIC as RUBRIC

WORDS = ("the", "match", "went", "on", "and", "the", "home", "side", "scored", "twice", "before", "half", "time",
         "while", "fans", "sang")


def tasks(n: int, words: int) -> list[dict[str, str]]:
    """Tasks of different lengths: task i has about words * (i + 1) / n words of answer."""
    return [
        {"question": f"How was game {i}?", "answer": " ".join(WORDS[(i + j) % len(WORDS)]
                                                             for j in range(max(1, words * (i + 1) // n)))}
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def plain_model(tiny_model_dir: Path):
    return load_base(str(tiny_model_dir), tiny_model_dir.parent, "none", "cpu")


@pytest.fixture(scope="module")
def lora_model(tiny_model_dir: Path):
    """Two LoRA adapters with random (non-zero) B matrices, so each changes the outputs."""
    from peft import LoraConfig, get_peft_model

    base = load_base(str(tiny_model_dir), tiny_model_dir.parent, "none", "cpu")
    torch.manual_seed(1)
    config = LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj"], init_lora_weights=False)
    model = get_peft_model(base.model, config, adapter_name="one")
    model.add_adapter("two", LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj"], init_lora_weights=False))
    model.set_adapter("one")
    model.eval()
    return model, base


def encode(tokenizer, template: int, datas: list[dict[str, str]]) -> tuple[list[Encoded], list[tuple[int, ...]]]:
    builder = PromptBuilder(tokenizer, RUBRIC, 1024, template)
    return builder.encode_many(datas), [s.token_ids for s in builder.spaces]


def score(model, tokenizer, encoded, cands, batch: int, reuse: bool, prefixes: PrefixCache | None = None):
    scorer = Scorer(model, tokenizer, torch.device("cpu"), batch, reuse=reuse, prefixes=prefixes)
    return scorer.distributions(encoded, cands), scorer.stats


def assert_close(a, b, atol: float = 1e-4) -> None:
    for task_a, task_b in zip(a, b, strict=True):
        for da, db in zip(task_a, task_b, strict=True):
            assert torch.allclose(da, db, atol=atol), (da, db)


def test_rubric_first_reuses_and_equals_plain(plain_model, tokenizer) -> None:
    encoded, cands = encode(tokenizer, 1, tasks(7, 40))
    assert len({len(e.input_ids) for e in encoded}) > 3  # different lengths: right padding in the suffix pass
    plain, plain_stats = score(plain_model.model, tokenizer, encoded, cands, 4, reuse=False)
    reused, stats = score(plain_model.model, tokenizer, encoded, cands, 4, reuse=True)
    assert_close(plain, reused)
    assert plain_stats.reuse_batches == 0 and stats.plain_batches == 0
    assert stats.reuse_batches == 2 and stats.prefix_runs == 1  # the second batch hits the first one's prefix
    assert stats.prefix_tokens >= 32
    assert stats.batch_tokens + stats.prefix_tokens < plain_stats.batch_tokens


def test_lora_adapter_reuse_equals_plain(lora_model, tokenizer) -> None:
    model, _ = lora_model
    encoded, cands = encode(tokenizer, 1, tasks(6, 60))
    plain, _ = score(model, tokenizer, encoded, cands, 3, reuse=False)
    reused, stats = score(model, tokenizer, encoded, cands, 3, reuse=True)
    assert stats.reuse_batches == 2
    assert_close(plain, reused)


def test_short_shared_prefix_is_not_reused(plain_model, tokenizer) -> None:
    """Template 0 (texts first) shares only the chat header and hint: with long texts that is under the rule's
    share, so the plain path runs, and the result is the plain one."""
    encoded, cands = encode(tokenizer, 0, tasks(5, 400))
    plain, _ = score(plain_model.model, tokenizer, encoded, cands, 5, reuse=False)
    reused, stats = score(plain_model.model, tokenizer, encoded, cands, 5, reuse=True)
    assert stats.reuse_batches == 0 and stats.prefix_runs == 0 and stats.plain_batches == 1
    assert_close(plain, reused)


def test_adapter_switch_and_disable_never_reuse_a_stale_prefix(lora_model, tokenizer) -> None:
    """One cache across calls (as the server shares it): adapter one, then two, then adapters off, then one again."""
    model, _ = lora_model
    encoded, cands = encode(tokenizer, 1, tasks(4, 30))
    shared = PrefixCache()
    expected = {}
    for name in ("one", "two"):
        model.set_adapter(name)
        expected[name], _ = score(model, tokenizer, encoded, cands, 4, reuse=False)
        got, stats = score(model, tokenizer, encoded, cands, 4, reuse=True, prefixes=shared)
        assert stats.prefix_runs == 1  # two is another key: one's prefix is not reused
        assert_close(expected[name], got)
    assert not torch.allclose(expected["one"][0][0], expected["two"][0][0], atol=1e-4)
    with model.disable_adapter():
        off, _ = score(model, tokenizer, encoded, cands, 4, reuse=False)
        got, stats = score(model, tokenizer, encoded, cands, 4, reuse=True, prefixes=shared)
        assert stats.prefix_runs == 1
        assert_close(off, got)
    model.set_adapter("one")
    got, stats = score(model, tokenizer, encoded, cands, 4, reuse=True, prefixes=shared)
    assert stats.prefix_runs == 0 and stats.reuse_batches == 1  # one's prefix, cached by the first call
    assert_close(expected["one"], got)


def test_single_task_call_uses_a_prefix_cached_by_an_earlier_call(plain_model, tokenizer) -> None:
    encoded, cands = encode(tokenizer, 1, tasks(4, 30))
    shared = PrefixCache()
    score(plain_model.model, tokenizer, encoded, cands, 4, reuse=True, prefixes=shared)
    new, _ = encode(tokenizer, 1, [{"question": "Anything else?", "answer": "a late own goal"}])
    plain, _ = score(plain_model.model, tokenizer, new, cands, 1, reuse=False)
    alone, stats = score(plain_model.model, tokenizer, new, cands, 1, reuse=True)
    assert stats.reuse_batches == 0  # nothing to share within one task and nothing cached
    got, stats = score(plain_model.model, tokenizer, new, cands, 1, reuse=True, prefixes=shared)
    assert stats.reuse_batches == 1 and stats.prefix_runs == 0
    assert_close(plain, got)
    assert_close(plain, alone)


def test_model_state_follows_the_adapter_weights(lora_model) -> None:
    model, _ = lora_model
    lm = causal_lm_of(model)
    model.set_adapter("one")
    before = model_state(model, lm)
    model.set_adapter("two")
    assert model_state(model, lm) != before
    model.set_adapter("one")
    assert model_state(model, lm) == before
    with model.disable_adapter():
        assert model_state(model, lm) != before
    layer = next(m for m in model.modules() if hasattr(m, "lora_A") and "one" in m.lora_A)
    with torch.no_grad():
        layer.lora_A["one"].weight.add_(0.0)  # an in-place update (a training step) bumps the version
    assert model_state(model, lm) != before


def test_sliding_window_models_keep_the_plain_path(plain_model) -> None:
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, MistralConfig, MistralForCausalLM

    assert reuse_supported(causal_lm_of(plain_model.model))
    gemma = Gemma3ForCausalLM(Gemma3TextConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, sliding_window=8))
    assert not reuse_supported(gemma)
    mistral = MistralForCausalLM(MistralConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, sliding_window=8))
    assert not reuse_supported(mistral)
