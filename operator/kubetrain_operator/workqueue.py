"""A coalescing work queue of run keys, in the manner of client-go's workqueue.

Watch events only say "look at this run again"; many of them (a run's status patch, its
nine pods starting) collapse into one pending key, and a key is never handled by two
workers at once: one added while it is being handled is handed out again afterwards.
`add_after` schedules a key (the resync of an active run, a TTL, a retry after an error);
only its earliest time is kept. `pause` holds the keys back (a standby replica).
"""

from __future__ import annotations

import heapq
import threading
import time
from collections import deque
from collections.abc import Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


class WorkQueue(Generic[K]):
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._ready: deque[K] = deque()
        self._queued: set[K] = set()  # in _ready, or waiting for its worker to finish
        self._processing: set[K] = set()
        self._due: dict[K, float] = {}  # key -> earliest monotonic time it is wanted
        self._heap: list[tuple[float, int, K]] = []  # lazily pruned against _due
        self._seq = 0  # tie-breaker: keys need not be ordered
        self._paused = False
        self._closed = False

    def __len__(self) -> int:
        with self._cond:
            return len(self._queued) + len(self._due)

    def add(self, key: K) -> None:
        with self._cond:
            self._add(key)

    def _add(self, key: K) -> None:
        if self._closed or key in self._queued:
            return
        self._queued.add(key)
        if key not in self._processing:  # else done() hands it out again
            self._ready.append(key)
            self._cond.notify()

    def add_after(self, key: K, delay: float) -> None:
        if delay <= 0:
            self.add(key)
            return
        with self._cond:
            due = time.monotonic() + delay
            if self._closed or self._due.get(key, float("inf")) <= due:
                return
            self._due[key] = due
            self._seq += 1
            heapq.heappush(self._heap, (due, self._seq, key))
            self._cond.notify()

    def get(self) -> K | None:
        """The next key to handle (blocks); None once the queue is closed. Call done(key)
        when finished with it."""
        with self._cond:
            while True:
                if self._closed:
                    return None
                now = time.monotonic()
                self._promote(now)
                if self._ready and not self._paused:
                    key = self._ready.popleft()
                    self._queued.discard(key)
                    self._processing.add(key)
                    return key
                wait = self._heap[0][0] - now if self._heap else None
                self._cond.wait(timeout=wait)

    def _promote(self, now: float) -> None:
        while self._heap and self._heap[0][0] <= now:
            due, _, key = heapq.heappop(self._heap)
            if self._due.get(key) == due:
                del self._due[key]
                self._add(key)

    def done(self, key: K) -> None:
        with self._cond:
            self._processing.discard(key)
            if key in self._queued:  # added again while it was handled
                self._ready.append(key)
                self._cond.notify()

    def pause(self) -> None:
        with self._cond:
            self._paused = True

    def resume(self) -> None:
        with self._cond:
            self._paused = False
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
