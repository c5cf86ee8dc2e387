"""An invoice rated from the ledger on the embedded ClickHouse, and its one-line refusals."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest

from schemas.usage import TokenUsage, UsageEvent
from streams.operations.invoice import InvoiceRefused, invoice
from streams.stages.plans import Plans
from streams.storage.query import connect_readonly, run_readonly
from streams.storage.tables import LEDGER

PLANS = {
    "default_plan": "usage", "tenants": {"tokyo-co": {"plan": "usage", "time_zone": "Asia/Tokyo"}},
    "plans": {"usage": {"rate_card": {
        "flat_fee": "10", "minimum_commitment": "15",
        "charges": [
            {"id": "gpt-4o-input", "metric": "input_tokens", "per": 1_000_000, "price": "graduated",
             "when": {"model": ["gpt-4o*"]}, "free_units": 1_000,
             "tiers": [{"up_to": "0.002", "unit_amount": "5"}, {"unit_amount": "4"}]},
            {"id": "calls", "metric": "requests", "price": "unit", "unit_amount": "0.01",
             "when": {"business_path": ["support/*"]}},
        ]}}, "free": {}},
}


def test_an_invoice_rates_the_months_calls_in_the_tenants_time_zone(ch_client, attribution, tmp_path):
    # Tokyo is UTC+9: its November starts on 31 October at 15:00 UTC.
    calls = [("in-1", datetime(2026, 10, 31, 15, 0, tzinfo=UTC), "gpt-4o", "support"),        # November in Tokyo
             ("in-2", datetime(2026, 11, 15, 0, 0, tzinfo=UTC), "gpt-4o-mini", "search"),
             ("in-3", datetime(2026, 11, 30, 14, 59, tzinfo=UTC), "gpt-4o", "support"),        # still November
             ("out-1", datetime(2026, 10, 31, 14, 59, tzinfo=UTC), "gpt-4o", "support"),       # October in Tokyo
             ("out-2", datetime(2026, 11, 30, 15, 0, tzinfo=UTC), "gpt-4o", "support")]        # December in Tokyo
    rows = [attribution.attribute(UsageEvent(
        event_id=event_id, timestamp=at, tenant_id="tokyo-co", provider="openai", model=model, service=service,
        feature="answer", usage=TokenUsage(input_tokens=1_000, output_tokens=10))) for event_id, at, model, service in calls]
    LEDGER.insert(ch_client, rows, LEDGER.dedup_token(rows))
    reader = connect_readonly(f"chdb://{ch_client.path}")
    plans = Plans.model_validate(PLANS)
    bill = invoice(plans, "tokyo-co", "2026-11", lambda sql: run_readonly(reader, sql).rows)
    assert (bill.start, bill.end) == (datetime(2026, 10, 31, 15, tzinfo=UTC), datetime(2026, 11, 30, 15, tzinfo=UTC))
    # 3,000 input tokens, the first 1,000 free: 1,000 at $5/M (tier 1 up to 2,000) and 1,000 at $4/M.
    # 2 calls on support/*: 0.02. Usage 0.009 + 0.02, flat fee 10: 10.03 (tier lines round to 0.01 each).
    assert [(line.id, line.quantity, line.amount) for line in bill.rating.lines] == [
        ("gpt-4o-input:tier-1", Decimal("0.001"), Decimal("0.01")),
        ("gpt-4o-input:tier-2", Decimal("0.001"), Decimal("0.00")),
        ("calls:unit", Decimal(2), Decimal("0.02")),
        ("flat_fee", Decimal(1), Decimal("10.00")),
        ("commitment", Decimal(1), Decimal("4.97")),
    ]
    assert bill.total == Decimal("15.00")
    cost = sum((r.cost_usd for r in rows[:3]), Decimal(0))
    assert bill.cost_usd == cost and bill.margin_usd == Decimal("15.00") - cost
    assert bill.to_json()["lines"][0] == {
        "id": "gpt-4o-input:tier-1", "kind": "usage", "description": "gpt-4o-input, tier 1", "quantity": "0.001",
        "unit_amount": "5", "amount_unrounded": "0.005", "amount": "0.01"}
    reader.close()


@pytest.mark.parametrize(("tenant", "period", "message"), [
    ("tokyo-co", "November", "period 'November' is not a month: use YYYY-MM"),
    ("someone", "2026-11", None),
])
def test_an_invoice_is_refused_with_one_line(tenant, period, message):
    plans = Plans.model_validate({**PLANS, "default_plan": "free"})
    expected = message or "tenant 'someone' is on no plan with a rate_card in plans.yaml"
    with pytest.raises(InvoiceRefused, match=expected):
        invoice(plans, tenant, period, lambda sql: [])
