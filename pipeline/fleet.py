"""Fleet mode: many hosts share one camera list, each camera processed by exactly one of them.

Every host runs the same config (all cameras) with `cluster.redis` and its capacity
(`cluster.max_cameras`). Hosts never talk to each other: they coordinate through leases in one
Redis, the proven service the issue asks for, with these keys (`<p>` = `cluster.key_prefix`):

- `<p>:lease:<camera>`: the camera's owner, `host|fence|since_ms`, set with `SET NX PX` (only if
  free, expiring after `lease_s`) and renewed by a compare-and-extend script (`PEXPIRE` only while
  the value is still ours), deleted by compare-and-delete on a clean release;
- `<p>:fence:<camera>`: a counter (`INCR` at each claim): the fencing number, stamped with the host
  into every message published for the camera (`"fence"`, `"host"`), so a consumer drops a message
  whose fence is lower than one it has seen (a stale owner's late message);
- `<p>:hosts`: a sorted set of live hosts (score: when their heartbeat ends, Redis's clock) and
  `<p>:host:<host>`: their capacity and count, so each host computes its fair share.

A host claims free cameras up to its share (an even spread, water-filled over capacities, so a
host goes beyond an even share only while the others are full), in an order of its own (rendezvous
hashing, so hosts rarely race for the same camera), and gives back what it holds over its share,
as many as the other hosts lack below theirs (a host that joins gets its share within a round or two). A host that cannot renew a lease
(another host has it, or Redis is out of reach for 80% of the lease) stops that camera at once:
its publish gate closes first, so no frame of it leaves after that, then its source stops. The
lease in Redis lasts at least the full `lease_s` after that host's last renewal was sent, so the
old owner has stopped before a new one can claim. SIGTERM: claims stop, the pipeline drains, the
leases are released, and the other hosts claim the cameras within `claim_interval_s`.

Limits: the scripts touch keys they are not passed (host records), so a Redis Cluster is not
supported (one Redis, or Sentinel's primary); a claim whose reply is lost leaves the camera idle
for one lease; fencing numbers only grow while Redis keeps its data (run it with persistence: a
Redis restarted empty counts from 1 again).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import socket
import threading
import time

import redis

from pipeline.config import ClusterConfig, Config
from pipeline.graph import Pipeline
from pipeline.queues import BoundedQueue
from stages.source import redact

log = logging.getLogger("pipeline")

# a host stops a camera it could not renew once this fraction of the lease has passed since its last
# successful renewal was sent: Redis keeps the key at least the whole lease after it, so the margin
# (20%) covers the watchdog's own delay and clock rates
SELF_STOP_FRACTION = 0.8

CLAIM = """
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
local fence = redis.call('INCR', KEYS[2])
local t = redis.call('TIME')
local value = ARGV[1] .. '|' .. fence .. '|' .. (t[1] * 1000 + math.floor(t[2] / 1000))
redis.call('SET', KEYS[1], value, 'NX', 'PX', ARGV[2])
return value
"""
RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
# KEYS[1] hosts set, KEYS[2] this host's record; ARGV host, ttl_ms, record, record key prefix.
# Returns this host's view of the fleet: {host, record, ...} for every live host.
HEARTBEAT = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('SET', KEYS[2], ARGV[3], 'PX', ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local out = {}
for _, host in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  table.insert(out, host)
  table.insert(out, redis.call('GET', ARGV[4] .. host) or '{}')
end
return out
"""


def fair_shares(total: int, capacities: dict[str, int]) -> dict[str, int]:
    """Cameras each host should hold: an even spread of `total`, water-filled over capacities (a
    host with less room takes what it can, the rest is spread over the others)."""
    shares: dict[str, int] = {}
    remaining = total
    ordered = sorted(capacities.items(), key=lambda item: (item[1], item[0]))
    for i, (host, capacity) in enumerate(ordered):
        give = min(capacity, math.ceil(remaining / (len(ordered) - i))) if remaining > 0 else 0
        shares[host] = give
        remaining -= give
    return shares


def preference(host: str, camera: str) -> bytes:
    """Rendezvous hashing: each host tries free cameras in its own order, so hosts rarely race."""
    return hashlib.blake2b(f"{host}/{camera}".encode(), digest_size=8).digest()


