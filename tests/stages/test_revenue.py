"""Revenue per event, in the stream: hand-computed examples, each naming the trap it guards, and
the property that a period's events add up to the rating of its totals whatever their order,
batches and restarts."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.attributed import AttributedUsage
from schemas.usage import TokenUsage
from streams.runtime.state import _encode
from streams.stages.plans import Plans
from streams.stages.quotas import QuotaEngine, QuotaTables, restore_entry
from streams.stages.rating import usage_amount
from streams.stages.revenue import RevenueMeter

D = Decimal
NOV = datetime(2026, 11, 10, 12, tzinfo=UTC)
PLANS = {
    "default_plan": "usage",
    "billing_grace_seconds": 3600,
    "tenants": {"tokyo": {"plan": "usage", "time_zone": "Asia/Tokyo"}, "legacy": {"plan": "unbilled"}},
    "plans": {
        "unbilled": {},
        "usage": {"rate_card": {
            "flat_fee": "19", "spend_cap": "100",
            "charges": [
                {"id": "tokens", "metric": "tokens", "per": 1_000_000, "price": "graduated", "free_units": 1_000_000,
                 "tiers": [{"up_to": 10, "unit_amount": "6"}, {"up_to": 100, "unit_amount": "4.5"},
                           {"unit_amount": "3"}]},
                {"id": "reasoning-calls", "metric": "requests", "when": {"model": ["o*"]}, "price": "unit",
                 "unit_amount": "0.002", "discount_percent": "12.5"},
                {"id": "cost-plus", "metric": "cost_usd", "when": {"business_path": ["support/*"]}, "price": "unit",
                 "unit_amount": "1.3"},
            ]}},
    },
}


def plans(**changes) -> Plans:
    return Plans.model_validate({**PLANS, **changes})


def rec(tenant="acme", at=NOV, tokens=0, model="gpt-4o", cost="0", path="chat/answer", event_id="e"):
    return AttributedUsage.model_construct(
        event_id=event_id, event_time=at, tenant_id=tenant, provider="openai", model=model, feature=None,
        usage=TokenUsage(input_tokens=tokens), cost_usd=D(cost), priced=True, business_path=path)


def test_free_tokens_then_the_first_tier_then_a_tier_bound_crossed_inside_one_event():
    meter, table = RevenueMeter(plans()), {}
    assert meter.rate(rec(tokens=999_999), table, NOV).revenue == 0                   # inside the free million
    assert meter.rate(rec(tokens=2), table, NOV).revenue == D("0.000006")            # one free token, one at $6/M
    # From 1,000,001 to 10,500,001 tokens: 8,999,999 more at $6/M to the bound of 10M, 500,001 at $4.5/M.
    step = meter.rate(rec(tokens=9_500_000), table, NOV).revenue
    assert step == D("53.999994") + D("2.2500045")


def test_a_filtered_charge_counts_only_its_calls_and_its_discount_is_in_the_revenue():
    meter, table = RevenueMeter(plans()), {}
    assert meter.rate(rec(model="o3"), table, NOV).revenue == D("0.00175")            # 0.002 less 12.5%
    assert meter.rate(rec(model="gpt-4o"), table, NOV).revenue == 0


def test_cost_plus_bills_the_provider_cost_times_the_factor_and_margin_is_the_markup():
    engine = QuotaEngine(plans(), QuotaTables({}, {}, {}, {}))
    out = engine.apply(rec(cost="0.012345678901", path="support/triage"), 0, 0, NOV)
    assert out.rated.revenue == D("0.016049382571")   # 0.0160493825713 to 12 places, as the ledger keeps it
    assert out.rated.period == "2026-11"


def test_the_spend_cap_stops_revenue_mid_event_and_then_entirely():
    meter, table = RevenueMeter(plans()), {}
    meter.rate(rec(tokens=1_000_000), table, NOV)                                      # the free million
    assert meter.rate(rec(tokens=10_000_000), table, NOV).revenue == D("58.5")        # 9M x 6 + 1M x 4.5
    assert meter.rate(rec(tokens=10_000_000), table, NOV).revenue == D("41.5")        # 45 due; the cap of 100 leaves 41.5
    assert meter.rate(rec(tokens=10_000_000), table, NOV).revenue == 0


def test_a_period_is_the_month_in_the_tenants_time_zone():
    meter, table = RevenueMeter(plans()), {}
    # 2026-11-30 16:00 UTC is already December 1st in Tokyo: a new period, with its free million again.
    meter.rate(rec("tokyo", datetime(2026, 11, 30, 14, 59, tzinfo=UTC), tokens=1_000_000), table, NOV)
    november = meter.rate(rec("tokyo", datetime(2026, 11, 30, 14, 59, tzinfo=UTC), tokens=1), table, NOV)
    december = meter.rate(rec("tokyo", datetime(2026, 11, 30, 15, 0, tzinfo=UTC), tokens=1), table, NOV)
    assert (november.revenue, november.period) == (D("0.000006"), "2026-11")
    assert (december.revenue, december.period) == (0, "2026-12")


def test_an_event_after_its_period_closed_is_late_and_not_rated_and_old_periods_are_dropped():
    meter, table = RevenueMeter(plans()), {}
    now = datetime(2026, 12, 1, 2, tzinfo=UTC)
    meter.rate(rec(at=datetime(2026, 11, 30, 23, tzinfo=UTC)), table, now)
    meter.rate(rec(at=datetime(2026, 12, 1, 1, 30, tzinfo=UTC)), table, now)            # 1h30 past November's end
    assert list(table["acme"]["periods"]) == ["2026-12-01T00:00:00+00:00"]
    late = meter.rate(rec(at=datetime(2026, 11, 30, 23, 59, tzinfo=UTC)), table, now)
    assert (late.revenue, late.late) == (None, True)


def test_a_tenant_without_a_rate_card_is_not_rated_and_keeps_no_state():
    meter, table = RevenueMeter(plans()), {}
    assert meter.rate(rec("legacy", tokens=5), table, NOV) == (None, False, None)
    assert table == {}


def test_a_watermark_cannot_be_pushed_into_next_month_by_a_clock_running_fast():
    """One event stamped two days ahead must not close the tenant's current period."""
    meter, table = RevenueMeter(plans()), {}
    now = datetime(2026, 11, 30, 23, 0, tzinfo=UTC)
    meter.rate(rec(at=datetime(2026, 12, 2, tzinfo=UTC)), table, now)
    on_time = meter.rate(rec(at=datetime(2026, 11, 30, 22, 59, tzinfo=UTC), tokens=1_000_001), table, now)
    assert (on_time.late, on_time.revenue) == (False, D("0.000006"))


