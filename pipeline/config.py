"""The one place where YAML becomes typed configuration.

`load_config(path)` reads the file, expands `${VAR}` (and `${VAR:-default}`) from the environment,
validates it with pydantic and returns a `Config`. Every mistake becomes a one-line `ConfigError`
naming the file, the key path and what was expected; nothing else in the project parses YAML.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import unquote, urlsplit
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from pipeline.errors import ConfigError

_ENV_PATTERN = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
CAMERA_ID_PATTERN = r"^[A-Za-z0-9_.-]+$"

# URL schemes a camera may use: what the source stage opens and what it treats as live. Anything
# else (ftp://, a typo) would be retried forever as a "live camera" that never connects.
LIVE_SCHEMES = ("rtsp", "rtsps", "http", "https")

# Upper bounds. Every size, count and time has one, so that a typo (an extra zero, 1e12) is a config
# error that names the limit, not an allocation that eats the machine, an overflow deep in a C
# library or a wait that never ends. They are far above any sensible value.
MAX_SECONDS = 3600.0  # timeouts, backoffs, intervals: an hour
MAX_THREADS = 1024  # thread pools (more than any machine has cores)
MAX_QUEUE = 256  # frames a camera or stage queue holds: 256 x 1080p BGR = 1.6 GB a queue
MAX_SLOTS = 64  # host slots: each is max_batch letterboxed images
MAX_BATCH = 256
MAX_MESSAGES = 1_000_000  # ZeroMQ high-water mark (messages queued per subscriber)
MAX_CAMERAS = 4096
MAX_DEVICE = 255  # CUDA device ordinals
MAX_WORKERS = 256  # 4 GPUs at 144 cameras each, 8 cameras a worker, need 72; 8 GPUs 144


class _Strict(BaseModel):
    # inf and nan are refused everywhere: `.inf` would pass `gt=0` and mean "wait forever"
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


Seconds = Annotated[float, Field(gt=0, le=MAX_SECONDS)]
Threads = Annotated[int, Field(ge=0, le=MAX_THREADS)]


_NAME_PATTERN = r"^[A-Za-z0-9_.-]+$"
Point = tuple[Annotated[float, Field(ge=0)], Annotated[float, Field(ge=0)]]


class TrackingConfig(_Strict):
    """ByteTrack's settings (names as in Ultralytics' tracker YAML); `pipeline/tracking.py`."""

    enabled: bool = False
    # Ultralytics' bytetrack.yaml defaults; detections below model.conf_threshold never reach the
    # tracker, so the low-score association needs conf_threshold lowered to track_low_thresh
    track_high_thresh: Annotated[float, Field(ge=0, le=1)] = 0.25  # first association
    track_low_thresh: Annotated[float, Field(ge=0, le=1)] = 0.1  # second association (down to this score)
    new_track_thresh: Annotated[float, Field(ge=0, le=1)] = 0.25  # an unmatched detection starts a track
    match_thresh: Annotated[float, Field(gt=0, le=1)] = 0.8  # largest 1 - IoU (x score) of a match
    # a lost track is kept this long for a detection to come back (seconds: cameras differ in fps)
    lost_track_buffer_s: Annotated[float, Field(gt=0, le=3600)] = 1.0
    fuse_score: bool = True  # weigh IoU by the detection's score in the first association
    classes: list[Annotated[int, Field(ge=0)]] | None = None  # track only these class ids (default: all)


class TrackingOverride(_Strict):
    """A camera's own tracking settings: each key given replaces the top-level `tracking` one."""

    enabled: bool | None = None
    track_high_thresh: Annotated[float, Field(ge=0, le=1)] | None = None
    track_low_thresh: Annotated[float, Field(ge=0, le=1)] | None = None
    new_track_thresh: Annotated[float, Field(ge=0, le=1)] | None = None
    match_thresh: Annotated[float, Field(gt=0, le=1)] | None = None
    lost_track_buffer_s: Annotated[float, Field(gt=0, le=3600)] | None = None
    fuse_score: bool | None = None
    classes: list[Annotated[int, Field(ge=0)]] | None = None


