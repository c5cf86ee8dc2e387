"""Stage 4: per-tenant usage windows, threshold alerts and quota state.

Counted by event time, in calendar windows keyed explicitly by (tenant, limit, scope value,
window start). Faust's own windowed tables are not used: they expire windows on the wall clock
(faust/tables/base.py, ``_del_old_keys`` calls ``window.stale(timestamps[0], time.time())``), so
a window of old event times would vanish before its usage was complete. Three mappings
(``QuotaTables``) hold the state — in the worker the changelogged tables of
``streams.runtime.state`` (restored on restart or rebalance), as seen from the partition of the
event being applied; in tests plain dicts. Each entry holds Python values (``Decimal``,
``datetime``); ``restore_entry`` turns an entry read back from the changelog into them:

- ``windows[window key]``: the running usage of one window, the last source offset counted
  into it, and, once one is, the thresholds crossed so far;
- ``tenants[tenant]``: the tenant's watermark (latest event time seen), its open windows (key →
  window end) and the earliest time one of them expires.

Exactly once per window, across restarts, rebalances and replays: the source partition is
keyed by tenant, so one worker owns a tenant's windows and sees its events in offset order.
An event at or below a window's last counted offset was counted before the restart and is
skipped; if it is the event that crossed a threshold, its alert is sent again with the same
``alert_id`` (the first sending may not have reached Kafka), which consumers deduplicate.

A usage event sent twice by its producer (the same tenant and ``event_id`` at another offset)
counts once: ``seen`` remembers where each event was first counted for ``dedup_seconds``
(plans.yaml, wall clock), and a later copy is reported as a duplicate and not counted. ``seen``
holds the events of one partition, one wall-clock second and one batch together, as one entry
``"<partition>:<second>:<first offset>"`` → ``{"p", "t", "events": {"tenant\x1fevent id": offset}}``,
so the changelog carries one record per group, written once, not one per event (one per event
would be most of the changelog's records); groups expire whole, in arrival order, from a
per-partition queue. The queue and an index by event are rebuilt
from the table the first time a partition is processed after a start or a rebalance.

A late event counts toward its own window while the window is within the grace period
(window end + grace > the tenant's watermark); later than that it is flagged ``late`` and
counted in the ledger only. Windows past their grace period are deleted as the watermark moves.
"""

from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, NamedTuple
from zoneinfo import ZoneInfo

from schemas.attributed import AttributedUsage
from schemas.quota import QuotaAlert, QuotaState, Status, alert_id, state_key
from streams.stages import revenue as revenue_stage
from streams.stages.plans import Limit, Plans, WatermarkBound, WindowKind, window_bounds
from streams.stages.revenue import UNRATED, RevenueMeter, RevenueOutcome

_ONE = Decimal(1)
_ZERO = Decimal(0)
#: Entries kept by each of the quota engine's look-up memos (tenant → plan, window → reference).
_MEMO_SIZE = 50_000


class QuotaTables(NamedTuple):
    """The quota stage's state: window key → window; tenant → watermark and open windows; seen
    events; tenant → its open billing periods (``streams.stages.revenue``)."""

    quota_windows: MutableMapping[str, dict[str, Any]]
    quota_tenants: MutableMapping[str, dict[str, Any]]
    quota_seen: MutableMapping[str, dict[str, Any]]
    rating_periods: MutableMapping[str, dict[str, Any]]


def restore_entry(table: str, entry: dict[str, Any]) -> dict[str, Any]:
    """An entry as read back from the changelog (JSON, decimals and times as text), as the quota
    stage keeps it in memory."""
    if table == "quota_windows":
        entry["usage"] = Decimal(entry["usage"])
        if "revenue" in entry:  # a margin window
            entry["revenue"], entry["cost"] = Decimal(entry["revenue"]), Decimal(entry["cost"])
    elif table == "rating_periods":
        return revenue_stage.restore_entry(entry)
    elif table == "quota_tenants":
        entry["watermark"] = datetime.fromisoformat(entry["watermark"])
        expiry = entry.get("next_expiry")
        entry["next_expiry"] = datetime.fromisoformat(expiry) if expiry is not None else None
    elif "events" not in entry:
        raise ValueError("a dedup entry without its events")
    return entry


