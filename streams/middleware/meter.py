"""The monetization middleware: reserve → call → publish the usage event → settled by the stream.

    from streams.middleware.meter import Meter, Refused

    meter = Meter(EnforcerClient(url, token=...), UsageProducer(servers, "usage.raw"), service="chat")
    with meter.admit(tenant="acme", user="u-42", provider="openai", model="gpt-4o",
                     input_tokens=1200, max_tokens=500) as call:
        response = client.chat.completions.create(...)       # the provider call
        call.record(raw_usage=response.usage.model_dump(exclude_none=True), raw_usage_format="openai_chat")

``admit`` reserves the call's upper-bound cost with the enforcer (``Refused``, carrying the
enforcer's answer, when a hard cap would be passed), and on leaving the block always does one of:

- **publish** the usage event (``event_id`` = the reservation's idempotency key, the
  ``reservation_id`` on it, the provider's usage object kept verbatim in ``raw_usage``) when the
  call recorded its usage; the stream counts it and the enforcer then drops the hold;
- **publish at the input-token floor** when the call had begun (``call.started()``: a stream
  opened) but ended without usage — an error mid-stream or a cancellation. The provider bills the
  prompt of a call it has started, so the event carries the expected input tokens and the output
  tokens seen so far, tagged ``usage: estimated``: recorded, never dropped;
- **release** the reservation when the call never began (the block raised before the provider
  answered): nothing was spent, and the budget is free at once instead of at the lease's end.

The adapters (``streams.middleware.openai_sdk``, ``streams.middleware.anthropic_sdk``) do all of
this around the official SDKs, on ``Meter.call`` (an answer whole) and ``Meter.stream``.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, Iterator
from contextlib import AsyncExitStack, ExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

from schemas.usage import TokenUsage, UsageEvent
from streams.enforcement.client import EnforcerClient
from streams.errors import CostlineError
from streams.messaging.producer import UsageProducer

log = logging.getLogger(__name__)
T = TypeVar("T")


class Refused(CostlineError):
    """The enforcer refused the call's reservation: ``answer`` is its answer (the limit that would
    be passed, its window, what remains)."""

    def __init__(self, answer: dict[str, Any]) -> None:
        refused = answer.get("refused_by") or {}
        super().__init__(f"refused by limit {refused.get('limit_id')!r} of tenant {answer.get('tenant_id')!r}: "
                         f"{refused.get('remaining')} remaining of {refused.get('hard_cap')}, "
                         f"the call may cost {refused.get('estimate')}")
        self.answer = answer


@dataclass
class Call:
    """One admitted call: what the provider reported, once it has."""

    reservation: dict[str, Any]
    input_tokens: int
    #: The usage event's id, which is also the reservation's idempotency key.
    event_id: str = ""
    usage: TokenUsage | None = None
    raw_usage: dict[str, Any] | None = None
    raw_usage_format: str | None = None
    output_tokens_seen: int = 0
    tags: dict[str, str] = field(default_factory=dict)
    _started: bool = False

    def started(self) -> None:
        """The provider has begun the call (a stream opened): from here on it is billed."""
        self._started = True

    def record(self, usage: TokenUsage | None = None, *, raw_usage: dict[str, Any] | None = None,
               raw_usage_format: str | None = None) -> None:
        """The call's usage as the provider reported it (``raw_usage`` kept verbatim)."""
        self._started = True
        self.usage, self.raw_usage, self.raw_usage_format = usage, raw_usage, raw_usage_format

    @property
    def recorded(self) -> bool:
        return self.usage is not None or self.raw_usage is not None


class Meter:
    def __init__(self, enforcer: EnforcerClient, producer: UsageProducer, **context: str | None) -> None:
        """``context``: fields every usage event gets (``service``, ``route``, ``feature``, ``step``)."""
        self.enforcer = enforcer
        self.producer = producer
        self.context = {k: v for k, v in context.items() if v is not None}

    @contextmanager
    def admit(self, *, tenant: str, provider: str, model: str, input_tokens: int, max_tokens: int | None = None,
              n: int = 1, user: str | None = None, business_path: str | None = None,
              event_id: str | None = None, **context: str | None) -> Iterator[Call]:
        call = self._reserve(tenant, provider, model, input_tokens, max_tokens, n, user, business_path, event_id)
        try:
            yield call
        finally:
            self._finish(call, tenant, user, provider, model, context)

    def call(self, admission: dict[str, Any], send: Callable[[], T], record: Callable[[Call, T], None]) -> T:
        """A provider's call answered whole, metered: reserved now, sent, its usage taken from the
        answer by ``record``; published when it returns, released when ``send`` raises."""
        with self.admit(**admission) as call:
            answer = send()
            call.started()  # answered: billed even if the answer carries no usage
            record(call, answer)
            return answer

    def stream(self, admission: dict[str, Any], open_stream: Callable[[], Iterable[T]],
               observe: Callable[[Call, T], bool]) -> Iterator[T]:
        """A provider's stream, metered: reserved now (``Refused`` before any item), each item shown
        to ``observe`` (which records usage and says whether the caller gets the item), and
        published or released when the stream ends, fails or is closed by the caller."""
        stack = ExitStack()
        call = stack.enter_context(self.admit(**admission))
        try:
            items = open_stream()
        except BaseException:
            stack.close()
            raise
        return _metered(items, call, stack, observe)

    def _reserve(self, tenant: str, provider: str, model: str, input_tokens: int, max_tokens: int | None, n: int,
                 user: str | None, business_path: str | None, event_id: str | None) -> Call:
        event_id = event_id or uuid.uuid4().hex
        answer = self.enforcer.reserve(tenant, provider, model, event_id, input_tokens=input_tokens,
                                       max_tokens=max_tokens, n=n, user=user, business_path=business_path)
        if not answer.get("granted"):
            raise Refused(answer)
        return Call(answer, input_tokens, event_id=event_id)

    def _finish(self, call: Call, tenant: str, user: str | None, provider: str, model: str,
                context: dict[str, str | None]) -> None:
        """Publishes the call's usage (or its input floor), or releases a call that never began."""
        if call.recorded or call._started:
            self._publish(call, call.event_id, tenant, user, provider, model, context)
        else:
            self._release(call.reservation["reservation_id"])

    def _publish(self, call: Call, event_id: str, tenant: str, user: str | None, provider: str, model: str,
                 context: dict[str, str | None]) -> None:
        # The provider's own usage object when there is one (the stream normalizes it, and keeps
        # it verbatim), else the counts given.
        usage = None if call.raw_usage is not None else call.usage
        tags = dict(call.tags)
        if not call.recorded:  # begun, then ended without usage: the prompt is billed all the same
            usage = TokenUsage(input_tokens=call.input_tokens, output_tokens=call.output_tokens_seen)
            tags["usage"] = "estimated"
        fields = {**self.context, **{k: v for k, v in context.items() if v is not None}}
        self.producer.send(UsageEvent(
            event_id=event_id, timestamp=datetime.now(UTC), tenant_id=tenant, user_id=user, provider=provider,
            model=model, usage=usage, raw_usage=call.raw_usage, raw_usage_format=call.raw_usage_format, tags=tags,
            reservation_id=call.reservation["reservation_id"], **fields))

    def _release(self, reservation_id: str) -> None:
        try:
            self.enforcer.release(reservation_id)
        except CostlineError as exc:  # the lease ends it anyway; the caller's own error goes on
            log.warning("could not release reservation %s (its lease will end it): %s", reservation_id, exc)