class ZoneConfig(_Strict):
    """A polygon in source pixels: occupancy per class each frame, enter/leave events per track."""

    name: Annotated[str, Field(pattern=_NAME_PATTERN, max_length=64)]
    polygon: Annotated[list[Point], Field(min_length=3, max_length=256)]
    classes: list[Annotated[int, Field(ge=0)]] | None = None  # default: every tracked class
    anchor: Literal["bottom_center", "center"] = "bottom_center"  # the point of a box that must be inside


class LineConfig(_Strict):
    """A counting line from `points[0]` to `points[1]` in source pixels: crossings per class and direction."""

    name: Annotated[str, Field(pattern=_NAME_PATTERN, max_length=64)]
    points: Annotated[list[Point], Field(min_length=2, max_length=2)]
    classes: list[Annotated[int, Field(ge=0)]] | None = None
    anchor: Literal["bottom_center", "center"] = "bottom_center"

    @field_validator("points")
    @classmethod
    def _not_a_point(cls, points: list) -> list:
        if tuple(points[0]) == tuple(points[1]):
            raise ValueError("the two points of a line must differ")
        return points


class CameraConfig(_Strict):
    """One video source: a file path (or file:// URL), an rtsp(s):// or http(s):// URL, or a V4L2 device."""

    id: Annotated[str, Field(pattern=CAMERA_ID_PATTERN, max_length=64)]
    url: Annotated[str, Field(min_length=1, max_length=4096)]
    loop: bool = False
    realtime: bool = False
    rtsp_transport: Literal["tcp", "udp"] = "tcp"
    decode_threads: Annotated[int, Field(ge=0, le=64)] = 0  # 0 = let FFmpeg choose
    color_conversion: Literal["swscale", "opencv"] = "swscale"  # opencv: GIL-free, for many cameras
    # nvdec: decode on the GPU (FFmpeg's CUDA hwaccel through PyAV), frames stay in device memory and
    # are letterboxed there; needs a GPU engine. Streams NVDEC cannot decode fall back to the CPU.
    decoder: Literal["cpu", "nvdec"] = "cpu"
    open_timeout_s: Seconds = 5.0
    read_timeout_s: Seconds = 5.0
    reconnect_base_s: Seconds = 0.5
    reconnect_cap_s: Seconds = 10.0
    stall_timeout_s: Seconds = 5.0
    # a live camera this far behind its own timestamps (decoding slower than it sends, or stalled) skips
    # to the next keyframe; the skipped frames are counted as `late` drops. None: never skip
    max_lag_s: Seconds | None = 2.0
    live: bool | None = None  # None = decided from the URL (network and devices are live)
    tracking: TrackingOverride | None = None  # this camera's changes to the top-level `tracking`
    zones: list[ZoneConfig] = []  # analytics on tracks, in source pixels (need tracking)
    lines: list[LineConfig] = []

    @field_validator("url")
    @classmethod
    def _supported_url(cls, url: str) -> str:
        """A file:// URL becomes the plain path (so it plays as a file); other schemes must be ones we open."""
        if "://" not in url:
            return url
        scheme = url.split("://", 1)[0].lower()
        if scheme == "file":
            parts = urlsplit(url)
            if parts.netloc not in ("", "localhost") or not parts.path:
                raise ValueError("a file URL is file:///absolute/path (no host)")
            return unquote(parts.path)
        if scheme not in LIVE_SCHEMES:
            shown = scheme if len(scheme) <= 20 else scheme[:20] + "..."
            raise ValueError(f"unsupported URL scheme {shown!r}: use a file path, file://, "
                             f"{', '.join(s + '://' for s in LIVE_SCHEMES)} or /dev/videoN")
        return url

    @property
    def is_file(self) -> bool:
        return "://" not in self.url and not self.url.startswith("/dev/video")

    @property
    def is_live(self) -> bool:
        if self.live is not None:
            return self.live
        return "://" in self.url or self.url.startswith("/dev/video")


