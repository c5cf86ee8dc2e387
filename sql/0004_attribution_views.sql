-- Multi-call attribution. All views read the deduplicated ledger, so a redelivered event never counts twice.

-- One row per user action (calls sharing a trace_id), with the cost of each step.
CREATE VIEW IF NOT EXISTS cost_by_trace AS
SELECT
    tenant_id,
    trace_id,
    min(event_time) AS started_at,
    max(event_time) AS ended_at,
    count() AS calls,
    groupUniqArray(business_path) AS business_paths,
    sumMap(map(step_name, event_cost)) AS cost_by_step,
    sum(input_tokens) AS input_tokens,
    sum(output_tokens) AS output_tokens,
    sum(event_cost) AS cost_usd
FROM
(
    SELECT tenant_id, trace_id, event_time, business_path, input_tokens, output_tokens,
           if(step = '', 'unspecified', step) AS step_name, cost_usd AS event_cost
    FROM usage_ledger FINAL
    WHERE trace_id != ''
)
GROUP BY tenant_id, trace_id;

CREATE VIEW IF NOT EXISTS cost_by_business_path_day AS
SELECT
    tenant_id,
    business_path,
    toDate(event_time) AS day,
    count() AS calls,
    uniqExact(trace_id) AS user_actions,
    sum(cost_usd) AS cost_usd
FROM usage_ledger FINAL
GROUP BY tenant_id, business_path, day;

-- How much of each business path's cost each step takes (retrieval, generation, refinement, ...).
CREATE VIEW IF NOT EXISTS cost_by_step AS
SELECT
    business_path,
    step_name AS step,
    count() AS calls,
    sum(event_cost) AS cost_usd,
    sum(event_cost) / sum(sum(event_cost)) OVER (PARTITION BY business_path) AS share_of_path
FROM
(
    SELECT business_path, if(step = '', 'unspecified', step) AS step_name, cost_usd AS event_cost
    FROM usage_ledger FINAL
)
GROUP BY business_path, step_name;
