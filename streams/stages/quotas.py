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

import bisect
import itertools
import json
import logging
import operator
import time
from collections import Counter, deque
from collections.abc import Callable, MutableMapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import ROUND_CEILING, Decimal
from typing import Any, NamedTuple
from zoneinfo import ZoneInfo

from pydantic_core import to_json

from schemas.attributed import AttributedUsage
from schemas.quota import QuotaAlert, QuotaState, QuotaWindow, Status, alert_id, state_key
from streams.stages import revenue as revenue_stage
from streams.stages.plans import Limit, Plans, WatermarkBound, WindowKind, window_bounds
from streams.stages.revenue import UNRATED, RevenueMeter, RevenueOutcome
from streams.storage.compiled import fast

log = logging.getLogger(__name__)

_ONE = Decimal(1)
_ZERO = Decimal(0)
#: Entries kept by each of the quota engine's look-up memos (tenant → plan, window → reference).
#: Sized like the state kept live (``COSTLINE_LIVE_STATE_ENTRIES``, about 3,000 tenants): a memo of
#: tenants whose state is frozen saves little, and at 50,000 the memos held 40 MB with 100,000 tenants.
_MEMO_SIZE = 20_000
#: Windows remembered per kind and zone (``QuotaEngine._bounds``).
_RECENT_BOUNDS = 4


class QuotaTables(NamedTuple):
    """The quota stage's state: window key → window; tenant → watermark and open windows; seen
    events; tenant → its open billing periods (``streams.stages.revenue``)."""

    quota_windows: MutableMapping[str, dict[str, Any]]
    quota_tenants: MutableMapping[str, dict[str, Any]]
    quota_seen: MutableMapping[str, dict[str, Any]]
    rating_periods: MutableMapping[str, dict[str, Any]]


#: The tables whose entries may be held as their changelog bytes while unused
#: (``streams.runtime.state``): every one but ``quota_seen``, whose groups the engine indexes by
#: identity (``_seen_index``) and which holds a few minutes of events, not an entry per tenant.
#: No entry of these is kept by the engine past the batch that read it.
COLD_TABLES = ("quota_windows", "quota_tenants", "rating_periods")


def tenant_of(table: str, key: str) -> str:
    """The tenant an entry of a cold table belongs to: the group its entries are frozen and thawed
    with (``streams.runtime.state``), so that a tenant's next event thaws all it needs at once."""
    if table != "quota_windows":
        return key  # (quota_tenants and rating_periods are keyed by tenant)
    tenant = key[2:key.index('"', 2)]  # ``window_key``: '["<tenant>", ...'
    return json.loads(key)[0] if "\\" in tenant else tenant  # (escaped by json.dumps: read it back)


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

    def state_json(self, settled: list[str] | None = None) -> bytes:
        """``state(settled).model_dump_json()``, byte for byte, written directly (``fast.state_json``):
        the window's own fields are serialized once per window (``_state_prefix``: pydantic's dump
        of the limit's fields, its serializer for the window's values, so their form cannot
        drift), and only what changes is written per state. Building and
        serializing the model cost 8 µs a state, a window a few events
        (``tests/stages/test_quota_batches.py`` compares the two)."""
        return fast.state_json(self, settled)


