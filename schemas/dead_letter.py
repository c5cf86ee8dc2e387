"""The dead-letter contract of ``usage.dlq``.

A dead letter keeps the rejected record exactly as it arrived: same key, same value bytes,
same timestamp, so it can be re-submitted after a fix. Why it was rejected and where it came
from travel in Kafka headers (the convention Kafka Connect uses for its dead-letter queues).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel

HEADER_REASON = "costline.error.reason"
HEADER_MESSAGE = "costline.error.message"
HEADER_TOPIC = "costline.source.topic"
HEADER_PARTITION = "costline.source.partition"
HEADER_OFFSET = "costline.source.offset"

Reason = Literal[
    "invalid_utf8",
    "invalid_json",
    "invalid_event",
    "unsupported_schema_version",
    "payload_too_large",
    "timestamp_out_of_range",
    "cost_out_of_range",
    "processing_error",
    "invalid_block",
    # The OTLP input (``streams.stages.spans``): a message that is not OTLP traces, and one with an
    # inference span that cannot make a valid usage event.
    "invalid_otlp",
    "invalid_span",
]


class Rejection(BaseModel):
    """Why one record was rejected: a machine-readable reason and a one-line message."""

    reason: Reason
    message: str


class DeadLetter(BaseModel):
    """A dead letter as read back from ``usage.dlq``."""

    reason: Reason
    message: str
    source_topic: str
    source_partition: int
    source_offset: int
    key: bytes | None
    value: bytes

    @classmethod
    def from_record(cls, key: bytes | None, value: bytes, headers: list[tuple[str, bytes]]) -> DeadLetter:
        h = {name: raw.decode() for name, raw in headers or []}
        return cls(
            reason=h[HEADER_REASON],
            message=h.get(HEADER_MESSAGE, ""),
            source_topic=h.get(HEADER_TOPIC, ""),
            source_partition=int(h.get(HEADER_PARTITION, -1)),
            source_offset=int(h.get(HEADER_OFFSET, -1)),
            key=key,
            value=value,
        )


def dead_letter_headers(rejection: Rejection, topic: str, partition: int, offset: int) -> list[tuple[str, bytes]]:
    return [
        (HEADER_REASON, rejection.reason.encode()),
        (HEADER_MESSAGE, rejection.message.encode()),
        (HEADER_TOPIC, topic.encode()),
        (HEADER_PARTITION, str(partition).encode()),
        (HEADER_OFFSET, str(offset).encode()),
    ]
