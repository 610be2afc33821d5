"""How a run stops: one design for one process and for worker processes (README: Shutdown and signals).

- The first SIGINT or SIGTERM means *drain*: sources stop, everything already accepted is processed
  and published, every camera gets its `end` message, and the run exits 0 within
  `runtime.shutdown_deadline_s` (1 if that deadline passed with frames still in flight).
- A second one means *stop now*: exit 130 at once (a supervisor kills its workers first).
- The handlers are installed before anything slow (config, model, engine), and every wait (for
  the model, for subscribers, for slots, credits and queues) ends when a stop comes.
- Worker processes ignore SIGINT and SIGTERM (the terminal's Ctrl-C reaches the whole process
  group, systemd signals the whole control group: a worker would take the supervisor's own order as
  a second signal) and take orders only from their supervisor, over a pipe on their stdin:
  `go N` (every worker is ready and N subscribers are connected: start), `stop` (drain). End of file on that pipe means the
  supervisor is gone (killed, OOM): nobody can receive what the worker publishes, so it exits at once.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import sys
import threading
import time
from typing import Callable

log = logging.getLogger("pipeline")

EXIT_STOPPED_NOW = 130  # the second signal: like a shell's 128 + SIGINT


def exit_now(code: int) -> None:
    """Leave at once, without waiting for any thread (the *stop now* path)."""
    logging.shutdown()  # flush what was logged
    sys.stderr.flush()
    os._exit(code)


class StopSignals:
    """SIGINT/SIGTERM handlers: the first sets `stop_requested`, the second runs `on_second` (a
    supervisor kills its workers there) and exits 130."""

    def __init__(self, stop_requested: threading.Event):
        self.stop_requested = stop_requested
        self.on_second: Callable[[], None] | None = None

    def install(self) -> "StopSignals":
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, _frame) -> None:
        name = signal.Signals(signum).name
        if self.stop_requested.is_set():
            log.warning("second %s: stopping now", name)
            if self.on_second is not None:
                self.on_second()
            exit_now(EXIT_STOPPED_NOW)
        log.info("%s: stopping sources, draining what is in flight (a second signal stops at once)", name)
        self.stop_requested.set()


class SupervisorChannel:
    """A worker's end of its supervisor's pipe (the worker's stdin); see the module docstring."""

    def __init__(self, stop_requested: threading.Event, fd: int = 0):
        self.stop_requested = stop_requested
        self.go = threading.Event()
        self.subscribers = 0  # how many the supervisor saw at its endpoint when it said go
        self._fd = fd
        self._thread = threading.Thread(target=self._read, name="supervisor-channel", daemon=True)

    def start(self) -> "SupervisorChannel":
        # the terminal's and systemd's signals reach the workers too: orders come from the supervisor only
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # the supervisor re-reads the config and tells the workers
        # a worker that goes silent gets SIGUSR1 from its supervisor: every thread's stack goes to the log
        # (written from the signal handler in C, so it comes even while a thread holds the GIL)
        faulthandler.register(signal.SIGUSR1, all_threads=True)
        self._thread.start()
        return self

    def _lines(self):
        # os.read, not sys.stdin: a daemon thread blocked inside a buffered reader holds its lock,
        # and the interpreter aborts at exit when it cannot take it
        pending = b""
        while chunk := os.read(self._fd, 4096):
            pending += chunk
            *lines, pending = pending.split(b"\n")
            yield from lines

    def _read(self) -> None:
        for line in self._lines():
            word, _, argument = line.decode(errors="replace").strip().partition(" ")
            if word == "go":
                self.subscribers = int(argument or 0)
                self.go.set()
            elif word == "stop":
                log.info("supervisor: stopping sources, draining what is in flight")
                self.stop_requested.set()
        log.warning("supervisor gone: stopping now")
        exit_now(EXIT_STOPPED_NOW)

    def wait_go(self) -> bool:
        """Wait for the supervisor's go (or a stop); True when it said go."""
        while not self.go.wait(0.1):
            if self.stop_requested.is_set():
                return False
        return True


def load_interruptibly(build: Callable[[], object], stop_requested: threading.Event, deadline_s: float):
    """Run `build` (the model load and engine build: seconds, or minutes for a TensorRT plan, inside C
    code no signal handler can interrupt) in a helper thread, so that the main thread stays free to
    handle signals: a second signal stops the run at once. After a first one, the build gets the
    shutdown deadline to finish (a TensorRT plan being written, say); past it the run exits 0:
    nothing was accepted yet, so nothing was lost. Returns what `build` returned, or raises what
    it raised."""
    box: dict = {}

    def target() -> None:
        try:
            box["value"] = build()
        except BaseException as exc:  # handed to the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=target, name="load", daemon=True)
    thread.start()
    stopped_at = None
    while thread.is_alive():
        thread.join(0.1)
        if stop_requested.is_set() and stopped_at is None:
            stopped_at = time.monotonic()
        if stopped_at is not None and time.monotonic() - stopped_at > deadline_s and thread.is_alive():
            log.info("stopped while loading the model (still loading after the shutdown deadline, %.1f s): "
                     "nothing was accepted yet", deadline_s)
            exit_now(0)
    if "error" in box:
        raise box["error"]
    return box["value"]