class ModelConfig(_Strict):
    path: Path
    preset: Literal["yolox", "yolov5", "yolov8", "yolo11"]
    labels: Path | None = None
    conf_threshold: Annotated[float, Field(ge=0, le=1)] = 0.3
    nms_iou: Annotated[float, Field(gt=0, le=1)] = 0.45
    max_detections: Annotated[int, Field(ge=1, le=100_000)] = 300
    # keep only these class ids; [] would publish nothing at all. Ids the model does not have are
    # refused once the model is loaded (pipeline.model.check_classes)
    classes: Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)] | None = None
    # rect: each camera is letterboxed to the smallest stride-aligned rectangle that holds its frame
    # (416x256 for 16:9), where the model's input size can change (checked at load; else square)
    letterbox: Literal["rect", "square"] = "rect"


class TritonConfig(_Strict):
    """engine.kind triton: a Triton Inference Server runs the model (engines/triton_engine.py)."""

    url: Annotated[str, Field(max_length=256)] = "127.0.0.1:8001"  # the server's gRPC endpoint, HOST:PORT
    model_name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]+$", max_length=128)] | None = None  # default: model.path's stem
    model_version: Annotated[str, Field(pattern=r"^[0-9]*$", max_length=19)] = ""  # "" = the server's version policy
    connect_timeout_s: Seconds = 5.0  # the checks at start (server live, model ready, metadata)
    request_timeout_s: Seconds = 10.0  # one inference request; past it the request is retried
    retry_s: Seconds = 30.0  # how long one batch is retried while the server is away; then it is lost (counted)
    backoff_base_s: Seconds = 0.2
    backoff_cap_s: Seconds = 5.0
    # system: batches reach a local server through POSIX shared memory registered once per host slot
    # and lane (no copy in the request); auto = system when the url is a loopback address
    shared_memory: Literal["auto", "system", "none"] = "auto"
    ssl: bool = False
    root_certificates: Path | None = None  # PEM files for TLS (ssl: true)
    private_key: Path | None = None
    certificate_chain: Path | None = None
    # sent with every call (gRPC metadata keys are lowercase), e.g. authorization: "Bearer ${TOKEN}"; never logged
    headers: dict[Annotated[str, Field(pattern=r"^[a-z0-9_.-]+$", max_length=128)], str] = {}

    @field_validator("url")
    @classmethod
    def _host_port(cls, url: str) -> str:
        host, _, port = url.rpartition(":")
        if not re.fullmatch(r"[A-Za-z0-9_.-]+|\[[0-9A-Fa-f:.]+\]", host) or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError("expected the server's gRPC endpoint as HOST:PORT, without a scheme (e.g. 127.0.0.1:8001)")
        return url

    @model_validator(mode="after")
    def _backoff_order(self) -> "TritonConfig":
        if self.backoff_base_s > self.backoff_cap_s:
            raise ValueError(f"backoff_base_s ({self.backoff_base_s}) is above backoff_cap_s ({self.backoff_cap_s})")
        return self


