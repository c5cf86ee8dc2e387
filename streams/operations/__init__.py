"""Operations on a running pipeline: re-pricing, replay and backfill, simulated load, child processes."""
