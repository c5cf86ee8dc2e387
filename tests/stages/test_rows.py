"""The stream's ledger rows (``streams.storage._native.LedgerRow``, built and priced in integer
pico-dollars by ``streams/stages/_fast.pyx``'s ``RowBuilder``) against the reference: the record
``Attribution.attribute`` makes, priced in ``Decimal`` by ``pricing.cost_of``. Every cost class and
the total must be the same ``Decimal``, down to its exponent (a zero that ``cost_of`` rounded is
``0E-12``, one it skipped the shared zero: sums of them print differently in quota states)."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from schemas.attributed import ZERO
from schemas.dead_letter import Rejection
from schemas.usage import MAX_TOKENS, TokenUsage, UsageEvent
from streams.stages.attribution import _ROWS, Attribution
from streams.stages.prices import ModelPrice, PerMillionTokens, PriceOverrides
from streams.stages.pricing import MAX_PICO_RATE, Pricer, Quote, Rates, cost_of, pico_rates
from streams.stages.tagging import PathRules
from streams.storage.compiled import native
from streams.storage.tables import LEDGER, LedgerRow, RecordBatch

AT = datetime(2026, 6, 1, 9, 30, tzinfo=UTC)
CLASSES = ("input", "cache_read", "cache_write", "output", "reasoning", "input_audio", "input_image",
           "output_audio", "output_image", "request")
PER_MILLION = ("input", "output", "cache_read", "cache_write", "cache_write_1h", "reasoning", "input_audio",
               "cache_audio_read", "input_image", "cache_image_read", "output_audio", "output_image")


@st.composite
def usages(draw) -> TokenUsage:
    """Token counts within the contract's bounds: each part within its total, text only or not."""
    counts = st.integers(0, 10**6) | st.sampled_from([0, 1, 999_999_999])
    media = draw(st.booleans())
    ca, ci = (draw(counts), draw(counts)) if media else (0, 0)
    ia, ii = (ca + draw(counts), ci + draw(counts)) if media else (0, 0)
    cache_read = ca + ci + draw(counts)
    cw1h = draw(counts)
    cache_write = cw1h + draw(counts)
    oa, oi = (draw(counts), draw(counts)) if media else (0, 0)
    reasoning = draw(counts)
    values = dict(input_tokens=cache_read + cache_write + (ia - ca) + (ii - ci) + draw(counts),
                  cache_read_tokens=cache_read, cache_write_tokens=cache_write, cache_write_1h_tokens=cw1h,
                  input_audio_tokens=ia, cache_audio_read_tokens=ca, input_image_tokens=ii, cache_image_read_tokens=ci,
                  output_tokens=reasoning + oa + oi + draw(counts), reasoning_tokens=reasoning,
                  output_audio_tokens=oa, output_image_tokens=oi)
    assume(all(value <= MAX_TOKENS for value in values.values()))
    try:
        return TokenUsage(**values)
    except ValidationError:
        assume(False)
        raise


def prices(places: int) -> st.SearchStrategy[Decimal]:
    return st.decimals(min_value=0, max_value=Decimal(2000), places=places, allow_nan=False, allow_infinity=False)


@st.composite
def rates(draw) -> Rates:
    """Per-million prices of up to six decimals (whole pico-dollars a token: priced in integers),
    sometimes more, sometimes scaled by a discount (then often not whole: priced in ``Decimal``),
    missing classes falling back to their parents', and a per-call fee, some below a pico-dollar."""
    places = draw(st.sampled_from([0, 2, 6, 6, 6, 9]))
    per_million = {name: draw(st.none() | prices(places)) for name in PER_MILLION}
    per_million["input"] = draw(prices(places))
    fee = draw(st.sampled_from([ZERO, Decimal("0.0004"), Decimal("4E-13"), Decimal("1.5E-12"), Decimal("2.5E-12"),
                                Decimal("0.000000000001"), Decimal(5)]))
    made = Rates.per_million(per_million, fee)
    factor = draw(st.sampled_from([None, Decimal("0.9"), Decimal(2) / Decimal(3)]))
    return made.scaled(factor) if factor is not None else made


