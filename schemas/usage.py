"""The usage event contract (schema_version 1): one event per model call.

Producers in any language publish this as JSON on ``usage.raw`` with the Kafka key set to
``tenant_id`` and the record timestamp set to ``timestamp``. The JSON Schema in
``schemas/json/`` is generated from these models (``python -m schemas.export``).

Token counts follow the OpenTelemetry GenAI convention: ``input_tokens`` counts every
prompt token, cache reads and writes included; ``output_tokens`` counts every completion
token, reasoning included. The cache and reasoning counts are parts of those totals.
"""

from __future__ import annotations

import operator
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, AwareDatetime, BaseModel, ConfigDict, Field, StringConstraints, model_validator

SCHEMA_VERSION = 1
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MILLISECOND = timedelta(milliseconds=1)

#: No single model call comes near a billion tokens; larger counts are corrupt input.
MAX_TOKENS = 1_000_000_000
#: The ledger stores ``latency_ms`` as UInt32 (about 49.7 days); a longer call is corrupt input.
MAX_LATENCY_MS = 4_294_967_295

TokenCount = Annotated[int, Field(ge=0, le=MAX_TOKENS)]
#: An aware time, normalized to UTC (the same instant in any offset). Every stage compares event
#: times (against "now", window bounds, watermarks); two times with one and the same ``tzinfo``
#: compare in ~50 ns, times with pydantic's parsed ``TzInfo`` against ``UTC`` in ~650 ns.
def _to_utc(at: datetime) -> datetime:
    try:
        return at.astimezone(UTC)
    except OverflowError:  # year 1 ahead of UTC, year 9999 behind it: not an error pydantic reports
        raise ValueError("the time is out of range once converted to UTC") from None


UtcDatetime = Annotated[AwareDatetime, AfterValidator(_to_utc)]
Name = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=256)]
ShortText = Annotated[str, StringConstraints(max_length=256)]


class TokenUsage(BaseModel):
    """Normalized token counts of one call.

    ``input_tokens`` and ``output_tokens`` are the totals; every other count is a part of one
    of them (OpenTelemetry GenAI convention), so nothing is counted twice:

    - input: ``cache_read_tokens`` (of which ``cache_audio_read_tokens`` and
      ``cache_image_read_tokens``), ``cache_write_tokens`` (of which ``cache_write_1h_tokens``,
      written with a one-hour lifetime), ``input_audio_tokens`` and ``input_image_tokens`` (both
      including their cached part);
    - output: ``reasoning_tokens``, ``output_audio_tokens``, ``output_image_tokens``.
    """

    model_config = ConfigDict(strict=True, extra="allow", frozen=True)

    input_tokens: TokenCount = 0
    cache_read_tokens: TokenCount = 0
    cache_write_tokens: TokenCount = 0
    output_tokens: TokenCount = 0
    reasoning_tokens: TokenCount = 0
    cache_write_1h_tokens: TokenCount = 0
    input_audio_tokens: TokenCount = 0
    cache_audio_read_tokens: TokenCount = 0
    input_image_tokens: TokenCount = 0
    cache_image_read_tokens: TokenCount = 0
    output_audio_tokens: TokenCount = 0
    output_image_tokens: TokenCount = 0

    @model_validator(mode="after")
    def _parts_within_totals(self) -> TokenUsage:
        # Reads each count once (this runs for every event; the properties below would re-read them).
        (inp, cache_read, cache_write, out, reasoning, cache_write_1h, input_audio, cache_audio, input_image,
         cache_image, output_audio, output_image) = token_counts(self)
        if cache_read + cache_write > inp:
            raise ValueError(
                "cache_read_tokens + cache_write_tokens exceed input_tokens "
                "(input_tokens must include cached tokens)"
            )
        if cache_write_1h > cache_write:
            raise ValueError("cache_write_1h_tokens exceed cache_write_tokens (they are a part of them)")
        if cache_audio > input_audio:
            raise ValueError("cache_audio_read_tokens exceed input_audio_tokens (they are a part of them)")
        if cache_image > input_image:
            raise ValueError("cache_image_read_tokens exceed input_image_tokens (they are a part of them)")
        if cache_audio + cache_image > cache_read:
            raise ValueError("cache_audio_read_tokens + cache_image_read_tokens exceed cache_read_tokens")
        if (input_audio - cache_audio) + (input_image - cache_image) > inp - cache_read - cache_write:
            raise ValueError("cache, audio and image input tokens together exceed input_tokens")
        if reasoning > out:
            raise ValueError("reasoning_tokens exceed output_tokens (output_tokens must include reasoning)")
        if reasoning + output_audio + output_image > out:
            raise ValueError("reasoning, audio and image output tokens together exceed output_tokens")
        return self

    @property
    def uncached_input_tokens(self) -> int:
        return self.input_tokens - self.cache_read_tokens - self.cache_write_tokens

    @property
    def uncached_text_input_tokens(self) -> int:
        """Input tokens billed at the plain input price: not cached, not audio, not image."""
        uncached_audio = self.input_audio_tokens - self.cache_audio_read_tokens
        uncached_image = self.input_image_tokens - self.cache_image_read_tokens
        return self.uncached_input_tokens - uncached_audio - uncached_image

    @property
    def cache_text_read_tokens(self) -> int:
        return self.cache_read_tokens - self.cache_audio_read_tokens - self.cache_image_read_tokens

    @property
    def text_output_tokens(self) -> int:
        """Output tokens billed at the plain output price: not reasoning, not audio, not image."""
        return self.output_tokens - self.reasoning_tokens - self.output_audio_tokens - self.output_image_tokens


