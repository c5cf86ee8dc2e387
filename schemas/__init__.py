"""Costline's wire contracts, shared by producers, the worker and consumers."""

from schemas.attributed import AttributedUsage, CostBreakdown
from schemas.dead_letter import DeadLetter, Rejection
from schemas.usage import MAX_TOKENS, SCHEMA_VERSION, TokenUsage, UsageEvent

__all__ = [
    "MAX_TOKENS",
    "SCHEMA_VERSION",
    "AttributedUsage",
    "CostBreakdown",
    "DeadLetter",
    "Rejection",
    "TokenUsage",
    "UsageEvent",
]
