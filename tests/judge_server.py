"""`slm-annotator judge-serve` as a real process on the tiny test model: an OpenAI-compatible server to test against."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from slm_annotator.testing import JudgeProcess


@contextlib.contextmanager
def running_judge(model_dir: Path, folder: Path, api_key: str, model_name: str) -> Iterator[str]:
    """Yields the API base URL (…/v1) once the server answers; stops it afterwards."""
    env = {**os.environ, "BASE_MODEL": str(model_dir), "QUANTIZATION": "none", "DEVICE": "cpu",
           "MODEL_DIR": str(folder / "model_dir"), "LOG_LEVEL": "WARNING"}
    with JudgeProcess(env, folder / "server.log", ("--model-name", model_name), api_key=api_key) as judge:
        yield judge.url
