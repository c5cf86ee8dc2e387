"""Reservations: budget held before a model call, dropped when the stream has counted the call.

The enforcer's decisions trail the stream by a batch or more (100-250 ms), and every caller
that asks within that time sees the same ``allow``: fifty concurrent callers of a tenant one
call below its hard cap all get through. A reservation closes that gap. Before the call the
caller asks for a hold of the call's upper-bound cost (``estimate``); it is granted only if,
for every hard-capped limit of the tenant that the call counts toward,

    usage counted by the stream + live holds + this estimate ≤ the hard cap

and the hold then counts against every later request. The call's usage event carries the
reservation id; the stream lists it in the ``quota.state`` record of each window that counted
the call (``QuotaState.settled``), and the enforcer drops the hold's part on that limit as it
applies that record's usage, after it (``Enforcer._apply``). So at no moment is the call
counted neither as held nor as used; for a moment it may count as both, which only refuses
more. A hold not settled by the end of its lease (a call never made and never released, or its
event late for its window) is dropped then, and counted.

The guarantee: with upper-bound estimates, spend beyond a hard cap is 0; with underestimates it
is at most the sum of (actual − reserved) of the calls in flight.

Pure logic, thread-safe, no I/O: ``Enforcer`` feeds it and serves it over HTTP.
"""

from __future__ import annotations

import heapq
import threading
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import ROUND_CEILING, Decimal, localcontext
from typing import Annotated, Any, NamedTuple, Protocol

from pydantic import Field

from schemas.quota import QuotaState, limit_key
from streams.config import Strict
from streams.stages.plans import Plans, window_bounds
from streams.stages.pricing import MONEY_QUANTUM
from streams.stages.rating import EXACT, RateCard, capped, increment_bound

_ZERO = Decimal(0)
Name = Annotated[str, Field(min_length=1, max_length=256)]


class ReservationRequest(Strict):
    """``POST /v1/reservations``: a call about to be made."""

    tenant_id: Name
    user_id: Name | None = None
    provider: Annotated[str, Field(min_length=1, max_length=64)]
    model: Name
    #: Known only when the caller tags its calls itself; a business-path limit counts only then.
    business_path: Name | None = None
    input_tokens: Annotated[int, Field(ge=0, le=100_000_000)] = 0
    max_tokens: Annotated[int, Field(ge=1, le=10_000_000)] | None = None
    n: Annotated[int, Field(ge=1, le=128)] = 1
    #: The same key returns the same reservation (the middleware uses the call's event id).
    idempotency_key: Annotated[str, Field(min_length=1, max_length=128)]
    lease_s: Annotated[float, Field(gt=0, le=3600)] = 300.0


class Estimate(NamedTuple):
    """The most a call can add to each metric; ``bounded`` False when its model has no known price
    (then ``cost_usd`` is the configured default, which the call may exceed)."""

    cost_usd: Decimal
    tokens: Decimal
    requests: Decimal
    bounded: bool = True
    input_tokens: Decimal = _ZERO
    output_tokens: Decimal = _ZERO

    def of(self, metric: str) -> Decimal | None:
        """The estimate of a metric, or None for one the enforcer cannot bound before the call
        (``revenue_usd`` is bounded from the rate card: ``revenue_bound``)."""
        if metric == "cost_usd":
            return self.cost_usd
        if metric == "tokens":
            return self.tokens
        if metric == "requests":
            return self.requests
        if metric == "input_tokens":
            return self.input_tokens
        if metric == "output_tokens":
            return self.output_tokens
        return None


