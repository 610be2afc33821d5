#!/usr/bin/env python3
"""Where the metrics' cost could come from, each part measured alone (issue 14: metrics < 2% of fps).

bench/service.py compares whole runs with the HTTP server off and on; on a shared 2-core VM their
spread is larger than 2%, so this script measures the parts in isolation, in CPU time, which other
load barely moves:

1. bookkeeping - what the stages do per frame for the metrics (latency buckets, counters), in ns a
                 frame, from a real run's counts of observations per frame, against the CPU time a
                 frame costs in that run
2. idle server - the HTTP server's thread between scrapes: CPU time and wake-ups a second
3. scrape      - one /metrics scrape, in this process's CPU time (render, process metrics, aiohttp),
                 for 1 and for `--cameras` cameras, and the scraping client's own CPU time
4. threads     - runs with the HTTP server off and scraped every 1 s, interleaved: a frame's CPU
                 time by thread (inference lanes, HTTP threads, the rest)

Prints a table and appends it (date, machine, commit) to bench/results/metrics_cost.md and .jsonl.

    python bench/metrics_cost.py [--frames 300] [--cameras 64] [--scrapes 200]
"""

from __future__ import annotations

import argparse
import datetime
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_cpu import clip_prefix, machine  # noqa: E402
from bench.common import append_results, commit  # noqa: E402
from bench.service import base_config, free_port  # noqa: E402
from pipeline.config import parse_config  # noqa: E402


def process_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def thread_stat(native_id: int) -> tuple[float, int]:
    """(CPU seconds, voluntary + involuntary context switches) of one of this process's threads;
    CPU time from schedstat, in ns (/proc's stat counts 10 ms ticks)."""
    task = f"/proc/self/task/{native_id}"
    with open(f"{task}/schedstat") as f:
        cpu = int(f.read().split()[0]) / 1e9
    switches = 0
    with open(f"{task}/status") as f:
        for line in f:
            if "ctxt_switches:" in line:
                switches += int(line.split()[-1])
    return cpu, switches


def per_call_ns(function, calls: int = 200_000, rounds: int = 5) -> float:
    """Median over `rounds` of the thread CPU time of one call, in ns."""
    results = []
    for _ in range(rounds):
        started = time.thread_time_ns()
        for _ in range(calls):
            function()
        results.append((time.thread_time_ns() - started) / calls)
    return statistics.median(results)


def part_bookkeeping(clip: Path) -> list[dict]:
    """A real run of the clip gives the observations a frame causes; micro-timing gives their price."""
    import collections

    from pipeline.graph import Pipeline
    from pipeline.metrics import END_TO_END_BUCKETS_S, LatencyHistogram, StageMetrics

    pipeline = Pipeline(parse_config(base_config(clip), "bench.yaml"))
    before = process_cpu()
    pipeline.start()
    pipeline.wait()
    cpu_s = process_cpu() - before
    frames = pipeline.publish.metrics.frames_out
    stage_obs = sum(s.metrics.histogram.count for s in pipeline.sources)
    stage_obs += sum(s.metrics.histogram.count for s in pipeline.core_stages)
    publish_obs = sum(h.count for h in pipeline.publish.latency.values())
    pipeline.close()

    metrics = StageMetrics("x")
    record_ns = per_call_ns(lambda: metrics.record_latency(0.003))
    # what the status line alone needed before the Prometheus buckets: the lock and the window
    lock, window = threading.Lock(), collections.deque(maxlen=1024)

    def window_only():
        with lock:
            window.append(0.003)

    window_ns = per_call_ns(window_only)
    end_to_end = LatencyHistogram(END_TO_END_BUCKETS_S)
    observe_ns = per_call_ns(lambda: end_to_end.observe(0.04))
    per_frame_ns = (stage_obs * record_ns + publish_obs * observe_ns) / frames
    buckets_ns = (stage_obs * (record_ns - window_ns) + publish_obs * observe_ns) / frames
    frame_cpu_ns = cpu_s / frames * 1e9
    return [
        {"part": "bookkeeping", "variant": f"stage latency record (lock, window, buckets), {stage_obs / frames:.2f} a frame",
         "ns": record_ns},
        {"part": "bookkeeping", "variant": "of which lock and status-line window only (before the buckets)", "ns": window_ns},
        {"part": "bookkeeping", "variant": f"capture-to-publish bucket observe, {publish_obs / frames:.2f} a frame",
         "ns": observe_ns},
        {"part": "bookkeeping", "variant": f"all of it, a frame (a frame costs {frame_cpu_ns / 1e6:.2f} ms of CPU)",
         "ns": per_frame_ns, "share": per_frame_ns / frame_cpu_ns},
        {"part": "bookkeeping", "variant": "the Prometheus buckets alone, a frame", "ns": buckets_ns,
         "share": buckets_ns / frame_cpu_ns},
    ]


