-- Issued invoices (costline invoice --record): one row per issue in `invoices`, its lines in
-- `invoice_lines`. Append-only: issuing a month again (more usage came, a rate card changed)
-- adds a new issue and keeps the earlier ones; the latest_* views read the latest issue of each
-- tenant and month.
CREATE TABLE IF NOT EXISTS invoices
(
    invoice_id            String,
    tenant_id             LowCardinality(String),
    period                LowCardinality(String) COMMENT 'YYYY-MM in the tenant''s time zone',
    period_start          DateTime64(3, 'UTC'),
    period_end            DateTime64(3, 'UTC'),
    issued_at             DateTime64(3, 'UTC'),
    currency              LowCardinality(String),
    total                 Decimal(38, 2),
    cost_usd              Decimal(38, 12),
    margin_usd            Decimal(38, 12),
    streamed_revenue_usd  Decimal(38, 12) COMMENT 'the month''s revenue_usd in the ledger',
    rated_usage_usd       Decimal(38, 12) COMMENT 'the usage charges rated from the month''s totals, unrounded',
    unrated_calls         UInt64
)
ENGINE = ReplacingMergeTree
PARTITION BY period
ORDER BY (tenant_id, period, issued_at, invoice_id)
SETTINGS non_replicated_deduplication_window = 10000;

CREATE TABLE IF NOT EXISTS invoice_lines
(
    invoice_id        String,
    tenant_id         LowCardinality(String),
    period            LowCardinality(String),
    issued_at         DateTime64(3, 'UTC'),
    position          UInt16,
    line_id           String,
    kind              LowCardinality(String),
    description       String,
    quantity          Decimal(38, 12),
    unit_amount       Nullable(Decimal(38, 12)),
    amount_unrounded  Decimal(38, 12),
    amount            Decimal(38, 2)
)
ENGINE = ReplacingMergeTree
PARTITION BY period
ORDER BY (tenant_id, period, issued_at, invoice_id, position)
SETTINGS non_replicated_deduplication_window = 10000;

CREATE OR REPLACE VIEW latest_invoices AS
SELECT * FROM invoices FINAL
WHERE (tenant_id, period, issued_at) IN (SELECT tenant_id, period, max(issued_at) FROM invoices GROUP BY tenant_id, period);

CREATE OR REPLACE VIEW latest_invoice_lines AS
SELECT * FROM invoice_lines FINAL
WHERE invoice_id IN (SELECT invoice_id FROM latest_invoices);
