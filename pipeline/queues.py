"""Bounded queues between stages, each with an explicit policy for when it is full.

- `block`: the producer waits (files: nothing is lost, back-pressure reaches the decoder).
- `drop_oldest`: the oldest item is discarded to make room (live cameras: latency stays bounded).
- `drop_newest`: the new item is discarded.
Drops are counted per reason by the caller's metrics. `close()` wakes every waiter; `get()`
returns `CLOSED` once the queue is closed and empty, which is how end of stream travels.

Every wait here can be ended by closing what is waited on: a producer's `put` into a closed
queue is refused, a closed `Credits` refuses `acquire`. That is how a stage that stops for good
releases the stages upstream of it, and how a run's teardown releases everything (`Aborted`).
"""

from __future__ import annotations

import collections
import threading
import time
from typing import Callable, Literal

Policy = Literal["block", "drop_oldest", "drop_newest"]


class _Closed:
    def __repr__(self) -> str:
        return "CLOSED"


CLOSED = _Closed()


class Aborted(Exception):
    """A stage's wait ended because what it waits on was closed for a teardown (the stage after it
    stopped for good, or the shutdown deadline passed): the stage stops quietly, and whoever raises
    it has counted the item in hand as dropped."""


class BoundedQueue:
    def __init__(self, maxsize: int, policy: Policy = "block", name: str = "", on_drop: Callable[[object], None] | None = None):
        if maxsize < 1:
            raise ValueError("maxsize must be >= 1")
        self.maxsize, self.policy, self.name = maxsize, policy, name
        self._items: collections.deque = collections.deque()
        self._lock = threading.Lock()
        self._not_empty = threading.Condition(self._lock)
        self._not_full = threading.Condition(self._lock)
        self._closed = False
        self._on_drop = on_drop
        self._listeners: list[Callable[[], None]] = []  # woken after each put and on close
        self.dropped = 0

    def put(self, item, timeout: float | None = None) -> bool:
        """Add an item; returns False when it was not added (dropped, closed or timed out)."""
        dropped = None
        with self._lock:
            if self._closed:
                return False
            if len(self._items) >= self.maxsize:
                if self.policy == "drop_newest":
                    self.dropped += 1
                    dropped = item
                elif self.policy == "drop_oldest":
                    dropped = self._items.popleft()
                    self.dropped += 1
                else:
                    deadline = None if timeout is None else time.monotonic() + timeout
                    while len(self._items) >= self.maxsize and not self._closed:
                        remaining = None if deadline is None else deadline - time.monotonic()
                        if remaining is not None and remaining <= 0:
                            return False
                        self._not_full.wait(remaining)
                    if self._closed:
                        return False
            if dropped is not item:
                self._items.append(item)
                self._not_empty.notify()
        if dropped is not None and self._on_drop is not None:
            self._on_drop(dropped)
        for listener in self._listeners:
            listener()
        return dropped is not item

    def get(self, timeout: float | None = None):
        """Next item, `CLOSED` when closed and drained, or None on timeout."""
        with self._lock:
            deadline = None if timeout is None else time.monotonic() + timeout
            while not self._items:
                if self._closed:
                    return CLOSED
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return None
                self._not_empty.wait(remaining)
            item = self._items.popleft()
            self._not_full.notify()
            return item

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._not_empty.notify_all()
            self._not_full.notify_all()
        for listener in self._listeners:
            listener()

    @property
    def closed(self) -> bool:
        return self._closed

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)


class Credits:
    """A bound on batches in flight from batching to the end of inference (live cameras).

    The batch stage takes a credit before it starts a batch and inference gives it back, so frames
    wait in the camera queues, where the oldest is dropped, instead of piling up between stages:
    a live frame's latency stays about two frame intervals plus `count` batches of processing.
    """

    def __init__(self, count: int):
        self.count = count
        self._semaphore = threading.BoundedSemaphore(count)
        self.closed = False

    def acquire(self, timeout: float | None = None) -> bool:
        """True once a credit is taken; False after `timeout` or once closed (check `closed`)."""
        if self.closed:
            return False
        return self._semaphore.acquire(timeout=timeout) and not self.closed

    def close(self) -> None:
        """Refuse every later `acquire` (teardown): the credits of batches lost in a failed stage never come back."""
        self.closed = True

    def release(self) -> None:
        self._semaphore.release()


class FanIn:
    """Round-robin reader over several queues (one per camera), for a stage that merges cameras.

    `get` never waits on one particular queue, so a camera that sends nothing never stalls the
    others. It returns `CLOSED` once every queue is closed and drained.
    """

    def __init__(self, queues: list[BoundedQueue]):
        self.queues = list(queues)
        self._ready = threading.Condition()
        self._next = 0
        self.ended = False  # `get` returned CLOSED: nothing can join any more
        for q in self.queues:
            q._listeners.append(self._wake)

    def add(self, queue: BoundedQueue) -> bool:
        """A camera joins while the run goes; False once the fan-in has ended (the run is ending)."""
        with self._ready:
            if self.ended:
                return False
            queue._listeners.append(self._wake)
            self.queues = [*self.queues, queue]  # a new list: `_try_get` may be walking the old one
            return True

    def remove(self, queue: BoundedQueue) -> None:
        """Forget a queue (a removed camera's, once closed and drained)."""
        with self._ready:
            self.queues = [q for q in self.queues if q is not queue]

    def close(self) -> None:
        for q in self.queues:
            q.close()

    @property
    def closed(self) -> bool:
        return all(q.closed for q in self.queues)

    def _wake(self) -> None:
        with self._ready:
            self._ready.notify_all()

    def _try_get(self):
        all_closed = True
        queues = self.queues
        n = len(queues)
        for step in range(n):
            q = queues[(self._next + step) % n]
            item = q.get(timeout=0)
            if item is CLOSED:
                continue
            all_closed = False
            if item is not None:
                self._next = (self._next + step + 1) % n
                return item
        return CLOSED if all_closed else None

    def get(self, timeout: float | None = None):
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._ready:
                item = self._try_get()
                if item is CLOSED:
                    self.ended = True
                if item is not None:
                    return item
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return None
                self._ready.wait(remaining if remaining is None else min(remaining, 0.1))
