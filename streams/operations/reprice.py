"""Re-attribution of stored usage after a price change, a new override or new path rules.

Reads the latest attribution of each event in the range from the deduplicated ledger, rebuilds
the event from its stored usage and context, runs it through the same ``attribute`` as the
stream, and writes the result as a new version (a later ``attributed_at``), which the ledger's
``ReplacingMergeTree`` then serves. Every superseded figure goes to ``attribution_audit`` and
the run itself to ``reprice_runs``, so the old numbers stay auditable. Reads go through the
sink's read-only client, writes through the sink like every other write.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from clickhouse_connect.driver.client import Client
from pydantic import AwareDatetime, BaseModel, ConfigDict, model_validator

from schemas.attributed import MAX_COST_USD, AttributedUsage
from schemas.usage import TokenUsage, UsageEvent
from streams.errors import CostlineError
from streams.stages.attribution import Attribution, beyond_ledger
from streams.storage.sink import ClickHouseSink, SinkFailed
from streams.storage.tables import AUDIT, LEDGER, REPRICE_RUNS, RepriceRun, Superseded

_TOKENS = list(TokenUsage.model_fields)
_CONTEXT = ["user_id", "service", "route", "feature", "step", "trace_id", "span_id", "parent_span_id"]
_SELECT = [
    "event_id", "event_time", "tenant_id", "provider", "model", "status", "latency_ms", "batch", "tags", "extra",
    "raw_usage", "raw_usage_format", "cost_usd", "priced", "price_source", "pricing_version", "attributed_at", "late",
    *_CONTEXT, *_TOKENS,
]


class RepriceRefused(CostlineError):
    """A re-priced event the ledger cannot hold; nothing of its page is written."""


class RepriceWindow(BaseModel):
    """Which stored events to re-price: event time in [since, until), optionally one tenant."""

    model_config = ConfigDict(extra="forbid")

    since: AwareDatetime
    until: AwareDatetime | None = None
    tenant: str | None = None

    @model_validator(mode="after")
    def _ordered(self) -> RepriceWindow:
        if self.until is not None and self.until <= self.since:
            raise ValueError("--until must be after --since")
        return self


@dataclass
class RepriceResult:
    reprice_id: str
    events: int = 0
    changed: int = 0
    old_cost_usd: Decimal = Decimal(0)
    new_cost_usd: Decimal = Decimal(0)
    pricing_version: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"reprice_id": self.reprice_id, "events": self.events, "changed": self.changed,
                "old_cost_usd": format(self.old_cost_usd, "f"), "new_cost_usd": format(self.new_cost_usd, "f"),
                "pricing_version": self.pricing_version}


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


def rebuild_event(row: dict[str, Any]) -> UsageEvent:
    """The usage event as it was received, from its ledger row."""
    extra = json.loads(row["extra"]) if row["extra"] else {}
    return UsageEvent(
        event_id=row["event_id"],
        timestamp=_utc(row["event_time"]),
        tenant_id=row["tenant_id"],
        provider=row["provider"],
        model=row["model"],
        usage=TokenUsage(**{name: row[name] for name in _TOKENS}),
        raw_usage=json.loads(row["raw_usage"]) if row["raw_usage"] else None,
        raw_usage_format=row["raw_usage_format"] or None,
        batch=bool(row["batch"]),
        status=row["status"],
        latency_ms=row["latency_ms"],
        tags=dict(row["tags"]),
        **{name: row[name] or None for name in _CONTEXT},
        **extra,
    )


#: Attempts at each write before a re-pricing gives up (a worker's own batches retry without end).
_WRITE_ATTEMPTS = 5


def reprice(
    sink: ClickHouseSink,
    attribution: Attribution,
    since: datetime,
    until: datetime | None = None,
    tenant: str | None = None,
    page_size: int = 10_000,
    reader: Client | None = None,
) -> RepriceResult:
    """Re-prices the stored events of [since, until) (of one tenant); reads with ``reader`` (by
    default the sink's read-only client), writes through ``sink``."""
    reader = reader or sink.reader
    started = datetime.now(UTC)
    result = RepriceResult(reprice_id=uuid.uuid4().hex, pricing_version=attribution.pricer.version)
    where = ["event_time >= {since:DateTime64(3, 'UTC')}"]
    params: dict[str, Any] = {"since": since}
    if until is not None:
        where.append("event_time < {until:DateTime64(3, 'UTC')}")
        params["until"] = until
    if tenant is not None:
        where.append("tenant_id = {tenant:String}")
        params["tenant"] = tenant
    after = None
    while True:
        page_where = list(where)
        if after is not None:
            page_where.append("(tenant_id, event_time, event_id) > "
                              "({t:String}, {ts:DateTime64(3, 'UTC')}, {e:String})")
            params.update(t=after[0], ts=after[1], e=after[2])
        rows = reader.query(
            f"SELECT {', '.join(_SELECT)} FROM usage_ledger FINAL WHERE {' AND '.join(page_where)} "
            f"ORDER BY tenant_id, event_time, event_id LIMIT {int(page_size)}",
            parameters=params,
        ).named_results()
        page = list(rows)
        if not page:
            break
        # The new version must sort after the one it replaces, even within the same millisecond.
        now = max(datetime.now(UTC), max(_utc(r["attributed_at"]) for r in page) + timedelta(milliseconds=1))
        fresh = [attribution.attribute(rebuild_event(row), now, late=row["late"]) for row in page]
        for record in fresh:
            if record.cost_usd > MAX_COST_USD:
                raise RepriceRefused(f"event {record.event_id!r} of tenant {record.tenant_id!r}: {beyond_ledger(record)}; "
                                     f"then re-price again ({result.events:,} events were re-priced before its page, "
                                     "none of that page)")
        superseded = _supersede(result, page, fresh, now)
        # The old figures first: written after the new ones, a failure between the two would lose them.
        _write(sink, [(AUDIT, superseded), (LEDGER, fresh)])
        last = page[-1]
        after = (last["tenant_id"], _utc(last["event_time"]), last["event_id"])
    run = RepriceRun(result.reprice_id, started, since, until, tenant, result.events, result.changed,
                     result.old_cost_usd, result.new_cost_usd, result.pricing_version)
    _write(sink, [(REPRICE_RUNS, [run])])
    return result


def _write(sink: ClickHouseSink, parts: list[tuple[Any, list[Any]]]) -> None:
    if not sink.land(parts, attempts=_WRITE_ATTEMPTS).result():
        raise SinkFailed("the worker is stopping: re-price again once it runs")


def _supersede(result: RepriceResult, old: list[dict[str, Any]], new: list[AttributedUsage],
               now: datetime) -> list[Superseded]:
    """The audit rows of a page, counted into ``result``."""
    rows = []
    for before, after in zip(old, new, strict=True):
        result.events += 1
        result.old_cost_usd += before["cost_usd"]
        result.new_cost_usd += after.cost_usd
        result.changed += before["cost_usd"] != after.cost_usd
        rows.append(Superseded(result.reprice_id, now, before["event_id"], before["event_time"], before["tenant_id"],
                               before["attributed_at"], before["cost_usd"], after.cost_usd, before["priced"],
                               before["price_source"], before["pricing_version"], after.pricing_version))
    return rows
