#!/usr/bin/env python3
"""What operating it as a service costs (issue 14's targets), each part in one run, as ratios:

1. metrics   - pipeline fps and frames per CPU second on a clip with the HTTP server off, off again
               (the noise floor), and on with /metrics scraped every `--scrape-every` s (1 and 0.1)
               by another process, in interleaved rounds (target: < 2% fps cost)
2. scrape    - time of a /metrics scrape (HTTP round trip, from another process) with `--cameras`
               cameras running, in one process and through 2 worker processes (target: < 20 ms)
3. changes   - 4 paced cameras run; a fifth is added, then removed (HTTP API): the 4 lose no frame,
               and their capture-to-publish p99 during the changes vs before (target: within 20%)
4. curve     - pipeline fps with a subscriber receiving every message (and previews), CURVE keys
               off and on (target: within 5%)

Prints a table and appends it (date, machine, commit) to bench/results/service.md and .jsonl.

    python bench/service.py [--frames 300] [--repeat 5] [--cameras 64] [--parts metrics,scrape,changes,curve]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_cpu import clip_prefix, machine  # noqa: E402
from bench.common import CLIP, LABELS, MODEL, append_results, commit  # noqa: E402
from pipeline.config import parse_config  # noqa: E402

SCRAPER = """
import sys, time, urllib.request
url, every, out = sys.argv[1], float(sys.argv[2]), sys.argv[3]
times = []
while True:
    started = time.perf_counter()
    try:
        urllib.request.urlopen(url, timeout=10).read()
    except OSError:
        break
    times.append(time.perf_counter() - started)
    with open(out, "w") as f:
        f.write(" ".join(f"{t:.6f}" for t in times))
    time.sleep(max(0.0, every - (time.perf_counter() - started)))
"""

SUBSCRIBER = """
import sys, zmq
sys.path.insert(0, sys.argv[1])
from pipeline.keys import secure_client
socket = zmq.Context.instance().socket(zmq.SUB)
socket.setsockopt(zmq.RCVHWM, 100000)
secure_client(socket, *(sys.argv[3:5] if len(sys.argv) > 3 else (None, None)))
socket.setsockopt(zmq.SUBSCRIBE, b"")
socket.connect(sys.argv[2])
ends = 0
while ends < 1:
    parts = socket.recv_multipart()
    ends += b'"type":"end"' in parts[1]
"""


def base_config(clip: Path, port: int | None = None, cameras: int = 1, **extra) -> dict:
    config = {
        "cameras": [{"id": f"cam{i}", "url": str(clip)} for i in range(cameras)],
        "model": {"path": str(MODEL), "preset": "yolox", "labels": str(LABELS)},
        "engine": {"kind": "onnxruntime", "lanes": 2, "intra_op_threads": 1, "max_batch": 4},
        "publish": {"bind": "tcp://127.0.0.1:0"},
        "runtime": {"status_interval_s": 3600, "log_level": "warning"},
    }
    if port is not None:
        config["runtime"]["metrics_bind"] = f"127.0.0.1:{port}"
    for key, value in extra.items():
        config[key] = {**config.get(key, {}), **value}
    return config


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_threads_cpu() -> float:
    """CPU seconds so far of this process's HTTP threads (the event loop and the one that renders
    /metrics): what serving the scrapes cost inside the process. From schedstat, in ns: the 10 ms
    ticks of /proc's stat are coarser than a few scrapes."""
    total = 0.0
    for thread in threading.enumerate():
        if thread.name == "http" or thread.name.startswith("http-reads"):
            try:
                with open(f"/proc/self/task/{thread.native_id}/schedstat") as f:
                    total += int(f.read().split()[0]) / 1e9
            except OSError:
                continue
    return total