def test_duplicates_are_not_rated_twice():
    engine = QuotaEngine(plans(), QuotaTables({}, {}, {}, {}))
    first = engine.apply(rec(model="o3", event_id="x"), 0, 0, NOV)
    copy = engine.apply(rec(model="o3", event_id="x"), 0, 5, NOV)
    assert (first.rated.revenue, copy.duplicate, copy.rated.revenue) == (D("0.00175"), True, None)


def restored(table: dict) -> dict:
    """The table as a worker that took over the partition reads it back from the changelog."""
    return {key: restore_entry("rating_periods", json.loads(_encode(entry))) for key, entry in table.items()}


events_st = st.lists(st.tuples(st.integers(0, 4_000_000), st.sampled_from(["gpt-4o", "o3", "o4-mini"]),
                               st.decimals(min_value=0, max_value=2, places=12),
                               st.sampled_from(["chat/answer", "support/triage"])), min_size=1, max_size=40)


@settings(max_examples=150, deadline=None)
@given(events_st, st.lists(st.integers(0, 40), max_size=4), st.sampled_from([None, "100", "3.3"]))
def test_a_periods_revenue_adds_up_to_the_rating_of_its_totals_in_any_order_and_through_restores(
        events, restarts, cap):
    """Any order, any restore points (the state read back from its changelog encoding, and the
    running total recomputed), any cap: the events' revenue sums to the period's capped usage
    rating to the ledger's 12 places, with no drift."""
    usage_plan = PLANS["plans"]["usage"]
    meter_plans = plans(plans={**PLANS["plans"], "usage": {"rate_card": {**usage_plan["rate_card"], "spend_cap": cap}}})
    meter, table, total = RevenueMeter(meter_plans), {}, D(0)
    for i, (tokens, model, cost, path) in enumerate(events):
        if i in restarts:
            meter, table = RevenueMeter(meter_plans), restored(table)
        total += meter.rate(rec(tokens=tokens, model=model, cost=str(cost), path=path), table, NOV).revenue
    card = meter_plans.plans["usage"].rate_card
    quantities = {"tokens": sum(D(t) for t, *_ in events),
                  "reasoning-calls": D(sum(1 for _, m, *_ in events if m.startswith("o"))),
                  "cost-plus": sum((c for _, _, c, p in events if p.startswith("support/")), D(0))}
    assert total == usage_amount(card, quantities).quantize(D("1e-12"))


