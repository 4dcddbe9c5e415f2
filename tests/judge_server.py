"""`slm-annotator judge-serve` as a real process on the tiny test model: an OpenAI-compatible server to test against."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import requests


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def running_judge(model_dir: Path, folder: Path, api_key: str, model_name: str) -> Iterator[str]:
    """Yields the API base URL (…/v1) once the server answers; stops it afterwards."""
    port = free_port()
    env = {**os.environ, "BASE_MODEL": str(model_dir), "QUANTIZATION": "none", "DEVICE": "cpu",
           "MODEL_DIR": str(folder / "model_dir"), "JUDGE_SERVER_API_KEY": api_key, "LOG_LEVEL": "WARNING"}
    log = open(folder / "server.log", "wb")  # noqa: SIM115 (closed below, after the process)
    proc = subprocess.Popen([sys.executable, "-m", "slm_annotator.cli", "judge-serve", "--port", str(port),
                             "--model-name", model_name], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, (folder / "server.log").read_text()
            assert time.monotonic() < deadline, "judge-serve did not answer in 180 s"
            try:
                if requests.get(f"{url}/models", headers={"Authorization": f"Bearer {api_key}"}, timeout=30).ok:
                    break
            except requests.RequestException:  # not listening yet, or still busy loading on a loaded machine
                pass
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        log.close()
