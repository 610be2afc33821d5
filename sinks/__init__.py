"""Broker outputs beside ZeroMQ: detections to Redis Streams and MQTT (`publish.sinks`).

The publish stage hands each message, already encoded, to every sink with `offer`, which never
blocks: a sink keeps a bounded buffer and sends from its own thread, so a slow or dead broker
costs that sink's messages (counted), never the pipeline's frames per second.
"""

from __future__ import annotations

from pipeline.config import MqttSinkConfig, RedisSinkConfig
from sinks.base import BrokerSink


def create_sinks(configs: list, client_name: str = "vapipe") -> list[BrokerSink]:
    """One started sink for each `publish.sinks` entry; `client_name` names this process to the brokers."""
    sinks: list[BrokerSink] = []
    for index, config in enumerate(configs):
        if isinstance(config, RedisSinkConfig):
            from sinks.redis_stream import RedisStreamSink

            sinks.append(RedisStreamSink(config, f"sinks[{index}].redis", client_name))
        elif isinstance(config, MqttSinkConfig):
            from sinks.mqtt import MqttSink

            sinks.append(MqttSink(config, f"sinks[{index}].mqtt", client_name))
    for sink in sinks:
        sink.start()
    return sinks