class AsyncMeter(Meter):
    """``Meter`` for asyncio code (``openai.AsyncOpenAI``, ``anthropic.AsyncAnthropic``): the
    enforcer's answers are awaited on a worker thread, and a cancelled call still publishes or
    releases on its way out."""

    @asynccontextmanager
    async def admit(self, *, tenant: str, provider: str, model: str, input_tokens: int,  # type: ignore[override]
                    max_tokens: int | None = None, n: int = 1, user: str | None = None,
                    business_path: str | None = None, event_id: str | None = None,
                    **context: str | None) -> AsyncIterator[Call]:
        call = await asyncio.to_thread(self._reserve, tenant, provider, model, input_tokens, max_tokens, n, user,
                                       business_path, event_id)
        try:
            yield call
        finally:  # (shielded: a second cancellation must not leave the hold to its lease)
            await asyncio.shield(asyncio.to_thread(self._finish, call, tenant, user, provider, model, context))

    async def call(self, admission: dict[str, Any], send: Callable[[], Awaitable[T]],  # type: ignore[override]
                   record: Callable[[Call, T], None]) -> T:
        """``Meter.call`` for an async provider call."""
        async with self.admit(**admission) as call:
            answer = await send()
            call.started()
            record(call, answer)
            return answer

    async def stream(self, admission: dict[str, Any], open_stream: Callable[[], Awaitable[AsyncIterable[T]]],  # type: ignore[override]
                     observe: Callable[[Call, T], bool]) -> AsyncIterator[T]:
        """``Meter.stream`` for an async provider stream (awaited open, async items)."""
        stack = AsyncExitStack()
        call = await stack.enter_async_context(self.admit(**admission))
        try:
            items = await open_stream()
        except BaseException:
            await stack.aclose()
            raise
        return _metered_async(items, call, stack, observe)


class Adapter:
    """What an adapter of a provider's SDK is bound to: the SDK's client, a meter, and whom the
    calls are for. ``_send`` meters one call of an endpoint, whole or streamed (``stream=True``);
    with an ``AsyncMeter`` and an async client the same code returns awaitables, so each async
    adapter is its sync one with ``create`` awaited."""

    def __init__(self, client: Any, meter: Meter, *, tenant: str, user: str | None = None,
                 **context: str | None) -> None:
        self.client, self.meter, self.tenant, self.user, self.context = client, meter, tenant, user, context

    def _admission(self, provider: str, model: str, input_tokens: int, max_tokens: int | None,
                   n: int = 1) -> dict[str, Any]:
        return dict(tenant=self.tenant, user=self.user, provider=provider, model=model, input_tokens=input_tokens,
                    max_tokens=max_tokens, n=n, **self.context)

    def _send(self, endpoint: Callable[..., Any], kwargs: dict[str, Any], admission: dict[str, Any],
              record: Callable[[Call, Any], None], observe: Callable[[Call, Any], bool]) -> Any:
        if kwargs.get("stream"):
            return self.meter.stream(admission, lambda: endpoint(**kwargs), observe)
        return self.meter.call(admission, lambda: endpoint(**kwargs), record)


def _metered(items: Iterable[T], call: Call, stack: ExitStack, observe: Callable[[Call, T], bool]) -> Iterator[T]:
    with stack:
        call.started()
        for item in items:
            if observe(call, item):
                yield item


async def _metered_async(items: AsyncIterable[T], call: Call, stack: AsyncExitStack,
                         observe: Callable[[Call, T], bool]) -> AsyncIterator[T]:
    async with stack:
        call.started()
        async for item in items:
            if observe(call, item):
                yield item
