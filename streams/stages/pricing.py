"""Stage 2: the exact cost of a usage event, in ``Decimal``, at the price in force at the event's time.

Where prices come from, first match wins:

1. ``config/prices.yaml`` ``models``: custom, self-hosted or tenant-specific price lists;
2. the ``genai-prices`` catalog bundled with the package (no network at run time): dated price
   changes, time-of-day prices, long-context tiers, batch prices.

Then a batch call without a catalog batch price gets the provider's ``batch_discount_percent``,
and the first matching negotiated ``discounts`` entry takes its percentage off every class.

Resolving a price in the catalog costs tens of microseconds, so everything resolved is cached:
the model per (provider, model), the per-token rates per (model, price period, variant), the
override candidates per (tenant, provider, model), and the event's whole ``Quote`` (rates and
provenance) per price. Pricing an event is then a handful of dict look-ups and a multiplication per
token class: in ``Decimal`` here (``cost_of``, the reference), in integer pico-dollars in the
stream (``streams/stages/_fast.pyx``, ``RowBuilder``, for rates of whole pico-dollars; see
``pico_rates``).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import datetime
from decimal import ROUND_HALF_EVEN, Decimal
from pathlib import Path

import genai_prices
from genai_prices import data_snapshot
from genai_prices.types import ModelInfo, TieredPrices
from genai_prices.types import ModelPrice as CatalogPrice

from schemas.attributed import ZERO, CostBreakdown
from schemas.usage import TokenUsage, UsageEvent, token_counts
from streams.stages.prices import Discount, ModelPrice, PerMillionTokens, PriceOverrides, load_overrides

#: Stored money has 12 decimal places (ClickHouse ``Decimal(18, 12)``).
MONEY_QUANTUM = Decimal("1e-12")
CATALOG_LABEL = f"genai-prices {genai_prices.__version__}"
_MILLION = Decimal(1_000_000)
_THOUSAND = Decimal(1_000)
_ZERO = ZERO  # (the ledger's one zero: see schemas.attributed.ZERO)
_HUNDRED = Decimal(100)
_ONE = Decimal(1)


def money(amount: Decimal) -> Decimal:
    return amount.quantize(MONEY_QUANTUM, ROUND_HALF_EVEN)  # (positional: a keyword costs 130 ns a call)


@dataclass(frozen=True, slots=True)
class Rates:
    """USD per token of each class (per call for ``request``)."""

    input: Decimal
    output: Decimal
    cache_read: Decimal
    cache_write: Decimal
    cache_write_1h: Decimal
    reasoning: Decimal
    input_audio: Decimal
    cache_audio_read: Decimal
    input_image: Decimal
    cache_image_read: Decimal
    output_audio: Decimal
    output_image: Decimal
    request: Decimal = _ZERO

    @classmethod
    def per_million(cls, p: dict[str, Decimal | None], request: Decimal = _ZERO) -> Rates:
        """From per-million prices; a missing class falls back to its parent class's price."""
        input_, output = p.get("input") or _ZERO, p.get("output") or _ZERO
        cache_read = _first(p.get("cache_read"), input_)
        cache_write = _first(p.get("cache_write"), input_)
        input_audio = _first(p.get("input_audio"), input_)
        input_image = _first(p.get("input_image"), input_)
        return cls(
            input=input_ / _MILLION,
            output=output / _MILLION,
            cache_read=cache_read / _MILLION,
            cache_write=cache_write / _MILLION,
            cache_write_1h=_first(p.get("cache_write_1h"), cache_write) / _MILLION,
            reasoning=_first(p.get("reasoning"), output) / _MILLION,
            input_audio=input_audio / _MILLION,
            cache_audio_read=_first(p.get("cache_audio_read"), cache_read) / _MILLION,
            input_image=input_image / _MILLION,
            cache_image_read=_first(p.get("cache_image_read"), cache_read) / _MILLION,
            output_audio=_first(p.get("output_audio"), output) / _MILLION,
            output_image=_first(p.get("output_image"), output) / _MILLION,
            request=request,
        )

    def scaled(self, factor: Decimal) -> Rates:
        return Rates(**{f.name: getattr(self, f.name) * factor for f in fields(self)})


