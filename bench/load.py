#!/usr/bin/env python3
"""Load benchmark: how many live 1080p30 cameras the pipeline carries on this machine.

Each camera is a synthetic 1080p30 H.264 file (no B-frames, one keyframe a second, as IP
cameras send) played as a live camera: packets are paced to their timestamps, looped, and the
camera queue keeps the newest frames (drops are counted, never hidden). For each N the real
`run.py` runs as its own process (with its worker processes, if configured); a ZeroMQ
subscriber here receives every detection message and measures, over a window after warm-up:

- fps per stream (min and mean) and in total;
- capture-to-publish latency p50/p99 (capture = when the frame's packet was due; so decode
  time and any queueing count);
- frames lost (gaps in each camera's frame numbers: dropped in queues or never published);
- CPU cores used by the pipeline's processes and GPU / NVDEC utilisation (NVML);
- start-up: seconds from launching `run.py` to every camera publishing (with a compiled engine and
  many workers, loading the artifacts is most of it), and start spread: seconds from the first
  camera's first message to the last camera's (the preroll makes them start together).

A stream count passes when, in every one of `--windows` consecutive windows (3 by default: one
10 s window's p99 is noisy), every stream holds >= 95% of 30 fps, the total >= 98% of N x 30 and
p99 <= 100 ms; the table shows each window's p99 and the worst. The largest passing N is
reported per decoder.

    python bench/load.py --decoders cpu,nvdec --streams 32,48,64,80 [--workers 4] [--profile]
    python bench/load.py --quick      # the GPU check after a change to the GPU path: 64 NVDEC cameras,
                                      # 8 a worker, one window; a few minutes
    python bench/load.py --quick --input-shapes square,rect   # rect vs square letterbox in one run

`--input-shapes` runs each count with `model.letterbox` square and rect (1080p: 416x416 vs
416x256); "GPU ms/frame" is NVML's busy share of the window divided by the frames published (a
proxy for GPU time per frame, comparable between the two at one camera count), and "infer p50" the
median of the frames' `latency_ms.infer` (their batch's GPU wall time, lane wait included).
"""

from __future__ import annotations

import argparse
import datetime
from fractions import Fraction
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import av
import yaml
import zmq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import CLIP, LABELS, MODEL, append_results, commit  # noqa: E402

FPS = 30
VARIANTS = 4  # clips whose keyframes fall on different frames, so cameras do not all send I-frames at once


def make_clips(folder: Path, seconds: int = 10, source: Path = CLIP, variants: int = VARIANTS) -> list[Path]:
    """1080p30 H.264 clips made from `source`: no B-frames, keyframe every second, phase shifted per clip."""
    clips = []
    with av.open(str(source)) as src:
        frames = [f.reformat(width=1920, height=1080, format="yuv420p") for _, f in zip(range(seconds * FPS), src.decode(video=0))]
    for variant in range(variants):
        path = folder / f"live1080p_{seconds}s_{variant}.mp4"
        clips.append(path)
        if path.exists():
            continue
        shift = variant * FPS // variants
        with av.open(str(path), "w") as dst:
            stream = dst.add_stream("libx264", rate=FPS)
            stream.width, stream.height, stream.pix_fmt = 1920, 1080, "yuv420p"
            stream.options = {"preset": "veryfast", "tune": "zerolatency", "bf": "0",
                              "x264-params": f"keyint={seconds * FPS}:min-keyint={seconds * FPS}:scenecut=0"}
            for i, frame in enumerate(frames):
                frame.pts, frame.time_base = i, Fraction(1, FPS)
                frame.pict_type = av.video.frame.PictureType.I if (i + shift) % FPS == 0 or i == 0 else av.video.frame.PictureType.NONE
                for packet in stream.encode(frame):
                    dst.mux(packet)
            for packet in stream.encode():
                dst.mux(packet)
    return clips


