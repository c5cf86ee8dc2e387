"""Stage 1: raw bytes from ``usage.raw`` → a valid ``UsageEvent`` with normalized ``usage``
(provider-native ``raw_usage`` is normalized here), or a ``Rejection`` with its reason.

Never raises on bad input: every way a payload can be wrong maps to a dead-letter reason.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import msgspec
from pydantic import ValidationError

from schemas.dead_letter import Rejection
from schemas.usage import UsageEvent
from streams.stages.decoding import Undecided, decoder_for
from streams.stages.normalize import UnrecognizedUsage, detect, normalize

#: Model APIs billed per token did not exist before this; older event times are corrupt input.
EARLIEST_EVENT_TIME = datetime(2020, 1, 1, tzinfo=UTC)
#: Defaults of how far ahead of now an event time may be, and of how large an event may be
#: (COSTLINE_MAX_FUTURE_S, COSTLINE_MAX_EVENT_BYTES).
MAX_FUTURE = timedelta(days=1)
MAX_EVENT_BYTES = 1_048_576
#: The largest record usage.raw takes (``streams.messaging.topics``): larger than any event a
#: worker accepts, so that an oversized one reaches it and is dead-lettered with its reason.
MAX_RECORD_BYTES = 8 * 1024 * 1024
#: The largest COSTLINE_MAX_EVENT_BYTES. An accepted event's ledger row, and so a block of the
#: stream role, grows with it (up to six times: ``streams.messaging.topics.MAX_LEDGER_RECORD_BYTES``).
MAX_EVENT_BYTES_CEILING = 4 * 1024 * 1024
_MAX_ERRORS_SHOWN = 3
#: The contract's fast decoder, derived from ``UsageEvent``: it accepts what pydantic accepts, or
#: leaves the input to pydantic.
_FAST = decoder_for(UsageEvent)
#: A valid event: pydantic's ``UsageEvent``, or the fast decoder's twin of it (the same fields,
#: values and methods; see ``streams.stages.decoding``).
Event = UsageEvent | msgspec.Struct


def validate(
    value: bytes | None,
    *,
    now: datetime,
    max_future: timedelta = MAX_FUTURE,
    max_bytes: int = MAX_EVENT_BYTES,
    fast: bool = True,
) -> Event | Rejection:
    """``fast``: try the fast decoder first (``streams.stages.decoding``); off, pydantic decides
    every event (the reference the fast path is tested and measured against)."""
    if value is None:
        return Rejection(reason="invalid_json", message="empty record (null value)")
    if len(value) > max_bytes:
        return Rejection(reason="payload_too_large", message=f"{len(value)} bytes exceeds the {max_bytes}-byte limit")
    try:
        if not fast:
            raise Undecided
        event = _FAST.decode(value)
    except Undecided:  # pydantic decides, and says why (streams.stages.decoding)
        try:
            value.decode("utf-8")
        except UnicodeDecodeError as exc:
            return Rejection(reason="invalid_utf8", message=f"not UTF-8: {exc.reason} at byte {exc.start}")
        try:
            event = UsageEvent.model_validate_json(value)
        except ValidationError as exc:
            return _rejection(exc)
    if event.timestamp > now + max_future:
        return Rejection(
            reason="timestamp_out_of_range",
            message=f"timestamp {event.timestamp.isoformat()} is more than {max_future} ahead of {now.isoformat()}",
        )
    if event.timestamp < EARLIEST_EVENT_TIME:
        return Rejection(
            reason="timestamp_out_of_range",
            message=f"timestamp {event.timestamp.isoformat()} is before {EARLIEST_EVENT_TIME.date()}",
        )
    if event.usage is None:
        return _with_normalized_usage(event)
    return event


def _with_normalized_usage(event: Event) -> Event | Rejection:
    raw = event.raw_usage or {}
    try:
        fmt = event.raw_usage_format or detect(raw, event.provider)
        usage = normalize(raw, event.provider, fmt)
    except UnrecognizedUsage as exc:
        return Rejection(reason="invalid_event", message=str(exc))
    except ValidationError as exc:
        return Rejection(reason="invalid_event", message=f"raw_usage ({fmt}): {exc.errors()[0]['msg']}")
    if isinstance(event, UsageEvent):
        return event.model_copy(update={"usage": usage, "raw_usage_format": fmt})
    return msgspec.structs.replace(event, usage=usage, raw_usage_format=fmt)


def _rejection(exc: ValidationError) -> Rejection:
    errors = exc.errors(include_url=False, include_input=False)
    if any(e["type"] == "json_invalid" for e in errors):
        return Rejection(reason="invalid_json", message=f"invalid JSON: {errors[0]['msg']}")
    if any(e["type"] == "model_type" and not e["loc"] for e in errors):
        return Rejection(reason="invalid_json", message="the value is JSON but not an object")
    if any(e["loc"] == ("schema_version",) for e in errors):
        return Rejection(reason="unsupported_schema_version", message="schema_version must be 1")
    shown = "; ".join(f"{_where(e['loc'])}: {e['msg']}" for e in errors[:_MAX_ERRORS_SHOWN])
    more = f" (+{len(errors) - _MAX_ERRORS_SHOWN} more)" if len(errors) > _MAX_ERRORS_SHOWN else ""
    return Rejection(reason="invalid_event", message=shown + more)


def _where(loc: tuple[int | str, ...]) -> str:
    """A field's path, on one line: a key that is not printable (a map key sent with a newline, say)
    is shown as its JSON string."""
    parts = [str(p) if str(p).isprintable() else json.dumps(str(p)) for p in loc]
    return ".".join(parts) or "event"