class EngineConfig(_Strict):
    kind: Literal["onnxruntime", "torch", "tensorrt", "triton"] = "onnxruntime"
    # ONNX Runtime threads per lane; lanes x intra_op_threads ~ cores (0 = ONNX Runtime's default: all cores)
    intra_op_threads: Threads = 1
    inter_op_threads: Threads = 1
    spin: bool = False  # ONNX Runtime threads busy-wait between runs (faster alone, slower in a pipeline)
    max_batch: Annotated[int, Field(ge=1, le=MAX_BATCH)] = 4
    batch_timeout_ms: Annotated[float, Field(ge=0, le=MAX_SECONDS * 1000)] = 10.0
    # concurrent inferences: CPU worker threads, or GPU lanes (a CUDA stream + engine context each)
    lanes: Annotated[int, Field(ge=1, le=16)] = 2
    # GPU engines (torch, tensorrt)
    device: Annotated[int, Field(ge=0, le=MAX_DEVICE)] = 0
    fp16: bool = False
    fp32_first_convs: Annotated[int, Field(ge=0, le=100_000)] = 16  # torch fp16: keep these first convolutions in fp32
    # torch fp16: every layer in fp16, through exact rewrites (engines/torch_fp16.py); implies
    # fp32_first_convs 0. Off: on an H200 its anchor-level error (0.0221) is no better than the default's
    fp16_exact: bool = False
    cuda_graphs: bool = False  # torch only: replay captured CUDA graphs
    # torch only: torch.compile (inductor) with channels_last; compiled artifacts cached in compile_cache_dir
    compile: bool = False
    compile_cache_dir: Path = Path("cache/torch")
    # tensorrt only
    workspace_mb: Annotated[int, Field(ge=16, le=1_048_576)] = 1024  # up to 1 TiB
    plan_cache_dir: Path = Path("cache/tensorrt")
    plugins: list[Path] = []
    min_batch: Annotated[int, Field(ge=1, le=MAX_BATCH)] = 1
    opt_batch: Annotated[int, Field(ge=1, le=MAX_BATCH)] | None = None
    triton: TritonConfig = TritonConfig()  # triton only

    @property
    def on_gpu(self) -> bool:
        return self.kind in ("torch", "tensorrt")

    @model_validator(mode="after")
    def _fp16_exact_needs_fp16(self) -> "EngineConfig":
        if self.fp16_exact and (self.kind != "torch" or not self.fp16):
            raise ValueError("fp16_exact rewrites the torch engine's fp16 model: it needs kind torch and fp16: true")
        return self


class PreviewConfig(_Strict):
    """Optional JPEG preview frames for viewers, on their own topic (`<topic_prefix>/<camera>/`)."""

    enabled: bool = False
    width: Annotated[int, Field(ge=16, le=7680)] = 640  # scaled down to this width (never up)
    max_fps: Annotated[float, Field(gt=0, le=120)] = 10.0  # per camera, wall clock
    jpeg_quality: Annotated[int, Field(ge=1, le=100)] = 80
    topic_prefix: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]+$")] = "preview"


class RedisSinkConfig(_Strict):
    """Detections to Redis Streams (`sinks/redis_stream.py`): one stream a camera, `<stream_prefix>:<camera>`."""

    kind: Literal["redis"]
    url: Annotated[str, Field(pattern=r"^(redis|rediss|unix)://", max_length=4096)]
    stream_prefix: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:-]+$", max_length=128)] = "vapipe:det"
    maxlen: Annotated[int, Field(ge=1, le=100_000_000)] = 10_000  # entries kept a stream (approximate trim)
    buffer: Annotated[int, Field(ge=1, le=MAX_MESSAGES)] = 10_000  # messages held while the broker is slow or away
    timeout_s: Seconds = 2.0  # connect and socket timeout
    reconnect_base_s: Seconds = 0.2
    reconnect_cap_s: Seconds = 5.0


class MqttSinkConfig(_Strict):
    """Detections to an MQTT broker (`sinks/mqtt.py`) on `<topic_prefix>/<camera>`."""

    kind: Literal["mqtt"]
    url: Annotated[str, Field(pattern=r"^mqtts?://[^/]+", max_length=4096)]  # mqtt://[user:pass@]host[:1883]
    topic_prefix: Annotated[str, Field(pattern=r"^[A-Za-z0-9_./-]+$", max_length=128)] = "vapipe/det"
    qos: Literal[0, 1, 2] = 0
    client_id: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]*$", max_length=64)] = ""  # "" = a random one
    buffer: Annotated[int, Field(ge=1, le=MAX_MESSAGES)] = 10_000
    timeout_s: Seconds = 2.0
    reconnect_base_s: Seconds = 0.2
    reconnect_cap_s: Seconds = 5.0


