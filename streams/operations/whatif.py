"""``costline whatif``: which plan makes money, on the ledger's real usage.

Each tenant's calls between ``since`` and ``until`` are grouped by billing month (the calendar
month in the tenant's time zone, as for invoices) and by what charges filter on; every candidate
plan's rate card rates every tenant-month with ``rating.rate``, the function invoices use, and
the current plans (``plans.yaml``) rate them as they stand. Nothing is written anywhere. Rated on
whole months, the current plans' figures are the invoices ``costline invoice`` makes
(``tests/operations/test_whatif.py`` checks it); a window that cuts a month rates the calls of the
month inside it (with the whole flat fee).

The figures of a plan, over the tenant-months with at least one call:

- ``revenue``: the bills' totals (rounded lines, as invoiced); ``cost``: the calls' provider cost;
  ``margin`` and ``margin_percent`` (of revenue);
- ``arpu``: revenue per active tenant-month;
- ``effective_discount``: 1 − billed ÷ list, where list rates the same usage on the card without
  its free units, discounts, spend cap and minimum commitment;
- ``overage_share``: the part of revenue billed above the plan's soft cap, its monthly
  tenant-wide ``revenue_usd`` limit (the usage charges over it); None for a plan without one;
- ``negative_margin_tenants``: tenants whose bills over the window are below their cost;
- ``pays_more`` / ``pays_less``: the five tenants whose bill over the window rises, or falls,
  most against the current plans.

Churn is not shown: a replay cannot observe it, and this report shows only what it measured.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from streams.errors import CostlineError
from streams.operations.invoice import LEDGER_GROUPS, LEDGER_SUMS, usage_group
from streams.stages.plans import Plan, Plans
from streams.stages.rating import RateCard, Usage, quantities, rate
from streams.storage.query import sql_string, sql_time

_ZERO = Decimal(0)
#: The comparison's name for the plans in force (plans.yaml).
CURRENT = "current"

Query = Callable[[str], list[list[Any]]]
#: (tenant, month "YYYY-MM") → the month's usage groups.
Months = dict[tuple[str, str], list[tuple[dict[str, str | None], Usage]]]


class WhatIfRefused(CostlineError):
    """The replay cannot run: a candidate without a rate card, or an empty window."""


@dataclass
class Outcome:
    """One plan's figures over the window (see the module docstring)."""

    plan: str
    revenue: Decimal = _ZERO
    cost: Decimal = _ZERO
    list_revenue: Decimal = _ZERO
    overage: Decimal | None = None
    tenant_months: int = 0
    #: tenant → (bills, cost) over the window.
    tenants: dict[str, tuple[Decimal, Decimal]] = field(default_factory=dict)
    pays_more: list[tuple[str, Decimal]] = field(default_factory=list)
    pays_less: list[tuple[str, Decimal]] = field(default_factory=list)

    @property
    def margin(self) -> Decimal:
        return self.revenue - self.cost

    @property
    def margin_percent(self) -> Decimal | None:
        return self.margin / self.revenue * 100 if self.revenue else None

    @property
    def arpu(self) -> Decimal | None:
        return self.revenue / self.tenant_months if self.tenant_months else None

    @property
    def effective_discount(self) -> Decimal | None:
        return 1 - self.revenue / self.list_revenue if self.list_revenue else None

    @property
    def overage_share(self) -> Decimal | None:
        return self.overage / self.revenue if self.overage is not None and self.revenue else None

    @property
    def negative_margin_tenants(self) -> int:
        return sum(1 for bills, cost in self.tenants.values() if bills < cost)

    def to_json(self) -> dict[str, Any]:
        def amount(value: Decimal | None, places: str = "0.01") -> str | None:
            return None if value is None else format(value.quantize(Decimal(places), rounding=ROUND_HALF_UP), "f")

        return {"plan": self.plan, "revenue_usd": amount(self.revenue), "cost_usd": amount(self.cost, "0.000001"),
                "margin_usd": amount(self.margin, "0.000001"), "margin_percent": amount(self.margin_percent, "0.1"),
                "arpu_usd": amount(self.arpu), "list_revenue_usd": amount(self.list_revenue),
                "effective_discount_percent": amount(None if self.effective_discount is None
                                                     else self.effective_discount * 100, "0.1"),
                "overage_share_percent": amount(None if self.overage_share is None else self.overage_share * 100,
                                                "0.1"),
                "tenant_months": self.tenant_months, "negative_margin_tenants": self.negative_margin_tenants,
                "pays_more": [[t, amount(d)] for t, d in self.pays_more],
                "pays_less": [[t, amount(d)] for t, d in self.pays_less]}


def compare(current: Plans, candidates: Mapping[str, Plan], months: Months) -> list[Outcome]:
    """The current plans' outcome, then each candidate's (applied to every tenant), on ``months``."""
    outcomes = [_replay(CURRENT, lambda tenant: current.plan_of(tenant)[0], months)]
    for name, plan in candidates.items():
        outcomes.append(_replay(name, lambda _tenant, plan=plan: plan, months))
    base = outcomes[0].tenants
    for outcome in outcomes[1:]:
        changes = sorted(((tenant, bills - base[tenant][0]) for tenant, (bills, _) in outcome.tenants.items()),
                         key=lambda change: (change[1], change[0]))
        outcome.pays_more = [c for c in reversed(changes[-5:]) if c[1] > 0]
        outcome.pays_less = [c for c in changes[:5] if c[1] < 0]
    return outcomes


