"""The upper bound of a call's cost, tokens and requests before it is made, for a reservation.

Priced by the stream's own ``Pricer`` (catalog, overrides, the tenant's negotiated prices, at the
time of the request), on the worst case of the call:

- input: every expected input token at the dearest input-side rate — plain input, a cache write,
  or a one-hour cache write (a cache write may cost more than plain input; a cache read never
  costs more);
- output: ``max_tokens`` (or ``COSTLINE_RESERVE_MAX_OUTPUT_TOKENS`` when the request gives none)
  at the output rate, times ``n``.

The rates are read per token from probes of a million tokens of each class, so that an estimate
is a multiplication, not a pricing. A model with no known price reserves ``COSTLINE_RESERVE_UNKNOWN_USD`` and the estimate says it is
not a bound (``bounded`` False): such a call may spend more than it held.
"""

from __future__ import annotations

import threading
import time
from datetime import datetime
from decimal import ROUND_CEILING, Decimal
from typing import NamedTuple

from schemas.usage import TokenUsage, UsageEvent
from streams.enforcement.reservations import Estimate, ReservationRequest
from streams.stages.pricing import MONEY_QUANTUM, Pricer

#: Tokens of the probes a model's rates are read from: enough that a rate of 1e-12 USD a token shows.
_PROBE = 1_000_000
_PER_TOKEN = Decimal(_PROBE)


class Rates(NamedTuple):
    """A model's dearest input-side rate and its output rate, per token, and its per-call fee."""

    input: Decimal
    output: Decimal
    fee: Decimal


class Estimator:
    """Upper bounds from the rates of each (tenant, provider, model), read from the pricer at most
    once a minute per key (a price that changes is used within a minute: an estimate that much
    late); each estimate is then a few multiplications instead of five pricings (~450 µs).

    Each key keeps its rates for ``REFRESH_S`` from its own reading, not to the next wall-clock
    minute: with minute buckets, every key of a thousand tenants was read again in the same
    second after each minute's turn (0.45 s of pricing at once, 20-30 ms late answers)."""

    REFRESH_S = 60.0

    def __init__(self, pricer: Pricer, max_output_tokens: int, unknown_usd: Decimal) -> None:
        self.pricer = pricer
        self.max_output_tokens = max_output_tokens
        self.unknown_usd = unknown_usd
        self._lock = threading.Lock()  # ``Pricer`` keeps memos: one request prices at a time
        #: (tenant, provider, model) → (rates, or None for an unknown model; monotonic time to read them again).
        self._rates: dict[tuple[str, str, str], tuple[Rates | None, float]] = {}

    def estimate(self, request: ReservationRequest, at: datetime) -> Estimate:
        output = (request.max_tokens or self.max_output_tokens) * request.n
        tokens = Decimal(request.input_tokens + output)
        rates = self._rates_of(request.tenant_id, request.provider, request.model, at)
        sides = {"input_tokens": Decimal(request.input_tokens), "output_tokens": Decimal(output)}
        if rates is None:
            return Estimate(self.unknown_usd, tokens, Decimal(1), bounded=False, **sides)
        cost = request.input_tokens * rates.input + output * rates.output
        # Rounded up: the stream rounds each class to 12 places, half-even; this stays above it.
        return Estimate(cost.quantize(MONEY_QUANTUM, rounding=ROUND_CEILING) + rates.fee, tokens, Decimal(1), **sides)

    def _rates_of(self, tenant: str, provider: str, model: str, at: datetime) -> Rates | None:
        key = (tenant, provider, model)
        found = self._rates.get(key)
        if found is not None and found[1] > time.monotonic():
            return found[0]
        with self._lock:
            if len(self._rates) >= 10_000:
                self._rates.clear()
            probes = {"fee": TokenUsage(), "output": TokenUsage(output_tokens=_PROBE),
                      "input": TokenUsage(input_tokens=_PROBE),
                      "cache_write": TokenUsage(input_tokens=_PROBE, cache_write_tokens=_PROBE),
                      "cache_write_1h": TokenUsage(input_tokens=_PROBE, cache_write_tokens=_PROBE,
                                                   cache_write_1h_tokens=_PROBE)}
            costs = {}
            for name, usage in probes.items():
                priced = self.pricer.price(UsageEvent(event_id="reservation-estimate", timestamp=at, tenant_id=tenant,
                                                      provider=provider, model=model, usage=usage))
                if not priced.priced:
                    self._rates[key] = None, time.monotonic() + self.REFRESH_S
                    return None
                costs[name] = priced.cost.total
            fee = costs["fee"]
            rates = Rates(max(costs["input"], costs["cache_write"], costs["cache_write_1h"]) - fee,
                          costs["output"] - fee, fee)
            per_token = Rates(rates.input / _PER_TOKEN, rates.output / _PER_TOKEN, fee)
            self._rates[key] = per_token, time.monotonic() + self.REFRESH_S
            return per_token
