"""Rating: what a tenant is charged, from a plan's rate card and the period's quantities.

One pure function, ``rate``, turns a rate card and the quantities of one billing period into
invoice lines; ``increment`` says what one event adds to the period's bill given everything
counted before it. The stream, ``costline invoice`` and plan simulations all rate through them.
No I/O here, and no float: quantities and amounts are ``Decimal``.

Conventions (each one a trap in some billing system; see docs/pricing.md):

- **Tiers** are half-open ranges ``(previous up_to, up_to]``: ``up_to`` is inclusive, the first
  tier starts above 0, and only the last tier may leave ``up_to`` out (open-ended). A quantity
  exactly on a bound is in the lower tier. The last tier, and only it, is open-ended. Quantities
  may be decimal (tokens in millions).
- **Graduated** bills each unit at the price of the tier it falls in, and a tier's
  ``flat_amount`` once, as soon as the quantity enters that tier. **Volume** bills every unit at
  the price of the tier the whole quantity falls in (and that tier's flat amount). **Package**
  bills ``ceil(quantity / package_size)`` packages. **Unit** bills every unit at one price.
- **Free units** are the period's first units: they keep their places in the tiers (with 1,000
  free units and a first tier up to 1,000, the first tier is free), and are billed nothing.
- **Order**: tiers (after free units) → percentage discount → spend cap (a maximum on the usage
  charges) → flat fee → minimum commitment (a true-up line up to the commitment).
- **Rounding**: each line is rounded once, to the currency's cents, half away from zero; the
  total is the exact sum of the rounded lines. Every line keeps its unrounded amount too.
- **Line ids** are deterministic (charge id, kind, tier number), so rating the same period again
  gives the same lines.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from decimal import ROUND_CEILING, ROUND_HALF_UP, Context, Decimal, localcontext
from functools import cached_property
from typing import Annotated, Literal

from pydantic import Field, model_validator

from streams.config import Strict

_ZERO = Decimal(0)
_CENT = Decimal("0.01")
#: Room for every digit: quantities up to 10^15 tokens, prices with 12 decimals and discount
#: factors stay exact (the default context's 28 digits would round some of them silently).
EXACT = Context(prec=60)
Amount = Annotated[Decimal, Field(ge=0)]
RatedMetric = Literal["requests", "input_tokens", "output_tokens", "tokens", "cost_usd"]


class Tier(Strict):
    #: The tier's upper bound, inclusive; None on the last tier, and only there (open-ended).
    up_to: Annotated[Decimal, Field(gt=0)] | None = None
    unit_amount: Amount = _ZERO
    flat_amount: Amount = _ZERO


#: The call's fields a charge may filter on (``ChargeFilter``).
FILTERED_FIELDS = ("provider", "model", "business_path", "feature")


class ChargeFilter(Strict):
    """Which calls a charge counts: each given field must match one of its shell globs."""

    provider: list[str] | None = None
    model: list[str] | None = None
    business_path: list[str] | None = None
    feature: list[str] | None = None

    def matches(self, call: Mapping[str, str | None], unknown_matches: bool = False) -> bool:
        """``unknown_matches``: a field the call does not give (None) may match (a reservation's
        upper bound, made before the stream has tagged the call); else it does not."""
        for name in FILTERED_FIELDS:
            globs = getattr(self, name)
            value = call.get(name)
            if globs is None or (value is None and unknown_matches):
                continue
            if value is None or not any(fnmatch.fnmatchcase(value, g) for g in globs):
                return False
        return True


class Charge(Strict):
    """A price on one metric of the period's usage. ``cost_usd`` rates cost-plus: the provider cost
    of the calls counted, at ``unit_amount`` USD per USD of cost (1.3: cost plus 30%)."""

    id: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
    metric: RatedMetric
    when: ChargeFilter = Field(default_factory=ChargeFilter)
    #: Quantities are counted in units of this many (1,000,000: prices per million tokens).
    per: Annotated[Decimal, Field(gt=0)] = Decimal(1)
    price: Literal["unit", "graduated", "volume", "package"]
    unit_amount: Amount | None = None
    tiers: list[Tier] = Field(default_factory=list)
    package_size: Annotated[Decimal, Field(gt=0)] | None = None
    package_amount: Amount | None = None
    free_units: Amount = _ZERO
    discount_percent: Annotated[Decimal, Field(ge=0, le=100)] = _ZERO

    @cached_property
    def free(self) -> Decimal:
        """The free units in units of ``per``."""
        return self.free_units / self.per

    @model_validator(mode="after")
    def _complete(self) -> Charge:
        if self.price == "unit" and self.unit_amount is None:
            raise ValueError("a unit price needs unit_amount")
        if self.price == "package" and (self.package_size is None or self.package_amount is None):
            raise ValueError("a package price needs package_size and package_amount")
        if self.price in ("graduated", "volume"):
            if not self.tiers:
                raise ValueError(f"a {self.price} price needs tiers")
            bounds = [tier.up_to for tier in self.tiers]
            if any(bound is None for bound in bounds[:-1]) or bounds[-1] is not None:
                raise ValueError("every tier but the last needs up_to, and the last has none (it is open-ended)")
            closed = [bound for bound in bounds if bound is not None]
            if closed != sorted(set(closed)):
                raise ValueError(f"tiers overlap or are out of order: up_to {', '.join(map(str, closed))} "
                                 "must strictly ascend")
        elif self.tiers:
            raise ValueError(f"a {self.price} price takes no tiers")
        return self


class RateCard(Strict):
    currency: Literal["USD"] = "USD"
    #: Billed once per period, in advance.
    flat_fee: Amount = _ZERO
    charges: list[Charge] = Field(default_factory=list)
    #: The least the period is billed: a true-up line makes up the difference.
    minimum_commitment: Amount | None = None
    #: The most the usage charges of a period are billed (after discounts).
    spend_cap: Amount | None = None

    @model_validator(mode="after")
    def _unique(self) -> RateCard:
        ids = [charge.id for charge in self.charges]
        if len(ids) != len(set(ids)):
            raise ValueError(f"charge ids must be unique: {', '.join(sorted({i for i in ids if ids.count(i) > 1}))}")
        return self


@dataclass(frozen=True)
class Line:
    """One invoice line: ``amount`` is ``unrounded`` rounded once, to cents."""

    id: str
    kind: Literal["flat_fee", "usage", "discount", "spend_cap", "commitment"]
    description: str
    quantity: Decimal
    unit_amount: Decimal | None
    unrounded: Decimal

    @property
    def amount(self) -> Decimal:
        return round_line(self.unrounded)


@dataclass(frozen=True)
class Rating:
    lines: list[Line] = field(default_factory=list)

    @property
    def total(self) -> Decimal:
        return sum((line.amount for line in self.lines), _ZERO)


def round_line(amount: Decimal) -> Decimal:
    """Cents, half away from zero (the amounts here are never negative but for discounts and caps,
    which round as their positive counterparts do)."""
    return amount.quantize(_CENT, rounding=ROUND_HALF_UP)


def rate(card: RateCard, quantities: Mapping[str, Decimal]) -> Rating:
    """The period's invoice lines for the quantities of each charge (by charge id; raw metric
    units, before ``per``)."""
    with localcontext(EXACT):
        return _rate(card, quantities)


def _rate(card: RateCard, quantities: Mapping[str, Decimal]) -> Rating:
    lines: list[Line] = []
    usage_total = _ZERO
    for charge in card.charges:
        charge_lines = charge_lines_of(charge, quantities.get(charge.id, _ZERO))
        lines += charge_lines
        usage_total += sum((line.amount for line in charge_lines), _ZERO)
    if card.spend_cap is not None and usage_total > card.spend_cap:
        lines.append(Line("spend_cap", "spend_cap", f"usage above the spend cap of {card.spend_cap}", Decimal(1),
                          None, card.spend_cap - usage_total))
    if card.flat_fee:
        lines.append(Line("flat_fee", "flat_fee", "flat fee", Decimal(1), card.flat_fee, card.flat_fee))
    subtotal = sum((line.amount for line in lines), _ZERO)
    if card.minimum_commitment is not None and subtotal < card.minimum_commitment:
        lines.append(Line("commitment", "commitment", f"true-up to the minimum commitment of {card.minimum_commitment}",
                          Decimal(1), None, card.minimum_commitment - subtotal))
    return Rating(lines)


def charge_lines_of(charge: Charge, quantity: Decimal) -> list[Line]:
    """One charge's lines: a line per tier (or one for the charge), then its discount."""
    units = quantity / charge.per
    lines = [line for line in _base_lines(charge, units) if line.quantity or line.unrounded]
    if charge.discount_percent and lines:
        base = sum((line.amount for line in lines), _ZERO)
        lines.append(Line(f"{charge.id}:discount", "discount", f"{charge.discount_percent}% off {charge.id}",
                          Decimal(1), None, -base * charge.discount_percent / 100))
    return lines