SCRAPER = """
import resource, sys, time, urllib.request
url, count = sys.argv[1], int(sys.argv[2])
urllib.request.urlopen(url, timeout=10).read()  # the first one (imports, connection set-up) not counted
usage = resource.getrusage(resource.RUSAGE_SELF)
start = usage.ru_utime + usage.ru_stime
for _ in range(count):
    urllib.request.urlopen(url, timeout=10).read()
usage = resource.getrusage(resource.RUSAGE_SELF)
print((usage.ru_utime + usage.ru_stime - start) / count)
"""


def serve(pipeline, config):
    from pipeline.cameras import LocalCameras
    from pipeline.service import start_control_plane

    cameras = LocalCameras(config)
    cameras.pipeline = pipeline
    return start_control_plane(config, "bench.yaml", cameras)


def http_thread(server) -> int:
    return server._thread.native_id


def part_idle(clip: Path, seconds: float) -> list[dict]:
    from pipeline.graph import Pipeline

    config = parse_config(base_config(clip, free_port()), "bench.yaml")
    pipeline = Pipeline(config)
    service, server = serve(pipeline, config)
    time.sleep(1.0)
    cpu0, switches0 = thread_stat(http_thread(server))
    time.sleep(seconds)
    cpu1, switches1 = thread_stat(http_thread(server))
    server.stop()
    service.close()
    pipeline.close()
    return [{"part": "idle server", "variant": f"HTTP thread, {seconds:g} s without requests: CPU ms a second / wake-ups a second",
             "ms": (cpu1 - cpu0) * 1000 / seconds, "per_s": (switches1 - switches0) / seconds}]