def _first(value: Decimal | None, fallback: Decimal) -> Decimal:
    return fallback if value is None else value


@dataclass(frozen=True)
class RateCard:
    """Rates of one model in one price period; long-context tiers switch on the prompt size."""

    base: Rates
    #: (threshold, rates) ascending: the rates of the highest threshold the prompt exceeds apply.
    tiers: tuple[tuple[int, Rates], ...] = ()

    def for_prompt(self, input_tokens: int) -> Rates:
        for threshold, rates in reversed(self.tiers):
            if input_tokens > threshold:
                return rates
        return self.base


# genai-prices price keys → our class names
_CATALOG_KEYS = {
    "input_mtok": "input",
    "output_mtok": "output",
    "cache_read_mtok": "cache_read",
    "cache_write_mtok": "cache_write",
    "cache_write_1h_mtok": "cache_write_1h",
    "output_reasoning_mtok": "reasoning",
    "input_audio_mtok": "input_audio",
    "cache_audio_read_mtok": "cache_audio_read",
    "input_image_mtok": "input_image",
    "cache_image_read_mtok": "cache_image_read",
    "output_audio_mtok": "output_audio",
    "output_image_mtok": "output_image",
}


def card_from_catalog(price: CatalogPrice) -> RateCard:
    values = {key: getattr(price, key, None) for key in _CATALOG_KEYS}
    requests_k = getattr(price, "requests_kcount", None)
    request = requests_k / _THOUSAND if isinstance(requests_k, Decimal) else _ZERO
    thresholds = sorted({t.start for v in values.values() if isinstance(v, TieredPrices) for t in v.tiers})

    def at(prompt_above: int | None) -> Rates:
        per_million: dict[str, Decimal | None] = {}
        for key, value in values.items():
            if isinstance(value, TieredPrices):
                chosen = value.base
                if prompt_above is not None:
                    for tier in value.tiers:
                        if tier.start <= prompt_above:
                            chosen = tier.price
                value = chosen
            per_million[_CATALOG_KEYS[key]] = value
        return Rates.per_million(per_million, request)

    return RateCard(base=at(None), tiers=tuple((t, at(t)) for t in thresholds))


def card_from_override(entry: ModelPrice) -> RateCard:
    prices: PerMillionTokens = entry.per_million_tokens
    return RateCard(base=Rates.per_million(prices.model_dump(), entry.per_request))


_BATCH = {"processing": "batch"}
#: Entries kept by the per-tenant override look-up before it starts over.
_MEMO_SIZE = 100_000


class CatalogModel:
    """One catalog model: its dated/time-of-day price periods and batch variants, resolved lazily."""

    def __init__(self, info: ModelInfo) -> None:
        self.id = info.id
        self._periods = [(None, info.prices)] if isinstance(info.prices, CatalogPrice) else \
            [(c.constraint, c.prices) for c in info.prices]
        self._batch_variants = [v for v in info.price_variants or () if v.when == _BATCH]
        self._cards: dict[tuple[int, tuple[int, ...]], RateCard] = {}
        #: The card of a model with one price at all times (most), for calls its batch variants
        #: cannot apply to: found without a look at the constraints (0.9 µs an event).
        self._always: RateCard | None = None
        if len(self._periods) == 1 and self._periods[0][0] is None:
            self._always = self.card(datetime.now().astimezone(), False)[0]

    def card(self, at: datetime, batch: bool) -> tuple[RateCard, bool]:
        """The rate card in force at ``at``, and whether it is a catalog batch price."""
        if self._always is not None and not (batch and self._batch_variants):
            return self._always, False
        period = 0
        for index in range(len(self._periods) - 1, -1, -1):  # the last active period wins
            constraint = self._periods[index][0]
            if constraint is None or constraint.active(at):
                period = index
                break
        variants: tuple[int, ...] = ()
        if batch and self._batch_variants:
            variants = tuple(i for i, v in enumerate(self._batch_variants)
                             if v.constraint is None or v.constraint.active(at))
        key = (period, variants)
        card = self._cards.get(key)
        if card is None:
            price = self._periods[period][1]
            if variants:
                merged = CatalogPrice(**price.__dict__)
                applied: set[str] = set()
                for i in variants:  # first variant wins per key, as in genai-prices
                    for name, value in self._batch_variants[i].prices.__dict__.items():
                        if value is not None and name not in applied:
                            setattr(merged, name, value)
                            applied.add(name)
                price = merged
            card = self._cards[key] = card_from_catalog(price)
        return card, bool(variants)