def charge_amount(charge: Charge, quantity: Decimal) -> Decimal:
    """The charge's amount for the period's ``quantity``, unrounded and before its discount."""
    return _unrounded(charge, quantity / charge.per)


def net(charge: Charge, amount: Decimal) -> Decimal:
    """A charge's ``amount`` less its discount, unrounded."""
    return amount * (100 - charge.discount_percent) / 100 if charge.discount_percent else amount


def capped(card: RateCard, usage: Decimal) -> Decimal:
    """The period's usage charges, net of discounts, at most the spend cap."""
    return card.spend_cap if card.spend_cap is not None and usage > card.spend_cap else usage


def usage_amount(card: RateCard, quantities: Mapping[str, Decimal]) -> Decimal:
    """The period's usage charges as the stream rates them: unrounded, net of discounts, capped.
    ``rate`` rounds each line instead, so its total may differ from this by the rounding of its lines."""
    with localcontext(EXACT):
        return capped(card, sum((net(charge, charge_amount(charge, quantities.get(charge.id, _ZERO)))
                                 for charge in card.charges), _ZERO))


def increment(charge: Charge, before: Decimal, after: Decimal) -> Decimal:
    """What raising the period's quantity from ``before`` to ``after`` adds to the charge's bill,
    unrounded and before the discount. Unit, graduated and package charges: the exact difference
    of the two ratings, so the events of a period add up to its rating whatever their order or
    batches. Volume: the added units at the unit price of the tier ``after`` is in (and that tier's
    flat amount when the quantity enters it); the drop of every earlier unit to a cheaper tier is
    settled at period end by ``volume_true_up``."""
    if charge.price != "volume":
        return _unrounded(charge, after / charge.per) - _unrounded(charge, before / charge.per)
    free = charge.free
    low, high = max(before / charge.per, free), max(after / charge.per, free)
    if high <= low:
        return _ZERO
    index, tier = _tier_of(charge.tiers, high)
    entered = index != _tier_of(charge.tiers, low)[0] or low == free
    return (high - low) * tier.unit_amount + (tier.flat_amount if entered else _ZERO)


