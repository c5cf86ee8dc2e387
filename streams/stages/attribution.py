"""Stages 1-3 as one entry point: raw bytes → validate → price → tag → an attributed record.

``Attribution.attribute_raw`` is the only way a raw usage record is attributed: the stream
(``streams.runtime.processor``), ``costline backfill``, ``costline price`` and the tests call it
with the same limits (``Attribution.from_settings``), so the stream and the offline paths cannot
drift apart. ``costline reprice`` starts from stored events and calls ``attribute``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from schemas.attributed import MAX_COST_USD, AttributedUsage
from schemas.dead_letter import Rejection
from schemas.usage import UsageEvent
from streams.settings import Settings
from streams.stages.pricing import Pricer
from streams.stages.tagging import PathRules
from streams.stages.validation import MAX_EVENT_BYTES, MAX_FUTURE, validate


@dataclass(frozen=True)
class Attribution:
    """Everything attribution needs: prices, path rules, and the limits of what is accepted."""

    pricer: Pricer
    paths: PathRules
    max_future: timedelta = MAX_FUTURE
    max_bytes: int = MAX_EVENT_BYTES
    #: Off: every event validated by pydantic alone (the reference path; see ``validate``).
    fast: bool = True

    @classmethod
    def from_config_dir(cls, config_dir: Path, **limits: object) -> Attribution:
        return cls(Pricer.from_file(config_dir / "prices.yaml"), PathRules.from_file(config_dir / "paths.yaml"),
                   **limits)  # type: ignore[arg-type]

    @classmethod
    def from_settings(cls, settings: Settings) -> Attribution:
        return cls.from_config_dir(settings.config_dir, max_future=timedelta(seconds=settings.max_future_s),
                                   max_bytes=settings.max_event_bytes)

    def attribute_raw(self, value: bytes | None, now: datetime | None = None) -> AttributedUsage | Rejection:
        """A raw record's attribution, or why it is rejected (never raises on bad input)."""
        now = now or datetime.now(UTC)
        checked = validate(value, now=now, max_future=self.max_future, max_bytes=self.max_bytes, fast=self.fast)
        if isinstance(checked, Rejection):
            return checked
        record = self.attribute(checked, now)
        if record.cost_usd > MAX_COST_USD:  # the ledger would refuse the whole batch, on every retry
            return Rejection(reason="cost_out_of_range",
                             message=f"{beyond_ledger(record)}, then re-submit the dead letter")
        return record

    def attribute(self, event: UsageEvent, now: datetime | None = None, late: bool = False) -> AttributedUsage:
        """A valid event's attribution. ``late`` is decided by the quota stage, which runs after this."""
        priced = self.pricer.price(event)
        return AttributedUsage.from_trusted({  # a literal: dict(**kwargs) of these 40 fields is slower
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
            "reservation_id": event.reservation_id,
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
            "revenue_usd": None,  # rated by the quota stage, which runs after this
            "margin_usd": None,
            "billing_period": None,
            "business_path": self.paths.path_for(event),
            "late": late,
            "attributed_at": now or datetime.now(UTC),
        })


def beyond_ledger(record: AttributedUsage) -> str:
    """What is wrong with a record whose cost exceeds ``MAX_COST_USD``, which ClickHouse refuses to
    store (and with it the whole insert), and what to check."""
    return (f"cost {record.cost_usd} USD of {record.provider}/{record.model} is beyond the ledger's "
            f"{MAX_COST_USD} USD a call; check the token counts, or the price in config/prices.yaml "
            f"({record.price_source})")
