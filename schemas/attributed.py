"""The attributed record: one priced, tagged usage event, as published on ``usage.attributed``
and stored in the ClickHouse ledger. Money is ``Decimal`` (a decimal string in JSON)."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class CostBreakdown(BaseModel):
    """Cost of each token class in USD. ``total`` is their exact sum."""

    model_config = ConfigDict(frozen=True)

    input: Decimal = Decimal(0)
    cache_read: Decimal = Decimal(0)
    cache_write: Decimal = Decimal(0)
    output: Decimal = Decimal(0)

    @property
    def total(self) -> Decimal:
        return self.input + self.cache_read + self.cache_write + self.output


class AttributedUsage(BaseModel):
    """A usage event with its cost, price provenance and business path."""

    model_config = ConfigDict(frozen=True)

    schema_version: Literal[1] = 1
    event_id: str
    event_time: datetime
    tenant_id: str
    user_id: str | None = None
    provider: str
    model: str
    service: str | None = None
    route: str | None = None
    feature: str | None = None
    step: str | None = None
    trace_id: str | None = None
    span_id: str | None = None
    parent_span_id: str | None = None
    status: str = "ok"
    latency_ms: int | None = None
    batch: bool = False
    tags: dict[str, str] = Field(default_factory=dict)
    #: Fields of the event beyond the contract, kept as sent.
    extra: dict[str, Any] = Field(default_factory=dict)

    input_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0

    cost: CostBreakdown = Field(default_factory=CostBreakdown)
    cost_usd: Decimal = Decimal(0)
    currency: Literal["USD"] = "USD"
    priced: bool
    unpriced_reason: str | None = None
    matched_model: str | None = None
    price_source: str | None = None

    business_path: str = "unattributed"
    #: When this attribution was computed; a later one (re-pricing) supersedes an earlier one.
    attributed_at: datetime
