"""Prometheus metrics of a running pipeline, read when scraped (prometheus-client custom collectors).

Nothing here runs per frame: the stages keep their counters and latency buckets
(pipeline/metrics.py) as they always did, and `PipelineCollector` turns them into metric families
when /metrics is asked for, so metrics cost the pipeline nothing between scrapes. With worker
processes each worker collects its own families and hands them to the supervisor as JSON over
its control socket (pipeline/cameras.py); `WorkersCollector` merges them under one endpoint, each
sample with a `worker` label. (prometheus-client's multiprocess mode was the other way: it
cannot serve custom collectors, and keeps the files of cameras removed long ago.)

Names follow Prometheus' conventions: `vapipe_` prefix, `_total` counters, `_seconds` in base
units, labels `camera`, `stage`, `reason`, `state`, `queue`, `kind`.
"""

from __future__ import annotations

from typing import Callable

from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric)
from prometheus_client.samples import Sample

from pipeline.metrics import LatencyHistogram

def _histogram(family: HistogramMetricFamily, labels: list[str], histogram: LatencyHistogram) -> None:
    family.add_metric(labels, histogram.cumulative(), histogram.total_s)


class PipelineCollector:
    """The metric families of the pipeline `get_pipeline()` returns (None while the model loads)."""

    def __init__(self, get_pipeline: Callable[[], object | None]):
        self.get_pipeline = get_pipeline

    def describe(self):
        return []  # families vary with the cameras: registered without a fixed description

    def collect(self):
        pipeline = self.get_pipeline()
        if pipeline is None:
            return []
        return list(self._families(pipeline))

    def _families(self, pipeline):
        sources = list(pipeline.sources)
        publish = pipeline.publish
        frames = CounterMetricFamily("vapipe_camera_frames", "Frames decoded and queued, per camera", labels=["camera"])
        fps = GaugeMetricFamily("vapipe_camera_fps", "Frames a second a camera delivered over the last 5 s",
                                labels=["camera"])
        drops = CounterMetricFamily("vapipe_camera_drops", "Frames a camera lost, by reason (queue_full: a live "
                                    "camera's oldest frame; decode_error; stopped)", labels=["camera", "reason"])
        # one sample a camera, its current state (not one per possible state: 64 cameras x 5 states
        # was a fifth of a scrape); `vapipe_camera_state{state!="running"}` lists the others
        state = GaugeMetricFamily("vapipe_camera_state", "The camera's current state (connecting, running, "
                                  "reconnecting, ended, failed) as a label; always 1", labels=["camera", "state"])
        reconnects = CounterMetricFamily("vapipe_camera_reconnects", "Streams lost after frames had flowed, and reopened",
                                         labels=["camera"])
        depth = GaugeMetricFamily("vapipe_camera_queue_depth", "Frames waiting in a camera's queue", labels=["camera"])
        for source in sources:
            camera = source.camera.id
            frames.add_metric([camera], source.next_index)
            fps.add_metric([camera], round(source.fps(), 3))
            for reason, count in dict(source.metrics.drops).items():
                drops.add_metric([camera, reason], count)
            state.add_metric([camera, source.state.value], 1.0)
            reconnects.add_metric([camera], source.reconnects)
            depth.add_metric([camera], len(source.outbox))
        yield from (frames, fps, drops, state, reconnects, depth)

        latency = HistogramMetricFamily("vapipe_stage_latency_seconds", "Each stage's own work per item (a batch "
                                        "for batch, letterbox, infer; a frame elsewhere; source: decoding, all cameras)",
                                        labels=["stage"])
        stage_drops = CounterMetricFamily("vapipe_stage_drops", "Frames a stage dropped, by reason", labels=["stage", "reason"])
        decoding = LatencyHistogram()
        for source in sources:
            decoding.merge(source.metrics.histogram)
        _histogram(latency, ["source"], decoding)
        for stage in pipeline.core_stages:
            _histogram(latency, [stage.name], stage.metrics.histogram)
            for reason, count in dict(stage.metrics.drops).items():
                stage_drops.add_metric([stage.name, reason], count)
        yield latency
        yield stage_drops

        to_publish = HistogramMetricFamily("vapipe_capture_to_publish_seconds", "From a frame's capture (leaving the "
                                           "decoder) to its message being sent", labels=["camera"])
        for camera, histogram in publish.latency.copy().items():
            _histogram(to_publish, [camera], histogram)
        yield to_publish

        messages = CounterMetricFamily("vapipe_published_messages", "Messages sent, per camera and kind (each "
                                       "subscriber counts its own losses from seq: ZeroMQ does not tell the publisher)",
                                       labels=["camera", "kind"])
        for camera, count in publish.seq.copy().items():
            messages.add_metric([camera, "detections"], count)
        for camera, count in publish.event_seq.copy().items():
            messages.add_metric([camera, "events"], count)
        if publish.preview is not None:
            for camera, count in publish.preview_seq.copy().items():
                messages.add_metric([camera, "preview"], count)
        yield messages
        yield CounterMetricFamily("vapipe_subscriptions", "Subscription notices the publisher received",
                                  value=publish.subscriptions)

        queues = GaugeMetricFamily("vapipe_queue_depth", "Items waiting between stages", labels=["queue"])
        for queue in pipeline.queues:
            queues.add_metric([queue.name], len(queue))
        yield queues
        infer = pipeline.infer
        yield GaugeMetricFamily("vapipe_lanes", "Inference lanes (CPU threads or GPU streams)", value=infer.lanes_total)
        yield GaugeMetricFamily("vapipe_lanes_busy", "Lanes with a batch in flight", value=infer.lanes_busy)
        yield GaugeMetricFamily("vapipe_host_slots_free", "Host slots (batch buffers) free", value=pipeline.pool.free)


def families_to_json(families) -> list:
    """Metric families as plain lists (a worker hands them to its supervisor)."""
    return [[f.name, f.documentation, f.type, [[s.name, s.labels, s.value] for s in f.samples]] for f in families]


class WorkersCollector:
    """The supervisor's view: every worker's families (fetched by `fetch()`: worker index -> the
    JSON of `families_to_json`, None for a worker that did not answer), merged by name, each sample
    labelled with its `worker`; plus `vapipe_worker_up`."""

    def __init__(self, fetch: Callable[[], dict[int, list | None]]):
        self.fetch = fetch

    def describe(self):
        return []

    def collect(self):
        merged: dict[str, Metric] = {}
        up = GaugeMetricFamily("vapipe_worker_up", "1 when the worker answered this scrape", labels=["worker"])
        for worker, families in sorted(self.fetch().items()):
            up.add_metric([str(worker)], 0.0 if families is None else 1.0)
            for name, documentation, kind, samples in families or []:
                family = merged.get(name)
                if family is None:
                    family = merged[name] = Metric(name, documentation, kind)
                for sample_name, labels, value in samples:
                    family.samples.append(Sample(sample_name, {**labels, "worker": str(worker)}, value))
        return [up, *merged.values()]