def _state_prefix(ref: WindowRef) -> tuple[bytes, bytes, Limit]:
    """A window's ``quota.state`` JSON up to its usage, what stays the same between its usage and its
    remaining amount (the limit), and the limit: ``fast.state_json`` memoizes it by the window's key
    (tenant, limit id, scope value, start) and its limit, the object. The limit (of one plans file)
    fixes the rest (metric, scope, the window's kind and so its end in the tenant's zone, the
    amount), and two engines of one process with other plans have other limits; by its id, as
    hashing a time and a decimal for each state cost more than writing the rest: the memo holds the
    limit, so no other object can take that id meanwhile.

    The window's own four values are written into its limit's ``_window_template`` by
    ``pydantic_core.to_json``, the serializer the model uses for a ``str`` and a ``datetime`` field:
    1.8 µs a window, where validating and dumping a ``QuotaWindow`` took 6.1. A new window is made
    for each tenant's first event in it, so with many tenants (or a backlog spanning many minutes)
    this ran for most events. ``tests/stages/test_quota_batches.py`` holds the states to the model's
    own JSON, byte for byte; ``test_state_prefix_is_the_models_json`` holds this to the model."""
    limit = ref.limit
    if type(ref.tenant) is not str or type(ref.scope_value) is not str:  # (as ``QuotaWindow`` would refuse them)
        raise TypeError(f"a quota window's tenant and scope value must be strings: {ref.tenant!r}, {ref.scope_value!r}")
    pieces, middle = _window_template(limit)
    return (b"".join((pieces[0], to_json(ref.tenant), pieces[1], to_json(ref.scope_value), pieces[2],
                      to_json(ref.start), pieces[3], to_json(ref.end), pieces[4])), middle, limit)


#: Stand-ins for a window's own values in its limit's template: texts no tenant, scope value or
#: time is written as (private-use characters around a digit; a time in the year 1).
_HOLES = {"tenant_id": "\ue000 0 \ue000", "scope_value": "\ue000 1 \ue000",
          "window_start": datetime(1, 1, 1, tzinfo=UTC), "window_end": datetime(1, 1, 2, tzinfo=UTC)}
#: id(limit) → (limit, its ``_window_template``); the limit held, so that its id is not reused.
_TEMPLATES: dict[int, tuple[Limit, tuple[tuple[bytes, ...], bytes]]] = {}


def _window_template(limit: Limit) -> tuple[tuple[bytes, ...], bytes]:
    """``QuotaWindow``'s JSON for ``limit``'s windows in the pieces around its four per-window values
    (``_HOLES``'s order: the model's field order), the last ending with the state's usage key; and
    the state's fixed middle, the limit's amount. Cut from the model's own dump, so the form of every
    fixed field follows the model."""
    found = _TEMPLATES.get(id(limit))
    if found is not None:
        return found[1]
    dumped = QuotaWindow.model_construct(limit_id=limit.id, metric=limit.metric, scope=limit.scope,
                                         **_HOLES).model_dump_json().encode()
    pieces: list[bytes] = []
    rest = dumped[:-1]  # (without its closing brace: the state's own fields follow)
    for value in _HOLES.values():
        head, hole, rest = rest.partition(to_json(value))
        if not hole:
            raise AssertionError(f"a quota window's JSON changed form: {dumped!r}")  # (at the first state)
        pieces.append(head)
    pieces.append(rest + b',"usage":"')
    template = tuple(pieces), b'","limit":"' + format(limit.limit, "f").encode() + b'","remaining":"'
    if len(_TEMPLATES) >= _MEMO_SIZE:
        _TEMPLATES.clear()
    _TEMPLATES[id(limit)] = limit, template
    return template


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




class EventOutcome(NamedTuple):
    """What ``QuotaEngine.apply_batch`` decided for one event."""

    duplicate: bool = False
    late: bool = False
    rated: RevenueOutcome = UNRATED


_UNCOUNTED = EventOutcome()
_DUPLICATE = EventOutcome(duplicate=True)


@dataclass
class BatchOutcome:
    """What a batch of events did to the quota windows, in the order the events one by one
    (``apply``) would have produced it."""

    #: Per event, in the order given.
    events: list[EventOutcome]
    alerts: list[QuotaAlert]
    #: The latest count of each window counted into, by window key, in the order first counted.
    counted: dict[str, Counted]
    #: The reservations whose calls were counted into each window, by window key.
    settled: dict[str, list[str]]
    #: The ``quota.state`` keys of the windows that passed their grace period.
    expired: list[str]
    #: The positions of the events whose counting failed (a bug: logged, counted as quota errors).
    failed: list[int]


