"""``config/prices.yaml``: negotiated discounts, custom and self-hosted models, batch discounts.

Loaded and validated once at start-up; a mistake is reported as one line naming the file and
the entry. See the README section "Price overrides" for the format.
"""

from __future__ import annotations

import fnmatch
from datetime import UTC, date, datetime, time
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any

from pydantic import BeforeValidator, Field, model_validator

from streams.config import Strict, load_model

NonNegative = Annotated[Decimal, Field(ge=0)]


def _utc_instant(value: Any) -> Any:
    """Dates mean UTC midnight; datetimes without a zone are refused by the field type."""
    if isinstance(value, date) and not isinstance(value, datetime):
        return datetime.combine(value, time(0), tzinfo=UTC)
    return value


Instant = Annotated[datetime, BeforeValidator(_utc_instant)]


class Window(Strict):
    """When an entry applies: from ``effective_from`` (inclusive) to ``effective_to`` (exclusive)."""

    effective_from: Instant = datetime(2000, 1, 1, tzinfo=UTC)
    effective_to: Instant | None = None

    @model_validator(mode="after")
    def _ordered(self) -> Window:
        if self.effective_from.tzinfo is None or (self.effective_to and self.effective_to.tzinfo is None):
            raise ValueError("effective_from/effective_to need a time zone (or give a plain date, meaning UTC)")
        if self.effective_to is not None and self.effective_to <= self.effective_from:
            raise ValueError("effective_to must be after effective_from")
        return self

    def active(self, at: datetime) -> bool:
        return self.effective_from <= at and (self.effective_to is None or at < self.effective_to)


class PerMillionTokens(Strict):
    """USD per million tokens of each class; a class left out is billed at its parent's price
    (cache and audio/image input at ``input``, reasoning and audio/image output at ``output``)."""

    input: NonNegative
    output: NonNegative
    cache_read: NonNegative | None = None
    cache_write: NonNegative | None = None
    cache_write_1h: NonNegative | None = None
    reasoning: NonNegative | None = None
    input_audio: NonNegative | None = None
    cache_audio_read: NonNegative | None = None
    input_image: NonNegative | None = None
    cache_image_read: NonNegative | None = None
    output_audio: NonNegative | None = None
    output_image: NonNegative | None = None


class Selector(Strict):
    """Which events an entry applies to. Patterns are shell globs, matched case-insensitively."""

    tenant: str | None = None
    provider: str | None = None
    model: str | None = None

    def matches(self, tenant: str, provider: str, model: str) -> bool:
        return all(
            pattern is None or fnmatch.fnmatchcase(value.lower(), pattern.lower())
            for pattern, value in ((self.tenant, tenant), (self.provider, provider), (self.model, model))
        )


class ModelPrice(Selector, Window):
    """A price list that replaces the catalog's (custom, self-hosted or tenant-specific prices)."""

    name: str | None = None
    provider: str
    model: str
    per_million_tokens: PerMillionTokens
    per_request: NonNegative = Decimal(0)


class Discount(Selector, Window):
    """A negotiated percentage off every token class."""

    name: str
    percent: Annotated[Decimal, Field(gt=0, le=100)]


class PriceOverrides(Strict):
    revision: Annotated[int, Field(ge=0)] = 0
    #: Percent off batch-API calls, per provider, when the catalog has no batch price for the model.
    batch_discount_percent: dict[str, Annotated[Decimal, Field(ge=0, le=100)]] = Field(default_factory=dict)
    models: list[ModelPrice] = Field(default_factory=list)
    discounts: list[Discount] = Field(default_factory=list)

    @property
    def label(self) -> str:
        return f"prices.yaml r{self.revision}"


def load_overrides(path: Path | None) -> PriceOverrides:
    """The overrides in ``path``; none when the file does not exist."""
    return load_model(path, PriceOverrides)
