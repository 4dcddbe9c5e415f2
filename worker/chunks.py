"""The chunks of one bulk prediction run, shared by every worker that helps with it.

A run's tasks are cut into chunks once. Workers take them one at a time (a list move: each chunk goes to exactly
one worker) into a list of their own, and on finishing one they add its counts to the run's totals and drop it
from that list in one transaction, so every chunk is counted once. A worker killed mid-chunk leaves the chunk in
its list, and the run's owner hands it back once the dead worker's heartbeat key has expired; the dead owner's
claims in the store are then taken over (looked up in Label Studio before anything is written). Whatever happens
here, the store's claims (pushed_predictions) still allow one write per task and version.

`LocalChunks` is the same thing in memory, for a run with no Redis (`slm-annotator predict --inline`).
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from redis import Redis

STATS = ("done", "written", "skipped", "errors")
MAX_ERRORS = 100  # per-task errors kept (all are counted)
HEARTBEAT_S = 5.0  # a working owner refreshes its key this often (a thread: however long a chunk takes)...
ALIVE_TTL_S = 20  # ...and is taken for dead once it has not for this long: its chunk and claims are taken over
Task = dict[str, Any]


@dataclass
class Counts:
    """What one chunk came to."""

    done: int = 0
    written: int = 0
    skipped: int = 0
    errors: list[dict[str, Any]] = field(default_factory=list)

    def as_stats(self) -> dict[str, int]:
        return {"done": self.done, "written": self.written, "skipped": self.skipped, "errors": len(self.errors)}


class LocalChunks:
    """One process, no Redis: the whole run is this owner's."""

    def __init__(self) -> None:
        self._chunks: list[list[Task]] = []
        self._next = 0
        self._stats = dict.fromkeys(STATS, 0)
        self._errors: list[dict[str, Any]] = []
        self.total = 0

    def publish(self, tasks: list[Task], size: int) -> int:
        self._chunks = [tasks[i : i + size] for i in range(0, len(tasks), max(1, size))]
        self.total = len(tasks)
        return self.total

    def take(self, owner: str) -> tuple[int, list[Task]] | None:
        if self._next >= len(self._chunks):
            return None
        self._next += 1
        return self._next - 1, self._chunks[self._next - 1]

    def finish(self, owner: str, index: int, counts: Counts) -> None:
        for key, value in counts.as_stats().items():
            self._stats[key] += value
        self._errors += counts.errors[: MAX_ERRORS - len(self._errors)]

    def stats(self) -> dict[str, int]:
        return dict(self._stats)

    def errors(self) -> list[dict[str, Any]]:
        return list(self._errors)

    def owners(self) -> int:
        return 1

    def others_working(self, owner: str) -> bool:
        return False

    def dead(self) -> set[str]:
        return set()

    def todo(self) -> int:
        return len(self._chunks) - self._next

    @contextmanager
    def working(self, owner: str) -> Iterator[None]:
        yield

    def close(self) -> None:
        return None