SinkConfig = Annotated[RedisSinkConfig | MqttSinkConfig, Field(discriminator="kind")]


class PublishKeys(_Strict):
    """ZeroMQ CURVE for the publisher (`run.py keys` makes them): only subscribers whose public key
    is in `clients` get in, and what they receive is encrypted."""

    server: Path  # the publisher's key pair (a `.key_secret` file, as zmq.auth writes it)
    clients: Path  # a folder of the allowed subscribers' public keys (`*.key`)


class PublishConfig(_Strict):
    bind: str = "tcp://127.0.0.1:5555"
    keys: PublishKeys | None = None
    insecure: bool = False  # bind beyond loopback without keys, on purpose
    send_hwm: Annotated[int, Field(ge=1, le=MAX_MESSAGES)] = 1000
    wait_subscribers: Annotated[int, Field(ge=0, le=10_000)] = 0
    wait_timeout_s: Seconds = 10.0
    topic_prefix: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]+$")] = "det"
    preview: PreviewConfig = PreviewConfig()
    events_topic_prefix: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]+$")] = "events"  # zone and line events
    sinks: Annotated[list[SinkConfig], Field(max_length=16)] = []  # brokers beside ZeroMQ (Redis Streams, MQTT)

    @model_validator(mode="after")
    def _distinct_topics(self) -> "PublishConfig":
        if self.preview.enabled and self.preview.topic_prefix == self.topic_prefix:
            raise ValueError("preview.topic_prefix must differ from topic_prefix")
        if self.events_topic_prefix in (self.topic_prefix, self.preview.topic_prefix):
            raise ValueError("events_topic_prefix must differ from topic_prefix and preview.topic_prefix")
        return self


class RuntimeConfig(_Strict):
    queue_size: Annotated[int, Field(ge=1, le=MAX_QUEUE)] = 8
    host_slots: Annotated[int, Field(ge=2, le=MAX_SLOTS)] = 4
    status_interval_s: Seconds = 5.0
    shutdown_deadline_s: Seconds = 2.0
    # OpenCV's own thread pool per call: 1 avoids oversubscription when many stage threads call it
    opencv_threads: Threads = 1
    letterbox_threads: Annotated[int, Field(ge=1, le=64)] = 1  # >1 for many large (1080p+) cameras
    # where letterbox runs: "gpu" uploads YUV (or reads NVDEC's frames in place) and letterboxes with
    # one CUDA kernel a frame; "auto" = gpu when a camera decodes with nvdec, else cpu
    letterbox_device: Literal["auto", "cpu", "gpu"] = "auto"
    # with a live camera: batches in flight from batching to the end of inference (latency bound)
    live_batches_in_flight: Annotated[int, Field(ge=1, le=MAX_SLOTS)] = 1
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # >0: cameras dealt round-robin to this many worker processes, each a whole pipeline with its
    # own CUDA context, publishing through one endpoint (pipeline/workers.py); 0 = one process
    workers: Annotated[int, Field(ge=0, le=MAX_WORKERS)] = 0
    worker_devices: Annotated[list[Annotated[int, Field(ge=0, le=MAX_DEVICE)]], Field(max_length=64)] = []  # GPU of worker i: worker_devices[i % len]; [] = engine.device
    # worker mode: "go" waits (as well as for publish.wait_subscribers) until every worker has loaded and
    # warmed its engine, at most this long; past it the ready workers start and the others when ready
    start_timeout_s: Seconds = 600.0
    # before the run starts (in worker mode: before a worker says ready) every camera is opened and its
    # first frame decoded and held, so that all start together; at most this long (then the run starts,
    # a warning names the cameras still opening, and each starts when it opens); 0 = no preroll
    preroll_timeout_s: Annotated[float, Field(ge=0, le=MAX_SECONDS)] = 120.0
    # worker mode: a running worker not heard from for this long is named in a warning and its threads'
    # stacks are dumped into the log (it is not killed or restarted)
    worker_silence_s: Seconds = 15.0
    # the HTTP server (Prometheus /metrics, /healthz, /readyz, the /cameras API): HOST:PORT, off when
    # unset; port 0 = a free one (logged). Beyond loopback it needs api_token or api_insecure
    metrics_bind: Annotated[str, Field(pattern=r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):[0-9]{1,5}$")] | None = None
    api_token: SecretStr | None = None  # bearer token for the HTTP server (never logged, never in an error)
    api_insecure: bool = False  # serve beyond loopback without a token, on purpose


    @field_validator("api_token")
    @classmethod
    def _long_token(cls, token: SecretStr | None) -> SecretStr | None:
        if token is not None and not 16 <= len(token.get_secret_value()) <= 4096:
            raise ValueError("must be 16 to 4096 characters (make one: python -c 'import secrets; "
                             "print(secrets.token_urlsafe())')")
        return token


class ClusterConfig(_Strict):
    """Fleet mode (`pipeline/fleet.py`): hosts share the cameras through leases in one Redis."""

    redis: Annotated[str, Field(pattern=r"^(redis|rediss|unix)://", max_length=4096)]
    max_cameras: Annotated[int, Field(ge=1, le=MAX_CAMERAS)]  # this host's capacity
    lease_s: Annotated[float, Field(ge=0.5, le=MAX_SECONDS)] = 5.0  # a dead host's cameras move after this
    claim_interval_s: Annotated[float, Field(ge=0.05, le=MAX_SECONDS)] = 0.5  # how often free cameras are looked for
    host_id: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]*$", max_length=64)] = ""  # "" = <hostname>-<pid>
    key_prefix: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:-]+$", max_length=64)] = "vapipe:fleet"


