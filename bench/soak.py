#!/usr/bin/env python3
"""Soak test (not in CI): 4 live cameras for a long run, one server killed and restarted in cycles.

    python bench/soak.py --minutes 30            # the full soak
    python bench/soak.py --minutes 4             # a short run (label the result as such)

Runs the real CLI against two real RTSP servers (tests/rtsp_server.py, GStreamer; needs
/usr/bin/python3 with `gi`): cameras cam0/cam1 on a server that stays up, cam2/cam3 on one that is
killed and restarted every `--cycle-s` seconds. Samples the pipeline process's RSS, open file
descriptors and threads (/proc) every `--sample-s` seconds and writes bench/results/soak.md and
soak.json: growth after warm-up must stay <= 10 MB and 0 fds / threads.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from conftest import RtspServer, make_config, start_cli  # noqa: E402


def sample(pid: int) -> dict:
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return {
        "rss_mb": int(fields["VmRSS"].split()[0]) / 1024,
        "threads": int(fields["Threads"]),
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--cycle-s", type=float, default=20.0, help="kill/restart period of the flaky server")
    parser.add_argument("--down-s", type=float, default=3.0, help="how long the flaky server stays down")
    parser.add_argument("--sample-s", type=float, default=5.0)
    parser.add_argument("--warmup-s", type=float, default=30.0, help="growth is measured from here")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "soak"))
    args = parser.parse_args()

    steady = RtspServer(fps=15).start()
    flaky = RtspServer(fps=15).start()
    tmp = Path(tempfile.mkdtemp(prefix="soak-"))
    camera = {"open_timeout_s": 2, "read_timeout_s": 2, "stall_timeout_s": 2, "reconnect_base_s": 0.2, "reconnect_cap_s": 2}
    cameras = [{"id": f"cam{i}", "url": (steady if i < 2 else flaky).url(), **camera} for i in range(4)]
    config, _ = make_config(tmp, cameras, engine={"intra_op_threads": 1, "max_batch": 4}, runtime={"status_interval_s": 30})
    summary_path = tmp / "summary.json"
    proc = start_cli("--config", str(config), "--summary-json", str(summary_path))
    started = time.monotonic()
    samples, cycles = [], 0
    next_cycle = started + args.cycle_s
    try:
        while time.monotonic() - started < args.minutes * 60:
            if proc.poll() is not None:
                raise SystemExit(f"pipeline exited early ({proc.returncode}): {proc.stderr.read()[-2000:]}")
            now = time.monotonic()
            if now >= next_cycle:
                flaky.kill()
                time.sleep(args.down_s)
                flaky.start()
                cycles += 1
                next_cycle = time.monotonic() + args.cycle_s
            samples.append({"t_s": round(time.monotonic() - started, 1), **sample(proc.pid)})
            time.sleep(args.sample_s)
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        steady.kill()
        flaky.kill()
    summary = json.loads(summary_path.read_text())
    base = [s for s in samples if s["t_s"] >= args.warmup_s] or samples
    first, last = base[0], base[-1]
    growth = {k: round(last[k] - first[k], 2) for k in ("rss_mb", "fds", "threads")}
    peak = {k: max(s[k] for s in base) - first[k] for k in ("rss_mb", "fds", "threads")}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    result = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "commit": commit,
        "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPU cores, CPU only (ONNX Runtime)",
        "minutes": args.minutes,
        "kill_restart_cycles": cycles,
        "exit_code": proc.returncode,
        "growth_after_warmup": growth,
        "peak_above_warmup": peak,
        "pass": proc.returncode == 0 and growth["rss_mb"] <= 10 and growth["fds"] <= 0 and growth["threads"] <= 0,
        "cameras": {c: {k: v for k, v in s.items() if k in ("state", "reconnects", "attempts", "frames", "drops")}
                    for c, s in summary["cameras"].items()},
        "frames": summary["frames"],
        "fps": summary["fps"],
        "samples": samples,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    rows = "\n".join(f"| {s['t_s']:.0f} | {s['rss_mb']:.1f} | {s['fds']} | {s['threads']} |" for s in samples[:: max(1, len(samples) // 20)])
    cams = "\n".join(f"| {c} | {s['state']} | {s['frames']} | {s['reconnects']} | {s['attempts']} | {s['drops']} |"
                     for c, s in result["cameras"].items())
    out.with_suffix(".md").write_text(f"""# Soak: 4 live cameras, reconnect cycles

- date: {result['date']}, commit: {commit}
- machine: {result['machine']}
- duration: **{args.minutes:g} minutes** (the target is 30; see the duration before reading the growth)
- flaky server killed for {args.down_s:g} s every {args.cycle_s:g} s: {cycles} cycles; exit code {proc.returncode}
- growth after {args.warmup_s:g} s of warm-up: RSS {growth['rss_mb']:+.1f} MB, fds {growth['fds']:+d}, threads {growth['threads']:+d}
  (peak above warm-up: RSS {peak['rss_mb']:+.1f} MB, fds {peak['fds']:+d}, threads {peak['threads']:+d}); criteria
  <= 10 MB, 0 fds, 0 threads: **{'pass' if result['pass'] else 'FAIL'}**
- published {result['frames']} frames, {result['fps']} frames/s overall

| camera | state | frames | reconnects | attempts | drops |
|---|---|---|---|---|---|
{cams}

| t (s) | RSS (MB) | fds | threads |
|---|---|---|---|
{rows}
""")
    print(out.with_suffix(".md").read_text())
    return 0 if result["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
