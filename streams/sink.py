"""Stage 5: records → ClickHouse, in column-oriented batches: attributed usage into the ledger,
quota alerts into ``quota_alerts``.

A batch is retried, identically and with the same ``insert_deduplication_token``, until
ClickHouse takes it: the consumer offsets behind a batch are committed only after this
returns, so a failed insert never loses events and a retried one never doubles them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from clickhouse_connect.driver.client import Client

from schemas.attributed import AttributedUsage
from schemas.quota import QuotaAlert

log = logging.getLogger(__name__)

R = TypeVar("R")


@dataclass(frozen=True)
class Sink:
    """The sink's ClickHouse clients: ``writer`` lands batches; ``reader`` (from ``connect_readonly``)
    serves queries. chDB keeps settings per session, so the two are never the same client."""

    writer: Client
    reader: Client
    #: The one thread that uses ``writer`` (chDB clients are not shared between threads).
    executor: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=1, thread_name_prefix="clickhouse-writer"))


@dataclass(frozen=True)
class TableSpec(Generic[R]):
    """A ClickHouse table, its columns with their types (so no insert needs a DESCRIBE), how to get
    each column's value from a record, and the identity of a record (for the deduplication token)."""

    name: str
    columns: list[tuple[str, str, Callable[[R], Any]]]
    identity: Callable[[R], str]

    @property
    def column_names(self) -> list[str]:
        return [name for name, _, _ in self.columns]

    @property
    def column_types(self) -> list[str]:
        return [ch_type for _, ch_type, _ in self.columns]

    def to_columns(self, records: Sequence[R]) -> list[list[Any]]:
        return [[get(r) for r in records] for _, _, get in self.columns]

    def dedup_token(self, records: Sequence[R]) -> str:
        """Identical for a retry of the same batch, different for any other batch."""
        digest = hashlib.sha256()
        for r in records:
            digest.update(self.identity(r).encode())
            digest.update(b"\x01")
        return digest.hexdigest()

    def insert(self, client: Client, records: Sequence[R], token: str) -> None:
        client.insert(
            self.name,
            self.to_columns(records),
            column_names=self.column_names,
            column_type_names=self.column_types,
            column_oriented=True,
            settings={"insert_deduplication_token": token},
        )

_DECIMAL = "Decimal(18, 12)"
_TOKEN_CLASSES = [
    "input_tokens", "cache_read_tokens", "cache_write_tokens", "output_tokens", "reasoning_tokens",
    "cache_write_1h_tokens", "input_audio_tokens", "cache_audio_read_tokens", "input_image_tokens",
    "cache_image_read_tokens", "output_audio_tokens", "output_image_tokens",
]
_COST_CLASSES = [
    "input", "cache_read", "cache_write", "output", "reasoning",
    "input_audio", "input_image", "output_audio", "output_image", "request",
]


def _json(value: object) -> str:
    return json.dumps(value, separators=(",", ":")) if value else ""


def _token(name: str) -> Callable[[AttributedUsage], object]:
    return lambda r: getattr(r.usage, name)


def _cost(name: str) -> Callable[[AttributedUsage], object]:
    return lambda r: getattr(r.cost, name)