def run_pipeline(config: dict, scrape_every: float | None = None,
                 subscriber_keys: list[str] | None = None) -> tuple[float, float, float]:
    """(frames published a second, frames per CPU second of this process, share of that CPU time
    spent in the HTTP threads) over the whole clip (model load excluded), optionally with a scraper
    or a subscriber (another process) attached. Frames per CPU second is what other helpers' load on
    a shared machine barely moves. The scraper starts, and scrapes once, before the clock does: a
    Python process importing urllib costs ~0.1 s of CPU, 1-2% of a short run on 2 cores, which is
    the benchmark's set-up and not what metrics cost the pipeline."""
    import resource

    from pipeline.cameras import LocalCameras
    from pipeline.graph import Pipeline
    from pipeline.service import start_control_plane

    parsed = parse_config(config, "bench.yaml")
    cameras = LocalCameras(parsed)
    service = server = None
    if parsed.runtime.metrics_bind:
        service, server = start_control_plane(parsed, "bench.yaml", cameras)
    pipeline = Pipeline(parsed)
    cameras.pipeline = pipeline
    helper = None
    with tempfile.TemporaryDirectory() as folder:
        if scrape_every is not None:
            times = Path(folder) / "times"
            helper = subprocess.Popen([sys.executable, "-c", SCRAPER, f"http://127.0.0.1:{server.port}/metrics",
                                       str(scrape_every), str(times)])
            deadline = time.monotonic() + 60
            while not times.exists() and helper.poll() is None and time.monotonic() < deadline:
                time.sleep(0.01)
        if subscriber_keys is not None:
            helper = subprocess.Popen([sys.executable, "-c", SUBSCRIBER, str(ROOT), pipeline.endpoint, *subscriber_keys])
        usage = resource.getrusage(resource.RUSAGE_SELF)
        http_before = http_threads_cpu()
        started = time.perf_counter()
        pipeline.start()
        pipeline.wait()
        elapsed = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_SELF)
        http_cpu_s = http_threads_cpu() - http_before
        cpu_s = after.ru_utime + after.ru_stime - usage.ru_utime - usage.ru_stime
        frames = pipeline.publish.metrics.frames_out
        if helper is not None:
            if subscriber_keys is not None:
                helper.wait(60)
            helper.kill()
            helper.wait()
    if server is not None:
        server.stop()
        service.close()
    pipeline.close()
    return frames / elapsed, frames / cpu_s, http_cpu_s / cpu_s


def _pair(part: str, names: tuple[str, str], runs: tuple[list, list]) -> list[dict]:
    rows = []
    for name, values in zip(names, runs):
        fps = statistics.median(v[0] for v in values)
        per_cpu = statistics.median(v[1] for v in values)
        rows.append({"part": part, "variant": name, "fps": fps, "frames_per_cpu_s": per_cpu, "runs": values})
    rows[1]["ratio"] = rows[1]["fps"] / rows[0]["fps"]
    rows[1]["cpu_ratio"] = rows[1]["frames_per_cpu_s"] / rows[0]["frames_per_cpu_s"]
    return rows


def _spread(values: list[float]) -> str:
    return f"{min(values):.3f}-{max(values):.3f}"


def part_metrics(clip: Path, rounds: int, every: list[float]) -> list[dict]:
    """Each round runs every variant once, in the opposite order every other round (ABC CBA), so
    that the machine's drift hits each alike. A variant's ratio is the median over rounds of its run
    against the same round's "off" run, with the smallest and largest of those ratios; "off, again"
    is the noise floor: the ratio a change that does nothing gets on this machine right now."""
    variants = [("HTTP server off", None, False), ("HTTP server off, again (the noise floor)", None, False),
                *((f"/metrics scraped every {e:g} s", e, True) for e in every)]
    runs: dict[str, list] = {name: [] for name, _, _ in variants}
    run_pipeline(base_config(clip))  # warm-up, not counted: the first run of a process is slower
    for round_ in range(rounds):
        for name, scrape_every, on in (variants if round_ % 2 == 0 else variants[::-1]):
            config = base_config(clip, free_port()) if on else base_config(clip)
            runs[name].append(run_pipeline(config, scrape_every=scrape_every if on else None))
    base = runs[variants[0][0]]
    rows = []
    for name, _, on in variants:
        values = runs[name]
        row = {"part": "metrics", "variant": name, "fps": statistics.median(v[0] for v in values),
               "frames_per_cpu_s": statistics.median(v[1] for v in values), "runs": values}
        if values is not base:
            fps_ratios = [v[0] / b[0] for v, b in zip(values, base)]
            cpu_ratios = [v[1] / b[1] for v, b in zip(values, base)]
            row.update(ratio=statistics.median(fps_ratios), ratio_spread=_spread(fps_ratios),
                       cpu_ratio=statistics.median(cpu_ratios), cpu_ratio_spread=_spread(cpu_ratios))
        if on:
            row["http_cpu_share"] = statistics.median(v[2] for v in values)  # of the whole process's CPU time
        rows.append(row)
    return rows


