"""Counters every stage keeps (items in/out, drops by reason, processing latency) and the status line.

Latencies are also counted into fixed histogram buckets (`LatencyHistogram`): a few list
increments per item, read only when Prometheus scrapes (pipeline/exporter.py).
"""

from __future__ import annotations

import bisect
import collections
import threading
import time

import numpy as np


# upper bounds in seconds: letterbox and postprocess take about 1 ms, a live frame's whole way ~100 ms
LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# capture to publish, one histogram per camera: fewer buckets (a scrape of 64 cameras renders them all)
END_TO_END_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class LatencyHistogram:
    """Counts of observations per bucket (not cumulative), their sum and count; thread-safe enough
    for one writer and scrapers that read a slightly stale copy."""

    __slots__ = ("bounds", "counts", "total_s", "count")

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS_S):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.total_s = 0.0
        self.count = 0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, seconds)] += 1
        self.total_s += seconds
        self.count += 1

    def merge(self, other: "LatencyHistogram") -> None:
        for i, n in enumerate(other.counts):
            self.counts[i] += n
        self.total_s += other.total_s
        self.count += other.count

    def cumulative(self) -> list[tuple[str, float]]:
        """Prometheus' buckets: (upper bound, observations <= it), ending with +Inf."""
        out, running = [], 0
        for bound, n in zip((*(repr(b) for b in self.bounds), "+Inf"), list(self.counts)):
            running += n
            out.append((bound, running))
        return out


class StageMetrics:
    def __init__(self, name: str, window: int = 1024):
        self.name = name
        self.items_in = 0
        self.items_out = 0
        self.frames_out = 0
        self.drops: collections.Counter[str] = collections.Counter()
        self._latency = collections.deque(maxlen=window)
        self.histogram = LatencyHistogram()
        self._lock = threading.Lock()

    def record_latency(self, seconds: float) -> None:
        with self._lock:
            self._latency.append(seconds)
            self.histogram.observe(seconds)

    def drop(self, reason: str, count: int = 1) -> None:
        with self._lock:
            self.drops[reason] += count

    def latency_ms(self, quantile: float = 0.5) -> float | None:
        with self._lock:
            if not self._latency:
                return None
            return float(np.quantile(np.fromiter(self._latency, float), quantile) * 1000.0)

    def snapshot(self) -> dict:
        with self._lock:
            drops = dict(self.drops)
        return {
            "in": self.items_in,
            "out": self.items_out,
            "frames_out": self.frames_out,
            "drops": drops,
            "latency_ms_p50": self.latency_ms(0.5),
            "latency_ms_p99": self.latency_ms(0.99),
        }


class StatusReporter:
    """Turns stage metrics into a periodic one-line status: frames, fps, per-stage latency, drops."""

    def __init__(self, metrics: list[StageMetrics], frames_done: StageMetrics):
        self.metrics = metrics
        self.frames_done = frames_done
        self._start = time.monotonic()
        self._last_time = self._start
        self._last_frames = 0

    def line(self) -> str:
        now = time.monotonic()
        frames = self.frames_done.frames_out
        fps = (frames - self._last_frames) / max(now - self._last_time, 1e-9)
        self._last_time, self._last_frames = now, frames
        stages = " ".join(
            f"{m.name}={m.latency_ms():.1f}ms" for m in self.metrics if m.latency_ms() is not None
        )
        drops = sum(sum(m.drops.values()) for m in self.metrics)
        detail = ",".join(f"{m.name}.{r}={n}" for m in self.metrics for r, n in sorted(m.drops.items()))
        return f"frames={frames} fps={fps:.1f} {stages} drops={drops}" + (f" ({detail})" if detail else "")

    def summary(self) -> dict:
        elapsed = time.monotonic() - self._start
        frames = self.frames_done.frames_out
        return {
            "frames": frames,
            "seconds": round(elapsed, 3),
            "fps": round(frames / max(elapsed, 1e-9), 2),
            "stages": {m.name: m.snapshot() for m in self.metrics},
        }
