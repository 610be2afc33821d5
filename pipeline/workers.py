"""Worker processes: one config, one set of topics, cameras spread over several processes.

One Python process runs out of interpreter time long before a GPU server runs out of decoders
or GPU (bench/results/load.md has the profile). With `runtime.workers: N` the `run` command
becomes a supervisor:

- it deals the cameras round-robin to N workers, each a full pipeline (`run.py run --worker i/N`
  on the same config) in its own process, with its own CUDA context; on a multi-GPU host
  `runtime.worker_devices` puts worker i on GPU `worker_devices[i % len]`;
- it binds `publish.bind` itself and runs a ZeroMQ proxy (XSUB <- workers, XPUB -> subscribers):
  subscribers see one endpoint and the usual `det/<camera>/` topics, and their subscriptions
  travel back to the workers (so `publish.wait_subscribers` works as in one process);
- it alone takes signals (pipeline/shutdown.py): workers run in their own process group and
  ignore SIGINT/SIGTERM, and get their orders over a pipe on their stdin (`go N`, `stop`); a
  first signal tells every worker started so far to drain (and starts no more), a second kills
  them; if the supervisor dies, the pipe's end of file makes every worker exit;
- it counts subscribers at its endpoint (`publish.wait_subscribers`), and says go once they are
  there; if a worker fails, the others are stopped and the run exits non-zero, naming the worker
  and its cameras; a worker still running well past the shutdown deadline is killed;
- it holds the publisher's CURVE keys (the proxy's front is the socket subscribers reach) and the
  control plane (pipeline/service.py, pipeline/cameras.py): /metrics merges every worker's, a new
  camera goes to the worker with the fewest, and SIGHUP is its alone (workers ignore it).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import zmq

from pipeline.config import Config
from pipeline.errors import PublishError
from pipeline.shutdown import StopSignals

log = logging.getLogger("pipeline")


def worker_config(config: Config, index: int, count: int) -> Config:
    """The part of `config` that worker `index` of `count` runs: its cameras and its GPU."""
    cameras = config.cameras[index::count]
    engine = config.engine
    devices = config.runtime.worker_devices
    if devices:
        engine = engine.model_copy(update={"device": devices[index % len(devices)]})
    runtime = config.runtime.model_copy(update={"workers": 0})
    return config.model_copy(update={"cameras": cameras, "engine": engine, "runtime": runtime})


def internal_endpoint(folder: str) -> str:
    return f"ipc://{folder}/publish.ipc"


class Proxy:
    """XSUB (workers connect their publishers) <-> XPUB (bound where subscribers expect it), in a thread.

    Its own loop rather than `zmq.proxy`: it counts the subscriptions at the one endpoint that
    subscribers see (a worker cannot: when it connects after them, XSUB hands it each topic only
    once), and when the workers are done it forwards what they sent last before it closes.
    """

    def __init__(self, context: zmq.Context, bind: str, internal: str, send_hwm: int, linger_s: float, curve=None):
        self.front = context.socket(zmq.XPUB)
        if curve is not None:
            curve.secure(self.front)
        self.front.setsockopt(zmq.SNDHWM, send_hwm)
        self.front.setsockopt(zmq.XPUB_VERBOSE, 1)
        self.front.setsockopt(zmq.LINGER, int(linger_s * 1000))  # honoured when the context is terminated
        self.back = context.socket(zmq.XSUB)
        self.back.setsockopt(zmq.RCVHWM, send_hwm)
        self.back.setsockopt(zmq.LINGER, 0)
        try:
            self.front.bind(bind)
        except zmq.ZMQError as exc:
            self.front.close(0)
            self.back.close(0)
            raise PublishError(f"publish.bind: cannot bind {bind}: {exc.strerror}") from None
        self.back.bind(internal)
        self.curve = curve
        self.subscriptions = 0  # subscription notices from subscribers (duplicates too)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="publish-proxy", daemon=True)

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.front, zmq.POLLIN)
        poller.register(self.back, zmq.POLLIN)
        while True:
            ready = dict(poller.poll(100))
            if self.back in ready:  # detections and previews from the workers
                self.front.send_multipart(self.back.recv_multipart(), flags=zmq.NOBLOCK)
            if self.front in ready:  # (un)subscriptions from subscribers, passed on to every worker
                message = self.front.recv_multipart()
                if message[0][:1] == b"\x01":
                    self.subscriptions += 1
                self.back.send_multipart(message)
            if not ready and self._stopping.is_set():
                return  # the workers have exited and what they sent last has been forwarded

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Call once the workers have exited: forward what is left, then close (the front lingers
        until the context is terminated). Idempotent."""
        if self.front.closed:
            return
        self._stopping.set()
        self._thread.join(timeout=10)
        self.front.close()
        self.back.close()


