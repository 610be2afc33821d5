#!/usr/bin/env python3
"""Tracking benchmark: accuracy against supervision's ByteTrack, cost a frame, and pipeline fps.

1. Accuracy: motmetrics' MOTChallenge ground truth (TUD-Campus, TUD-Stadtmitte) made into
   detector-like input by a seeded generator (misses, box jitter, a spread of scores with some weak
   detections, false positives) at two noise levels; our tracker and supervision's `ByteTrack` run
   on the same input in the same run, both with their defaults at the sequence's frame rate;
   MOTA, IDF1 and ID switches from motmetrics (IoU >= 0.5), over every sequence and seed.
2. Cost: one camera with 50 moving objects, milliseconds an update (median and p90), for our
   tracker alone, with a counting line and a zone, for supervision's ByteTrack, and for our tracker
   as first merged (read from git at --reference, run in turns with ours), so that the ratio holds
   however busy the machine is.
3. Pipeline: the real pipeline on the demo clip with tracking off and on (and a counting line),
   interleaved rounds, median fps of each and their ratio.
4. Same outputs: our tracker and the tracker at --same-as (read from git) on the accuracy inputs, the
   cost scene and a scene of three classes with dropped frames and a clock that goes back, under
   several settings: the same track ids, ages and ended tracks every frame, or the first frame that
   differs. A faster tracker must pass this against the one it replaces.

Needs `pip install -r requirements-bench.txt` (motmetrics, supervision < 0.30: its ByteTrack was
removed in 0.30). Prints a table and appends it to bench/results/tracking.md and .jsonl.

    python bench/tracking.py [--seeds 3] [--cost-frames 2000] [--frames 600] [--repeat 3]
    python bench/tracking.py --parts same --same-as COMMIT
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_cpu import clip_prefix, count_frames, machine  # noqa: E402
from bench.common import CLIP, LABELS, MODEL, append_results, commit, timed_pipeline  # noqa: E402
from pipeline.analytics import Analytics  # noqa: E402
from pipeline.config import LineConfig, ZoneConfig  # noqa: E402
from pipeline.record import Detections  # noqa: E402
from pipeline.tracking import ByteTracker, iou_matrix  # noqa: E402

SEQUENCES = {"TUD-Campus": 25.0, "TUD-Stadtmitte": 25.0}  # MOTChallenge 2015: 640x480 at 25 fps
IMAGE_WH = (640, 480)
NOISE = {
    # miss: a ground-truth box is not detected; jitter: std of each edge, relative to the box size;
    # weak: share of detections with a low score (0.1-0.5, as partly hidden people get); fp: false
    # positives a frame (Poisson), scored 0.1-0.6
    "low": {"miss": 0.05, "jitter": 0.03, "weak": 0.10, "fp": 0.3},
    "high": {"miss": 0.20, "jitter": 0.08, "weak": 0.30, "fp": 1.5},
}


def load_gt(name: str) -> dict[int, np.ndarray]:
    """frame -> [n, 5] rows of (id, x, y, w, h) from motmetrics' copy of the MOTChallenge ground truth."""
    import motmetrics

    path = Path(motmetrics.__file__).parent / "data" / name / "gt.txt"
    rows = np.loadtxt(path, delimiter=",")
    rows = rows[rows[:, 6] != 0]  # conf 0 = ignore
    return {int(f): rows[rows[:, 0] == f][:, 1:6] for f in np.unique(rows[:, 0])}


def noisy(gt: dict[int, np.ndarray], level: dict, seed: int) -> dict[int, Detections]:
    rng = np.random.default_rng(seed)
    sizes = np.concatenate([g[:, 3:5] for g in gt.values()])
    out = {}
    for frame in range(1, max(gt) + 1):
        boxes, scores = [], []
        for _id, x, y, w, h in gt.get(frame, np.zeros((0, 5))):
            if rng.random() < level["miss"]:
                continue
            jitter = rng.normal(0, level["jitter"], 4) * (w, h, w, h)
            boxes.append((x + jitter[0], y + jitter[1], x + w + jitter[2], y + h + jitter[3]))
            scores.append(rng.uniform(0.1, 0.5) if rng.random() < level["weak"] else rng.uniform(0.5, 0.95))
        for _ in range(rng.poisson(level["fp"])):
            w, h = sizes[rng.integers(len(sizes))]
            x, y = rng.uniform(0, IMAGE_WH[0] - w), rng.uniform(0, IMAGE_WH[1] - h)
            boxes.append((x, y, x + w, y + h))
            scores.append(rng.uniform(0.1, 0.6))
        xyxy = np.asarray(boxes, np.float32).reshape(-1, 4)
        out[frame] = Detections(xyxy, np.asarray(scores, np.float32), np.zeros(len(scores), np.int32))
    return out


