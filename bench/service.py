#!/usr/bin/env python3
"""What operating it as a service costs (issue 14's targets), each part in one run, as ratios:

1. metrics   - pipeline fps on a clip with the HTTP server off, and on with /metrics scraped every
               `--scrape-every` s by another process (target: < 2% fps cost)
2. scrape    - time of a /metrics scrape (HTTP round trip, from another process) with `--cameras`
               cameras running, in one process and through 2 worker processes (target: < 20 ms)
3. changes   - 4 paced cameras run; a fifth is added, then removed (HTTP API): the 4 lose no frame,
               and their capture-to-publish p99 during the changes vs before (target: within 20%)
4. curve     - pipeline fps with a subscriber receiving every message (and previews), CURVE keys
               off and on (target: within 5%)

Prints a table and appends it (date, machine, commit) to bench/results/service.md and .jsonl.

    python bench/service.py [--frames 300] [--repeat 3] [--cameras 64] [--parts metrics,scrape,changes,curve]
"""

from __future__ import annotations

import argparse
import datetime
import json
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


def run_pipeline(config: dict, scrape_every: float | None = None, subscriber_keys: list[str] | None = None) -> tuple[float, float]:
    """(frames published a second, frames per CPU second of this process) over the whole clip (model
    load excluded), optionally with a scraper or a subscriber (another process) attached. Frames per
    CPU second is what other helpers' load on a shared machine barely moves."""
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
            helper = subprocess.Popen([sys.executable, "-c", SCRAPER, f"http://127.0.0.1:{server.port}/metrics",
                                       str(scrape_every), f"{folder}/times"])
        if subscriber_keys is not None:
            helper = subprocess.Popen([sys.executable, "-c", SUBSCRIBER, str(ROOT), pipeline.endpoint, *subscriber_keys])
        usage = resource.getrusage(resource.RUSAGE_SELF)
        started = time.perf_counter()
        pipeline.start()
        pipeline.wait()
        elapsed = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_SELF)
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
    return frames / elapsed, frames / cpu_s


def _pair(part: str, names: tuple[str, str], runs: tuple[list, list]) -> list[dict]:
    rows = []
    for name, values in zip(names, runs):
        fps = statistics.median(v[0] for v in values)
        per_cpu = statistics.median(v[1] for v in values)
        rows.append({"part": part, "variant": name, "fps": fps, "frames_per_cpu_s": per_cpu, "runs": values})
    rows[1]["ratio"] = rows[1]["fps"] / rows[0]["fps"]
    rows[1]["cpu_ratio"] = rows[1]["frames_per_cpu_s"] / rows[0]["frames_per_cpu_s"]
    return rows


def part_metrics(clip: Path, repeat: int, every: float) -> list[dict]:
    off, on = [], []
    for _ in range(repeat):  # interleaved: drift on a busy machine hits both alike
        off.append(run_pipeline(base_config(clip)))
        on.append(run_pipeline(base_config(clip, free_port()), scrape_every=every))
    return _pair("metrics", ("HTTP server off", f"/metrics scraped every {every:g} s"), (off, on))


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
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--cameras", type=int, default=64)
    parser.add_argument("--scrape-every", type=float, default=1.0)
    parser.add_argument("--changes-fps", type=int, default=0,
                        help="fps of each of the 4 cameras; 0: a third of what this machine infers now, over 5 cameras")
    parser.add_argument("--window", type=float, default=15.0, help="changes: seconds before and after the add/remove")
    parser.add_argument("--parts", default="metrics,scrape,changes,curve")
    parser.add_argument("--note", default="", help="what else ran on the machine")
    args = parser.parse_args()
    parts = args.parts.split(",")
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        clip = clip_prefix(args.frames, folder)
        if "metrics" in parts:
            rows += part_metrics(clip, args.repeat, args.scrape_every)
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
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    header = (f"{stamp} | {machine()} | commit {commit()} | {args.frames} frames of {CLIP.name} | median of {args.repeat}"
              + (f" | {args.note}" if args.note else ""))
    lines = [f"### {header}", "", "| part | variant | fps | ratio | frames / CPU s | ratio | scrape ms (median / p90 / max) | p99 ms | frames lost |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        fps = f"{row['fps']:.1f}" if "fps" in row else ""
        ratio = f"{row['ratio']:.3f}" if "ratio" in row else ""
        scrape = (f"{row['median_ms']:.1f} / {row['p90_ms']:.1f} / {row['max_ms']:.1f} ({row['samples']} samples)"
                  if "median_ms" in row else "")
        p99 = f"{row['p99_ms']:.1f}" if "p99_ms" in row else ""
        per_cpu = f"{row['frames_per_cpu_s']:.1f}" if "frames_per_cpu_s" in row else ""
        cpu_ratio = f"{row['cpu_ratio']:.3f}" if "cpu_ratio" in row else ""
        lines.append(f"| {row['part']} | {row['variant']} | {fps} | {ratio} | {per_cpu} | {cpu_ratio} | {scrape} | {p99} | "
                     f"{row.get('frames_lost', '')} |")
    table = "\n".join(lines)
    print(table)
    append_results(ROOT / "bench" / "results", "service", table,
                   {"date": stamp, "machine": machine(), "commit": commit(), "frames": args.frames, "repeat": args.repeat,
                    "note": args.note, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