def parse_lease(value: bytes | str | None) -> dict | None:
    if value is None:
        return None
    text = value.decode() if isinstance(value, bytes) else value
    host, fence, since_ms = text.rsplit("|", 2)
    return {"host": host, "fence": int(fence), "since": int(since_ms) / 1000.0, "value": text}


class Keys:
    def __init__(self, prefix: str):
        self.prefix = prefix
        self.hosts = f"{prefix}:hosts"
        self.host_prefix = f"{prefix}:host:"

    def lease(self, camera: str) -> str:
        return f"{self.prefix}:lease:{camera}"

    def fence(self, camera: str) -> str:
        return f"{self.prefix}:fence:{camera}"

    def host(self, host: str) -> str:
        return self.host_prefix + host


def fleet_client(config: ClusterConfig, name: str) -> redis.Redis:
    from sinks.redis_stream import redis_client

    # every call is bounded well inside a lease, so the coordinator's loop never stalls past one
    return redis_client(config.redis, min(1.0, config.lease_s / 5), name)


class Coordinator:
    """Claims, renews and releases this host's leases; tells the pipeline which cameras to run.

    `on_claim(camera, owner)` starts a camera (owner: `{"host", "fence"}`); `on_lose(camera, why)`
    stops it at once. Both are called with the coordinator's lock held, from its threads.
    """

    def __init__(self, client: redis.Redis, config: ClusterConfig, cameras: list[str], host: str, on_claim, on_lose):
        self.client, self.config, self.cameras, self.host = client, config, list(cameras), host
        self.keys = Keys(config.key_prefix)
        self.lease_ms = int(config.lease_s * 1000)
        self.on_claim, self.on_lose = on_claim, on_lose
        self.lock = threading.Lock()
        self.owned: dict[str, dict] = {}  # camera -> {"value", "fence", "deadline" (monotonic), "since"}
        self.fleet: dict[str, dict] = {}  # the last heartbeat's view: host -> record
        self.claiming = True  # False once the host drains (SIGTERM): renew, never claim
        self.claims = self.losses = self.releases = 0
        self.redis_errors = 0
        self._error_logged: str | None = None
        self._stop = threading.Event()
        self._claim = client.register_script(CLAIM)
        self._renew = client.register_script(RENEW)
        self._release = client.register_script(RELEASE)
        self._heartbeat = client.register_script(HEARTBEAT)
        self._threads = [threading.Thread(target=self._loop, name="fleet-leases", daemon=True),
                         threading.Thread(target=self._watchdog, name="fleet-watchdog", daemon=True)]

    def start(self) -> "Coordinator":
        for thread in self._threads:
            thread.start()
        return self

    # -- the watchdog: a lease not renewed in time stops its camera, Redis or no Redis ----------
    def _watchdog(self) -> None:
        while not self._stop.wait(0.05):
            now = time.monotonic()
            with self.lock:
                for camera in [c for c, lease in self.owned.items() if now >= lease["deadline"]]:
                    self._lose(camera, f"lease not renewed for {SELF_STOP_FRACTION * self.config.lease_s:.1f} s "
                                       f"(Redis out of reach)")

    def _lose(self, camera: str, why: str) -> None:
        self.owned.pop(camera, None)
        self.losses += 1
        log.warning("fleet: camera %s: %s; stopped", camera, why)
        self.on_lose(camera, why)

    # -- the lease loop -----------------------------------------------------------------------
    def _loop(self) -> None:
        renew_every = self.config.lease_s / 3
        next_renew = 0.0
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                if started >= next_renew:
                    self._renew_all()
                    next_renew = started + renew_every
                self._round()
                if self._error_logged is not None:
                    log.info("fleet: Redis %s reachable again", redact(self.config.redis))
                    self._error_logged = None
            except redis.RedisError as exc:
                self.redis_errors += 1
                kind = type(exc).__name__
                if self._error_logged != kind:  # one line per outage, not one per round
                    self._error_logged = kind
                    log.warning("fleet: Redis %s: %s (%s); cameras stop when their lease runs out",
                                redact(self.config.redis), kind, exc)
            self._stop.wait(max(0.0, self.config.claim_interval_s - (time.monotonic() - started)))

    def _renew_all(self) -> None:
        with self.lock:
            owned = {camera: lease["value"] for camera, lease in self.owned.items()}
        if not owned:
            return
        sent = time.monotonic()
        pipe = self.client.pipeline(transaction=False)
        for camera, value in owned.items():
            self._renew(keys=[self.keys.lease(camera)], args=[value, self.lease_ms], client=pipe)
        results = pipe.execute()
        with self.lock:
            for (camera, value), renewed in zip(owned.items(), results):
                lease = self.owned.get(camera)
                if lease is None or lease["value"] != value:
                    continue  # lost or released meanwhile
                if renewed == 1:
                    lease["deadline"] = sent + SELF_STOP_FRACTION * self.config.lease_s
                else:
                    self._lose(camera, "lease taken over or expired in Redis")

    def _round(self) -> None:
        """Heartbeat and look at the fleet; claim free cameras up to this host's share, or give one back."""
        with self.lock:
            count = len(self.owned)
        record = json.dumps({"max_cameras": self.config.max_cameras, "owned": count, "pid": os.getpid(),
                             "claiming": self.claiming})
        pipe = self.client.pipeline(transaction=False)
        self._heartbeat(keys=[self.keys.hosts, self.keys.host(self.host)],
                        args=[self.host, self.lease_ms, record, self.keys.host_prefix], client=pipe)
        pipe.mget([self.keys.lease(c) for c in self.cameras])
        view, values = pipe.execute()
        fleet = {}
        for i in range(0, len(view), 2):
            host = view[i].decode()
            try:
                fleet[host] = json.loads(view[i + 1])
            except ValueError:
                fleet[host] = {}
        self.fleet = fleet
        if not self.claiming:
            return
        capacities = {h: int(r.get("max_cameras", 0)) for h, r in fleet.items() if r.get("claiming", True)}
        capacities[self.host] = self.config.max_cameras
        shares = fair_shares(len(self.cameras), capacities)
        share = shares[self.host]
        free = [c for c, v in zip(self.cameras, values) if v is None]
        with self.lock:
            owned = len(self.owned)
        if owned < share and free:
            free.sort(key=lambda c: preference(self.host, c))
            for camera in free[:share - owned]:
                self._try_claim(camera)
        elif owned > share:
            # give back what is over the share, but only as many as the other hosts lack below theirs
            # (else nobody would take them): the least preferred cameras first
            short = sum(max(0, shares.get(h, 0) - int(r.get("owned", 0))) for h, r in fleet.items() if h != self.host)
            count = min(owned - share, short)
            if count <= 0:
                return
            with self.lock:
                handed = sorted(self.owned, key=lambda c: preference(self.host, c))[-count:]
                values = [self.owned[c]["value"] for c in handed]
                for camera in handed:
                    self._lose(camera, f"handed back to rebalance: this host held {owned}, its share is {share}")
                    self.releases += 1
            pipe = self.client.pipeline(transaction=False)
            for camera, value in zip(handed, values):
                self._release(keys=[self.keys.lease(camera)], args=[value], client=pipe)
            pipe.execute()

    def _try_claim(self, camera: str) -> None:
        sent = time.monotonic()
        value = self._claim(keys=[self.keys.lease(camera), self.keys.fence(camera)], args=[self.host, self.lease_ms])
        if value is None:
            return  # another host was faster
        lease = parse_lease(value)
        with self.lock:
            if self._stop.is_set() or not self.claiming:
                self._release(keys=[self.keys.lease(camera)], args=[lease["value"]])
                return
            self.owned[camera] = {"value": lease["value"], "fence": lease["fence"], "since": lease["since"],
                                  "deadline": sent + SELF_STOP_FRACTION * self.config.lease_s}
            self.claims += 1
            log.info("fleet: claimed camera %s (fence %d)", camera, lease["fence"])
            self.on_claim(camera, {"host": self.host, "fence": lease["fence"]})

    # -- shutdown ---------------------------------------------------------------------------
    def stop_claiming(self) -> None:
        self.claiming = False

    def stop(self, release: bool = True) -> int:
        """Stop the threads; with `release`, delete this host's leases (after the drain) so the other
        hosts claim them at once. Returns how many were released."""
        self.claiming = False
        self._stop.set()
        for thread in self._threads:
            if thread.is_alive():
                thread.join(5)
        with self.lock:
            owned = dict(self.owned)
            self.owned.clear()
        released = 0
        if release and owned:
            try:
                pipe = self.client.pipeline(transaction=False)
                for camera, lease in owned.items():
                    self._release(keys=[self.keys.lease(camera)], args=[lease["value"]], client=pipe)
                pipe.zrem(self.keys.hosts, self.host)
                pipe.delete(self.keys.host(self.host))
                released = sum(1 for r in pipe.execute()[:len(owned)] if r == 1)
                log.info("fleet: released %d lease(s): %s", released, ", ".join(owned))
            except redis.RedisError as exc:
                log.warning("fleet: could not release %d lease(s) (%s); they expire within %.1f s", len(owned),
                            type(exc).__name__, self.config.lease_s)
        return released

    def snapshot(self) -> dict:
        with self.lock:
            owned = {c: {"fence": lease["fence"], "since": lease["since"]} for c, lease in self.owned.items()}
        return {"host": self.host, "owned": owned, "claims": self.claims, "losses": self.losses,
                "releases": self.releases, "redis_errors": self.redis_errors}


