-- Deduplicated reads for analysts: always the latest attribution of each event.
CREATE VIEW IF NOT EXISTS usage AS
SELECT * FROM usage_ledger FINAL;

CREATE VIEW IF NOT EXISTS cost_by_tenant_day AS
SELECT
    tenant_id,
    toDate(event_time) AS day,
    count() AS calls,
    countIf(NOT priced) AS unpriced_calls,
    sum(input_tokens) AS input_tokens,
    sum(output_tokens) AS output_tokens,
    sum(cost_usd) AS cost_usd
FROM usage_ledger FINAL
GROUP BY tenant_id, day;

CREATE VIEW IF NOT EXISTS cost_by_model_day AS
SELECT
    provider,
    model,
    toDate(event_time) AS day,
    count() AS calls,
    sum(input_tokens) AS input_tokens,
    sum(output_tokens) AS output_tokens,
    sum(cost_usd) AS cost_usd
FROM usage_ledger FINAL
GROUP BY provider, model, day;