def workers_for(streams: int, args) -> int:
    if args.streams_per_worker:
        return -(-streams // args.streams_per_worker)
    return args.workers


def pipeline_config(clips: list[Path], streams: int, decoder: str, port: int, args, live: bool = True) -> dict:
    """Cameras played live (paced, newest frames kept) or, with live=False, as files read as fast as
    the pipeline goes (looped, nothing dropped): the throughput comparison's setting."""
    cameras = [{"id": f"cam{i:03d}", "url": str(clips[i % len(clips)]), "live": live, "realtime": live, "loop": True,
                "decoder": decoder, "decode_threads": args.decode_threads, "color_conversion": "opencv"}
               for i in range(streams)]
    return {
        "cameras": cameras,
        "model": {"path": str(args.model), "preset": args.preset, "labels": str(args.labels) if args.labels else None,
                  "letterbox": getattr(args, "input_shape", "rect")},
        "engine": {"kind": args.engine, "lanes": args.lanes, "max_batch": args.max_batch,
                   "batch_timeout_ms": args.batch_timeout_ms,
                   **({"fp16": True, "cuda_graphs": True, "compile": args.compile} if args.engine == "torch" else {})},
        "publish": {"bind": f"tcp://127.0.0.1:{port}", "send_hwm": 100000},
        "runtime": {"status_interval_s": 5, "shutdown_deadline_s": 10, "queue_size": 8, "host_slots": args.lanes + 3,
                    "live_batches_in_flight": args.lanes + 1, "letterbox_threads": args.letterbox_threads,
                    "letterbox_device": args.letterbox, "workers": workers_for(streams, args),
                    "worker_devices": list(range(getattr(args, "gpus_used", 1)))},
    }


class Collector(threading.Thread):
    """Receives detection messages; keeps (camera, frame, capture, publish, received) in the window."""

    def __init__(self, endpoint: str):
        super().__init__(daemon=True)
        self.socket = zmq.Context.instance().socket(zmq.SUB)
        self.socket.setsockopt(zmq.RCVHWM, 0)
        self.socket.setsockopt(zmq.SUBSCRIBE, b"det/")
        self.socket.connect(endpoint)
        self.window: tuple[float, float] | None = None
        self.first_message: float | None = None
        # before the window: has every camera published yet? (topic -> when its first message came)
        self.cameras_seen: dict[bytes, float] = {}
        self.rows: list[tuple[str, int, float, float, float, float]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            if not self.socket.poll(100):
                continue
            topic, header = self.socket.recv_multipart()[:2]
            now = time.time()
            if self.first_message is None:
                self.first_message = now
            if self.window is None:
                self.cameras_seen.setdefault(topic, now)
            window = self.window
            if window is None or not (window[0] <= now < window[1]):
                continue
            message = json.loads(header)
            if message.get("type") == "detections":
                self.rows.append((message["camera"], message["frame"], message["capture_time"], message["publish_time"], now,
                                  message.get("latency_ms", {}).get("infer", float("nan"))))
        self.socket.close(0)


def _process_tree_cpu(pid: int) -> float:
    try:
        import psutil
    except ImportError:  # CPU use is then reported as unknown
        return float("nan")

    try:
        parent = psutil.Process(pid)
        total = sum(parent.cpu_times()[:2])
        for child in parent.children(recursive=True):
            try:
                total += sum(child.cpu_times()[:2])
            except psutil.Error:
                pass
        return total
    except psutil.Error:
        return 0.0


class GpuSampler(threading.Thread):
    """NVML utilisation (SM busy %, NVDEC busy %) every 0.25 s, averaged over the GPUs the run uses
    (0..devices-1). Rows before 2026-11-28 evening averaged over every GPU of the machine, so on a
    4-GPU machine a 1-GPU row read a quarter of its GPU's busy share (and of its GPU ms/frame)."""

    def __init__(self, devices: int = 1):
        super().__init__(daemon=True)
        self.samples: list[tuple[float, float]] = []
        self.stop = threading.Event()
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nvml = pynvml
            count = min(devices, pynvml.nvmlDeviceGetCount())
            self.handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
        except Exception:  # no NVML (CPU machine): utilisation is reported as unknown
            self.nvml = None

    def run(self) -> None:
        while self.nvml is not None and not self.stop.wait(0.25):
            gpu = statistics.mean(self.nvml.nvmlDeviceGetUtilizationRates(h).gpu for h in self.handles)
            dec = statistics.mean(self.nvml.nvmlDeviceGetDecoderUtilization(h)[0] for h in self.handles)
            self.samples.append((gpu, dec))


def measure(clips: list[Path], streams: int, decoder: str, args, workdir: Path, live: bool = True) -> dict:
    port = 5600 + streams + (1000 if decoder == "nvdec" else 0) + (0 if live else 2000)
    config_path = workdir / f"load_{decoder}_{streams}_{getattr(args, 'input_shape', 'rect')}.yaml"
    config_path.write_text(yaml.safe_dump(pipeline_config(clips, streams, decoder, port, args, live)))
    log_path = workdir / f"load_{decoder}_{streams}_{getattr(args, 'input_shape', 'rect')}.log"
    collector = Collector(f"tcp://127.0.0.1:{port}")
    collector.start()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, str(ROOT / "run.py"), "run", "--config", str(config_path)],
                                   stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    result: dict = {"streams": streams, "decoder": decoder, "workers": workers_for(streams, args)}
    try:
        launched = time.time()
        deadline = launched + args.startup_timeout
        # every camera (every worker) must be up before the warm-up starts
        while len(collector.cameras_seen) < streams and time.time() < deadline and process.poll() is None:
            time.sleep(0.2)
        result["startup_s"] = round(time.time() - launched, 1)  # from launch to every camera publishing
        firsts = list(collector.cameras_seen.values())
        # from the first camera's first message to the last one's: how together they started (the preroll)
        result["start_spread_s"] = round(max(firsts) - min(firsts), 1) if firsts else None
        if len(collector.cameras_seen) < streams:
            if process.poll() is not None:
                last = [line for line in log_path.read_text(errors="replace").splitlines() if line.strip()][-1:]
                result["error"] = f"pipeline exited with {process.returncode}: {last[0][:300] if last else '(no output)'}"
            else:
                result["error"] = f"{len(collector.cameras_seen)} of {streams} cameras published within {args.startup_timeout} s"
            return result
        time.sleep(args.warmup)
        gpu = GpuSampler(getattr(args, "gpus_used", 1))
        start = time.time()
        cpu_before = _process_tree_cpu(process.pid)
        measured_s = args.duration * args.windows
        collector.window = (start, start + measured_s)
        gpu.start()
        profile = None
        if args.profile and shutil.which("py-spy"):
            profile = subprocess.Popen(["py-spy", "record", "--pid", str(process.pid), "--subprocesses", "--rate", "50",
                                        "--duration", str(int(measured_s)), "--format", "raw", "--nonblocking",
                                        "--output", str(workdir / f"profile_{decoder}_{streams}_{getattr(args, 'input_shape', 'rect')}.txt")],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(measured_s)
        cpu_used = _process_tree_cpu(process.pid) - cpu_before
        gpu.stop.set()
        if profile is not None:
            profile.wait(timeout=30)
        windows = [summarize([r for r in collector.rows if start + i * args.duration <= r[4] < start + (i + 1) * args.duration],
                             streams, args.duration) for i in range(args.windows)]
        result.update(combine(windows))
        result["cpu_cores"] = round(cpu_used / measured_s, 2)
        if gpu.samples:
            result["gpu_util_pct"] = round(statistics.mean(s[0] for s in gpu.samples), 1)
            result["nvdec_util_pct"] = round(statistics.mean(s[1] for s in gpu.samples), 1)
            if result.get("fps_total"):  # busy share of a second, summed over the GPUs used / frames a second
                result["gpu_ms_per_frame"] = round(10.0 * result["gpu_util_pct"] * len(gpu.handles) / result["fps_total"], 4)
        infer = sorted(r[5] for r in collector.rows if r[5] == r[5])
        result["infer_p50_ms"] = round(infer[len(infer) // 2], 2) if infer else None
        return result
    finally:
        collector.stop.set()
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        collector.join(timeout=5)
        result["exit_code"] = process.returncode


def summarize(rows: list, streams: int, seconds: float) -> dict:
    per_camera: dict[str, list] = {}
    for row in rows:
        per_camera.setdefault(row[0], []).append(row)
    fps = [len(per_camera.get(f"cam{i:03d}", [])) / seconds for i in range(streams)]
    latency = sorted((r[3] - r[2]) * 1000.0 for r in rows)
    lost = sum(max(0, (max(r[1] for r in v) - min(r[1] for r in v) + 1) - len(v)) for v in per_camera.values())

    def pct(p: float) -> float:
        return round(latency[min(len(latency) - 1, int(p / 100.0 * len(latency)))], 1) if latency else float("nan")

    out = {"fps_total": round(len(rows) / seconds, 1), "fps_stream_min": round(min(fps), 2),
           "fps_stream_mean": round(statistics.mean(fps), 2), "latency_p50_ms": pct(50), "latency_p99_ms": pct(99),
           "latency_max_ms": round(latency[-1], 1) if latency else float("nan"), "lost_frames": lost}
    out["pass"] = bool(latency) and out["fps_stream_min"] >= 0.95 * FPS and out["fps_total"] >= 0.98 * FPS * streams \
        and out["latency_p99_ms"] <= 100.0
    return out


def combine(windows: list[dict]) -> dict:
    """One verdict from consecutive windows: the worst of each figure, and a pass only if every window passed."""
    out = {"windows": windows, "pass": all(w["pass"] for w in windows),
           "fps_total": round(statistics.mean(w["fps_total"] for w in windows), 1),
           "fps_stream_min": min(w["fps_stream_min"] for w in windows),
           "fps_stream_mean": round(statistics.mean(w["fps_stream_mean"] for w in windows), 2),
           "latency_p50_ms": max(w["latency_p50_ms"] for w in windows),
           "latency_p99_ms": max(w["latency_p99_ms"] for w in windows),
           "latency_p99_ms_windows": [w["latency_p99_ms"] for w in windows],
           "latency_max_ms": max(w["latency_max_ms"] for w in windows),
           "lost_frames": sum(w["lost_frames"] for w in windows)}
    return out


def top_functions(profile: Path, limit: int = 12) -> list[tuple[str, float]]:
    """py-spy raw (collapsed) stacks -> share of samples per innermost project/library function."""
    counts: dict[str, int] = {}
    total = 0
    for line in profile.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        frames = stack.split(";")
        total += int(n)
        leaf = frames[-1]
        counts[leaf] = counts.get(leaf, 0) + int(n)
    return [(name, 100.0 * n / total) for name, n in sorted(counts.items(), key=lambda kv: -kv[1])[:limit]] if total else []


def largest_passing(results: list[dict], decoder: str, input_shape: str, gpus_used: int) -> int:
    return max((r["streams"] for r in results if r["decoder"] == decoder and r["input_shape"] == input_shape
                and r["gpus_used"] == gpus_used and r.get("pass")), default=0)


def build_parser() -> argparse.ArgumentParser:
    """The benchmark's options; bench/compare_ultralytics.py takes its pipeline settings from here too."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--decoders", default="cpu,nvdec")
    parser.add_argument("--streams", default="32,48,64,80,96", help="stream counts to try, ascending")
    parser.add_argument("--stop-after-fail", type=int, default=1, help="stop a decoder's ramp after this many failures")
    parser.add_argument("--workers", type=int, default=0, help="pipeline worker processes (0 = one process)")
    parser.add_argument("--streams-per-worker", type=int, default=0,
                        help="instead of --workers: one worker per this many streams (rounded up)")
    parser.add_argument("--engine", default="torch", choices=["torch", "tensorrt", "onnxruntime"],
                        help="torch: fp16 + CUDA graphs; onnxruntime only to try the harness on a CPU machine")
    parser.add_argument("--compile", action="store_true",
                        help="torch engine: engine.compile (inductor); artifacts cached in cache/torch, so only the first "
                             "worker of the first count compiles (--startup-timeout allows 420 s for that)")
    parser.add_argument("--gpus", default="1",
                        help="GPU counts to run, e.g. 1,4: the workers are spread over GPUs 0..N-1, and with several "
                             "counts the --streams values are per GPU (1,4 with --streams 128,144 runs 128,144 on one GPU "
                             "and 512,576 on four), so the scaling is measured in one run")
    parser.add_argument("--lanes", type=int, default=3)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--batch-timeout-ms", type=float, default=8.0)
    parser.add_argument("--decode-threads", type=int, default=1, help="CPU decoder threads per camera")
    parser.add_argument("--letterbox", default="auto", choices=["auto", "cpu", "gpu"])
    parser.add_argument("--input-shapes", default="rect", help="model.letterbox values to run each count with: rect, square or both")
    parser.add_argument("--letterbox-threads", type=int, default=4)
    parser.add_argument("--model", type=Path, default=MODEL)
    parser.add_argument("--preset", default="yolox")
    parser.add_argument("--labels", type=lambda v: Path(v) if v else None, default=LABELS, help="class names ('' for none)")
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds a window")
    parser.add_argument("--windows", type=int, default=3, help="consecutive windows a stream count must pass")
    parser.add_argument("--quick", action="store_true",
                        help="the quick GPU check: --decoders nvdec --streams 64 --streams-per-worker 8 --windows 1")
    parser.add_argument("--startup-timeout", type=float, default=None,
                        help="seconds for every camera to publish (default 90; 420 with --compile, whose first start "
                             "compiles: 118 s for 64 cameras on an H100 at 547ed47)")
    parser.add_argument("--profile", action="store_true", help="py-spy the pipeline during each window")
    parser.add_argument("--clips", type=Path, default=None, help="folder for the generated clips (kept)")
    parser.add_argument("--label", default="", help="a note for the results table")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    return parser


def main() -> int:
    args = build_parser().parse_args()
    if args.startup_timeout is None:  # a first compiled start failed the 90 s of an eager one
        args.startup_timeout = 420.0 if args.compile else 90.0
    if args.quick:
        args.decoders, args.streams, args.streams_per_worker, args.windows = "nvdec", "64", args.streams_per_worker or 8, 1
        args.label = " ".join(filter(None, ["quick", args.label]))

    workdir = Path(tempfile.mkdtemp(prefix="load-"))
    clip_dir = args.clips or workdir
    clip_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    clips = make_clips(clip_dir)
    print(f"clips ready in {time.time() - started:.1f} s", flush=True)
    from pipeline import cuda

    card = cuda.device_name() if cuda.available() else "no GPU"
    gpus = cuda.check(cuda._rt().cudaGetDeviceCount()) if cuda.available() else 0
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    title = (f"{stamp} | {gpus} x {card} | {os.cpu_count()} CPU cores | commit {commit()} | "
             f"workers {f'1 per {args.streams_per_worker} streams' if args.streams_per_worker else args.workers} | "
             f"GPUs used {args.gpus} | "
             f"lanes {args.lanes} | max_batch {args.max_batch} | letterbox {args.letterbox} | "
             + ("engine compiled | " if args.compile else "")
             + f"{args.windows} x {args.duration:g} s windows"
             + (f" | {args.label}" if args.label else ""))
    header = ("| input | decoder | GPUs | streams | workers | start s | start spread s | pass | fps total | fps/stream min | mean | p50 ms | p99 ms (worst) | "
              "p99 ms per window | max ms | lost | CPU cores | GPU % | NVDEC % | GPU ms/frame | infer p50 ms |")
    lines = [f"# Load: {title}", "", header, "| " + " | ".join(["---"] * 21) + " |"]
    print("\n".join(lines), flush=True)
    results = []
    gpu_counts = [int(n) for n in args.gpus.split(",")]
    if max(gpu_counts) > max(gpus, 1):
        print(f"--gpus {args.gpus}: this machine has {gpus} GPU(s)", file=sys.stderr)
        return 2
    # a run stopped by a time limit (timeout's SIGTERM) or Ctrl-C still writes the counts it measured
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        ramp(clips, args, workdir, gpu_counts, results, lines)
    except KeyboardInterrupt:
        lines.append("\n(stopped by a signal: the rows above are all that ran)")
        print(lines[-1], flush=True)
    summarize_scaling(args, gpu_counts, results, lines)
    text = "\n".join(lines)
    print(f"\n{text}")
    append_results(args.out, "load", text, {"date": stamp, "card": card, "gpus": gpus, "commit": commit(), "args": vars(args),
                                            "results": results})
    return 0


def _interrupt(_signum, _frame) -> None:
    raise KeyboardInterrupt


def ramp(clips: list[Path], args, workdir: Path, gpu_counts: list[int], results: list[dict], lines: list[str]) -> None:
    """Each decoder, input shape and GPU count: the stream counts in turn, until --stop-after-fail fail."""
    for decoder, input_shape, gpus_used in [(d, s, g) for d in args.decoders.split(",") for s in args.input_shapes.split(",")
                                            for g in gpu_counts]:
        args.input_shape, args.gpus_used = input_shape, gpus_used
        failures = 0
        scale = gpus_used if len(gpu_counts) > 1 else 1  # several GPU counts: --streams is per GPU
        for streams in [int(n) * scale for n in args.streams.split(",")]:
            r = measure(clips, streams, decoder, args, workdir)
            r["input_shape"], r["gpus_used"] = input_shape, gpus_used
            results.append(r)
            if "error" in r:
                line = f"| {input_shape} | {decoder} | {gpus_used} | {streams} | error: {r['error']} |"
            else:
                line = (f"| {input_shape} | {decoder} | {gpus_used} | {streams} | {r['workers']} | {r['startup_s']} | {r['start_spread_s']} | {'yes' if r['pass'] else 'no'} | {r['fps_total']} | {r['fps_stream_min']} | "
                        f"{r['fps_stream_mean']} | {r['latency_p50_ms']} | {r['latency_p99_ms']} | "
                        f"{' / '.join(str(v) for v in r['latency_p99_ms_windows'])} | {r['latency_max_ms']} | "
                        f"{r['lost_frames']} | {r['cpu_cores']} | {r.get('gpu_util_pct', '?')} | {r.get('nvdec_util_pct', '?')} | "
                        f"{r.get('gpu_ms_per_frame', '?')} | {r.get('infer_p50_ms', '?')} |")
            lines.append(line)
            print(line, flush=True)
            log_tail = (workdir / f"load_{decoder}_{streams}_{input_shape}.log").read_text(errors="replace").splitlines()
            prerolls = [l for l in log_tail if "preroll:" in l]
            if prerolls:  # one line a worker: the slowest opening
                print(f"  log: {len(prerolls)} preroll line(s), slowest: {max(prerolls, key=_preroll_s)[:300]}", flush=True)
            status = [l for l in log_tail if " fps=" in l or "ERROR" in l or "WARNING" in l]
            for l in status[-4:]:
                print(f"  log: {l[:400]}", flush=True)
            profile = workdir / f"profile_{decoder}_{streams}_{input_shape}.txt"
            if profile.exists():
                top = top_functions(profile)
                r["profile_top"] = top
                print("  profile (innermost frames, % of samples): " + "; ".join(f"{n} {p:.1f}%" for n, p in top), flush=True)
            if "error" in r or not r["pass"]:
                failures += 1
                if failures >= args.stop_after_fail:
                    break
        best = largest_passing(results, decoder, input_shape, gpus_used)
        lines.append(f"| {input_shape} | {decoder} | {gpus_used} | largest passing N: **{best}** |")


def _preroll_s(line: str) -> float:
    """Seconds of a 'preroll: N camera(s) opened in X s' log line (0 for another preroll line)."""
    match = re.search(r"opened in ([\d.]+) s", line)
    return float(match.group(1)) if match else 0.0


def summarize_scaling(args, gpu_counts: list[int], results: list[dict], lines: list[str]) -> None:
    for decoder, input_shape in [(d, s) for d in args.decoders.split(",") for s in args.input_shapes.split(",")]:
        one = largest_passing(results, decoder, input_shape, gpu_counts[0])
        for more in gpu_counts[1:]:  # scaling, in this run: cameras carried on N GPUs / on the first count's
            many = largest_passing(results, decoder, input_shape, more)
            lines.append(f"\n{input_shape}, {decoder}: {more} GPUs carry {many} cameras, {gpu_counts[0]} carries {one}: "
                         f"**{many / one:.2f}x**" if one else f"\n{input_shape}, {decoder}: {gpu_counts[0]} GPU(s) passed no count")
    for r in results:  # rect vs square at the same count, in this run
        twin = next((s for s in results if s["input_shape"] == "square" and s["decoder"] == r["decoder"]
                     and s["streams"] == r["streams"] and s["gpus_used"] == r["gpus_used"]), None)
        if r["input_shape"] == "rect" and twin and r.get("gpu_ms_per_frame") and twin.get("gpu_ms_per_frame"):
            lines.append(f"\n{r['decoder']}, {r['streams']} cameras: GPU ms/frame square / rect = "
                         f"**{twin['gpu_ms_per_frame'] / r['gpu_ms_per_frame']:.2f}x** (target >= 1.4x); infer p50 "
                         f"{twin.get('infer_p50_ms')} / {r.get('infer_p50_ms')} ms")


if __name__ == "__main__":
    sys.exit(main())
