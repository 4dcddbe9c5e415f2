"""Ensemble members on disk: one adapter version = member 0's adapter, plus members/<t>/ for each further member.

Member t is its own LoRA adapter, trained with seed + t on prompt template t, so the members differ in both
initialisation and wording (the AutoAnnotator's independent scorers). An adapter without a members/ folder is a
single scorer; asked for k votes it is read through k templates instead.
"""

from __future__ import annotations

import functools
from pathlib import Path

MEMBERS_DIR = "members"


def member_dir(adapter_dir: Path, member: int) -> Path:
    return adapter_dir if member == 0 else adapter_dir / MEMBERS_DIR / str(member)


@functools.lru_cache(maxsize=256)
def member_paths(adapter_dir: Path) -> tuple[Path, ...]:
    """Member 0 first; cached because a promoted adapter folder never changes (new versions get new folders)."""
    extra = adapter_dir / MEMBERS_DIR
    found = sorted((int(p.name), p) for p in extra.iterdir() if p.name.isdigit()) if extra.is_dir() else []
    return (adapter_dir, *(p for i, p in found if i > 0))


def member_of(trained: int, member: int) -> int:
    """Which of the `trained` adapters scores member `member`: its own, or member 0's when fewer were trained."""
    return member if member < trained else 0
