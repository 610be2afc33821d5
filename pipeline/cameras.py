"""Cameras at run time: list, add and remove them while the others run, and SIGHUP's config reload.

`CameraService` is what the HTTP API (pipeline/service.py) and SIGHUP talk to. It runs every
change on one thread, in order, so two requests never edit the graph at once, and a signal
handler only queues work. Behind it sits one of two backends with the same methods:

- `LocalCameras`: the pipeline in this process (one process, or inside a worker);
- `WorkerCameras`: the supervisor's, which asks its workers over a control socket each
  (ZeroMQ REQ/REP on ipc:// in the supervisor's private folder, next to the publishing proxy's):
  a new camera goes to the worker with the fewest cameras, a removal to the worker that has it,
  and /metrics collects every worker's families. The workers' stdin pipe keeps its one job (go,
  stop, and its end of file when the supervisor dies, pipeline/shutdown.py); replies need a way
  back, which a pipe the other way would have to re-invent.

A change that cannot be made is a `ChangeRefused` with an HTTP status and one line: 400 for a body
the config's own pydantic models refuse (the same message as in a config file), 404 for a camera
that does not exist, 409 for a duplicate id or the last camera of a run.
"""

from __future__ import annotations

import json
import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import zmq

from pipeline.config import CameraConfig, Config, load_config, parse_camera
from pipeline.errors import PipelineError

log = logging.getLogger("pipeline")


class ChangeRefused(PipelineError):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def camera_entry(source) -> dict:
    """What GET /cameras says about one camera (its URL without credentials)."""
    snapshot = source.snapshot()
    return {"id": source.camera.id, "url": source.safe_url, "live": source.camera.is_live,
            "state": snapshot["state"], "frames": snapshot["frames"], "fps": round(source.fps(), 2),
            "reconnects": snapshot["reconnects"], "drops": snapshot["drops"], "last_error": snapshot["last_error"]}


class LocalCameras:
    """The cameras of the pipeline in this process; `pipeline` is None until the model has loaded."""

    def __init__(self, config: Config):
        self._config = config
        self.pipeline = None

    @property
    def config(self) -> Config:
        """The running config: the pipeline's, which follows the cameras added and removed."""
        return self.pipeline.config if self.pipeline is not None else self._config

    def ready(self) -> dict:
        pipeline = self.pipeline
        if pipeline is None:
            return {"ready": False, "model_loaded": False, "cameras_not_running": {}}
        waiting = {s.camera.id: s.state.value for s in pipeline.sources if s.state.value != "running"}
        return {"ready": True, "model_loaded": True, "cameras_not_running": waiting}

    def cameras(self) -> list[dict]:
        return [camera_entry(s) for s in self.pipeline.sources] if self.pipeline is not None else []

    def camera_configs(self) -> dict[str, CameraConfig]:
        return {c.id: c for c in self.config.cameras}

    def _running(self):
        if self.pipeline is None:
            raise ChangeRefused(503, "the model is still loading; try again when /readyz says ready")
        return self.pipeline

    def add(self, camera: CameraConfig) -> dict:
        pipeline = self._running()
        if camera.id in self.camera_configs():
            raise ChangeRefused(409, f"camera {camera.id}: a camera with this id exists already")
        try:
            return camera_entry(pipeline.add_camera(camera))
        except PipelineError as exc:
            raise ChangeRefused(400, str(exc)) from None

    def remove(self, camera_id: str) -> dict:
        pipeline = self._running()
        try:
            return pipeline.remove_camera(camera_id)
        except KeyError:
            raise ChangeRefused(404, f"camera {camera_id}: no such camera") from None
        except PipelineError as exc:
            raise ChangeRefused(409, str(exc)) from None

    def families(self, worker: int | None = None) -> list:
        from pipeline.exporter import pipeline_families

        return pipeline_families(self.pipeline, None if worker is None else {"worker": str(worker)})


# -- worker processes ---------------------------------------------------------------------------

def control_endpoint(folder: str, index: int) -> str:
    return f"ipc://{folder}/control-{index}.ipc"