class _Collected:
    """A batch's results, each with the place ``apply`` event by event would have put it: (position
    of the event in the batch, then its order within that event)."""

    def __init__(self, size: int) -> None:
        self.events = [_UNCOUNTED] * size
        self.alerts: list[tuple[tuple[int, int, int], QuotaAlert]] = []
        self.counted: dict[str, Counted] = {}
        #: Where each window's first counted event is, and its first event on a reservation.
        self.counted_first: dict[str, tuple[int, int]] = {}
        self.settled: dict[str, list[str]] = {}
        self.settled_first: dict[str, tuple[int, int]] = {}
        self.expired: list[tuple[tuple[int, int], str]] = []
        self.failed: list[int] = []

    def outcome(self) -> BatchOutcome:
        # (Sorted by keys read in C, ``itemgetter`` and a dict's ``__getitem__``: with a window per
        # event, as with 100,000 distinct tenants, a key function in Python cost 3 µs an event.)
        counted, settled = self.counted, self.settled
        return BatchOutcome(
            self.events, [alert for _, alert in sorted(self.alerts, key=_FIRST)],
            {key: counted[key] for key in sorted(counted, key=self.counted_first.__getitem__)},
            {key: settled[key] for key in sorted(settled, key=self.settled_first.__getitem__)},
            [key for _, key in sorted(self.expired, key=_FIRST)], self.failed)

    def add_outcome(self, position: int, outcome: QuotaOutcome, reservation: str | None) -> None:
        """One event counted by ``apply``'s own code (``QuotaEngine._count``)."""
        self.events[position] = EventOutcome(False, outcome.late, outcome.rated)
        if outcome.alerts:
            self.alerts.extend(((position, k, 0), alert) for k, alert in enumerate(outcome.alerts))
        if outcome.expired:
            self.expired.extend(((position, k), key) for k, key in enumerate(outcome.expired))
        reservations = [reservation] if reservation is not None else []
        for k, counted in enumerate(outcome.counted):
            self.count(counted.ref.key, (position, k), counted, reservations, (position, k))

    def count(self, key: str, order: tuple[int, int], counted: Counted, reservations: list[str],
              reserved_order: tuple[int, int] | None) -> None:
        """A window's latest count (``order``: where its first event is), and the reservations of
        the events counted into it (``reserved_order``: where the first of them is)."""
        first = self.counted_first.get(key)
        if first is None or order < first:
            self.counted_first[key] = order
        self.counted[key] = counted
        if reservations:
            found = self.settled.get(key)
            if found is None:
                self.settled[key] = list(reservations)
                self.settled_first[key] = reserved_order
            else:
                found.extend(reservations)


_FIRST = operator.itemgetter(0)
_NOTHING_EXPIRED: list[tuple[int, datetime, str]] = []  # (never appended to: returned for reading only)


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
    return ((revenue - cost) * 100 / revenue).quantize(_PERCENT_PLACES) if revenue else _ZERO