#: Every count of a ``TokenUsage``, in field order, in one C-level call.
token_counts = operator.attrgetter(*TokenUsage.model_fields)

RawUsageFormat = Literal["openai_chat", "openai_responses", "anthropic_messages", "gemini", "bedrock_converse"]


class UsageEvent(BaseModel):
    """One model call, as an application reports it. Unknown extra fields are kept."""

    model_config = ConfigDict(strict=True, extra="allow", frozen=True)

    schema_version: Literal[1] = SCHEMA_VERSION
    event_id: Annotated[str, StringConstraints(min_length=1, max_length=128)]
    timestamp: UtcDatetime
    tenant_id: Name
    user_id: Name | None = None
    provider: Annotated[str, StringConstraints(strip_whitespace=True, to_lower=True, min_length=1, max_length=64)]
    model: Name
    usage: TokenUsage | None = None
    raw_usage: dict[str, Any] | None = None
    #: Which provider format ``raw_usage`` is in; detected from its keys when omitted.
    raw_usage_format: RawUsageFormat | None = None
    batch: bool = False

    service: ShortText | None = None
    route: ShortText | None = None
    feature: ShortText | None = None
    step: ShortText | None = None
    trace_id: ShortText | None = None
    span_id: ShortText | None = None
    parent_span_id: ShortText | None = None
    tags: dict[str, str] = Field(default_factory=dict, max_length=64)
    status: Literal["ok", "error"] = "ok"
    latency_ms: Annotated[int, Field(ge=0, le=MAX_LATENCY_MS)] | None = None
    #: The enforcer's reservation this call was admitted on (``POST /v1/reservations``): the
    #: stream reports it counted, and the enforcer then drops the hold.
    reservation_id: Annotated[str, StringConstraints(min_length=1, max_length=64)] | None = None

    @model_validator(mode="after")
    def _has_usage(self) -> UsageEvent:
        if self.usage is None and self.raw_usage is None:
            raise ValueError("one of usage or raw_usage is required")
        return self

    def kafka_key(self) -> bytes:
        return self.tenant_id.encode()

    def timestamp_ms(self) -> int:
        return epoch_ms(self.timestamp)


def from_epoch_ns(ns: int) -> datetime:
    """The UTC time of epoch nanoseconds (as OpenTelemetry times are), to the microsecond, in exact
    integer arithmetic. Raises ``OverflowError`` beyond ``datetime``'s range (year 9999)."""
    return _EPOCH + timedelta(microseconds=ns // 1000)


def epoch_ms(at: datetime) -> int:
    """Epoch milliseconds of an aware time, in exact integer arithmetic (no float rounding), as
    Kafka record timestamps are."""
    return (at - _EPOCH) // _MILLISECOND
