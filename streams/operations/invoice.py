"""``costline invoice``: a tenant's bill for one calendar month, rated from the ledger.

The period is the calendar month in the tenant's time zone (plans.yaml). The ledger's calls of
the period are summed per provider, model, business path and feature; each charge of the
tenant's rate card counts the groups it matches; ``streams.stages.rating.rate`` turns those
quantities into the invoice's lines. The cost beside it is the same calls' provider cost.

Beside the bill, the invoice reconciles it with the stream: ``streamed`` is the sum of the
period's ``revenue_usd`` in the ledger (what the stream rated, event by event), ``rated_usage``
the same usage charges rated from the period's totals, unrounded (``rating.usage_amount``), both
to the ledger's 12 places. They are equal unless the card has a volume charge (whose true-up is
their difference) or some of the period's calls were not rated in the stream (``unrated_calls``:
they came after the period closed, or before the plan had a rate card).

``record`` lands an invoice in ClickHouse (``invoices``, ``invoice_lines``; the ``latest_*`` views
read each month's latest issue) through the sink, like every other write.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from clickhouse_connect.driver.client import Client

from streams.errors import CostlineError
from streams.stages.plans import Plans, window_bounds
from streams.stages.pricing import MONEY_QUANTUM
from streams.stages.rating import Rating, Usage, quantities, rate, usage_amount
from streams.storage.query import run_readonly, sql_string, sql_time
from streams.storage.sink import ClickHouseSink, SinkFailed
from streams.storage.tables import INVOICE_LINES, INVOICES, IssuedInvoice, IssuedLine

#: Runs a read-only query and returns its rows (``streams.storage.query.query`` with the settings).
Query = Callable[[str], list[list[Any]]]


class InvoiceRefused(CostlineError):
    """The invoice cannot be made: no rate card applies, or the period is not a month."""


@dataclass(frozen=True)
class Invoice:
    tenant: str
    period: str
    start: datetime
    end: datetime
    rating: Rating
    cost_usd: Decimal
    #: The period's ``revenue_usd`` in the ledger, and how many of its calls have none.
    streamed_usd: Decimal
    unrated_calls: int
    #: The usage charges rated from the period's totals, unrounded, to 12 places.
    rated_usage_usd: Decimal

    @property
    def stream_difference_usd(self) -> Decimal:
        """What the stream's per-event revenue misses of the rating: volume true-ups and unrated calls."""
        return self.rated_usage_usd - self.streamed_usd

    @property
    def total(self) -> Decimal:
        return self.rating.total

    @property
    def margin_usd(self) -> Decimal:
        return self.total - self.cost_usd

    def to_json(self) -> dict[str, Any]:
        """Amounts as decimal strings, for a billing system to import."""
        return {
            "tenant_id": self.tenant, "period": self.period, "currency": "USD",
            "period_start": self.start.isoformat(), "period_end": self.end.isoformat(),
            "lines": [{"id": line.id, "kind": line.kind, "description": line.description,
                       "quantity": format(line.quantity, "f"),
                       "unit_amount": None if line.unit_amount is None else format(line.unit_amount, "f"),
                       "amount_unrounded": format(line.unrounded, "f"), "amount": format(line.amount, "f")}
                      for line in self.rating.lines],
            "total": format(self.total, "f"), "cost_usd": format(self.cost_usd, "f"),
            "margin_usd": format(self.margin_usd, "f"),
            "reconciliation": {
                "streamed_revenue_usd": format(self.streamed_usd, "f"),
                "rated_usage_usd": format(self.rated_usage_usd, "f"),
                "difference_usd": format(self.stream_difference_usd, "f"),
                "unrated_calls": self.unrated_calls,
            },
        }


#: What a period's calls are grouped by to be rated (the fields charges filter on), and what is
#: summed of each group: the invoice and ``costline whatif`` read the ledger alike.
LEDGER_GROUPS = "provider, model, business_path, feature"
LEDGER_SUMS = "count(), sum(input_tokens), sum(output_tokens), sum(cost_usd)"


