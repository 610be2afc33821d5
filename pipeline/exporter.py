"""Prometheus metrics of a running pipeline, read when scraped.

Nothing here runs per frame: the stages keep their counters and latency buckets
(pipeline/metrics.py) as they always did, and `pipeline_families` reads them when /metrics is
asked for, so metrics cost the pipeline nothing between scrapes. The families are written straight
in Prometheus' text format (0.0.4): prometheus-client's generic path (metric family objects, then
`generate_latest`, which validates and escapes every name and label of every sample) cost about
15 us a sample on the 2-core VM, 20 ms of CPU for the ~1300 samples of 64 cameras, the whole budget
of a scrape; here every label value is escaped once. prometheus-client still serves the process
metrics and its own parser checks this output in the tests (tests/test_service.py).

With worker processes each worker renders its families with a `worker` label and hands them to
the supervisor over its control socket (pipeline/cameras.py); `merge` puts each family's lines
together under one HELP/TYPE. (prometheus-client's multiprocess mode was the other way: it cannot
serve collectors that read live state, and keeps the files of cameras removed long ago.)

Names follow Prometheus' conventions: `vapipe_` prefix, `_total` counters, `_seconds` in base
units, labels `camera`, `stage`, `reason`, `state`, `queue`, `kind`, `worker`.
"""

from __future__ import annotations

from pipeline.metrics import LatencyHistogram

# a family: [name as in the TYPE line, type, help, sample lines]
Family = list


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value) -> str:
    if isinstance(value, int):
        return str(value)
    return repr(float(value))


class _Families:
    """Builds families; `extra` is a label string added to every sample (`worker="1"`)."""

    def __init__(self, extra: str = ""):
        self.extra = extra
        self.out: list[Family] = []

    def family(self, name: str, kind: str, help_text: str) -> list[str]:
        lines: list[str] = []
        self.out.append([name, kind, help_text, lines])
        return lines

    def labels(self, **labels: str) -> str:
        parts = [f'{key}="{_escape(str(value))}"' for key, value in labels.items()]
        if self.extra:
            parts.append(self.extra)
        return "{" + ",".join(parts) + "}" if parts else ""

    def histogram(self, lines: list[str], name: str, histogram: LatencyHistogram, **labels: str) -> None:
        inner = ",".join([f'{key}="{_escape(str(value))}"' for key, value in labels.items()] + ([self.extra] if self.extra else []))
        prefix = f"{name}_bucket{{{inner}{',' if inner else ''}le="
        counts = list(histogram.counts)  # one copy: buckets, +Inf and _count agree while the stage goes on
        running = 0
        for bound, count in zip(histogram.bounds, counts):
            running += count
            lines.append(f'{prefix}"{bound!r}"}} {running}')
        running += counts[-1]
        lines.append(f'{prefix}"+Inf"}} {running}')
        braces = "{" + inner + "}" if inner else ""
        lines.append(f"{name}_count{braces} {running}")
        lines.append(f"{name}_sum{braces} {histogram.total_s!r}")


