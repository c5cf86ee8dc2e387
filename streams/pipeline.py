"""The enrichment chain, as plain functions: validate → price → tag → attributed record.

The Faust agents and the offline ``costline price`` command both call ``attribute_raw``,
so the streaming pipeline and the offline contract cannot drift apart.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from schemas.attributed import AttributedUsage
from schemas.dead_letter import Rejection
from schemas.usage import UsageEvent
from streams.pricing import PriceCatalog, price_event
from streams.tagging import business_path
from streams.validation import validate


def attribute(event: UsageEvent, catalog: PriceCatalog) -> AttributedUsage:
    priced = price_event(event, catalog)
    usage = event.usage
    return AttributedUsage(
        event_id=event.event_id,
        event_time=event.timestamp,
        tenant_id=event.tenant_id,
        user_id=event.user_id,
        provider=event.provider,
        model=event.model,
        service=event.service,
        route=event.route,
        feature=event.feature,
        step=event.step,
        trace_id=event.trace_id,
        span_id=event.span_id,
        parent_span_id=event.parent_span_id,
        status=event.status,
        latency_ms=event.latency_ms,
        batch=event.batch,
        tags=event.tags,
        extra=event.model_extra or {},
        input_tokens=usage.input_tokens if usage else 0,
        cache_read_tokens=usage.cache_read_tokens if usage else 0,
        cache_write_tokens=usage.cache_write_tokens if usage else 0,
        output_tokens=usage.output_tokens if usage else 0,
        reasoning_tokens=usage.reasoning_tokens if usage else 0,
        cost=priced.cost,
        cost_usd=priced.cost.total,
        priced=priced.priced,
        unpriced_reason=priced.unpriced_reason,
        matched_model=priced.matched_model,
        price_source=priced.price_source,
        business_path=business_path(event),
        attributed_at=datetime.now(UTC),
    )


def attribute_raw(
    value: bytes | None,
    catalog: PriceCatalog,
    *,
    now: datetime | None = None,
    max_future: timedelta = timedelta(days=1),
    max_bytes: int = 1_048_576,
) -> AttributedUsage | Rejection:
    checked = validate(value, now=now or datetime.now(UTC), max_future=max_future, max_bytes=max_bytes)
    if isinstance(checked, Rejection):
        return checked
    return attribute(checked, catalog)
