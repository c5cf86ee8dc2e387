"""Costs computed by hand from the providers' published prices (USD per million tokens),
for every provider usage format and each trap that makes attributed costs miss the invoice."""

import json
from datetime import UTC, datetime
from decimal import Decimal

import pytest

from schemas.dead_letter import Rejection
from schemas.usage import TokenUsage, UsageEvent
from streams.config import ConfigError
from streams.stages.prices import PriceOverrides, load_overrides
from streams.stages.pricing import Pricer
from streams.stages.validation import validate

AT = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
M = Decimal(1_000_000)


def event(provider, model, at=AT, tenant="acme", batch=False, **usage):
    return UsageEvent(event_id="e", timestamp=at, tenant_id=tenant, provider=provider, model=model,
                      usage=TokenUsage(**usage), batch=batch)


def raw_event(provider, model, raw, at="2026-06-01T12:00:00Z", **extra):
    payload = {"event_id": "e", "timestamp": at, "tenant_id": "acme", "provider": provider, "model": model,
               "raw_usage": raw, **extra}
    checked = validate(json.dumps(payload).encode(), now=AT)
    assert not isinstance(checked, Rejection), checked
    return checked


def cost_dict(priced):
    return {k: v for k, v in priced.cost.as_dict().items() if v}


# --- provider-native usage ------------------------------------------------------------------------


def test_openai_chat_cached_tokens_are_discounted_and_reasoning_is_inside_output(pricer):
    # gpt-4o: input 2.50, cached input 1.25, output 10.00.
    ev = raw_event("openai", "gpt-4o-2024-08-06", {
        "prompt_tokens": 10_000, "completion_tokens": 500, "total_tokens": 10_500,
        "prompt_tokens_details": {"cached_tokens": 4_000, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 200, "audio_tokens": None}})
    assert ev.raw_usage_format == "openai_chat"
    assert (ev.usage.input_tokens, ev.usage.cache_read_tokens, ev.usage.output_tokens) == (10_000, 4_000, 500)
    priced = pricer.price(ev)
    assert cost_dict(priced) == {
        "input": 6_000 * Decimal("2.50") / M,
        "cache_read": 4_000 * Decimal("1.25") / M,
        "output": 300 * Decimal("10") / M,
        "reasoning": 200 * Decimal("10") / M,
    }
    assert priced.cost.total == Decimal("0.025")  # not 0.030 (cache undiscounted) nor 0.027 (reasoning twice)


def test_openai_responses(pricer):
    ev = raw_event("openai", "gpt-4o", {
        "input_tokens": 5_000, "input_tokens_details": {"cached_tokens": 1_000},
        "output_tokens": 700, "output_tokens_details": {"reasoning_tokens": 300}, "total_tokens": 5_700})
    assert ev.raw_usage_format == "openai_responses"
    # 4,000 × 2.50 + 1,000 × 1.25 + 400 × 10 + 300 × 10
    assert pricer.price(ev).cost.total == Decimal("0.01825")


def test_anthropic_cache_reads_and_writes_are_added_to_input_and_charged_once(pricer):
    # claude-sonnet-4-5: input 3.00, cache read 0.30, cache write (5 min) 3.75, output 15.00.
    ev = raw_event("anthropic", "claude-sonnet-4-5-20250929", {
        "input_tokens": 100, "cache_creation_input_tokens": 2_000, "cache_read_input_tokens": 5_000,
        "output_tokens": 300})
    assert (ev.usage.input_tokens, ev.usage.cache_write_tokens, ev.usage.cache_read_tokens) == (7_100, 2_000, 5_000)
    priced = pricer.price(ev)
    assert cost_dict(priced) == {
        "input": Decimal("0.0003"),         # 100 × 3.00
        "cache_read": Decimal("0.0015"),    # 5,000 × 0.30
        "cache_write": Decimal("0.0075"),   # 2,000 × 3.75, once
        "output": Decimal("0.0045"),        # 300 × 15.00
    }
    assert priced.cost.total == Decimal("0.0138")