def event(usage: TokenUsage, **fields) -> UsageEvent:
    return UsageEvent(event_id="e-1", timestamp=AT, tenant_id="t", provider="openai", model="gpt-4o", usage=usage,
                      **fields)


def quote(made: Rates) -> Quote:
    return Quote.of(made, True, matched_model="gpt-4o", price_source="test", pricing_version="v1")


@settings(max_examples=600, deadline=None)
@given(usage=usages(), made=rates())
def test_a_rows_costs_are_cost_ofs_decimals_exponents_included(usage, made):
    row = _ROWS.build(event(usage), quote(made), "p", AT)
    expected = cost_of(usage, made)
    assert [getattr(row.cost, c).as_tuple() for c in CLASSES] == [getattr(expected, c).as_tuple() for c in CLASSES]
    assert row.cost_usd.as_tuple() == expected.total.as_tuple()
    total = int(expected.total.scaleb(12))
    if row.cost_usd_pico == native.BEYOND_LEDGER:  # priced in Decimal, beyond the ledger: refused, never written
        assert total > native.MAX_COST_PICO and pico_rates(made) is None
    else:
        assert row.cost_usd_pico == total
        assert [row.cost_pico(i) for i in range(10)] == [int(getattr(expected, c).scaleb(12)) for c in CLASSES]


def test_whole_pico_rates_are_priced_in_integers_and_the_rest_in_decimal():
    whole = Rates.per_million({"input": Decimal("3"), "output": Decimal("15.000001")})
    assert pico_rates(whole)[:4] == (3_000_000, 3_000_000, 3_000_000, 15_000_001)
    assert pico_rates(whole.scaled(Decimal(2) / Decimal(3))) is None  # not whole pico-dollars
    assert pico_rates(Rates.per_million({"input": Decimal("0.0000001")})) is None  # a tenth of a pico-dollar
    assert pico_rates(Rates.per_million({"input": Decimal(2148)})) is None  # above MAX_PICO_RATE
    assert pico_rates(Rates.per_million({"input": MAX_PICO_RATE * Decimal("1e-6")}))[0] == MAX_PICO_RATE
    # (-0E-12 costs, which the JSON shows: cost_of's to write)
    assert pico_rates(Rates.per_million({"input": Decimal(1), "cache_read": Decimal("-0")})) is None
    # A per-call fee is added, not multiplied: $5 a call is priced in integers.
    assert pico_rates(Rates.per_million({"input": Decimal(1)}, Decimal(5)))[12:] == (5 * 10**12, 1)
    assert pico_rates(Rates.per_million({"input": Decimal(1)}, Decimal(10**6))) is None  # beyond the ledger
    # Fees round half-even to the pico-dollar, as cost_of rounds them.
    assert [pico_rates(Rates.per_million({"input": Decimal(1)}, Decimal(fee)))[12] for fee in ("1.5E-12", "2.5E-12")] \
        == [2, 2]
    # A fee below half a pico-dollar rounds to zero, and is still a rounded zero (0E-12).
    tiny = Rates.per_million({"input": Decimal(1)}, Decimal("4E-13"))
    assert pico_rates(tiny)[12:] == (0, 1)
    row = _ROWS.build(event(TokenUsage(input_tokens=0)), quote(tiny), "p", AT)
    assert (str(row.cost.request), str(row.cost_usd)) == ("0E-12", "0E-12")


