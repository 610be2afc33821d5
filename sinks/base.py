"""What every broker sink shares: a bounded buffer, a sender thread, reconnects with backoff, counted drops.

`offer` appends to the buffer and returns at once; when the buffer is full the oldest message is
dropped (and counted as `buffer_full`), so the freshest detections are the ones that wait for a
broker that comes back. The sender thread takes what is buffered, in order, and hands it to the
subclass's `send`; a `BrokerUnavailable` puts the batch back in front and waits out an exponential
backoff with jitter before it tries again. `close` gives the buffer until a deadline to leave and
counts what could not as `shutdown`.
"""

from __future__ import annotations

import collections
import logging
import random
import threading
import time

log = logging.getLogger("pipeline")

BATCH = 256  # messages a `send` call takes at most (one round trip for Redis)


class BrokerUnavailable(Exception):
    """The broker cannot be reached or refused the batch; nothing of the batch is known to have arrived."""


class BrokerSink:
    def __init__(self, name: str, url_shown: str, buffer: int, reconnect_base_s: float, reconnect_cap_s: float):
        self.name = name  # the config key, e.g. sinks[0].redis: what logs and the summary call it
        self.url_shown = url_shown  # without credentials
        self.capacity = buffer
        self.reconnect_base_s, self.reconnect_cap_s = reconnect_base_s, reconnect_cap_s
        self._buffer: collections.deque[tuple[str, bytes]] = collections.deque()
        self._ready = threading.Condition()
        self._closing = False  # close() was called: send what is left, then stop
        self._abandon = threading.Event()  # the close deadline passed: stop now
        self.state = "connecting"  # connecting, connected, reconnecting, closed
        self.sent = 0
        self.drops: collections.Counter[str] = collections.Counter()
        self.reconnects = 0
        self.last_error: str | None = None
        self._thread = threading.Thread(target=self._run, name=f"sink-{name}", daemon=True)

    # -- what subclasses implement ----------------------------------------------------------
    def connect(self) -> None:
        """Open the connection; raise BrokerUnavailable when the broker cannot be reached."""

    def send(self, batch: list[tuple[str, bytes]]) -> None:
        """Deliver (camera, message) pairs in order; raise BrokerUnavailable when they could not be."""
        raise NotImplementedError

    def disconnect(self) -> None:
        """Close the connection (after the last `send`)."""

    # -- the life cycle ---------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def offer(self, camera: str, message: bytes) -> None:
        """Queue one encoded message for `camera`'s stream or topic. Never blocks."""
        with self._ready:
            if self._closing:
                self.drops["closed"] += 1
                return
            if len(self._buffer) >= self.capacity:
                self._buffer.popleft()
                self.drops["buffer_full"] += 1
            self._buffer.append((camera, message))
            self._ready.notify()

    def _take(self) -> list[tuple[str, bytes]] | None:
        """The next batch (waiting for one); None once closing and empty."""
        with self._ready:
            while not self._buffer:
                if self._closing:
                    return None
                self._ready.wait(0.2)
            count = min(BATCH, len(self._buffer))
            return [self._buffer.popleft() for _ in range(count)]

    def _put_back(self, batch: list[tuple[str, bytes]]) -> None:
        with self._ready:
            room = self.capacity - len(self._buffer)
            if room < len(batch):  # newer messages arrived meanwhile: the oldest of the batch go
                self.drops["buffer_full"] += len(batch) - max(room, 0)
                batch = batch[len(batch) - max(room, 0):]
            self._buffer.extendleft(reversed(batch))

    def _run(self) -> None:
        failures = 0
        connected = False
        while not self._abandon.is_set():
            batch = self._take()
            if batch is None:
                break
            try:
                if not connected:
                    self.connect()
                    connected = True
                self.send(batch)
            except BrokerUnavailable as exc:
                self._put_back(batch)
                if connected or failures == 0:  # one line per outage, not one per attempt
                    log.warning("%s: %s unavailable (%s); buffering up to %d messages, retrying with backoff",
                                self.name, self.url_shown, exc, self.capacity)
                if connected:
                    self.reconnects += 1
                connected = False
                self.state = "reconnecting"
                self.last_error = str(exc)
                failures += 1
                delay = min(self.reconnect_cap_s, self.reconnect_base_s * 2 ** min(failures - 1, 30))
                self._abandon.wait(delay * random.uniform(0.5, 1.0))
                continue
            if failures:
                log.info("%s: %s reachable again; %d message(s) dropped so far", self.name, self.url_shown,
                         sum(self.drops.values()))
            failures = 0
            self.state = "connected"
            self.sent += len(batch)
        try:
            self.disconnect()
        except Exception:  # closing a broken connection: nothing left to lose
            pass

    def close(self, deadline_s: float) -> None:
        """Send what is buffered for up to `deadline_s`, then stop; what is left counts as `shutdown`."""
        with self._ready:
            self._closing = True
            self._ready.notify_all()
        if self._thread.is_alive():
            self._thread.join(deadline_s)
            self._abandon.set()
            self._thread.join(max(1.0, deadline_s))
        with self._ready:
            if self._buffer:
                self.drops["shutdown"] += len(self._buffer)
                log.warning("%s: %d message(s) not delivered before the shutdown deadline", self.name, len(self._buffer))
                self._buffer.clear()
        self.state = "closed"

    def snapshot(self) -> dict:
        with self._ready:
            buffered = len(self._buffer)
            drops = dict(self.drops)
        return {"url": self.url_shown, "state": self.state, "sent": self.sent, "buffered": buffered, "drops": drops,
                "reconnects": self.reconnects, "last_error": self.last_error}

    def status(self) -> str:
        return f"{self.name}={self.state}/s{self.sent}/d{sum(self.drops.values())}"