def part_scrape(clip: Path, cameras: int, scrapes: int) -> list[dict]:
    from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest

    from pipeline.exporter import pipeline_families, render
    from pipeline.graph import Pipeline

    rows = []
    for count in (1, cameras):
        config = parse_config(base_config(clip, free_port(), cameras=count), "bench.yaml")
        pipeline = Pipeline(config)
        service, server = serve(pipeline, config)
        render_ns = per_call_ns(lambda: render(pipeline_families(pipeline)).encode(), calls=max(20, 2000 // count), rounds=3)
        registry = CollectorRegistry(auto_describe=False)
        ProcessCollector(registry=registry)
        process_ns = per_call_ns(lambda: generate_latest(registry), calls=500, rounds=3)
        url = f"http://127.0.0.1:{server.port}/metrics"
        cpu0 = process_cpu()
        client = subprocess.run([sys.executable, "-c", SCRAPER, url, str(scrapes + 1)], capture_output=True, text=True,
                                check=True, timeout=600)
        # the first scrape and this process's idle threads are in the delta too: an upper bound
        server_ms = (process_cpu() - cpu0) * 1000 / (scrapes + 1)
        client_ms = float(client.stdout) * 1000
        server.stop()
        service.close()
        pipeline.close()
        rows += [{"part": "scrape", "variant": f"{count} camera(s): rendering the families", "ms": render_ns / 1e6},
                 {"part": "scrape", "variant": f"{count} camera(s): process metrics (prometheus-client)", "ms": process_ns / 1e6},
                 {"part": "scrape", "variant": f"{count} camera(s): whole scrape over HTTP, this process", "ms": server_ms},
                 {"part": "scrape", "variant": f"{count} camera(s): the scraping client (urllib, another process)", "ms": client_ms}]
    return rows


def tasks() -> dict[str, tuple[str, int]]:
    """tid -> (thread name, ns on the CPU so far) for every thread of this process (threads that
    Python did not start, ONNX Runtime's or FFmpeg's, by their kernel name)."""
    names = {str(t.native_id): t.name for t in threading.enumerate()}
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                comm = f.read().strip()
            with open(f"/proc/self/task/{tid}/schedstat") as f:
                out[tid] = (names.get(tid, comm), int(f.read().split()[0]))
        except OSError:
            pass  # ended
    return out


def group(name: str) -> str:
    if name.startswith("infer-lane"):
        return "inference lanes (ONNX Runtime)"
    if name == "http" or name.startswith("http-reads"):
        return "HTTP server (event loop, /metrics)"
    return "everything else (decode, letterbox, postprocess, publish, ...)"


def threads_run(clip: Path, scrape_every: float | None) -> tuple[float, dict[str, float]]:
    """One run of the clip: (frames per CPU second, ms of CPU a frame per group of threads)."""
    from bench.service import SCRAPER as SCRAPE_EVERY
    from pipeline.graph import Pipeline

    config = parse_config(base_config(clip, free_port() if scrape_every else None), "bench.yaml")
    pipeline = Pipeline(config)
    service = server = helper = None
    with tempfile.TemporaryDirectory() as folder:
        if scrape_every:
            service, server = serve(pipeline, config)
            times = Path(folder) / "times"
            helper = subprocess.Popen([sys.executable, "-c", SCRAPE_EVERY, f"http://127.0.0.1:{server.port}/metrics",
                                       str(scrape_every), str(times)])
            while not times.exists() and helper.poll() is None:
                time.sleep(0.01)
        before = tasks()
        last = dict(before)
        stop = threading.Event()

        def sample():  # stage threads end with the run: keep their last reading
            while not stop.wait(0.2):
                last.update(tasks())

        sampler = threading.Thread(target=sample, name="sampler")
        cpu0 = process_cpu()
        sampler.start()
        pipeline.start()
        pipeline.wait()
        stop.set()
        sampler.join()
        cpu = process_cpu() - cpu0
        last.update(tasks())
        if helper is not None:
            helper.kill()
            helper.wait()
    frames = pipeline.publish.metrics.frames_out
    groups: dict[str, float] = {}
    for tid, (name, ns) in last.items():
        if name == "sampler":
            continue
        key = group(name)
        groups[key] = groups.get(key, 0.0) + (ns - before.get(tid, (name, 0))[1]) / 1e6 / frames
    if server is not None:
        server.stop()
        service.close()
    pipeline.close()
    return frames / cpu, groups


def part_threads(clip: Path, rounds: int) -> list[dict]:
    """Off and scraped every 1 s, interleaved (ABBA): where a frame's CPU time goes in each, by
    thread. What moves between runs is the inference threads' CPU a frame; the HTTP threads are the
    metrics' whole in-process cost."""
    threads_run(clip, None)  # warm-up
    runs: dict[str, list] = {"HTTP server off": [], "/metrics scraped every 1 s": []}
    for round_ in range(rounds):
        order = list(runs) if round_ % 2 == 0 else list(runs)[::-1]
        for name in order:
            runs[name].append(threads_run(clip, 1.0 if name.startswith("/metrics") else None))
    rows = []
    for name, values in runs.items():
        per_cpu = [v[0] for v in values]
        keys = sorted({k for _, groups in values for k in groups})
        for key in keys:
            ms = [groups.get(key, 0.0) for _, groups in values]
            rows.append({"part": "threads", "variant": f"{name}: {key}, ms of CPU a frame (median; smallest-largest "
                         f"{min(ms):.3f}-{max(ms):.3f})", "ms": statistics.median(ms)})
        rows.append({"part": "threads", "variant": f"{name}: frames per CPU second (median; smallest-largest "
                     f"{min(per_cpu):.1f}-{max(per_cpu):.1f})", "per_s": statistics.median(per_cpu)})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=300)
    parser.add_argument("--cameras", type=int, default=64)
    parser.add_argument("--scrapes", type=int, default=200)
    parser.add_argument("--idle", type=float, default=10.0, help="seconds the idle server is watched")
    parser.add_argument("--rounds", type=int, default=4, help="threads: rounds of off and on")
    parser.add_argument("--parts", default="bookkeeping,idle,scrape,threads")
    parser.add_argument("--note", default="", help="what else ran on the machine")
    args = parser.parse_args()
    parts = args.parts.split(",")
    load = os.getloadavg()[0]
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        clip = clip_prefix(args.frames, Path(tmp))
        if "bookkeeping" in parts:
            rows += part_bookkeeping(clip)
        if "idle" in parts:
            rows += part_idle(clip, args.idle)
        if "scrape" in parts:
            rows += part_scrape(clip, args.cameras, args.scrapes)
        if "threads" in parts:
            rows += part_threads(clip, args.rounds)
    load_after = os.getloadavg()[0]
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    header = (f"{stamp} | {machine()} | commit {commit()} | load average {load:.2f} before, {load_after:.2f} after"
              + (f" | {args.note}" if args.note else ""))
    lines = [f"### {header}", "", "| part | what | ns a call | ms | a second | share of a frame's CPU |",
             "| --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        ns = f"{row['ns']:.0f}" if "ns" in row else ""
        ms = f"{row['ms']:.3f}" if "ms" in row else ""
        per_s = f"{row['per_s']:.1f}" if "per_s" in row else ""
        share = f"{row['share'] * 100:.3f}%" if "share" in row else ""
        lines.append(f"| {row['part']} | {row['variant']} | {ns} | {ms} | {per_s} | {share} |")
    table = "\n".join(lines)
    print(table)
    append_results(ROOT / "bench" / "results", "metrics_cost", table,
                   {"date": stamp, "machine": machine(), "commit": commit(), "load": [load, load_after],
                    "note": args.note, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