def revenue_bound(card: RateCard, request: ReservationRequest, estimate: Estimate) -> Decimal:
    """The most a call can add to its tenant's ``revenue_usd``: each charge it may count toward
    (a filter on a field the request does not give, such as the feature, is taken to match) at
    ``rating.increment_bound`` of the estimate's quantity, and no more than the spend cap (the
    period's usage charges never pass it). An unbounded cost estimate makes a cost-plus charge's
    bound a default, not a bound: the answer says so (``bounded``)."""
    call = {"provider": request.provider, "model": request.model, "business_path": request.business_path}
    with localcontext(EXACT):
        bound = sum((increment_bound(charge, estimate.of(charge.metric) or _ZERO) for charge in card.charges
                     if charge.when.matches(call, unknown_matches=True)), _ZERO)
    return capped(card, bound).quantize(MONEY_QUANTUM, rounding=ROUND_CEILING)


#: One window of one limit: (limit key, window start).
WindowId = tuple[str, datetime]


@dataclass
class Hold:
    reservation_id: str
    tenant_id: str
    idempotency_key: str
    expires_at: datetime
    #: What the hold counts against each window until the stream settles it there.
    amounts: dict[WindowId, Decimal]
    answer: dict[str, Any]

    def to_record(self) -> dict[str, Any]:
        """The hold as its journal keeps it (JSON)."""
        return {"reservation_id": self.reservation_id, "tenant_id": self.tenant_id,
                "idempotency_key": self.idempotency_key, "expires_at": self.expires_at.isoformat(),
                "amounts": [[key, start.isoformat(), format(amount, "f")] for (key, start), amount in self.amounts.items()],
                "answer": self.answer}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Hold:
        return cls(record["reservation_id"], record["tenant_id"], record["idempotency_key"],
                   datetime.fromisoformat(record["expires_at"]),
                   {(key, datetime.fromisoformat(start)): Decimal(amount) for key, start, amount in record["amounts"]},
                   record["answer"])


class Journal(Protocol):
    """Where holds are kept durably (``streams.enforcement.journal``)."""

    def __call__(self, reservation_id: str, record: dict[str, Any] | None) -> None:
        """A hold granted (its record, before the grant is answered), or gone (None: settled, released)."""

    def ended(self, reservation_ids: list[str]) -> None:
        """Holds whose lease ended unsettled (never restored once ended: a cheaper record will do)."""


@dataclass
class Counters:
    granted: int = 0
    refused: int = 0
    released: int = 0
    settled: int = 0
    expired: int = 0
    unbounded: int = 0