class RedisChunks:
    """The run's chunks in Redis, under slm-annotator:bulk:<run id>:*, expiring `ttl` seconds after the last use."""

    def __init__(self, conn: Redis, run_id: str, ttl: int) -> None:
        self.conn, self.ttl = conn, max(60, int(ttl))
        self.base = f"slm-annotator:bulk:{run_id}"
        self.total = 0

    def _key(self, *parts: str) -> str:
        return ":".join((self.base, *parts))

    def publish(self, tasks: list[Task], size: int) -> int:
        """Cuts the tasks into chunks, once: a retried run finds its chunks (and its progress) where they were.
        Returns the run's total."""
        info = self._key("info")
        known = self.conn.hget(info, "total")
        if known is not None:
            self.total = int(known)
            return self.total
        chunks = [tasks[i : i + size] for i in range(0, len(tasks), max(1, size))]
        pipe = self.conn.pipeline(transaction=True)
        if chunks:
            pipe.hset(self._key("chunks"), mapping={str(i): json.dumps(c) for i, c in enumerate(chunks)})
            pipe.rpush(self._key("todo"), *range(len(chunks)))
        pipe.hset(self._key("stats"), mapping=dict.fromkeys(STATS, 0))
        pipe.hset(info, mapping={"total": len(tasks), "chunks": len(chunks)})
        for key in ("chunks", "todo", "stats", "info"):
            pipe.expire(self._key(key), self.ttl)
        pipe.execute()
        self.total = len(tasks)
        return self.total

    def take(self, owner: str) -> tuple[int, list[Task]] | None:
        """This owner's unfinished chunk (a retry after a crash), else the next one nobody took."""
        doing = self._key("doing", owner)
        index = self.conn.lindex(doing, 0)
        if index is None:
            index = self.conn.lmove(self._key("todo"), doing, "LEFT", "RIGHT")
            if index is None:
                return None
            self.conn.sadd(self._key("owners"), owner)
            for key in (doing, self._key("owners")):
                self.conn.expire(key, self.ttl)
        raw = self.conn.hget(self._key("chunks"), index)
        if raw is None:  # the run's data expired: nothing left to do
            self.conn.delete(doing)
            return None
        return int(index), json.loads(raw)

    def finish(self, owner: str, index: int, counts: Counts) -> None:
        pipe = self.conn.pipeline(transaction=True)
        for key, value in counts.as_stats().items():
            if value:
                pipe.hincrby(self._key("stats"), key, value)
        if counts.errors:
            pipe.rpush(self._key("errors"), *(json.dumps(e) for e in counts.errors))
            pipe.ltrim(self._key("errors"), 0, MAX_ERRORS - 1)
            pipe.expire(self._key("errors"), self.ttl)
        pipe.lrem(self._key("doing", owner), 1, index)
        for key in ("chunks", "todo", "stats", "info"):
            pipe.expire(self._key(key), self.ttl)
        pipe.execute()

    def stats(self) -> dict[str, int]:
        raw = self.conn.hgetall(self._key("stats"))
        return {k: int(raw.get(k.encode(), 0)) for k in STATS}

    def errors(self) -> list[dict[str, Any]]:
        return [json.loads(e) for e in self.conn.lrange(self._key("errors"), 0, MAX_ERRORS - 1)]

    def owners(self) -> int:
        return int(self.conn.scard(self._key("owners")) or 1)

    def others_working(self, owner: str) -> bool:
        """Whether another owner still holds a chunk; a dead one's (heartbeat expired) goes back to the queue."""
        busy = False
        for raw in self.conn.smembers(self._key("owners")):
            other = raw.decode()
            doing = self._key("doing", other)
            if other == owner or not self.conn.llen(doing):
                continue
            if self.conn.exists(self._key("alive", other)):
                busy = True
                continue
            self.conn.sadd(self._key("dead"), other)
            self.conn.expire(self._key("dead"), self.ttl)
            while self.conn.lmove(doing, self._key("todo"), "RIGHT", "LEFT") is not None:
                pass
        return busy

    def dead(self) -> set[str]:
        """Owners whose chunks were handed back: their claims are anyone's."""
        return {m.decode() for m in self.conn.smembers(self._key("dead"))}

    def todo(self) -> int:
        return int(self.conn.llen(self._key("todo")))

    @contextmanager
    def working(self, owner: str) -> Iterator[None]:
        """A heartbeat key while this owner works: it dies with the process, however the process dies."""
        key, stop = self._key("alive", owner), threading.Event()

        def beat() -> None:
            while True:
                with contextlib.suppress(Exception):  # a Redis blip: the next beat tries again
                    self.conn.set(key, 1, ex=ALIVE_TTL_S)
                if stop.wait(HEARTBEAT_S):
                    return

        thread = threading.Thread(target=beat, name=f"bulk-heartbeat-{owner}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(5)
            self.conn.delete(key)

    def close(self, keep_s: int = 3600) -> None:
        """The run is over: its task data go now, its counts stay a while (a late helper reads them and stops)."""
        self.conn.delete(self._key("chunks"), self._key("todo"))
        for key in ("stats", "info", "errors", "owners", "dead"):
            self.conn.expire(self._key(key), keep_s)