def test_anthropic_one_hour_cache_writes_have_their_own_price(pricer):
    # cache write 3.75 for the 5-minute lifetime, 6.00 for one hour.
    ev = raw_event("anthropic", "claude-sonnet-4-5", {
        "input_tokens": 0, "cache_creation_input_tokens": 2_000, "output_tokens": 0,
        "cache_creation": {"ephemeral_5m_input_tokens": 1_000, "ephemeral_1h_input_tokens": 1_000}})
    assert pricer.price(ev).cost.cache_write == Decimal("0.00975")


def test_gemini_thinking_tokens_are_billed_as_output(pricer):
    # gemini-2.5-flash: input 0.30, cached 0.03, output (thinking included) 2.50.
    ev = raw_event("google", "gemini-2.5-flash", {
        "promptTokenCount": 1_000, "candidatesTokenCount": 200, "thoughtsTokenCount": 800,
        "cachedContentTokenCount": 400, "totalTokenCount": 2_000})
    assert (ev.usage.input_tokens, ev.usage.output_tokens, ev.usage.reasoning_tokens) == (1_000, 1_000, 800)
    priced = pricer.price(ev)
    assert cost_dict(priced) == {"input": Decimal("0.00018"), "cache_read": Decimal("0.000012"),
                                 "output": Decimal("0.0005"), "reasoning": Decimal("0.002")}
    assert priced.cost.total == Decimal("0.002692")  # dropping thinking would give 0.000692


def test_gemini_audio_input_has_its_own_price_snake_case_sdk_form(pricer):
    # gemini-2.5-flash audio input 1.00; the Python SDK spells the fields in snake_case.
    ev = raw_event("google", "gemini-2.5-flash", {
        "prompt_token_count": 1_000, "candidates_token_count": 100,
        "prompt_tokens_details": [{"modality": "TEXT", "token_count": 700},
                                  {"modality": "AUDIO", "token_count": 300}]})
    priced = pricer.price(ev)
    assert cost_dict(priced) == {"input": Decimal("0.00021"), "input_audio": Decimal("0.0003"),
                                 "output": Decimal("0.00025")}


def test_bedrock_converse_input_excludes_cache_tokens(pricer):
    # Claude 3.5 Sonnet on Bedrock: input 3.00, cache read 0.30, cache write 3.75, output 15.00.
    ev = raw_event("aws-bedrock", "anthropic.claude-3-5-sonnet-20240620-v1:0", {
        "inputTokens": 1_000, "outputTokens": 200, "cacheReadInputTokens": 3_000,
        "cacheWriteInputTokens": 500, "totalTokens": 4_700})
    assert ev.raw_usage_format == "bedrock_converse" and ev.usage.input_tokens == 4_500
    assert pricer.price(ev).cost.total == Decimal("0.008775")


def test_unrecognized_raw_usage_is_dead_lettered_with_the_reason():
    payload = {"event_id": "e", "timestamp": "2026-06-01T12:00:00Z", "tenant_id": "acme", "provider": "openai",
               "model": "gpt-4o", "raw_usage": {"tokens": 12}}
    out = validate(json.dumps(payload).encode(), now=AT)
    assert isinstance(out, Rejection) and out.reason == "invalid_event"
    assert "not in a known format" in out.message
    payload["raw_usage"] = {"prompt_tokens": 10, "completion_tokens": 1,
                            "prompt_tokens_details": {"cached_tokens": 50}}
    out = validate(json.dumps(payload).encode(), now=AT)
    assert isinstance(out, Rejection) and "exceed input_tokens" in out.message


# --- time, tiers, batch -------------------------------------------------------------------------


def test_price_at_the_event_time_not_today(pricer):
    # o3 cost 10.00 / 40.00 until OpenAI cut it to 2.00 / 8.00 on 2025-06-10.
    before = pricer.price(event("openai", "o3", at=datetime(2025, 6, 9, 23, 59, tzinfo=UTC),
                                input_tokens=1_000, output_tokens=1_000))
    after = pricer.price(event("openai", "o3", at=datetime(2025, 6, 10, 0, 0, tzinfo=UTC),
                               input_tokens=1_000, output_tokens=1_000))
    assert (before.cost.total, after.cost.total) == (Decimal("0.05"), Decimal("0.01"))


