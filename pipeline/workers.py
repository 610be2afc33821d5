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
- a signal is passed on to every worker, which drains and exits; if a worker fails, the others
  are stopped and the run exits non-zero, naming the worker and its cameras.
"""

from __future__ import annotations

import json
import logging
import os
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
    """XSUB (workers connect their publishers) <-> XPUB (bound where subscribers expect it)."""

    def __init__(self, bind: str, internal: str, send_hwm: int):
        context = zmq.Context.instance()
        self.front = context.socket(zmq.XPUB)
        self.front.setsockopt(zmq.SNDHWM, send_hwm)
        self.front.setsockopt(zmq.XPUB_VERBOSE, 1)
        self.back = context.socket(zmq.XSUB)
        self.back.setsockopt(zmq.RCVHWM, send_hwm)
        try:
            self.front.bind(bind)
        except zmq.ZMQError as exc:
            self.front.close(0)
            self.back.close(0)
            raise PublishError(f"publish.bind: cannot bind {bind}: {exc.strerror}") from None
        self.back.bind(internal)
        self.control_address = f"inproc://proxy-control-{id(self)}"
        self._control = context.socket(zmq.PAIR)
        self._control.bind(self.control_address)
        self._thread = threading.Thread(target=self._run, name="publish-proxy", daemon=True)

    def _run(self) -> None:
        control = zmq.Context.instance().socket(zmq.PAIR)
        control.connect(self.control_address)
        try:
            zmq.proxy_steerable(self.back, self.front, None, control)
        finally:
            control.close(0)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._control.send(b"TERMINATE")
        self._thread.join(timeout=5)
        for socket in (self._control, self.front, self.back):
            socket.close(linger=1000)


def run_workers(config: Config, config_path: str, summary_json: str | None, log_level: str | None) -> int:
    from stages.publish import bound_endpoint
    from stages.source import probe_files

    probe_files(config.cameras)  # an unreadable file stops the run before any worker starts (exit 2)
    count = min(config.runtime.workers, len(config.cameras))
    folder = tempfile.mkdtemp(prefix="vapipe-")
    internal = internal_endpoint(folder)
    proxy = Proxy(config.publish.bind, internal, config.publish.send_hwm)
    proxy.start()
    log.info("publishing on %s", bound_endpoint(proxy.front))
    stop_requested = threading.Event()
    processes: list[subprocess.Popen] = []

    def stop_workers() -> None:
        stop_requested.set()
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)

    def on_signal(signum, _frame):
        if stop_requested.is_set():
            log.warning("second %s: killing the workers", signal.Signals(signum).name)
            for process in processes:
                process.kill()
            return
        log.info("%s: stopping %d worker(s)", signal.Signals(signum).name, len(processes))
        stop_workers()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    summaries = [Path(folder) / f"summary_{i}.json" for i in range(count)]
    cameras = [", ".join(c.id for c in config.cameras[i::count]) for i in range(count)]
    for i in range(count):
        command = [sys.executable, str(Path(__file__).resolve().parent.parent / "run.py"), "run", "--config", config_path,
                   "--worker", f"{i}/{count}", "--publish-connect", internal, "--summary-json", str(summaries[i])]
        if log_level:
            command += ["--log-level", log_level]
        processes.append(subprocess.Popen(command, env={**os.environ, "PYTHONUNBUFFERED": "1"}))
        log.info("worker %d/%d (pid %d, GPU %d): %s", i, count, processes[-1].pid,
                 worker_config(config, i, count).engine.device, cameras[i])

    failed: dict[int, str] = {}  # worker index -> what went wrong, in the order they failed
    running = True
    while running:
        time.sleep(0.2)
        running = any(p.poll() is None for p in processes)  # then one last look at every exit code
        for i, process in enumerate(processes):
            code = process.poll()
            if code not in (None, 0) and i not in failed:
                failed[i] = f"worker {i} (cameras {cameras[i]}) exited with {code}"
                if not stop_requested.is_set():
                    log.error("%s: stopping the other workers", failed[i])
                    stop_workers()
    proxy.stop()
    if summary_json:
        merged = {"workers": []}
        for path in summaries:
            try:
                merged["workers"].append(json.loads(path.read_text()))
            except (OSError, ValueError):
                merged["workers"].append(None)
        merged["cameras"] = {k: v for w in merged["workers"] if w for k, v in w.get("cameras", {}).items()}
        with open(summary_json, "w", encoding="utf-8") as handle:
            json.dump(merged, handle, indent=2, default=str)
    for path in summaries:
        path.unlink(missing_ok=True)
    try:
        os.rmdir(folder)
    except OSError:
        pass
    if failed:
        log.error("run failed: %s", "; ".join(failed.values()))
        codes = [p.returncode for p in processes if p.returncode and p.returncode > 0]
        return codes[0] if codes else 1
    return 0