def scrape_times(url: str, count: int) -> list[float]:
    out = subprocess.run([sys.executable, "-c", f"""
import time, urllib.request
times = []
for _ in range({count}):
    started = time.perf_counter()
    urllib.request.urlopen({url!r}, timeout=10).read()
    times.append(time.perf_counter() - started)
    time.sleep(0.1)
print(" ".join(f"{{t:.6f}}" for t in times))
"""], capture_output=True, text=True, timeout=600, check=True).stdout
    return [float(t) for t in out.split()]


def render_cost(clip: Path, cameras: int, count: int = 50) -> dict:
    """CPU time (this thread's) to render /metrics for a pipeline of `cameras` cameras, however busy
    the machine: what a scrape costs the process, apart from waiting for the interpreter."""
    from pipeline.exporter import pipeline_families, render
    from pipeline.graph import Pipeline

    pipeline = Pipeline(parse_config(base_config(clip, cameras=cameras), "bench.yaml"))
    times = []
    for _ in range(count):
        started = time.thread_time()
        body = render(pipeline_families(pipeline)).encode()
        times.append((time.thread_time() - started) * 1000)
    pipeline.close()
    times.sort()
    return {"part": "scrape", "variant": f"{cameras} cameras: rendering alone (CPU time of the thread)",
            "median_ms": statistics.median(times), "p90_ms": times[int(0.9 * len(times))], "max_ms": times[-1],
            "bytes": len(body), "samples": body.count(b"\n") - body.count(b"\n#")}


def part_scrape(cameras: int, folder: Path) -> list[dict]:
    """`cameras` paced cameras (1 fps each, a small clip) running; 50 scrapes from another process."""
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import small_clip

    clip = small_clip(folder / "paced.mp4", 20, 1)
    rows = [render_cost(clip, cameras)]
    for workers in (0, 2):
        port = free_port()
        config = base_config(clip, port, cameras, runtime={"workers": workers})
        for camera in config["cameras"]:
            camera.update(loop=True, realtime=True)
        path = folder / f"scrape-{workers}.yaml"
        path.write_text(json.dumps(config))
        process = subprocess.Popen([sys.executable, str(ROOT / "run.py"), "--config", str(path)], stderr=subprocess.DEVNULL)
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline and process.poll() is None:
                try:
                    if urllib.request.urlopen(f"{url}/readyz", timeout=5).status == 200:
                        break
                except OSError:
                    time.sleep(0.5)
            time.sleep(3)  # every camera running
            body = urllib.request.urlopen(f"{url}/metrics", timeout=10).read()
            times = scrape_times(f"{url}/metrics", 50)
        finally:
            process.terminate()
            process.wait(120)
        times_ms = sorted(t * 1000 for t in times)
        rows.append({"part": "scrape", "variant": f"{cameras} cameras, " + (f"{workers} workers" if workers else "one process"),
                     "median_ms": statistics.median(times_ms), "p90_ms": times_ms[int(0.9 * len(times_ms))],
                     "max_ms": times_ms[-1], "bytes": len(body), "samples": body.count(b"\n") - body.count(b"\n#")})
    return rows