def test_time_of_day_prices(pricer):
    # deepseek-chat: 0.27 / 1.10 from 00:30 to 16:30 UTC, half that off-peak.
    peak = pricer.price(event("deepseek", "deepseek-chat", at=datetime(2026, 6, 1, 12, tzinfo=UTC),
                              input_tokens=1_000_000, output_tokens=1_000_000))
    off_peak = pricer.price(event("deepseek", "deepseek-chat", at=datetime(2026, 6, 1, 20, tzinfo=UTC),
                                  input_tokens=1_000_000, output_tokens=1_000_000))
    assert (peak.cost.total, off_peak.cost.total) == (Decimal("1.37"), Decimal("0.685"))


def test_long_context_tier_prices_every_token_of_the_prompt(pricer):
    # claude-sonnet-4-5 above 200k prompt tokens: input 6.00, output 22.50 (3.00 / 15.00 below).
    at_limit = pricer.price(event("anthropic", "claude-sonnet-4-5", input_tokens=200_000, output_tokens=1_000))
    above = pricer.price(event("anthropic", "claude-sonnet-4-5", input_tokens=250_000, output_tokens=1_000))
    assert at_limit.cost.total == Decimal("0.615")   # 200,000 × 3 + 1,000 × 15
    assert above.cost.total == Decimal("1.5225")     # 250,000 × 6 + 1,000 × 22.50


def test_batch_calls_are_half_price_with_or_without_a_catalog_batch_price():
    pricer = Pricer(PriceOverrides(batch_discount_percent={"openai": Decimal(50)}))
    usage = {"input_tokens": 1_000, "output_tokens": 100}
    standard = pricer.price(event("openai", "gpt-4o", **usage))
    # Before 2026-10-14 the catalog has no gpt-4o batch price: the configured discount applies.
    configured = pricer.price(event("openai", "gpt-4o", batch=True, **usage))
    # From 2026-10-14 the catalog's own batch price (1.25 / 5.00) applies.
    catalog = pricer.price(event("openai", "gpt-4o", batch=True, at=datetime(2026, 11, 1, tzinfo=UTC), **usage))
    assert standard.cost.total == Decimal("0.0035")
    assert configured.cost.total == catalog.cost.total == Decimal("0.00175")
    assert configured.price_source.endswith("batch -50%") and catalog.price_source == "genai-prices 0.2.3"


def test_per_request_fees(pricer):
    # perplexity sonar: 1.00 / 1.00 per million tokens plus $12 per thousand requests.
    priced = pricer.price(event("perplexity", "sonar", input_tokens=1_000, output_tokens=1_000))
    assert (priced.cost.request, priced.cost.total) == (Decimal("0.012"), Decimal("0.014"))


def test_tiny_prices_keep_twelve_decimal_places(pricer):
    # gpt-4o-mini cached input: 0.075 per million tokens → 7.5e-8 per token.
    priced = pricer.price(event("openai", "gpt-4o-mini", input_tokens=1, cache_read_tokens=1))
    assert priced.cost.cache_read == Decimal("0.000000075000")


# --- overrides ----------------------------------------------------------------------------------


OVERRIDES = """
revision: 7
models:
  - name: acme contract
    tenant: acme
    provider: openai
    model: gpt-4o*
    effective_from: 2026-07-01
    per_million_tokens: {input: 2.00, cache_read: 1.00, output: 8.00}
  - name: self-hosted llama
    provider: selfhosted
    model: llama-3.1-70b*
    effective_from: 2026-01-01
    effective_to: 2027-01-01
    per_million_tokens: {input: 0.20, output: 0.60}
discounts:
  - name: anthropic enterprise agreement
    provider: anthropic
    percent: 12.5
    effective_from: 2026-03-01
"""


@pytest.fixture
def overridden(tmp_path):
    path = tmp_path / "prices.yaml"
    path.write_text(OVERRIDES)
    return Pricer.from_file(path)


