"""Fleet coordination: its CPU cost per host, and how long cameras take to move when a host dies or stops.

A simulated fleet: 3 host processes run the real coordinator (pipeline/fleet.py: the same leases,
scripts, heartbeats and watchdog against a real redis-server) over 100 cameras, with a stand-in
for the pipeline that only records which cameras it was told to run. That isolates what fleet
mode adds to a host; the video work is the same as without it.

    .venv/bin/python bench/fleet.py [--cameras 100] [--hosts 3] [--seconds 30] [--repeats 3]

1. CPU: each host's CPU time (user + system, from /proc) over a steady window, as a share of one
   core, for the default claim interval and for half of it (ratio in the same run), and Redis's.
2. Failover: `kill -9` of one host, then the time until every camera it held is held by another
   (lease 2 s and 5 s); SIGTERM of one host (leases released), the same time.
Appends to bench/results/fleet.md and fleet.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import append_results, commit  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def simulated_host(args) -> None:
    """One host: the real coordinator, a pipeline stand-in that records its cameras."""
    import logging

    from pipeline.config import ClusterConfig
    from pipeline.fleet import Coordinator, fleet_client

    logging.basicConfig(level=logging.ERROR)
    config = ClusterConfig(redis=args.redis, max_cameras=args.cameras, lease_s=args.lease,
                           claim_interval_s=args.claim_interval, host_id=args.host)
    running: set[str] = set()
    coordinator = Coordinator(fleet_client(config, args.host), config, [f"cam{i}" for i in range(args.cameras)],
                              args.host, on_claim=lambda c, _owner: running.add(c),
                              on_lose=lambda c, _why: running.discard(c))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    coordinator.start()
    print("ready", flush=True)
    stop.wait()
    coordinator.stop(release=True)


class Fleet:
    def __init__(self, redis_url: str, cameras: int, lease: float, claim_interval: float):
        self.redis_url, self.cameras, self.lease, self.claim_interval = redis_url, cameras, lease, claim_interval
        self.hosts: dict[str, subprocess.Popen] = {}

    def start(self, name: str) -> None:
        self.hosts[name] = subprocess.Popen(
            [sys.executable, __file__, "--simulated-host", name, "--redis", self.redis_url, "--cameras",
             str(self.cameras), "--lease", str(self.lease), "--claim-interval", str(self.claim_interval)],
            stdout=subprocess.PIPE, text=True)
        assert self.hosts[name].stdout.readline().startswith("ready")

    def holders(self, client) -> dict[str, str | None]:
        from pipeline.fleet import Keys, parse_lease

        keys = Keys("vapipe:fleet")
        values = client.mget([keys.lease(f"cam{i}") for i in range(self.cameras)])
        return {f"cam{i}": (parse_lease(v) or {}).get("host") for i, v in enumerate(values)}

    def settle(self, client, hosts: list[str], timeout: float = 60) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            held = self.holders(client)
            counts = [sum(1 for h in held.values() if h == name) for name in hosts]
            if None not in held.values() and min(counts) >= self.cameras // len(hosts) and sum(counts) == self.cameras:
                return held
            time.sleep(0.1)
        raise RuntimeError(f"fleet did not settle: {self.holders(client)}")

    def moved(self, client, cameras: list[str], away_from: str, timeout: float = 30) -> float:
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            held = self.holders(client)
            if all(held[c] not in (None, away_from) for c in cameras):
                return time.monotonic() - started
            time.sleep(0.02)
        raise RuntimeError("cameras did not move")

    def close(self) -> None:
        for process in self.hosts.values():
            if process.poll() is None:
                process.kill()
                process.wait()
        self.hosts.clear()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cameras", type=int, default=100)
    parser.add_argument("--hosts", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=30.0, help="CPU measurement window")
    parser.add_argument("--repeats", type=int, default=3, help="failover runs per case")
    parser.add_argument("--simulated-host", help=argparse.SUPPRESS)
    parser.add_argument("--redis", help=argparse.SUPPRESS)
    parser.add_argument("--lease", type=float, default=5.0, help=argparse.SUPPRESS)
    parser.add_argument("--claim-interval", type=float, default=0.5, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    if args.simulated_host:
        args.host = args.simulated_host
        simulated_host(args)
        return

    import redis

    folder = tempfile.mkdtemp(prefix="vapipe-bench-fleet-")
    port = free_port()
    server = subprocess.Popen([shutil.which("redis-server"), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                               "--appendonly", "no", "--dir", folder], stdout=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis(host="127.0.0.1", port=port)
    for _ in range(100):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    names = [f"h{i + 1}" for i in range(args.hosts)]
    load = os.getloadavg()
    cpu_rows = []
    try:
        # 1. CPU per host in a steady fleet: default claim interval, and twice as often
        for claim_interval in (0.5, 0.25):
            client.flushall()
            fleet = Fleet(url, args.cameras, 5.0, claim_interval)
            for name in names:
                fleet.start(name)
            fleet.settle(client, names)
            time.sleep(2)
            pids = {name: p.pid for name, p in fleet.hosts.items()} | {"redis-server": server.pid}
            before = {name: cpu_seconds(pid) for name, pid in pids.items()}
            started = time.monotonic()
            time.sleep(args.seconds)
            wall = time.monotonic() - started
            shares = {name: (cpu_seconds(pid) - before[name]) / wall * 100 for name, pid in pids.items()}
            fleet.close()
            host_shares = [shares[n] for n in names]
            cpu_rows.append({"claim_interval_s": claim_interval, "lease_s": 5.0,
                             "host_cpu_percent_mean": round(statistics.mean(host_shares), 3),
                             "host_cpu_percent_max": round(max(host_shares), 3),
                             "redis_cpu_percent": round(shares["redis-server"], 3)})
            print(f"CPU, claim interval {claim_interval} s: hosts {host_shares} %, redis {shares['redis-server']:.2f} %",
                  flush=True)

        # 2. failover (kill -9) and handover (SIGTERM)
        failover_rows = []
        for lease in (2.0, 5.0):
            for how in ("kill -9", "SIGTERM"):
                times = []
                for _ in range(args.repeats):
                    client.flushall()
                    fleet = Fleet(url, args.cameras, lease, 0.5 if lease >= 5 else 0.25)
                    for name in names:
                        fleet.start(name)
                    held = fleet.settle(client, names)
                    victim = names[0]
                    cameras = [c for c, h in held.items() if h == victim]
                    process = fleet.hosts[victim]
                    if how == "kill -9":
                        process.kill()
                    else:
                        process.send_signal(signal.SIGTERM)
                    times.append(fleet.moved(client, cameras, victim))
                    fleet.close()
                failover_rows.append({"event": how, "lease_s": lease, "cameras_moved": len(cameras),
                                      "median_s": round(statistics.median(times), 2), "max_s": round(max(times), 2),
                                      "runs": len(times)})
                print(f"{how}, lease {lease} s: {[round(t, 2) for t in times]}", flush=True)
    finally:
        server.kill()
        shutil.rmtree(folder, ignore_errors=True)

    machine = f"{platform.node()} ({os.cpu_count()} cores)"
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    base = cpu_rows[0]["host_cpu_percent_mean"] or 1e-9
    lines = [f"### {stamp}, commit {commit()}, {machine}, load average {load[0]:.1f} at the start "
             f"(the machine was shared with other jobs)", "",
             f"Simulated fleet: {args.hosts} hosts, {args.cameras} cameras, real redis-server on loopback.", "",
             "| claim interval | lease | CPU per host (mean / max, % of one core) | vs 0.5 s | Redis CPU |",
             "| --- | --- | --- | --- | --- |"]
    for row in cpu_rows:
        lines.append(f"| {row['claim_interval_s']} s | {row['lease_s']} s | {row['host_cpu_percent_mean']:.2f} / "
                     f"{row['host_cpu_percent_max']:.2f} | {row['host_cpu_percent_mean'] / base:.2f}x | "
                     f"{row['redis_cpu_percent']:.2f} % |")
    lines += ["", "| event | lease | cameras moved | until all held elsewhere: median / max | target |",
              "| --- | --- | --- | --- | --- |"]
    for row in failover_rows:
        target = f"<= {row['lease_s'] + 3:g} s" if row["event"] == "kill -9" else "<= 2 s gap"
        lines.append(f"| {row['event']} | {row['lease_s']} s | {row['cameras_moved']} | {row['median_s']} / "
                     f"{row['max_s']} s ({row['runs']} runs) | {target} |")
    markdown = "\n".join(lines)
    print(markdown)
    append_results(args.out, "fleet", markdown, {"date": stamp, "machine": machine, "commit": commit(),
                                                 "load_average": load, "cameras": args.cameras, "hosts": args.hosts,
                                                 "cpu": cpu_rows, "failover": failover_rows})


if __name__ == "__main__":
    main()
