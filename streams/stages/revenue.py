"""Stage 4a: revenue per event — what each call adds to its tenant's bill for the period.

The period is the calendar month in the tenant's time zone (plans.yaml). For each tenant the
stage keeps, per open period, the running quantity of each charge of the tenant's rate card
(``q``) and, for volume charges, what their events were charged so far (``v``). An event's
revenue is what it moves the period's usage bill by, given everything counted before it:

    running(state) = min(spend cap, Σ charges (1 − discount) × amount(charge, state))
    revenue_usd    = q12(running after the event) − q12(running before it)

where ``amount`` is ``rating.increment`` summed over the period (for unit, graduated and package
charges that is the charge's rating of the running quantity, exactly; for volume charges the
running ``v``), and ``q12`` rounds to the ledger's 12 decimal places. The differences telescope:
the revenue of a period's events adds up to ``q12`` of the period's capped usage rating, in
any order and any split into batches, with no rounding drift however many events there are.
(Round each event's amount instead and a million events can drift by half a million units of
the last place.) ``margin_usd`` is revenue less the event's provider cost.

The flat fee and the minimum commitment are not usage: they are lines of the invoice
(``costline invoice``), not of any event. Volume charges are exact at period end through the
invoice's true-up (``rating.volume_true_up``): the stream charges each event at the tier the
running quantity is in, and the drop of earlier units to a cheaper tier is settled then.

State: one entry per tenant in the ``rating_periods`` table (changelogged with the quota tables,
so exact through restarts, rebalances and aborted batches; duplicates are removed before this
stage, by the quota stage's dedup). A period is closed once the tenant's watermark (its latest
event time, at most the worker's clock plus ``watermark_lead_seconds``) passes the period's end
plus ``billing_grace_seconds``. An event of a closed period is not rated in the stream
(``revenue_usd`` stays empty, the event is flagged ``late``); the invoice rates it from the ledger
with the rest of its period and shows it apart.

Derived from the entry and kept in memory only (rebuilt after a restore, under the rate card then
in force, so a changed card applies to the rest of the period without a jump): the running bill
before the cap, the rounded bill so far, and each charge's current straight piece of its bill
(``rating.segment_of``). Most events fall on the piece the last one did, and cost one multiplication
per charge; an event that crosses a tier bound, or the first of a period, is rated by
``rating.increment`` and finds the next piece.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, MutableMapping
from datetime import datetime, timedelta
from decimal import Decimal, getcontext, setcontext
from typing import Any, NamedTuple
from zoneinfo import ZoneInfo

from schemas.attributed import AttributedUsage
from streams.stages.plans import Plans, WatermarkBound, window_bounds
from streams.stages.pricing import MONEY_QUANTUM
from streams.stages.rating import (
    EXACT,
    FILTERED_FIELDS,
    Charge,
    RateCard,
    capped,
    charge_amount,
    increment,
    net,
    segment_of,
)
from streams.storage.compiled import fast
from streams.storage.tables import LedgerRow

_ZERO = Decimal(0)
_ONE = Decimal(1)
#: Entries kept by the look-up memos (tenant → card; per card, the call's filtered fields → its
#: matching charges; a period's derived values), sized like the quota engine's
#: (``streams.stages.quotas._MEMO_SIZE``). (One memo of charges per card: the cards are the plans'.)
_MEMO_SIZE = 20_000


class Period(NamedTuple):
    start: datetime
    end: datetime
    start_text: str
    end_text: str
    #: ``YYYY-MM``, the month in the tenant's time zone.
    label: str


class RevenueOutcome(NamedTuple):
    """``revenue``: what the event added to its period's bill (None when its tenant has no rate
    card, or its period is closed); ``late``: its period was closed; ``period``: its label."""

    revenue: Decimal | None
    late: bool = False
    period: str | None = None


UNRATED = RevenueOutcome(None)
_CLOSED = RevenueOutcome(None, True)
#: ``filled(cls, values)``: a named tuple made from all its values in one C call. Its class's own
#: ``__new__`` is a Python function with defaults: a frame of its own, for every event.
filled = tuple.__new__


fast.configure_rating(RevenueOutcome, _CLOSED, MONEY_QUANTUM, _ZERO, _ONE, increment, segment_of)


def restore_entry(entry: dict[str, Any]) -> dict[str, Any]:
    """A ``rating_periods`` entry read back from the changelog (decimals and times as text)."""
    entry["w"] = datetime.fromisoformat(entry["w"])
    for period in entry["periods"].values():
        period["end"] = datetime.fromisoformat(period["end"])
        for part in ("q", "v"):
            period[part] = {charge: Decimal(value) for charge, value in period[part].items()}
    return entry


def stamped(record: AttributedUsage, outcome: RevenueOutcome, late: bool | None = None) -> AttributedUsage:
    """The record with its revenue, margin and billing period (and ``late``: by default the
    outcome's), or the record itself when there is nothing to add."""
    late = outcome.late if late is None else late
    if outcome.revenue is None and (record.late or not late):
        return record
    copy = record.model_copy()
    stamp_fresh(copy, outcome, late)
    return copy


def stamp_fresh(record: AttributedUsage | LedgerRow, outcome: RevenueOutcome, late: bool) -> None:
    """``stamped``, in place, for a record no one else holds yet (the processor's, just built by
    attribution; a stream's ledger row by ``LedgerRow.stamp``): a record's fields are set in the model's ``__dict__``, where pydantic keeps them, instead
    of copying all 39 of them for four (``model_copy``: 14-19 µs an event, a fifth of the worker's
    per-event time; this: under 1 µs). On a record already shared — landed, published, in a
    batch — this would change it under its holders: use ``stamped``."""
    if type(record) is LedgerRow:
        record.stamp(outcome.revenue, outcome.period, late)
        return
    fields = record.__dict__
    revenue = outcome.revenue
    if late:
        fields["late"] = True
    if revenue is not None:
        fields["revenue_usd"] = revenue
        fields["margin_usd"] = revenue - fields["cost_usd"]
        fields["billing_period"] = outcome.period


def quantity_of(record: AttributedUsage, charge: Charge) -> Decimal:
    metric = charge.metric
    if metric == "cost_usd":
        return record.cost_usd
    if metric == "requests":
        return _ONE
    usage = record.usage
    if metric == "input_tokens":
        return Decimal(usage.input_tokens)
    if metric == "output_tokens":
        return Decimal(usage.output_tokens)
    return Decimal(usage.input_tokens + usage.output_tokens)


class RevenueMeter:
    def __init__(self, plans: Plans) -> None:
        self.plans = plans
        self.bound = WatermarkBound(plans.watermark_lead)
        self.grace = timedelta(seconds=plans.billing_grace_seconds)
        self._cards: dict[str, tuple[RateCard | None, ZoneInfo]] = {}
        #: id(card) → (the call's values its charges filter on, those values → the charges that
        #: count the call, the card itself: kept so that its id stays its own).
        self._filtered: dict[int, tuple[Callable[[Any], Any] | None, dict[Any, list[Charge]], RateCard]] = {}
        self._last_period: dict[ZoneInfo, Period] = {}
        #: (tenant, period start) → [running bill before the cap, rounded capped bill, each charge's
        #: current straight piece (``rating.segment_of``)]: derived from the table's entry, so kept
        #: in memory only and rebuilt after a restore (``forget``), under the card in force then.
        self._derived: dict[tuple[str, str], list[Any]] = {}
        #: How many tenants' derived values are kept before they are all rebuilt from their entries.
        self.derived_limit = _MEMO_SIZE

    def forget(self) -> None:
        """After a restore or a rebalance: what is derived from the table is rebuilt from it."""
        self._derived.clear()

    def rate(self, record: AttributedUsage, table: MutableMapping[str, dict[str, Any]],
             now: datetime | None = None) -> RevenueOutcome:
        """Rates ``record`` into its tenant's period in ``table`` (tenant → entry); ``now`` is the
        worker's clock, which bounds how far the tenant's watermark moves."""
        return self.rate_all([record], table, now)[0]

    def rate_all(self, records: list[AttributedUsage], table: MutableMapping[str, dict[str, Any]],
                 now: datetime | None = None) -> list[RevenueOutcome]:
        """``[rate(record, table, now) for record in records]`` for the events of one tenant, in
        their order (the quota stage's batch path gives it a tenant's events of a batch)."""
        tenant = records[0].tenant_id
        card, zone = self._card_of(tenant)
        if card is None:
            return [UNRATED] * len(records)
        # In the exact context, set and restored by hand: ``localcontext`` copies the context on
        # every entry, 1.3 µs a call against 0.35.
        saved = getcontext()
        setcontext(EXACT)
        try:
            return self._rate_group(card, zone, tenant, records, table, now)
        finally:
            setcontext(saved)

    def _rate_group(self, card: RateCard, zone: ZoneInfo, tenant: str, records: list[AttributedUsage],
                    table: MutableMapping[str, dict[str, Any]], now: datetime | None) -> list[RevenueOutcome]:
        """The events of one tenant, one after the other. What does not change from one event to the
        next is read once: the tenant's entry (read from and written back to ``table`` once, which
        in the worker is a changelogged table that thaws a frozen entry on read and marks it changed
        on write), its card's charges for the call's fields (memoized), the period."""
        watermark_limit = self.bound.limit(now)  # (``WatermarkBound.moved_to``, for the group at once)
        entry = table.get(tenant)
        if entry is None:
            first = records[0].event_time
            entry = {"w": first if first <= watermark_limit else watermark_limit, "periods": {}}
        try:
            return self._rate_each(card, zone, tenant, records, entry, watermark_limit)
        finally:  # (also when an event fails: what the events before it changed is in the changelog)
            table[tenant] = entry

    def _rate_each(self, card: RateCard, zone: ZoneInfo, tenant: str, records: list[AttributedUsage],
                   entry: dict[str, Any], watermark_limit: datetime) -> list[RevenueOutcome]:
        # What the event before left for the next: its period, the period's state in ``entry`` and
        # its derived values (``_open``).
        at: list[Any] = [None, None, None]
        if records and type(records[0]) is LedgerRow:  # the stream's rows: the same steps, in C
            return fast.rate_rows(self, card, zone, tenant, records, entry, watermark_limit, at)
        return [self._rate_one(card, zone, tenant, record, entry, watermark_limit, at) for record in records]

    def _rate_one(self, card: RateCard, zone: ZoneInfo, tenant: str, record: AttributedUsage,
                  entry: dict[str, Any], watermark_limit: datetime, at: list[Any]) -> RevenueOutcome:
        """One event into its period. ``at``: [period, its state, its derived values] as the event
        before left them, updated for the next (``fast.rate_rows`` takes its fast steps from there,
        and calls ``_open`` and ``_charge`` for any event that needs more: change them together)."""
        opened = self._open(card, zone, tenant, record, entry, watermark_limit, at)
        if opened is None:
            return _CLOSED
        return self._charge(card, record, *opened)

    def _open(self, card: RateCard, zone: ZoneInfo, tenant: str, record: AttributedUsage, entry: dict[str, Any],
              watermark_limit: datetime, at: list[Any]) -> tuple[Period, dict[str, Any], list[Any]] | None:
        """The first steps of ``_rate_one``: the tenant's watermark moved to the event, its period
        found and opened (periods past their grace closed), its derived values made; the period, its
        state and its derived values, or None when the period has closed. ``at`` as ``_rate_one``
        leaves it: its state and derived values only when that period is the only one open."""
        grace, derived_of = self.grace, self._derived
        periods: dict[str, dict[str, Any]] = entry["periods"]
        time = record.event_time
        mark = time if time <= watermark_limit else watermark_limit
        if mark > entry["w"]:
            entry["w"] = mark
        period = at[0]
        if period is None or not period.start <= time < period.end:
            period = at[0] = self._period_of(time, zone)
        state = periods.get(period.start_text)
        at[1] = at[2] = None  # (set again below once the period is open and its values known)
        if state is None or len(periods) > 1:  # (only then can another period be open)
            watermark = entry["w"]
            for start_text, open_period in list(periods.items()):
                if open_period["end"] + grace <= watermark:
                    del periods[start_text]
                    derived_of.pop((tenant, start_text), None)
            if period.end + grace <= watermark:
                return None
            if state is None:
                state = periods[period.start_text] = {"end": period.end, "q": {}, "v": {}}
        derived = derived_of.get((tenant, period.start_text))
        if derived is None:  # (new, or restored from the changelog: under the card in force now)
            if len(derived_of) >= self.derived_limit:
                # Bounded like the memos: a tenant's derived values are rebuilt from its entry,
                # exactly as after a restore. (Left to grow, they were 30 MB with 100,000 tenants.)
                derived_of.clear()
            running = _running(card, state)
            derived = derived_of[(tenant, period.start_text)] = [
                running, capped(card, running).quantize(MONEY_QUANTUM), {}]
        if len(periods) == 1:  # (the next event in this period needs no look at the others)
            at[1], at[2] = state, derived
        return period, state, derived

    def _charge(self, card: RateCard, record: AttributedUsage, period: Period, state: dict[str, Any],
                derived: list[Any]) -> RevenueOutcome:
        """The rest of ``_rate_one``: the call's charges added to its open period."""
        running, billed_before, segments = derived
        added = _ZERO
        q = state["q"]
        for charge in self._charges_for(card, record):
            cid = charge.id
            before = q.get(cid, _ZERO)
            after = q[cid] = before + quantity_of(record, charge)
            segment = segments.get(cid)
            if segment is not None and segment[0] < before and (segment[1] is None or after <= segment[1]):
                step = (after - before) * segment[2]  # on one straight piece of the bill: most events
            else:
                step = increment(charge, before, after)
                segments[cid] = segment_of(charge, after)
            if charge.price == "volume":
                v = state["v"]
                v[cid] = v.get(cid, _ZERO) + step
            added += net(charge, step)
        derived[0] = running = running + added
        derived[1] = billed = capped(card, running).quantize(MONEY_QUANTUM)
        return filled(RevenueOutcome, (billed - billed_before, False, period.label))

    def rates(self, tenant: str) -> bool:
        """Whether the tenant's plan has a rate card."""
        return self._card_of(tenant)[0] is not None

    def _card_of(self, tenant: str) -> tuple[RateCard | None, ZoneInfo]:
        found = self._cards.get(tenant)
        if found is None:
            if len(self._cards) >= _MEMO_SIZE:
                self._cards.clear()
            plan, zone = self.plans.plan_of(tenant)
            found = self._cards[tenant] = (plan.rate_card if plan else None), zone
        return found

    def _charges_for(self, card: RateCard, record: AttributedUsage) -> list[Charge]:
        """The card's charges that count this call, memoized per card by the values of the fields
        its charges filter on (most cards filter on one field or none: a key of four fields cost
        0.5 µs an event)."""
        filtered = self._filtered.get(id(card))
        if filtered is None:
            names = [name for name in FILTERED_FIELDS if any(getattr(charge.when, name) is not None for charge in card.charges)]
            filtered = self._filtered[id(card)] = (operator.attrgetter(*names) if names else None, {}, card)
        values_of, matching, _ = filtered
        values = values_of(record) if values_of is not None else None
        found = matching.get(values)
        if found is None:
            if len(matching) >= _MEMO_SIZE:
                matching.clear()
            call = {"provider": record.provider, "model": record.model, "business_path": record.business_path,
                    "feature": record.feature}
            found = matching[values] = [charge for charge in card.charges if charge.when.matches(call)]
        return found

    def _period_of(self, at: datetime, zone: ZoneInfo) -> Period:
        last = self._last_period.get(zone)
        if last is not None and last.start <= at < last.end:
            return last
        start, end = window_bounds("month", at, zone)
        period = self._last_period[zone] = Period(start, end, start.isoformat(), end.isoformat(),
                                                  f"{start.astimezone(zone):%Y-%m}")
        return period


def _running(card: RateCard, state: dict[str, Any]) -> Decimal:
    """The period's usage bill before the cap, from its running quantities."""
    total = _ZERO
    for charge in card.charges:
        if charge.price == "volume":
            amount = state["v"].get(charge.id, _ZERO)
        else:
            amount = charge_amount(charge, state["q"].get(charge.id, _ZERO))
        total += net(charge, amount)
    return total