class Config(_Strict):
    cameras: Annotated[list[CameraConfig], Field(min_length=1, max_length=MAX_CAMERAS)]
    model: ModelConfig
    engine: EngineConfig = EngineConfig()
    publish: PublishConfig = PublishConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    tracking: TrackingConfig = TrackingConfig()
    cluster: ClusterConfig | None = None  # fleet mode: several hosts, one camera list, Redis leases

    @model_validator(mode="after")
    def _fleet_in_one_process(self) -> "Config":
        cluster = self.cluster
        if cluster is None:
            return self
        if self.runtime.workers:
            raise ValueError("cluster: fleet mode runs one pipeline process a host; set runtime.workers to 0")
        if cluster.claim_interval_s >= cluster.lease_s / 2:
            raise ValueError(f"cluster.claim_interval_s: {cluster.claim_interval_s:g} must be below half of "
                             f"cluster.lease_s ({cluster.lease_s:g})")
        return self

    def tracking_for(self, camera: CameraConfig) -> TrackingConfig:
        """The top-level `tracking` with the camera's own keys on top."""
        if camera.tracking is None:
            return self.tracking
        return self.tracking.model_copy(update=camera.tracking.model_dump(exclude_none=True))

    @model_validator(mode="after")
    def _analytics_need_tracking(self) -> "Config":
        for i, camera in enumerate(self.cameras):
            tracking = self.tracking_for(camera)
            where = f"cameras[{i}].tracking" if camera.tracking is not None else "tracking"
            if tracking.track_low_thresh > tracking.track_high_thresh:
                raise ValueError(f"{where}.track_low_thresh: {tracking.track_low_thresh} is above track_high_thresh "
                                 f"({tracking.track_high_thresh})")
            for key in ("zones", "lines"):
                if getattr(camera, key) and not tracking.enabled:
                    raise ValueError(f"cameras[{i}].{key}: needs tracking (set tracking.enabled or "
                                     f"cameras[{i}].tracking.enabled to true)")
            names = [item.name for item in (*camera.zones, *camera.lines)]
            twice = sorted({n for n in names if names.count(n) > 1})
            if twice:
                raise ValueError(f"cameras[{i}]: zone/line name {twice[0]!r} is used twice")
        return self

    @field_validator("cameras")
    @classmethod
    def _unique_ids(cls, cameras: list[CameraConfig]) -> list[CameraConfig]:
        seen: set[str] = set()
        for camera in cameras:
            if camera.id in seen:
                raise ValueError(f"camera id {camera.id!r} is used twice")
            seen.add(camera.id)
        return cameras

    @model_validator(mode="after")
    def _gpu_features_need_gpu_engine(self) -> "Config":
        nvdec = [i for i, camera in enumerate(self.cameras) if camera.decoder == "nvdec"]
        if not self.engine.on_gpu:
            if nvdec:
                raise ValueError(f"cameras[{nvdec[0]}].decoder: nvdec needs a GPU engine (engine.kind torch or tensorrt), "
                                 f"not {self.engine.kind}")
            if self.runtime.letterbox_device == "gpu":
                raise ValueError(f"runtime.letterbox_device: gpu needs a GPU engine, not {self.engine.kind}")
        if nvdec and self.runtime.letterbox_device == "cpu":  # NVDEC frames stay on the GPU: only it can letterbox them
            raise ValueError(f"runtime.letterbox_device: cpu cannot letterbox NVDEC frames (cameras[{nvdec[0]}].decoder "
                             f"is nvdec); use gpu or auto")
        return self

    @model_validator(mode="after")
    def _network_needs_keys(self) -> "Config":
        """A publisher or HTTP server other hosts can reach carries JPEG previews and camera control:
        keys (or a token) are the default, leaving them out is said on purpose (`insecure`)."""
        publish, runtime = self.publish, self.runtime
        if not publish.keys and not publish.insecure and is_reachable_endpoint(publish.bind):
            raise ValueError(f"publish.bind: {publish.bind} can be reached from other hosts: set publish.keys "
                             f"(make them with `run.py keys`) or publish.insecure: true")
        if (runtime.metrics_bind and not runtime.api_token and not runtime.api_insecure
                and not is_loopback_host(runtime.metrics_bind.rsplit(":", 1)[0])):
            raise ValueError(f"runtime.metrics_bind: {runtime.metrics_bind} can be reached from other hosts: set "
                             f"runtime.api_token or runtime.api_insecure: true")
        return self

    @property
    def letterbox_on_gpu(self) -> bool:
        if self.runtime.letterbox_device == "auto":
            return any(camera.decoder == "nvdec" for camera in self.cameras)
        return self.runtime.letterbox_device == "gpu"


