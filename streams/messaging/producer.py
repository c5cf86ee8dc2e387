"""``UsageProducer``: the Python SDK that applications use to publish usage events.

    from streams.messaging.producer import UsageProducer

    with UsageProducer("127.0.0.1:9092") as producer:
        producer.send(event)          # a UsageEvent, a dict or a JSON string; validated first

Delivery is idempotent (``enable.idempotence``, ``acks=all``); the key is the tenant and the
record timestamp the event time; keys are partitioned with murmur2 like the Java and aiokafka
clients, so a tenant lands on the same partition whichever client sent it. ``flush()`` and
``close()`` raise ``DeliveryFailed`` if any event could not be delivered.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from confluent_kafka import KafkaError, Message, Producer

from schemas.usage import UsageEvent
from streams.errors import CostlineError

DEFAULT_TOPIC = "usage.raw"


class DeliveryFailed(CostlineError):
    """One or more events were not acknowledged by Kafka."""

    def __init__(self, failures: list[tuple[bytes | None, str]]):
        self.failures = failures
        key, reason = failures[0]
        super().__init__(f"{len(failures)} event(s) not delivered; first (key={key!r}): {reason}")


class UsageProducer:
    def __init__(
        self,
        bootstrap_servers: str = "127.0.0.1:9092",
        topic: str = DEFAULT_TOPIC,
        config: Mapping[str, Any] | None = None,
    ) -> None:
        self.topic = topic
        self.delivered = 0
        self._failures: list[tuple[bytes | None, str]] = []
        self._producer = Producer(
            {
                "bootstrap.servers": bootstrap_servers,
                "enable.idempotence": True,
                "acks": "all",
                "partitioner": "murmur2_random",
                "linger.ms": 5,
                "compression.type": "lz4",
                **(config or {}),
            }
        )

    # --- sending -------------------------------------------------------------------------------

    def send(self, event: UsageEvent | Mapping[str, Any] | str | bytes) -> UsageEvent:
        """Validates and sends one event; returns the validated event. Raises ``ValidationError``."""
        if isinstance(event, UsageEvent):
            value = event.model_dump_json(exclude_none=True).encode()
        else:
            value = event.encode() if isinstance(event, str) else event if isinstance(event, bytes) \
                else json.dumps(event, separators=(",", ":")).encode()
            # The worker validates the JSON form, so the SDK does too: what passes here passes there.
            event = UsageEvent.model_validate_json(value)
        self.send_raw(value, key=event.kafka_key(), timestamp_ms=event.timestamp_ms())
        return event

    def send_raw(
        self,
        value: bytes,
        key: bytes | None = None,
        timestamp_ms: int | None = None,
        headers: list[tuple[str, bytes]] | None = None,
        topic: str | None = None,
    ) -> None:
        """Sends bytes as they are, without validation (re-submitting dead letters, tests), to
        ``topic`` or the producer's own."""
        kwargs: dict[str, Any] = {"key": key, "value": value, "on_delivery": self._on_delivery}
        if timestamp_ms is not None:
            kwargs["timestamp"] = timestamp_ms
        if headers:
            kwargs["headers"] = headers
        while True:
            try:
                self._producer.produce(topic or self.topic, **kwargs)
                break
            except BufferError:
                self._producer.poll(0.1)  # local queue full: serve delivery reports, then retry
        self._producer.poll(0)

    def _on_delivery(self, err: KafkaError | None, msg: Message) -> None:
        if err is None:
            self.delivered += 1
        else:
            self._failures.append((msg.key(), err.str()))

    # --- completion ----------------------------------------------------------------------------

    def flush(self, timeout_s: float = 30.0) -> None:
        remaining = self._producer.flush(timeout_s)
        if remaining:
            self._failures.append((None, f"{remaining} event(s) still queued after {timeout_s}s"))
        if self._failures:
            failures, self._failures = self._failures, []
            raise DeliveryFailed(failures)

    def close(self, timeout_s: float = 30.0) -> None:
        self.flush(timeout_s)

    def __enter__(self) -> UsageProducer:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self._producer.flush(5.0)  # best effort; the original exception wins
