-- Revenue and margin beside cost: what each call added to its tenant's bill for the billing
-- period (streams.stages.revenue), rated in the stream. NULL where the tenant's plan has no rate
-- card, or the event came after its period closed (then the invoice rates it from the ledger).
ALTER TABLE usage_ledger
    ADD COLUMN IF NOT EXISTS revenue_usd Nullable(Decimal(18, 12)) COMMENT 'what the call added to the tenant''s bill for billing_period' AFTER cost_usd,
    -- Computed by ClickHouse on insert (the worker does not send it): one Decimal subtraction and
    -- one column less to encode per event on the worker's busiest thread.
    ADD COLUMN IF NOT EXISTS margin_usd Nullable(Decimal(18, 12)) DEFAULT revenue_usd - cost_usd COMMENT 'revenue_usd - cost_usd' AFTER revenue_usd,
    ADD COLUMN IF NOT EXISTS billing_period LowCardinality(String) COMMENT 'YYYY-MM in the tenant''s time zone; empty when not rated' AFTER margin_usd;

CREATE OR REPLACE VIEW usage AS
SELECT * FROM usage_ledger FINAL;

-- costline reprice re-rates revenue too: the audit keeps the revenue it replaced.
ALTER TABLE attribution_audit
    ADD COLUMN IF NOT EXISTS revenue_usd Nullable(Decimal(18, 12)),
    ADD COLUMN IF NOT EXISTS new_revenue_usd Nullable(Decimal(18, 12));

ALTER TABLE reprice_runs
    ADD COLUMN IF NOT EXISTS old_revenue_usd Decimal(38, 12),
    ADD COLUMN IF NOT EXISTS new_revenue_usd Decimal(38, 12);

-- Per tenant and billing period: the usage revenue rated in the stream, the provider cost of
-- the same calls, and the margin. The invoice (costline invoice) adds the flat fee, the
-- commitment true-up and any volume true-up; these are usage only. Calls without revenue (late,
-- or of a tenant whose plan has no rate card) are left out of every margin view.
CREATE OR REPLACE VIEW margin_by_tenant_period AS
SELECT
    tenant_id,
    billing_period,
    count() AS calls,
    sum(c) AS cost_usd,
    sum(r) AS revenue_usd,
    sum(m) AS margin_usd,
    round(sum(m) * 100 / nullIf(sum(r), 0), 4) AS margin_percent
FROM (SELECT tenant_id, billing_period, cost_usd AS c, assumeNotNull(revenue_usd) AS r, assumeNotNull(margin_usd) AS m
      FROM usage_ledger FINAL WHERE revenue_usd IS NOT NULL)
GROUP BY tenant_id, billing_period;

-- Per model and day (UTC), rated calls only.
CREATE OR REPLACE VIEW margin_by_model_day AS
SELECT
    provider,
    model,
    day,
    count() AS calls,
    sum(c) AS cost_usd,
    sum(r) AS revenue_usd,
    sum(m) AS margin_usd,
    round(sum(m) * 100 / nullIf(sum(r), 0), 4) AS margin_percent
FROM (SELECT provider, model, toDate(event_time) AS day, cost_usd AS c, assumeNotNull(revenue_usd) AS r,
             assumeNotNull(margin_usd) AS m
      FROM usage_ledger FINAL WHERE revenue_usd IS NOT NULL)
GROUP BY provider, model, day;

-- Per tenant, business path and day (UTC), rated calls only.
CREATE OR REPLACE VIEW margin_by_business_path_day AS
SELECT
    tenant_id,
    business_path,
    day,
    count() AS calls,
    sum(c) AS cost_usd,
    sum(r) AS revenue_usd,
    sum(m) AS margin_usd,
    round(sum(m) * 100 / nullIf(sum(r), 0), 4) AS margin_percent
FROM (SELECT tenant_id, business_path, toDate(event_time) AS day, cost_usd AS c, assumeNotNull(revenue_usd) AS r,
             assumeNotNull(margin_usd) AS m
      FROM usage_ledger FINAL WHERE revenue_usd IS NOT NULL)
GROUP BY tenant_id, business_path, day;
