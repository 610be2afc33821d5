"""MQTT sink: each camera's detections published on `<topic_prefix>/<camera>` (paho-mqtt).

paho's network thread connects (and reconnects, with its own backoff between
`reconnect_base_s` and `reconnect_cap_s`); this sink's thread hands it messages only while it is
connected, so what waits for a broker that is away waits in the sink's bounded buffer (oldest
dropped, counted). QoS 1 and 2 are delivered by paho after a reconnect; QoS 0 messages written to
a connection as it breaks are lost, as QoS 0 allows.
"""

from __future__ import annotations

import time
import uuid
from urllib.parse import unquote, urlsplit

import paho.mqtt.client as mqtt

from pipeline.config import MqttSinkConfig
from sinks.base import BrokerSink, BrokerUnavailable
from stages.source import redact


def topic_for(prefix: str, camera: str) -> str:
    return f"{prefix}/{camera}"


class MqttSink(BrokerSink):
    def __init__(self, config: MqttSinkConfig, name: str, client_name: str = "vapipe"):
        super().__init__(name, redact(config.url), config.buffer, config.reconnect_base_s, config.reconnect_cap_s)
        self.config = config
        parts = urlsplit(config.url)
        self.host, self.port = parts.hostname or "localhost", parts.port or (8883 if parts.scheme == "mqtts" else 1883)
        client_id = config.client_id or f"{client_name}-{uuid.uuid4().hex[:8]}"
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id)
        if parts.username:
            self.client.username_pw_set(unquote(parts.username), unquote(parts.password or ""))
        if parts.scheme == "mqtts":
            self.client.tls_set()
        self.client.connect_timeout = config.timeout_s
        self.client.reconnect_delay_set(max(1, round(config.reconnect_base_s)), max(1, round(config.reconnect_cap_s)))
        self.client.max_queued_messages_set(config.buffer)  # paho's own queue (QoS > 0 in flight) is bounded too
        self._last_info: mqtt.MQTTMessageInfo | None = None
        self._loop_started = False

    def connect(self) -> None:
        if not self._loop_started:
            self.client.connect_async(self.host, self.port, keepalive=max(5, round(self.config.timeout_s * 5)))
            self.client.loop_start()  # paho's thread: connects, reconnects, reads acks
            self._loop_started = True
        deadline = time.monotonic() + self.config.timeout_s
        while not self.client.is_connected():
            if time.monotonic() > deadline:
                raise BrokerUnavailable("not connected")
            time.sleep(0.02)

    def send(self, batch: list[tuple[str, bytes]]) -> None:
        for i, (camera, message) in enumerate(batch):
            if not self.client.is_connected():
                self._resend_from(batch, i, "connection lost")
            info = self.client.publish(topic_for(self.config.topic_prefix, camera), message, qos=self.config.qos)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                self._resend_from(batch, i, mqtt.error_string(info.rc))
            self._last_info = info

    def _resend_from(self, batch: list, index: int, why: str) -> None:
        """What was handed to paho stays with it; the rest goes back to the buffer (the caller puts it back)."""
        self.sent += index
        del batch[:index]
        raise BrokerUnavailable(why)

    def disconnect(self) -> None:
        if self._last_info is not None:  # QoS 0: written to the socket; QoS 1/2: acknowledged
            try:
                self._last_info.wait_for_publish(timeout=self.config.timeout_s)
            except (RuntimeError, ValueError):
                pass
        self.client.disconnect()
        self.client.loop_stop()
