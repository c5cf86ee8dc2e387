# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
"""The contract's fast decoder finished in C: what ``streams.stages.decoding`` checks after msgspec.

``Decoder`` (streams/stages/decoding.py) derives from the pydantic model what msgspec cannot check
itself (text pydantic would strip or lowercase, times to parse, nested models, the model's own
validators) and, for each decoded event, ran those steps in Python: 3.3 µs an event, twice
msgspec's whole decoding. ``Finisher`` runs the same steps, from the same derived plan, in C; the
model's own validators are still the model's Python functions, called as they were.

Every step may only *accept* or leave the input to pydantic (``Undecided``), exactly as the
Python steps did: ``tests/stages/test_decoding.py`` holds the decoder to pydantic with hypothesis,
and the same tests hold each step here to the Python it replaced.

``RowBuilder`` builds the ledger row of an event (``streams.storage._native.LedgerRow``) and prices
it in integer pico-dollars.
"""

from cpython.bytes cimport PyBytes_FromStringAndSize
from cpython.datetime cimport (datetime_day, datetime_hour, datetime_microsecond, datetime_minute, datetime_month,
                               datetime_new, datetime_second, datetime_year, import_datetime)
from cpython.object cimport PyObject_GetAttr, PyObject_SetAttr
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from cpython.ref cimport PyObject
from cpython.unicode cimport PyUnicode_GET_LENGTH
from libc.stdint cimport int64_t
cimport cython

from streams.storage._native cimport LedgerRow

import datetime as _dt
from sys import intern

import_datetime()

cdef object _UTC = _dt.timezone.utc

cdef extern from "Python.h":
    # (A code point as a plain integer: Cython gives its own ``Py_UCS4`` the semantics of a
    # one-character str, and arithmetic on it then goes through Python.)
    unsigned int PyUnicode_READ_CHAR(object text, Py_ssize_t index)
    bint Py_UNICODE_ISSPACE(unsigned int ch)
    bint PyUnicode_IS_ASCII(object op)
    int PyObject_GenericSetAttr(object obj, object name, object value) except -1


cdef inline bint _edges_are_space(str text):
    """``text.strip() != text``: Python strips exactly the characters ``Py_UNICODE_ISSPACE`` is
    true of, from both ends, so it changes the text exactly when an end is one of them."""
    cdef Py_ssize_t n = PyUnicode_GET_LENGTH(text)
    if n == 0:
        return False
    return Py_UNICODE_ISSPACE(PyUnicode_READ_CHAR(text, 0)) or Py_UNICODE_ISSPACE(PyUnicode_READ_CHAR(text, n - 1))


cdef inline bint _lower_ascii(str text):
    """``text.isascii() and text.lower() == text``: ASCII's ``lower`` changes only A-Z."""
    cdef Py_ssize_t i, n
    cdef unsigned int ch
    if not PyUnicode_IS_ASCII(text):
        return False
    n = PyUnicode_GET_LENGTH(text)
    for i in range(n):
        ch = PyUnicode_READ_CHAR(text, i)
        if 65 <= ch <= 90:
            return False
    return True


cdef inline int _digits(str text, Py_ssize_t at, Py_ssize_t count) except -2:
    """The number written by ``count`` ASCII digits at ``at``, or -1 if one is not a digit."""
    cdef int value = 0
    cdef Py_ssize_t i
    cdef unsigned int ch
    for i in range(at, at + count):
        ch = PyUnicode_READ_CHAR(text, i)
        if ch < 48 or ch > 57:
            return -1
        value = value * 10 + <int> (ch - 48)
    return value


def parse_utc(str text not None):
    """``_parse_utc``, for Python (the tests)."""
    return _parse_utc(text)


cdef object _parse_utc(str text):
    """``datetime.fromisoformat(text)`` for RFC 3339 times in UTC, written
    ``YYYY-MM-DDTHH:MM:SS[.f{1,6}]`` then ``Z``, ``+00:00`` or ``-00:00`` (those ``fromisoformat``
    gives ``timezone.utc``, the one ``tzinfo`` the stages compare fast); None for any other text,
    which the caller parses as before. A date or time out of range raises ``ValueError``, as
    ``fromisoformat`` does. What breaks if widened: a form accepted here that the Python path's
    pattern (``decoding._RFC3339``) refuses would be decided here instead of by pydantic."""
    cdef Py_ssize_t n = PyUnicode_GET_LENGTH(text)
    cdef Py_ssize_t end, i
    cdef int year, month, day, hour, minute, second, micro = 0, scale = 100000
    cdef unsigned int ch
    if n < 20:
        return None
    if (PyUnicode_READ_CHAR(text, 4) != 45 or PyUnicode_READ_CHAR(text, 7) != 45  # '-'
            or PyUnicode_READ_CHAR(text, 10) != 84                                 # 'T'
            or PyUnicode_READ_CHAR(text, 13) != 58 or PyUnicode_READ_CHAR(text, 16) != 58):  # ':'
        return None
    year, month, day = _digits(text, 0, 4), _digits(text, 5, 2), _digits(text, 8, 2)
    hour, minute, second = _digits(text, 11, 2), _digits(text, 14, 2), _digits(text, 17, 2)
    if year < 0 or month < 0 or day < 0 or hour < 0 or minute < 0 or second < 0:
        return None
    if hour > 23:  # ("24:00" is read by some Pythons' fromisoformat and not others': theirs to decide)
        return None
    end = 19
    if PyUnicode_READ_CHAR(text, 19) == 46:  # '.', then 1 to 6 digits
        i = 20
        while i < n and i < 26:  # (at most six digits: indices 20 to 25)
            ch = PyUnicode_READ_CHAR(text, i)
            if ch < 48 or ch > 57:
                break
            micro += <int> (ch - 48) * scale
            scale //= 10
            i += 1
        if i == 20 or (i < n and 48 <= PyUnicode_READ_CHAR(text, i) <= 57):
            return None  # no digit, or more than six
        end = i
    if n == end + 1:
        if PyUnicode_READ_CHAR(text, end) != 90:  # 'Z'
            return None
    elif n == end + 6:
        ch = PyUnicode_READ_CHAR(text, end)
        if (ch != 43 and ch != 45) or PyUnicode_READ_CHAR(text, end + 3) != 58:  # '+' or '-', ':'
            return None
        if _digits(text, end + 1, 2) != 0 or _digits(text, end + 4, 2) != 0:
            return None  # another offset: fromisoformat's own timezone
    else:
        return None
    return datetime_new(year, month, day, hour, minute, second, micro, _UTC)


cdef class Finisher:
    """``Decoder.finish_in_python`` of one model's plan (``streams.stages.decoding``), in C."""

    cdef tuple stripped, lowered, times, converted, nested, after
    cdef object undecided

    def __init__(self, stripped, lowered, times, converted, nested, after, undecided):
        """``times``: (field, the model's after-validators of that time) for each time field;
        ``converted``: (field, function) for every other converted field; ``nested``: (field,
        Finisher); ``after``: the model's own validators; ``undecided``: the exception to raise."""
        self.stripped, self.lowered = tuple(stripped), tuple(lowered)
        self.times, self.converted = tuple(times), tuple(converted)
        self.nested, self.after = tuple(nested), tuple(after)
        self.undecided = undecided

    cpdef finish(self, object decoded):
        cdef object name, value, step, check
        cdef tuple item
        for name in self.stripped:
            value = PyObject_GetAttr(decoded, name)
            if value is not None and _edges_are_space(value):
                raise self.undecided
        for name in self.lowered:
            value = PyObject_GetAttr(decoded, name)
            if value is not None and not _lower_ascii(value):
                raise self.undecided
        for item in self.times:
            name = item[0]
            value = PyObject_GetAttr(decoded, name)
            if value is None:
                continue
            try:
                at = _parse_utc(value)
                if at is None:
                    at = item[2](value)  # the Python parser: every other form, or Undecided
                else:
                    for step in item[1]:
                        at = step(at)
            except (ValueError, OverflowError):
                raise self.undecided from None
            PyObject_SetAttr(decoded, name, at)
        for item in self.converted:
            value = PyObject_GetAttr(decoded, item[0])
            if value is not None:
                PyObject_SetAttr(decoded, item[0], item[1](value))
        for item in self.nested:
            value = PyObject_GetAttr(decoded, item[0])
            if value is not None:
                (<Finisher> item[1]).finish(value)
        for check in self.after:
            try:
                check(decoded)
            except Exception:  # pydantic words the reason
                raise self.undecided from None
        return decoded


cdef extern from *:
    # (gcc and clang: the product or sum, and whether it overflowed 64 bits)
    bint __builtin_mul_overflow(int64_t a, int64_t b, int64_t *out)
    bint __builtin_add_overflow(int64_t a, int64_t b, int64_t *out)


cdef inline int64_t _times(int64_t tokens, int64_t rate, bint *overflow):
    cdef int64_t out
    if __builtin_mul_overflow(tokens, rate, &out):
        overflow[0] = True
    return out


cdef inline int64_t _plus(int64_t a, int64_t b, bint *overflow):
    cdef int64_t out
    if __builtin_add_overflow(a, b, &out):
        overflow[0] = True
    return out