class FleetPipeline(Pipeline):
    """The pipeline of one fleet host: every camera of the config is known, only the claimed ones run.

    A camera's source is started when its lease is claimed and stopped when it is lost (a source
    thread cannot be restarted, so a camera claimed again gets a new one). The publish stage asks
    `owner` for every frame: frames of a camera this host no longer holds are dropped (counted as
    `not_owner`), the others carry `host` and `fence`.
    """

    def __init__(self, config: Config, host: str):
        self.host = host
        self.owners: dict[str, dict] = {}  # camera -> {"host", "fence"}: what the publish stage stamps
        super().__init__(config, ownership=self.owners.get)
        self.index = {camera.id: i for i, camera in enumerate(config.cameras)}
        # each camera has its own stop event (Pipeline._make_source); sources start when claimed
        fan_in = self.batch.inbox
        # a queue that stays open until the run stops: with no camera held, batching waits, not ends
        self.keepalive = BoundedQueue(1, name="fleet.keepalive")
        fan_in.queues.append(self.keepalive)
        self.keepalive._listeners.append(fan_in._wake)

    def start(self, stop_requested: threading.Event | None = None, subscribers: int | None = None) -> None:
        for stage in reversed(self.core_stages):  # sources start when claimed
            stage.start()

    def claim(self, camera_id: str, owner: dict) -> None:
        i = self.index[camera_id]
        old = self.sources[i]
        old.stop_event.set()
        old.outbox.close()
        source = self._make_source(self.config.cameras[i])
        queue = source.outbox
        fan_in = self.batch.inbox
        queue._listeners.append(fan_in._wake)
        self.sources[i] = source
        self.status.metrics[i] = source.metrics
        fan_in.queues[i] = queue
        self.owners[camera_id] = owner
        if self.stop_event.is_set():
            queue.close()
        source.start()

    def release(self, camera_id: str, _why: str = "") -> None:
        """Stop a camera now: its frames in flight are dropped at publish, its source ends."""
        self.owners.pop(camera_id, None)
        source = self.sources[self.index[camera_id]]
        source.stop_event.set()
        source.outbox.close()

    def stop(self) -> None:
        super().stop()
        for source in self.sources:
            source.stop_event.set()
        self.keepalive.close()

    def status_line(self) -> str:
        return f"fleet {self.host}: {len(self.owners)} camera(s) | {super().status_line()}"


