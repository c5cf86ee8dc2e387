-- Merges of the ledger's parts column by column (the vertical algorithm), not all 56 columns at
-- once. ClickHouse merges parts of fewer than 131,072 rows horizontally by default: every column of
-- every part read and written together. With one part per landed batch (5,000 rows), a merge of
-- seven parts held 197-289 MB of ClickHouse's tracked memory; column by column, 26-32 MB.
-- Measured with the embedded engine, 200,000 ledger rows in batches of 5,000: peak anonymous memory
-- 147 MB above the engine's start, 101 MB with this. On a ClickHouse server it lowers merge memory
-- the same way, for one more pass over each merged part's sorting key.
ALTER TABLE usage_ledger MODIFY SETTING
    vertical_merge_algorithm_min_rows_to_activate = 1,
    vertical_merge_algorithm_min_columns_to_activate = 1;
