"""Stages 1-3 as one entry point: raw bytes → validate → price → tag → an attributed record.

``Attribution`` is the only way a raw usage record is attributed, with the same limits everywhere
(``Attribution.from_settings``): the stream (``streams.runtime.processor``) makes ledger rows
(``row_raw``: built and priced in integers, in C), and ``costline backfill``, ``costline price``
and the reference path make ``AttributedUsage`` records (``attribute_raw``: priced in ``Decimal``),
which the rows are held to (``tests/stages/test_rows.py``, ``tests/runtime/test_paths.py``), so
the stream and the offline paths cannot drift apart. ``costline reprice`` starts from stored
events and calls ``attribute``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypeVar

from schemas.attributed import MAX_COST_USD, AttributedUsage
from schemas.dead_letter import Rejection
from schemas.trusted import construct
from schemas.usage import MAX_TOKENS, TokenUsage, UsageEvent
from streams.settings import Settings
from streams.stages.pricing import PROVENANCE, Pricer
from streams.stages.tagging import PathRules
from streams.stages.validation import MAX_EVENT_BYTES, MAX_FUTURE, validate
from streams.storage.compiled import fast, native
from streams.storage.tables import LedgerRow

R = TypeVar("R", AttributedUsage, LedgerRow)


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
        """A raw record's attribution, or why it is rejected (never raises on bad input): the
        reference path's and the offline tools' form, priced in ``Decimal``."""
        return self._raw(value, now, self.attribute, lambda record: record.cost_usd > MAX_COST_USD)

    def row_raw(self, value: bytes | None, now: datetime | None = None) -> LedgerRow | Rejection:
        """``attribute_raw`` as the stream makes it: the ledger row, priced in integer pico-dollars
        (``row``)."""
        return self._raw(value, now, self.row, lambda row: not row.fits_ledger())

    def _raw(self, value: bytes | None, now: datetime | None, attribute: Callable[[UsageEvent, datetime], R],
             beyond: Callable[[R], bool]) -> R | Rejection:
        now = now or datetime.now(UTC)
        checked = validate(value, now=now, max_future=self.max_future, max_bytes=self.max_bytes, fast=self.fast)
        if isinstance(checked, Rejection):
            return checked
        record = attribute(checked, now)
        if beyond(record):  # the ledger would refuse the whole batch, on every retry
            return Rejection(reason="cost_out_of_range",
                             message=f"{beyond_ledger(record)}, then re-submit the dead letter")
        return record

    def row(self, event: UsageEvent, now: datetime | None = None) -> LedgerRow:
        """A valid event's ledger row (``streams.storage._native.LedgerRow``): what ``attribute``
        gives, built and priced in C (``RowBuilder``); ``row.as_model()`` is that record."""
        return _ROWS.build(event, self.pricer.quote(event), self.paths.path_for(event), now or datetime.now(UTC))

    def attribute(self, event: UsageEvent, now: datetime | None = None, late: bool = False) -> AttributedUsage:
        """A valid event's attribution, priced in ``Decimal`` (``Pricer.price``): the reference the
        stream's rows are held to. ``late`` is decided by the quota stage, which runs after this."""
        priced = self.pricer.price(event)
        values = dict.fromkeys(_MODEL_FIELDS)  # (in the model's order: its JSON follows its ``__dict__``)
        values.update(_CONSTANT)
        for field, attribute in _FROM_EVENT:
            values[field] = getattr(event, attribute)
        for field, attribute in _FROM_PRICED:
            values[field] = getattr(priced, attribute)
        values.update(extra=event.model_extra or {}, cost_usd=priced.cost.total, business_path=self.paths.path_for(event),
                      late=late, attributed_at=now or datetime.now(UTC))
        return construct(AttributedUsage, values)


#: How an attributed record is made from an event (``Attribution.attribute``; the stream's rows are
#: built from the same event and price in C, ``streams/stages/_fast.pyx``, and held to these records by
#: ``tests/stages/test_rows.py``). The same on every record (revenue_usd, margin_usd and
#: billing_period are stamped by the quota stage, which rates the call after this):
_CONSTANT = {"schema_version": 1, "currency": "USD", "revenue_usd": None, "margin_usd": None, "billing_period": None}
#: From the event: (field, the event's attribute).
_FROM_EVENT = [
    ("event_id", "event_id"), ("event_time", "timestamp"), ("tenant_id", "tenant_id"), ("user_id", "user_id"),
    ("provider", "provider"), ("model", "model"), ("service", "service"), ("route", "route"), ("feature", "feature"),
    ("step", "step"), ("trace_id", "trace_id"), ("span_id", "span_id"), ("parent_span_id", "parent_span_id"),
    ("status", "status"), ("latency_ms", "latency_ms"), ("reservation_id", "reservation_id"), ("batch", "batch"),
    ("tags", "tags"), ("usage", "usage"), ("raw_usage", "raw_usage"), ("raw_usage_format", "raw_usage_format")]
#: From its price (``pricing.Priced``).
_FROM_PRICED = [
    ("cost", "cost"), ("priced", "priced"), ("unpriced_reason", "unpriced_reason"), ("matched_model", "matched_model"),
    ("price_source", "price_source"), ("pricing_version", "pricing_version"), ("discount", "discount"),
    ("discount_percent", "discount_percent")]
#: Computed for each event (``extra`` is the event's extra fields).
_GIVEN = {"extra", "cost_usd", "business_path", "late", "attributed_at"}
_MODEL_FIELDS = tuple(AttributedUsage.__pydantic_fields__)
_mapped = [*_CONSTANT, *(field for field, _ in _FROM_EVENT), *(field for field, _ in _FROM_PRICED), *_GIVEN]
if sorted(_mapped) != sorted(_MODEL_FIELDS):  # (at import: a new field cannot go unset)
    raise TypeError("streams.stages.attribution maps each field of AttributedUsage once: map "
                    f"{sorted(set(_MODEL_FIELDS) ^ set(_mapped))}")
_ROWS = fast.RowBuilder(TokenUsage.__pydantic_fields__, PROVENANCE, MAX_TOKENS, native.MAX_COST_PICO,
                        native.BEYOND_LEDGER)


def beyond_ledger(record: AttributedUsage | LedgerRow) -> str:
    """What is wrong with a record whose cost exceeds ``MAX_COST_USD``, which ClickHouse refuses to
    store (and with it the whole insert), and what to check."""
    return (f"cost {record.cost_usd} USD of {record.provider}/{record.model} is beyond the ledger's "
            f"{MAX_COST_USD} USD a call; check the token counts, or the price in config/prices.yaml "
            f"({record.price_source})")