def test_a_margin_floor_alerts_once_when_the_margin_falls_below_it_after_the_minimum_revenue():
    limits = [{"id": "margin-floor", "metric": "margin_percent", "window": "month", "limit": 20, "min_revenue": "1"},
              {"id": "spend-cap", "metric": "revenue_usd", "window": "month", "limit": "0.05", "thresholds": [100],
               "hard_cap": 100}]
    card = {"charges": [{"id": "calls", "metric": "requests", "price": "unit", "unit_amount": "0.25"}]}
    engine = QuotaEngine(Plans.model_validate({"default_plan": "p", "plans": {"p": {"limits": limits,
                                                                                  "rate_card": card}}}),
                         QuotaTables({}, {}, {}, {}))
    # Each call earns 0.25: cost 0.10 is a 60% margin, cost 0.24 only 4%.
    outs = [engine.apply(rec(cost=cost, event_id=f"m{i}", at=NOV + timedelta(seconds=i)), 0, i, NOV)
            for i, cost in enumerate(["0.10", "0.24", "0.24", "0.24", "0.24", "0.24", "0.10"])]
    margin_alerts = [(i, a.usage) for i, o in enumerate(outs) for a in o.alerts if a.limit_id == "margin-floor"]
    # Revenue reaches the minimum of 1 at the 4th call: margin (1 - 0.82) / 1 = 18% < 20%, once.
    assert margin_alerts == [(3, D("18.0000"))]
    margin_states = [next(s for s in o.states if s.limit_id == "margin-floor") for o in outs]
    # The last call lifts the margin back to (1.75 - 1.40) / 1.75 = 20%, exactly the floor, which is
    # not below it: the state says ok again.
    assert [s.status for s in margin_states] == ["ok", "ok", "ok", "soft_cap", "soft_cap", "soft_cap", "ok"]
    assert margin_states[-1].usage == D("20.0000")
    # The spend cap on revenue_usd: hard at 0.05 of revenue, crossed by the first call.
    spend = [(i, a.level) for i, o in enumerate(outs) for a in o.alerts if a.limit_id == "spend-cap"]
    assert spend == [(0, "hard_cap")]


@pytest.mark.parametrize(("limit", "message"), [
    ({"metric": "margin_percent", "limit": 20, "hard_cap": 100}, "alerts only"),
    ({"metric": "margin_percent", "limit": 120}, "at most 100"),
    ({"metric": "cost_usd", "limit": 1, "min_revenue": 5}, "margin_percent limits only"),
])
def test_a_bad_margin_limit_is_refused_naming_the_problem(limit, message):
    with pytest.raises(ValueError, match=message):
        Plans.model_validate({"plans": {"p": {"limits": [{"id": "x", "window": "month", **limit}],
                                              "rate_card": {}}}})


def test_a_revenue_limit_needs_a_rate_card():
    with pytest.raises(ValueError, match="needs the plan to have a rate_card"):
        Plans.model_validate({"plans": {"p": {"limits": [{"id": "x", "metric": "revenue_usd", "window": "month",
                                                          "limit": 5}]}}})