def is_loopback_host(host: str) -> bool:
    import ipaddress

    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name or an interface (eth0, *): reachable from elsewhere


def is_reachable_endpoint(endpoint: str) -> bool:
    """A ZeroMQ endpoint other hosts can reach: a network transport not on a loopback address
    (ipc:// and inproc:// are local; what is not an endpoint at all is refused when it is bound)."""
    scheme, _, rest = endpoint.partition("://")
    if scheme == "tcp":
        return not is_loopback_host(rest.rsplit(":", 1)[0])
    return scheme in ("ws", "wss", "udp", "pgm", "epgm", "norm", "tipc", "vmci")


def _expand_env(node, path: str, source: Path):
    """Replace ${VAR} / ${VAR:-default} in every string of the parsed YAML tree."""
    if isinstance(node, dict):
        return {k: _expand_env(v, f"{path}.{k}" if path else str(k), source) for k, v in node.items()}
    if isinstance(node, list):
        return [_expand_env(v, f"{path}[{i}]", source) for i, v in enumerate(node)]
    if isinstance(node, str):
        def substitute(match: re.Match) -> str:
            name, default = match.group(1), match.group(2)
            value = os.environ.get(name)
            if value is None:
                if default is None:
                    raise ConfigError(f"{source}: {path}: environment variable ${{{name}}} is not set")
                return default
            return value
        return _ENV_PATTERN.sub(substitute, node)
    return node