def ours(detections: dict[int, Detections], fps: float):
    tracker = ByteTracker()
    for frame, dets in detections.items():
        out = tracker.update(dets, frame / fps)
        keep = out.track_ids >= 0
        yield frame, out.track_ids[keep], out.xyxy[keep]


def supervision_bytetrack(detections: dict[int, Detections], fps: float):
    import supervision as sv

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its deprecation notice
        tracker = sv.ByteTrack(frame_rate=fps)
    for frame, dets in detections.items():
        out = tracker.update_with_detections(sv.Detections(xyxy=dets.xyxy.copy(), confidence=dets.scores.copy(),
                                                           class_id=dets.class_ids.copy()))
        yield frame, np.asarray(out.tracker_id, np.int64).reshape(-1), out.xyxy


def iou_distance(gt_xywh: np.ndarray, hyp_xyxy: np.ndarray) -> np.ndarray:
    """motmetrics' `distances.iou_matrix(max_iou=0.5)`: 1 - IoU, NaN (no match) where IoU < 0.5. Its own
    version calls `np.asfarray`, which NumPy 2 removed."""
    gt = np.asarray(gt_xywh, np.float64).reshape(-1, 4).copy()
    gt[:, 2:] += gt[:, :2]
    distance = 1.0 - iou_matrix(gt, np.asarray(hyp_xyxy, np.float64).reshape(-1, 4))
    distance[distance > 0.5] = np.nan
    return distance


def evaluate(gt, tracks):
    import motmetrics as mm

    acc = mm.MOTAccumulator(auto_id=True)
    results = dict((f, (ids, xyxy)) for f, ids, xyxy in tracks)
    for frame in range(1, max(gt) + 1):
        g = gt.get(frame, np.zeros((0, 5)))
        ids, xyxy = results.get(frame, (np.zeros(0, np.int64), np.zeros((0, 4))))
        acc.update(g[:, 0].astype(int).tolist(), ids.tolist(), iou_distance(g[:, 1:5], xyxy))
    return acc


def accuracy(seeds: int) -> dict:
    import motmetrics as mm

    trackers = {"ours (pipeline.tracking.ByteTracker)": ours, "supervision ByteTrack": supervision_bytetrack}
    out = {}
    for level_name, level in NOISE.items():
        accs = {name: [] for name in trackers}
        for seq, fps in SEQUENCES.items():
            gt = load_gt(seq)
            for seed in range(seeds):
                dets = noisy(gt, level, seed)
                for name, run in trackers.items():
                    accs[name].append(evaluate(gt, run(dets, fps)))
        for name, acc_list in accs.items():
            mh = mm.metrics.create()
            summary = mh.compute_many(acc_list, metrics=["mota", "idf1", "num_switches", "num_fragmentations"],
                                      generate_overall=True)
            row = summary.loc["OVERALL"]
            out[(level_name, name)] = {"mota": float(row["mota"]), "idf1": float(row["idf1"]),
                                       "id_switches": int(row["num_switches"]),
                                       "fragmentations": int(row["num_fragmentations"])}
    return out


def scene(n: int, frames: int, fps: float, seed: int = 0):
    """n people walking about a 1920x1080 view, with box noise and varied scores: Detections a frame."""
    rng = np.random.default_rng(seed)
    pos = rng.uniform((0, 0), (1860, 930), (n, 2))
    vel = rng.uniform(-90, 90, (n, 2))  # pixels a second
    for i in range(frames):
        pos += vel / fps
        bounce = (pos < 0) | (pos > (1860, 930))
        vel[bounce] *= -1
        boxes = np.concatenate((pos, pos + (60, 150)), axis=1) + rng.normal(0, 1.5, (n, 4))
        yield i / fps, Detections(boxes.astype(np.float32), rng.uniform(0.2, 0.95, n).astype(np.float32),
                                  np.zeros(n, np.int32))