def pipeline_families(pipeline, extra_labels: dict[str, str] | None = None) -> list[Family]:
    """Every metric family of `pipeline` (None while the model loads: none)."""
    out = _Families(",".join(f'{k}="{_escape(v)}"' for k, v in (extra_labels or {}).items()))
    if pipeline is None:
        return out.out
    sources = list(pipeline.sources)
    publish = pipeline.publish
    frames = out.family("vapipe_camera_frames_total", "counter", "Frames decoded and queued, per camera")
    fps = out.family("vapipe_camera_fps", "gauge", "Frames a second a camera delivered over the last 5 s")
    drops = out.family("vapipe_camera_drops_total", "counter", "Frames a camera lost, by reason (queue_full: a live "
                       "camera's oldest frame; decode_error; stopped)")
    # one sample a camera, its current state as a label (not one per possible state: 64 cameras x 5
    # states was a fifth of a scrape); `vapipe_camera_state{state!="running"}` lists the others
    state = out.family("vapipe_camera_state", "gauge", "The camera's current state (connecting, opened, "
                       "running, reconnecting, ended, failed) as a label; always 1")
    reconnects = out.family("vapipe_camera_reconnects_total", "counter", "Streams lost after frames had flowed, and reopened")
    depth = out.family("vapipe_camera_queue_depth", "gauge", "Frames waiting in a camera's queue")
    for source in sources:
        camera = out.labels(camera=source.camera.id)
        frames.append(f"vapipe_camera_frames_total{camera} {source.next_index}")
        fps.append(f"vapipe_camera_fps{camera} {source.fps():.3f}")
        for reason, count in dict(source.metrics.drops).items():
            drops.append(f"vapipe_camera_drops_total{out.labels(camera=source.camera.id, reason=reason)} {count}")
        state.append(f"vapipe_camera_state{out.labels(camera=source.camera.id, state=source.state.value)} 1")
        reconnects.append(f"vapipe_camera_reconnects_total{camera} {source.reconnects}")
        depth.append(f"vapipe_camera_queue_depth{camera} {len(source.outbox)}")

    latency = out.family("vapipe_stage_latency_seconds", "histogram", "Each stage's own work per item (a batch for "
                         "batch, letterbox, infer; a frame elsewhere; source: decoding, all cameras)")
    stage_drops = out.family("vapipe_stage_drops_total", "counter", "Frames a stage dropped, by reason")
    decoding = LatencyHistogram()
    for source in sources:
        decoding.merge(source.metrics.histogram)
    out.histogram(latency, "vapipe_stage_latency_seconds", decoding, stage="source")
    for stage in pipeline.core_stages:
        out.histogram(latency, "vapipe_stage_latency_seconds", stage.metrics.histogram, stage=stage.name)
        for reason, count in dict(stage.metrics.drops).items():
            stage_drops.append(f"vapipe_stage_drops_total{out.labels(stage=stage.name, reason=reason)} {count}")

    to_publish = out.family("vapipe_capture_to_publish_seconds", "histogram", "From a frame's capture (leaving the "
                            "decoder) to its message being sent")
    for camera, histogram in publish.latency.copy().items():
        out.histogram(to_publish, "vapipe_capture_to_publish_seconds", histogram, camera=camera)

    messages = out.family("vapipe_published_messages_total", "counter", "Messages sent, per camera and kind (each "
                          "subscriber counts its own losses from seq: ZeroMQ does not tell the publisher)")
    kinds = [("detections", publish.seq), ("events", publish.event_seq)]
    if publish.preview is not None:
        kinds.append(("preview", publish.preview_seq))
    for kind, table in kinds:
        for camera, count in table.copy().items():
            messages.append(f"vapipe_published_messages_total{out.labels(camera=camera, kind=kind)} {count}")
    out.family("vapipe_subscriptions_total", "counter", "Subscription notices the publisher received").append(
        f"vapipe_subscriptions_total{out.labels()} {publish.subscriptions}")

    queues = out.family("vapipe_queue_depth", "gauge", "Items waiting between stages")
    for queue in pipeline.queues:
        queues.append(f"vapipe_queue_depth{out.labels(queue=queue.name)} {len(queue)}")
    infer = pipeline.infer
    for name, help_text, value in (("vapipe_lanes", "Inference lanes (CPU threads or GPU streams)", infer.lanes_total),
                                   ("vapipe_lanes_busy", "Lanes with a batch in flight", infer.lanes_busy),
                                   ("vapipe_host_slots_free", "Host slots (batch buffers) free", pipeline.pool.free)):
        out.family(name, "gauge", help_text).append(f"{name}{out.labels()} {value}")
    return out.out


def merge(*groups: list[Family]) -> list[Family]:
    """Families of several workers: one HELP/TYPE a name, every worker's samples under it."""
    merged: dict[str, Family] = {}
    for families in groups:
        for name, kind, help_text, lines in families:
            if name in merged:
                merged[name][3].extend(lines)
            else:
                merged[name] = [name, kind, help_text, list(lines)]
    return list(merged.values())


def render(families: list[Family]) -> str:
    chunks = []
    for name, kind, help_text, lines in families:
        chunks.append(f"# HELP {name} {_escape(help_text)}\n# TYPE {name} {kind}\n")
        if lines:
            chunks.append("\n".join(lines) + "\n")
    return "".join(chunks)


def workers_up(answers: dict[int, list | None]) -> Family:
    return ["vapipe_worker_up", "gauge", "1 when the worker answered this scrape",
            [f'vapipe_worker_up{{worker="{index}"}} {0 if families is None else 1}' for index, families in sorted(answers.items())]]


def worker_silences(counts: dict[int, int]) -> Family:
    return ["vapipe_worker_silences_total", "counter", "Times the worker was not heard from for runtime.worker_silence_s",
            [f'vapipe_worker_silences_total{{worker="{index}"}} {count}' for index, count in sorted(counts.items())]]