@dataclass(slots=True)
class Priced:
    cost: CostBreakdown
    priced: bool
    matched_model: str | None = None
    price_source: str | None = None
    pricing_version: str | None = None
    discount: str | None = None
    discount_percent: Decimal = _ZERO
    unpriced_reason: str | None = None


#: The most pico-dollars a token a rate may be for the compiled pricing
#: (``streams/stages/_fast.pyx``, ``RowBuilder``) to multiply in 64-bit integers: 2^31 − 1, about
#: $2,147 per million tokens. With at most ``MAX_TOKENS`` (10^9) tokens a class, a product stays
#: below 2^61. A rate above it, or one that is not a whole number of pico-dollars, is priced in
#: ``Decimal`` (``cost_of``), as every rate is on the reference path.
MAX_PICO_RATE = 2**31 - 1
#: The largest per-call fee priced in integers: a million dollars less a pico-dollar, as the ledger.
MAX_PICO_FEE = 10**18 - 1
_PICO = Decimal(10) ** 12


def pico_rates(rates: Rates) -> tuple[int, ...] | None:
    """Each class's rate in whole pico-dollars a token, in ``token_counts`` order, then the per-call
    fee rounded as ``cost_of`` rounds it, then 1 if there is a fee (``cost_of`` rounds it even to
    zero) else 0; None when a rate is not a whole number of pico-dollars (a discount of a third, a
    price with more than six decimals per million), is above ``MAX_PICO_RATE`` or is -0, or the fee
    is above ``MAX_PICO_FEE``.

    Why whole pico-dollars: a price per million tokens with at most six decimals is a whole number
    of pico-dollars a token, so tokens × rate is exact in integers and equals ``cost_of``'s
    ``Decimal`` product, which then needs no rounding (the ledger keeps 12 places: pico-dollars)."""
    per_token = (rates.input, rates.cache_read, rates.cache_write, rates.output, rates.reasoning,
                 rates.cache_write_1h, rates.input_audio, rates.cache_audio_read, rates.input_image,
                 rates.cache_image_read, rates.output_audio, rates.output_image)
    out = []
    for rate in per_token:
        scaled = rate * _PICO
        # (A -0 price is left to ``cost_of`` too: its costs are -0E-12, which the JSON shows.)
        if scaled != scaled.to_integral_value() or not 0 <= scaled <= MAX_PICO_RATE or scaled.is_signed():
            return None
        out.append(int(scaled))
    fee = money(rates.request) * _PICO  # (added once a call, not multiplied: only the ledger bounds it)
    if fee.is_signed() or fee > MAX_PICO_FEE:
        return None
    return (*out, int(fee), 1 if rates.request else 0)


#: ``Priced``'s fields after its cost: where a price came from (``Quote.provenance``).
PROVENANCE = tuple(field.name for field in fields(Priced))[1:]


@dataclass(frozen=True, slots=True)
class Quote:
    """What an event is priced at, apart from its token counts: its rates and where they came from.
    One object for every event of one price (model, period, prompt tier, batch and negotiated
    discount), memoized by ``Pricer.quote``; ``priced_for(usage)`` is the event's price."""

    rates: Rates | None  # None: not priced (the provenance's ``unpriced_reason`` says why)
    #: The values of ``Priced``'s ``PROVENANCE`` fields, in their order.
    provenance: tuple[object, ...]
    #: ``pico_rates(rates)``, or None (then the compiled pricing prices the event in ``Decimal``).
    pico: tuple[int, ...] | None = None

    @classmethod
    def of(cls, rates: Rates | None, priced: bool, **provenance: object) -> Quote:
        """A quote of ``rates`` (None: not priced), its provenance given by ``Priced``'s field names."""
        values = Priced(CostBreakdown(), priced, **provenance)  # (the defaults and names of one definition)
        return cls(rates, tuple(getattr(values, name) for name in PROVENANCE),
                   pico_rates(rates) if rates is not None else None)

    def priced_for(self, usage: TokenUsage) -> Priced:
        """The event's price: its cost at these rates, and their provenance."""
        return Priced(cost_of(usage, self.rates) if self.rates is not None else CostBreakdown(), *self.provenance)


