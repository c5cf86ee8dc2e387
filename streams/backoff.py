"""Waits between attempts of an operation that is retried until it succeeds."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Backoff:
    """``first_s``, doubling with each attempt, up to ``max_s``."""

    first_s: float = 0.2
    max_s: float = 30.0

    def delay(self, attempt: int) -> float:
        return min(self.max_s, self.first_s * 2 ** min(attempt, 20))
