"""The enrichment chain, as plain functions: validate → price → tag → attributed record.

The Faust agents, the offline ``costline price`` command and ``costline reprice`` all call
these, so the streaming pipeline and the offline contract cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from schemas.attributed import MAX_COST_USD, AttributedUsage
from schemas.dead_letter import Rejection
from schemas.usage import UsageEvent
from streams.pricing import Pricer
from streams.tagging import PathRules
from streams.validation import validate


@dataclass(frozen=True)
class Enricher:
    """Everything the chain needs from configuration: prices and path rules."""

    pricer: Pricer
    paths: PathRules

    @classmethod
    def from_config_dir(cls, config_dir: Path) -> Enricher:
        return cls(Pricer.from_file(config_dir / "prices.yaml"), PathRules.from_file(config_dir / "paths.yaml"))


def attribute(event: UsageEvent, enricher: Enricher, now: datetime | None = None, late: bool = False) -> AttributedUsage:
    priced = enricher.pricer.price(event)
    return AttributedUsage.from_trusted({  # a literal: dict(**kwargs) of these 36 costs 0.5 µs more
        "schema_version": 1,
        "event_id": event.event_id,
        "event_time": event.timestamp,
        "tenant_id": event.tenant_id,
        "user_id": event.user_id,
        "provider": event.provider,
        "model": event.model,
        "service": event.service,
        "route": event.route,
        "feature": event.feature,
        "step": event.step,
        "trace_id": event.trace_id,
        "span_id": event.span_id,
        "parent_span_id": event.parent_span_id,
        "status": event.status,
        "latency_ms": event.latency_ms,
        "batch": event.batch,
        "tags": event.tags,
        "extra": event.model_extra or {},
        "usage": event.usage,
        "raw_usage": event.raw_usage,
        "raw_usage_format": event.raw_usage_format,
        "cost": priced.cost,
        "cost_usd": priced.cost.total,
        "currency": "USD",
        "priced": priced.priced,
        "unpriced_reason": priced.unpriced_reason,
        "matched_model": priced.matched_model,
        "price_source": priced.price_source,
        "pricing_version": priced.pricing_version,
        "discount": priced.discount,
        "discount_percent": priced.discount_percent,
        "business_path": enricher.paths.path_for(event),
        "late": late,
        "attributed_at": now or datetime.now(UTC),
    })


def attribute_raw(
    value: bytes | None,
    enricher: Enricher,
    *,
    now: datetime | None = None,
    max_future: timedelta = timedelta(days=1),
    max_bytes: int = 1_048_576,
) -> AttributedUsage | Rejection:
    now = now or datetime.now(UTC)
    checked = validate(value, now=now, max_future=max_future, max_bytes=max_bytes)
    if isinstance(checked, Rejection):
        return checked
    record = attribute(checked, enricher, now)
    if record.cost_usd > MAX_COST_USD:  # the ledger would refuse the whole batch, on every retry
        return Rejection(reason="cost_out_of_range", message=f"{beyond_ledger(record)}, then re-submit the dead letter")
    return record


def beyond_ledger(record: AttributedUsage) -> str:
    """What is wrong with a record whose cost exceeds ``MAX_COST_USD``, which ClickHouse refuses to
    store (and with it the whole insert), and what to check."""
    return (f"cost {record.cost_usd} USD of {record.provider}/{record.model} is beyond the ledger's "
            f"{MAX_COST_USD} USD a call; check the token counts, or the price in config/prices.yaml "
            f"({record.price_source})")