@dataclass
class ReservationBook:
    """Live holds, and the rule that grants a new one (see the module docstring)."""

    plans: Plans
    #: The stream's counted usage of a window: (limit key, window start) → usage.
    counted: Any
    holds: dict[str, Hold] = field(default_factory=dict)
    counters: Counters = field(default_factory=Counters)
    journal: Journal | None = None
    #: A new reservation's id from its tenant (``EnforcerLayout.reservation_id`` puts the owner's
    #: partition in it, so any enforcer can route its release).
    new_id: Callable[[str], str] = lambda _tenant: uuid.uuid4().hex
    _by_key: dict[tuple[str, str], str] = field(default_factory=dict)
    #: The answers of holds already settled or released, until their lease would have ended: a
    #: retried request (same idempotency key) gets the same reservation, not a second hold.
    _answered: dict[tuple[str, str], tuple[dict[str, Any], datetime]] = field(default_factory=dict)
    _held: dict[WindowId, Decimal] = field(default_factory=dict)
    #: (expiry, reservation id) of every hold and answer kept, earliest first: a request then
    #: ends only the leases that are due, instead of looking at every hold.
    _leases: list[tuple[datetime, str, tuple[str, str]]] = field(default_factory=list)
    #: Holds gone (settled, released) and ended (their lease), not yet journaled.
    _gone: list[str] = field(default_factory=list)
    _ended: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def reserve(self, request: ReservationRequest, estimate: Estimate, now: datetime) -> dict[str, Any]:
        """Grants or refuses a hold; the same idempotency key gets the same answer while its hold
        lives. A new hold is journaled before it is answered."""
        answer, hold = self.grant(request, estimate, now)
        self._write_gone()  # (the leases the grant found ended)
        if hold is not None and self.journal is not None:
            try:  # durable before it is answered: a restarted enforcer must hold it again
                self.journal(hold.reservation_id, hold.to_record())
            except Exception:
                self._undo(hold)
                raise
        return answer

    def _undo(self, hold: Hold) -> None:
        """Takes back a grant that could not be journaled, as if it was never made: no answer kept
        for its key (a retry must be decided again, not told it was granted), no count, no tombstone."""
        with self._lock:
            if self.holds.pop(hold.reservation_id, None) is None:
                return
            self._by_key.pop((hold.tenant_id, hold.idempotency_key), None)
            for window, amount in hold.amounts.items():
                self._unhold(window, amount)
            self.counters.granted -= 1

    def grant(self, request: ReservationRequest, estimate: Estimate, now: datetime) -> tuple[dict[str, Any],
                                                                                              Hold | None]:
        """The rule alone: the answer, and the new hold when one was made (not yet journaled: the
        caller journals it before answering, and releases it when the journal fails)."""
        with self._lock:
            self._expire(now)
            ident = (request.tenant_id, request.idempotency_key)
            known = self._by_key.get(ident)
            if known is not None:
                return self.holds[known].answer, None
            if ident in self._answered:
                return self._answered[ident][0], None
            plan, zone = self.plans.plan_of(request.tenant_id)
            checked, amounts, overage, revenue = [], {}, False, None
            for limit in plan.limits if plan else ():
                scope = limit.scope_value(request.user_id, request.model, request.business_path)
                amount = estimate.of(limit.metric)
                if amount is None and limit.metric == "revenue_usd":  # (a revenue limit has a rate card)
                    amount = revenue = revenue_bound(plan.rate_card, request, estimate) if revenue is None else revenue
                if scope is None or amount is None:  # (amount: None for a metric no call can bound beforehand)
                    continue
                start, end = window_bounds(limit.window, now, zone)
                window = (limit_key(request.tenant_id, limit.id, scope), start)
                counted, held = self.counted(*window), self._held.get(window, _ZERO)
                view = {"limit_id": limit.id, "metric": limit.metric, "scope_value": scope,
                        "window_start": start.isoformat(), "window_end": end.isoformat(),
                        "counted": format(counted, "f"), "held": format(held, "f"), "estimate": format(amount, "f")}
                if limit.hard_cap is not None:
                    cap = limit.limit * limit.hard_cap / 100
                    view.update(hard_cap=format(cap, "f"), remaining=format(max(cap - counted - held, _ZERO), "f"))
                    if counted + held + amount > cap:
                        self.counters.refused += 1
                        return {"granted": False, "tenant_id": request.tenant_id, "refused_by": view,
                                "bounded": estimate.bounded}, None
                if counted + held + amount >= limit.limit:
                    overage = True  # past the soft cap (the limit itself): served, flagged
                amounts[window] = amount
                checked.append(view)
            reservation_id = self.new_id(request.tenant_id)
            expires = now + timedelta(seconds=request.lease_s)
            answer = {"granted": True, "reservation_id": reservation_id, "tenant_id": request.tenant_id,
                      "expires_at": expires.isoformat(), "overage": overage, "bounded": estimate.bounded,
                      "estimate_usd": format(estimate.cost_usd, "f"), "limits": checked}
            hold = Hold(reservation_id, request.tenant_id, request.idempotency_key, expires, amounts, answer)
            self._keep(hold)
            self.counters.granted += 1
            self.counters.unbounded += not estimate.bounded
            return answer, hold

    def release(self, reservation_id: str) -> bool:
        """Drops a hold whose call was never made; False when there is none (settled, expired, unknown)."""
        with self._lock:
            hold = self.holds.get(reservation_id)
            if hold is None:
                return False
            self._drop(hold, list(hold.amounts))
            self.counters.released += 1
        self._write_gone()
        return True

    def settle(self, state: QuotaState) -> None:
        """Drops the parts on ``state``'s window of the holds its batch counted. Call it after the
        state's usage is applied: in between, a call counts as held and as used (only stricter)."""
        if not state.settled:
            return
        window = (state.limit_key, state.window_start)
        with self._lock:
            for reservation_id in state.settled:
                hold = self.holds.get(reservation_id)
                if hold is not None and window in hold.amounts:
                    self._drop(hold, [window])
                    if not hold.amounts:
                        self.counters.settled += 1
        self._write_gone()

    def expire(self, now: datetime) -> int:
        """Ends the leases due by ``now``, a few at a time: a second's worth of them at once (a
        thousand, at 1,000 reservations a second) held the lock for 30-50 ms, and every request
        waiting on it was that late."""
        ended = 0
        while True:
            with self._lock:
                ended += self._expire(now, limit=64)
                more = bool(self._leases) and self._leases[0][0] <= now
            self._write_gone()
            if not more:
                return ended

    def _expire(self, now: datetime, limit: int | None = None) -> int:
        ended = popped = 0
        leases = self._leases
        while leases and leases[0][0] <= now and (limit is None or popped < limit):
            popped += 1
            _, reservation_id, ident = heapq.heappop(leases)
            hold = self.holds.get(reservation_id)
            if hold is not None:  # (else settled or released before its lease ended)
                self._drop(hold, list(hold.amounts), ended=True)
                ended += 1
            answered = self._answered.get(ident)
            if answered is not None and answered[1] <= now:
                del self._answered[ident]
        self.counters.expired += ended
        return ended

    def _drop(self, hold: Hold, windows: list[WindowId], ended: bool = False) -> None:
        for window in windows:
            self._unhold(window, hold.amounts.pop(window))
        if not hold.amounts:
            del self.holds[hold.reservation_id]
            ident = (hold.tenant_id, hold.idempotency_key)
            del self._by_key[ident]
            self._answered[ident] = hold.answer, hold.expires_at
            (self._ended if ended else self._gone).append(hold.reservation_id)

    def _write_gone(self) -> None:
        """Journals the holds gone since the last call, outside the lock (a journal write is tens
        of µs; under the lock, every request would wait for each)."""
        if self.journal is None or not (self._gone or self._ended):
            return
        with self._lock:
            gone, self._gone, ended, self._ended = self._gone, [], self._ended, []
        try:
            for reservation_id in gone:
                self.journal(reservation_id, None)
            if ended:
                self.journal.ended(ended)
        except Exception:  # noqa: BLE001 - a restarted enforcer then holds them until their leases end
            pass

    def restore(self, records: Iterable[dict[str, Any]], now: datetime) -> int:
        """The holds of a journal read back (the latest record of each id that is not gone), but
        those whose lease has ended; returns how many are held again."""
        with self._lock:
            for record in records:
                hold = Hold.from_record(record)
                if hold.expires_at <= now or hold.reservation_id in self.holds:
                    continue
                self._keep(hold)
            return len(self.holds)

    def _keep(self, hold: Hold) -> None:
        """A hold made or restored: found by id and key, ended by its lease, counted in its windows."""
        ident = (hold.tenant_id, hold.idempotency_key)
        self.holds[hold.reservation_id] = hold
        self._by_key[ident] = hold.reservation_id
        heapq.heappush(self._leases, (hold.expires_at, hold.reservation_id, ident))
        for window, amount in hold.amounts.items():
            if amount:
                self._held[window] = self._held.get(window, _ZERO) + amount

    def _unhold(self, window: WindowId, amount: Decimal) -> None:
        left = self._held.get(window, _ZERO) - amount
        if left > 0:
            self._held[window] = left
        else:  # (a window held at 0, e.g. a call of no tokens, was never stored)
            self._held.pop(window, None)
