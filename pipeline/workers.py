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
- it says go once every worker has said ready (engine loaded and warmed, lanes built; at most
  `runtime.start_timeout_s`) and the subscribers it counts at its endpoint (`publish.wait_subscribers`)
  are there, so all cameras start together; if a worker fails, the others are stopped and the run
  exits non-zero, naming the worker and its cameras; a worker still running well past the shutdown
  deadline is killed;
- it hears a beat from each ready worker (`WorkerReports`); one silent for `runtime.worker_silence_s`
  is named in a warning and sent SIGUSR1, which writes its threads' stacks into the log;
- it holds the publisher's CURVE keys (the proxy's front is the socket subscribers reach) and the
  control plane (pipeline/service.py, pipeline/cameras.py): /metrics merges every worker's, a new
  camera goes to the worker with the fewest, and SIGHUP is its alone (workers ignore it).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
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


def reports_endpoint(folder: str) -> str:
    return f"ipc://{folder}/reports.ipc"


READY_DELAY_VARIABLE = "VAPIPE_TEST_READY_DELAY"  # for tests only: "<worker>:<seconds>"


def ready_delay_for_tests(index: int) -> float:
    """For tests only: how long worker `index` waits before it says ready (VAPIPE_TEST_READY_DELAY=1:5
    makes worker 1 a slow starter, as a worker loading compiled artifacts on a starved host is)."""
    worker, _, seconds = os.environ.get(READY_DELAY_VARIABLE, "").partition(":")
    return float(seconds) if seconds and worker == str(index) else 0.0


class WorkerReports:
    """A worker's voice to its supervisor (ZeroMQ PUSH, one socket the supervisor pulls from): `ready`
    once its pipeline is built (engine loaded and warmed, lanes built, no source started), then a beat
    every `interval_s` from a thread of its own, so the supervisor notices a worker that goes silent.

    Pushed, not asked for over the control socket: the supervisor reads every worker's reports with
    one poll, and a silent worker costs it no timeout."""

    def __init__(self, endpoint: str, index: int, interval_s: float):
        self.index = index
        self.interval_s = interval_s
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.PUSH)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.SNDHWM, 16)  # beats are worth nothing late: a full queue drops them
        self.socket.connect(endpoint)
        self._lock = threading.Lock()  # the main thread says ready, the beat thread beats
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="worker-beat", daemon=True)

    def _send(self, kind: str) -> None:
        with self._lock:
            if self.socket.closed:
                return
            try:
                self.socket.send(json.dumps({"worker": self.index, "kind": kind}).encode(), zmq.NOBLOCK)
            except zmq.ZMQError:
                pass  # the supervisor is not reading (or gone: the stdin pipe's end of file says so)

    def ready(self) -> None:
        self._send("ready")
        self._thread.start()

    def _beat(self) -> None:
        while not self._closed.wait(self.interval_s):
            self._send("beat")

    def close(self) -> None:
        """Say done (the supervisor stops watching: interpreter exit is not silence) and close."""
        self._closed.set()
        self._send("done")
        with self._lock:
            self.socket.close(linger=500)  # time for "done" to leave (a local socket: far less is needed)
        self.context.term()


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


def cpu_thread_share(count: int) -> dict[str, str]:
    """Each worker's share of the host's cores for CPU thread pools (PyTorch's and OpenMP's, the model
    check's ONNX Runtime session), as torchrun does for its processes; a user's OMP_NUM_THREADS is
    kept. Without it, every one of 70 workers on a 64-core host sized its pools to all 64 cores
    while the workers loaded their engines together."""
    if "OMP_NUM_THREADS" in os.environ:
        return {}
    return {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // count))}


class Worker:
    """One worker process and the pipe it takes its orders from."""

    def __init__(self, index: int, count: int, config: Config, config_path: str, summary: Path, internal: str,
                 log_level: str | None):
        from pipeline.cameras import control_endpoint

        folder = str(summary.parent)
        command = [sys.executable, str(Path(__file__).resolve().parent.parent / "run.py"), "run", "--config", config_path,
                   "--worker", f"{index}/{count}", "--publish-connect", internal, "--summary-json", str(summary),
                   "--control", control_endpoint(folder, index), "--reports", reports_endpoint(folder)]
        if log_level:
            command += ["--log-level", log_level]
        self.index = index
        self.cameras = ", ".join(c.id for c in config.cameras[index::count])
        self.started = time.monotonic()
        # its own process group: the terminal's Ctrl-C (and Ctrl-Z) reach the supervisor only
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, process_group=0,
                                        env={**os.environ, "PYTHONUNBUFFERED": "1", **cpu_thread_share(count)})
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


