"""``costline report``: cost, revenue and margin of a window as a page of charts.

Every figure comes from the ledger through the query printed under it. Revenue here is the usage
revenue the stream rated per call (``revenue_usd``); flat fees and commitment true-ups are lines
of the invoices (``costline invoice``), and the what-if section rates whole bills. Margin is
revenue less the provider cost of all the window's calls (a call the stream did not rate counts
its cost and no revenue).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from streams.operations.whatif import Outcome
from streams.reports.page import Chart, Section, Table, render
from streams.storage.query import sql_string, sql_time

Query = Callable[[str], list[list[Any]]]
_ZERO = Decimal(0)
#: Bars per chart of tenants, models or paths (the rest are in the ledger).
TOP = 15

#: (Aliases unlike the columns: ClickHouse would read ``revenue_usd`` in the margin as the alias.)
_SUMS = "count() AS calls, sum(cost_usd) AS cost, sum(ifNull(revenue_usd, 0)) AS revenue, revenue - cost AS margin"


def report(run_query: Query, since: datetime, until: datetime, tenant: str | None = None,
           whatif: list[Outcome] | None = None) -> str:
    where = f"event_time >= {sql_time(since)} AND event_time < {sql_time(until)}" + (
        f" AND tenant_id = {sql_string(tenant)}" if tenant else "")
    totals_sql = f"SELECT {_SUMS} FROM usage WHERE {where}"
    calls, cost, revenue, margin = run_query(totals_sql)[0]
    totals = [("total-calls", "calls", f"{int(calls):,}"), ("total-cost", "provider cost (USD)", _money(cost)),
              ("total-revenue", "usage revenue (USD)", _money(revenue)), ("total-margin", "margin (USD)", _money(margin))]
    hourly = until - since <= timedelta(days=3)
    sections = [Section("Over time", [_over_time(run_query, where, hourly), _tenants_over_time(run_query, where, hourly)]),
                Section("Tenants", _tenants(run_query, where)),
                Section("Models and business paths", [_by(run_query, where, "model", "concat(provider, '/', model)"),
                                                      _by(run_query, where, "business-path", "business_path")]),
                Section("Quota alerts", _alerts(run_query, since, until, tenant))]
    if whatif:
        sections.append(Section("What if: the candidate plans on this usage", whatif_items(whatif)))
    scope = f"tenant {tenant}" if tenant else "all tenants"
    return render("Costline: cost, revenue and margin",
                  f"{scope}, {since.isoformat()} to {until.isoformat()} (UTC on the time axis)", totals, sections)


def _over_time(run_query: Query, where: str, hourly: bool) -> Chart:
    """Per UTC day, or per hour for a window of three days or less (a day or two is no line)."""
    bucket, label = _bucket(hourly)
    sql = f"SELECT {bucket} AS {label}, {_SUMS} FROM usage WHERE {where} GROUP BY {label} ORDER BY {label}"
    rows = run_query(sql)
    return Chart("over-time", f"Cost, revenue and margin per {label}", "line",
                 [r[0] for r in rows],
                 [("cost", [r[2] for r in rows]), ("revenue", [r[3] for r in rows]),
                  ("margin", [r[4] for r in rows])], sql)


def _tenants_over_time(run_query: Query, where: str, hourly: bool) -> Chart:
    """The cost of the five costliest tenants over time (a tenant without calls in a bucket: 0)."""
    bucket, label = _bucket(hourly)
    sql = (f"SELECT {bucket} AS {label}, tenant_id, sum(cost_usd) AS cost FROM usage WHERE {where} AND tenant_id IN "
           f"(SELECT tenant_id FROM usage WHERE {where} GROUP BY tenant_id ORDER BY sum(cost_usd) DESC, tenant_id "
           f"LIMIT 5) GROUP BY {label}, tenant_id ORDER BY {label}, tenant_id")
    rows = run_query(sql)
    times = sorted({r[0] for r in rows})
    costs = {(r[0], r[1]): r[2] for r in rows}
    tenants = sorted({r[1] for r in rows})
    return Chart("tenants-over-time", f"Cost per {label} of the five costliest tenants", "line", times,
                 [(tenant, [costs.get((t, tenant), _ZERO) for t in times]) for tenant in tenants], sql)


def _bucket(hourly: bool) -> tuple[str, str]:
    # Times as text from the query itself: read through a worker, every value comes back as text.
    return (("formatDateTime(toStartOfHour(event_time), '%Y-%m-%d %H:%i')", "hour") if hourly
            else ("formatDateTime(toDate(event_time), '%Y-%m-%d')", "day"))


def _tenants(run_query: Query, where: str) -> list[Chart | Table]:
    sql = (f"SELECT tenant_id, {_SUMS} FROM usage WHERE {where} GROUP BY tenant_id "
           f"ORDER BY cost DESC, tenant_id LIMIT {TOP}")
    rows = run_query(sql)
    by_cost = Chart("tenants-by-cost", f"The {TOP} tenants with the highest cost", "bar", [r[0] for r in rows],
                    [("cost", [r[2] for r in rows]), ("revenue", [r[3] for r in rows]),
                     ("margin", [r[4] for r in rows])], sql)
    negative_sql = (f"SELECT tenant_id, {_SUMS} FROM usage WHERE {where} GROUP BY tenant_id HAVING margin < 0 "
                    f"ORDER BY margin, tenant_id LIMIT {TOP}")
    negative = run_query(negative_sql)
    items: list[Chart | Table] = [by_cost]
    if negative:
        items.append(Chart("tenants-negative-margin", "Tenants with a negative margin, lowest first", "bar",
                           [r[0] for r in negative], [("margin", [r[4] for r in negative])], negative_sql))
    items.append(Table("tenants-negative-margin-table", "Tenants with a negative margin",
                       ["tenant", "calls", "cost (USD)", "revenue (USD)", "margin (USD)"],
                       [[r[0], f"{int(r[1]):,}", _money(r[2]), _money(r[3]), _money(r[4])] for r in negative],
                       negative_sql))
    return items


def _by(run_query: Query, where: str, name: str, column: str) -> Chart:
    sql = (f"SELECT {column} AS {name.replace('-', '_')}, {_SUMS} FROM usage WHERE {where} "
           f"GROUP BY {name.replace('-', '_')} ORDER BY cost DESC LIMIT {TOP}")
    rows = run_query(sql)
    return Chart(f"by-{name}", f"Cost, revenue and margin per {name.replace('-', ' ')}", "bar",
                 [r[0] or "(untagged)" for r in rows],
                 [("cost", [r[2] for r in rows]), ("revenue", [r[3] for r in rows]),
                  ("margin", [r[4] for r in rows])], sql)


def _alerts(run_query: Query, since: datetime, until: datetime, tenant: str | None) -> list[Chart | Table]:
    sql = ("SELECT formatDateTime(crossed_at, '%Y-%m-%d %H:%i:%S') AS crossed, tenant_id, limit_id, level, "
           "toUInt32(threshold_percent) AS threshold "
           f"FROM quota_alert_history WHERE crossed_at >= {sql_time(since)} AND crossed_at < {sql_time(until)}"
           + (f" AND tenant_id = {sql_string(tenant)}" if tenant else "") + " ORDER BY crossed")
    rows = run_query(sql)
    table = Table("alerts-table", "Quota alerts", ["crossed at", "tenant", "limit", "level", "threshold"],
                  [[r[0], r[1], r[2], r[3], f"{r[4]}%"] for r in rows], sql)
    if not rows:
        return [table]
    # One series per level: x the crossing times, y the tenants, the hover text the limit.
    levels = sorted({r[3] for r in rows})
    series = [[r for r in rows if r[3] == level] for level in levels]
    chart = Chart("alerts", "Quota alerts over time (hover: the limit and its threshold)", "markers", [],
                  [(level, [f"{r[2]} {r[4]}%" for r in points]) for level, points in zip(levels, series, strict=True)],
                  sql, y_title="tenant", series_x=[[r[0] for r in points] for points in series],
                  y_labels=[[r[1] for r in points] for points in series])
    return [chart, table]


def whatif_items(outcomes: list[Outcome]) -> list[Chart | Table]:
    names = [o.plan for o in outcomes]
    chart = Chart("whatif", "Revenue, cost and margin per plan", "bar", names,
                  [("revenue", [o.revenue for o in outcomes]), ("cost", [o.cost for o in outcomes]),
                   ("margin", [o.margin for o in outcomes])], "")
    rows = []
    for outcome in outcomes:
        figures = outcome.to_json()
        rows.append([outcome.plan, figures["revenue_usd"], figures["cost_usd"], figures["margin_usd"],
                     _percent(figures["margin_percent"]), figures["arpu_usd"] or "",
                     _percent(figures["effective_discount_percent"]), _percent(figures["overage_share_percent"]),
                     str(outcome.negative_margin_tenants)])
    table = Table("whatif-table", "The plans compared", ["plan", "revenue (USD)", "cost (USD)", "margin (USD)",
                                                         "margin %", "ARPU (USD/month)", "effective discount",
                                                         "overage share", "tenants at a loss"], rows)
    return [chart, table]


def _percent(value: str | None) -> str:
    return "" if value is None else f"{value}%"


def _money(value: Decimal | str | None) -> str:
    return format(Decimal(value or _ZERO).quantize(Decimal("0.000001")), "f")
