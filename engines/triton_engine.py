"""Triton Inference Server as an engine: the infer stage's batches run on a separate, shared server.

Each lane (a request in flight) has its own gRPC client (tritonclient) and output buffers. With a
server on this host the batches travel through POSIX shared memory: the host slots the letterbox
writes into are themselves shared-memory regions (`host_allocator`), registered with the server
once, so a request only names a region and an offset; each lane's outputs come back the same way.
A server that goes away is retried with exponential backoff and jitter for up to `retry_s` a
batch (the lane holds its batch meanwhile, so live cameras keep only their newest frames upstream);
a batch not done by then is lost and counted (`BatchLost`, drop reason `engine_unavailable`).
A server restarted meanwhile has forgotten the regions: they are registered again. Each batch
gets exactly one result or none, so nothing is published twice.
"""

from __future__ import annotations

import logging
import os
import queue
import random
import secrets
import threading
import time
from dataclasses import dataclass, field
from multiprocessing import shared_memory

import numpy as np

from engines.base import Engine, TensorSpec
from pipeline.config import TritonConfig
from pipeline.errors import PipelineError
from pipeline.model import PreparedModel

log = logging.getLogger("pipeline")

# request failures that mean "the server is away or busy", not "this request is wrong"
_TRANSIENT = {"StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED", "StatusCode.CANCELLED",
              "StatusCode.RESOURCE_EXHAUSTED", "StatusCode.ABORTED"}
_LOOPBACK = ("127.", "localhost:", "[::1]:")
_KEEP_MAPPED: list[shared_memory.SharedMemory] = []  # unlinked regions, still mapped (see _release_regions)


class EngineError(PipelineError):
    """The engine cannot run at all (server unreachable, model missing or not what the pipeline sends)."""

    exit_code = 2


class BatchRefused(Exception):
    """The server answered that this batch is wrong: the batch is dropped as an error, the run goes on."""


class BatchLost(Exception):
    """A batch the server did not answer within `retry_s`: dropped and counted, the run goes on."""

    drop_reason = "engine_unavailable"


def import_tritonclient():
    try:
        import tritonclient.grpc as grpcclient  # noqa: F401
    except ImportError as exc:
        raise EngineError(f"engine.kind: triton needs tritonclient ({exc}); install it: "
                          "pip install -r requirements-triton.txt") from None
    return grpcclient


def _reason(exc: BaseException) -> str:
    message = exc.message() if hasattr(exc, "message") else str(exc)
    return " ".join(str(message or type(exc).__name__).split())[:200]


@dataclass(eq=False)
class _Region:
    """A POSIX shared-memory region the server maps: a host slot, a lane's outputs or its staging input."""

    name: str  # the name it is registered under with the server
    memory: shared_memory.SharedMemory
    address: int = 0  # where this process has it mapped

    def __post_init__(self):
        self.address = np.frombuffer(self.memory.buf, np.uint8, count=1).ctypes.data

    @property
    def key(self) -> str:
        return "/" + self.memory.name

    @property
    def size(self) -> int:
        return self.memory.size


@dataclass(eq=False)
class _Lane:
    client: object
    outputs: list[_Region] = field(default_factory=list)  # one per model output, max_batch images each
    staging: _Region | None = None  # input that is not in a registered slot is copied here