def test_tenant_price_list_wins_from_its_effective_date(overridden):
    usage = {"input_tokens": 1_000_000, "cache_read_tokens": 500_000, "output_tokens": 100_000}
    june = overridden.price(event("openai", "gpt-4o-2024-11-20", **usage))
    july = overridden.price(event("openai", "gpt-4o-2024-11-20", at=datetime(2026, 7, 1, tzinfo=UTC), **usage))
    other_tenant = overridden.price(event("openai", "gpt-4o", tenant="globex", at=datetime(2026, 7, 1, tzinfo=UTC),
                                          **usage))
    assert june.cost.total == other_tenant.cost.total == Decimal("2.875")  # catalog: 1.25 + 0.625 + 1.00
    assert july.cost.total == Decimal("2.3")                                # contract: 1.00 + 0.50 + 0.80
    assert (july.price_source, july.matched_model) == ("prices.yaml models[0] (acme contract)", "gpt-4o*")
    assert july.pricing_version == "genai-prices 0.2.3; prices.yaml r7"


def test_self_hosted_model_priced_only_inside_its_window(overridden):
    inside = overridden.price(event("selfhosted", "llama-3.1-70b-instruct", input_tokens=10_000, output_tokens=5_000))
    after = overridden.price(event("selfhosted", "llama-3.1-70b-instruct", at=datetime(2027, 1, 1, tzinfo=UTC),
                                   input_tokens=10_000, output_tokens=5_000))
    assert inside.priced and inside.cost.total == Decimal("0.005")  # 10,000 × 0.20 + 5,000 × 0.60
    assert not after.priced and "llama-3.1-70b-instruct" in after.unpriced_reason


def test_negotiated_discount_applies_to_every_class(overridden):
    priced = overridden.price(event("anthropic", "claude-sonnet-4-5", input_tokens=10_000, cache_read_tokens=4_000,
                                    output_tokens=1_000))
    # list: 6,000 × 3 + 4,000 × 0.30 + 1,000 × 15 = 0.0342; 12.5% off
    assert cost_dict(priced) == {"input": Decimal("0.01575"), "cache_read": Decimal("0.00105"),
                                 "output": Decimal("0.013125")}
    assert priced.cost.total == Decimal("0.029925")
    assert (priced.discount, priced.discount_percent) == ("anthropic enterprise agreement", Decimal("12.5"))
    before = overridden.price(event("anthropic", "claude-sonnet-4-5", at=datetime(2026, 2, 28, tzinfo=UTC),
                                    input_tokens=10_000, cache_read_tokens=4_000, output_tokens=1_000))
    assert before.cost.total == Decimal("0.0342") and before.discount is None


@pytest.mark.parametrize(("text", "message"), [
    ("discounts: [{name: x, percent: 120}]", "discounts.0.percent: Input should be less than or equal to 100"),
    ("models: [{provider: a, model: b}]", "models.0.per_million_tokens: Field required"),
    ("models: [{provider: a, model: b, per_million_tokens: {input: -1, output: 1}}]",
     "models.0.per_million_tokens.input: Input should be greater than or equal to 0"),
    ("discounts: [{name: x, percent: 5, effective_from: 2026-02-01, effective_to: 2026-01-01}]",
     "effective_to must be after effective_from"),
    ("revison: 3", "revison: Extra inputs are not permitted"),
    ("models: [", "is not valid YAML"),
])
def test_bad_price_file_is_one_clear_line(tmp_path, text, message):
    path = tmp_path / "prices.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")) as info:
        load_overrides(path)
    assert str(info.value).startswith(str(path)) and "\n" not in str(info.value)


def test_unknown_model_is_kept_unpriced_with_a_reason(attribution):
    record = attribution.attribute(event("openai", "gpt-99-ultra", input_tokens=10))
    assert (record.priced, record.cost_usd) == (False, 0)
    assert "gpt-99-ultra" in record.unpriced_reason and record.pricing_version.startswith("genai-prices")


def test_business_context_is_carried(attribution):
    ev = UsageEvent(event_id="e", timestamp=AT, tenant_id="t", provider="openai", model="gpt-4o",
                    usage=TokenUsage(input_tokens=1), service="support-bot", feature="answer", step="retrieval",
                    trace_id="tr-1")
    record = attribution.attribute(ev)
    assert (record.business_path, record.step, record.trace_id) == ("support-bot/answer", "retrieval", "tr-1")