def host_name(config: ClusterConfig) -> str:
    return config.host_id or f"{socket.gethostname()}-{os.getpid()}"


def run_fleet(config: Config, summary_json: str | None, stop_requested: threading.Event) -> int:
    """`run.py run` with `cluster`: this host's share of the cameras until SIGINT/SIGTERM."""
    from pipeline.shutdown import load_interruptibly

    cluster = config.cluster
    host = host_name(cluster)
    deadline = config.runtime.shutdown_deadline_s
    pipeline = load_interruptibly(lambda: FleetPipeline(config, host), stop_requested, deadline)
    client = fleet_client(cluster, f"vapipe-fleet-{host}")
    coordinator = Coordinator(client, cluster, [c.id for c in config.cameras], host, pipeline.claim, pipeline.release)
    log.info("fleet: host %s, up to %d of %d camera(s), lease %.1f s, Redis %s, publishing on %s", host,
             cluster.max_cameras, len(config.cameras), cluster.lease_s, redact(cluster.redis), pipeline.endpoint)
    pipeline.start()
    watcher = threading.Thread(target=lambda: (stop_requested.wait(), coordinator.stop_claiming()), daemon=True)
    watcher.start()  # a signal stops the claims at once; the leases stay renewed while the pipeline drains
    if stop_requested.is_set():  # stopped while the model loaded: claim nothing
        coordinator.stop_claiming()
    coordinator.start()
    drained = pipeline.wait(stop_requested=stop_requested)
    coordinator.stop_claiming()
    coordinator.stop(release=True)
    summary = pipeline.snapshot()
    summary["fleet"] = coordinator.snapshot()
    log.info("done: %s", pipeline.status_line())
    pipeline.close()
    if pipeline.sinks:
        summary["sinks"] = {sink.name: sink.snapshot() for sink in pipeline.sinks}
    if summary_json:
        with open(summary_json, "w", encoding="utf-8") as handle:
            json.dump(summary, handle, indent=2, default=str)
    return 0 if drained and pipeline.failure() is None else 1


