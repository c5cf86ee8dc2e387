"""Quota enforcement: allow / warn / block decisions from quota.state and quota.alerts."""
