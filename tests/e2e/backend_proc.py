"""Runs OUR backend for real, as `slm-annotator serve` in its own process group, for end-to-end tests.

    with BackendProcess(tmp_path / "model_dir", {"BASE_MODEL": "..."}) as backend:
        backend.get("/health")

`serve` starts gunicorn, an embedded redis-server under MODEL_DIR (daemonized, so it is NOT in the
process group) and an RQ worker subprocess. `stop()` sends SIGTERM to the whole group, escalates to
SIGKILL, then shuts the embedded redis down explicitly.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import requests

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

# Every variable slm_annotator.settings reads, plus what `serve` itself sets: an inherited one would
# silently change what the backend under test does (e.g. a REDIS_URL pointing at somebody's server).
SETTINGS_ENV = (
    "MODEL_DIR", "DATABASE_URL", "REDIS_URL", "BASE_MODEL", "QUANTIZATION", "DEVICE", "MAX_PROMPT_TOKENS",
    "PREDICT_BATCH_SIZE", "MAX_TASKS_PER_REQUEST", "MAX_BODY_BYTES", "MAX_LOADED_ADAPTERS", "BASIC_AUTH_USER",
    "BASIC_AUTH_PASS", "WEBHOOK_SECRET", "LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY", "TRAIN_THRESHOLD",
    "TRAIN_JOB_TIMEOUT", "TRAIN_RETRIES", "HELDOUT_FRACTION", "PROMOTION_TOLERANCE", "TRAIN_EPOCHS", "TRAIN_LR",
    "TRAIN_BATCH_SIZE", "LORA_R", "LORA_ALPHA", "LORA_DROPOUT", "LORA_TARGETS", "TOKEN_DROPOUT",
    "TOKEN_DROPOUT_SHARE", "SEED", "OUTBOUND_TIMEOUT", "LOG_LEVEL", "WORKERS", "THREADS", "PREDICT_QUEUE_LIMIT",
    "PROMETHEUS_MULTIPROC_DIR", "MODEL_LOAD_TIMEOUT", "MODEL_WAIT_TIMEOUT", "TRAIN_RETRY_DELAYS",
    "TRAIN_MICRO_BATCH", "TRAIN_CLASS_BALANCE", "TRAIN_ORDINAL_LOSS", "TRAIN_LABEL_MODE", "TRAIN_VAL_FRACTION",
    "TRAIN_PATIENCE", "LORA_LAYERS", "ENSEMBLE", "ROUTE", "ROUTE_EPSILON", "JUDGE_URL", "JUDGE_MODEL",
    "JUDGE_API_KEY", "JUDGE_TIMEOUT", "JUDGE_RETRIES", "JUDGE_BUDGET", "JUDGE_CONCURRENCY", "PRICE_JUDGE_INPUT",
    "PRICE_JUDGE_OUTPUT", "PRICE_SLM_HOUR", "PRICE_HUMAN_ITEM", "HARD_POOL_SIZE", "REPLAY_RATIO",
    "FORGETTING_TOLERANCE",
)


def slm_binary() -> Path:
    found = BIN / "slm-annotator"
    if not found.exists():
        raise RuntimeError(f"{found} missing: pip install -e {REPO} --no-deps")
    return found


def free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class BackendError(RuntimeError):
    pass


class BackendProcess:
    def __init__(
        self,
        model_dir: Path,
        env: dict[str, str] | None = None,
        port: int | None = None,
        startup_timeout: float = 180.0,
        serve_args: tuple[str, ...] = (),
        auth: tuple[str, str] | None = None,
    ) -> None:
        self.model_dir = Path(model_dir).resolve()
        self.serve_args = serve_args  # e.g. ("--no-worker",): a worker of its own, killed and restarted apart
        self.auth = auth  # BASIC_AUTH_USER/PASS of the backend, for /health and request()
        self.extra_env = dict(env or {})
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.startup_timeout = startup_timeout
        self.log_path = self.model_dir.parent / f"backend-{self.port}.log"
        self.proc: subprocess.Popen | None = None
        self.startup_seconds: float | None = None

    # ------------------------------------------------------------------ lifecycle
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in SETTINGS_ENV}
        env.update(
            {
                "MODEL_DIR": str(self.model_dir),
                "WORKERS": "1",
                "THREADS": "4",
                "LOG_LEVEL": "INFO",
                "PYTHONUNBUFFERED": "1",
                "TOKENIZERS_PARALLELISM": "false",
            }
        )
        env.update(self.extra_env)
        return env

    def start(self) -> BackendProcess:
        self.model_dir.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [str(slm_binary()), "serve", "--host", "127.0.0.1", "--port", str(self.port), *self.serve_args],
                env=self.env(),
                cwd=str(self.model_dir.parent),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # own process group: stop() reaches gunicorn workers and the RQ worker
            )
        deadline = t0 + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BackendError(f"slm-annotator serve exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                r = requests.get(self.url + "/health", timeout=2, auth=self.auth)
                if r.status_code == 200 and r.json().get("status") == "UP":
                    self.startup_seconds = time.monotonic() - t0
                    return self
            except (requests.RequestException, ValueError):
                pass
            time.sleep(0.3)
        raise BackendError(f"backend not healthy after {self.startup_timeout}s:\n{self.log_tail()}")

    def redis_socket(self) -> Path:
        return self.model_dir / "redis" / "redis.sock"

    def redis_pid(self) -> int | None:
        try:
            return int((self.model_dir / "redis" / "redis.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def stop_redis(self, timeout: float = 20.0) -> None:
        """The embedded redis daemonizes out of our process group: shut it down by its socket."""
        pid = self.redis_pid()
        if self.redis_socket().exists():
            from worker.redis_conn import stop_embedded

            stop_embedded(self.model_dir)
        if pid is None:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.1)
        if _alive(pid) and _is_redis(pid):  # never signal a recycled pid that is not our redis-server
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def stop(self, timeout: float = 60.0) -> int | None:
        code = None
        if self.proc is not None:
            if self.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGTERM)
                try:
                    self.proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(self.proc.pid, signal.SIGKILL)
                    self.proc.wait(timeout=10)
            code = self.proc.returncode
            # stragglers of the group (the RQ worker or its work horse) once the leader is gone
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc = None
        self.stop_redis()
        return code

    def __enter__(self) -> BackendProcess:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # ------------------------------------------------------------------ logs and HTTP
    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return "<no backend log>"

    def log_tail(self, n: int = 150) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    def request(self, method: str, path: str, expect: tuple[int, ...] = (200,), **kw: Any) -> Any:
        kw.setdefault("timeout", 60)
        kw.setdefault("auth", self.auth)
        # A fresh connection per call: gunicorn closes idle keep-alive connections after 2 s, and a reused
        # one can be closed just as the next request goes out ("Remote end closed connection").
        r = requests.request(method, self.url + path, headers={"Connection": "close"}, **kw)
        if r.status_code not in expect:
            raise BackendError(f"{method} {path} -> {r.status_code}: {r.text[:2000]}")
        return r.json() if r.content else None

    def get(self, path: str, **kw: Any) -> Any:
        return self.request("GET", path, **kw)

    def post(self, path: str, json: Any = None, **kw: Any) -> Any:
        return self.request("POST", path, json=json, **kw)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_redis(pid: int) -> bool:
    try:
        return b"redis-server" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