cdef class RowBuilder:
    """The ledger row of an event (``streams.storage._native.LedgerRow``), priced, in C.

    What ``streams.stages.pricing.cost_of`` computes in ``Decimal`` is computed here in integers when
    the event's quote has whole pico-dollar rates (``Quote.pico``; most prices): a price per million
    tokens with at most six decimals is a whole number of pico-dollars a token, so each class's cost
    is exact in pico-dollars and equals ``cost_of``'s rounded ``Decimal``. The same steps, class by
    class (``tests/stages/test_rows.py`` holds the two to each other with hypothesis): change
    ``cost_of`` and ``_price_pico`` together. Any other quote, and a product beyond 64 bits, is
    priced by ``cost_of`` itself. A row whose cost is beyond the ledger's (``cost_usd_pico`` above
    ``MAX_COST_PICO``: ``BEYOND_LEDGER`` if it was priced in ``Decimal``, whose total may pass 64
    bits) is refused by attribution, and by ``NativeWriter.add_row``."""

    cdef object token_names, max_pico, beyond
    cdef int64_t max_tokens

    def __init__(self, token_names, provenance, max_tokens, max_pico, beyond):
        """``token_names``: ``TokenUsage``'s count fields in ``token_counts`` order, each at most
        ``max_tokens`` (the contract's bound: with rates below ``pricing.MAX_PICO_RATE`` no product or
        sum of costs then passes 64 bits; the overflow checks are there all the same); ``max_pico``:
        the ledger's largest cost; ``beyond``: what ``cost_usd_pico`` is set to above it;
        ``provenance``: the names of a quote's provenance values (``pricing.PROVENANCE``), in the
        order ``build`` reads them."""
        if tuple(provenance) != ("priced", "matched_model", "price_source", "pricing_version", "discount",
                                 "discount_percent", "unpriced_reason"):
            raise ValueError(f"RowBuilder reads a quote's provenance in another order than {tuple(provenance)}")
        self.token_names = tuple(intern(name) for name in token_names)
        if len(self.token_names) != 12:
            raise ValueError("RowBuilder reads 12 token counts")
        self.max_tokens, self.max_pico, self.beyond = max_tokens, max_pico, beyond

    def build(self, event, quote, business_path, attributed_at):
        cdef LedgerRow row = LedgerRow.__new__(LedgerRow)
        cdef int i
        row.event_id = event.event_id
        row.event_time = event.timestamp
        row.tenant_id = event.tenant_id
        row.user_id = event.user_id
        row.provider = event.provider
        row.model = event.model
        row.service = event.service
        row.route = event.route
        row.feature = event.feature
        row.step = event.step
        row.trace_id = event.trace_id
        row.span_id = event.span_id
        row.parent_span_id = event.parent_span_id
        row.status = event.status
        row.latency_ms = event.latency_ms
        row.reservation_id = event.reservation_id
        row.batch = event.batch
        row.tags = event.tags
        extra = event.model_extra
        row.extra = extra if extra else {}  # (a dict of its own: never one shared by every row)
        row.raw_usage = event.raw_usage
        row.raw_usage_format = event.raw_usage_format
        row.business_path = business_path
        row.attributed_at = attributed_at
        provenance = <tuple?> quote.provenance  # (``PROVENANCE``'s order: checked by ``__init__``)
        row.priced, row.matched_model, row.price_source, row.pricing_version, row.discount, \
            row.discount_percent, row.unpriced_reason = provenance
        usage = row.usage = event.usage
        if usage is None:  # (a bare contract object: validation always gives one)
            return row
        for i in range(12):
            count = PyObject_GetAttr(usage, self.token_names[i])
            # (The contract's counts are ints of 0 to 10^9: a value that is not, from an event built
            # without validation, is refused, not truncated or wrapped into a C integer.)
            if type(count) is not int or not 0 <= count <= self.max_tokens:
                raise TypeError(f"usage.{self.token_names[i]}: expected a token count, got {count!r}")
            row.tokens[i] = count
        if quote.rates is None:
            return row  # not priced: every cost the shared zero
        pico = quote.pico
        if pico is None or not _price_pico(row, pico):
            self._price_decimal(row, quote.priced_for(usage).cost)
        return row

    cdef _price_decimal(self, LedgerRow row, cost):
        """A row priced by ``cost_of`` (``cost``: its ``CostBreakdown``), its ``Decimal`` forms kept."""
        cdef int i
        total = cost.total
        row._cost, row._cost_usd = cost, total
        if total > self.max_pico * _PICO_UNIT:
            row.cost_usd_pico = self.beyond  # refused by attribution: never written
            return
        values = (cost.input, cost.cache_read, cost.cache_write, cost.output, cost.reasoning, cost.input_audio,
                  cost.input_image, cost.output_audio, cost.output_image, cost.request)
        rounded = 0
        for i in range(10):
            row.costs[i] = int(values[i].scaleb(12))  # (exact: rounded to 12 places)
            if values[i].as_tuple().exponent:  # (as ``_price_pico`` marks them: the quota stage reads these)
                rounded |= 1 << i
        row.cost_usd_pico = int(total.scaleb(12))
        row.rounded_zeros = rounded | ((1 << 10) if total.as_tuple().exponent else 0)


cdef object _PICO_UNIT = __import__("decimal").Decimal("1E-12")


cdef bint _price_pico(LedgerRow row, tuple pico) except -1:
    """``cost_of`` in pico-dollars into ``row``, from ``Quote.pico``; False if a product or the sum
    overflowed 64 bits (then nothing in ``row`` is to be kept)."""
    cdef int64_t *t = row.tokens
    cdef int64_t *c = row.costs
    cdef int64_t p[13]
    cdef int i, rounded = 0
    cdef int64_t uncached, total = 0
    cdef bint over = False
    if len(pico) != 14:  # (read below without bounds checks)
        raise ValueError(f"Quote.pico holds 14 numbers (pricing.pico_rates), not {len(pico)}")
    for i in range(13):
        p[i] = pico[i]
    # t: input, cache_read, cache_write, output, reasoning, cache_write_1h, input_audio,
    #    cache_audio_read, input_image, cache_image_read, output_audio, output_image
    # p: those classes' rates, then the per-call fee (rounded as ``cost_of`` rounds it)
    # c: input, cache_read, cache_write, output, reasoning, input_audio, input_image, output_audio,
    #    output_image, request
    # A class ``cost_of`` rounds (bit i of ``rounded``) is a Decimal of 12 places even when zero; one
    # it skips (no tokens) is the shared zero.
    for i in range(10):
        c[i] = 0
    uncached = t[0] - t[1] - t[2]
    if t[2]:
        c[2] = _plus(_times(t[2] - t[5], p[2], &over), _times(t[5], p[5], &over), &over)
        rounded |= 1 << 2
    if not (t[6] or t[8] or t[10] or t[11] or t[7] or t[9]):  # text only
        if uncached:
            c[0] = _times(uncached, p[0], &over)
            rounded |= 1 << 0
        if t[1]:
            c[1] = _times(t[1], p[1], &over)
            rounded |= 1 << 1
        if t[3] - t[4]:
            c[3] = _times(t[3] - t[4], p[3], &over)
            rounded |= 1 << 3
    else:
        uncached = uncached - (t[6] - t[7]) - (t[8] - t[9])
        if uncached:
            c[0] = _times(uncached, p[0], &over)
            rounded |= 1 << 0
        c[1] = _plus(_plus(_times(t[1] - t[7] - t[9], p[1], &over), _times(t[7], p[7], &over), &over),
                     _times(t[9], p[9], &over), &over)
        rounded |= 1 << 1  # (``cost_of`` rounds this sum whatever its counts)
        if t[3] - t[4] - t[10] - t[11]:
            c[3] = _times(t[3] - t[4] - t[10] - t[11], p[3], &over)
            rounded |= 1 << 3
        if t[6] - t[7]:
            c[5] = _times(t[6] - t[7], p[6], &over)
            rounded |= 1 << 5
        if t[8] - t[9]:
            c[6] = _times(t[8] - t[9], p[8], &over)
            rounded |= 1 << 6
        if t[10]:
            c[7] = _times(t[10], p[10], &over)
            rounded |= 1 << 7
        if t[11]:
            c[8] = _times(t[11], p[11], &over)
            rounded |= 1 << 8
    if t[4]:
        c[4] = _times(t[4], p[4], &over)
        rounded |= 1 << 4
    if pico[13]:  # the rate had a per-call fee (``cost_of`` rounds it, to zero if below a pico-dollar)
        c[9] = p[12]
        rounded |= 1 << 9
    for i in range(10):
        total = _plus(total, c[i], &over)
    if over:
        return False
    row.cost_usd_pico = total
    row.rounded_zeros = rounded | ((1 << 10) if rounded else 0)
    return True


# ---- rating a tenant's rows -----------------------------------------------------------------------

cdef object _OUTCOME = None, _CLOSED = None, _QUANTUM = None, _RZERO = None, _RONE = None, _DECIMAL = None
cdef object _INCREMENT = None, _SEGMENT_OF = None
cdef object _NO_VALUES = object()


def configure_rating(outcome, closed, quantum, zero, one, increment, segment_of):
    """What ``rate_rows`` makes and calls, from ``streams.stages.revenue`` and ``rating`` (at their
    import: this module does not import them)."""
    global _OUTCOME, _CLOSED, _QUANTUM, _RZERO, _RONE, _DECIMAL, _INCREMENT, _SEGMENT_OF
    # (Made and read by position here: a field added or moved must be added or moved here too.)
    if outcome._fields != ("revenue", "late", "period"):
        raise AssertionError(f"RevenueOutcome's fields changed: {outcome._fields}")
    _OUTCOME, _CLOSED, _QUANTUM, _RZERO, _RONE = outcome, closed, quantum, zero, one
    _INCREMENT, _SEGMENT_OF = increment, segment_of
    _DECIMAL = type(zero)
    _configure_decimal(zero)


