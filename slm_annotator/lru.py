"""A small thread-safe LRU cache bounded by entries and by the characters of what it keeps.

The per-process caches of label configs and rubrics grew without end (1,200 /setup calls: a worker went from 519
to 1,890 MB RSS; issue 17): every cache here evicts the least recently used entry past either bound.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")
_MISSING = object()


class SizedLRU(Generic[K, V]):
    def __init__(self, max_entries: int, max_chars: int, size: Callable[[K, V], int]) -> None:
        self.max_entries, self.max_chars, self._size = max_entries, max_chars, size
        self._data: OrderedDict[K, tuple[V, int]] = OrderedDict()
        self._chars = 0
        self._lock = threading.Lock()

    def get(self, key: K, default: V | None = None) -> V | None:
        with self._lock:
            hit = self._data.get(key, _MISSING)
            if hit is _MISSING:
                return default
            self._data.move_to_end(key)
            return hit[0]  # type: ignore[index]

    def put(self, key: K, value: V) -> None:
        cost = self._size(key, value)
        with self._lock:
            old = self._data.pop(key, None)
            if old is not None:
                self._chars -= old[1]
            if cost > self.max_chars:
                return  # larger than the whole budget: not kept at all
            self._data[key] = (value, cost)
            self._chars += cost
            while len(self._data) > self.max_entries or self._chars > self.max_chars:
                _, (_, freed) = self._data.popitem(last=False)
                self._chars -= freed

    def __len__(self) -> int:
        return len(self._data)

    @property
    def chars(self) -> int:
        return self._chars
