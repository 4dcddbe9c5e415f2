"""Child processes that die with their parent, and a bounded stop: `serve` leaves nothing behind (issue 17)."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable

log = logging.getLogger(__name__)
PR_SET_PDEATHSIG = 1
# Resolved before any fork: a child between fork and exec should not dlopen (another thread may hold its lock).
_PRCTL = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None


def die_with_parent(sig: int = signal.SIGKILL) -> Callable[[], None] | None:
    """A Popen preexec_fn: the child gets `sig` when this process dies, even by SIGKILL (Linux; None elsewhere).

    The check after prctl covers a parent that died in between: the child would otherwise outlive it.
    """
    if _PRCTL is None:
        return None
    parent = os.getpid()

    def preexec() -> None:
        _PRCTL(PR_SET_PDEATHSIG, sig)
        if os.getppid() != parent:
            os._exit(1)

    return preexec


def tie_forks_to_this_process() -> None:
    """Every child this process forks from now on (RQ's work horse and scheduler) dies with it by SIGKILL.

    RQ's scheduler is a forked process that outlived a SIGKILLed worker; the horse already had die_with_worker.
    """
    if _PRCTL is None:
        return
    parent = os.getpid()

    def child() -> None:
        if os.getppid() == parent:  # forks of forks (a horse's own helpers) are left to their parent
            _PRCTL(PR_SET_PDEATHSIG, signal.SIGKILL)
            if os.getppid() != parent:
                os._exit(1)

    os.register_at_fork(after_in_child=child)


def signal_all(procs: list[subprocess.Popen[bytes]], sig: int) -> None:
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)


def wait_all(procs: list[subprocess.Popen[bytes]], timeout: float) -> list[subprocess.Popen[bytes]]:
    """Waits up to `timeout` seconds in all; returns those still running."""
    deadline = time.monotonic() + timeout
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    return [p for p in procs if p.poll() is None]


class WorkerGroup:
    """serve's RQ workers, stopped in bounded time: SIGTERM (warm: a job of seconds, e.g. a head, finishes), again
    after `warm_s` (cold: RQ kills the work horse, the run is recorded interrupted and RQ retries the job later),
    SIGKILL after `cold_s` more. A training of hours is not waited for."""

    def __init__(self, procs: list[subprocess.Popen[bytes]], warm_s: float, cold_s: float) -> None:
        self.procs, self.warm_s, self.cold_s = procs, warm_s, cold_s
        self._warm_since: float | None = None

    def begin_stop(self) -> None:
        """The warm SIGTERM, once: sent as soon as serve is told to stop, while gunicorn drains its requests."""
        if self._warm_since is None:
            self._warm_since = time.monotonic()
            signal_all(self.procs, signal.SIGTERM)

    def stop(self) -> None:
        self.begin_stop()
        assert self._warm_since is not None
        left = wait_all(self.procs, max(0.0, self._warm_since + self.warm_s - time.monotonic()))
        if left:
            log.warning("%d worker(s) still busy %.0f s after SIGTERM: cold shutdown (their jobs are retried later)",
                        len(left), self.warm_s)
            signal_all(left, signal.SIGTERM)
            left = wait_all(left, self.cold_s)
        signal_all(left, signal.SIGKILL)
        wait_all(left, 10.0)