class Heartbeats:
    """The supervisor's end of the workers' reports (`WorkerReports`): who is ready and when, and who
    has gone silent. A silent worker is named once in a warning and sent SIGUSR1, which makes it
    write every thread's stack into the log (pipeline/shutdown.py); it is not killed or restarted.
    It is watched from its ready on: before that, runtime.start_timeout_s bounds the wait for it."""

    def __init__(self, context: zmq.Context, endpoint: str, workers: list[Worker], silence_s: float):
        self.socket = context.socket(zmq.PULL)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind(endpoint)
        self.workers = workers
        self.silence_s = silence_s
        self.started = time.monotonic()
        self.ready_s: dict[int, float] = {}  # worker index -> seconds from its process start to its ready
        self.ready_at: dict[int, float] = {}  # worker index -> wall-clock time of its ready
        self.all_ready = False
        self.heard: dict[int, float] = {}  # worker index -> when it was last heard from (monotonic)
        self.silent: dict[int, dict] = {}  # worker index -> its silence, while it lasts
        self.silences: list[dict] = []  # every silence: worker, pid, cameras, seconds (None while it lasts)
        self.done: set[int] = set()  # workers that said they are done: their exit is not silence

    def read(self, now: float) -> None:
        """Take in what the workers said since the last call, without waiting."""
        while True:
            try:
                report = json.loads(self.socket.recv(zmq.NOBLOCK))
            except zmq.Again:
                break
            index = report["worker"]
            worker = self.workers[index]
            # a beat says ready too (beats start with the ready): a lost ready costs one beat, not the start
            if report["kind"] in ("ready", "beat") and index not in self.ready_s:
                self.ready_s[index] = now - worker.started
                self.ready_at[index] = time.time()
                log.info("worker %d ready after %.1f s", index, self.ready_s[index])
            if report["kind"] == "done":
                self.done.add(index)
            self.heard[index] = now
            silence = self.silent.pop(index, None)
            if silence is not None:
                silence["seconds"] = round(now - silence["since"], 3)
                log.warning("worker %d (pid %d) speaks again after %.1f s silent", index, worker.process.pid,
                            silence["seconds"])
        if not self.all_ready and self.settled():
            ready = [w.index for w in self.workers if w.index in self.ready_s]
            if ready:
                slowest = max(ready, key=self.ready_s.get)
                log.info("all %d workers ready in %.1f s (slowest: worker %d, %.1f s)", len(ready), now - self.started,
                         slowest, self.ready_s[slowest])
            self.all_ready = True

    def settled(self) -> bool:
        """Every worker has said ready (or has exited: the exit code decides what that means)."""
        return all(w.index in self.ready_s or w.process.poll() is not None for w in self.workers)

    def not_ready(self) -> list[Worker]:
        return [w for w in self.workers if w.index not in self.ready_s and w.process.poll() is None]

    def watch(self, now: float) -> None:
        """Name each running worker that has been silent for `silence_s`, once a silence."""
        for worker in self.workers:
            index = worker.index
            if index not in self.heard or index in self.silent or index in self.done or worker.process.poll() is not None:
                continue
            if now - self.heard[index] > self.silence_s:
                silence = {"worker": index, "pid": worker.process.pid, "cameras": worker.cameras,
                           "since": self.heard[index], "seconds": None}
                self.silent[index] = silence
                self.silences.append(silence)
                log.warning("worker %d (pid %d, cameras %s) silent for %.1f s (runtime.worker_silence_s): "
                            "its threads' stacks follow in the log (SIGUSR1); it is left running", index,
                            worker.process.pid, worker.cameras, now - self.heard[index])
                worker.process.send_signal(signal.SIGUSR1)

    def silence_counts(self) -> dict[int, int]:
        """For /metrics: how many times each worker went silent (every worker, 0s included)."""
        counts = {w.index: 0 for w in self.workers}
        for silence in self.silences:
            counts[silence["worker"]] += 1
        return counts

    def summary(self, go_at: float | None) -> dict:
        """For the run's summary: each worker's ready (seconds from its start, wall-clock time), when
        the go was said (wall clock), and every silence (seconds None: it never spoke again)."""
        return {"start": {"ready_s": {str(i): round(s, 3) for i, s in sorted(self.ready_s.items())},
                          "ready_at": {str(i): t for i, t in sorted(self.ready_at.items())}, "go_at": go_at},
                "silences": [{k: v for k, v in s.items() if k != "since"} for s in self.silences]}

    def close(self) -> None:
        self.socket.close(0)


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
    heartbeats = Heartbeats(proxy.front.context, reports_endpoint(folder), workers, config.runtime.worker_silence_s)
    if share := cpu_thread_share(count):
        log.info("workers: CPU thread pools of %s thread(s) each (the host's cores / workers; set "
                 "OMP_NUM_THREADS to choose)", share["OMP_NUM_THREADS"])
    for i in range(count):
        if stop_requested.is_set():  # stopped while starting workers: the rest are never started
            log.info("stopped while starting workers: %d of %d started", len(workers), count)
            break
        workers.append(Worker(i, count, config, config_path, summaries[i], internal_endpoint(folder), log_level))

    from pipeline.cameras import WorkerCameras, WorkerLink, control_endpoint
    from pipeline.service import start_control_plane

    links = [WorkerLink(proxy.front.context, control_endpoint(folder, w.index), w.index) for w in workers]
    placed = {camera.id: i for i in range(len(workers)) for camera in config.cameras[i::count]}
    cameras = WorkerCameras(config, links, placed, alive=lambda i: workers[i].process.poll() is None,
                            silences=heartbeats.silence_counts)
    service, server = start_control_plane(config, config_path, cameras)
    service.curve = proxy.curve
    try:
        return _watch(config, stop_requested, workers, proxy, heartbeats, summaries, summary_json, deadline_s)
    finally:
        heartbeats.close()
        service.close()
        if server is not None:
            server.stop()
        for link in links:
            link.close()


