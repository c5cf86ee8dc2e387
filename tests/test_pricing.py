"""Expected costs are computed by hand from the providers' published per-million-token prices."""

from datetime import UTC, datetime
from decimal import Decimal

from schemas.usage import TokenUsage, UsageEvent
from streams.pipeline import attribute
from streams.pricing import price_event

AT = datetime(2026, 6, 1, tzinfo=UTC)


def make(provider, model, **usage):
    return UsageEvent(event_id="e", timestamp=AT, tenant_id="t", provider=provider, model=model,
                      usage=TokenUsage(**usage))


def test_openai_cached_tokens_are_discounted(catalog):
    # gpt-4o: $2.50 input, $1.25 cached input, $10.00 output per million tokens.
    priced = price_event(make("openai", "gpt-4o", input_tokens=10_000, cache_read_tokens=4_000,
                              output_tokens=500, reasoning_tokens=100), catalog)
    assert priced.priced and priced.matched_model == "gpt-4o"
    assert priced.cost.input == Decimal("0.015")         # 6,000 × 2.50 / 1e6
    assert priced.cost.cache_read == Decimal("0.005")    # 4,000 × 1.25 / 1e6
    assert priced.cost.output == Decimal("0.005")        # 500 × 10 / 1e6 (reasoning is inside output)
    assert priced.cost.total == Decimal("0.025")


def test_anthropic_cache_write_is_charged_once_at_its_own_price(catalog):
    # claude-3-5-haiku: $0.80 input, $0.08 cache read, $1.00 cache write, $4.00 output.
    priced = price_event(make("anthropic", "claude-3-5-haiku-latest", input_tokens=3_000, cache_read_tokens=1_000,
                              cache_write_tokens=1_500, output_tokens=250), catalog)
    assert priced.cost.input == Decimal("0.0004")        # 500 uncached × 0.80
    assert priced.cost.cache_read == Decimal("0.00008")
    assert priced.cost.cache_write == Decimal("0.0015")
    assert priced.cost.output == Decimal("0.001")
    assert priced.cost.total == Decimal("0.00298")


def test_tiered_prompt_uses_the_long_context_price(catalog):
    # gemini-2.5-pro: $1.25 / $10 up to 200k prompt tokens, $2.50 / $15 above.
    short = price_event(make("google", "gemini-2.5-pro", input_tokens=200_000, output_tokens=1_000), catalog)
    long = price_event(make("google", "gemini-2.5-pro", input_tokens=200_001, output_tokens=1_000), catalog)
    assert short.cost.total == Decimal("0.26")           # 0.25 + 0.01
    assert long.cost.total == Decimal("0.5150025")       # 200,001 × 2.50 / 1e6 + 0.015


def test_tiny_prices_keep_twelve_decimal_places(catalog):
    # gpt-4o-mini cached input: $0.075 per million tokens → 7.5e-8 per token.
    priced = price_event(make("openai", "gpt-4o-mini", input_tokens=1, cache_read_tokens=1), catalog)
    assert priced.cost.cache_read == Decimal("0.000000075000")


def test_unknown_model_is_kept_unpriced_with_a_reason(catalog):
    record = attribute(make("openai", "gpt-99-ultra", input_tokens=10), catalog)
    assert not record.priced
    assert record.cost_usd == 0
    assert "gpt-99-ultra" in record.unpriced_reason


def test_business_path_and_context_are_carried(catalog):
    ev = UsageEvent(event_id="e", timestamp=AT, tenant_id="t", provider="openai", model="gpt-4o",
                    usage=TokenUsage(input_tokens=1), service="support-bot", feature="answer", step="retrieval",
                    trace_id="tr-1")
    record = attribute(ev, catalog)
    assert (record.business_path, record.step, record.trace_id) == ("support-bot/answer", "retrieval", "tr-1")
