"""An invoice rated from the ledger on the embedded ClickHouse, and its one-line refusals."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest

from schemas.usage import TokenUsage, UsageEvent
from streams.operations.invoice import InvoiceRefused, invoice
from streams.stages.plans import Plans
from streams.stages.revenue import RevenueMeter
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
    plans = Plans.model_validate(PLANS)
    # Rated as the stream rates them, but for in-3, which (say) came after its period closed.
    meter, periods = RevenueMeter(plans), {}
    outcomes = [meter.rate(row, periods, datetime(2026, 11, 30, 12, tzinfo=UTC)) for row in rows]
    rated = [outcome.revenue for outcome in outcomes]
    rows = [row.model_copy(update={"revenue_usd": out.revenue, "margin_usd": out.revenue - row.cost_usd,
                                   "billing_period": out.period})
            if row.event_id != "in-3" and out.revenue is not None else row
            for row, out in zip(rows, outcomes, strict=True)]
    LEDGER.insert(ch_client, rows, LEDGER.dedup_token(rows))
    reader = connect_readonly(f"chdb://{ch_client.path}")
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
    # The stream rated in-1 (0.01 for the call; its tokens free) and in-2 (1,000 tokens at $5/M):
    # 0.015. Rated from the totals, the usage is 0.029: the 0.014 of in-3, not rated in the stream.
    assert rated[:3] == [Decimal("0.01"), Decimal("0.005"), Decimal("0.014")]
    assert (bill.streamed_usd, bill.rated_usage_usd, bill.stream_difference_usd, bill.unrated_calls) == (
        Decimal("0.015"), Decimal("0.029"), Decimal("0.014"), 1)
    assert bill.to_json()["reconciliation"] == {"streamed_revenue_usd": "0.015000000000",
                                               "rated_usage_usd": "0.029000000000",
                                               "difference_usd": "0.014000000000", "unrated_calls": 1}
    # The margin view groups the stream's revenue by the tenant's own months (out-2 is December's).
    by_period = run_readonly(reader, "SELECT billing_period, calls, revenue_usd, margin_usd, cost_usd "
                                     "FROM margin_by_tenant_period WHERE tenant_id = 'tokyo-co' "
                                     "ORDER BY billing_period").rows
    in_cost = rows[0].cost_usd + rows[1].cost_usd
    assert by_period == [["2026-11", 2, Decimal("0.015"), Decimal("0.015") - in_cost, in_cost],
                         ["2026-12", 1, Decimal("0.01"), Decimal("0.01") - rows[4].cost_usd, rows[4].cost_usd]]
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


def test_a_recorded_invoice_is_its_months_latest_issue_until_it_is_issued_again(ch_client, ch_sink, attribution):
    from streams.operations.invoice import issue, record

    plans = Plans.model_validate(PLANS)
    reader = connect_readonly(f"chdb://{ch_client.path}")
    bill = invoice(plans, "billed-co", "2026-09", lambda sql: run_readonly(reader, sql).rows)
    first = record(ch_sink, bill, issued_at=datetime(2026, 10, 1, tzinfo=UTC))
    assert bill.total == Decimal("15.00")  # no usage: the flat fee and the commitment true-up

    # Usage arrives late; the month is issued again, from the ledger, through the same function.
    rows = [attribution.attribute(UsageEvent(
        event_id=f"sep-{i}", timestamp=datetime(2026, 9, 20, tzinfo=UTC), tenant_id="billed-co", provider="openai",
        model="gpt-4o", service="support", feature="answer", usage=TokenUsage(input_tokens=1_000, output_tokens=10)))
        for i in range(600)]
    LEDGER.insert(ch_client, rows, LEDGER.dedup_token(rows))
    second = issue(ch_sink, plans, "billed-co", "2026-09")

    latest = run_readonly(reader, "SELECT invoice_id, total, unrated_calls FROM latest_invoices "
                                  "WHERE tenant_id = 'billed-co'").rows
    # 600,000 input tokens, 1,000 free: 1,000 at $5/M (0.01) and 598,000 at $4/M (2.39); 600 calls on
    # support/* at 0.01 (6.00); the fee (10.00): 18.40, above the commitment of 15.
    assert latest == [[second["invoice_id"], Decimal("18.40"), 600]]
    lines = run_readonly(reader, "SELECT line_id, amount FROM latest_invoice_lines WHERE tenant_id = 'billed-co' "
                                 "ORDER BY position").rows
    assert lines == [[line["id"], Decimal(line["amount"])] for line in second["lines"]]
    assert sum(amount for _, amount in lines) == Decimal(second["total"]) == Decimal("18.40")
    history = run_readonly(reader, "SELECT invoice_id FROM invoices WHERE tenant_id = 'billed-co' "
                                   "ORDER BY issued_at").rows
    assert history == [[first], [second["invoice_id"]]]
    reader.close()