_PERCENT_PLACES = Decimal("0.0001")


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
        self._last_bounds: dict[tuple[str, ZoneInfo], list[Bounds]] = {}
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
        if not limits and not self.revenue.rates(tenant):
            return QuotaOutcome()
        state = self._state(partition)
        if self._is_duplicate(state.quota_seen, record, partition, offset):
            return QuotaOutcome(duplicate=True)
        return self._count(record, partition, offset, now, limits, zone, state)

    def _state(self, partition: int) -> QuotaTables:
        state = self._by_partition.get(partition)
        if state is None:
            state = self._by_partition[partition] = self.tables(partition)
        return state

    def _count(self, record: AttributedUsage, partition: int, offset: int, now: datetime | None,
               limits: list[Limit], zone: ZoneInfo, state: QuotaTables) -> QuotaOutcome:
        """``apply`` after the duplicate check: one event into its billing period and its windows."""
        outcome = QuotaOutcome()
        tenant = record.tenant_id
        windows, tenants = state.quota_windows, state.quota_tenants
        # Rated before the windows are counted: revenue_usd and margin_percent limits count it.
        outcome.rated = rated = self.revenue.rate(record, state.rating_periods, now)
        revenue, outcome.late = rated.revenue, rated.late
        if not limits:
            return outcome
        at = record.event_time
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
            # (``fast.count_windows`` makes a new window, and ``fast.stored_windows`` tells a replay,
            # as these lines do: change them together.)
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

        tenant_state["next_expiry"] = next_expiry
        outcome.expired.extend(key for _, _, key in self._close_expired(windows, tenant_state, watermark))
        tenants[tenant] = tenant_state
        return outcome

    def _close_expired(self, windows: MutableMapping[str, dict[str, Any]], tenant_state: dict[str, Any],
                       watermark: datetime) -> list[tuple[int, datetime, str]]:
        """Moves the tenant's watermark to ``watermark`` and deletes its windows past their grace
        period there; returns each deleted window's place among the tenant's open windows, its
        expiry and its ``quota.state`` key. ``tenant_state["next_expiry"]`` (the earliest expiry of
        its open windows) makes the usual call a comparison."""
        tenant_state["watermark"] = watermark
        next_expiry = tenant_state["next_expiry"]
        if next_expiry is None or next_expiry > watermark:
            return _NOTHING_EXPIRED
        open_windows: dict[str, Any] = tenant_state["windows"]
        grace, expired, next_expiry = self.grace, [], None
        for k, (key, end_value) in enumerate(list(open_windows.items())):
            expires = datetime.fromisoformat(end_value) + grace
            if expires <= watermark:
                if key in windows:  # (not ``pop``: a frozen window would be read back only to be dropped)
                    del windows[key]
                del open_windows[key]
                expired.append((k, expires, _state_key_of(key)))
            elif next_expiry is None or expires < next_expiry:
                next_expiry = expires
        tenant_state["next_expiry"] = next_expiry
        return expired

    def apply_batch(self, records: Sequence[AttributedUsage], partitions: Sequence[int], offsets: Sequence[int],
                    now: datetime | None = None) -> BatchOutcome:
        """``apply`` for a whole batch (records in offset order per partition), with the same
        outcome, the same state and the same alerts in the same order, for a fraction of the work.

        Each window is counted once per batch instead of once per event: its events' amounts are
        summed (a running sum only where a threshold may be crossed, to find the event that
        crossed it), its state written once, its ``Counted`` made once. The duplicate check and
        the rating stay per event, in the same order as ``apply``'s. A tenant's events that replay
        offsets already counted (after a restore) are counted by ``apply``'s own code, event by
        event (``_count``). ``tests/stages/test_quota_batches.py`` holds both to the same results."""
        collected = _Collected(len(records))
        groups: dict[tuple[int, str], list[int]] = {}
        # The duplicate check with the clock read once a batch: each partition's expired groups are
        # dropped before its first event, and the group its events go into is marked changed with
        # the first of them that goes into it (``_seen_before``: the changelog writes the group as
        # it is at the drain). With ``dedup_seconds`` of a second or more, a group opened at the
        # batch's second cannot expire within the batch, so this is ``_is_duplicate`` event by event
        # at that clock. With 0 it could (the open group expires as soon as the clock has a
        # fraction): then the expiry and the marking are event by event, still at the batch's clock.
        # (In C: ``fast.sort_copies``, with ``_seen_before``'s own steps.)
        fast.sort_copies(self, records if isinstance(records, list) else list(records), partitions, offsets,
                         self.clock(), collected.events, _DUPLICATE, groups)
        # A tenant whose events came from more than one partition (a producer keyed them otherwise)
        # shares its windows between them: its events are counted one by one, in the batch's order,
        # as ``apply`` interleaves them.
        spread = [tenant for tenant, count in Counter(tenant for _, tenant in groups).items() if count > 1]
        for tenant in spread:
            positions = sorted(p for (_, t), ps in groups.items() if t == tenant for p in ps)
            limits, zone = self._plan_of(tenant)
            for position in positions:
                self._count_one(position, records[position], partitions[position], offsets[position], now, limits,
                                zone, collected)
        for (partition, tenant), positions in groups.items():
            if spread and tenant in spread:
                continue
            if len(positions) == 1:  # one event: nothing to sum, and the event's own path is shorter
                position = positions[0]
                limits, zone = self._plan_of(tenant)
                self._count_one(position, records[position], partition, offsets[position], now, limits, zone,
                                collected)
                continue
            try:
                self._count_group(tenant, partition, positions, records, offsets, now, collected)
            except Exception:  # noqa: BLE001 - a bug in one tenant's counting must not stop the stream
                log.exception("quota update failed for tenant %r, partition %s (%d events)", tenant, partition,
                              len(positions))
                collected.failed.extend(positions)
        return collected.outcome()

    def _count_one(self, position: int, record: AttributedUsage, partition: int, offset: int, now: datetime | None,
                   limits: list[Limit], zone: ZoneInfo, collected: _Collected) -> None:
        """One event of a batch (at ``position``) by ``apply``'s own code."""
        try:
            outcome = self._count(record, partition, offset, now, limits, zone, self._state(partition))
        except Exception:  # noqa: BLE001 - as in the processor: the event still reaches the ledger
            log.exception("quota update failed for %s[%s]@%s", record.tenant_id, partition, offset)
            collected.failed.append(position)
        else:
            collected.add_outcome(position, outcome, record.reservation_id)

    def _count_group(self, tenant: str, partition: int, positions: list[int], records: Sequence[AttributedUsage],
                     offsets: Sequence[int], now: datetime | None, collected: _Collected) -> None:
        """One tenant's events of one partition in a batch (not duplicates), in offset order."""
        limits, zone = self._plan_of(tenant)
        state = self._state(partition)
        events = collected.events
        if not limits:
            group = [records[position] for position in positions]
            for position, rated in zip(positions, self.revenue.rate_all(group, state.rating_periods, now), strict=True):
                events[position] = EventOutcome(False, rated.late, rated)
            return
        windows, tenants = state.quota_windows, state.quota_tenants
        tenant_state = tenants.get(tenant)
        watermark_limit = self.bound.limit(now)  # (``WatermarkBound.moved_to``, for the group at once)
        # The group's records, their times, the tenant's watermark after each (``apply`` moves it
        # before counting the event) and their reservations.
        group, times, marks, reservations, reserving = fast.group_marks(
            records, positions, watermark_limit, tenant_state["watermark"] if tenant_state is not None else None)
        # Each limit's windows, with their events (by index in ``group``); an event is late for a
        # window past its grace period at the event's watermark (in C, through the engine's memos).
        late = [False] * len(group)
        by_limit = fast.group_windows(self, tenant, limits, zone, group, times, marks, late)
        # The group's windows, read once: rating, between this and ``count_windows``, cannot change
        # which object the table holds for them (the tenant's entries of every table are thawed
        # together, by ``tenants.get`` above; they are frozen only at the batch's drain; no key
        # belongs to two limits, whose ids are unique in a plan).
        stored = fast.stored_windows(by_limit, windows, partition, offsets, positions)
        if stored is None:
            # A window that already counted one of these offsets (a replay after a restore): the events
            # go through ``apply``'s own code, which sends a replayed crossing's alert again.
            for position in positions:
                self._count_one(position, records[position], partition, offsets[position], now, limits, zone,
                                collected)
            return
        rated = self.revenue.rate_all(group, state.rating_periods, now)
        fast.fill_outcomes(events, positions, rated, late)
        if tenant_state is None:
            tenant_state = {"watermark": marks[0], "windows": {}, "next_expiry": None}
        open_windows: dict[str, Any] = tenant_state["windows"]
        next_expiry = tenant_state["next_expiry"]
        opened: list[tuple[int, int, str, str, datetime]] = []
        # Each window's usage after its events, written back, and given to ``collected`` (in C).
        fast.count_windows(self, limits, by_limit, stored, windows, partition, offsets, positions, group, rated,
                           reservations, reserving, collected, open_windows, opened)
        for _, _, key, end_text, expires in sorted(opened):  # in the order ``apply`` opens them
            open_windows[key] = end_text
            if next_expiry is None or expires < next_expiry:
                next_expiry = expires
        tenant_state["next_expiry"] = next_expiry
        for k, expires, state_key_ in self._close_expired(windows, tenant_state, marks[-1]):
            # ``apply`` drops it with the first event whose watermark reaches its expiry.
            collected.expired.append(((positions[bisect.bisect_left(marks, expires)], k), state_key_))
        tenants[tenant] = tenant_state

    def _sum_window(self, ref: WindowRef, window: dict[str, Any], js: list[int], group: Sequence[AttributedUsage],
                    rated: list[RevenueOutcome], positions: list[int], offsets: Sequence[int], li: int,
                    collected: _Collected) -> Decimal:
        """A cost, token, request or revenue window's usage after its events; the thresholds they
        crossed, each at the first event whose running usage reached it (as ``apply`` finds it)."""
        metric = ref.limit.metric
        if metric == "cost_usd":
            amounts = [group[j].cost_usd for j in js]
        elif metric == "tokens":
            amounts = [Decimal(group[j].usage.input_tokens + group[j].usage.output_tokens) for j in js]
        elif metric == "revenue_usd":
            amounts = [rated[j].revenue or _ZERO for j in js]
        else:
            amounts = [_ONE] * len(js)
        running = list(itertools.accumulate(amounts, initial=window["usage"]))
        levels = ref.limit.levels
        crossed = window.get("crossed")
        if levels and (crossed is None or any(level[3] not in crossed for level in levels)):
            # (By name: a window restored under a plan whose thresholds changed can hold crossings
            # of thresholds the plan no longer has, and not yet those it has now.)
            highest = max(running[1:])  # (not the last: right whatever the amounts' signs)
            for k, (_, _, amount, name) in enumerate(levels):
                if highest < amount:
                    break
                if crossed is None:
                    crossed = window["crossed"] = {}
                if name in crossed:
                    continue
                i = next(i for i, usage in enumerate(running) if i and usage >= amount)
                self._crossed(ref, window, crossed, k, amount, running[i], group[js[i - 1]],
                              positions[js[i - 1]], offsets, li, collected)
        return running[-1]

    def _margin_window(self, ref: WindowRef, window: dict[str, Any], js: list[int],
                       group: Sequence[AttributedUsage], rated: list[RevenueOutcome], positions: list[int],
                       offsets: Sequence[int], li: int, collected: _Collected) -> tuple[Decimal, bool]:
        """A margin window after its (rated) events: its margin percent and whether it is judged;
        its floor's crossing, at the first judged event below it. Event by event, as the margin
        moves both ways."""
        limit = ref.limit
        revenue, cost = window.setdefault("revenue", _ZERO), window.setdefault("cost", _ZERO)
        percent, level, amount, name = limit.levels[0]
        crossed = window.get("crossed")
        watching = crossed is None or name not in crossed
        minimum = limit.min_revenue
        for j in js:
            revenue += rated[j].revenue
            cost += group[j].cost_usd
            if watching and revenue >= minimum and revenue > 0:  # judged: then its margin is computed
                usage = margin_percent(revenue, cost)
                if usage < amount:
                    crossed = window.setdefault("crossed", {})
                    self._crossed(ref, window, crossed, 0, amount, usage, group[j], positions[j], offsets, li,
                                  collected)
                    watching = False
        window["revenue"], window["cost"] = revenue, cost
        return margin_percent(revenue, cost), revenue >= minimum and revenue > 0

    @staticmethod
    def _crossed(ref: WindowRef, window: dict[str, Any], crossed: dict[str, Any], k: int, amount: Decimal,
                 usage: Decimal, record: AttributedUsage, position: int, offsets: Sequence[int], li: int,
                 collected: _Collected) -> None:
        percent, level, _, name = ref.limit.levels[k]
        at = record.event_time
        crossed[name] = {"offset": offsets[position], "at": at.isoformat(), "usage": str(usage),
                         "event_id": record.event_id}
        collected.alerts.append(((position, li, k), _alert(ref, percent, level, usage, at, record.event_id)))

    def _plan_of(self, tenant: str) -> tuple[list[Limit], ZoneInfo]:
        found = self._plans.get(tenant)
        if found is None:
            if len(self._plans) >= _MEMO_SIZE:
                self._plans.clear()
            found = self._plans[tenant] = self.plans.for_tenant(tenant)
        return found

    def _bounds(self, kind: WindowKind, at: datetime, zone: ZoneInfo) -> Bounds:
        """The window holding ``at``, remembering the last few per kind and zone (windows do not
        overlap, so an event time inside one is in that window). A few, not one: the batch path
        goes tenant by tenant, each from its earliest event, so a batch that spans a minute's turn
        asks for the two minutes by turns (computing a window costs about 2 µs). (In C:
        ``fast.bounds_of``.)"""
        return fast.bounds_of(self._last_bounds, kind, at, zone, self.grace)

    def _ref(self, tenant: str, limit: Limit, scope: str, bounds: Bounds) -> WindowRef:
        """The window's reference (memoized; in C: ``fast.window_ref``)."""
        return fast.window_ref(self._refs, tenant, limit, scope, bounds)

    def _is_duplicate(self, seen: MutableMapping[str, dict[str, Any]], record: AttributedUsage, partition: int,
                      offset: int) -> bool:
        """Whether ``record`` (at ``offset`` of ``partition``) is a copy of an event counted within
        ``dedup_seconds``; if not, it is remembered (in the partition's open group of ``seen``)."""
        now = self.clock()
        queue = self._expire_seen(seen, partition, now)
        return self._seen_before(seen, record, partition, offset, int(now), queue, None)

    def _expire_seen(self, seen: MutableMapping[str, dict[str, Any]], partition: int,
                     now: float) -> deque[tuple[float, str]]:
        """Drops the partition's groups older than ``dedup_seconds`` at ``now``; its expiry queue."""
        queue = self._expiry.get(partition)
        if queue is None:
            queue = self._expiry[partition] = self._rebuild_seen(seen, partition)
        horizon = now - self.plans.dedup_seconds
        while queue and queue[0][0] < horizon:
            group_key = queue.popleft()[1]
            group = seen.pop(group_key, None)
            for key in group["events"] if group else ():
                self._seen_index.pop(key, None)
        return queue

    def _seen_before(self, seen: MutableMapping[str, dict[str, Any]], record: AttributedUsage, partition: int,
                     offset: int, second: int, queue: deque[tuple[float, str]], marked: set[int] | None) -> bool:
        """``_is_duplicate`` after the expiry. The group an event goes into is marked changed (its
        changelog record, written as it is at the drain) with each event, or, given ``marked`` (the
        partitions whose open group this ``apply_batch`` call marked already), with the first event
        of the call that goes into it: the partition's later events go into the same open group
        until ``end_batch``."""
        return fast.seen_before(self, seen, record, partition, offset, second, queue, marked)

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


fast.configure_windows(_ZERO, margin_percent, ROUND_CEILING, Counted, EventOutcome)
fast.configure_refs(Bounds, WindowRef, _MEMO_SIZE, _RECENT_BOUNDS, window_key, state_key)
fast.configure_states(_state_prefix, to_json, status_of)


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
