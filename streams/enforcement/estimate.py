"""The upper bound of a call's cost, tokens and requests before it is made, for a reservation.

Priced by the stream's own ``Pricer`` (catalog, overrides, the tenant's negotiated prices, at the
time of the request), on the worst case of the call:

- input: every expected input token at the dearest input-side rate — plain input, a cache write,
  or a one-hour cache write (a cache write may cost more than plain input; a cache read never
  costs more);
- output: ``max_tokens`` (or ``COSTLINE_RESERVE_MAX_OUTPUT_TOKENS`` when the request gives none)
  at the output rate, times ``n``.

A model with no known price reserves ``COSTLINE_RESERVE_UNKNOWN_USD`` and the estimate says it is
not a bound (``bounded`` False): such a call may spend more than it held.
"""

from __future__ import annotations

import threading
from datetime import datetime
from decimal import Decimal

from schemas.usage import TokenUsage, UsageEvent
from streams.enforcement.reservations import Estimate, ReservationRequest
from streams.stages.pricing import Pricer


class Estimator:
    def __init__(self, pricer: Pricer, max_output_tokens: int, unknown_usd: Decimal) -> None:
        self.pricer = pricer
        self.max_output_tokens = max_output_tokens
        self.unknown_usd = unknown_usd
        self._lock = threading.Lock()  # ``Pricer`` keeps memos: one request prices at a time

    def estimate(self, request: ReservationRequest, at: datetime) -> Estimate:
        output = (request.max_tokens or self.max_output_tokens) * request.n
        tokens_in = request.input_tokens
        worst = [
            TokenUsage(input_tokens=tokens_in, output_tokens=output),
            TokenUsage(input_tokens=tokens_in, cache_write_tokens=tokens_in, output_tokens=output),
            TokenUsage(input_tokens=tokens_in, cache_write_tokens=tokens_in, cache_write_1h_tokens=tokens_in,
                       output_tokens=output),
        ]
        costs = []
        with self._lock:
            for usage in worst:
                priced = self.pricer.price(UsageEvent(
                    event_id="reservation-estimate", timestamp=at, tenant_id=request.tenant_id,
                    provider=request.provider, model=request.model, usage=usage))
                if not priced.priced:
                    return Estimate(self.unknown_usd, Decimal(tokens_in + output), Decimal(1), bounded=False)
                costs.append(priced.cost.total)
        return Estimate(max(costs), Decimal(tokens_in + output), Decimal(1))
