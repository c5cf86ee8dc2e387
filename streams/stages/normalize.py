"""Provider-native usage objects → normalized ``TokenUsage``.

Each provider counts differently, and each difference is a way to double-count or miss money:

| format | prompt total | cache | output |
|---|---|---|---|
| OpenAI Chat Completions | ``prompt_tokens`` includes ``prompt_tokens_details.cached_tokens`` | reads only | ``completion_tokens`` includes ``completion_tokens_details.reasoning_tokens`` |
| OpenAI Responses | ``input_tokens`` includes ``input_tokens_details.cached_tokens`` | reads only | ``output_tokens`` includes ``output_tokens_details.reasoning_tokens`` |
| Anthropic Messages | ``input_tokens`` **excludes** ``cache_read_input_tokens`` and ``cache_creation_input_tokens`` | reads and writes (5 min / 1 h) | ``output_tokens`` includes thinking |
| Gemini ``usageMetadata`` | ``promptTokenCount`` includes ``cachedContentTokenCount``; ``toolUsePromptTokenCount`` is extra input | reads only | ``candidatesTokenCount`` **excludes** ``thoughtsTokenCount``, which is billed as output |
| Bedrock Converse | ``inputTokens`` **excludes** ``cacheReadInputTokens`` and ``cacheWriteInputTokens`` | reads and writes | ``outputTokens`` |
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from schemas.usage import MAX_TOKENS, RawUsageFormat, TokenUsage


class UnrecognizedUsage(ValueError):
    """``raw_usage`` is not in a known provider format, or holds impossible counts."""


def _count(obj: Mapping[str, Any] | None, *keys: str) -> int:
    """The first of ``keys`` present in ``obj`` as a non-negative integer; absent or null is 0."""
    if not obj:
        return 0
    for key in keys:
        value = obj.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise UnrecognizedUsage(f"raw_usage.{key} must be an integer, got {type(value).__name__}")
        if not 0 <= value <= MAX_TOKENS:
            raise UnrecognizedUsage(f"raw_usage.{key} = {value} is outside 0..{MAX_TOKENS}")
        return value
    return 0


def _sub(obj: Mapping[str, Any], *keys: str) -> Mapping[str, Any] | None:
    for key in keys:
        value = obj.get(key)
        if isinstance(value, Mapping):
            return value
    return None


def _openai(raw: Mapping[str, Any], prompt: str, completion: str) -> TokenUsage:
    """Both OpenAI formats: totals include the cached and reasoning parts given in ``*_details``."""
    prompt_details = _sub(raw, f"{prompt}_details")
    completion_details = _sub(raw, f"{completion}_details")
    return TokenUsage(
        input_tokens=_count(raw, prompt),
        cache_read_tokens=_count(prompt_details, "cached_tokens"),
        input_audio_tokens=_count(prompt_details, "audio_tokens"),
        input_image_tokens=_count(prompt_details, "image_tokens"),
        output_tokens=_count(raw, completion),
        reasoning_tokens=_count(completion_details, "reasoning_tokens"),
        output_audio_tokens=_count(completion_details, "audio_tokens"),
    )


def openai_chat(raw: Mapping[str, Any]) -> TokenUsage:
    return _openai(raw, "prompt_tokens", "completion_tokens")


def openai_responses(raw: Mapping[str, Any]) -> TokenUsage:
    return _openai(raw, "input_tokens", "output_tokens")


def anthropic_messages(raw: Mapping[str, Any]) -> TokenUsage:
    cache_read = _count(raw, "cache_read_input_tokens")
    cache_write = _count(raw, "cache_creation_input_tokens")
    by_ttl = _sub(raw, "cache_creation")
    write_5m, write_1h = _count(by_ttl, "ephemeral_5m_input_tokens"), _count(by_ttl, "ephemeral_1h_input_tokens")
    if by_ttl and not cache_write:
        cache_write = write_5m + write_1h
    return TokenUsage(
        input_tokens=_count(raw, "input_tokens") + cache_read + cache_write,
        cache_read_tokens=cache_read,
        cache_write_tokens=cache_write,
        cache_write_1h_tokens=write_1h,
        output_tokens=_count(raw, "output_tokens"),
    )


def _modalities(raw: Mapping[str, Any], *keys: str) -> dict[str, int]:
    for key in keys:
        details = raw.get(key)
        if isinstance(details, list):
            counts: dict[str, int] = {}
            for item in details:
                if isinstance(item, Mapping):
                    modality = str(item.get("modality", "")).upper()
                    counts[modality] = counts.get(modality, 0) + _count(item, "tokenCount", "token_count")
            return counts
    return {}


def gemini(raw: Mapping[str, Any]) -> TokenUsage:
    prompt = _modalities(raw, "promptTokensDetails", "prompt_tokens_details")
    cached = _modalities(raw, "cacheTokensDetails", "cache_tokens_details")
    candidates = _modalities(raw, "candidatesTokensDetails", "candidates_tokens_details")
    thoughts = _count(raw, "thoughtsTokenCount", "thoughts_token_count")
    return TokenUsage(
        input_tokens=_count(raw, "promptTokenCount", "prompt_token_count")
        + _count(raw, "toolUsePromptTokenCount", "tool_use_prompt_token_count"),
        cache_read_tokens=_count(raw, "cachedContentTokenCount", "cached_content_token_count"),
        input_audio_tokens=prompt.get("AUDIO", 0),
        cache_audio_read_tokens=cached.get("AUDIO", 0),
        input_image_tokens=prompt.get("IMAGE", 0),
        cache_image_read_tokens=cached.get("IMAGE", 0),
        output_tokens=_count(raw, "candidatesTokenCount", "candidates_token_count") + thoughts,
        reasoning_tokens=thoughts,
        output_audio_tokens=candidates.get("AUDIO", 0),
        output_image_tokens=candidates.get("IMAGE", 0),
    )


def bedrock_converse(raw: Mapping[str, Any]) -> TokenUsage:
    cache_read = _count(raw, "cacheReadInputTokens", "cacheReadInputTokenCount")
    cache_write = _count(raw, "cacheWriteInputTokens", "cacheWriteInputTokenCount")
    return TokenUsage(
        input_tokens=_count(raw, "inputTokens") + cache_read + cache_write,
        cache_read_tokens=cache_read,
        cache_write_tokens=cache_write,
        output_tokens=_count(raw, "outputTokens"),
    )


NORMALIZERS: dict[str, Callable[[Mapping[str, Any]], TokenUsage]] = {
    "openai_chat": openai_chat,
    "openai_responses": openai_responses,
    "anthropic_messages": anthropic_messages,
    "gemini": gemini,
    "bedrock_converse": bedrock_converse,
}


def detect(raw: Mapping[str, Any], provider: str) -> RawUsageFormat:
    keys = raw.keys()
    if "prompt_tokens" in keys or "completion_tokens" in keys:
        return "openai_chat"
    if keys & {"promptTokenCount", "candidatesTokenCount", "prompt_token_count", "candidates_token_count"}:
        return "gemini"
    if "inputTokens" in keys or "outputTokens" in keys:
        return "bedrock_converse"
    if keys & {"cache_creation_input_tokens", "cache_read_input_tokens", "cache_creation"}:
        return "anthropic_messages"
    if "input_tokens" in keys or "output_tokens" in keys:
        # Without cache fields the two agree; the provider decides which semantics apply.
        return "anthropic_messages" if provider == "anthropic" else "openai_responses"
    raise UnrecognizedUsage(
        "raw_usage is not in a known format (OpenAI Chat Completions or Responses, Anthropic Messages, "
        "Gemini usageMetadata, Bedrock Converse); send normalized `usage` or set raw_usage_format"
    )


def normalize(raw: Mapping[str, Any], provider: str, fmt: RawUsageFormat | None = None) -> TokenUsage:
    """Raises ``UnrecognizedUsage`` or pydantic's ``ValidationError`` (impossible counts)."""
    return NORMALIZERS[fmt or detect(raw, provider)](raw)
