# The ledger's row as the stream builds it (``LedgerRow``, defined in _native.pyx), declared here so
# that the stages' compiled module (streams/stages/_fast.pyx, ``RowBuilder``) fills its C fields.
from libc.stdint cimport int64_t


cdef class LedgerRow:
    # The event's fields and its price's provenance, as the attributed record holds them.
    cdef readonly object event_id, event_time, tenant_id, user_id, provider, model, service, route
    cdef readonly object feature, step, trace_id, span_id, parent_span_id, status, latency_ms
    cdef readonly object reservation_id, batch, tags, extra, usage, raw_usage, raw_usage_format
    cdef readonly object priced, unpriced_reason, matched_model, price_source, pricing_version
    cdef readonly object discount, discount_percent, business_path, attributed_at
    # Set by the quota stage once it has rated the call (``stamp``).
    cdef readonly object late, revenue_usd, billing_period
    # Token counts in ``schemas.usage.token_counts`` order; each cost class in ``CostBreakdown``'s
    # field order and their sum, in pico-dollars (the ledger's 12 places).
    cdef int64_t tokens[12]
    cdef int64_t costs[10]
    cdef readonly int64_t cost_usd_pico
    # Bit i: cost class i is a zero that pricing rounded to 12 places (``Decimal("0E-12")``, not the
    # shared zero); bit 10: so is their sum. The ``Decimal`` forms keep the exponent ``cost_of``
    # gives, so that sums of them (quota windows) print as they would.
    cdef int rounded_zeros
    # The Decimal forms, made on first read (or given, by a row priced in Decimal).
    cdef object _cost, _cost_usd

    cdef object _field(self, int slot)
    cpdef bint fits_ledger(self)
    cpdef stamp(self, object revenue, object period, bint late)