class TritonEngine(Engine):
    name = "triton"

    def __init__(self, config: TritonConfig, model: PreparedModel, model_name: str, max_batch: int, lanes: int):
        grpcclient = import_tritonclient()
        from tritonclient.utils import InferenceServerException, triton_to_np_dtype

        self._grpc = grpcclient
        self._error_type = InferenceServerException
        self.config = config
        self.model_name = model_name
        self.version = config.model_version
        self.headers = dict(config.headers) or None
        self._closed = threading.Event()
        self._lock = threading.Lock()  # registrations and up/down bookkeeping
        self._regions: dict[str, _Region] = {}
        self._region_count = 0
        self._down_since: float | None = None
        self.lost_batches = 0
        self.retried_requests = 0
        where = f"model {model_name!r} at {config.url}"

        client = self._client()
        try:
            live = client.is_server_live(headers=self.headers, client_timeout=config.connect_timeout_s)
        except InferenceServerException as exc:
            client.close()
            raise EngineError(f"engine.triton.url: no Triton server answers at {config.url} ({_reason(exc)}); "
                              "start it, or fix the url") from None
        if not live:
            client.close()
            raise EngineError(f"engine.triton.url: the Triton server at {config.url} is not live")
        try:
            ready = client.is_model_ready(model_name, self.version, headers=self.headers,
                                          client_timeout=config.connect_timeout_s)
            metadata = client.get_model_metadata(model_name, self.version, headers=self.headers, as_json=True,
                                                 client_timeout=config.connect_timeout_s) if ready else None
            server_config = client.get_model_config(model_name, self.version, headers=self.headers, as_json=True,
                                                    client_timeout=config.connect_timeout_s)["config"] if ready else None
        except InferenceServerException as exc:
            client.close()
            raise EngineError(f"engine.triton.model_name: cannot read {where} ({_reason(exc)})") from None
        if not ready:
            client.close()
            version = f" version {self.version}" if self.version else ""
            raise EngineError(f"engine.triton.model_name: the server at {config.url} has no ready model "
                              f"{model_name!r}{version}; load it (run.py export-triton writes a repository for it)")
        client.close()

        # the server's model must be what the pipeline sends and decodes: the prepared model's tensors
        inputs = metadata.get("inputs", [])
        h, w = model.input_hw
        if (len(inputs) != 1 or inputs[0]["datatype"] != "UINT8"
                or [int(d) for d in inputs[0]["shape"][1:]] != [h, w, 3]):
            shown = ", ".join(f"{i['name']} {i['datatype']} {[int(d) for d in i['shape']]}" for i in inputs)
            raise EngineError(f"engine.triton.model_name: {where} takes {shown or 'no input'}, but the pipeline sends "
                              f"one UINT8 [N, {h}, {w}, 3] batch; serve the repository run.py export-triton writes")
        server_max = int(server_config.get("max_batch_size", 0) or 0)
        if server_max <= 0 and int(inputs[0]["shape"][0]) != 1:
            raise EngineError(f"engine.triton.model_name: {where} has no batch dimension (max_batch_size 0) and "
                              f"input shape {inputs[0]['shape']}; expected [1, {h}, {w}, 3] or a batching model")
        expected = _onnx_outputs(model)
        served = {o["name"]: o for o in metadata.get("outputs", [])}
        for name, dims in expected.items():
            got = served.get(name)
            if got is None or [int(d) for d in got["shape"][1:]] != [d if d is not None else -1 for d in dims]:
                raise EngineError(f"engine.triton.model_name: {where} outputs {sorted(served)} "
                                  f"{[o['shape'] for o in served.values()]}, but model.path's model outputs "
                                  f"{name!r} [N, {', '.join(str(d) for d in dims)}]; is it the same model?")
        self.max_batch = min(max_batch, server_max) if server_max > 0 else 1
        if not model.batch_dynamic:
            self.max_batch = 1
        if self.max_batch < max_batch:
            log.info("triton: %s takes batches of up to %d (engine.max_batch %d)", where, self.max_batch, max_batch)
        self._input_name = inputs[0]["name"]
        self.inputs = [TensorSpec(self._input_name, np.dtype(np.uint8), (None, h, w, 3))]
        self._output_dtypes = [np.dtype(triton_to_np_dtype(served[n]["datatype"])) for n in expected]
        self.outputs = [TensorSpec(n, dt, (None, *dims)) for (n, dims), dt in zip(expected.items(), self._output_dtypes)]
        self._output_shapes = [tuple(dims) for dims in expected.values()]
        if any(d is None for shape in self._output_shapes for d in shape):
            self.shared_memory = False  # outputs of unknown size cannot be given a region in advance
        else:
            self.shared_memory = config.shared_memory == "system" or (
                config.shared_memory == "auto" and config.url.startswith(_LOOPBACK))

        self._lanes: queue.Queue[_Lane] = queue.Queue()
        self._all_lanes = [_Lane(self._client()) for _ in range(lanes)]
        if self.shared_memory:
            try:
                self._make_lane_regions()
            except (InferenceServerException, OSError) as exc:  # refused by the server, or no /dev/shm here
                self._release_regions()
                if config.shared_memory == "system":
                    self.close()
                    raise EngineError(f"engine.triton.shared_memory: the server at {config.url} cannot map this host's "
                                      f"shared memory ({_reason(exc)}); is the server on this host (and is the "
                                      "shared-memory API open to the headers given)? Or set shared_memory: none") from None
                log.warning("triton: no shared memory with %s (%s); batches travel in the requests", config.url, _reason(exc))
                self.shared_memory = False
        for lane in self._all_lanes:
            self._lanes.put(lane)
        log.info("triton: %s, %d lane(s), batch <= %d, %s", where, lanes, self.max_batch,
                 "system shared memory" if self.shared_memory else "tensors in the requests")

    # -- set-up ---------------------------------------------------------------------------------
    def _client(self):
        c = self.config
        options = [  # tritonclient's defaults, plus a reconnect backoff no longer than ours
            ("grpc.max_send_message_length", 2**31 - 1), ("grpc.max_receive_message_length", 2**31 - 1),
            ("grpc.initial_reconnect_backoff_ms", int(c.backoff_base_s * 1000)),
            ("grpc.min_reconnect_backoff_ms", int(c.backoff_base_s * 1000)),
            ("grpc.max_reconnect_backoff_ms", int(c.backoff_cap_s * 1000)),
            ("grpc.use_local_subchannel_pool", 1),  # a connection per lane: requests do not queue behind each other
        ]
        try:
            return self._grpc.InferenceServerClient(
                c.url, ssl=c.ssl, root_certificates=_path(c.root_certificates), private_key=_path(c.private_key),
                certificate_chain=_path(c.certificate_chain), channel_args=options)
        except OSError as exc:
            raise EngineError(f"engine.triton: cannot read a TLS file: {exc.filename}: {exc.strerror}") from None

    def _new_region(self, size: int) -> _Region:
        with self._lock:
            self._region_count += 1
            # named for the project and this process, so that it is told apart in /dev/shm (and the server's list)
            name = f"vapipe_{os.getpid()}_{secrets.token_hex(4)}_{self._region_count}"
            memory = shared_memory.SharedMemory(name=name, create=True, size=size)
            region = _Region(name, memory)
            self._regions[region.name] = region
        try:
            self._register(self._all_lanes[0].client, region)
        except BaseException:
            with self._lock:
                self._regions.pop(region.name, None)
            memory.close()  # nothing views it yet
            memory.unlink()
            raise
        return region

    def _register(self, client, region: _Region) -> None:
        client.register_system_shared_memory(region.name, region.key, region.size, headers=self.headers,
                                             client_timeout=self.config.connect_timeout_s)

    def _make_lane_regions(self) -> None:
        h, w = self.inputs[0].shape[1:3]
        for lane in self._all_lanes:
            lane.outputs = [self._new_region(self.max_batch * int(np.prod(shape)) * dt.itemsize)
                            for shape, dt in zip(self._output_shapes, self._output_dtypes)]
            lane.staging = self._new_region(self.max_batch * h * w * 3)

    def host_allocator(self, shape: tuple[int, ...], dtype) -> np.ndarray:
        """Host slots in shared memory the server has mapped: the letterbox writes where the server reads."""
        if not self.shared_memory:
            return np.empty(shape, dtype)
        dtype = np.dtype(dtype)
        region = self._new_region(int(np.prod(shape)) * dtype.itemsize)
        return np.ndarray(shape, dtype, buffer=region.memory.buf)

    def _ensure_registered(self, client) -> int:
        """Register again what the server forgot (it restarted); returns how many regions that was."""
        with self._lock:
            status = client.get_system_shared_memory_status(headers=self.headers, as_json=True,
                                                            client_timeout=self.config.connect_timeout_s)
            known = set((status or {}).get("regions", {}))
            missing = [r for r in self._regions.values() if r.name not in known]
            for region in missing:
                self._register(client, region)
        if missing:
            log.info("triton: registered %d shared-memory region(s) again with %s (the server restarted)",
                     len(missing), self.config.url)
        return len(missing)

    # -- inference ------------------------------------------------------------------------------
    def infer(self, images: np.ndarray) -> list[np.ndarray]:
        lane = self._lanes.get()
        try:
            return self._infer_retrying(lane, images)
        finally:
            self._lanes.put(lane)

    def _request(self, lane: _Lane, images: np.ndarray, timeout: float) -> list[np.ndarray]:
        grpc = self._grpc
        n = len(images)
        request_input = grpc.InferInput(self._input_name, list(images.shape), "UINT8")
        requested = [grpc.InferRequestedOutput(spec.name) for spec in self.outputs]
        if self.shared_memory:
            region, offset = self._locate(images)
            if region is None:  # not a host slot (a caller's own array): one copy into the lane's region
                region, offset = lane.staging, 0
                np.ndarray(images.shape, np.uint8, buffer=region.memory.buf)[...] = images
            request_input.set_shared_memory(region.name, images.nbytes, offset)
            for out, target, shape, dt in zip(requested, lane.outputs, self._output_shapes, self._output_dtypes):
                out.set_shared_memory(target.name, n * int(np.prod(shape)) * dt.itemsize)
        else:
            request_input.set_data_from_numpy(np.ascontiguousarray(images))
        result = lane.client.infer(self.model_name, [request_input], model_version=self.version, outputs=requested,
                                   headers=self.headers, client_timeout=timeout)
        if not self.shared_memory:
            return [result.as_numpy(spec.name) for spec in self.outputs]
        outputs = []
        for spec, region, shape, dt in zip(self.outputs, lane.outputs, self._output_shapes, self._output_dtypes):
            # the lane's region is reused by its next request: the batch keeps a copy
            outputs.append(np.ndarray((n, *shape), dt, buffer=region.memory.buf).copy())
        return outputs

    def _locate(self, images: np.ndarray) -> tuple[_Region | None, int]:
        """The registered region (a host slot) `images` lies in, and its offset there."""
        if not images.flags.c_contiguous or images.dtype != np.uint8:
            return None, 0
        start = images.ctypes.data
        for region in list(self._regions.values()):
            base = region.address
            if base <= start and start + images.nbytes <= base + region.size:
                return region, start - base
        return None, 0

    def _infer_retrying(self, lane: _Lane, images: np.ndarray) -> list[np.ndarray]:
        config = self.config
        first_failure = None
        delay = config.backoff_base_s
        timeout = config.request_timeout_s
        while True:
            if self._closed.is_set():
                raise BatchLost(f"triton: engine closed with the server at {config.url} away")
            try:
                outputs = self._request(lane, images, timeout)
            except self._error_type as exc:
                if exc.status() == "StatusCode.DEADLINE_EXCEEDED":
                    # a slow server still works through the requests given up on: retrying with the same
                    # timeout would only add to its queue, so each retry of this batch waits twice as long
                    timeout = min(timeout * 2, config.retry_s)
                if not self._should_retry(lane, exc):
                    raise BatchRefused(f"triton: {self.model_name} at {config.url} refused a batch of "
                                                f"{len(images)}: {_reason(exc)}") from None
                now = time.monotonic()
                first_failure = first_failure or now
                self._note_down(exc, now)
                if now - first_failure >= config.retry_s:
                    with self._lock:
                        self.lost_batches += 1
                    raise BatchLost(f"triton: no answer from {config.url} for {config.retry_s:g} s "
                                    f"({_reason(exc)}); batch of {len(images)} lost") from None
                self.retried_requests += 1
                pause = min(delay, config.retry_s - (now - first_failure)) * random.uniform(0.5, 1.0)
                self._closed.wait(max(pause, 0.0))
                delay = min(delay * 2, config.backoff_cap_s)
                continue
            self._note_up()
            return outputs

    def _should_retry(self, lane: _Lane, exc) -> bool:
        """Away or busy (retry) or a wrong request (do not)? Asked of the server, not read from the message."""
        if exc.status() in _TRANSIENT:
            return True
        try:
            if not lane.client.is_model_ready(self.model_name, self.version, headers=self.headers,
                                              client_timeout=self.config.connect_timeout_s):
                return True  # restarting: the model is still loading
            return self.shared_memory and self._ensure_registered(lane.client) > 0
        except self._error_type:
            return True  # the server went away between the request and the question

    def _note_down(self, exc, now: float) -> None:
        with self._lock:
            if self._down_since is not None:
                return
            self._down_since = now
        log.warning("triton: server at %s not answering (%s); retrying each batch for up to %g s with backoff",
                    self.config.url, _reason(exc), self.config.retry_s)

    def _note_up(self) -> None:
        if self._down_since is None:
            return
        with self._lock:
            since, self._down_since = self._down_since, None
        if since is not None:
            log.warning("triton: server at %s answers again after %.1f s (%d batch(es) lost so far)",
                        self.config.url, time.monotonic() - since, self.lost_batches)

    # -- shutdown -------------------------------------------------------------------------------
    def interrupt(self) -> None:
        """End the retries now (the shutdown deadline passed): a batch still waiting for the server is lost."""
        self._closed.set()

    def _release_regions(self) -> None:
        with self._lock:
            regions, self._regions = list(self._regions.values()), {}
        client = self._all_lanes[0].client if self._all_lanes else None
        for region in regions:
            if client is not None:
                try:
                    client.unregister_system_shared_memory(region.name, headers=self.headers, client_timeout=1.0)
                except self._error_type:
                    pass  # the server is gone: it has nothing mapped any more
            region.memory.unlink()  # the name goes now; the mapping stays (below)
            # never unmapped while the process runs: numpy arrays (host slots, a lane's outputs being
            # copied) view it, and closing a SharedMemory under a live view does not fail, it segfaults
            # at the next access
            _KEEP_MAPPED.append(region.memory)
        for lane in self._all_lanes:
            lane.outputs, lane.staging = [], None

    def close(self) -> None:
        """Idempotent: the infer stage and the pipeline both close the engine."""
        self._closed.set()
        self._release_regions()
        for lane in self._all_lanes:
            lane.client.close()
        self._all_lanes = []


def _path(value) -> str | None:
    return None if value is None else str(value)


def _onnx_outputs(model: PreparedModel) -> dict[str, list[int | None]]:
    """The prepared graph's outputs: name -> dims after the batch (None where dynamic)."""
    import onnx

    graph = onnx.load_from_string(model.onnx_bytes).graph
    return {o.name: [d.dim_value if d.HasField("dim_value") else None for d in o.type.tensor_type.shape.dim][1:]
            for o in graph.output}
