-- The ledger: one row per attributed usage event.
-- At-least-once delivery can land an event more than once; ReplacingMergeTree keeps the row
-- with the latest attributed_at per (tenant, day, event_id), and readers use FINAL (or the
-- `usage` view) so a duplicate is never counted. Retried inserts carry the same
-- insert_deduplication_token and are dropped at insert time.
CREATE TABLE IF NOT EXISTS usage_ledger
(
    event_id            String,
    event_time          DateTime64(3, 'UTC'),
    tenant_id           LowCardinality(String),
    user_id             String,
    provider            LowCardinality(String),
    model               LowCardinality(String),
    matched_model       LowCardinality(String),
    service             LowCardinality(String),
    route               LowCardinality(String),
    feature             LowCardinality(String),
    step                LowCardinality(String),
    business_path       LowCardinality(String),
    trace_id            String,
    span_id             String,
    parent_span_id      String,
    status              LowCardinality(String),
    latency_ms          Nullable(UInt32),
    batch               Bool,
    tags                Map(String, String),
    extra               String COMMENT 'JSON object of event fields beyond the contract',
    input_tokens        UInt64,
    cache_read_tokens   UInt64,
    cache_write_tokens  UInt64,
    output_tokens       UInt64,
    reasoning_tokens    UInt64,
    cost_input          Decimal(18, 12),
    cost_cache_read     Decimal(18, 12),
    cost_cache_write    Decimal(18, 12),
    cost_output         Decimal(18, 12),
    cost_usd            Decimal(18, 12),
    currency            LowCardinality(String),
    priced              Bool,
    unpriced_reason     String,
    price_source        LowCardinality(String),
    attributed_at       DateTime64(3, 'UTC'),
    landed_at           DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree(attributed_at)
PARTITION BY toYYYYMM(event_time)
ORDER BY (tenant_id, toDate(event_time), event_id)
SETTINGS non_replicated_deduplication_window = 10000;