cdef inline object _quantity(LedgerRow row, object metric):
    """``revenue.quantity_of`` of a row: its C token counts, not its usage object's."""
    if metric == "cost_usd":
        return row.cost_usd
    if metric == "requests":
        return _RONE
    if metric == "input_tokens":
        return _DECIMAL(row.tokens[0])
    if metric == "output_tokens":
        return _DECIMAL(row.tokens[3])
    return _DECIMAL(row.tokens[0] + row.tokens[3])


def rate_rows(meter, card, zone, tenant, list rows, dict entry, watermark_limit, list at):
    """``RevenueMeter._rate_one`` for each of one tenant's rows, in order, in the exact context
    ``rate_all`` set: what it does for an event in the period of the event before, with that period
    the only one open, in C (most events: in integers, ``_rate_ints``, else on the ``Decimal``
    values); an event in another period has it opened by ``_open``, which leaves ``at`` (the
    period, its state, its derived values) for the next, then goes on here, or is charged by
    ``_charge`` where other periods are open too. The same steps in the same order, to the same
    values: change ``_open``'s, ``_charge``'s and these together (``tests/stages/test_revenue.py``
    holds rows rated here to records rated there, and ``tests/runtime/test_paths.py`` on 200,000
    events)."""
    cdef list outcomes = []
    cdef LedgerRow row
    cdef dict q, segments, state, v
    cdef list derived, charges = None, pending_derived = None
    cdef dict pending_q = None
    # The running bill of consecutive rows rated in integers, written to their derived values once
    # they end (before any other step reads them, and if a row fails): two ``Decimal``s a row fewer.
    cdef _Pending pending
    pending.on, pending.quantities = False, 0
    spend_cap = card.spend_cap
    last_values = _NO_VALUES
    filtered = None
    try:
        for row in rows:
            period, state = at[0], at[1]
            time = row.event_time
            if state is None or not (period.start <= time < period.end):
                # A group's first row, or a period's: opened by ``_open`` (which moves the tenant's
                # watermark first, as below), then charged here in C when it is the only period open.
                # (``_rate_one`` whole took the first row of every tenant group: a fifth of the rows
                # with five rows a tenant and batch.)
                _flush(&pending, pending_derived, pending_q)
                opened = meter._open(card, zone, tenant, row, entry, watermark_limit, at)
                if opened is None:
                    outcomes.append(_CLOSED)
                    continue
                if at[1] is None:  # (more than one period open, as at a month's turn: rare, by ``_charge``)
                    outcomes.append(meter._charge(card, row, *opened))
                    continue
                period, state = at[0], at[1]
            else:
                mark = time if time <= watermark_limit else watermark_limit
                if mark > entry["w"]:
                    entry["w"] = mark
            derived = at[2]
            if pending.on and derived is not pending_derived:
                _flush(&pending, pending_derived, pending_q)
            q = state["q"]
            # The card's charges for the row: the same list while the fields they filter on repeat,
            # and ``_charges_for``'s memo read here (a call of it cost 4,000 instructions a row).
            if filtered is None:
                filtered = meter._filtered.get(id(card))
                if filtered is None:  # (the meter's first row of this card: ``_charges_for`` makes the memo)
                    meter._charges_for(card, row)
                    filtered = meter._filtered[id(card)]
            # (A card filtering on one field reads that field's value, None included: compared with
            # the row before's only once both were read the same way.)
            values = filtered[0](row) if filtered[0] is not None else None
            if charges is None or values != last_values:
                found = (<dict> filtered[1]).get(values)
                charges = found if found is not None else meter._charges_for(card, row)
                last_values = values
            if _rate_ints(row, charges, q, derived, spend_cap, period.label, outcomes, &pending):
                pending_derived, pending_q = derived, q
                continue
            _flush(&pending, pending_derived, pending_q)
            running, billed_before, segments = derived[0], derived[1], derived[2]
            added = _RZERO
            for charge in charges:
                cid = charge.id
                before = q.get(cid, _RZERO)
                after = before + _quantity(row, charge.metric)
                q[cid] = after
                segment = segments.get(cid)
                if segment is not None and segment[0] < before and (segment[1] is None or after <= segment[1]):
                    step = (after - before) * segment[2]
                else:
                    step = _INCREMENT(charge, before, after)
                    segments[cid] = _SEGMENT_OF(charge, after)
                if charge.price == "volume":
                    v = state["v"]
                    v[cid] = v.get(cid, _RZERO) + step
                discount = charge.discount_percent
                added = added + (step * (100 - discount) / 100 if discount else step)  # (``rating.net``)
            running = running + added
            derived[0] = running
            billed = (spend_cap if spend_cap is not None and running > spend_cap else running).quantize(_QUANTUM)
            derived[1] = billed
            outcomes.append(tuple.__new__(_OUTCOME, (billed - billed_before, False, period.label)))
    finally:
        _flush(&pending, pending_derived, pending_q)
    return outcomes


# ---- a quota window's events, summed in integers -------------------------------------------------
# ``QuotaEngine._sum_window`` and ``_margin_window`` add up ``Decimal`` amounts event by event; for
# the stream's rows the amounts are C integers already (costs in pico-dollars, token counts) and a
# rated call's revenue is a whole number of pico-dollars (``RevenueMeter`` rounds every bill to 12
# places). Summed here in 64 bits, a window's ``Decimal`` is made once, with the exponent the
# ``Decimal`` sum would have had: the least exponent of its terms (an addition within the context's
# 28 digits is exact and keeps the lesser exponent). That exponent shows: sums print into quota
# states and the changelog. A term's exponent is 0 or -12 here (a cost ``cost_of`` skipped, a count,
# an unrated call's revenue: 0; any other money: -12); a window whose usage has another exponent,
# or is beyond 64 bits at its scale (about $9.2 million, or 9.2 × 10^18 tokens or calls: every sum
# within 64 bits is exact in ``Decimal``'s 28 digits), or whose sums would pass 64 bits, is left to
# the ``Decimal`` code (``None``), before anything is changed.

cdef extern from *:
    ctypedef long long int128 "__int128"

# A ``Decimal``'s sign, exponent and coefficient read from the object itself, as CPython's C
# ``decimal`` module lays it out (Modules/_decimal/_decimal.c: ``PyDecObject``, libmpdec's
# ``mpd_t``: flags, exponent, digits, words, allocated words, the words in base 10^19): a few
# instructions, where ``as_tuple`` or ``int(d.scaleb(12))`` cost hundreds and made the integer sums
# slower than the ``Decimal`` ones. Read only after ``_check_layout`` has found, at import, that
# this interpreter's objects are laid out so; otherwise ``_parts`` falls back to ``as_tuple``.
cdef extern from *:
    """
    typedef struct { uint8_t flags; Py_ssize_t exp; Py_ssize_t digits; Py_ssize_t len; Py_ssize_t alloc;
                     uint64_t *data; } costline_mpd;
    typedef struct { PyObject_HEAD Py_hash_t hash; costline_mpd dec; } costline_decimal;
    static inline costline_mpd *costline_mpd_of(PyObject *o) { return &((costline_decimal *) o)->dec; }
    """
    ctypedef struct costline_mpd:
        unsigned char flags
        Py_ssize_t exp
        Py_ssize_t len
        unsigned long long *data
    costline_mpd *costline_mpd_of(object o)

cdef object _W_ZERO = None, _W_PICO = None, _W_CEILING = None, _MARGIN_PERCENT = None, _W_DECIMAL = None
cdef object _COUNTED = None, _EVENT_OUTCOME = None
cdef bint _LAYOUT = False
#: id(limit) → (the limit, its thresholds' amounts as ceilings of integers at the metric's scale, and
#: for a margin floor: the floor × 10^4 if that is a whole number, else None, and ``min_revenue`` in
#: whole pico-dollars, rounded up): the amounts compared with integer sums.
cdef dict _AMOUNTS = {}
import decimal as _decimal
#: A context in which scaling and rounding a plan's amounts is exact, whatever their digits.
cdef object _UNBOUNDED = _decimal.Context(prec=_decimal.MAX_PREC, Emax=_decimal.MAX_EMAX, Emin=_decimal.MIN_EMIN)
cdef int64_t _POW12 = 1000000000000
cdef int64_t _I64_MAX = 0x7FFFFFFFFFFFFFFF


def configure_windows(zero, margin_percent, ceiling, counted, event_outcome):
    """The quota stage's ``Decimal`` zero, its ``margin_percent``, ``decimal.ROUND_CEILING``, its
    ``Counted`` and its ``EventOutcome`` (``streams.stages.quotas``, at its import)."""
    global _W_ZERO, _MARGIN_PERCENT, _W_CEILING, _COUNTED, _EVENT_OUTCOME
    # (Made by position here: a field added or moved must be added or moved here too.)
    if counted._fields != ("ref", "usage", "as_of", "judged") \
            or event_outcome._fields != ("duplicate", "late", "rated"):
        raise AssertionError(f"Counted's or EventOutcome's fields changed: {counted._fields}, {event_outcome._fields}")
    _W_ZERO, _MARGIN_PERCENT, _W_CEILING = zero, margin_percent, ceiling
    _COUNTED, _EVENT_OUTCOME = counted, event_outcome
    _configure_decimal(zero)