class Bounds(NamedTuple):
    """A calendar window's [start, end), both as the text they are stored as, and when the window
    expires (its end + the grace period)."""

    start: datetime
    end: datetime
    start_text: str
    end_text: str
    expires: datetime

    @classmethod
    def of(cls, kind: WindowKind, at: datetime, zone: ZoneInfo, grace: timedelta) -> Bounds:
        start, end = window_bounds(kind, at, zone)
        return cls(start, end, start.isoformat(), end.isoformat(), end + grace)


class WindowRef(NamedTuple):
    """One tenant × limit × scope window, and its table key. (A named tuple, not a frozen
    dataclass: one is built for each new window, and a frozen dataclass, which sets each field
    through ``object.__setattr__``, costs about three times as much to build.)"""

    key: str
    tenant: str
    limit: Limit
    scope_value: str
    start: datetime
    end: datetime
    #: Its ``quota.state`` key (``schemas.quota.state_key``), built once per window, not per state sent.
    state_key: str

    def state(self, usage: Decimal, as_of: datetime, judged: bool = True, settled: list[str] | None = None) -> QuotaState:
        """The window's ``quota.state`` at ``usage`` (a margin window: its margin percent, and
        ``remaining`` the margin left above the floor), with the reservations it ``settled``."""
        limit = self.limit
        remaining = usage - limit.limit if limit.metric == "margin_percent" else limit.limit - usage
        return QuotaState.from_trusted(dict(
            tenant_id=self.tenant, limit_id=limit.id, metric=limit.metric, scope=limit.scope,
            scope_value=self.scope_value, window_start=self.start, window_end=self.end, usage=usage,
            limit=limit.limit, remaining=max(remaining, _ZERO), status=status_of(limit, usage, judged), as_of=as_of,
            settled=settled or []))


class Counted(NamedTuple):
    """A window an event was counted into, with its usage and ``as_of`` right after the event."""

    ref: WindowRef
    usage: Decimal
    as_of: datetime
    #: A margin window: whether its revenue has reached ``min_revenue`` (always true otherwise).
    judged: bool = True

    def state(self, settled: list[str] | None = None) -> QuotaState:
        return self.ref.state(self.usage, self.as_of, self.judged, settled)


@dataclass
class QuotaOutcome:
    late: bool = False
    duplicate: bool = False
    #: What the event added to its tenant's bill, and in which period (``streams.stages.revenue``).
    rated: RevenueOutcome = UNRATED
    alerts: list[QuotaAlert] = field(default_factory=list)
    #: Each window the event was counted into, with the window's usage and ``as_of`` right after it.
    counted: list[Counted] = field(default_factory=list)
    #: The ``quota.state`` keys of the windows that passed their grace period with this event.
    expired: list[str] = field(default_factory=list)

    @property
    def states(self) -> list[QuotaState]:
        """The quota state of each window the event was counted into, as of this event. (The
        checkpoint publishes only the latest per window and batch, built from ``counted``.)"""
        return [counted.state() for counted in self.counted]




def metric_amount(record: AttributedUsage, limit: Limit, revenue: Decimal | None) -> Decimal:
    metric = limit.metric
    if metric == "cost_usd":
        return record.cost_usd
    if metric == "tokens":
        return Decimal(record.usage.input_tokens + record.usage.output_tokens)
    if metric == "revenue_usd":
        return revenue or _ZERO
    return _ONE


def margin_percent(revenue: Decimal, cost: Decimal) -> Decimal:
    """(revenue − cost) ÷ revenue, in percent to 4 places; 0 while there is no revenue."""
    return ((revenue - cost) * 100 / revenue).quantize(Decimal("0.0001")) if revenue else _ZERO


