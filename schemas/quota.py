"""Quota contracts for enforcers: alerts on ``quota.alerts`` and state on ``quota.state``.

``quota.alerts`` (key = tenant): one ``QuotaAlert`` per threshold crossed per window. Its
``alert_id`` is a function of (tenant, limit, scope, window, threshold) only, so a re-delivery
after a crash carries the same id: consumers keep the first and ignore the rest.

``quota.state`` (compacted, key = ``QuotaState.key``: tenant, limit, scope value and window start):
the latest usage of each window, so an enforcer starts from the current picture without
replaying history. The window start is part of the key so that compaction keeps each window's
latest record: a late event's state for yesterday's window must not leave the only record of its
limit, and with it today's hard cap, behind. A window past its grace period gets a tombstone.
"""

from __future__ import annotations

import hashlib
from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PlainSerializer

from schemas.trusted import construct

Amount = Annotated[Decimal, PlainSerializer(lambda d: format(d, "f"), return_type=str, when_used="json")]
Status = Literal["ok", "warning", "soft_cap", "hard_cap"]


def alert_id(tenant: str, limit_id: str, scope_value: str, window_start: datetime, threshold: Decimal) -> str:
    text = "\x1f".join([tenant, limit_id, scope_value, window_start.isoformat(), format(threshold.normalize(), "f")])
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def limit_key(tenant: str, limit_id: str, scope_value: str) -> str:
    """One tenant × limit × scope value, whatever its window."""
    return f"{tenant}/{limit_id}/{scope_value}"


def state_key(tenant: str, limit_id: str, scope_value: str, window_start: str) -> str:
    """The ``quota.state`` key of one window; ``window_start`` is the start's ISO 8601 text (which the
    quota stage keeps per window, so that no key costs a formatting of the time)."""
    return f"{limit_key(tenant, limit_id, scope_value)}/{window_start}"


class QuotaWindow(BaseModel):
    """Which tenant × limit × scope window a record is about."""

    model_config = ConfigDict(frozen=True)

    tenant_id: str
    limit_id: str
    metric: str
    scope: str
    scope_value: str
    window_start: datetime
    window_end: datetime


class QuotaAlert(QuotaWindow):
    alert_id: str
    threshold_percent: Amount
    level: Literal["warning", "soft_cap", "hard_cap"]
    usage: Amount
    limit: Amount
    #: Event time of the event that crossed the threshold, and its id.
    crossed_at: datetime
    event_id: str


class QuotaState(QuotaWindow):
    usage: Amount
    limit: Amount
    remaining: Amount
    status: Status
    #: Event time of the latest event counted.
    as_of: datetime
    #: The reservations (``UsageEvent.reservation_id``) whose calls this record's batch counted
    #: into the window: an enforcer drops their hold on this limit as it applies this usage, so
    #: no moment sees the call both held and counted, or neither.
    settled: list[str] = Field(default_factory=list)

    @property
    def key(self) -> str:
        return state_key(self.tenant_id, self.limit_id, self.scope_value, self.window_start.isoformat())

    @property
    def limit_key(self) -> str:
        return limit_key(self.tenant_id, self.limit_id, self.scope_value)

    @classmethod
    def from_trusted(cls, values: dict[str, Any]) -> QuotaState:
        """An instance from every field's value, already of its type (see ``schemas.trusted``)."""
        return construct(cls, values)