class Worker:
    """One worker process and the pipe it takes its orders from."""

    def __init__(self, index: int, count: int, config: Config, config_path: str, summary: Path, internal: str,
                 log_level: str | None):
        from pipeline.cameras import control_endpoint

        folder = str(summary.parent)
        command = [sys.executable, str(Path(__file__).resolve().parent.parent / "run.py"), "run", "--config", config_path,
                   "--worker", f"{index}/{count}", "--publish-connect", internal, "--summary-json", str(summary),
                   "--control", control_endpoint(folder, index)]
        if log_level:
            command += ["--log-level", log_level]
        self.index = index
        self.cameras = ", ".join(c.id for c in config.cameras[index::count])
        # its own process group: the terminal's Ctrl-C (and Ctrl-Z) reach the supervisor only
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, process_group=0,
                                        env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.told_stop = False
        log.info("worker %d/%d (pid %d, GPU %d): %s", index, count, self.process.pid,
                 worker_config(config, index, count).engine.device, self.cameras)

    def tell(self, order: str) -> None:
        if order == "stop":
            if self.told_stop:
                return
            self.told_stop = True
        try:
            self.process.stdin.write(f"{order}\n".encode())
            self.process.stdin.flush()
        except OSError:
            pass  # it has exited already

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()


def run_workers(config: Config, config_path: str, summary_json: str | None, log_level: str | None,
                stop_requested: threading.Event, signals: StopSignals) -> int:
    from stages.publish import bound_endpoint
    from stages.source import probe_files

    probe_files(config.cameras)  # an unreadable file stops the run before any worker starts (exit 2)
    folder = tempfile.mkdtemp(prefix="vapipe-")  # the workers' internal endpoint and their summaries
    context = zmq.Context()
    curve = None
    try:
        if config.publish.keys is not None:
            from pipeline.keys import CurveServer

            curve = CurveServer(context, config.publish.keys)
        proxy = Proxy(context, config.publish.bind, internal_endpoint(folder), config.publish.send_hwm,
                      config.runtime.shutdown_deadline_s, curve)
        proxy.start()
        log.info("publishing on %s", bound_endpoint(proxy.front))
        workers: list[Worker] = []
        try:
            return _supervise(config, config_path, summary_json, log_level, stop_requested, signals, folder, proxy,
                              workers)
        except BaseException:  # a bug, or a worker that cannot be started: leave nothing running
            for worker in workers:
                worker.kill()
            raise
        finally:
            proxy.stop()  # forwards what the workers sent last
    finally:
        if curve is not None:
            curve.stop()
        context.term()  # the proxy's front lingers here: the last messages and `end`s reach subscribers
        shutil.rmtree(folder, ignore_errors=True)