# timed beside ours in each run: the tracker as first merged (0.36 ms in its own runs here) and the
# last numpy-only one (0.33-0.44 ms), before the numba kernels
REFERENCE = "5d720fd,f81b5df"


def reference_tracker(commit_id: str):
    """`ByteTracker` from pipeline/tracking.py at an older commit (read with git), or None without git or commit."""
    import importlib.util
    import subprocess

    try:
        source = subprocess.run(["git", "show", f"{commit_id}:pipeline/tracking.py"], cwd=ROOT, capture_output=True,
                                text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    path = Path(tempfile.mkdtemp()) / f"tracking_{commit_id}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ByteTracker


def cost(objects: int, frames: int, rounds: int, references: list[str]) -> dict:
    import supervision as sv

    fps = 30.0
    data = list(scene(objects, frames, fps))
    warm = min(100, frames // 10)
    out = {}

    def timed(update) -> list[float]:
        seconds = []
        for t, dets in data:
            started = time.perf_counter()
            update(dets, t)
            seconds.append(time.perf_counter() - started)
        return seconds[warm:]

    # ours and the reference in turns, a fresh tracker each round: load that comes and goes hits both
    variants = {"ours: tracker": ByteTracker}
    for reference in references:
        old = reference_tracker(reference)
        if old is not None:
            variants[f"reference: the tracker at {reference}"] = old
    for name in variants:
        out[name] = []
    for _ in range(rounds):
        for name, make in variants.items():
            out[name] += timed(make().update)
    tracker = ByteTracker()
    analytics = Analytics(zones=[ZoneConfig(name="z", polygon=[(0, 0), (960, 0), (960, 1080), (0, 1080)])],
                          lines=[LineConfig(name="l", points=[(0, 540), (1920, 540)])], labels=["person"])
    out["ours: tracker + a line + a zone"] = timed(lambda d, t: analytics.update(tracker.update(d, t), tracker.ended))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sv_tracker = sv.ByteTrack(frame_rate=fps)
    out["supervision ByteTrack"] = timed(lambda d, t: sv_tracker.update_with_detections(
        sv.Detections(xyxy=d.xyxy, confidence=d.scores, class_id=d.class_ids)))
    # how slow the machine is right now: one small numpy operation (about 0.5 us on an idle fast core)
    a = np.ones((objects, 4))
    out["reference: one numpy add of 50x4 floats"] = timed(lambda d, t: a + a)
    return {name: {"median_ms": statistics.median(s) * 1000, "p90_ms": float(np.percentile(s, 90)) * 1000}
            for name, s in out.items()}


SAME_AS = "f81b5df"  # the last numpy-only tracker, before the numba kernels


def classes_scene(seed: int, frames: int = 600):
    """The cost scene with three classes, one detection in ten missed, one frame in ten dropped, and
    the clock going back 5 s at frame 400 (a file that loops): (timestamp, Detections) a frame."""
    rng = np.random.default_rng(seed)
    for i, (t, dets) in enumerate(scene(40, frames, 30.0, seed)):
        keep = rng.random(len(dets.scores)) > 0.1
        if rng.random() < 0.1:
            continue
        classes = (np.arange(len(dets.scores)) % 3).astype(np.int32)
        yield (t if i < 400 else t - 5.0), Detections(dets.xyxy[keep], dets.scores[keep], classes[keep])


def same_outputs(commit_id: str, seeds: int) -> list[dict]:
    """Ours against the tracker at `commit_id`, frame by frame: a row an input (and settings)."""
    old = reference_tracker(commit_id)
    if old is None:
        raise SystemExit(f"error: cannot read pipeline/tracking.py at {commit_id} with git")
    inputs = []
    for level_name, level in NOISE.items():
        for seq, fps in SEQUENCES.items():
            gt = load_gt(seq)
            for seed in range(seeds):
                inputs.append((f"{seq}, {level_name} noise, seed {seed}", {},
                               [(f / fps, d) for f, d in noisy(gt, level, seed).items()]))
    for seed in range(3):
        inputs.append((f"cost scene, 50 objects, seed {seed}", {}, list(scene(50, 2000, 30.0, seed))))
    for settings in ({}, {"fuse_score": False}, {"classes": [0, 2]}, {"track_high_thresh": 0.5, "new_track_thresh": 0.6},
                     {"match_thresh": 0.9, "lost_track_buffer_s": 0.3}):
        for seed in range(2):
            inputs.append((f"three classes, drops, clock back, seed {seed}", settings, list(classes_scene(seed))))
    rows = []
    for name, settings, frames in inputs:
        a, b = ByteTracker(**settings), old(**settings)
        differs = None
        for i, (t, dets) in enumerate(frames):
            x, y = a.update(dets, t), b.update(dets, t)
            if not (np.array_equal(x.track_ids, y.track_ids) and np.array_equal(x.track_ages, y.track_ages)
                    and a.ended == b.ended):
                differs = i
                break
        rows.append({"input": name, "settings": settings, "frames": len(frames), "first_difference": differs})
    return rows


def pipeline_fps(frames: int, repeat: int) -> dict:
    clip = clip_prefix(frames, Path(tempfile.mkdtemp()))
    n = count_frames(clip)
    base = {
        "model": {"path": str(MODEL), "preset": "yolox", "labels": str(LABELS)},
        "engine": {"kind": "onnxruntime", "intra_op_threads": 1, "lanes": 2, "max_batch": 4, "batch_timeout_ms": 20},
        "runtime": {"status_interval_s": 3600},
    }
    variants = {
        "tracking off": {**base, "cameras": [{"id": "bench", "url": str(clip)}]},
        "tracking on, a counting line": {**base, "tracking": {"enabled": True}, "cameras": [
            {"id": "bench", "url": str(clip), "lines": [{"name": "middle", "points": [[384, 0], [384, 432]]}]}]},
    }
    runs = {name: [] for name in variants}
    cpu = {name: [] for name in variants}  # CPU milliseconds a frame: what the other load barely moves
    for _ in range(repeat):  # interleaved: drift on a busy machine hits both alike
        for name, config in variants.items():
            started = time.process_time()
            fps, pipeline = timed_pipeline(config)
            cpu[name].append((time.process_time() - started) * 1000 / max(1, pipeline.publish.metrics.frames_out))
            runs[name].append(fps)
    return {"frames": n, "runs": runs, "median": {k: statistics.median(v) for k, v in runs.items()},
            "cpu_ms_per_frame": cpu, "cpu_median": {k: statistics.median(v) for k, v in cpu.items()}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=5, help="noise seeds per sequence and level")
    parser.add_argument("--objects", type=int, default=50)
    parser.add_argument("--cost-frames", type=int, default=2000)
    parser.add_argument("--cost-rounds", type=int, default=5, help="rounds of ours and the references, in turns")
    parser.add_argument("--reference", default=REFERENCE, help="commits (comma-separated) whose trackers are timed beside ours")
    parser.add_argument("--frames", type=int, default=400, help="demo clip frames for the pipeline comparison")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--parts", default="same,accuracy,cost,pipeline",
                        help="comma-separated: same, accuracy, cost, pipeline (e.g. cost alone when the machine is quiet)")
    parser.add_argument("--same-as", default=SAME_AS, help="commit whose tracker must give the same outputs as ours")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()
    parts = set(args.parts.split(","))

    load_before = os.getloadavg()
    same = same_outputs(args.same_as, args.seeds) if "same" in parts else None
    acc = accuracy(args.seeds) if "accuracy" in parts else None
    costs = cost(args.objects, args.cost_frames, args.cost_rounds, args.reference.split(",")) if "cost" in parts else None
    pipe = pipeline_fps(args.frames, args.repeat) if "pipeline" in parts else None
    load_after = os.getloadavg()

    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"### {stamp} | {machine()} | commit {commit()}",
             "",
             f"Shared, busy machine: 1-minute load average {load_before[0]:.1f} at the start, {load_after[0]:.1f} at the "
             f"end (2 cores); other engineers' test suites ran meanwhile. Variants are compared inside this run.",
             ""]
    if same is not None:
        differ = [r for r in same if r["first_difference"] is not None]
        lines += [f"**Same outputs** as the tracker at {args.same_as} (track ids, ages and ended tracks, every frame): "
                  f"{len(same) - len(differ)} of {len(same)} inputs, {sum(r['frames'] for r in same)} frames "
                  f"({'met' if not differ else 'MISSED'}: accuracy inputs, the cost scene, three classes with drops "
                  "and a clock that goes back under five settings)", ""]
        lines += [f"- differs: {r['input']} {r['settings'] or ''} from frame {r['first_difference']}" for r in differ]
        if differ:
            lines.append("")
    if acc is not None:
        lines += [f"**Accuracy** (motmetrics, IoU >= 0.5): {', '.join(SEQUENCES)} ground truth turned into detections, "
                  f"{args.seeds} seeds each; both trackers with their defaults at 25 fps on the same input.",
                  "",
                  "| noise | tracker | MOTA | IDF1 | ID switches | fragmentations |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for (level, name), m in acc.items():
            lines.append(f"| {level} ({', '.join(f'{k} {v}' for k, v in NOISE[level].items())}) | {name} | "
                         f"{m['mota']:.3f} | {m['idf1']:.3f} | {m['id_switches']} | {m['fragmentations']} |")
        idf1_ok = {level: acc[(level, "ours (pipeline.tracking.ByteTracker)")]["idf1"]
                   >= acc[(level, "supervision ByteTrack")]["idf1"] for level in NOISE}
        lines += ["", "IDF1 >= supervision's: " + ", ".join(f"{k} noise {'met' if v else 'MISSED'}"
                                                          for k, v in idf1_ok.items()), ""]
    if costs is not None:
        ours_ms = costs["ours: tracker"]["median_ms"]
        lines += [f"**Cost** a frame, one camera, {args.objects} objects, {args.cost_frames} frames ({args.cost_rounds} rounds "
                  f"of ours and the references in turns):", "",
                  "| what | median ms | p90 ms | ours / this |", "| --- | --- | --- | --- |"]
        for name, c in costs.items():
            ratio = f"{ours_ms / c['median_ms']:.2f}" if "numpy add" not in name else ""
            lines.append(f"| {name} | {c['median_ms']:.4f} | {c['p90_ms']:.4f} | {ratio} |")
        lines += ["", f"target <= 0.3 ms (median): {'met' if ours_ms <= 0.3 else 'MISSED'} ({ours_ms:.3f} ms)", ""]
    if pipe is not None:
        lines += [f"**Pipeline** (the demo config: ONNX Runtime, 2 lanes x 1 thread, batch <= 4), {pipe['frames']} frames "
                  f"of {CLIP.name}, {args.repeat} interleaved rounds:", "",
                  "| variant | fps (median) | runs | CPU ms a frame (median) | runs |", "| --- | --- | --- | --- | --- |"]
        for name, value in pipe["median"].items():
            lines.append(f"| {name} | {value:.1f} | {', '.join(f'{v:.1f}' for v in pipe['runs'][name])} | "
                         f"{pipe['cpu_median'][name]:.2f} | "
                         f"{', '.join(f'{v:.2f}' for v in pipe['cpu_ms_per_frame'][name])} |")
        off, on = pipe["median"]["tracking off"], pipe["median"]["tracking on, a counting line"]
        cpu_off, cpu_on = pipe["cpu_median"]["tracking off"], pipe["cpu_median"]["tracking on, a counting line"]
        lines += ["", f"fps tracking on / off = {on / off:.3f} (target >= 0.97: {'met' if on / off >= 0.97 else 'MISSED'}); "
                  f"frames per CPU second on / off = {cpu_off / cpu_on:.3f} (the same target, read without the other "
                  f"load: {'met' if cpu_off / cpu_on >= 0.97 else 'MISSED'})"]
    table = "\n".join(lines)
    print(table)
    if not args.no_save:
        record = {"date": stamp, "machine": machine(), "commit": commit(), "load": [load_before, load_after],
                  "parts": sorted(parts), "noise": NOISE, "seeds": args.seeds,
                  "same_as": args.same_as if same is not None else None, "same": same,
                  "accuracy": {f"{level}/{name}": m for (level, name), m in (acc or {}).items()},
                  "cost": costs, "objects": args.objects, "pipeline": pipe}
        append_results(ROOT / "bench" / "results", "tracking", table, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
