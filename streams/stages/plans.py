"""``config/plans.yaml``: plans, their limits, and which tenant is on which plan.

    grace_seconds: 300            # late events within this long after their window count in it
    dedup_seconds: 900            # a copy of an event re-sent within this long counts once
    watermark_lead_seconds: 60    # how far past the worker's clock an event moves its tenant's watermark
    billing_grace_seconds: 86400  # events this long after their billing period still get revenue_usd
    default_plan: free
    tenants:
      acme: {plan: enterprise, time_zone: America/New_York}
    plans:
      free:
        limits:
          - id: daily-spend
            metric: cost_usd      # cost_usd | tokens | requests | revenue_usd | margin_percent
            window: day           # minute | hour | day | month (calendar, in the tenant's time zone)
            limit: 5.00
            thresholds: [50, 80, 100]   # percent of the limit; one alert each per window
            hard_cap: 100               # percent; crossing it blocks (optional)
            scope: tenant               # tenant | user | model | business_path

Validated once at start-up; a mistake stops the start with one line naming the entry.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from functools import cached_property
from pathlib import Path
from typing import Annotated, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field, field_validator, model_validator

from streams.config import Strict, load_model
from streams.stages.rating import RateCard

Metric = Literal["cost_usd", "tokens", "requests", "revenue_usd", "margin_percent"]
WindowKind = Literal["minute", "hour", "day", "month"]
Scope = Literal["tenant", "user", "model", "business_path"]
Level = Literal["warning", "soft_cap", "hard_cap"]
Percent = Annotated[Decimal, Field(gt=0, le=10_000)]
LimitId = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]


class Limit(Strict):
    """A limit on one metric of a tenant's usage in calendar windows.

    ``revenue_usd`` counts what the tenant is billed for its usage (``streams.stages.revenue``): a
    spend cap whose ``hard_cap`` blocks through the enforcer. ``margin_percent`` watches margin
    instead: ``limit`` is a floor in percent, and the window's one alert (level ``soft_cap``) goes
    out when its margin, (revenue − cost) ÷ revenue, is below the floor once its revenue has
    reached ``min_revenue``. It takes no thresholds and no hard cap."""

    id: LimitId
    metric: Metric
    window: WindowKind
    limit: Annotated[Decimal, Field(gt=0)]
    thresholds: list[Percent] = Field(default_factory=lambda: [Decimal(50), Decimal(80), Decimal(100)])
    hard_cap: Percent | None = None
    scope: Scope = "tenant"
    #: ``margin_percent`` only: the revenue a window needs before its margin is judged.
    min_revenue: Annotated[Decimal, Field(ge=0)] = Decimal(0)

    @model_validator(mode="after")
    def _margin_floor(self) -> Limit:
        if self.metric == "margin_percent":
            if self.hard_cap is not None:
                raise ValueError("a margin_percent limit alerts only: remove hard_cap")
            if self.limit > 100:
                raise ValueError("a margin_percent limit is a floor in percent: at most 100")
            if "thresholds" in self.model_fields_set:
                raise ValueError("a margin_percent limit takes no thresholds: it alerts once, below its limit")
        elif self.min_revenue:
            raise ValueError("min_revenue applies to margin_percent limits only")
        return self

    @field_validator("thresholds")
    @classmethod
    def _ascending(cls, thresholds: list[Decimal]) -> list[Decimal]:
        if thresholds != sorted(set(thresholds)):
            raise ValueError("thresholds must be distinct and ascending, e.g. [50, 80, 100]")
        return thresholds

    @cached_property
    def levels(self) -> list[tuple[Decimal, Level, Decimal, str]]:
        """(threshold percent, level, absolute amount, the percent as the text a crossing is
        recorded under: "80", "12.5"), ascending; the hard cap is always one of them. A margin
        floor has one: (the floor, ``soft_cap``, the floor, its text)."""
        if self.metric == "margin_percent":
            return [(self.limit, "soft_cap", self.limit, format(self.limit.normalize(), "f"))]
        points = sorted(set(self.thresholds) | ({self.hard_cap} if self.hard_cap else set()))
        return [(p, self.level_of(p), self.limit * p / 100, format(p.normalize(), "f")) for p in points]

    def scope_value(self, user_id: str | None, model: str, business_path: str | None) -> str | None:
        """The value of this limit's scope for a call (``"*"`` tenant-wide; a call without a user
        counts as ``"(no user)"``); None for a business-path limit when the path is not known."""
        scope = self.scope
        if scope == "tenant":
            return "*"
        if scope == "user":
            return user_id or "(no user)"
        if scope == "model":
            return model
        return business_path

    def level_of(self, percent: Decimal) -> Level:
        if self.hard_cap is not None and percent >= self.hard_cap:
            return "hard_cap"
        return "soft_cap" if percent >= 100 else "warning"


class Plan(Strict):
    limits: list[Limit] = Field(default_factory=list)
    #: What tenants on this plan are charged (``streams.stages.rating``); none: not billed by Costline.
    rate_card: RateCard | None = None

    @field_validator("limits")
    @classmethod
    def _unique_ids(cls, limits: list[Limit]) -> list[Limit]:
        ids = [limit.id for limit in limits]
        if len(ids) != len(set(ids)):
            raise ValueError("limit ids must be unique within a plan")
        return limits

    @model_validator(mode="after")
    def _rated(self) -> Plan:
        for limit in self.limits:
            if limit.metric in ("revenue_usd", "margin_percent") and self.rate_card is None:
                raise ValueError(f"limit {limit.id!r} watches {limit.metric}, which needs the plan to have a rate_card")
        return self


class WatermarkBound:
    """Where an event moves its tenant's watermark (the latest event time seen): to its own time,
    but never past the worker's clock plus ``watermark_lead_seconds``. One event stamped an hour
    ahead (a producer's clock running fast) would otherwise make the next hour's events late for
    every stage that keeps a watermark: counted in no quota window, rated in no billing period,
    and a capped tenant let through."""

    def __init__(self, lead: timedelta) -> None:
        self.lead = lead
        self._now: datetime | None = None
        self._limit = datetime.now(UTC) + lead

    def moved_to(self, at: datetime, now: datetime | None) -> datetime:
        """``now``: the worker's clock (the processor passes its batch's, so the limit is
        computed once per batch); None: read it."""
        limit = self.limit(now)
        return at if at <= limit else limit

    def limit(self, now: datetime | None) -> datetime:
        """The latest time a watermark moves to at ``now`` (None: read the clock). A loop over
        events of one batch asks once and compares each event's time itself (with ``now`` None,
        as outside the worker, the clock is then read once for all of them, not once each)."""
        if now is None or now is not self._now:
            self._now, self._limit = now, (now or datetime.now(UTC)) + self.lead
        return self._limit


class TenantAssignment(Strict):
    plan: str
    time_zone: str = "UTC"

    @field_validator("time_zone")
    @classmethod
    def _known_zone(cls, name: str) -> str:
        try:
            ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {name!r}: use an IANA name such as Europe/Berlin") from None
        return name


class Plans(Strict):
    grace_seconds: Annotated[int, Field(ge=0, le=31 * 86_400)] = 300
    #: How long an event id is remembered to count a re-sent copy once (wall clock).
    dedup_seconds: Annotated[int, Field(ge=0, le=7 * 86_400)] = 900
    #: How far ahead of the worker's clock an event may move its tenant's watermark (event time
    #: seen so far). An event stamped further ahead (a producer's clock running fast) still counts
    #: in its own window, but does not make the tenant's real-time events late.
    watermark_lead_seconds: Annotated[int, Field(ge=0, le=86_400)] = 60
    #: How long after a billing period ends its events are still rated in the stream (event time,
    #: by the tenant's watermark). Later ones are flagged late and rated by the invoice only.
    billing_grace_seconds: Annotated[int, Field(ge=0, le=31 * 86_400)] = 86_400
    default_plan: str | None = None
    default_time_zone: str = "UTC"
    plans: dict[str, Plan] = Field(default_factory=dict)
    tenants: dict[str, TenantAssignment] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _plans_exist(self) -> Plans:
        if self.default_plan is not None and self.default_plan not in self.plans:
            raise ValueError(f"default_plan {self.default_plan!r} is not one of the plans: {', '.join(self.plans)}")
        for tenant, assignment in self.tenants.items():
            if assignment.plan not in self.plans:
                raise ValueError(f"tenant {tenant!r} is on plan {assignment.plan!r}, which is not defined")
        TenantAssignment(plan="-", time_zone=self.default_time_zone)
        return self

    @property
    def grace(self) -> timedelta:
        return timedelta(seconds=self.grace_seconds)

    @property
    def watermark_lead(self) -> timedelta:
        return timedelta(seconds=self.watermark_lead_seconds)

    def plan_of(self, tenant: str) -> tuple[Plan | None, ZoneInfo]:
        """A tenant's plan (None when no plan applies) and the time zone of its windows and periods."""
        assignment = self.tenants.get(tenant)
        plan_name = assignment.plan if assignment else self.default_plan
        zone = assignment.time_zone if assignment else self.default_time_zone
        return (self.plans.get(plan_name) if plan_name else None), _zone(zone)

    def for_tenant(self, tenant: str) -> tuple[list[Limit], ZoneInfo]:
        """The limits that apply to a tenant and the time zone its windows follow."""
        plan, zone = self.plan_of(tenant)
        return (plan.limits if plan else []), zone

    def without_rating(self, keep_cards: bool = False) -> Plans:
        """These plans without the limits that need a rate card, and without rate cards unless
        ``keep_cards`` (``bench/``'s baselines for what rating and those limits cost)."""
        return self.model_copy(update={"plans": {
            name: plan.model_copy(update={"rate_card": plan.rate_card if keep_cards else None, "limits": [
                limit for limit in plan.limits if limit.metric not in ("revenue_usd", "margin_percent")]})
            for name, plan in self.plans.items()}})

    @classmethod
    def from_file(cls, path: Path | None) -> Plans:
        """The plans in ``path``; none (no quotas) when the file does not exist."""
        return load_model(path, cls)


