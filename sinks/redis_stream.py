"""Redis Streams sink: each camera's detections appended (XADD) to the stream `<stream_prefix>:<camera>`.

One stream a camera, trimmed to about `maxlen` entries (`MAXLEN ~`, which Redis trims cheaply in
whole nodes), each entry one field `message` holding the same JSON a ZeroMQ subscriber gets. Many
consumers can share a stream's load with a consumer group (XREADGROUP). A batch goes in one
round trip (a non-transactional pipeline); if the connection fails during it, the batch is sent
again once Redis is back, so an entry may arrive twice (at least once, never silently lost while
the buffer has room).
"""

from __future__ import annotations

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from pipeline.config import RedisSinkConfig
from sinks.base import BrokerSink, BrokerUnavailable
from stages.source import redact

FIELD = "message"


def stream_for(prefix: str, camera: str) -> str:
    return f"{prefix}:{camera}"


def redis_client(url: str, timeout_s: float, client_name: str) -> redis.Redis:
    """A client that fails fast: every command bounded by `timeout_s` and no retries of its own
    (the caller decides when to try again, so a dead server never holds a thread for long)."""
    return redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                retry=Retry(NoBackoff(), 0), client_name=client_name)


class RedisStreamSink(BrokerSink):
    def __init__(self, config: RedisSinkConfig, name: str, client_name: str = "vapipe"):
        super().__init__(name, redact(config.url), config.buffer, config.reconnect_base_s, config.reconnect_cap_s)
        self.config = config
        self.client = redis_client(config.url, config.timeout_s, client_name)

    def connect(self) -> None:
        try:
            self.client.ping()
        except redis.RedisError as exc:
            raise BrokerUnavailable(type(exc).__name__ + (f": {exc}" if str(exc) else "")) from None

    def send(self, batch: list[tuple[str, bytes]]) -> None:
        pipe = self.client.pipeline(transaction=False)
        for camera, message in batch:
            pipe.xadd(stream_for(self.config.stream_prefix, camera), {FIELD: message}, maxlen=self.config.maxlen,
                      approximate=True)
        try:
            pipe.execute()
        except redis.RedisError as exc:
            raise BrokerUnavailable(type(exc).__name__ + (f": {exc}" if str(exc) else "")) from None

    def disconnect(self) -> None:
        self.client.close()