def window_key(tenant: str, limit_id: str, scope: str, start_text: str) -> str:
    """A window's table key: the JSON array ``[tenant, limit id, scope value, window start]`` as
    ``json.dumps`` writes it, so that it reads back unambiguously. Written out directly when no part
    needs escaping (limit ids and ISO times never do), as ``json.dumps`` would write it."""
    if _plain(tenant) and _plain(scope):
        return f'["{tenant}", "{limit_id}", "{scope}", "{start_text}"]'
    return json.dumps([tenant, limit_id, scope, start_text])


def _plain(text: str) -> bool:
    """Whether ``json.dumps`` writes the text as it is: printable ASCII without quotes or backslashes."""
    return text.isascii() and text.isprintable() and '"' not in text and "\\" not in text


def status_of(limit: Limit, usage: Decimal, judged: bool = True) -> Status:
    """The window's status at ``usage``; a margin window's (``usage`` its margin percent) once
    ``judged`` (its revenue has reached the limit's ``min_revenue``)."""
    if limit.metric == "margin_percent":
        return "soft_cap" if judged and usage < limit.limit else "ok"
    if limit.hard_cap is not None and usage >= limit.limit * limit.hard_cap / 100:
        return "hard_cap"
    if usage >= limit.limit:
        return "soft_cap"
    if limit.levels and usage >= limit.levels[0][2]:
        return "warning"
    return "ok"