_ZONES: dict[str, ZoneInfo] = {}


def _zone(name: str) -> ZoneInfo:
    zone = _ZONES.get(name)
    if zone is None:
        zone = _ZONES[name] = ZoneInfo(name)
    return zone


def window_bounds(kind: WindowKind, at: datetime, zone: ZoneInfo) -> tuple[datetime, datetime]:
    """The [start, end) of the calendar window holding ``at``, in UTC, for windows in ``zone``."""
    local = at.astimezone(zone)
    if kind == "minute":
        start = local.replace(second=0, microsecond=0).astimezone(UTC)
        return start, start + timedelta(minutes=1)
    if kind == "hour":
        # Floors on the wall clock (zones with half-hour offsets have their own hours); the repeated
        # hour of a DST change is two windows, because the floored time keeps its fold.
        start = local.replace(minute=0, second=0, microsecond=0).astimezone(UTC)
        return start, start + timedelta(hours=1)
    # A day or a month starts at the first of a repeated midnight (``fold=0``): where clocks fall back
    # from 01:00 to 00:00 (Atlantic/Azores, America/Havana), an event in the repeated hour keeps its
    # fold=1, and its day would start an hour after the same day's earlier events' did: two
    # overlapping windows, which window an event went to then depending on which was asked for last.
    if kind == "day":
        start_local = local.replace(hour=0, minute=0, second=0, microsecond=0, fold=0)
        end_local = (start_local + timedelta(days=1, hours=3)).replace(hour=0)  # a DST day has 23 or 25 hours
    else:
        start_local = local.replace(day=1, hour=0, minute=0, second=0, microsecond=0, fold=0)
        end_local = (start_local + timedelta(days=32)).replace(day=1)
    return start_local.astimezone(UTC), end_local.astimezone(UTC)