def test_the_readme_worked_example():
    """README, "Revenue and margin": the starter plan of config/plans.yaml, a month of 12.5M tokens
    with 300 o3 calls among them."""
    from pathlib import Path

    from streams.stages.rating import rate

    starter = Plans.from_file(Path(__file__).parents[2] / "config" / "plans.yaml")
    card = starter.plans["starter"].rate_card
    lines = rate(card, {"tokens": D(12_500_000), "reasoning-models": D(300)}).lines
    assert [(line.description, line.quantity, line.amount) for line in lines] == [
        ("tokens, tier 1", D(9), D("54.00")), ("tokens, tier 2", D("2.5"), D("11.25")),
        ("reasoning-models", D(300), D("0.60")), ("flat fee", D(1), D("19.00"))]
    assert sum(line.amount for line in lines) == D("84.85")
    meter, table = RevenueMeter(starter), {}
    meter.rate(rec(tokens=9_999_000), table, NOV)
    assert meter.rate(rec(tokens=2_000), table, NOV).revenue == D("0.0105")


ROWS_CARD = {
    "spend_cap": "250",
    "charges": [
        {"id": "tokens", "metric": "tokens", "per": 1_000_000, "price": "graduated", "free_units": 1_000_000,
         "tiers": [{"up_to": 10, "unit_amount": "6"}, {"up_to": 100, "unit_amount": "4.5"}, {"unit_amount": "3"}]},
        {"id": "in-volume", "metric": "input_tokens", "per": 1_000_000, "price": "volume",
         "tiers": [{"up_to": 5, "unit_amount": "2", "flat_amount": "1"}, {"unit_amount": "1.5", "flat_amount": "2"}]},
        {"id": "out-packages", "metric": "output_tokens", "price": "package", "package_size": 1000,
         "package_amount": "0.01", "discount_percent": "10"},
        {"id": "reasoning-calls", "metric": "requests", "when": {"model": ["o*"]}, "price": "unit",
         "unit_amount": "0.002", "discount_percent": "12.5"},
        {"id": "cost-plus", "metric": "cost_usd", "when": {"business_path": ["support/*"]}, "price": "unit",
         "unit_amount": "1.3"},
    ]}


#: Charges every row is rated by in integers (``fast._rate_ints``; ``ROWS_CARD``'s volume charge sends
#: every row to the ``Decimal`` steps): free units and tiers, discounts, cost-plus, and a price of half a
#: pico-dollar a token, whose bills end in ties that round to the even pico-dollar.
INTEGER_CARD = {
    "spend_cap": "250",
    "charges": [
        {"id": "tokens", "metric": "tokens", "per": 1_000_000, "price": "graduated", "free_units": 1_000_000,
         "tiers": [{"up_to": 10, "unit_amount": "6"}, {"up_to": 100, "unit_amount": "4.5"}, {"unit_amount": "3"}]},
        {"id": "half-pico", "metric": "output_tokens", "per": 1_000_000, "price": "unit", "unit_amount": "0.0000005"},
        {"id": "reasoning-calls", "metric": "requests", "when": {"model": ["o*"]}, "price": "unit",
         "unit_amount": "0.002", "discount_percent": "12.5"},
        {"id": "cost-plus", "metric": "cost_usd", "when": {"business_path": ["support/*"]}, "price": "unit",
         "unit_amount": "1.3", "discount_percent": "3"},
    ]}


@settings(max_examples=120, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["acme", "tokyo"]), st.integers(0, 3 * 24 * 60),
                          st.integers(0, 4_000_000), st.integers(0, 30_000), st.sampled_from(["gpt-4o", "o3"]),
                          st.sampled_from(["chat/answer", "support/triage"])), min_size=1, max_size=60),
       st.lists(st.integers(1, 20), min_size=1, max_size=6), st.sampled_from([None, "250", "3.3"]),
       st.sampled_from([ROWS_CARD, INTEGER_CARD]))
