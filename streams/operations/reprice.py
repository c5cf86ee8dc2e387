"""Re-attribution of stored usage after a price change, a new override or new path rules.

Reads the latest attribution of each event in the range from the deduplicated ledger, rebuilds
the event from its stored usage and context, runs it through the same ``attribute`` as the
stream, and writes the result as a new version (a later ``attributed_at``), which the ledger's
``ReplacingMergeTree`` then serves. Every superseded figure goes to ``attribution_audit`` and
the run itself to ``reprice_runs``, so the old numbers stay auditable. Reads go through the
sink's read-only client, writes through the sink like every other write.

With the plans (``plans.yaml``), revenue is re-rated too, with the stream's own stage
(``streams.stages.revenue``), tenant by tenant in event-time order. The calls of a billing period
before ``since`` are counted first, as stored (not rewritten), so the re-priced calls pay the tiers
the period had reached. A period's revenue then adds up to its rating again when the re-pricing
covers the period from ``since`` to its end; to re-rate a period after a change of its rate card,
re-price from the period's start (a narrower range leaves the other calls at the old card, and
``costline invoice`` shows the difference).
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
from streams.stages.plans import Plans
from streams.stages.revenue import RevenueMeter, stamped
from streams.storage.sink import ClickHouseSink, SinkFailed
from streams.storage.tables import AUDIT, LEDGER, REPRICE_RUNS, RepriceRun, Superseded

_TOKENS = list(TokenUsage.model_fields)
_CONTEXT = ["user_id", "service", "route", "feature", "step", "trace_id", "span_id", "parent_span_id"]
_SELECT = [
    "event_id", "event_time", "tenant_id", "provider", "model", "status", "latency_ms", "batch", "tags", "extra",
    "raw_usage", "raw_usage_format", "cost_usd", "priced", "price_source", "pricing_version", "attributed_at", "late",
    "revenue_usd", "business_path",
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
    #: Revenue before and after (unrated calls count as 0).
    old_revenue_usd: Decimal = Decimal(0)
    new_revenue_usd: Decimal = Decimal(0)

    def to_json(self) -> dict[str, Any]:
        return {"reprice_id": self.reprice_id, "events": self.events, "changed": self.changed,
                "old_cost_usd": format(self.old_cost_usd, "f"), "new_cost_usd": format(self.new_cost_usd, "f"),
                "old_revenue_usd": format(self.old_revenue_usd, "f"),
                "new_revenue_usd": format(self.new_revenue_usd, "f"), "pricing_version": self.pricing_version}


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
    plans: Plans | None = None,
) -> RepriceResult:
    """Re-prices the stored events of [since, until) (of one tenant), and re-rates their revenue
    with ``plans``; reads with ``reader`` (by default the sink's read-only client), writes through
    ``sink``."""
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
    meter = RevenueMeter(plans) if plans is not None else None
    periods: dict[str, Any] = {}
    seen: set[str] = set()
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
        if plans is not None:
            fresh = _rerated(meter, periods, seen, reader, fresh, since)
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
                     result.old_cost_usd, result.new_cost_usd, result.pricing_version, result.old_revenue_usd,
                     result.new_revenue_usd)
    _write(sink, [(REPRICE_RUNS, [run])])
    return result


#: Every tenant's billing period holding ``since`` starts at most this long before the UTC month
#: holding it (the zone furthest ahead of UTC, +14:00).
_ZONE_LEAD = timedelta(hours=14)


def _rerated(meter: RevenueMeter, periods: dict[str, Any], seen: set[str], reader: Client,
             fresh: list[AttributedUsage], since: datetime) -> list[AttributedUsage]:
    """The page's records with their revenue re-rated; a tenant seen for the first time has the
    calls of its period before ``since`` counted first, as stored."""
    out = []
    for record in fresh:
        if record.tenant_id not in seen and meter.rates(record.tenant_id):
            seen.add(record.tenant_id)
            _count_before(meter, periods, reader, record.tenant_id, since)
        # The quota stage's late flag stays; a call of a period closed here is late for revenue too.
        rated = meter.rate(record, periods, record.attributed_at)
        out.append(stamped(record, rated, late=record.late or rated.late))
    return out


def _count_before(meter: RevenueMeter, periods: dict[str, Any], reader: Client, tenant: str,
                  since: datetime) -> None:
    """Counts the tenant's stored calls of the billing period holding ``since`` that came before it."""
    month = since.replace(day=1, hour=0, minute=0, second=0, microsecond=0) - _ZONE_LEAD
    rows = reader.query(
        "SELECT event_id, event_time, provider, model, business_path, feature, input_tokens, output_tokens, "
        "cost_usd FROM usage_ledger FINAL WHERE tenant_id = {t:String} AND event_time >= {m:DateTime64(3, 'UTC')} "
        "AND event_time < {s:DateTime64(3, 'UTC')} ORDER BY event_time, event_id",
        parameters={"t": tenant, "m": month, "s": since}).result_rows
    for event_id, at, provider, model, path, feature, tokens_in, tokens_out, cost in rows:
        meter.rate(AttributedUsage.model_construct(
            event_id=event_id, event_time=_utc(at), tenant_id=tenant, provider=provider, model=model,
            business_path=path, feature=feature or None, cost_usd=cost,
            usage=TokenUsage(input_tokens=tokens_in, output_tokens=tokens_out)), periods, since)


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
        result.changed += before["cost_usd"] != after.cost_usd or before["revenue_usd"] != after.revenue_usd
        result.old_revenue_usd += before["revenue_usd"] or 0
        result.new_revenue_usd += after.revenue_usd or 0
        rows.append(Superseded(result.reprice_id, now, before["event_id"], before["event_time"], before["tenant_id"],
                               before["attributed_at"], before["cost_usd"], after.cost_usd, before["priced"],
                               before["price_source"], before["pricing_version"], after.pricing_version,
                               before["revenue_usd"], after.revenue_usd))
    return rows
