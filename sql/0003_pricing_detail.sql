-- Every token class the pricing engine prices, the provider's own usage object, and the price
-- provenance of each row (catalog version, override revision, discount), so any figure can be audited.
ALTER TABLE usage_ledger
    ADD COLUMN IF NOT EXISTS raw_usage               String COMMENT 'provider-native usage object as sent (JSON), empty when normalized usage was sent' AFTER extra,
    ADD COLUMN IF NOT EXISTS raw_usage_format        LowCardinality(String) AFTER raw_usage,
    ADD COLUMN IF NOT EXISTS cache_write_1h_tokens   UInt64 AFTER reasoning_tokens,
    ADD COLUMN IF NOT EXISTS input_audio_tokens      UInt64 AFTER cache_write_1h_tokens,
    ADD COLUMN IF NOT EXISTS cache_audio_read_tokens UInt64 AFTER input_audio_tokens,
    ADD COLUMN IF NOT EXISTS input_image_tokens      UInt64 AFTER cache_audio_read_tokens,
    ADD COLUMN IF NOT EXISTS cache_image_read_tokens UInt64 AFTER input_image_tokens,
    ADD COLUMN IF NOT EXISTS output_audio_tokens     UInt64 AFTER cache_image_read_tokens,
    ADD COLUMN IF NOT EXISTS output_image_tokens     UInt64 AFTER output_audio_tokens,
    ADD COLUMN IF NOT EXISTS cost_reasoning          Decimal(18, 12) AFTER cost_output,
    ADD COLUMN IF NOT EXISTS cost_input_audio        Decimal(18, 12) AFTER cost_reasoning,
    ADD COLUMN IF NOT EXISTS cost_input_image        Decimal(18, 12) AFTER cost_input_audio,
    ADD COLUMN IF NOT EXISTS cost_output_audio       Decimal(18, 12) AFTER cost_input_image,
    ADD COLUMN IF NOT EXISTS cost_output_image       Decimal(18, 12) AFTER cost_output_audio,
    ADD COLUMN IF NOT EXISTS cost_request            Decimal(18, 12) AFTER cost_output_image,
    ADD COLUMN IF NOT EXISTS pricing_version         LowCardinality(String) AFTER price_source,
    ADD COLUMN IF NOT EXISTS discount                LowCardinality(String) AFTER pricing_version,
    ADD COLUMN IF NOT EXISTS discount_percent        Decimal(9, 4) AFTER discount;

-- Attributions superseded by `costline reprice`: the ledger keeps only the latest one per event,
-- this table keeps every earlier one, with the run that replaced it.
CREATE TABLE IF NOT EXISTS attribution_audit
(
    reprice_id        String,
    superseded_at     DateTime64(3, 'UTC'),
    event_id          String,
    event_time        DateTime64(3, 'UTC'),
    tenant_id         LowCardinality(String),
    attributed_at     DateTime64(3, 'UTC'),
    cost_usd          Decimal(18, 12),
    new_cost_usd      Decimal(18, 12),
    priced            Bool,
    price_source      LowCardinality(String),
    pricing_version   LowCardinality(String),
    new_pricing_version LowCardinality(String)
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(superseded_at)
ORDER BY (tenant_id, event_id, superseded_at);

CREATE TABLE IF NOT EXISTS reprice_runs
(
    reprice_id      String,
    started_at      DateTime64(3, 'UTC'),
    since           DateTime64(3, 'UTC'),
    until           Nullable(DateTime64(3, 'UTC')),
    tenant_id       Nullable(String),
    events          UInt64,
    changed         UInt64,
    old_cost_usd    Decimal(38, 12),
    new_cost_usd    Decimal(38, 12),
    pricing_version LowCardinality(String)
)
ENGINE = MergeTree
ORDER BY started_at;

-- A view's column list is fixed when it is created: re-create it to show the new columns.
CREATE OR REPLACE VIEW usage AS
SELECT * FROM usage_ledger FINAL;