def _supervise(config: Config, config_path: str, summary_json: str | None, log_level: str | None,
               stop_requested: threading.Event, signals: StopSignals, folder: str, proxy: Proxy,
               workers: list[Worker]) -> int:
    count = min(config.runtime.workers, len(config.cameras))
    deadline_s = config.runtime.shutdown_deadline_s

    def stop_now() -> None:  # the second signal: the workers too, and nothing left behind in /tmp
        for worker in workers:
            worker.kill()
        shutil.rmtree(folder, ignore_errors=True)

    signals.on_second = stop_now
    summaries = [Path(folder) / f"summary_{i}.json" for i in range(count)]
    for i in range(count):
        if stop_requested.is_set():  # stopped while starting workers: the rest are never started
            log.info("stopped while starting workers: %d of %d started", len(workers), count)
            break
        workers.append(Worker(i, count, config, config_path, summaries[i], internal_endpoint(folder), log_level))

    from pipeline.cameras import WorkerCameras, WorkerLink, control_endpoint
    from pipeline.service import start_control_plane

    links = [WorkerLink(proxy.front.context, control_endpoint(folder, w.index), w.index) for w in workers]
    placed = {camera.id: i for i in range(len(workers)) for camera in config.cameras[i::count]}
    cameras = WorkerCameras(config, links, placed, alive=lambda i: workers[i].process.poll() is None)
    service, server = start_control_plane(config, config_path, cameras)
    service.curve = proxy.curve
    try:
        return _watch(config, stop_requested, workers, proxy, summaries, summary_json, deadline_s)
    finally:
        service.close()
        if server is not None:
            server.stop()
        for link in links:
            link.close()


def _watch(config: Config, stop_requested: threading.Event, workers: list[Worker], proxy: Proxy, summaries: list[Path],
           summary_json: str | None, deadline_s: float) -> int:
    wanted = config.publish.wait_subscribers
    said_go = False
    if wanted:
        log.info("publish: waiting for %d subscriber(s), up to %.1f s", wanted, config.publish.wait_timeout_s)
    wait_until = time.monotonic() + config.publish.wait_timeout_s
    failed: dict[int, str] = {}  # worker index -> what went wrong, in the order they failed
    stopping = False
    # a worker drains within the deadline, then its publisher lingers as long again; beyond that
    # (and a margin for a slow machine's interpreter exit) it is stuck, and is killed
    kill_after = 2 * deadline_s + 10.0
    kill_at = None
    running = True
    while running:
        time.sleep(0.1)
        now = time.monotonic()
        running = any(w.process.poll() is None for w in workers)  # then one last look at every exit code
        if not said_go:
            got = proxy.subscriptions
            if got >= wanted or now >= wait_until or stop_requested.is_set() or stopping:
                if got < wanted and not (stop_requested.is_set() or stopping):
                    log.warning("publish: %d of %d subscribers after %.1f s; starting anyway", got, wanted,
                                config.publish.wait_timeout_s)
                for worker in workers:
                    worker.tell(f"go {got}")
                said_go = True
        for worker in workers:
            code = worker.process.poll()
            if code not in (None, 0) and worker.index not in failed:
                failed[worker.index] = f"worker {worker.index} (cameras {worker.cameras}) exited with {code}"
                if not (stopping or stop_requested.is_set()):
                    log.error("%s: stopping the other workers", failed[worker.index])
                    stopping = True
        if (stopping or stop_requested.is_set()) and kill_at is None:
            kill_at = now + kill_after
            for worker in workers:
                worker.tell("stop")
        if kill_at is not None and now > kill_at and running:
            for worker in workers:
                if worker.process.poll() is None:
                    log.error("worker %d (cameras %s) still running %.0f s after the stop: killed", worker.index,
                              worker.cameras, kill_after)
                    worker.kill()
            kill_at = float("inf")
    proxy.stop()  # before the summary: it reads the proxy's count
    if summary_json:
        merged = {"workers": []}
        for path in summaries:
            try:
                merged["workers"].append(json.loads(path.read_text()))
            except (OSError, ValueError):
                merged["workers"].append(None)
        merged["cameras"] = {k: v for w in merged["workers"] if w for k, v in w.get("cameras", {}).items()}
        merged["subscriptions"] = proxy.subscriptions
        with open(summary_json, "w", encoding="utf-8") as handle:
            json.dump(merged, handle, indent=2, default=str)
    if failed:
        log.error("run failed: %s", "; ".join(failed.values()))
        codes = [w.process.returncode for w in workers if w.process.returncode and w.process.returncode > 0]
        return codes[0] if codes else 1
    return 0