def test_rows_rated_in_c_are_records_rated_in_python(events, cuts, cap, card):
    """``fast.rate_rows`` (the stream's ledger rows) against ``RevenueMeter._rate_one`` (records): the
    same revenue, periods and lateness per event and the same state, through month ends (in UTC and
    in Tokyo), closed periods, tier bounds, volume and package charges, discounts and caps, whatever
    the groups the events come in."""
    from schemas.usage import UsageEvent
    from streams.stages.attribution import _ROWS
    from streams.stages.pricing import Quote, Rates

    rates = Rates.per_million({"input": D("2.5"), "output": D("10")})
    quote = Quote.of(rates, True, matched_model="m", price_source="test", pricing_version="v1")
    start = datetime(2026, 11, 29, tzinfo=UTC)
    rows = []
    for i, (tenant, minute, tokens, out, model, path) in enumerate(events):
        event = UsageEvent(event_id=f"e{i}", timestamp=start + timedelta(minutes=minute), tenant_id=tenant,
                           provider="openai", model=model, usage=TokenUsage(input_tokens=tokens, output_tokens=out))
        rows.append(_ROWS.build(event, quote, path, NOV))
    records = [row.as_model() for row in rows]
    rated_card = {**card, "spend_cap": cap}
    meter_plans = plans(plans={**PLANS["plans"], "usage": {"rate_card": rated_card}})
    now = datetime(2026, 12, 1, 3, tzinfo=UTC)  # (late events: November closes at 01:00 with a grace of 1 h)
    results = []
    for made in (rows, records):
        meter, table, outcomes = RevenueMeter(meter_plans), {}, []
        at = 0
        for cut in cuts * (len(made) // sum(cuts) + 1):  # one tenant's consecutive events per call
            group = made[at:at + cut]
            while group:
                tenant = group[0].tenant_id
                same = [r for r in group[:next((k for k, r in enumerate(group) if r.tenant_id != tenant), len(group))]]
                outcomes += meter.rate_all(same, table, now)
                group = group[len(same):]
            at += cut
            if at >= len(made):
                break
        results.append((outcomes, {key: _encode(entry) for key, entry in table.items()}))
    assert results[0] == results[1]
    if card is ROWS_CARD:  # (``INTEGER_CARD`` bills nothing for a month's first million tokens)
        assert any(outcome.revenue for outcome in results[0][0]) or not any(tokens for _, _, tokens, *_ in events)


def test_a_bill_beyond_128_bits_is_rated_in_decimal_not_refused_with_an_error():
    """A cost-plus price of 12 decimals with a discount puts the running bill at 34 places; a spend
    cap of 25000.5 then cannot be compared with it in 128 bits: the rows go to the ``Decimal`` steps
    (this once crashed the worker) and are rated as their records are."""
    from schemas.usage import UsageEvent
    from streams.stages.attribution import _ROWS
    from streams.stages.pricing import Quote, Rates

    card = {"spend_cap": "25000.5", "charges": [
        {"id": "cost-plus", "metric": "cost_usd", "price": "unit", "per": 1_000_000, "unit_amount": "0.000000012345",
         "discount_percent": "12.25"}]}
    meter_plans = plans(plans={**PLANS["plans"], "usage": {"rate_card": card}})
    quote = Quote.of(Rates.per_million({"input": D("2.5"), "output": D("10")}), True, matched_model="m",
                     price_source="test", pricing_version="v1")
    rows = [_ROWS.build(UsageEvent(event_id=f"e{i}", timestamp=datetime(2026, 11, 29, tzinfo=UTC),
                                   tenant_id="acme", provider="openai", model="gpt-4o",
                                   usage=TokenUsage(input_tokens=1000 + i, output_tokens=7)), quote, "p", NOV)
            for i in range(3)]
    now = datetime(2026, 11, 30, tzinfo=UTC)
    results = []
    for made in (rows, [row.as_model() for row in rows]):
        meter, table = RevenueMeter(meter_plans), {}
        results.append((meter.rate_all(made, table, now), {key: _encode(entry) for key, entry in table.items()}))
    assert results[0] == results[1]