cdef _configure_decimal(zero):
    """The ``Decimal`` type that ``_parts`` reads and the integer steps make, and whether it reads
    them from the objects (``_check_layout``): from ``configure_windows`` or ``configure_rating``."""
    global _W_PICO, _W_DECIMAL, _LAYOUT, _NEGATIVE_POWERS
    if _W_DECIMAL is type(zero):
        return
    _LAYOUT = False
    _W_DECIMAL = type(zero)
    _W_PICO = _W_DECIMAL("1E-12")
    _NEGATIVE_POWERS = [_W_DECIMAL(f"1E-{k}") for k in range(41)]
    _LAYOUT = _check_layout()


cdef bint _check_layout() except -1:
    """Whether ``_parts`` read from the objects gives what ``as_tuple`` gives, on values of every
    kind it meets or refuses (only then is it read so; the C module is the only one laid out so)."""
    if _W_DECIMAL.__module__ != "decimal" or _W_DECIMAL.__name__ != "Decimal" \
            or not hasattr(__import__("decimal"), "__libmpdec_version__"):
        return False
    cdef int64_t coefficient, tuple_coefficient
    cdef int exp, tuple_exp
    cdef bint ok
    for text in ("0", "0E-12", "-0", "-123.4500", "1E-12", "7.25", "9223372036854775806", "9223372036854775807",
                 "9999999999999999999", "10000000000000000000", "123456789012345678901234567890", "-5E+3",
                 "NaN", "-sNaN", "Infinity", "-Infinity", "0.000001569000"):
        value = _W_DECIMAL(text)
        ok = _read_parts(value, &coefficient, &exp)
        if ok != _tuple_parts(value, &tuple_coefficient, &tuple_exp):
            return False
        if ok and (coefficient != tuple_coefficient or exp != tuple_exp):
            return False
    return True


def decimal_parts(value):
    """(coefficient, exponent) of a ``Decimal`` as the window sums read it, or None where they do not
    sum it; and whether it was read from the object (for the tests)."""
    cdef int64_t coefficient
    cdef int exp
    return ((coefficient, exp) if _parts(value, &coefficient, &exp) else None), _LAYOUT


cdef bint _read_parts(object value, int64_t *coefficient, int *exp):
    """A finite ``Decimal``'s coefficient (signed, below 2^63 - 1) and exponent (within an ``int``)
    read from the object; False for any other."""
    cdef costline_mpd *d = costline_mpd_of(value)
    if d.flags & 14 or d.len != 1 or d.data[0] >= <unsigned long long> _I64_MAX \
            or not -1000000 < d.exp < 1000000:  # (14: infinite or NaN)
        return False
    coefficient[0] = -<int64_t> d.data[0] if d.flags & 1 else <int64_t> d.data[0]
    exp[0] = <int> d.exp
    return True


cdef bint _tuple_parts(object value, int64_t *coefficient, int *exp) except -1:
    """``_read_parts`` by ``as_tuple``."""
    if not value.is_finite():
        return False
    sign, digits, exponent = value.as_tuple()
    number = int("".join(map(str, digits)))
    if number >= _I64_MAX or not -1000000 < exponent < 1000000:
        return False
    coefficient[0], exp[0] = (-number if sign else number), exponent
    return True


cdef inline bint _parts(object value, int64_t *coefficient, int *exp) except -1:
    if type(value) is not _W_DECIMAL:
        return False
    return _read_parts(value, coefficient, exp) if _LAYOUT else _tuple_parts(value, coefficient, exp)


cdef inline int _cost_exp(LedgerRow row):
    """The exponent of ``row.cost_usd``: -12 unless pricing skipped the cost (the shared zero)."""
    return -12 if row.cost_usd_pico != 0 or row.rounded_zeros & (1 << 10) else 0


cdef bint _scaled(object value, int scale, int64_t *out, int *exp) except -1:
    """A ``Decimal`` of exponent 0 or -``scale`` as an integer at ``scale`` (12: pico-dollars; 0: a
    count) within 64 bits, and its exponent; False for any other. (A sum of such values within 64
    bits has at most 19 digits: exact in ``Decimal``'s 28.)"""
    cdef int64_t coefficient
    cdef int e
    if not _parts(value, &coefficient, &e):
        return False
    if e == 0 and scale == 12:
        if not -9223372 <= coefficient <= 9223372:
            return False
        out[0] = coefficient * _POW12
    elif e == 0 or e == -scale:
        out[0] = coefficient
    else:
        return False
    exp[0] = e
    return True