def increment_bound(charge: Charge, quantity: Decimal) -> Decimal:
    """The most ``quantity`` more units can add to the charge's bill from any point of the period,
    net of its discount: the dearest tier's price on every unit, every tier's flat amount (a call
    can cross several bounds), and for packages one more package than the units fill (the call
    may open one). Reservations hold this for a ``revenue_usd`` hard cap, so it must never be
    below ``increment``; ``tests/stages/test_rating.py`` checks that it is not."""
    if quantity <= 0:
        return _ZERO
    units = quantity / charge.per
    if charge.price == "unit":
        bound = units * charge.unit_amount
    elif charge.price == "package":
        packages = (units / charge.package_size).to_integral_value(rounding=ROUND_CEILING) + 1
        bound = packages * charge.package_amount
    else:
        bound = (units * max(tier.unit_amount for tier in charge.tiers)
                 + sum((tier.flat_amount for tier in charge.tiers), _ZERO))
    return net(charge, bound)


#: A straight piece of a charge's bill: (from, exclusive; up to, inclusive, None for no end; amount
#: per raw unit), all in raw metric units (before ``per``).
Segment = tuple[Decimal, Decimal | None, Decimal]
_BELOW_ALL = Decimal("-Infinity")


def segment_of(charge: Charge, quantity: Decimal) -> Segment | None:
    """The straight piece of the charge's bill that the units after ``quantity`` fall on: for any
    ``before`` above its start and ``after`` up to its end, ``increment(charge, before, after)``
    is ``(after - before) * amount per raw unit`` (the stream's fast path, which must agree with
    ``increment``: ``tests/stages/test_rating.py`` checks that it does). None where the bill is not
    straight there: package prices, and a quantity on a bound (the next unit opens a tier, whose
    flat amount comes with it)."""
    per, free = charge.per, charge.free_units
    if quantity < free:
        return _BELOW_ALL, free, _ZERO  # free units cost nothing, whatever the price
    if charge.price == "package":
        return None
    if charge.price == "unit":
        return (free, None, charge.unit_amount / per) if quantity > free else None
    lower = _ZERO
    for tier in charge.tiers:
        upper = None if tier.up_to is None else tier.up_to * per
        if upper is None or quantity < upper:
            start = lower if lower > free else free
            return (start, upper, tier.unit_amount / per) if quantity > start else None
        lower = upper
    return None


