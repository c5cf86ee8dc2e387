"""Hostile records for the poison campaign: every malformed shape a producer can send, seeded."""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta

#: A valid event's fields, which the shapes below break one way each.
_BASE = {"event_id": "", "timestamp": "", "tenant_id": "hostile", "provider": "openai", "model": "gpt-4o",
         "usage": {"input_tokens": 100, "output_tokens": 10}}
_WRONG_TYPES: list[tuple[str, object]] = [
    ("event_id", 7), ("event_id", ""), ("event_id", "x" * 200), ("timestamp", 1_700_000_000), ("timestamp", "yesterday"),
    ("timestamp", "2026-06-01T10:00:00"), ("tenant_id", None), ("tenant_id", ["a"]), ("provider", {}),
    ("model", 3.5), ("usage", "lots"), ("usage", {"input_tokens": "100"}), ("usage", {"input_tokens": -1}),
    ("usage", {"input_tokens": 10**12}), ("usage", {"input_tokens": 1.5}), ("usage", {"output_tokens": True}),
    ("usage", {"input_tokens": 10, "cache_read_tokens": 11}), ("usage", {"output_tokens": 5, "reasoning_tokens": 6}),
    ("tags", {"k": 1}), ("tags", {f"k{i}": "v" for i in range(65)}), ("status", "maybe"), ("latency_ms", -5),
    ("latency_ms", 4_294_967_296), ("batch", "yes"), ("schema_version", 2), ("raw_usage", {"tokens": 5}),
    ("raw_usage_format", "carrier-pigeon"),
]


def _broken_field(rng: random.Random, i: int, now: datetime) -> bytes:
    field, value = rng.choice(_WRONG_TYPES)
    event = {**_BASE, "event_id": f"hostile-{i}", "timestamp": now.isoformat(), field: value}
    if field == "raw_usage" or field == "raw_usage_format":
        event.pop("usage")
    return json.dumps(event).encode()


def _bad_time(rng: random.Random, i: int, now: datetime) -> bytes:
    at = rng.choice([now + timedelta(days=2), now + timedelta(days=3650), datetime(1999, 12, 31, tzinfo=UTC)])
    return json.dumps({**_BASE, "event_id": f"hostile-{i}", "timestamp": at.isoformat()}).encode()


SHAPES: list[tuple[str, Callable[[random.Random, int, datetime], bytes | None]]] = [
    ("random bytes", lambda rng, i, now: rng.randbytes(rng.randint(0, 300))),
    ("invalid UTF-8", lambda rng, i, now: b'{"event_id": "\xff\xfe' + rng.randbytes(8) + b'"}'),
    ("JSON, not an object", lambda rng, i, now: json.dumps(rng.choice([1, "x", None, [1, 2], True, 2.5])).encode()),
    ("deep nesting", lambda rng, i, now: b"[" * 100_000 + b"]" * 100_000),
    ("empty object", lambda rng, i, now: b"{}"),
    ("null value", lambda rng, i, now: None),
    ("a field of the wrong type or value", _broken_field),
    ("a time out of range", _bad_time),
    ("truncated JSON", lambda rng, i, now: json.dumps({**_BASE, "event_id": f"hostile-{i}"}).encode()[:40]),
]
#: Oversized payloads (2 MB, above the 1 MiB event limit) are this rare, to keep the load bounded.
HUGE_EVERY = 1_000


def hostile_records(count: int, seed: int = 11) -> Iterator[tuple[str, bytes | None]]:
    """``count`` hostile records: (shape, value)."""
    rng = random.Random(seed)
    now = datetime.now(UTC)
    for i in range(count):
        if i % HUGE_EVERY == HUGE_EVERY - 1:
            yield "oversized", json.dumps({**_BASE, "event_id": f"hostile-{i}", "timestamp": now.isoformat(),
                                           "padding": "x" * 2_000_000}).encode()
            continue
        shape, make = SHAPES[i % len(SHAPES)]
        yield shape, make(rng, i, now)