_NO_USAGE = Quote.of(None, False, unpriced_reason="the event has no usage")


class Pricer:
    """Prices events against the catalog and the overrides. Thread-compatible, not thread-safe."""

    def __init__(self, overrides: PriceOverrides | None = None) -> None:
        self.overrides = overrides or PriceOverrides()
        self.version = f"{CATALOG_LABEL}; {self.overrides.label}"
        self._snapshot = data_snapshot.get_snapshot()
        self._models: dict[tuple[str, str], CatalogModel | str] = {}
        self._override_candidates: dict[tuple[str, str, str], tuple[list[tuple[int, ModelPrice]], list[Discount]]] = {}
        self._by_tenant = any(o.tenant is not None for o in (*self.overrides.models, *self.overrides.discounts))
        self._override_cards: dict[int, RateCard] = {}
        self._scaled: dict[tuple[int, Decimal], Rates] = {}
        #: Keyed by the ids of the rates chosen and of the discount: each is made once and kept for
        #: the pricer's life (rates by its cards and ``_scaled``, discounts by ``overrides``), so no
        #: id in a key can be taken by another object while its entry lives. The rates also fix
        #: where they came from: each card (and each scaling of one) belongs to one catalog model
        #: or one override.
        self._quotes: dict[tuple[int, Decimal | None, int], Quote] = {}
        self._unpriced: dict[str, Quote] = {}

    @classmethod
    def from_file(cls, path: Path | None) -> Pricer:
        return cls(load_overrides(path))

    # --- look-ups (cached) -----------------------------------------------------------------------

    def catalog_model(self, provider: str, model: str) -> CatalogModel | str:
        """The catalog model, or the reason there is none."""
        key = (provider, model)
        found = self._models.get(key)
        if found is None:
            try:
                found = CatalogModel(self._snapshot.find_provider_model(model, None, provider, None)[1])
            except LookupError:
                found = f"no price for model {model!r} of provider {provider!r} in {CATALOG_LABEL} or prices.yaml"
            self._models[key] = found
        return found

    def _candidates(self, tenant: str, provider: str, model: str) -> tuple[list[tuple[int, ModelPrice]], list[Discount]]:
        # Keyed by tenant only when some override names tenants (else one entry serves all tenants).
        key = (tenant if self._by_tenant else "", provider, model)
        found = self._override_candidates.get(key)
        if found is None:
            if len(self._override_candidates) >= _MEMO_SIZE:
                self._override_candidates.clear()
            o = self.overrides
            found = (
                [(i, m) for i, m in enumerate(o.models) if m.matches(tenant, provider, model)],
                [d for d in o.discounts if d.matches(tenant, provider, model)],
            )
            self._override_candidates[key] = found
        return found

    def _rates_scaled(self, rates: Rates, factor: Decimal) -> Rates:
        key = (id(rates), factor)
        scaled = self._scaled.get(key)
        if scaled is None:
            scaled = self._scaled[key] = rates.scaled(factor)
        return scaled

    # --- pricing ---------------------------------------------------------------------------------

    def price(self, event: UsageEvent) -> Priced:
        usage = event.usage
        if usage is None:  # validation normalizes raw_usage; only a bare contract object gets here
            return _NO_USAGE.priced_for(usage)
        return self.quote(event).priced_for(usage)

    def quote(self, event: UsageEvent) -> Quote:
        """The price of ``event`` at its time, memoized: the same ``Quote`` object for every event
        of one price (see ``Quote``)."""
        usage = event.usage
        if usage is None:
            return _NO_USAGE
        at = event.timestamp
        models, discounts = self._candidates(event.tenant_id, event.provider, event.model)
        factor = _ONE
        override = None
        for index, entry in models:
            if entry.active(at):
                override = index, entry
                break
        if override is not None:
            index, entry = override
            card = self._override_cards.get(index)
            if card is None:
                card = self._override_cards[index] = card_from_override(entry)
            catalog_batch, origin = False, index
        else:
            found = self.catalog_model(event.provider, event.model)
            if isinstance(found, str):
                quote = self._unpriced.get(found)
                if quote is None:
                    if len(self._unpriced) >= _MEMO_SIZE:
                        self._unpriced.clear()
                    quote = self._unpriced[found] = Quote.of(None, False, pricing_version=self.version,
                                                             unpriced_reason=found)
                return quote
            card, catalog_batch = found.card(at, event.batch)
            origin = found
        batch_percent = None
        if event.batch and not catalog_batch:
            batch_percent = self.overrides.batch_discount_percent.get(event.provider)
            if batch_percent:
                factor = factor * (_HUNDRED - batch_percent) / _HUNDRED
        discount = None
        for candidate in discounts:
            if candidate.active(at):
                discount = candidate
                factor = factor * (_HUNDRED - candidate.percent) / _HUNDRED
                break
        rates = card.for_prompt(usage.input_tokens)
        if factor is not _ONE:
            rates = self._rates_scaled(rates, factor)
        # Keyed by what the quote is made of: the rates chosen (the card's, of its period, tier and
        # factor, which fix where they came from), the batch discount and the negotiated discount.
        key = (id(rates), batch_percent, id(discount))
        quote = self._quotes.get(key)
        if quote is None:
            if len(self._quotes) >= _MEMO_SIZE:
                self._quotes.clear()
            if override is not None:
                index, entry = override
                matched = entry.model
                source = f"prices.yaml models[{index}]" + (f" ({entry.name})" if entry.name else "")
            else:
                matched, source = origin.id, CATALOG_LABEL
            if batch_percent:
                source += f"; batch -{batch_percent}%"
            quote = Quote.of(rates, True, matched_model=matched, price_source=source, pricing_version=self.version,
                             discount=discount.name if discount else None,
                             discount_percent=discount.percent if discount else _ZERO)
            self._quotes[key] = quote
        return quote


