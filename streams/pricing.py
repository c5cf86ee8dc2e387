"""Stage 2: the cost of a usage event, exact in ``Decimal``, at the price in force at the event's time.

Prices come from the ``genai-prices`` catalog bundled with the package (no network at run
time). Model look-ups are cached per (provider, model): the catalog's own matcher is far too
slow for the hot path.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import ROUND_HALF_EVEN, Decimal
from functools import lru_cache

import genai_prices
from genai_prices import data_snapshot
from genai_prices.types import ModelInfo, TieredPrices

from schemas.attributed import CostBreakdown
from schemas.usage import TokenUsage, UsageEvent

#: Stored money has 12 decimal places (ClickHouse ``Decimal(18, 12)``); prices are per million tokens.
MONEY_QUANTUM = Decimal("1e-12")
_PER_MILLION = Decimal(1_000_000)
CATALOG_SOURCE = f"genai-prices {genai_prices.__version__}"


@dataclass(frozen=True)
class TokenPrices:
    """USD per million tokens of each class, for one model at one point in time."""

    input: Decimal
    cache_read: Decimal
    cache_write: Decimal
    output: Decimal


@dataclass(frozen=True)
class Priced:
    cost: CostBreakdown
    priced: bool
    matched_model: str | None = None
    price_source: str | None = None
    unpriced_reason: str | None = None


class UnknownModel(LookupError):
    """The catalog has no price for this provider and model."""


class PriceCatalog:
    """Resolves (provider, model, time) to per-class token prices."""

    def __init__(self) -> None:
        self._snapshot = data_snapshot.get_snapshot()
        self.source = CATALOG_SOURCE
        self._find = lru_cache(maxsize=65_536)(self._find_uncached)

    def _find_uncached(self, provider: str, model: str) -> ModelInfo | str:
        try:
            return self._snapshot.find_provider_model(model, None, provider, None)[1]
        except LookupError:
            return f"no catalog price for model {model!r} of provider {provider!r}"

    def prices(self, provider: str, model: str, at: datetime, input_tokens: int) -> tuple[str, TokenPrices]:
        """The matched model id and its prices at ``at``; tiered prices pick the tier by prompt size."""
        found = self._find(provider, model)
        if isinstance(found, str):
            raise UnknownModel(found)
        price = found.get_prices(at)

        def per_mtok(key: str, fallback: Decimal | None = None) -> Decimal:
            value = getattr(price, key, None)
            if value is None:
                return fallback if fallback is not None else Decimal(0)
            if isinstance(value, TieredPrices):
                return _tier_price(value, input_tokens)
            return value

        input_price = per_mtok("input_mtok")
        # A model without a separate cache price bills cached tokens as ordinary input.
        return found.id, TokenPrices(
            input=input_price,
            cache_read=per_mtok("cache_read_mtok", input_price),
            cache_write=per_mtok("cache_write_mtok", input_price),
            output=per_mtok("output_mtok"),
        )


def _tier_price(tiered: TieredPrices, input_tokens: int) -> Decimal:
    for tier in reversed(tiered.tiers):
        if input_tokens > tier.start:
            return tier.price
    return tiered.base


def money(amount: Decimal) -> Decimal:
    return amount.quantize(MONEY_QUANTUM, rounding=ROUND_HALF_EVEN)


def cost_of(usage: TokenUsage, prices: TokenPrices) -> CostBreakdown:
    """Each token class at its own price, rounded once per class to the stored 12 places."""
    return CostBreakdown(
        input=money(usage.uncached_input_tokens * prices.input / _PER_MILLION),
        cache_read=money(usage.cache_read_tokens * prices.cache_read / _PER_MILLION),
        cache_write=money(usage.cache_write_tokens * prices.cache_write / _PER_MILLION),
        output=money(usage.output_tokens * prices.output / _PER_MILLION),
    )


def price_event(event: UsageEvent, catalog: PriceCatalog) -> Priced:
    if event.usage is None:
        return Priced(
            cost=CostBreakdown(),
            priced=False,
            unpriced_reason="raw_usage without normalized usage cannot be priced yet",
        )
    try:
        matched, prices = catalog.prices(event.provider, event.model, event.timestamp, event.usage.input_tokens)
    except UnknownModel as exc:
        return Priced(cost=CostBreakdown(), priced=False, unpriced_reason=str(exc))
    return Priced(
        cost=cost_of(event.usage, prices),
        priced=True,
        matched_model=matched,
        price_source=catalog.source,
    )