def part_changes(folder: Path, fps: int, window_s: float = 15.0) -> list[dict]:
    """4 paced cameras; after a baseline window, a fifth is added and later removed through the HTTP
    API. The 4's latencies are compared before and during; their frame indexes must stay contiguous."""
    import zmq

    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import small_clip

    clip = small_clip(folder / "changes.mp4", 30, fps)
    port = free_port()
    config = base_config(clip, port, 4, publish={"bind": f"tcp://127.0.0.1:{free_port()}", "wait_subscribers": 1})
    for camera in config["cameras"]:
        camera.update(loop=True, realtime=True)
    path = folder / "changes.yaml"
    path.write_text(json.dumps(config))
    socket = zmq.Context.instance().socket(zmq.SUB)
    socket.setsockopt(zmq.SUBSCRIBE, b"det/")
    socket.connect(config["publish"]["bind"])
    received: list[tuple[float, dict]] = []
    stop = threading.Event()

    def listen():
        while not stop.is_set():
            if socket.poll(100):
                received.append((time.monotonic(), json.loads(socket.recv_multipart()[1])))

    listener = threading.Thread(target=listen)
    listener.start()
    process = subprocess.Popen([sys.executable, str(ROOT / "run.py"), "--config", str(path)], stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/cameras"
    marks = {}
    try:
        while not any(m.get("camera") == "cam3" for _, m in received):
            time.sleep(0.2)
        time.sleep(window_s)
        marks["add"] = time.monotonic()
        body = json.dumps({"id": "extra", "url": str(clip), "loop": True, "realtime": True}).encode()
        urllib.request.urlopen(urllib.request.Request(url, body, method="POST"), timeout=60).read()
        time.sleep(7)
        urllib.request.urlopen(urllib.request.Request(f"{url}/extra", method="DELETE"), timeout=60).read()
        marks["removed"] = time.monotonic()
        time.sleep(window_s)
        marks["end"] = time.monotonic()
    finally:
        process.terminate()
        process.wait(120)
        stop.set()
        listener.join()
        socket.close(0)
    others = [(t, m) for t, m in received if m["type"] == "detections" and m["camera"] != "extra"]
    lost = 0
    for camera in ("cam0", "cam1", "cam2", "cam3"):
        frames = [m["frame"] for _, m in others if m["camera"] == camera]
        lost += (frames[-1] - frames[0] + 1) - len(frames)
    first = others[0][0]

    def p99(lo, hi):
        values = sorted(m["latency_ms"]["total"] for t, m in others if lo <= t < hi)
        return values[min(len(values) - 1, int(0.99 * len(values)))], len(values)

    before, n_before = p99(first + 3, marks["add"])  # the first seconds warm up
    during, n_during = p99(marks["add"], marks["removed"] + 2)
    after, n_after = p99(marks["removed"] + 2, marks["end"])
    return [{"part": "changes", "variant": f"4 cameras at {fps} fps, p99 before (n={n_before})", "p99_ms": before},
            {"part": "changes", "variant": f"during add + remove of a 5th (n={n_during})", "p99_ms": during,
             "ratio": during / before, "frames_lost": lost},
            {"part": "changes", "variant": f"after (n={n_after})", "p99_ms": after, "ratio": after / before}]


def part_curve(clip: Path, repeat: int, folder: Path) -> list[dict]:
    from pipeline.keys import make_keys

    keys = folder / "keys"
    make_keys(keys, ["bench"])
    preview = {"preview": {"enabled": True, "max_fps": 30, "width": 640}, "wait_subscribers": 1}
    plain, curve = [], []
    for _ in range(repeat):
        plain.append(run_pipeline(base_config(clip, publish=preview), subscriber_keys=[]))
        secured = base_config(clip, publish={**preview, "keys": {"server": str(keys / "server.key_secret"),
                                                                 "clients": str(keys / "clients")}})
        curve.append(run_pipeline(secured, subscriber_keys=[str(keys / "server.key"), str(keys / "bench.key_secret")]))
    return _pair("curve", ("subscriber in the clear (previews at 30 fps)", "CURVE keys (same)"), (plain, curve))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=300)
    parser.add_argument("--repeat", type=int, default=5, help="rounds (metrics) or runs of each variant (curve)")
    parser.add_argument("--cameras", type=int, default=64)
    parser.add_argument("--scrape-every", default="1,0.1",
                        help="seconds between scrapes, one variant each; 0.1 scrapes 10x as often as Prometheus' "
                             "usual fastest, so that a cost too small to see at 1 s shows (about 10x)")
    parser.add_argument("--changes-fps", type=int, default=0,
                        help="fps of each of the 4 cameras; 0: a third of what this machine infers now, over 5 cameras")
    parser.add_argument("--window", type=float, default=15.0, help="changes: seconds before and after the add/remove")
    parser.add_argument("--parts", default="metrics,scrape,changes,curve")
    parser.add_argument("--note", default="", help="what else ran on the machine")
    args = parser.parse_args()
    parts = args.parts.split(",")
    load_before = os.getloadavg()[0]
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        clip = clip_prefix(args.frames, folder)
        if "metrics" in parts:
            rows += part_metrics(clip, args.repeat, [float(e) for e in args.scrape_every.split(",")])
        if "scrape" in parts:
            rows += part_scrape(args.cameras, folder)
        if "changes" in parts:
            fps = args.changes_fps
            if not fps:
                sys.path.insert(0, str(ROOT / "tests"))
                from conftest import engine_fps

                fps = int(max(1, min(10, engine_fps() / 15)))
            rows += part_changes(folder, fps, args.window)
        if "curve" in parts:
            rows += part_curve(clip, args.repeat, folder)
    load_after = os.getloadavg()[0]
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    header = (f"{stamp} | {machine()} | commit {commit()} | {args.frames} frames of {CLIP.name} | "
              f"{args.repeat} rounds, medians (ratios: median over rounds, smallest-largest) | "
              f"load average {load_before:.2f} before, {load_after:.2f} after" + (f" | {args.note}" if args.note else ""))
    lines = [f"### {header}", "", "| part | variant | fps | ratio | frames / CPU s | ratio | HTTP threads' CPU "
             "| scrape ms (median / p90 / max) | p99 ms | frames lost |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        fps = f"{row['fps']:.1f}" if "fps" in row else ""
        ratio = f"{row['ratio']:.3f}" if "ratio" in row else ""
        if "ratio_spread" in row:
            ratio += f" ({row['ratio_spread']})"
        scrape = (f"{row['median_ms']:.1f} / {row['p90_ms']:.1f} / {row['max_ms']:.1f} ({row['samples']} samples)"
                  if "median_ms" in row else "")
        p99 = f"{row['p99_ms']:.1f}" if "p99_ms" in row else ""
        per_cpu = f"{row['frames_per_cpu_s']:.1f}" if "frames_per_cpu_s" in row else ""
        cpu_ratio = f"{row['cpu_ratio']:.3f}" if "cpu_ratio" in row else ""
        if "cpu_ratio_spread" in row:
            cpu_ratio += f" ({row['cpu_ratio_spread']})"
        http = f"{row['http_cpu_share'] * 100:.2f}%" if "http_cpu_share" in row else ""
        lines.append(f"| {row['part']} | {row['variant']} | {fps} | {ratio} | {per_cpu} | {cpu_ratio} | {http} | {scrape} | "
                     f"{p99} | {row.get('frames_lost', '')} |")
    table = "\n".join(lines)
    print(table)
    append_results(ROOT / "bench" / "results", "service", table,
                   {"date": stamp, "machine": machine(), "commit": commit(), "frames": args.frames, "repeat": args.repeat,
                    "note": args.note, "load": [load_before, load_after], "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