def _replay(name: str, plan_of: Callable[[str], Plan | None], months: Months) -> Outcome:
    outcome = Outcome(name)
    listed_cards: dict[int, RateCard] = {}  # (a card's list-price twin, made once per card, not per tenant-month)
    for (tenant, _month), groups in sorted(months.items()):
        plan = plan_of(tenant)
        card = plan.rate_card if plan is not None else None
        cost = sum((usage.cost_usd for _, usage in groups), _ZERO)
        bill = listed = over = _ZERO
        cap = soft_cap(plan) if plan is not None else None
        if card is not None:
            totals = quantities(card, groups)
            rating = rate(card, totals)
            bill = rating.total
            at_list = listed_cards.get(id(card))
            if at_list is None:
                at_list = listed_cards[id(card)] = list_card(card)
            listed = rate(at_list, totals).total  # (the same charges and filters: the same quantities)
            if cap is not None:
                usage = sum((line.amount for line in rating.lines if line.kind not in ("flat_fee", "commitment")),
                            _ZERO)
                over = max(usage - cap, _ZERO)
        outcome.revenue += bill
        outcome.cost += cost
        outcome.list_revenue += listed
        if cap is not None:
            outcome.overage = (outcome.overage or _ZERO) + over
        outcome.tenant_months += 1
        bills, costs = outcome.tenants.get(tenant, (_ZERO, _ZERO))
        outcome.tenants[tenant] = (bills + bill, costs + cost)
    return outcome


def soft_cap(plan: Plan) -> Decimal | None:
    """The plan's soft cap on the month's bill: its tenant-wide monthly ``revenue_usd`` limit (past
    the limit a call is served and flagged overage, whether or not a hard cap lies further on)."""
    caps = [limit.limit for limit in plan.limits
            if limit.metric == "revenue_usd" and limit.window == "month" and limit.scope == "tenant"]
    return min(caps) if caps else None


def list_card(card: RateCard) -> RateCard:
    """The card at list price: no free units, no discounts, no spend cap, no minimum commitment."""
    # (Validated anew, not ``model_copy``: a copy would keep the cached ``Charge.free`` of the original.)
    return RateCard.model_validate({
        **card.model_dump(), "spend_cap": None, "minimum_commitment": None,
        "charges": [{**c.model_dump(), "free_units": _ZERO, "discount_percent": _ZERO} for c in card.charges]})


def ledger_months(current: Plans, since: datetime, until: datetime, run_query: Query,
                  tenants: Iterable[str] | None = None, only: str = "") -> Months:
    """The ledger's usage in [since, until) by tenant, billing month and what charges filter on
    (``only``: one more SQL condition on the ledger, e.g. one demo run's events). Months follow
    each tenant's time zone (plans.yaml): one query per zone in use."""
    if until <= since:
        raise WhatIfRefused(f"--until ({until.isoformat()}) must be after --since ({since.isoformat()})")
    chosen = sorted(set(tenants)) if tenants else None
    zones: dict[str, list[str]] = defaultdict(list)
    for tenant, assignment in current.tenants.items():
        if assignment.time_zone != current.default_time_zone:
            zones[assignment.time_zone].append(tenant)
    elsewhere = [tenant for listed in zones.values() for tenant in listed]
    where = f"event_time >= {sql_time(since)} AND event_time < {sql_time(until)}"
    if chosen is not None:
        where += f" AND tenant_id IN ({', '.join(map(sql_string, chosen))})"
    if only:
        where += f" AND ({only})"
    filters = [(current.default_time_zone,
                f" AND tenant_id NOT IN ({', '.join(map(sql_string, elsewhere))})" if elsewhere else "")]
    filters += [(zone, f" AND tenant_id IN ({', '.join(map(sql_string, listed))})") for zone, listed in zones.items()]
    months: Months = defaultdict(list)
    for zone, in_zone in filters:
        # (The month as text: read through a worker, a date would come back as a string anyway.)
        rows = run_query(f"SELECT tenant_id, formatDateTime(toStartOfMonth(event_time, {sql_string(zone)}), '%Y-%m'), "
                         f"{LEDGER_GROUPS}, "
                         f"{LEDGER_SUMS} FROM usage WHERE {where}{in_zone} GROUP BY tenant_id, 2, {LEDGER_GROUPS}")
        for tenant, month, *group in rows:
            months[(tenant, month)].append(usage_group(group))
    if not months:
        raise WhatIfRefused(f"no calls in the ledger from {since.isoformat()} to {until.isoformat()}"
                            + (f" for {', '.join(chosen)}" if chosen else "") + ": widen --since/--until")
    return dict(months)


def candidates_of(plans: Plans, source: str) -> dict[str, Plan]:
    """The candidate plans of a file in the plans format; each must have a rate card."""
    if not plans.plans:
        raise WhatIfRefused(f"{source} has no plans: list candidates under `plans:` as in config/plans.yaml")
    for name, plan in plans.plans.items():
        if plan.rate_card is None:
            raise WhatIfRefused(f"{source}: plan {name!r} has no rate_card, so it bills nothing: give it one")
        if name == CURRENT:
            raise WhatIfRefused(f"{source}: {CURRENT!r} names the plans in force: give the candidate another name")
    return dict(plans.plans)