LEDGER: TableSpec[AttributedUsage] = TableSpec("usage_ledger", identity=lambda r: f"{r.event_id}\x00{r.attributed_at.isoformat()}", columns=[
    ("event_id", "String", lambda r: r.event_id),
    ("event_time", "DateTime64(3, 'UTC')", lambda r: r.event_time),
    ("tenant_id", "LowCardinality(String)", lambda r: r.tenant_id),
    ("user_id", "String", lambda r: r.user_id or ""),
    ("provider", "LowCardinality(String)", lambda r: r.provider),
    ("model", "LowCardinality(String)", lambda r: r.model),
    ("matched_model", "LowCardinality(String)", lambda r: r.matched_model or ""),
    ("service", "LowCardinality(String)", lambda r: r.service or ""),
    ("route", "LowCardinality(String)", lambda r: r.route or ""),
    ("feature", "LowCardinality(String)", lambda r: r.feature or ""),
    ("step", "LowCardinality(String)", lambda r: r.step or ""),
    ("business_path", "LowCardinality(String)", lambda r: r.business_path),
    ("trace_id", "String", lambda r: r.trace_id or ""),
    ("span_id", "String", lambda r: r.span_id or ""),
    ("parent_span_id", "String", lambda r: r.parent_span_id or ""),
    ("status", "LowCardinality(String)", lambda r: r.status),
    ("latency_ms", "Nullable(UInt32)", lambda r: r.latency_ms),
    ("batch", "Bool", lambda r: r.batch),
    ("tags", "Map(String, String)", lambda r: r.tags),
    ("extra", "String", lambda r: _json(r.extra)),
    ("raw_usage", "String", lambda r: _json(r.raw_usage)),
    ("raw_usage_format", "LowCardinality(String)", lambda r: r.raw_usage_format or ""),
    *[(name, "UInt64", _token(name)) for name in _TOKEN_CLASSES],
    *[(f"cost_{name}", _DECIMAL, _cost(name)) for name in _COST_CLASSES],
    ("cost_usd", _DECIMAL, lambda r: r.cost_usd),
    ("currency", "LowCardinality(String)", lambda r: r.currency),
    ("priced", "Bool", lambda r: r.priced),
    ("unpriced_reason", "String", lambda r: r.unpriced_reason or ""),
    ("price_source", "LowCardinality(String)", lambda r: r.price_source or ""),
    ("pricing_version", "LowCardinality(String)", lambda r: r.pricing_version or ""),
    ("discount", "LowCardinality(String)", lambda r: r.discount or ""),
    ("discount_percent", "Decimal(9, 4)", lambda r: r.discount_percent),
    ("late", "Bool", lambda r: r.late),
    ("attributed_at", "DateTime64(3, 'UTC')", lambda r: r.attributed_at),
])

ALERTS: TableSpec[QuotaAlert] = TableSpec("quota_alerts", identity=lambda a: a.alert_id, columns=[
    ("alert_id", "String", lambda a: a.alert_id),
    ("tenant_id", "LowCardinality(String)", lambda a: a.tenant_id),
    ("limit_id", "LowCardinality(String)", lambda a: a.limit_id),
    ("metric", "LowCardinality(String)", lambda a: a.metric),
    ("scope", "LowCardinality(String)", lambda a: a.scope),
    ("scope_value", "String", lambda a: a.scope_value),
    ("window_start", "DateTime64(3, 'UTC')", lambda a: a.window_start),
    ("window_end", "DateTime64(3, 'UTC')", lambda a: a.window_end),
    ("threshold_percent", "Decimal(9, 4)", lambda a: a.threshold_percent),
    ("level", "LowCardinality(String)", lambda a: a.level),
    ("usage", "Decimal(38, 12)", lambda a: a.usage),
    ("limit_value", "Decimal(38, 12)", lambda a: a.limit),
    ("crossed_at", "DateTime64(3, 'UTC')", lambda a: a.crossed_at),
    ("event_id", "String", lambda a: a.event_id),
])
@dataclass
class SinkStats:
    landed: int = 0
    batches: int = 0
    errors: int = 0
    last_error: str | None = None
    failing_since: float | None = None
    #: Time from a batch's first insert attempt until it landed, retries included.
    batch_seconds_sum: float = 0.0
    batch_seconds_max: float = 0.0


@dataclass(frozen=True)
class Backoff:
    first_s: float = 0.2
    max_s: float = 30.0

    def delay(self, attempt: int) -> float:
        return min(self.max_s, self.first_s * 2 ** min(attempt, 20))


def land(
    client: Client,
    table: TableSpec[R],
    records: Sequence[R],
    stats: SinkStats,
    *,
    backoff: Backoff = Backoff(),
    stopping: threading.Event | None = None,
    insert: Callable[[Client, Sequence[R], str], None] | None = None,
) -> bool:
    """Inserts the batch, retrying until it lands. Returns False only if ``stopping`` was set first."""
    insert = insert or table.insert
    token = table.dedup_token(records)
    started = time.monotonic()
    attempt = 0
    while True:
        try:
            insert(client, records, token)
        except Exception as exc:  # noqa: BLE001 - any failure of the write is retried, never dropped
            stats.errors += 1
            stats.last_error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
            stats.failing_since = stats.failing_since or time.monotonic()
            wait = backoff.delay(attempt)
            log.warning("ClickHouse insert of %d rows failed (attempt %d), retrying in %.1fs: %s",
                        len(records), attempt + 1, wait, stats.last_error)
            attempt += 1
            if stopping is not None:
                if stopping.wait(wait):
                    return False
            else:
                time.sleep(wait)
            continue
        elapsed = time.monotonic() - started
        stats.landed += len(records)
        stats.batches += 1
        stats.batch_seconds_sum += elapsed
        stats.batch_seconds_max = max(stats.batch_seconds_max, elapsed)
        stats.failing_since = None
        return True