class QuotaEngine:
    def __init__(self, plans: Plans, tables: QuotaTables | Callable[[int], QuotaTables],
                 clock: Callable[[], float] = time.time) -> None:
        """``tables``: the state, or the state as seen from a partition (``ChangelogTables.views``)."""
        self.plans = plans
        self.tables: Callable[[int], QuotaTables] = (lambda _: tables) if isinstance(tables, QuotaTables) \
            else tables
        self.clock = clock
        self.bound = WatermarkBound(plans.watermark_lead)
        self.revenue = RevenueMeter(plans)
        self._by_partition: dict[int, QuotaTables] = {}
        self.grace = plans.grace
        self._expiry: dict[int, deque[tuple[float, str]]] = {}
        #: "tenant\x1fevent id" → its group in ``seen`` (which holds its offset), for look-ups.
        self._seen_index: dict[str, dict[str, Any]] = {}
        #: The group each partition's events go into, until the second or the batch ends.
        self._open_groups: dict[int, tuple[str, dict[str, Any]]] = {}
        self._plans: dict[str, tuple[list[Limit], ZoneInfo]] = {}
        self._last_bounds: dict[tuple[str, ZoneInfo], Bounds] = {}
        self._refs: dict[tuple[str, str, str, datetime], WindowRef] = {}

    def forget_partitions(self) -> None:
        """After a rebalance or a restore: rebuild each partition's dedup index and expiry queue from
        the table when next needed."""
        self._expiry.clear()
        self._seen_index.clear()
        self.revenue.forget()
        self._open_groups.clear()
        self._by_partition.clear()

    def end_batch(self) -> None:
        """Events from here on go into new dedup groups: a group is then written to the changelog
        once, with the batch that filled it, instead of again with each batch of its second."""
        self._open_groups.clear()

    def apply(self, record: AttributedUsage, partition: int, offset: int,
              now: datetime | None = None) -> QuotaOutcome:
        """Counts ``record`` (at ``offset`` of ``partition``) into its windows; ``now`` is the
        worker's clock (the batch's), which bounds how far the tenant's watermark moves."""
        tenant = record.tenant_id
        limits, zone = self._plan_of(tenant)
        outcome = QuotaOutcome()
        if not limits and not self.revenue.rates(tenant):
            return outcome
        state = self._by_partition.get(partition)
        if state is None:
            state = self._by_partition[partition] = self.tables(partition)
        windows, tenants = state.quota_windows, state.quota_tenants
        if self._is_duplicate(state.quota_seen, record, partition, offset):
            outcome.duplicate = True
            return outcome
        # Rated before the windows are counted: revenue_usd and margin_percent limits count it.
        outcome.rated = rated = self.revenue.rate(record, state.rating_periods, now)
        revenue, outcome.late = rated.revenue, rated.late
        if not limits:
            return outcome
        at = record.event_time
        grace = self.grace
        moved_to = self.bound.moved_to(at, now)
        tenant_state = tenants.get(tenant)
        if tenant_state is None:
            tenant_state = {"watermark": moved_to, "windows": {}, "next_expiry": None}
        watermark = max(tenant_state["watermark"], moved_to)
        open_windows: dict[str, Any] = tenant_state["windows"]
        next_expiry = tenant_state["next_expiry"]

        for limit in limits:
            bounds = self._bounds(limit.window, at, zone)
            expires = bounds.expires
            if expires <= watermark:
                outcome.late = True
                continue
            ref = self._ref(tenant, limit, limit.scope_value(record.user_id, record.model, record.business_path), bounds)
            key = ref.key
            window = windows.get(key)
            if window is None:
                window = {"usage": _ZERO, "partition": partition, "offset": -1}
            elif window["partition"] == partition and offset <= window["offset"]:
                outcome.alerts.extend(self._replayed_alerts(ref, window, offset))
                continue
            judged, floor = True, limit.metric == "margin_percent"
            if floor:
                if revenue is None:
                    continue  # not rated: nothing to judge the margin by
                window.setdefault("revenue", _ZERO)
                window["revenue"] += revenue
                window["cost"] = window.get("cost", _ZERO) + record.cost_usd
                usage = margin_percent(window["revenue"], window["cost"])
                judged = window["revenue"] >= limit.min_revenue and window["revenue"] > 0
            else:
                usage = window["usage"] + metric_amount(record, limit, revenue)
            for percent, level, amount, name in limit.levels:  # ascending (a margin floor has one)
                if (not judged or usage >= amount) if floor else usage < amount:
                    break
                crossed = window.setdefault("crossed", {})  # (only once a threshold is reached)
                if name not in crossed:
                    crossed[name] = {"offset": offset, "at": at.isoformat(), "usage": str(usage),
                                     "event_id": record.event_id}
                    outcome.alerts.append(_alert(ref, percent, level, usage, at, record.event_id))
            window["usage"] = usage
            window["partition"] = partition
            window["offset"] = offset
            windows[key] = window
            if key not in open_windows:
                open_windows[key] = bounds.end_text  # (one string shared by every window of these bounds)
                if next_expiry is None or expires < next_expiry:
                    next_expiry = expires
            outcome.counted.append(Counted(ref, usage, at, judged))

        if next_expiry is not None and next_expiry <= watermark:  # some window is past its grace period
            next_expiry = None
            for key, end_value in list(open_windows.items()):
                expires = datetime.fromisoformat(end_value) + grace
                if expires <= watermark:
                    windows.pop(key, None)
                    del open_windows[key]
                    outcome.expired.append(_state_key_of(key))
                elif next_expiry is None or expires < next_expiry:
                    next_expiry = expires
        tenant_state["watermark"] = watermark
        tenant_state["next_expiry"] = next_expiry
        tenants[tenant] = tenant_state
        return outcome

    def _plan_of(self, tenant: str) -> tuple[list[Limit], ZoneInfo]:
        found = self._plans.get(tenant)
        if found is None:
            if len(self._plans) >= _MEMO_SIZE:
                self._plans.clear()
            found = self._plans[tenant] = self.plans.for_tenant(tenant)
        return found

    def _bounds(self, kind: WindowKind, at: datetime, zone: ZoneInfo) -> Bounds:
        """The window holding ``at``, remembering the last one per kind and zone: windows do not
        overlap, so an event time inside it is in that window."""
        last = self._last_bounds.get((kind, zone))
        if last is not None and last.start <= at < last.end:
            return last
        bounds = self._last_bounds[(kind, zone)] = Bounds.of(kind, at, zone, self.grace)
        return bounds

    def _ref(self, tenant: str, limit: Limit, scope: str, bounds: Bounds) -> WindowRef:
        """The window's reference (memoized)."""
        ident = (tenant, limit.id, scope, bounds.start)
        ref = self._refs.get(ident)
        if ref is None:
            if len(self._refs) >= _MEMO_SIZE:
                self._refs.clear()
            ref = self._refs[ident] = WindowRef(window_key(tenant, limit.id, scope, bounds.start_text), tenant, limit,
                                                scope, bounds.start, bounds.end,
                                                state_key(tenant, limit.id, scope, bounds.start_text))
        return ref

    def _is_duplicate(self, seen: MutableMapping[str, dict[str, Any]], record: AttributedUsage, partition: int,
                      offset: int) -> bool:
        now = self.clock()
        queue = self._expiry.get(partition)
        if queue is None:
            queue = self._expiry[partition] = self._rebuild_seen(seen, partition)
        horizon = now - self.plans.dedup_seconds
        while queue and queue[0][0] < horizon:
            group_key = queue.popleft()[1]
            group = seen.pop(group_key, None)
            for key in group["events"] if group else ():
                self._seen_index.pop(key, None)
        key = f"{record.tenant_id}\x1f{record.event_id}"
        first = self._seen_index.get(key)
        if first is not None:  # the same record again (same partition and offset) is a replay
            return (first["p"], first["events"][key]) != (partition, offset)
        second = int(now)
        open_group = self._open_groups.get(partition)
        if open_group is None or open_group[1]["t"] != second:
            group_key = f"{partition}:{second}:{offset}"
            group = seen.get(group_key)
            if group is None:
                group = {"p": partition, "t": second, "events": {}}
                queue.append((second, group_key))
            open_group = self._open_groups[partition] = group_key, group
        group_key, group = open_group
        group["events"][key] = offset
        self._seen_index[key] = group
        seen[group_key] = group  # (marks the group changed: its one changelog record, at the batch's end)
        return False

    def _rebuild_seen(self, seen: MutableMapping[str, dict[str, Any]], partition: int) -> deque[tuple[float, str]]:
        """The partition's expiry queue, and its events in the index, from the (restored) table."""
        groups = sorted((group["t"], key) for key, group in seen.items() if group["p"] == partition)
        for _, key in groups:
            group = seen[key]
            for event in group["events"]:
                self._seen_index[event] = group
        return deque(groups)

    def _replayed_alerts(self, ref: WindowRef, window: dict[str, Any], offset: int) -> list[QuotaAlert]:
        again = []
        for percent, level, _, name in ref.limit.levels:
            crossing = window.get("crossed", {}).get(name)
            if crossing and crossing["offset"] == offset:
                again.append(_alert(ref, percent, level, Decimal(crossing["usage"]),
                                    datetime.fromisoformat(crossing["at"]), crossing["event_id"]))
        return again


def _state_key_of(window: str) -> str:
    """The ``quota.state`` key of a window, from its table key (the JSON of its parts)."""
    return state_key(*json.loads(window))


def _alert(ref: WindowRef, percent: Decimal, level: str, usage: Decimal, at: datetime, event_id: str) -> QuotaAlert:
    limit = ref.limit
    return QuotaAlert(
        alert_id=alert_id(ref.tenant, limit.id, ref.scope_value, ref.start, percent), tenant_id=ref.tenant,
        limit_id=limit.id, metric=limit.metric, scope=limit.scope, scope_value=ref.scope_value,
        window_start=ref.start, window_end=ref.end, threshold_percent=percent, level=level, usage=usage,
        limit=limit.limit, crossed_at=at, event_id=event_id)