def cost_of(usage: TokenUsage, r: Rates) -> CostBreakdown:
    """Each token class at its own rate, rounded once per class to the stored 12 places."""
    (inp, cache_read, cache_write, out, reasoning, cache_write_1h, input_audio, cache_audio, input_image,
     cache_image, output_audio, output_image) = token_counts(usage)
    uncached = inp - cache_read - cache_write
    cost_cache_write = money((cache_write - cache_write_1h) * r.cache_write + cache_write_1h * r.cache_write_1h) \
        if cache_write else _ZERO
    request = money(r.request) if r.request else _ZERO
    if not (input_audio or input_image or output_audio or output_image or cache_audio or cache_image):
        # Text only (most calls): the audio and image classes are zero. (``_q`` written out: its
        # four calls were a sixth of pricing an event.)
        text_out = out - reasoning
        return CostBreakdown((uncached * r.input).quantize(MONEY_QUANTUM, ROUND_HALF_EVEN) if uncached else _ZERO,
                             (cache_read * r.cache_read).quantize(MONEY_QUANTUM, ROUND_HALF_EVEN) if cache_read else _ZERO,
                             cost_cache_write,
                             (text_out * r.output).quantize(MONEY_QUANTUM, ROUND_HALF_EVEN) if text_out else _ZERO,
                             (reasoning * r.reasoning).quantize(MONEY_QUANTUM, ROUND_HALF_EVEN) if reasoning else _ZERO,
                             _ZERO, _ZERO, _ZERO, _ZERO, request)
    return CostBreakdown(
        input=_q(uncached - (input_audio - cache_audio) - (input_image - cache_image), r.input),
        cache_read=money((cache_read - cache_audio - cache_image) * r.cache_read
                         + cache_audio * r.cache_audio_read + cache_image * r.cache_image_read),
        cache_write=cost_cache_write,
        output=_q(out - reasoning - output_audio - output_image, r.output),
        reasoning=_q(reasoning, r.reasoning),
        input_audio=_q(input_audio - cache_audio, r.input_audio),
        input_image=_q(input_image - cache_image, r.input_image),
        output_audio=_q(output_audio, r.output_audio),
        output_image=_q(output_image, r.output_image),
        request=request,
    )


def _q(tokens: int, rate: Decimal) -> Decimal:
    return (tokens * rate).quantize(MONEY_QUANTUM, ROUND_HALF_EVEN) if tokens else _ZERO