def _key_path(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


_SECRET_KEYS = {"api_token"}


def _describe(error: dict) -> str:
    kind = error["type"]
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "required key is missing"
    if any(part in _SECRET_KEYS for part in error["loc"]):
        return error["msg"]  # never the value itself
    given = error.get("input")
    shown = repr(given) if not isinstance(given, (dict, list)) else type(given).__name__
    return f"{error['msg']} (got {shown})"


def _resolve_paths(data: dict, base: Path) -> None:
    """Relative model paths are taken from the config file's folder, so a config runs from anywhere."""
    model = data.get("model")
    if isinstance(model, dict):
        for key in ("path", "labels"):
            value = model.get(key)
            if isinstance(value, str) and value and not os.path.isabs(value):
                model[key] = str((base / value).resolve())
    publish = data.get("publish")
    keys = publish.get("keys") if isinstance(publish, dict) else None
    if isinstance(keys, dict):
        for key in ("server", "clients"):
            value = keys.get(key)
            if isinstance(value, str) and value and not os.path.isabs(value):
                keys[key] = str((base / value).resolve())
    triton = (data.get("engine") or {}).get("triton") if isinstance(data.get("engine"), dict) else None
    if isinstance(triton, dict):  # TLS files, like the model, from the config's folder
        for key in ("root_certificates", "private_key", "certificate_chain"):
            value = triton.get(key)
            if isinstance(value, str) and value and not os.path.isabs(value):
                triton[key] = str((base / value).resolve())
    for camera in data.get("cameras") or []:
        if isinstance(camera, dict):
            url = camera.get("url")
            if isinstance(url, str) and "://" not in url and not os.path.isabs(url) and not url.startswith("/dev/"):
                camera["url"] = str((base / url).resolve())


def parse_config(data, source: Path | str = "<config>", base: Path | None = None) -> Config:
    """Validate parsed YAML; relative paths are taken from `base` (the config file's folder; default:
    the working directory)."""
    source = Path(source)
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    data = _expand_env(data, "", source)
    _resolve_paths(data, Path.cwd() if base is None else base)
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise _one_line(exc, source) from None


def _one_line(exc: ValidationError, source) -> ConfigError:
    first = exc.errors()[0]
    more = exc.error_count() - 1
    suffix = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
    if not first["loc"] and first["type"] == "value_error":  # a whole-config rule names its own keys
        return ConfigError(f"{source}: {first['ctx']['error']}{suffix}")
    return ConfigError(f"{source}: {_key_path(first['loc'])}: {_describe(first)}{suffix}")


def parse_camera(data, config: Config, source: str, base: Path | None = None) -> CameraConfig:
    """A camera added while the run goes (the HTTP API): the same model and the same one-line
    errors as a `cameras[]` entry of the file (key paths from the body), then the whole-config rules
    (tracking for zones, a GPU engine for nvdec) against the running config. No `${VAR}` expansion:
    a request must not read the server's environment. Duplicate ids are the caller's to refuse."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a JSON object (a camera, as in cameras[] of the config), "
                          f"got {type(data).__name__}")
    data = dict(data)
    _resolve_paths({"cameras": [data]}, Path.cwd() if base is None else base)
    try:
        camera = CameraConfig.model_validate(data)
    except ValidationError as exc:
        raise _one_line(exc, source) from None
    others = [c for c in config.cameras if c.id != camera.id]
    try:
        Config.model_validate({**dict(config), "cameras": [*others, camera]})
    except ValidationError as exc:
        error = _one_line(exc, source)
        where = f"cameras[{len(others)}]."
        raise ConfigError(str(error).replace(f"or {where}tracking.enabled", "or the camera's tracking.enabled")
                          .replace(where, "")) from None
    return camera


def load_config(path: Path | str) -> Config:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}: invalid YAML: {where}{problem}") from None
    return parse_config(data, path, base=path.parent)