def volume_true_up(charge: Charge, quantity: Decimal, streamed: Decimal) -> Decimal:
    """The end-of-period line of a volume charge: its rating less what its events were charged."""
    return _unrounded(charge, quantity / charge.per) - streamed


def _unrounded(charge: Charge, units: Decimal) -> Decimal:
    total = _ZERO
    for part in _parts(charge, units):
        total += part[3]
    return total


def _base_lines(charge: Charge, units: Decimal) -> list[Line]:
    cid = charge.id
    lines = []
    for number, quantity, unit_amount, amount in _parts(charge, units):
        if number:
            lines.append(Line(f"{cid}:tier-{number}", "usage", f"{cid}, tier {number}", quantity, unit_amount, amount))
        elif charge.price == "package":
            lines.append(Line(f"{cid}:package", "usage", f"{cid}, packages of {charge.package_size}", quantity,
                              unit_amount, amount))
        else:
            lines.append(Line(f"{cid}:unit", "usage", cid, quantity, unit_amount, amount))
    return lines


#: One part of a charge's bill: (tier number, 0 for a price without tiers; quantity billed; unit
#: price; unrounded amount). Tuples, not ``Line``s: the stream rates through these for every event.
Part = tuple[int, Decimal, Decimal | None, Decimal]


def _parts(charge: Charge, units: Decimal) -> list[Part]:
    free = charge.free
    price = charge.price
    if price == "unit" or price == "package":
        billed = units - free if units > free else _ZERO
        if price == "unit":
            return [(0, billed, charge.unit_amount, billed * charge.unit_amount)]
        packages = (billed / charge.package_size).to_integral_value(rounding=ROUND_CEILING)
        return [(0, packages, charge.package_amount, packages * charge.package_amount)]
    if price == "volume":
        if units <= free:
            return []
        index, tier = _tier_of(charge.tiers, units)
        billed = units - free
        return [(index + 1, billed, tier.unit_amount, billed * tier.unit_amount + tier.flat_amount)]
    parts, lower = [], _ZERO  # graduated: each tier's share of (free, units]
    for index, tier in enumerate(charge.tiers):
        up_to = tier.up_to
        upper = units if up_to is None or units < up_to else up_to
        billed = upper - (lower if lower > free else free)
        if billed > 0:  # the tier's flat amount comes with its first billed unit
            parts.append((index + 1, billed, tier.unit_amount, billed * tier.unit_amount + tier.flat_amount))
        if up_to is None or units <= up_to:
            break
        lower = up_to
    return parts


def _tier_of(tiers: list[Tier], units: Decimal) -> tuple[int, Tier]:
    """The tier holding ``units`` (on a bound: the lower tier)."""
    for index, tier in enumerate(tiers):
        if tier.up_to is None or units <= tier.up_to:
            return index, tier
    raise AssertionError("the last tier is open-ended (validated)")


#: The totals of a group of calls that charges count from: calls, input and output tokens, cost.
@dataclass(frozen=True)
class Usage:
    calls: Decimal
    input_tokens: Decimal
    output_tokens: Decimal
    cost_usd: Decimal

    def of(self, metric: RatedMetric) -> Decimal:
        if metric == "requests":
            return self.calls
        if metric == "tokens":
            return self.input_tokens + self.output_tokens
        return getattr(self, metric)


def quantities(card: RateCard, groups: Iterable[tuple[Mapping[str, str | None], Usage]]) -> dict[str, Decimal]:
    """Each charge's quantity from the period's usage, grouped by the fields charges filter on
    (provider, model, business path, feature)."""
    totals = {charge.id: _ZERO for charge in card.charges}
    for call, usage in groups:
        for charge in card.charges:
            if charge.when.matches(call):
                totals[charge.id] += usage.of(charge.metric)
    return totals
