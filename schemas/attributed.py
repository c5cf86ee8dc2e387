"""The attributed record: one priced, tagged usage event, as published on ``usage.attributed``
and stored in the ClickHouse ledger. Money is ``Decimal`` (a decimal string in JSON)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PlainSerializer, WrapSerializer

from schemas.trusted import construct
from schemas.usage import TokenUsage

#: A Kafka header on a usage.attributed record whose row reached the ledger as part of a ledger
#: block (usage.ledger): a stream worker publishing JSON for other consumers sets it, and the sink
#: does not land such a record a second time. (Records without it, from ``costline backfill``, are landed.)
HEADER_IN_BLOCK = "costline.ledger.in-block"

#: The zero of every cost class a call does not use, one object: the ledger's encoder
#: (``streams.storage._native``) writes it as "0" by identity, without formatting it.
ZERO = Decimal(0)

_MONEY_PLACES = Decimal("1e-12")
#: The largest amount a ledger cost column holds (``Decimal(18, 12)``): just under a million USD.
MAX_COST_USD = Decimal("999999.999999999999")

#: USD, written in JSON with exactly 12 decimal places ("0.000000075000", never "7.5E-8").
Money = Annotated[Decimal, PlainSerializer(lambda d: format(d.quantize(_MONEY_PLACES), "f"), return_type=str,
                                           when_used="json")]
#: A percentage, written in fixed-point notation in JSON.
Percent = Annotated[Decimal, PlainSerializer(lambda d: format(d, "f"), return_type=str, when_used="json")]


# Not frozen: the pricing hot path builds one per event, and a frozen dataclass sets each field
# through ``object.__setattr__``, about five times slower. It is a value all the same.
@dataclass(slots=True)
class CostBreakdown:
    """Cost of each class in USD, each rounded to 12 places; ``total`` is their exact sum.

    ``input``, ``cache_read`` … follow ``TokenUsage``: ``input`` is uncached text input,
    ``output`` is text output without reasoning, ``reasoning`` the reasoning part of the output,
    ``request`` a per-call fee where the model has one. (A plain dataclass: the pricing hot path
    builds one per event.)
    """

    input: Money = ZERO
    cache_read: Money = ZERO
    cache_write: Money = ZERO
    output: Money = ZERO
    reasoning: Money = ZERO
    input_audio: Money = ZERO
    input_image: Money = ZERO
    output_audio: Money = ZERO
    output_image: Money = ZERO
    request: Money = ZERO

    @property
    def total(self) -> Decimal:
        return (self.input + self.cache_read + self.cache_write + self.output + self.reasoning + self.input_audio
                + self.input_image + self.output_audio + self.output_image + self.request)

    def as_dict(self) -> dict[str, Decimal]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


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
    #: The enforcer's reservation the call was admitted on, if any.
    reservation_id: str | None = None
    batch: bool = False
    tags: dict[str, str] = Field(default_factory=dict)
    #: Fields of the event beyond the contract, kept as sent.
    extra: dict[str, Any] = Field(default_factory=dict)
    #: Normalized token counts (from ``usage``, or normalized from ``raw_usage``): a ``TokenUsage``,
    #: or in the stream its checked twin (``streams.stages.decoding``: the same fields and properties,
    #: without building a model for every event), written out as the model would be.
    usage: Annotated[TokenUsage, WrapSerializer(lambda usage, model: model(usage) if isinstance(usage, TokenUsage)
                                                else {name: getattr(usage, name) for name in TokenUsage.model_fields})]
    #: The provider's own usage object when the event carried one, and its format.
    raw_usage: dict[str, Any] | None = None
    raw_usage_format: str | None = None

    cost: CostBreakdown = Field(default_factory=CostBreakdown)
    cost_usd: Money = ZERO
    currency: Literal["USD"] = "USD"
    priced: bool
    unpriced_reason: str | None = None
    matched_model: str | None = None
    #: Where the price came from (``genai-prices 0.2.3``, ``prices.yaml models[0] (name)``, batch discount).
    price_source: str | None = None
    #: Catalog version and override revision in force (``genai-prices 0.2.3; prices.yaml r4``).
    pricing_version: str | None = None
    discount: str | None = None
    discount_percent: Percent = ZERO
    #: What this call added to its tenant's bill for the billing period, given everything counted
    #: before it (``streams.stages.revenue``); None when the tenant's plan has no rate card, or
    #: when the event came after its period closed (then also ``late``).
    revenue_usd: Money | None = None
    #: ``revenue_usd`` less ``cost_usd``; None when revenue is.
    margin_usd: Money | None = None
    #: The billing period ``revenue_usd`` belongs to: the calendar month in the tenant's time zone,
    #: as ``YYYY-MM``; None when not rated.
    billing_period: str | None = None

    business_path: str = "unattributed"
    #: Arrived after its quota windows' grace period: in the ledger, but in no quota window.
    late: bool = False
    #: When this attribution was computed; a later one (re-pricing) supersedes an earlier one.
    attributed_at: datetime

    @classmethod
    def from_trusted(cls, values: dict[str, Any]) -> AttributedUsage:
        """An instance from every field's value, already of its type (see ``schemas.trusted``)."""
        return construct(cls, values)