def _watch(config: Config, stop_requested: threading.Event, workers: list[Worker], proxy: Proxy,
           heartbeats: Heartbeats, summaries: list[Path], summary_json: str | None, deadline_s: float) -> int:
    wanted = config.publish.wait_subscribers
    said_go = False
    go_at = None
    # the wait for subscribers starts once the workers are ready, as one process's starts once its
    # engine is loaded: subscribers get publish.wait_timeout_s however long the workers took to load
    wait_until = None
    # the workers start together: a camera started while other workers still load its host's CPUs
    # builds a backlog (bench/results/load.md, 4 GPUs: p99 16.5 s in the first window)
    start_timeout_s = config.runtime.start_timeout_s
    start_until = time.monotonic() + start_timeout_s
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
        heartbeats.read(now)
        if kill_at is None:  # once told to stop, the workers' shutdown deadline and the kill below bound them
            heartbeats.watch(now)
        if not said_go:
            got = proxy.subscriptions
            stopped = stop_requested.is_set() or stopping
            ready = heartbeats.settled() or now >= start_until
            if ready and wait_until is None:
                wait_until = now + config.publish.wait_timeout_s
                if wanted and got < wanted:
                    log.info("publish: waiting for %d subscriber(s), up to %.1f s", wanted, config.publish.wait_timeout_s)
            if stopped or (ready and (got >= wanted or now >= wait_until)):
                late = heartbeats.not_ready()
                if late and not stopped:
                    # a camera system serves the cameras it can: one stuck worker does not hold back the rest
                    log.warning("%d of %d workers not ready after %.0f s (runtime.start_timeout_s): worker(s) %s; "
                                "starting the ready ones, the others start when they are ready", len(late),
                                len(workers), start_timeout_s, ", ".join(f"{w.index} (cameras {w.cameras})" for w in late))
                if got < wanted and not stopped:
                    log.warning("publish: %d of %d subscribers after %.1f s; starting anyway", got, wanted,
                                config.publish.wait_timeout_s)
                for worker in workers:
                    worker.tell(f"go {got}")
                said_go = True
                go_at = time.time()
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
        merged.update(heartbeats.summary(go_at))
        with open(summary_json, "w", encoding="utf-8") as handle:
            json.dump(merged, handle, indent=2, default=str)
    if failed:
        log.error("run failed: %s", "; ".join(failed.values()))
        codes = [w.process.returncode for w in workers if w.process.returncode and w.process.returncode > 0]
        return codes[0] if codes else 1
    return 0