class WorkerControl:
    """A worker's end: answers its supervisor's requests (JSON) about its `LocalCameras`, in a thread."""

    def __init__(self, endpoint: str, cameras: LocalCameras, index: int):
        self.cameras = cameras
        self.index = index
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.REP)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind(endpoint)
        self._thread = threading.Thread(target=self._serve, name="worker-control", daemon=True)
        self._thread.start()

    def _answer(self, request: dict) -> dict:
        op = request.get("op")
        try:
            if op == "ready":
                return {"ok": True, "result": self.cameras.ready()}
            if op == "cameras":
                return {"ok": True, "result": self.cameras.cameras()}
            if op == "metrics":
                return {"ok": True, "result": self.cameras.families(self.index)}
            if op == "add":
                return {"ok": True, "result": self.cameras.add(CameraConfig.model_validate(request["camera"]))}
            if op == "remove":
                return {"ok": True, "result": self.cameras.remove(request["id"])}
            return {"ok": False, "status": 400, "error": f"unknown request {op!r}"}
        except ChangeRefused as exc:
            return {"ok": False, "status": exc.status, "error": str(exc)}
        except Exception as exc:  # a bug: say so to the supervisor, keep serving
            log.exception("control request %s failed", op)
            return {"ok": False, "status": 500, "error": f"{type(exc).__name__}: {exc}"}

    def _serve(self) -> None:
        while True:
            try:
                request = json.loads(self.socket.recv())
                self.socket.send(json.dumps(self._answer(request), default=str).encode())
            except zmq.ZMQError:
                return  # closed at exit


class WorkerLink:
    """The supervisor's end of one worker's control socket."""

    def __init__(self, context: zmq.Context, endpoint: str, index: int):
        self.index = index
        self.socket = context.socket(zmq.REQ)
        # a worker that does not answer in time must not wedge the socket: the next request goes anyway
        self.socket.setsockopt(zmq.REQ_RELAXED, 1)
        self.socket.setsockopt(zmq.REQ_CORRELATE, 1)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(endpoint)
        self._lock = threading.Lock()  # the HTTP reads and the change thread share it

    def ask(self, request: dict, timeout_s: float) -> dict | None:
        """The worker's answer, or None when it did not answer within `timeout_s`."""
        with self._lock:
            if self.socket.closed:
                return None
            self.socket.send(json.dumps(request).encode())
            if not self.socket.poll(int(timeout_s * 1000)):
                return None
            return json.loads(self.socket.recv())

    def close(self) -> None:
        with self._lock:
            self.socket.close(0)


class WorkerCameras:
    """The supervisor's backend: cameras over its workers (`links[i]` is worker i's control socket)."""

    def __init__(self, config: Config, links: list[WorkerLink], placed: dict[str, int], alive, silences=dict):
        self.config = config
        self.silences = silences  # worker index -> how many times it went silent (workers.Heartbeats)
        self.links = links
        self.placed = dict(placed)  # camera id -> worker index
        self.configs = {c.id: c for c in config.cameras if c.id in placed}
        self.alive = alive  # worker index -> still running
        self.timeout_s = 2.0

    def _ask(self, index: int, request: dict, timeout_s: float | None = None):
        answer = self.links[index].ask(request, timeout_s or self.timeout_s)
        if answer is None:
            raise ChangeRefused(503, f"worker {index} did not answer")
        if not answer["ok"]:
            raise ChangeRefused(answer["status"], answer["error"])
        return answer["result"]

    def ready(self) -> dict:
        workers, waiting, loaded = {}, {}, True
        for link in self.links:
            answer = link.ask({"op": "ready"}, self.timeout_s) if self.alive(link.index) else None
            result = answer["result"] if answer and answer["ok"] else None
            workers[str(link.index)] = "up" if result and result["ready"] else ("loading" if result else "down")
            loaded = loaded and bool(result and result["model_loaded"])
            waiting.update((result or {}).get("cameras_not_running", {}))
        return {"ready": loaded and all(v == "up" for v in workers.values()), "model_loaded": loaded,
                "workers": workers, "cameras_not_running": waiting}

    def cameras(self) -> list[dict]:
        out = []
        for link in self.links:
            answer = link.ask({"op": "cameras"}, self.timeout_s) if self.alive(link.index) else None
            for entry in (answer or {}).get("result") or []:
                out.append({**entry, "worker": link.index})
        return out

    def camera_configs(self) -> dict[str, CameraConfig]:
        return dict(self.configs)

    def add(self, camera: CameraConfig) -> dict:
        if camera.id in self.configs:
            raise ChangeRefused(409, f"camera {camera.id}: a camera with this id exists already")
        running = [link.index for link in self.links if self.alive(link.index)]
        if not running:
            raise ChangeRefused(503, "no worker is running")
        load = {i: sum(1 for w in self.placed.values() if w == i) for i in running}
        index = min(running, key=lambda i: (load[i], i))  # the least loaded: fewest cameras, then the first
        # a file is probed by the worker (up to seconds for a large one): a longer wait than a read
        result = self._ask(index, {"op": "add", "camera": camera.model_dump(mode="json")}, timeout_s=30.0)
        self.placed[camera.id] = index
        self.configs[camera.id] = camera
        log.info("camera %s placed on worker %d (%d camera(s) there before)", camera.id, index, load[index])
        return {**result, "worker": index}

    def remove(self, camera_id: str) -> dict:
        index = self.placed.get(camera_id)
        if index is None:
            raise ChangeRefused(404, f"camera {camera_id}: no such camera")
        deadline = self.config.runtime.shutdown_deadline_s
        result = self._ask(index, {"op": "remove", "id": camera_id}, timeout_s=deadline + 10.0)
        del self.placed[camera_id]
        del self.configs[camera_id]
        return {**result, "worker": index}

    def fetch_families(self) -> dict[int, list | None]:
        out = {}
        for link in self.links:
            answer = link.ask({"op": "metrics"}, self.timeout_s) if self.alive(link.index) else None
            out[link.index] = answer["result"] if answer and answer["ok"] else None
        return out

    def families(self) -> list:
        """Every worker's families under one name each, and which workers answered."""
        from pipeline.exporter import merge, worker_silences, workers_up

        answers = self.fetch_families()
        return [workers_up(answers), worker_silences(self.silences()),
                *merge(*(families for families in answers.values() if families))]