def usage_group(row: list[Any]) -> tuple[dict[str, str | None], Usage]:
    """A row that starts with ``LEDGER_GROUPS`` then ``LEDGER_SUMS``, as the charges' filters and ``Usage``."""
    provider, model, path, feature, calls, tokens_in, tokens_out, cost = row[:8]
    return ({"provider": provider, "model": model, "business_path": path, "feature": feature or None},
            Usage(Decimal(calls), Decimal(tokens_in), Decimal(tokens_out), Decimal(cost)))


def invoice(plans: Plans, tenant: str, period: str, run_query: Query) -> Invoice:
    plan, zone = plans.plan_of(tenant)
    if plan is None or plan.rate_card is None:
        raise InvoiceRefused(f"tenant {tenant!r} is on no plan with a rate_card in plans.yaml: give its plan one")
    try:
        first = datetime.strptime(period, "%Y-%m").replace(tzinfo=zone)
    except ValueError:
        raise InvoiceRefused(f"period {period!r} is not a month: use YYYY-MM, e.g. 2026-11") from None
    start, end = window_bounds("month", first + timedelta(hours=12), zone)
    rows = run_query(
        f"SELECT {LEDGER_GROUPS}, {LEDGER_SUMS}, sum(revenue_usd), countIf(revenue_usd IS NULL) "
        f"FROM usage WHERE tenant_id = {sql_string(tenant)} AND event_time >= {sql_time(start)} "
        f"AND event_time < {sql_time(end)} GROUP BY {LEDGER_GROUPS}")
    groups = [usage_group(row) for row in rows]
    card = plan.rate_card
    totals = quantities(card, groups)
    return Invoice(tenant, period, start, end, rate(card, totals),
                   cost_usd=sum((usage.cost_usd for _, usage in groups), Decimal(0)),
                   streamed_usd=sum((Decimal(row[8] or 0) for row in rows), Decimal(0)).quantize(MONEY_QUANTUM),
                   unrated_calls=sum(row[9] for row in rows),
                   rated_usage_usd=usage_amount(card, totals).quantize(MONEY_QUANTUM))




#: Attempts at writing an invoice before ``record`` gives up (a worker's own batches retry without end).
_WRITE_ATTEMPTS = 5


def record(sink: ClickHouseSink, bill: Invoice, issued_at: datetime | None = None) -> str:
    """Lands ``bill`` as a new issue of its tenant's month; returns its ``invoice_id`` (derived
    from the tenant, the month and the time of issue, so a retried write collapses into one)."""
    at = issued_at or datetime.now(UTC)
    invoice_id = hashlib.sha256(f"{bill.tenant}\x1f{bill.period}\x1f{at.isoformat()}".encode()).hexdigest()[:24]
    head = IssuedInvoice(invoice_id, bill.tenant, bill.period, bill.start, bill.end, at, "USD", bill.total,
                         bill.cost_usd, bill.margin_usd, bill.streamed_usd, bill.rated_usage_usd, bill.unrated_calls)
    lines = [IssuedLine(invoice_id, bill.tenant, bill.period, at, position, line.id, line.kind, line.description,
                        line.quantity.quantize(MONEY_QUANTUM), line.unit_amount, line.unrounded.quantize(MONEY_QUANTUM),
                        line.amount)
             for position, line in enumerate(bill.rating.lines)]
    # The lines first: an issue whose head row is there is complete.
    if not sink.land([(INVOICE_LINES, lines), (INVOICES, [head])], attempts=_WRITE_ATTEMPTS).result():
        raise SinkFailed("the worker is stopping: record the invoice again once it runs")
    return invoice_id


def issue(sink: ClickHouseSink, plans: Plans, tenant: str, period: str, reader: Client | None = None) -> dict[str, Any]:
    """Rates the month from the ledger (read with ``reader``, by default the sink's), records it,
    and returns the invoice as JSON with its ``invoice_id``."""
    bill = invoice(plans, tenant, period, lambda sql: run_readonly(reader or sink.reader, sql).rows)
    return {"invoice_id": record(sink, bill), **bill.to_json()}