def fleet_status(config: ClusterConfig, cameras: list[str]) -> dict:
    """Who holds which camera, since when, with which fence; and the live hosts."""
    client = fleet_client(config, "vapipe-fleet-status")
    keys = Keys(config.key_prefix)
    pipe = client.pipeline(transaction=False)
    pipe.time()
    pipe.zrange(keys.hosts, 0, -1, withscores=True)
    pipe.mget([keys.lease(c) for c in cameras])
    now_s, hosts, values = pipe.execute()
    now_ms = now_s[0] * 1000 + now_s[1] // 1000
    alive = [(h.decode(), score) for h, score in hosts if score > now_ms]
    records = client.mget([keys.host(h) for h, _ in alive]) if alive else []
    out = {"time": now_ms / 1000.0, "hosts": {}, "cameras": {}}
    for (host, score), record in zip(alive, records):
        info = json.loads(record) if record else {}
        out["hosts"][host] = {"max_cameras": info.get("max_cameras"), "owned": 0,
                              "heartbeat_left_s": round((score - now_ms) / 1000.0, 2)}
    for camera, value in zip(cameras, values):
        lease = parse_lease(value)
        if lease is None:
            out["cameras"][camera] = None
            continue
        out["cameras"][camera] = {"host": lease["host"], "fence": lease["fence"], "since": lease["since"]}
        if lease["host"] in out["hosts"]:
            out["hosts"][lease["host"]]["owned"] += 1
    return out


def format_status(status: dict) -> str:
    now = status["time"]
    lines = [f"{'host':<24} {'cameras':>7} {'max':>5} {'heartbeat':>9}"]
    for host, info in sorted(status["hosts"].items()):
        lines.append(f"{host:<24} {info['owned']:>7} {info['max_cameras'] or '?':>5} {info['heartbeat_left_s']:>8.1f}s")
    lines.append("")
    lines.append(f"{'camera':<24} {'host':<24} {'fence':>6}  since")
    for camera, lease in sorted(status["cameras"].items()):
        if lease is None:
            lines.append(f"{camera:<24} {'-':<24} {'-':>6}  (unowned)")
        else:
            since = time.strftime("%H:%M:%S", time.localtime(lease["since"]))
            lines.append(f"{camera:<24} {lease['host']:<24} {lease['fence']:>6}  {since} ({now - lease['since']:.0f} s)")
    return "\n".join(lines)