# -- the service: one thread of changes, and SIGHUP ---------------------------------------------

class CameraService:
    """Changes to the cameras, one at a time on their own thread; reads straight from the backend."""

    def __init__(self, backend, config_path: str | Path, curve=None):
        self.backend = backend
        self.config_path = Path(config_path)
        self.curve = curve  # pipeline.keys.CurveServer: SIGHUP re-reads the admitted client keys
        self._changes = ThreadPoolExecutor(1, thread_name_prefix="camera-changes")

    @property
    def config(self) -> Config:
        return self.backend.config

    def submit(self, function, *args) -> Future:
        return self._changes.submit(function, *args)

    def add(self, body, source: str = "POST /cameras") -> dict:
        """Validate `body` as the config file's cameras[] entries are, then add the camera."""
        try:
            camera = parse_camera(body, self.config, source, base=self.config_path.parent)
        except PipelineError as exc:
            raise ChangeRefused(400, str(exc)) from None
        return self.backend.add(camera)

    def remove(self, camera_id: str) -> dict:
        return self.backend.remove(camera_id)

    def request_reload(self) -> None:
        """From the SIGHUP handler: only queues the work."""
        self._changes.submit(self.reload)

    def reload(self) -> dict:
        """Re-read the config file and apply the camera difference: cameras gone are removed, new
        ones added, changed ones restarted; other sections apply only at a restart (a warning says
        which). A config that does not validate changes nothing (one error line)."""
        try:
            new = load_config(self.config_path)
        except PipelineError as exc:
            log.error("SIGHUP: %s; nothing changed", exc)
            return {"error": str(exc)}
        old = self.config
        frozen = [key for key in ("model", "engine", "publish", "runtime", "tracking") if getattr(new, key) != getattr(old, key)]
        if frozen:
            log.warning("SIGHUP: %s changed in %s: applied only at a restart (cameras are applied now)",
                        ", ".join(frozen), self.config_path)
        current = self.backend.camera_configs()
        wanted = {c.id: c for c in new.cameras}
        removed = [i for i in current if i not in wanted]
        changed = [i for i in current if i in wanted and wanted[i] != current[i]]
        added = [i for i in wanted if i not in current]
        done: dict[str, list] = {"removed": [], "added": [], "restarted": [], "failed": []}
        for camera_id in removed + changed:
            try:
                self.backend.remove(camera_id)
                if camera_id in removed:
                    done["removed"].append(camera_id)
            except ChangeRefused as exc:
                log.error("SIGHUP: %s", exc)
                done["failed"].append(camera_id)
        for camera_id in changed + added:
            if camera_id in done["failed"]:
                continue
            try:
                self.backend.add(wanted[camera_id])
                done["restarted" if camera_id in changed else "added"].append(camera_id)
            except ChangeRefused as exc:
                log.error("SIGHUP: %s", exc)
                done["failed"].append(camera_id)
        if self.curve is not None:
            admitted = self.curve.reload()
            log.info("SIGHUP: %d subscriber key(s) admitted", admitted)
        log.info("SIGHUP: config re-read: %s", ", ".join(f"{k} {v}" for k, v in done.items() if v) or "no camera changed")
        return done

    def close(self) -> None:
        self._changes.shutdown(wait=False, cancel_futures=True)