def test_a_cost_beyond_the_ledger_is_refused_on_either_pricing_with_the_references_message():
    usage = TokenUsage(input_tokens=MAX_TOKENS, output_tokens=MAX_TOKENS, reasoning_tokens=MAX_TOKENS // 2,
                       cache_read_tokens=MAX_TOKENS // 2, cache_write_tokens=MAX_TOKENS // 2)
    # In integers: the highest whole rate on every class (no sum of them can pass 64 bits: at most
    # 2 × 10^9 tokens a call at 2^31 pico-dollars each).
    top = Rates.per_million({name: MAX_PICO_RATE * Decimal("1e-6") for name in PER_MILLION})
    # In Decimal: a rate above what is multiplied in integers.
    above = Rates.per_million({name: Decimal(5000) for name in PER_MILLION})
    assert pico_rates(top) is not None and pico_rates(above) is None
    for made, pico in ((top, cost_of(usage, top).total.scaleb(12)), (above, native.BEYOND_LEDGER)):
        row = _ROWS.build(event(usage), quote(made), "p", AT)
        assert row.cost_usd == cost_of(usage, made).total > Decimal("999999.999999999999")
        assert row.cost_usd_pico == pico > native.MAX_COST_PICO
    # Through attribution: the stream's rejection is the reference's, word for word.
    pricer = Pricer(PriceOverrides(models=[ModelPrice(provider="openai", model="gpt-4o", per_million_tokens=
                                                      PerMillionTokens(input=Decimal(1000), output=Decimal(1000)))]))
    attribution = Attribution(pricer, PathRules([]))
    raw = event(usage).model_dump_json().encode()
    rejected, expected = attribution.row_raw(raw, AT), attribution.attribute_raw(raw, AT)
    assert isinstance(rejected, Rejection) and rejected == expected and rejected.reason == "cost_out_of_range"
    assert "cost 2000000.000000000000 USD of openai/gpt-4o" in rejected.message


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(usage=usages(), model=st.sampled_from(["gpt-4o", "gpt-4o-mini", "o3", "claude-sonnet-4-5", "unknown-model"]),
       batch=st.booleans(), user=st.none() | st.just("u-1"), tags=st.sampled_from([{}, {"k": "v"}]))
def test_a_row_stands_for_the_reference_record(attribution, usage, model, batch, user, tags):
    provider = "anthropic" if model.startswith("claude") else "openai"
    made = UsageEvent(event_id="e-2", timestamp=AT, tenant_id="t", provider=provider, model=model, usage=usage,
                      batch=batch, user_id=user, tags=tags, service="chat", feature="answer", latency_ms=12)
    row, record = attribution.row(made, AT), attribution.attribute(made, AT)
    assert row.as_model() == record
    assert row.as_model().model_dump_json() == record.model_dump_json()
    assert LEDGER.block_rows(LEDGER.native([row])) == LEDGER.block_rows(LEDGER.native_reference([record]))
    row.stamp(Decimal("0.000001000000"), "2026-06", True)
    assert (row.revenue_usd, row.billing_period, row.late) == (Decimal("0.000001"), "2026-06", True)
    assert row.margin_usd == Decimal("0.000001") - record.cost_usd


def test_a_rows_ledger_block_stores_what_its_records_block_stores(attribution):
    usage = TokenUsage(input_tokens=900, cache_read_tokens=300, output_tokens=75, reasoning_tokens=25)
    events = [event(usage).model_copy(update={"event_id": f"e{i}", "model": model})
              for i, model in enumerate(["gpt-4o", "gpt-4o-mini", "unknown-model", "o3"])]
    rows = RecordBatch(LEDGER)
    for made in events:
        rows.add(attribution.row(made, AT))
    assert all(type(row) is LedgerRow for row in rows)
    records = [attribution.attribute(made, AT) for made in events]
    # The texts of the decimals may differ ("0E-12" against "0"); the values stored do not.
    assert LEDGER.block_rows(LEDGER.native(rows)) == LEDGER.block_rows(LEDGER.native_reference(records))


def test_a_row_is_refused_by_a_writer_of_another_table():
    from streams.storage.tables import ALERTS

    writer = ALERTS.writer()
    with pytest.raises(TypeError, match="not a ledger row's field"):
        writer.add_row(_ROWS.build(event(TokenUsage()), quote(Rates.per_million({"input": ZERO})), "p", AT))
    assert len(writer) == 0


def test_a_row_beyond_the_ledger_or_with_a_count_that_is_not_one_is_refused():
    made = Rates.per_million({"input": Decimal(2000)})
    huge = _ROWS.build(event(TokenUsage(input_tokens=MAX_TOKENS)), quote(made), "p", AT)
    assert huge.cost_usd_pico == 2 * 10**18 > native.MAX_COST_PICO  # (attribution dead-letters it)
    batch = RecordBatch(LEDGER)
    with pytest.raises(OverflowError, match="beyond the ledger"):
        batch.add(huge)
    assert len(batch) == 0 and LEDGER.native(batch) == b""
    # A count from an event built without validation is refused, not truncated into a C integer.
    for count in (1.5, True, -1, MAX_TOKENS + 1):
        usage = TokenUsage.model_construct(**{**TokenUsage().model_dump(), "output_tokens": count})
        with pytest.raises(TypeError, match="usage.output_tokens: expected a token count"):
            _ROWS.build(UsageEvent.model_construct(**{**event(TokenUsage()).__dict__, "usage": usage}), quote(made),
                        "p", AT)
    with pytest.raises(ValueError, match="14 numbers"):
        _ROWS.build(event(TokenUsage(input_tokens=1)), Quote(made, (True, *[None] * 6), pico_rates(made)[:13]), "p",
                    AT)


def test_most_rows_of_a_period_are_rated_in_c():
    """``fast.rate_rows`` rates every event of a period itself: ``_open`` (Python) opens the period
    at its first, and ``_charge`` (the Python steps of a charge) is left no event."""
    from streams.stages.plans import Plans
    from streams.stages.revenue import RevenueMeter

    card = {"charges": [{"id": "tokens", "metric": "tokens", "per": 1_000_000, "price": "graduated",
                         "tiers": [{"up_to": 1, "unit_amount": "6"}, {"unit_amount": "3"}]}]}
    meter = RevenueMeter(Plans.model_validate({"default_plan": "p", "plans": {"p": {"rate_card": card}}}))
    calls, charged = [], []
    opens, charges = meter._open, meter._charge
    meter._open = lambda *args: calls.append(args[3].event_id) or opens(*args)
    meter._charge = lambda *args: charged.append(args[1].event_id) or charges(*args)
    usage = TokenUsage(input_tokens=300_000)
    rows = [_ROWS.build(event(usage).model_copy(update={"event_id": f"e{i}", "timestamp": AT.replace(day=day)}),
                        quote(Rates.per_million({"input": Decimal(1)})), "p", AT)
            for i, day in enumerate([1] * 20 + [2] * 9 + [1])]  # (times out of order, all in June)
    revenue = meter.rate_all(rows, {}, AT.replace(day=3))
    assert calls == ["e0"] and charged == []  # one period, one month: every event charged in C (a tier bound too)
    assert sum(r.revenue for r in revenue) == Decimal(6) + Decimal("8.0") * 3


@pytest.mark.parametrize("features", [["search", None, None, "search", None], [None, "search", None, None]])
def test_a_fresh_meter_charges_rows_as_records_where_a_card_filters_on_one_field(features):
    """A card whose charges filter on one field (``feature``, which a call may lack) reads that
    field's value, None included, to pick a row's charges: a meter that has rated nothing yet
    charges its first row in C too, and each later row by its own value, as records are charged."""
    from streams.stages.plans import Plans
    from streams.stages.revenue import RevenueMeter

    card = {"charges": [
        {"id": "search-calls", "metric": "requests", "when": {"feature": ["search"]}, "price": "unit",
         "unit_amount": "1"},
        {"id": "tokens", "metric": "tokens", "per": 1_000_000, "price": "unit", "unit_amount": "1"}]}
    plans = Plans.model_validate({"default_plan": "p", "plans": {"p": {"rate_card": card}}})
    rows = [_ROWS.build(event(TokenUsage(input_tokens=1000), feature=feature).model_copy(update={"event_id": f"e{i}"}),
                        quote(Rates.per_million({"input": Decimal(1)})), "p", AT)
            for i, feature in enumerate(features)]
    outcomes, entries = [], []
    for made in (rows, [row.as_model() for row in rows]):
        entry: dict = {}
        outcomes.append(RevenueMeter(plans).rate_all(made, entry, AT))  # (a fresh meter each: its memos empty)
        entries.append(entry)
    searches = features.count("search")
    assert outcomes[0] == outcomes[1] and entries[0] == entries[1]
    assert [o.revenue for o in outcomes[0]] == [Decimal("1.001") if f == "search" else Decimal("0.001")
                                               for f in features]
    assert entries[0]["t"]["periods"]["2026-06-01T00:00:00+00:00"]["q"] == {
        "search-calls": Decimal(searches), "tokens": Decimal(1000 * len(features))}