cdef inline object _unscaled(int64_t value, int exp, int scale):
    """The ``Decimal`` of ``value`` at ``scale``, with exponent ``exp`` (0 or -12)."""
    if exp == -12:
        return _W_PICO * value
    return _W_DECIMAL(value // _POW12 if scale == 12 else value)


cdef inline int64_t _saturated(object amount):
    return _I64_MAX if amount >= _I64_MAX else (-_I64_MAX if amount <= -_I64_MAX else amount)


cdef tuple _amounts(limit, int scale):
    found = _AMOUNTS.get(id(limit))
    if found is None:
        if len(_AMOUNTS) >= 1000:
            _AMOUNTS.clear()
        with _decimal.localcontext(_UNBOUNDED):  # (exact: the reference compares the amounts exactly)
            found = _amounts_of(limit, scale)
    return <tuple> found


cdef tuple _amounts_of(limit, int scale):
    ceilings = tuple(_saturated(int(level[2].scaleb(scale).to_integral_value(rounding=_W_CEILING)))
                     for level in limit.levels)
    floor = minimum = None
    if limit.metric == "margin_percent":
        scaled = limit.levels[0][2].scaleb(4)
        if scaled == scaled.to_integral_value() and -10**12 < scaled < 10**12:
            floor = int(scaled)
        minimum = _saturated(int(limit.min_revenue.scaleb(12).to_integral_value(rounding=_W_CEILING)))
    found = _AMOUNTS[id(limit)] = (limit, ceilings, floor, minimum)
    return found


def sum_window(engine, ref, dict window, list js, list group, list rated, list positions, offsets, int li,
               collected):
    """``QuotaEngine._sum_window`` for rows, in integers: the window's usage after its events, with
    each threshold crossed at the event ``_sum_window`` finds; None, with nothing changed, where
    ``_sum_window`` must do it. The same outcome: change the two together
    (``tests/stages/test_quota_batches.py`` holds rows summed here to records summed there)."""
    cdef Py_ssize_t n = len(js), i, k
    cdef int scale, kind, exp, e0, lowest
    cdef int64_t v0, running, highest, term, ceiling
    cdef LedgerRow row
    cdef bint over = False
    limit = ref.limit
    metric = limit.metric
    if metric == "cost_usd":
        kind, scale = 0, 12
    elif metric == "tokens":
        kind, scale = 1, 0
    elif metric == "revenue_usd":
        kind, scale = 2, 12
    else:
        kind, scale = 3, 0
    if not _scaled(window["usage"], scale, &v0, &e0):
        return None
    cdef int64_t *terms = <int64_t *> PyMem_Malloc((n + 1) * sizeof(int64_t))
    cdef signed char *exps = <signed char *> PyMem_Malloc((n + 1) * sizeof(signed char))
    if terms == NULL or exps == NULL:
        PyMem_Free(terms)
        PyMem_Free(exps)
        raise MemoryError()
    try:
        running, highest, lowest = v0, _I64_MAX, e0
        for i in range(n):
            j = js[i]
            x = group[j]
            if type(x) is not LedgerRow:
                return None
            row = <LedgerRow> x
            if kind == 0:
                term, exp = row.cost_usd_pico, _cost_exp(row)
            elif kind == 1:
                term, exp = row.tokens[0] + row.tokens[3], 0
            elif kind == 2:
                revenue = (<tuple> rated[j])[0]
                if not revenue:  # (``rated[j].revenue or _ZERO``: an unrated or free call adds the zero)
                    term, exp = 0, 0
                elif not _scaled(revenue, 12, &term, &exp):
                    return None
            else:
                term, exp = 1, 0
            terms[i], exps[i] = term, exp
            running = _plus(running, term, &over)
            if i == 0 or running > highest:
                highest = running
            if exp < lowest:
                lowest = exp
        if over or highest >= _I64_MAX:
            return None
        levels = limit.levels
        crossed = window.get("crossed")
        if levels and (crossed is None or any(level[3] not in crossed for level in levels)):
            ceilings = (<tuple> _amounts(limit, scale))[1]
            for k in range(len(levels)):
                ceiling = ceilings[k]
                if highest < ceiling:
                    break
                if crossed is None:
                    crossed = window["crossed"] = {}
                level = levels[k]
                if level[3] in crossed:
                    continue
                # The first event whose running usage reaches the threshold, and that usage.
                running, exp = v0, e0
                for i in range(n):
                    running += terms[i]
                    if exps[i] < exp:
                        exp = exps[i]
                    if running >= ceiling:
                        break
                engine._crossed(ref, window, crossed, k, level[2], _unscaled(running, exp, scale), group[js[i]],
                                positions[js[i]], offsets, li, collected)
        running = v0
        for i in range(n):
            running += terms[i]
        return _unscaled(running, lowest, scale)
    finally:
        PyMem_Free(terms)
        PyMem_Free(exps)


def margin_window(engine, ref, dict window, list js, list group, list rated, list positions, offsets, int li,
                  collected):
    """``QuotaEngine._margin_window`` for rows, in integers: (margin percent, judged) after the
    window's rated events, the floor's crossing at the event ``_margin_window`` finds; None, with
    nothing changed, where ``_margin_window`` must do it. A margin is computed (in ``Decimal``, by
    ``margin_percent``) only where it may be below the floor: (R - C) × 10^6 ≥ floor × 10^4 × R says
    the exact margin, (R - C) × 100 / R, is at or above the floor, and rounding it (to the context's
    28 digits, then to 4 places) cannot take it below a floor that both represent. Change the two
    together (``tests/stages/test_quota_batches.py``)."""
    cdef Py_ssize_t n = len(js), i
    cdef int64_t r, c, r0, c0, term
    cdef int er0, ec0, exp
    cdef bint over = False
    if not (_scaled(window.get("revenue", _W_ZERO), 12, &r0, &er0)
            and _scaled(window.get("cost", _W_ZERO), 12, &c0, &ec0)):
        return None
    # Every event's revenue in 64 bits, and the sums too, before anything is changed.
    cdef int64_t *terms = <int64_t *> PyMem_Malloc(n * sizeof(int64_t) + 1)
    cdef signed char *exps = <signed char *> PyMem_Malloc(n * sizeof(signed char) + 1)
    if terms == NULL or exps == NULL:
        PyMem_Free(terms)
        PyMem_Free(exps)
        raise MemoryError()
    try:
        r, c = r0, c0
        for i in range(n):
            j = js[i]
            x = group[j]
            if type(x) is not LedgerRow or not _scaled((<tuple> rated[j])[0], 12, &term, &exp):
                return None
            terms[i], exps[i] = term, exp
            r = _plus(r, term, &over)
            c = _plus(c, (<LedgerRow> x).cost_usd_pico, &over)
        if over or r >= _I64_MAX or c >= _I64_MAX:
            return None
        return _margin_rows(engine, ref, window, js, group, positions, offsets, li, collected, terms, exps, r0, er0,
                            c0, ec0)
    finally:
        PyMem_Free(terms)
        PyMem_Free(exps)


cdef object _margin_rows(engine, ref, dict window, list js, list group, list positions, offsets, int li, collected,
                         int64_t *terms, signed char *exps, int64_t r, int er, int64_t c, int ec):
    """``margin_window`` once every term is known to be summed exactly."""
    cdef Py_ssize_t n = len(js), i
    cdef int64_t minimum
    cdef LedgerRow row
    cdef bint watching, filtered
    cdef int128 floor4 = 0
    limit = ref.limit
    window.setdefault("revenue", _W_ZERO)  # (the keys in ``_margin_window``'s order: the changelog's)
    window.setdefault("cost", _W_ZERO)
    level = limit.levels[0]
    amount = level[2]
    crossed = window.get("crossed")
    watching = crossed is None or level[3] not in crossed
    amounts = _amounts(limit, 12)
    floor, minimum = amounts[2], amounts[3]
    filtered = floor is not None
    if filtered:
        floor4 = <int128> (<int64_t> floor)
    for i in range(n):
        j = js[i]
        row = <LedgerRow> group[j]
        r += terms[i]
        if exps[i] < er:
            er = exps[i]
        c += row.cost_usd_pico
        if _cost_exp(row) < ec:
            ec = -12
        if watching and r >= minimum and r > 0:
            if filtered and (<int128> r - <int128> c) * 1000000 >= floor4 * r:
                continue  # at or above the floor
            usage = _MARGIN_PERCENT(_unscaled(r, er, 12), _unscaled(c, ec, 12))
            if usage < amount:
                crossed = window.setdefault("crossed", {})
                engine._crossed(ref, window, crossed, 0, amount, usage, row, positions[j], offsets, li, collected)
                watching = False
    revenue, cost = _unscaled(r, er, 12), _unscaled(c, ec, 12)
    window["revenue"], window["cost"] = revenue, cost
    return _MARGIN_PERCENT(revenue, cost), r >= minimum and r > 0


# ---- a tenant group's windows --------------------------------------------------------------------
# ``QuotaEngine._count_group``'s loops over a group's events and windows, in C: the same reads,
# calls and values in the same order as ``apply`` event by event (``tests/stages/test_quota_batches.py``
# holds the two to the same outcome). Checked bounds: an index out of range raises (and the tenant's
# events still land, as ``apply_batch`` catches it), where this file's default would read past a list.

@cython.boundscheck(True)
def group_marks(records, list positions, watermark_limit, mark):
    """A tenant group's records in order, their event times, the tenant's watermark after each
    (``apply`` moves it before counting the event, as ``WatermarkBound.moved_to`` clamps it: to the
    event's time, at most ``watermark_limit``, never back from ``mark``: change them together) and
    their reservations, with whether any event has one."""
    cdef Py_ssize_t i, n = len(positions)
    cdef list group = [None] * n, times = [None] * n, marks = [None] * n, reservations = [None] * n
    cdef bint reserving = False
    for i in range(n):
        record = records[positions[i]]
        group[i] = record
        at = record.event_time
        times[i] = at
        if at > watermark_limit:
            at = watermark_limit
        if mark is None or at > mark:
            mark = at
        marks[i] = mark
        reservation = record.reservation_id
        if reservation is not None:
            reservations[i] = reservation
            reserving = True
    return group, times, marks, reservations, reserving


cdef inline tuple _tuple(value):
    """``value`` as a tuple (a named tuple's fields read by index), or TypeError."""
    if not isinstance(value, tuple):
        raise TypeError(f"a tuple, not {type(value).__name__}")
    return <tuple> value


cdef inline list _list(value):
    if not isinstance(value, list):
        raise TypeError(f"a list, not {type(value).__name__}")
    return <list> value


cdef object _BOUNDS = None, _WINDOW_REF = None, _WINDOW_KEY = None, _STATE_KEY = None
cdef Py_ssize_t _REF_MEMO = 0, _RECENT = 0


def configure_refs(bounds, window_ref, Py_ssize_t memo_size, Py_ssize_t recent, window_key, state_key):
    """The quota stage's ``Bounds`` and ``WindowRef``, its memo size, how many windows
    ``bounds_of`` remembers per kind and zone, ``window_key`` and ``schemas.quota.state_key``
    (``streams.stages.quotas``, at its import)."""
    global _BOUNDS, _WINDOW_REF, _REF_MEMO, _RECENT, _WINDOW_KEY, _STATE_KEY
    # (Read and made by position here: a field added or moved must be added or moved here too.)
    if bounds._fields != ("start", "end", "start_text", "end_text", "expires") or window_ref._fields != (
            "key", "tenant", "limit", "scope_value", "start", "end", "state_key"):
        raise AssertionError(f"Bounds' or WindowRef's fields changed: {bounds._fields}, {window_ref._fields}")
    _BOUNDS, _WINDOW_REF, _REF_MEMO, _RECENT, _WINDOW_KEY, _STATE_KEY = \
        bounds, window_ref, memo_size, recent, window_key, state_key


@cython.boundscheck(True)
cpdef tuple bounds_of(dict recent_bounds, kind, at, zone, grace):
    """``QuotaEngine._bounds``: the window of ``kind`` holding ``at`` in ``zone``, from the last few
    of each kind and zone in ``recent_bounds`` (the most recent first, ``configure_refs``'s number of
    them), or made (``Bounds.of``) and remembered."""
    recent = recent_bounds.get((kind, zone))
    if recent is None:
        recent = recent_bounds[(kind, zone)] = []
    for bounds in _list(recent):
        if _tuple(bounds)[0] <= at < (<tuple> bounds)[1]:  # (``Bounds``: start, end)
            return <tuple> bounds
    made = _tuple(_BOUNDS.of(kind, at, zone, grace))
    (<list> recent).insert(0, made)
    del (<list> recent)[_RECENT:]
    return made


@cython.boundscheck(True)
cpdef object window_ref(dict refs, tenant, limit, scope, bounds):
    """``QuotaEngine._ref``: the ``WindowRef`` of ``tenant``'s window of ``limit`` and ``scope`` at
    ``bounds``, from the engine's memo ``refs`` (emptied once it holds ``configure_refs``'s memo
    size), or made and remembered."""
    cdef tuple b = _tuple(bounds)
    limit_id = limit.id
    start = b[0]
    ident = (tenant, limit_id, scope, start)
    ref = refs.get(ident)
    if ref is None:
        if len(refs) >= _REF_MEMO:
            refs.clear()
        start_text = b[2]
        ref = refs[ident] = tuple.__new__(_WINDOW_REF, (
            _WINDOW_KEY(tenant, limit_id, scope, start_text), tenant, limit, scope, start, b[1],
            _STATE_KEY(tenant, limit_id, scope, start_text)))
    return ref


@cython.boundscheck(True)
def group_windows(engine, tenant, list limits, zone, list group, list times, list marks, list late):
    """Each limit's windows of a tenant group (``group_marks``'s lists): for each limit a dict of
    window key → (its ``WindowRef``, ``Bounds``, the events in it by index in ``group``), in the
    order ``apply`` meets them. An event past a window's grace period at its own watermark is late
    for it: marked in ``late`` and in none of that limit's windows. Through the engine's memos
    (``bounds_of``, ``window_ref``): the same objects as its ``_bounds`` and ``_ref`` give."""
    cdef Py_ssize_t j, n = len(group)
    cdef list last
    cdef dict found, recent_bounds = engine._last_bounds, refs = engine._refs
    grace = engine.grace
    cdef list by_limit = []
    cdef tuple bounds
    cdef bint scoped
    if n == 0 or len(times) != n or len(marks) != n or len(late) != n:
        raise ValueError(f"{n} events, {len(times)} times, {len(marks)} marks, {len(late)} late")
    earliest, latest, mark = min(times), max(times), marks[n - 1]
    for limit in limits:
        found = {}
        by_limit.append(found)
        kind, scope = limit.window, limit.scope
        scoped = scope != "tenant"
        bounds = bounds_of(recent_bounds, kind, earliest, zone, grace)
        if not scoped and latest < bounds[1] and bounds[4] > mark:  # (``Bounds``: end, expires)
            # Most groups: every event in one window, none of them late (the watermark only grows,
            # and the last one is ``mark``): no look at the events one by one.
            ref = window_ref(refs, tenant, limit, "*", bounds)
            found[_tuple(ref)[0]] = (ref, bounds, list(range(n)))
            continue
        last_bounds, last = None, None
        for j in range(n):
            bounds = bounds_of(recent_bounds, kind, times[j], zone, grace)
            if bounds[4] <= marks[j]:
                late[j] = True
                continue
            if bounds is last_bounds and not scoped:  # the window of the event before
                last.append(j)
                continue
            record = group[j]
            ref = window_ref(refs, tenant, limit,
                             limit.scope_value(record.user_id, record.model, record.business_path), bounds)
            key = _tuple(ref)[0]
            entry = found.get(key)
            if entry is None:
                entry = found[key] = (ref, bounds, [])
            last_bounds, last = bounds, _list(_tuple(entry)[2])
            last.append(j)
    return by_limit


@cython.boundscheck(True)
def stored_windows(list by_limit, windows, partition, offsets, list positions):
    """Each of ``by_limit``'s windows as ``windows`` holds it (None: new), in order; or None when one
    of them has already counted an offset of this group (a replay after a restore: ``_count``'s
    test, event by event; change them together)."""
    cdef list stored = []
    for found in by_limit:
        for key, window_of in (<dict> found).items():
            window = windows.get(key)
            if window is not None and window["partition"] == partition \
                    and offsets[positions[(<tuple> window_of)[2][0]]] <= window["offset"]:
                return None
            stored.append(window)
    return stored


@cython.boundscheck(True)
def fill_outcomes(list events, list positions, list rated, list late):
    """Each event's ``EventOutcome`` (not a copy; late for its rating or for a window) at its position."""
    cdef Py_ssize_t j
    if len(rated) != len(positions) or len(late) != len(positions):
        raise ValueError(f"{len(positions)} events, {len(rated)} rated, {len(late)} late")
    for j in range(len(positions)):
        outcome = rated[j]
        if not isinstance(outcome, tuple):
            raise TypeError(f"a rating outcome, not {type(outcome).__name__}")
        events[positions[j]] = tuple.__new__(_EVENT_OUTCOME, (False, (<tuple> outcome)[1] or late[j], outcome))


@cython.boundscheck(True)
def count_windows(engine, list limits, list by_limit, list stored, windows, partition, offsets, list positions,
                  list group, list rated, list reservations, bint reserving, collected, dict open_windows,
                  list opened):
    """``QuotaEngine._count_group``'s last step, for each limit's windows (``by_limit``: key → (its
    reference, bounds, events by index in ``group``); ``stored``: each as the table held it, from
    ``stored_windows``): the window's usage after its events (its crossings with them:
    ``sum_window``, ``margin_window`` or the engine's ``Decimal`` steps), the window written to
    ``windows`` at its last event's offset, a window new to the tenant noted in ``opened``, and the
    window's ``Counted`` and settled reservations given to ``collected.count``. About one window
    an event with five events a tenant and batch."""
    cdef Py_ssize_t li, i, n, w = 0
    cdef list js, kept, reserved
    cdef bint rows = type(group[0]) is LedgerRow, margin
    if len(by_limit) != len(limits) or len(rated) != len(group) or len(reservations) != len(group):
        raise ValueError(f"{len(limits)} limits, {len(by_limit)} found; {len(group)} events, {len(rated)} rated")
    for li in range(len(limits)):
        margin = limits[li].metric == "margin_percent"
        for key, found in (<dict> by_limit[li]).items():
            ref, bounds, js = <tuple> found
            window = stored[w]  # (``stored_windows``: as ``windows`` held it)
            w += 1
            if window is None:  # (a new window, as ``_count`` makes it)
                window = {"usage": _W_ZERO, "partition": partition, "offset": -1}
            if margin:
                # (Each outcome a tuple: ``fill_outcomes`` checked them. Not rated: nothing to judge by.)
                kept = [j for j in js if (<tuple> rated[j])[0] is not None]
                if not kept:
                    continue
                js = kept
                result = margin_window(engine, ref, window, js, group, rated, positions, offsets, li,
                                       collected) if rows else None
                if result is None:
                    result = engine._margin_window(ref, window, js, group, rated, positions, offsets, li, collected)
                usage, judged = <tuple> result
            else:
                usage = sum_window(engine, ref, window, js, group, rated, positions, offsets, li,
                                   collected) if rows else None
                if usage is None:
                    usage = engine._sum_window(ref, window, js, group, rated, positions, offsets, li, collected)
                judged = True
            n = len(js)
            first, last = js[0], js[n - 1]
            window["usage"] = usage
            window["partition"] = partition
            window["offset"] = offsets[positions[last]]
            windows[key] = window
            if key not in open_windows:
                opened.append((first, li, key, bounds.end_text, bounds.expires))
            reserved = []
            if reserving:
                for i in range(n):
                    j = js[i]
                    if reservations[j] is not None:
                        if not reserved:
                            reserved_order = (positions[j], li)
                        reserved.append(reservations[j])
            collected.count(key, (positions[first], li),
                            tuple.__new__(_COUNTED, (ref, usage, group[last].event_time, judged)),
                            reserved, reserved_order if reserved else None)

@cython.boundscheck(True)
def keep_outcomes(list rows, list events, failed, keep):
    """``BatchProcessor._usage_batch``'s last step, for a batch's ledger rows and their
    ``EventOutcome`` from ``apply_batch``, in order: a row whose position is in ``failed`` (its
    quota update failed) is kept as it is; a duplicate is not kept; any other row is stamped with
    its rating and lateness (``LedgerRow.stamp``) and kept (``keep``). Returns (duplicates, late
    rows among those kept)."""
    cdef Py_ssize_t i, n = len(rows), duplicates = 0, late = 0
    cdef tuple event, rated
    if len(events) != n:
        raise ValueError(f"{n} rows, {len(events)} outcomes")
    for i in range(n):
        row = rows[i]
        if failed and i in failed:
            keep(row)
            continue
        event = _tuple(events[i])  # (``EventOutcome``: duplicate, late, rated; checked at import)
        if event[0]:
            duplicates += 1
            continue
        rated = _tuple(event[2])  # (``RevenueOutcome``: revenue, late, period)
        if event[1]:
            late += 1
        (<LedgerRow?> row).stamp(rated[0], rated[2], event[1])
        keep(row)
    return duplicates, late


# ---- a rated row in integers ----------------------------------------------------------------------
# ``rate_rows``'s step for one row, computed on the ``Decimal`` values' coefficients and exponents
# (read by ``_parts``) in 128-bit integers: the same exact values (``rate_all`` runs in a 60-digit
# context, in which these additions and products are exact), the same exponents for what is kept
# (a charge's quantity: the lesser of its terms'), and the bill rounded to 12 places half to even,
# as ``quantize`` rounds in that context. Anything else (a volume price, a step off its straight
# piece, a value beyond 64 bits or the table of powers) is left, with nothing changed, to the
# ``Decimal`` steps.

cdef extern from *:
    """
    static inline int costline_mul128(__int128 a, __int128 b, __int128 *out) { return __builtin_mul_overflow(a, b, out); }
    static inline int costline_add128(__int128 a, __int128 b, __int128 *out) { return __builtin_add_overflow(a, b, out); }
    static inline __int128 costline_floordiv128(__int128 a, __int128 b) {
        __int128 q = a / b;
        if (a % b != 0 && ((a < 0) != (b < 0))) q -= 1;
        return q;
    }
    """
    bint costline_mul128(int128 a, int128 b, int128 *out)
    bint costline_add128(int128 a, int128 b, int128 *out)
    int128 costline_floordiv128(int128 a, int128 b)

cdef int128 _P10[39]
cdef int _p
_P10[0] = 1
for _p in range(1, 39):
    _P10[_p] = _P10[_p - 1] * 10
#: Decimal("1E-k") for k of 0 to 40 (``_decimal_of``).
cdef list _NEGATIVE_POWERS = None
cdef int _MAX_CHARGES = 16


cdef inline bint _at_exponent(int128 *c, int *e, int target):
    """``c`` × 10^``e`` written at the lesser exponent ``target``; False if it passes 128 bits."""
    cdef int d = e[0] - target
    if d == 0:
        return True
    if d < 0 or d > 38 or costline_mul128(c[0], _P10[d], c):
        return False
    e[0] = target
    return True


cdef inline bint _add(int128 *a, int *ea, int128 b, int eb):
    """a += b, at the lesser exponent."""
    cdef int e = ea[0] if ea[0] < eb else eb
    if not (_at_exponent(a, ea, e) and _at_exponent(&b, &eb, e)):
        return False
    return not costline_add128(a[0], b, a)


cdef inline int _compare(int128 a, int ea, int128 b, int eb) noexcept:
    """-1, 0 or 1 as a is below, at or above b; -2 (with no error set) if they cannot be aligned."""
    cdef int e = ea if ea < eb else eb
    if not (_at_exponent(&a, &ea, e) and _at_exponent(&b, &eb, e)):
        return -2
    return -1 if a < b else (1 if a > b else 0)


cdef inline bint _wide(object value, int128 *c, int *e) except -1:
    cdef int64_t coefficient
    if not _parts(value, &coefficient, e):
        return False
    c[0] = coefficient
    return True


cdef inline bint _negative_infinity(object value) except -1:
    if _LAYOUT and type(value) is _W_DECIMAL:
        return (costline_mpd_of(value).flags & 3) == 3  # (infinite and negative)
    return value.is_infinite() and value < 0


cdef inline bint _fits(int128 c, int e):
    """Whether ``_decimal_of`` makes this value: a coefficient within 64 bits, an exponent of 0 to -40."""
    return -_I64_MAX < c < _I64_MAX and -40 <= e <= 0


cdef inline object _decimal_of(int128 c, int e):
    """The ``Decimal`` c × 10^e, exponent e (``_fits``; made in the exact context ``rate_all`` set)."""
    if e == 0:
        return _W_DECIMAL(<int64_t> c)
    return _W_DECIMAL(<int64_t> c) * _NEGATIVE_POWERS[-e]


cdef bint _to_pico(int128 c, int e, int64_t *out):
    """c × 10^e rounded to 12 places, half to even, in pico-dollars; False beyond 64 bits."""
    cdef int128 q, r, unit
    if e >= -12:  # (exact)
        if not _at_exponent(&c, &e, -12):
            return False
        q = c
    else:
        if -12 - e > 38:
            return False
        unit = _P10[-12 - e]
        q = costline_floordiv128(c, unit)
        r = c - q * unit  # (0 ≤ r < unit)
        if 2 * r > unit or (2 * r == unit and (q & 1)):
            q += 1
    if not -_I64_MAX < q < _I64_MAX:
        return False
    out[0] = <int64_t> q
    return True


cdef struct _Pending:
    bint on
    int128 running
    int e_running
    int64_t billed
    # Each charge's quantity, by its id (the charge's own string), in the order first rated.
    int quantities
    PyObject *ids[16]
    int128 values[16]
    int exps[16]


cdef inline int _flush(_Pending *pending, list derived, dict q) except -1:
    """What consecutive rows rated in integers left in C (``rate_rows``): the running bill and the
    bill into the derived values, the charges' quantities into the period's ``q``."""
    cdef int k
    if pending.on:
        pending.on = False
        derived[0] = _decimal_of(pending.running, pending.e_running)
        derived[1] = _W_PICO * pending.billed
        for k in range(pending.quantities):
            q[<object> pending.ids[k]] = _decimal_of(pending.values[k], pending.exps[k])
        pending.quantities = 0
    return 0


cdef inline int _pending_at(_Pending *pending, object cid):
    """Where the charge ``cid``'s quantity is kept in ``pending``, or -1."""
    cdef int k
    for k in range(pending.quantities):
        if pending.ids[k] == <PyObject *> cid:
            return k
    return -1


#: id(charge) → (the charge, its id, its metric's code for ``_rate_ints`` (-1: a volume price, not
#: rated there), 100 - its discount or None): read once, not four attributes of a model a row.
cdef dict _CHARGES = {}
cdef dict _METRIC_CODES = {"cost_usd": 0, "requests": 1, "input_tokens": 2, "output_tokens": 3, "tokens": 4}


cdef tuple _charge_of(charge):
    if len(_CHARGES) >= 1000:
        _CHARGES.clear()
    discount = charge.discount_percent
    found = _CHARGES[id(charge)] = (charge, charge.id, -1 if charge.price == "volume" else _METRIC_CODES[charge.metric],
                                    (100 - discount) if discount else None)
    return found


cdef bint _rate_ints(LedgerRow row, list charges, dict q, list derived, object spend_cap, object label,
                     list outcomes, _Pending *pending) except -1:
    """One row's ``rate_rows`` step in integers, appended to ``outcomes``, its running bill left in
    ``pending`` (the derived values' own when it is on); False, with nothing changed, where the
    ``Decimal`` steps must do it."""
    cdef Py_ssize_t n = len(charges), k
    cdef int128 afters[16]
    cdef int after_exps[16]
    cdef int128 added = 0, before, quantity, after, bound, price, step, multiplier, running, capped
    cdef int e_added = 0, e_before, e_quantity, e_after, e_bound, e_price, e_step, e_factor, e_running, e_capped
    cdef int64_t billed, billed_before
    cdef int e_billed, metric_code, at, added_ids = 0
    cdef PyObject *ids[16]
    cdef int ats[16]
    if n > _MAX_CHARGES or _NEGATIVE_POWERS is None:
        return False
    for k in range(n):
        charge = charges[k]
        known = _CHARGES.get(id(charge))
        if known is None:
            known = _charge_of(charge)
        cid, metric_code, factor = (<tuple> known)[1], (<tuple> known)[2], (<tuple> known)[3]
        if metric_code < 0:  # (a volume price)
            return False
        at = _pending_at(pending, cid) if pending.on else -1
        ids[k], ats[k] = <PyObject *> cid, at
        if at < 0:
            added_ids += 1
        if at >= 0:
            before, e_before = pending.values[at], pending.exps[at]
        else:
            found = q.get(cid)
            if found is None:
                before, e_before = 0, 0  # (the Decimal zero)
            elif not _wide(found, &before, &e_before):
                return False
        if metric_code == 0:
            quantity, e_quantity = row.cost_usd_pico, _cost_exp(row)
        elif metric_code == 1:
            quantity, e_quantity = 1, 0
        elif metric_code == 2:
            quantity, e_quantity = row.tokens[0], 0
        elif metric_code == 3:
            quantity, e_quantity = row.tokens[3], 0
        else:
            quantity, e_quantity = row.tokens[0] + row.tokens[3], 0
        after, e_after = before, e_before
        if not _add(&after, &e_after, quantity, e_quantity):
            return False
        # On the charge's current straight piece (``segment_of``): start < before, after ≤ its end.
        segment = (<dict> derived[2]).get(cid)
        if segment is None:
            return False
        start, end, per_unit = <tuple> segment
        if not _negative_infinity(start):
            if not _wide(start, &bound, &e_bound) or _compare(bound, e_bound, before, e_before) != -1:
                return False
        if end is not None:
            if not _wide(end, &bound, &e_bound) or _compare(after, e_after, bound, e_bound) not in (-1, 0):
                return False
        if not _wide(per_unit, &price, &e_price):
            return False
        # (after - before) × price, less the discount: × (100 - discount) / 100 (``rating.net``).
        step, e_step = before, e_before
        if not _at_exponent(&step, &e_step, e_after) or costline_add128(after, -step, &step) \
                or costline_mul128(step, price, &step):
            return False
        e_step += e_price
        if factor is not None:  # (``rating.net``: × (100 - discount) / 100)
            if not _wide(factor, &multiplier, &e_factor) or costline_mul128(step, multiplier, &step):
                return False
            e_step += e_factor - 2
        if not _add(&added, &e_added, step, e_step) or not _fits(after, e_after):
            return False
        afters[k], after_exps[k] = after, e_after
    if pending.on:
        running, e_running = pending.running, pending.e_running
    elif not _wide(derived[0], &running, &e_running):
        return False
    if not _add(&running, &e_running, added, e_added) or not _fits(running, e_running):
        return False
    capped, e_capped = running, e_running
    if spend_cap is not None:
        if not _wide(spend_cap, &bound, &e_bound):
            return False
        k = _compare(running, e_running, bound, e_bound)
        if k == -2:
            return False
        if k == 1:
            capped, e_capped = bound, e_bound
    if pending.on:
        billed_before = pending.billed
    elif not _scaled(derived[1], 12, &billed_before, &e_billed) or e_billed != -12:
        return False
    if not _to_pico(capped, e_capped, &billed):
        return False
    if not pending.on:
        pending.quantities = 0
    if pending.quantities + added_ids > _MAX_CHARGES:
        return False
    # Everything is known: kept in ``pending``, written as the ``Decimal`` steps write it by ``_flush``.
    for k in range(n):
        at = ats[k]
        if at < 0:
            at = pending.quantities
            pending.quantities += 1
            pending.ids[at] = ids[k]
        pending.values[at], pending.exps[at] = afters[k], after_exps[k]
    pending.on, pending.running, pending.e_running, pending.billed = True, running, e_running, billed
    outcomes.append(tuple.__new__(_OUTCOME, (_W_PICO * (billed - billed_before), False, label)))
    return True


# ---- the quota stage's duplicate check ------------------------------------------------------------

cdef bint _seen(dict index, dict open_groups, seen, str key, object partition, int64_t offset, object second,
                queue, set marked) except -1:
    """``QuotaEngine._seen_before`` after the expiry (see there): whether the event ``key`` ("tenant
    \\x1f event id") at ``offset`` of ``partition`` is a copy of one counted before; if not, it goes
    into the partition's open group of ``seen`` (opened for ``second`` if the open one is of another)
    and the index, and the group is marked changed with the first event of the call (``marked``: the
    partitions marked so far, or None: with every event)."""
    cdef dict group, events
    first = index.get(key)
    if first is not None:  # the same record again (same partition and offset) is a replay
        return (<dict> first)["p"] != partition or (<dict> (<dict> first)["events"])[key] != offset
    open_group = open_groups.get(partition)
    if open_group is None or (<dict> (<tuple> open_group)[1])["t"] != second:
        group_key = f"{partition}:{second}:{offset}"
        found = seen.get(group_key)
        if found is None:
            found = {"p": partition, "t": second, "events": {}}
            queue.append((second, group_key))
        open_group = open_groups[partition] = (group_key, found)
        mark = True
    else:  # (an open group: this call's, marked already, or an earlier call's)
        mark = marked is None or partition not in marked
    group = <dict> (<tuple> open_group)[1]
    if mark:  # (marks the group changed: its one changelog record, at the batch's end)
        seen[(<tuple> open_group)[0]] = group
        if marked is not None:
            marked.add(partition)
    events = <dict> group["events"]
    events[key] = offset
    index[key] = group
    return False


def seen_before(engine, seen, record, partition, int64_t offset, second, queue, marked):
    """``QuotaEngine._seen_before``: ``_seen`` for one record."""
    return _seen(<dict> engine._seen_index, <dict> engine._open_groups, seen,
                 f"{record.tenant_id}\x1f{record.event_id}", partition, offset, second, queue, marked)


def sort_copies(engine, list records, partitions, offsets, double now_s, list events, duplicate, dict groups):
    """``QuotaEngine.apply_batch``'s first pass: each event of a tenant with limits or rates checked
    for a copy (``_seen``), with the clock read once (``now_s``); a copy's ``events`` entry set to
    ``duplicate``; the others' positions in ``groups`` by (partition, tenant), in order."""
    cdef Py_ssize_t position, n = len(records)
    cdef LedgerRow row
    cdef dict index = engine._seen_index, open_groups = engine._open_groups, plans = engine._plans
    cdef dict queues = {}, seens = {}
    cdef bint each = engine.plans.dedup_seconds == 0
    cdef set marked = None if each else set()
    second = int(now_s)
    rates = engine.revenue.rates
    for position in range(n):
        record = records[position]
        if type(record) is LedgerRow:
            row = <LedgerRow> record
            tenant, event_id = row.tenant_id, row.event_id
        else:
            tenant, event_id = record.tenant_id, record.event_id
        plan = plans.get(tenant)
        if plan is None:
            plan = engine._plan_of(tenant)
        if not (<tuple> plan)[0] and not rates(tenant):
            continue
        partition = partitions[position]
        seen = seens.get(partition)
        if seen is None:
            seen = seens[partition] = engine._state(partition).quota_seen
        queue = queues.get(partition)
        if queue is None or each:
            queue = queues[partition] = engine._expire_seen(seen, partition, now_s)
        if _seen(index, open_groups, seen, f"{tenant}\x1f{event_id}", partition, offsets[position], second, queue,
                 marked):
            events[position] = duplicate
            continue
        key = (partition, tenant)
        group = groups.get(key)
        if group is None:
            groups[key] = [position]
        else:
            (<list> group).append(position)


# ---- a quota state's JSON -------------------------------------------------------------------------
# ``Counted.state_json``'s per-state part in C: the usage and remaining amounts as ``format(d, "f")``
# writes them, the status by ``quotas.status_of``, the time as pydantic writes a UTC
# ``datetime``; anything else (an amount of a positive exponent or beyond 64 bits, a time in another
# zone) by those functions themselves. ``tests/stages/test_quota_batches.py`` holds every state the
# batch path writes to the model's own JSON, byte for byte.

cdef object _STATE_PREFIX = None, _TO_JSON = None, _STATUS_OF = None
#: (window key, id(limit)) → ``quotas._state_prefix``'s (head, middle, limit).
cdef dict _PREFIXES = {}


def configure_states(state_prefix, to_json, status_of):
    """``quotas._state_prefix``, ``pydantic_core.to_json`` and ``quotas.status_of`` (at import)."""
    global _STATE_PREFIX, _TO_JSON, _STATUS_OF
    _STATE_PREFIX, _TO_JSON, _STATUS_OF = state_prefix, to_json, status_of


cdef bytes _digits_text(int128 c, int e):
    """c × 10^e (|c| < 2^63, -40 ≤ e ≤ 0) as ``format(d, "f")`` writes a ``Decimal`` of that
    coefficient and exponent (a zero's sign aside: the callers pass none that is negative), written
    into a buffer: no intermediate strings."""
    cdef char digits[24]
    cdef char out[72]
    cdef unsigned long long magnitude = <unsigned long long> (-c if c < 0 else c)
    cdef int n = 0, k = -e, at = 0, i
    while True:
        digits[n] = <char> (48 + magnitude % 10)  # (least significant first)
        n += 1
        magnitude //= 10
        if magnitude == 0:
            break
    if c < 0:
        out[at] = 45  # "-"
        at += 1
    if n > k:
        for i in range(n - 1, k - 1, -1):
            out[at] = digits[i]
            at += 1
        if k:
            out[at] = 46  # "."
            at += 1
    else:
        out[at] = 48
        out[at + 1] = 46
        at += 2
        for i in range(k - n):
            out[at] = 48
            at += 1
    for i in range((k if n > k else n) - 1, -1, -1):
        out[at] = digits[i]
        at += 1
    return PyBytes_FromStringAndSize(out, at)


cdef bytes _fixed(object value):
    """``format(value, "f").encode()`` of a ``Decimal``."""
    cdef costline_mpd *d
    cdef int64_t coefficient
    cdef int e
    if _LAYOUT and type(value) is _W_DECIMAL:
        d = costline_mpd_of(value)
        if not (d.flags & 1 and d.len == 1 and d.data[0] == 0) and _read_parts(value, &coefficient, &e) \
                and -40 <= e <= 0:
            return _digits_text(coefficient, e)  # (a negative zero, "-0", is left to ``format``)
    return format(value, "f").encode()


cdef inline int _put(char *out, int at, int value, int width):
    """``value`` in ``width`` digits, zero-padded, at ``out[at]``; where the next goes."""
    cdef int i
    for i in range(width - 1, -1, -1):
        out[at + i] = <char> (48 + value % 10)
        value //= 10
    return at + width


cdef bytes _utc_text(object at):
    """pydantic's JSON of a ``datetime`` in UTC (``"2026-06-01T12:00:00Z"``, microseconds when not
    0), or ``to_json``'s own for any other (another zone, a subclass)."""
    if type(at) is not _dt.datetime or at.tzinfo is not _UTC:
        return _TO_JSON(at)
    cdef char out[32]
    cdef int n, micro = datetime_microsecond(at)
    out[0] = 34  # '"'
    n = _put(out, 1, datetime_year(at), 4)
    out[n] = 45
    n = _put(out, n + 1, datetime_month(at), 2)
    out[n] = 45
    n = _put(out, n + 1, datetime_day(at), 2)
    out[n] = 84  # "T"
    n = _put(out, n + 1, datetime_hour(at), 2)
    out[n] = 58
    n = _put(out, n + 1, datetime_minute(at), 2)
    out[n] = 58
    n = _put(out, n + 1, datetime_second(at), 2)
    if micro:
        out[n] = 46
        n = _put(out, n + 1, micro, 6)
    out[n] = 90  # "Z"
    out[n + 1] = 34
    return PyBytes_FromStringAndSize(out, n + 2)


def state_json(counted, settled):
    """``Counted.state_json``: the state's JSON, its window's fixed part written once per window."""
    cdef int64_t u, l
    cdef int eu, el
    cdef int128 uc, lc, remaining
    ref, usage, as_of, judged = <tuple> counted
    limit = (<tuple> ref)[2]
    key = ((<tuple> ref)[0], id(limit))
    prefix = _PREFIXES.get(key)
    if prefix is None:
        if len(_PREFIXES) >= 20000:
            _PREFIXES.clear()
        prefix = _PREFIXES[key] = _STATE_PREFIX(ref)
    margin = limit.metric == "margin_percent"
    amount = limit.limit
    # remaining: the limit less the usage (a margin: the usage less the floor), at least zero.
    remaining_text = None
    if _parts(usage, &u, &eu) and _parts(amount, &l, &el) and -40 <= eu <= 0 and -40 <= el <= 0:
        uc, lc = u, l
        e = eu if eu < el else el
        if _at_exponent(&uc, &eu, e) and _at_exponent(&lc, &el, e):
            remaining = (uc - lc) if margin else (lc - uc)  # (exact: the difference ``Decimal`` gives)
            if remaining < 0:
                remaining_text = b"0"  # (``max(remaining, ZERO)``: the zero's text)
            elif remaining < _I64_MAX:  # (and e ≥ -40: ``_digits_text``'s bounds)
                remaining_text = _digits_text(remaining, e)
    if remaining_text is None:
        remaining_value = usage - amount if margin else amount - usage
        remaining_text = format(max(remaining_value, _W_ZERO), "f").encode()
    return b"".join((prefix[0], _fixed(usage), prefix[1], remaining_text, b'","status":"',
                     (<str> _STATUS_OF(limit, usage, judged)).encode(), b'","as_of":', _utc_text(as_of), b',"settled":',
                     _TO_JSON(settled) if settled else b"[]", b"}"))
