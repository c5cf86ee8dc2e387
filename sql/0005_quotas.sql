-- Quota alerts, as published on quota.alerts. An alert re-sent after a crash has the same
-- alert_id and collapses into one row; read with FINAL (or the quota_alert_history view).
ALTER TABLE usage_ledger
    ADD COLUMN IF NOT EXISTS late Bool COMMENT 'arrived after its quota windows closed: counted here, not in quotas' AFTER business_path;

CREATE OR REPLACE VIEW usage AS
SELECT * FROM usage_ledger FINAL;

CREATE TABLE IF NOT EXISTS quota_alerts
(
    alert_id          String,
    tenant_id         LowCardinality(String),
    limit_id          LowCardinality(String),
    metric            LowCardinality(String),
    scope             LowCardinality(String),
    scope_value       String,
    window_start      DateTime64(3, 'UTC'),
    window_end        DateTime64(3, 'UTC'),
    threshold_percent Decimal(9, 4),
    level             LowCardinality(String),
    usage             Decimal(38, 12),
    limit_value       Decimal(38, 12),
    crossed_at        DateTime64(3, 'UTC'),
    event_id          String,
    landed_at         DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(window_start)
ORDER BY (tenant_id, limit_id, window_start, alert_id)
SETTINGS non_replicated_deduplication_window = 10000;

CREATE VIEW IF NOT EXISTS quota_alert_history AS
SELECT * FROM quota_alerts FINAL;
