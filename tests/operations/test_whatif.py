"""``costline whatif`` on a hand-computed fixture (three tenants, two candidates), and on the
embedded ClickHouse, where the current plans' replay must be the invoices."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest

from schemas.usage import TokenUsage, UsageEvent
from streams.operations.invoice import invoice
from streams.operations.whatif import WhatIfRefused, candidates_of, compare, ledger_months
from streams.stages.plans import Plans
from streams.stages.rating import Usage
from streams.storage.query import connect_readonly, run_readonly
from streams.storage.tables import LEDGER

D = Decimal
CURRENT = Plans.model_validate({"default_plan": "now", "plans": {"now": {"rate_card": {
    "flat_fee": 10, "charges": [{"id": "calls", "metric": "requests", "price": "unit", "unit_amount": "0.01"}]}}}})
CANDIDATES = Plans.model_validate({"plans": {
    "flat": {"rate_card": {"flat_fee": 15}},
    "usage": {"limits": [{"id": "soft", "metric": "revenue_usd", "window": "month", "limit": 20, "thresholds": [100]}],
              "rate_card": {"charges": [{"id": "tokens", "metric": "tokens", "per": 1_000_000, "price": "graduated",
                                         "free_units": 100_000, "discount_percent": 10,
                                         "tiers": [{"up_to": 1, "unit_amount": 5}, {"unit_amount": 4}]}]}},
}})
CALL = {"provider": "openai", "model": "gpt-4o", "business_path": "chat/answer", "feature": "answer"}
MONTHS = {
    ("a", "2026-11"): [(CALL, Usage(D(100), D(1_000_000), D(200_000), D("4.50")))],
    ("b", "2026-11"): [(CALL, Usage(D(10), D(50_000), D(10_000), D("0.225")))],
    ("c", "2026-11"): [(CALL, Usage(D(1000), D(5_000_000), D(1_000_000), D("22.50")))],
}


def test_the_comparison_equals_the_hand_figures():
    now, flat, usage = compare(CURRENT, candidates_of(CANDIDATES, "candidates.yaml"), MONTHS)
    # Now: $10 + $0.01 a call: a 11.00, b 10.10, c 20.00.
    assert (now.plan, now.revenue, now.cost, now.margin, now.tenant_months) == ("current", D("41.10"), D("27.225"),
                                                                                 D("13.875"), 3)
    assert (now.overage_share, now.effective_discount, now.negative_margin_tenants) == (None, 0, 1)  # c: 20.00 < 22.50
    assert now.arpu == D("13.70")
    # Flat: $15 each, at list price.
    assert (flat.revenue, flat.margin, flat.effective_discount, flat.overage_share) == (D(45), D("17.775"), 0, None)
    assert flat.pays_more == [("b", D("4.90")), ("a", D("4.00"))] and flat.pays_less == [("c", D("-5.00"))]
    # Usage: tokens past the free 100,000 at $5/M up to 1M, then $4/M, 10% off:
    #   a 1.2M: 0.9 x 5 + 0.2 x 4 = 5.30, less 0.53 = 4.77;   b 60,000: free, 0;
    #   c 6M: 0.9 x 5 + 5 x 4 = 24.50, less 2.45 = 22.05, of which 2.05 above the $20 soft cap.
    assert (usage.revenue, usage.margin, usage.negative_margin_tenants) == (D("26.82"), D("-0.405"), 2)
    # List (no free units, no discount): 1 x 5 + 0.2 x 4 = 5.80; 0.06 x 5 = 0.30; 1 x 5 + 5 x 4 = 25.00.
    assert usage.list_revenue == D("31.10") and usage.effective_discount == 1 - D("26.82") / D("31.10")
    assert usage.overage == D("2.05") and usage.overage_share == D("2.05") / D("26.82")
    assert usage.arpu == D("8.94")
    assert usage.pays_more == [("c", D("2.05"))] and usage.pays_less == [("b", D("-10.10")), ("a", D("-6.23"))]
    assert usage.to_json() == {
        "plan": "usage", "revenue_usd": "26.82", "cost_usd": "27.225000", "margin_usd": "-0.405000",
        "margin_percent": "-1.5", "arpu_usd": "8.94", "list_revenue_usd": "31.10",
        "effective_discount_percent": "13.8", "overage_share_percent": "7.6", "tenant_months": 3,
        "negative_margin_tenants": 2, "pays_more": [["c", "2.05"]], "pays_less": [["b", "-10.10"], ["a", "-6.23"]]}


@pytest.mark.parametrize(("plans", "message"), [
    ({"plans": {}}, "candidates.yaml has no plans: list candidates under `plans:`"),
    ({"plans": {"free": {}}}, "candidates.yaml: plan 'free' has no rate_card, so it bills nothing: give it one"),
    ({"plans": {"current": {"rate_card": {"flat_fee": 1}}}}, "candidates.yaml: 'current' names the plans in force"),
])
def test_a_bad_candidates_file_is_one_line(plans, message):
    with pytest.raises(WhatIfRefused, match=f"^{message}"):
        candidates_of(Plans.model_validate(plans), "candidates.yaml")


def test_the_current_plans_replayed_on_the_ledger_are_the_invoices(ch_client, attribution):
    """Two tenants in two time zones, calls on both sides of their month's bounds."""
    plans = Plans.model_validate({
        "default_plan": "now", "tenants": {"whatif-tokyo": {"plan": "now", "time_zone": "Asia/Tokyo"}},
        "plans": {"now": {"rate_card": {
            "flat_fee": 10, "minimum_commitment": 12,
            "charges": [{"id": "tokens", "metric": "tokens", "per": 1_000_000, "price": "graduated",
                         "free_units": 1_000, "tiers": [{"up_to": "0.01", "unit_amount": 5}, {"unit_amount": 4}]},
                        {"id": "calls", "metric": "requests", "price": "unit", "unit_amount": "0.25",
                         "when": {"business_path": ["support/*"]}}]}}}})
    times = [datetime(2026, 10, 31, 14, 59, tzinfo=UTC), datetime(2026, 10, 31, 15, 0, tzinfo=UTC),
             datetime(2026, 11, 15, tzinfo=UTC), datetime(2026, 11, 30, 14, 59, tzinfo=UTC),
             datetime(2026, 11, 30, 15, 0, tzinfo=UTC), datetime(2026, 11, 30, 23, 59, tzinfo=UTC),
             datetime(2026, 12, 1, tzinfo=UTC)]
    rows = [attribution.attribute(UsageEvent(
        event_id=f"whatif-{tenant}-{i}", timestamp=at, tenant_id=tenant, provider="openai", model="gpt-4o",
        service=("support" if i % 2 else "search"), feature="answer",
        usage=TokenUsage(input_tokens=3_000 * (i + 1), output_tokens=500)))
        for tenant in ("whatif-tokyo", "whatif-utc") for i, at in enumerate(times)]
    LEDGER.insert(ch_client, rows, LEDGER.dedup_token(rows))
    reader = connect_readonly(f"chdb://{ch_client.path}")
    run = lambda sql: run_readonly(reader, sql).rows  # noqa: E731
    months = ledger_months(plans, datetime(2026, 10, 1, tzinfo=UTC), datetime(2026, 12, 31, tzinfo=UTC), run,
                           tenants=["whatif-tokyo", "whatif-utc"])
    assert sorted(months) == [("whatif-tokyo", "2026-10"), ("whatif-tokyo", "2026-11"), ("whatif-tokyo", "2026-12"),
                              ("whatif-utc", "2026-10"), ("whatif-utc", "2026-11"), ("whatif-utc", "2026-12")]
    [now] = compare(plans, {}, months)
    invoices = {(tenant, month): invoice(plans, tenant, month, run) for tenant, month in months}
    assert {tenant: bills for tenant, (bills, _) in now.tenants.items()} == {
        tenant: sum((bill.total for (t, _), bill in invoices.items() if t == tenant), D(0))
        for tenant in ("whatif-tokyo", "whatif-utc")}
    assert now.revenue == sum((bill.total for bill in invoices.values()), D(0))
    assert now.cost == sum((bill.cost_usd for bill in invoices.values()), D(0)) == sum((r.cost_usd for r in rows), D(0))
    with pytest.raises(WhatIfRefused, match=r"^no calls in the ledger from 2020-01-01T00:00:00\+00:00 to "):
        ledger_months(plans, datetime(2020, 1, 1, tzinfo=UTC), datetime(2020, 2, 1, tzinfo=UTC), run)


def test_a_spend_limit_with_a_hard_cap_further_on_is_still_the_plans_soft_cap():
    """Past the limit a call is served and flagged overage, up to the hard cap: that part is overage."""
    capped = Plans.model_validate({"plans": {"capped": {
        "limits": [{"id": "bill", "metric": "revenue_usd", "window": "month", "limit": 20, "thresholds": [100],
                    "hard_cap": 150}],
        "rate_card": CANDIDATES.plans["usage"].rate_card.model_dump()}}})
    _, outcome = compare(CURRENT, candidates_of(capped, "candidates.yaml"), MONTHS)
    assert outcome.overage == D("2.05")   # c's 22.05 of usage, 2.05 above the limit of 20
