# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
"""A table's rows written into ClickHouse's Native format as each record is added.

``TableSpec.native`` (streams/storage/tables.py) encoded a batch in three passes of Python: each
record's row read into a tuple, the rows turned into columns, each column converted and written by
clickhouse-connect's column writers: 12 µs an event for the ledger's 56 columns, a fifth of the
worker's loop thread. ``NativeWriter`` reads each record's attributes once, from its ``__dict__``
(or, for the stream's ``LedgerRow``, from its C fields: ``add_row``), and appends each value to its column's buffer in C, so a finished batch is only its buffers
joined. The bytes are those of one Native block with the column names and wire types that
``TableSpec`` sends, and the same values: ``tests/storage/test_native.py`` lands batches through
both encoders into ClickHouse and compares every stored value.

What each wire conversion of ``streams.storage.tables`` becomes here is one ``KIND_*`` code;
``TableSpec`` picks them (``_NATIVE_KINDS``), and a table with a conversion that has no code keeps
the Python encoder. Change a conversion there and its code here together.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.datetime cimport (
    PyDateTime_DATE_GET_HOUR,
    PyDateTime_DATE_GET_MICROSECOND,
    PyDateTime_DATE_GET_MINUTE,
    PyDateTime_DATE_GET_SECOND,
    PyDateTime_GET_DAY,
    PyDateTime_GET_MONTH,
    PyDateTime_GET_YEAR,
    datetime,
    datetime_tzinfo,
    import_datetime,
)
from cpython.dict cimport PyDict_GetItem, PyDict_Next, PyDict_Size
from cpython.object cimport PyObject
from cpython.unicode cimport PyUnicode_AsUTF8AndSize
from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t
from libc.stdlib cimport free, realloc
from libc.string cimport memcpy

import datetime as _dt
from sys import intern

import_datetime()

# The wire conversions, one code each (see the module docstring).
cpdef enum:  # (members are C constants here, and ints of the module for streams.storage.tables)
    KIND_STR = 0        # String, a str (None is refused, as the client refuses it)
    KIND_TEXT = 1       # String, a str or None (as "")
    KIND_DECIMAL = 2    # String, a Decimal as its text (the shared zero as "0")
    KIND_OPT_DECIMAL = 3  # Nullable(String), a Decimal as its text, or None as NULL
    KIND_JSON = 4       # String, a dict or list as JSON, an empty or missing one as ""
    KIND_UINT64 = 5     # UInt64
    KIND_OPT_UINT32 = 6  # Nullable(UInt32)
    KIND_BOOL = 7       # Bool, from any value's truth
    KIND_DATETIME64_MS = 8  # DateTime64(3, 'UTC'), an aware datetime as epoch milliseconds, floored
    KIND_MAP_STR = 9    # Map(String, String), a dict of str to str

cdef object _UTC = _dt.timezone.utc


cdef class _Buffer:
    """A growable byte buffer (realloc doubling): appending to a bytearray from C is slower."""
    cdef char *data
    cdef Py_ssize_t size, cap

    def __dealloc__(self):
        free(self.data)

    cdef inline int reserve(self, Py_ssize_t extra) except -1:
        cdef Py_ssize_t need = self.size + extra
        cdef Py_ssize_t cap
        cdef char *grown
        if need <= self.cap:
            return 0
        cap = self.cap * 2 if self.cap else 4096
        while cap < need:
            cap *= 2
        grown = <char *> realloc(self.data, cap)
        if grown == NULL:
            raise MemoryError()
        self.data, self.cap = grown, cap
        return 0

    cdef inline int write(self, const char *src, Py_ssize_t n) except -1:
        self.reserve(n)
        memcpy(self.data + self.size, src, n)
        self.size += n
        return 0

    cdef inline int leb128(self, uint64_t value) except -1:
        self.reserve(10)
        while value >= 0x80:
            self.data[self.size] = <char> ((value & 0x7F) | 0x80)
            self.size += 1
            value >>= 7
        self.data[self.size] = <char> value
        self.size += 1
        return 0

    cdef inline int byte(self, uint8_t value) except -1:
        self.reserve(1)
        self.data[self.size] = <char> value
        self.size += 1
        return 0

    cdef inline int uint32(self, uint32_t value) except -1:
        self.reserve(4)
        memcpy(self.data + self.size, &value, 4)  # little-endian hosts only (checked at import)
        self.size += 4
        return 0

    cdef inline int uint64(self, uint64_t value) except -1:
        self.reserve(8)
        memcpy(self.data + self.size, &value, 8)
        self.size += 8
        return 0

    cdef inline int text(self, object value) except -1:
        """A str as ClickHouse's String: its UTF-8 length, then its bytes."""
        cdef Py_ssize_t n
        cdef const char *utf8 = PyUnicode_AsUTF8AndSize(value, &n)  # (cached in the str object)
        self.leb128(<uint64_t> n)
        self.write(utf8, n)
        return 0

    cdef inline int empty(self) except -1:
        return self.byte(0)  # a String of length 0


cdef inline int64_t _days_from_civil(int64_t y, int64_t m, int64_t d) nogil:
    """Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm), exactly."""
    cdef int64_t era, yoe, doy, doe
    y -= m <= 2
    era = (y if y >= 0 else y - 399) // 400
    yoe = y - era * 400
    doy = (153 * (m + (-3 if m > 2 else 9)) + 2) // 5 + d - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


cdef class _Column:
    cdef int kind
    cdef object key        # the attribute (a key of the record's __dict__), or of its nested object
    cdef object head       # None, or the nested object's attribute (``usage`` of ``usage.input_tokens``)
    cdef bytes header      # the column's name and wire type, as a Native block writes them
    cdef _Buffer values, extra, offsets  # extra: a nullable's null map, or a map's values
    cdef uint64_t entries  # a map column's running count of entries (its offsets are cumulative)
    # Where the row being added started: a failed ``add`` puts every column back there.
    cdef Py_ssize_t mark_values, mark_extra, mark_offsets
    cdef uint64_t mark_entries
    cdef bint mark_all_zero
    # A decimal column of zeros only is written as "0"s, as the Python encoder writes it (its texts
    # may be "0E-12" or "0.000000000000"; the values stored are the same, the bytes then too).
    cdef bint all_zero
    # Where ``add_row`` reads the column's value of a ``LedgerRow`` (``_ROW_SLOTS``), or -1: not a
    # ledger column, and ``add_row`` refuses rows.
    cdef int slot


cdef class NativeWriter:
    """One batch of one table: ``add`` each record, then ``finish`` for the Native block."""
    cdef list _columns
    cdef Py_ssize_t _rows
    cdef bint _rows_readable  # every column is a ledger row's field (``add_row``)
    cdef object _zero, _json, _epoch_ms

    def __cinit__(self, list plan, object zero, object json_text, object epoch_ms):
        """``plan``: (name, wire type, kind, attribute path) of each column, in the order they are
        sent. ``zero``: the Decimal zero that the pricing stage shares (written as "0" without
        formatting). ``json_text``: a dict or list to its JSON text, as the Python encoder writes
        it. ``epoch_ms``: an aware datetime to epoch milliseconds (times not in UTC)."""
        cdef _Column column
        self._columns = []
        self._rows = 0
        self._zero, self._json, self._epoch_ms = zero, json_text, epoch_ms
        for name, wire_type, kind, path in plan:
            column = _Column()
            column.kind = kind
            head, _, key = path.rpartition(".")
            # Interned: ``add`` tells a nested object's columns apart by identity, and reads the
            # object once for its run of columns (one level: "usage.input_tokens").
            column.head = intern(head) if head else None
            column.key = key
            if "." in head:
                raise ValueError(f"{path}: one level of nesting is supported")
            header = _Buffer()
            header.text(name)
            header.text(wire_type)
            column.header = PyBytes_FromStringAndSize(header.data, header.size)
            column.values, column.extra, column.offsets = _Buffer(), _Buffer(), _Buffer()
            column.entries = 0
            column.all_zero = True
            column.slot = _ROW_SLOTS.get(path, -1)
            if column.slot >= _SLOT_TOKENS and kind != (KIND_UINT64 if column.slot < _SLOT_COSTS else KIND_DECIMAL):
                column.slot = -1  # (a conversion ``add_row`` does not write from the C fields)
            self._columns.append(column)
        self._rows_readable = all((<_Column> c).slot >= 0 for c in self._columns)

    def __len__(self):
        return self._rows

    @property
    def nbytes(self):
        """The size of the block ``finish`` would return now, give or take its first few bytes
        (``RecordBatch`` cuts its blocks by it)."""
        cdef _Column column
        cdef Py_ssize_t total = 0
        for column in self._columns:
            total += len(column.header) + column.values.size + column.extra.size + column.offsets.size
        return total

    def add(self, object record):
        """Appends ``record``'s row to the columns (a ``LedgerRow``'s by ``add_row``). Raises
        ``TypeError`` (``OverflowError``) for a value its column cannot hold, and then holds what it
        held before."""
        if type(record) is LedgerRow:
            return self.add_row(<LedgerRow> record)
        cdef dict own = record.__dict__  # (where a pydantic model keeps its fields)
        cdef object nested = None, last_head = None, value
        cdef _Column column
        cdef PyObject *found
        self._mark()
        try:
            for column in self._columns:
                if column.head is None:
                    found = PyDict_GetItem(own, column.key)
                    if found == NULL:
                        raise TypeError(f"{type(record).__name__} has no field {column.key!r}")
                    # Held (a new reference), not borrowed: writing a value can run Python code
                    # (str of a Decimal, the JSON writer), during which the dict may change.
                    value = <object> found
                else:  # a nested object's attribute (a model, or the decoder's struct: no __dict__)
                    if column.head is not last_head:
                        last_head = column.head
                        found = PyDict_GetItem(own, column.head)
                        if found == NULL:
                            raise TypeError(f"{type(record).__name__} has no field {column.head!r}")
                        nested = <object> found
                    value = getattr(nested, column.key)
                self._write(column, value)
        except BaseException:
            self._back_to_mark()
            raise
        self._rows += 1

    def add_row(self, LedgerRow row not None):
        """``add`` for a ``LedgerRow``: the same columns, read from its fields; token counts and costs
        from its C integers (a cost as its exact decimal text, which ClickHouse parses to the same
        stored value as the ``Decimal``'s text that ``add`` writes)."""
        cdef _Column column
        cdef int slot
        if not row.fits_ledger():
            raise OverflowError(f"cost_usd: {row.cost_usd} is beyond the ledger's Decimal(18, 12), or a cost is "
                                "negative")
        if not self._rows_readable:
            raise TypeError(f"columns {[(<_Column> c).key for c in self._columns if (<_Column> c).slot < 0]} "
                            "are not a ledger row's fields")
        self._mark()
        try:
            for column in self._columns:
                slot = column.slot
                if slot < _SLOT_TOKENS:
                    self._write(column, row._field(slot))
                elif slot < _SLOT_COSTS:
                    column.values.uint64(<uint64_t> row.tokens[slot - _SLOT_TOKENS])
                else:
                    _pico_text(column, row.costs[slot - _SLOT_COSTS] if slot < _SLOT_COST_USD else row.cost_usd_pico)
        except BaseException:
            self._back_to_mark()
            raise
        self._rows += 1

    cdef int _mark(self) except -1:
        """Notes where the row being added starts in every column (``_back_to_mark``)."""
        cdef _Column column
        for column in self._columns:
            column.mark_values, column.mark_extra, column.mark_offsets = \
                column.values.size, column.extra.size, column.offsets.size
            column.mark_entries, column.mark_all_zero = column.entries, column.all_zero
        return 0

    cdef int _back_to_mark(self) except -1:
        """Every column back to where the row being added started: the writer holds the rows added
        before, and can take more (a half-written row would make the whole block unreadable)."""
        cdef _Column column
        for column in self._columns:
            column.values.size, column.extra.size, column.offsets.size = \
                column.mark_values, column.mark_extra, column.mark_offsets
            column.entries, column.all_zero = column.mark_entries, column.mark_all_zero
        return 0

    cdef int _write(self, _Column column, object value) except -1:
        cdef int kind = column.kind
        cdef _Buffer out = column.values
        cdef object key, item
        cdef Py_ssize_t pos = 0
        cdef PyObject *k
        cdef PyObject *v
        if kind == KIND_STR or kind == KIND_TEXT:
            if value is None and kind == KIND_TEXT:
                return out.empty()
            if not isinstance(value, str):
                raise TypeError(f"{column.key}: expected a str, got {type(value).__name__}")
            return out.text(value)
        if kind == KIND_DECIMAL:
            if value is self._zero:
                out.leb128(1)
                return out.byte(48)  # "0"
            text = str(value)
            if column.all_zero and not _zero_text(text):
                column.all_zero = False
            return out.text(text)
        if kind == KIND_OPT_DECIMAL:
            if value is None:
                column.extra.byte(1)
                return out.empty()
            column.extra.byte(0)
            return out.text(str(value))
        if kind == KIND_JSON:
            if not value:
                return out.empty()
            return out.text(self._json(value))
        if kind == KIND_UINT64:
            if not isinstance(value, int):  # (a C cast would take a float's integer part)
                raise TypeError(f"{column.key}: expected an int, got {type(value).__name__}")
            return out.uint64(<uint64_t> value)
        if kind == KIND_OPT_UINT32:
            if value is None:
                column.extra.byte(1)
                return out.uint32(0)
            if not isinstance(value, int):
                raise TypeError(f"{column.key}: expected an int, got {type(value).__name__}")
            column.extra.byte(0)
            return out.uint32(<uint32_t> value)
        if kind == KIND_BOOL:
            return out.byte(1 if value else 0)  # (any truth value, as the client writes it)
        if kind == KIND_DATETIME64_MS:
            return out.uint64(<uint64_t> self._milliseconds(column, value))
        if kind == KIND_MAP_STR:
            if value is not None:
                if type(value) is not dict:
                    raise TypeError(f"{column.key}: expected a dict, got {type(value).__name__}")
                while PyDict_Next(value, &pos, &k, &v):
                    key, item = <object> k, <object> v
                    if type(key) is not str or type(item) is not str:
                        raise TypeError(f"{column.key}: expected str keys and values")
                    out.text(key)
                    column.extra.text(item)
                column.entries += PyDict_Size(value)
            return column.offsets.uint64(column.entries)
        raise ValueError(f"unknown column kind {kind}")

    cdef int64_t _milliseconds(self, _Column column, object value) except? -1:
        """Epoch milliseconds, floored, as the client writes a datetime; computed exactly from the
        fields of a UTC time, through ``epoch_ms`` for another zone. A naive time is taken as UTC:
        it is one read back from the ledger (``costline reprice``), whose client returns its
        ``DateTime64(3, 'UTC')`` values so. (The client would take it as the host's local time,
        which is the same on a host set to UTC and wrong on any other.)"""
        cdef int64_t days, seconds
        cdef object zone
        if type(value) is not datetime:
            if isinstance(value, datetime):
                return self._epoch_ms(value)
            raise TypeError(f"{column.key}: expected a datetime, got {type(value).__name__}")
        zone = datetime_tzinfo(value)
        if zone is not _UTC and zone is not None:
            return self._epoch_ms(value)
        days = _days_from_civil(PyDateTime_GET_YEAR(value), PyDateTime_GET_MONTH(value),
                                PyDateTime_GET_DAY(value))
        seconds = days * 86400 + PyDateTime_DATE_GET_HOUR(value) * 3600 + \
            PyDateTime_DATE_GET_MINUTE(value) * 60 + PyDateTime_DATE_GET_SECOND(value)
        return seconds * 1000 + PyDateTime_DATE_GET_MICROSECOND(value) // 1000

    def finish(self):
        """The Native block of every row added: column count and row count, then each column's
        name, wire type and data. An empty batch is b"" (nothing to insert)."""
        cdef _Buffer head = _Buffer()
        cdef _Column column
        cdef Py_ssize_t total
        cdef char *at
        if self._rows == 0:
            return b""
        head.leb128(len(self._columns))
        head.leb128(<uint64_t> self._rows)
        total = head.size
        for column in self._columns:
            total += len(column.header) + column.offsets.size + column.extra.size
            total += 2 * self._rows if column.kind == KIND_DECIMAL and column.all_zero else column.values.size
        out = PyBytes_FromStringAndSize(NULL, total)
        at = PyBytes_AS_STRING(out)
        memcpy(at, head.data, head.size)
        at += head.size
        for column in self._columns:
            memcpy(at, PyBytes_AS_STRING(column.header), len(column.header))
            at += len(column.header)
            if column.kind == KIND_OPT_DECIMAL or column.kind == KIND_OPT_UINT32:  # nullable: the null map, then the values
                at = _copy(at, column.extra)
                at = _copy(at, column.values)
            elif column.kind == KIND_DECIMAL and column.all_zero:
                for _ in range(self._rows):
                    at[0], at[1] = 1, 48  # "0"
                    at += 2
            elif column.kind == KIND_MAP_STR:  # map: the offsets, then all keys, then all values
                at = _copy(at, column.offsets)
                at = _copy(at, column.values)
                at = _copy(at, column.extra)
            else:
                at = _copy(at, column.values)
        return out


# ---- the ledger's row as the stream builds it ---------------------------------------------------

#: A row's fields that ``add_row`` reads as objects, in slot order (``LedgerRow._field``).
_ROW_FIELDS = (
    "event_id", "event_time", "tenant_id", "user_id", "provider", "model", "service", "route", "feature", "step",
    "trace_id", "span_id", "parent_span_id", "status", "latency_ms", "reservation_id", "batch", "tags", "extra",
    "raw_usage", "raw_usage_format", "priced", "unpriced_reason", "matched_model", "price_source",
    "pricing_version", "discount", "discount_percent", "business_path", "attributed_at", "late", "revenue_usd",
    "billing_period", "currency")
_TOKEN_FIELDS = (
    "input_tokens", "cache_read_tokens", "cache_write_tokens", "output_tokens", "reasoning_tokens",
    "cache_write_1h_tokens", "input_audio_tokens", "cache_audio_read_tokens", "input_image_tokens",
    "cache_image_read_tokens", "output_audio_tokens", "output_image_tokens")
_COST_FIELDS = ("input", "cache_read", "cache_write", "output", "reasoning", "input_audio", "input_image",
                "output_audio", "output_image", "request")
cdef enum:  # where each part of a row's slots starts
    _SLOT_TOKENS = 34
    _SLOT_COSTS = 46
    _SLOT_COST_USD = 56
if len(_ROW_FIELDS) != _SLOT_TOKENS or len(_TOKEN_FIELDS) != _SLOT_COSTS - _SLOT_TOKENS \
        or len(_COST_FIELDS) != _SLOT_COST_USD - _SLOT_COSTS:
    raise ImportError("streams.storage._native: the row slots do not add up")
#: A column's attribute path → its slot in a ``LedgerRow``.
_ROW_SLOTS = {**{name: i for i, name in enumerate(_ROW_FIELDS)},
              **{f"usage.{name}": _SLOT_TOKENS + i for i, name in enumerate(_TOKEN_FIELDS)},
              **{f"cost.{name}": _SLOT_COSTS + i for i, name in enumerate(_COST_FIELDS)},
              "cost_usd": _SLOT_COST_USD}

#: The largest cost the ledger's ``Decimal(18, 12)`` holds, in pico-dollars. A row priced beyond it
#: (``cost_usd_pico`` above it; ``BEYOND_LEDGER`` when priced in ``Decimal``, whose total may pass
#: 64 bits) is dead-lettered by attribution, and refused by ``add_row``.
MAX_COST_PICO = 999_999_999_999_999_999
cdef int64_t _MAX_COST_PICO = MAX_COST_PICO
BEYOND_LEDGER = 0x7FFFFFFFFFFFFFFF

cdef object _PICO_UNIT = None   # Decimal("1E-12"), and the rest: set by ``configure_rows``
cdef object _ZERO = None
cdef object _COST_BREAKDOWN = None
cdef object _TO_MODEL = None


def configure_rows(zero, cost_breakdown, to_model):
    """The ledger's ``Decimal`` zero (``schemas.attributed.ZERO``) and ``CostBreakdown`` class, which
    a row's ``Decimal`` forms are made of, and the function that makes a row's ``AttributedUsage``
    (``streams.storage.tables``, at import: this module does not import the contract)."""
    global _PICO_UNIT, _ZERO, _COST_BREAKDOWN, _TO_MODEL
    _ZERO, _COST_BREAKDOWN, _TO_MODEL = zero, cost_breakdown, to_model
    _PICO_UNIT = type(zero)("1E-12")


cdef inline object _money(int64_t pico, bint rounded):
    """Pico-dollars as the ``Decimal`` pricing gives: ``pico`` × 10^-12 (12 places; exact: 19 digits
    at most, within any context's 28); a zero as the shared zero, or as ``0E-12`` when ``rounded``."""
    if pico == 0 and not rounded:
        return _ZERO
    return _PICO_UNIT * pico


cdef int _pico_text(_Column column, int64_t pico) except -1:
    """A cost of 0 or more pico-dollars (``add_row`` refuses a negative one) as decimal text with its
    12 places ("0.001569000000"; zero as "0"), written whole into the column (written a byte at a
    time, costs were a third of writing a row)."""
    cdef char text[24]   # (19 digits at most, and the point)
    cdef char *end = text + 24
    cdef char *at = end
    cdef int places = 0
    cdef uint64_t magnitude = <uint64_t> pico
    cdef _Buffer out = column.values
    if pico == 0:
        out.leb128(1)
        return out.byte(48)
    column.all_zero = False
    while magnitude or places <= 12:  # the 12 places, the point, and at least one digit before it
        if places == 12:
            at -= 1
            at[0] = 46  # "."
        at -= 1
        at[0] = <char> (48 + magnitude % 10)
        magnitude //= 10
        places += 1
    out.leb128(<uint64_t> (end - at))
    return out.write(at, end - at)


cdef class LedgerRow:
    """An attributed usage event as the stream builds it: the fields of ``AttributedUsage``, with
    token counts and costs held as C integers (costs in pico-dollars, the ledger's 12 places)
    instead of a model of ``Decimal`` objects. Built in C (``streams/stages/_fast.pyx``,
    ``RowBuilder``), written by ``NativeWriter.add_row`` straight from those integers, read by the
    quota stage through the same names as the model (``cost_usd`` a ``Decimal``, made once).
    ``as_model()`` is the ``AttributedUsage`` it stands for (published, compared in the tests).

    Why not the model: making one per event, and reading it back field by field into the ledger's
    columns, cost about 5 µs an event of the worker's loop thread; and its costs are ``Decimal``
    objects, each written as text. Fields are declared in _native.pxd."""

    def __cinit__(self):
        self.cost_usd_pico = 0
        self.rounded_zeros = 0
        self.late = False

    cdef object _field(self, int slot):
        if slot == 0: return self.event_id
        if slot == 1: return self.event_time
        if slot == 2: return self.tenant_id
        if slot == 3: return self.user_id
        if slot == 4: return self.provider
        if slot == 5: return self.model
        if slot == 6: return self.service
        if slot == 7: return self.route
        if slot == 8: return self.feature
        if slot == 9: return self.step
        if slot == 10: return self.trace_id
        if slot == 11: return self.span_id
        if slot == 12: return self.parent_span_id
        if slot == 13: return self.status
        if slot == 14: return self.latency_ms
        if slot == 15: return self.reservation_id
        if slot == 16: return self.batch
        if slot == 17: return self.tags
        if slot == 18: return self.extra
        if slot == 19: return self.raw_usage
        if slot == 20: return self.raw_usage_format
        if slot == 21: return self.priced
        if slot == 22: return self.unpriced_reason
        if slot == 23: return self.matched_model
        if slot == 24: return self.price_source
        if slot == 25: return self.pricing_version
        if slot == 26: return self.discount
        if slot == 27: return self.discount_percent
        if slot == 28: return self.business_path
        if slot == 29: return self.attributed_at
        if slot == 30: return self.late
        if slot == 31: return self.revenue_usd
        if slot == 32: return self.billing_period
        if slot == 33: return "USD"
        raise IndexError(slot)

    cpdef bint fits_ledger(self):
        """Whether the ledger's ``Decimal(18, 12)`` columns hold the row's costs: none negative, the
        total at most ``MAX_COST_PICO`` (and so each class). Attribution dead-letters a row that
        does not (``Attribution.row_raw``); ``add_row`` refuses it."""
        cdef int i
        if not 0 <= self.cost_usd_pico <= _MAX_COST_PICO:
            return False
        for i in range(10):
            if self.costs[i] < 0:
                return False
        return True

    cpdef stamp(self, object revenue, object period, bint late):
        """``streams.stages.revenue.stamp_fresh`` for a row: what the call added to its tenant's bill
        (``revenue``: None when not rated), in which period, and whether it came late."""
        if late:
            self.late = True
        if revenue is not None:
            self.revenue_usd = revenue
            self.billing_period = period

    def as_model(self):
        """The ``AttributedUsage`` this row stands for."""
        return _TO_MODEL(self)

    @property
    def schema_version(self):
        return 1

    @property
    def currency(self):
        return "USD"

    @property
    def cost_usd(self):
        if self._cost_usd is None:
            self._cost_usd = _money(self.cost_usd_pico, self.rounded_zeros & (1 << 10))
        return self._cost_usd

    @property
    def cost(self):
        if self._cost is None:
            self._cost = _COST_BREAKDOWN(*[_money(self.costs[i], self.rounded_zeros & (1 << i)) for i in range(10)])
        return self._cost

    @property
    def margin_usd(self):
        return None if self.revenue_usd is None else self.revenue_usd - self.cost_usd

    def token_count(self, int index):
        """The ``index``-th token count (``schemas.usage.token_counts`` order)."""
        if not 0 <= index < 12:
            raise IndexError(index)
        return self.tokens[index]

    def cost_pico(self, int index):
        """The ``index``-th cost class (``CostBreakdown`` order), in pico-dollars."""
        if not 0 <= index < 10:
            raise IndexError(index)
        return self.costs[index]


# ---- reading a block back ---------------------------------------------------------------------

cdef class _Reader:
    """A cursor over one Native block; every read checks that the bytes are there."""
    cdef const unsigned char *data
    cdef Py_ssize_t size, at

    cdef inline int need(self, Py_ssize_t n, str what) except -1:
        if n < 0 or n > self.size - self.at:
            raise ValueError(f"the block ends inside {what} (at byte {self.at} of {self.size})")
        return 0

    cdef inline uint64_t leb128(self, str what) except? 0xFFFFFFFFFFFFFFFF:
        cdef uint64_t value = 0
        cdef int shift = 0
        cdef unsigned char b
        while True:
            self.need(1, what)
            b = self.data[self.at]
            self.at += 1
            if shift > 56:
                raise ValueError(f"{what}: a length of more than 64 bits")
            value |= (<uint64_t> (b & 0x7F)) << shift
            if b < 0x80:
                return value
            shift += 7

    cdef inline Py_ssize_t string(self, str what) except -1:
        """Skips one String; returns where its bytes start (its length is then ``self.at`` minus that)."""
        cdef uint64_t n = self.leb128(what)
        cdef Py_ssize_t start
        if n > <uint64_t> (self.size - self.at):
            raise ValueError(f"the block ends inside {what} (at byte {self.at} of {self.size})")
        start = self.at
        self.at += <Py_ssize_t> n
        return start

    cdef inline object text(self, Py_ssize_t start):
        return (<const char *> self.data)[start:self.at].decode("utf-8", "surrogateescape")

    cdef inline int flags(self, Py_ssize_t rows, str what) except -1:
        """A null map or a Bool column: one byte a row, 0 or 1."""
        cdef Py_ssize_t i
        self.need(rows, what)
        for i in range(rows):
            if self.data[self.at + i] > 1:
                raise ValueError(f"{what}: byte {self.data[self.at + i]} in row {i}, not 0 or 1")
        return 0


def read_block(const unsigned char[::1] data, list plan, list decimals, bint values=False):
    """Checks that ``data`` is exactly one Native block of ``plan``'s columns (as ``NativeWriter``
    writes them: the same names and wire types, in order) that ClickHouse can take: every length
    within the block, null maps and Bools 0 or 1, map offsets that only grow, decimals written as
    decimal numbers that their column holds (``decimals``: each column's (precision, scale), None
    for the others), nothing after the last column. Returns the row count; with ``values``, also
    the columns as lists (text as str, decimals as their text, times as epoch milliseconds),
    to read a block back in tests and in the in-memory sink. Raises ``ValueError`` saying what is
    wrong and where.

    Why the check: the sink role inserts blocks that stream workers wrote as they are, and a
    block ClickHouse refuses would be retried forever, holding back every later batch. A block
    this accepts is one ClickHouse parses; one it refuses becomes a dead letter with its reason."""
    cdef _Reader r = _Reader()
    cdef Py_ssize_t rows, i, start, name_start, type_start
    cdef uint64_t n_columns, n_rows, offset, last
    cdef int kind
    cdef list column, decoded = []
    r.data, r.size, r.at = &data[0] if data.shape[0] else NULL, data.shape[0], 0
    if r.size == 0:
        raise ValueError("an empty message, not a block")
    n_columns = r.leb128("the column count")
    n_rows = r.leb128("the row count")
    if n_columns != <uint64_t> len(plan):
        raise ValueError(f"a block of {n_columns} columns; the ledger has {len(plan)}")
    if n_rows == 0 or n_rows > <uint64_t> r.size:
        raise ValueError(f"a block of {n_rows} rows in {r.size} bytes")
    rows = <Py_ssize_t> n_rows
    for position, (name, wire_type, kind, _) in enumerate(plan):
        name_start = r.string("a column name")
        got_name = r.text(name_start)
        type_start = r.string("a column type")
        got_type = r.text(type_start)
        if got_name != name or got_type != wire_type:
            raise ValueError(f"column {position + 1} is {got_name} {got_type}; the ledger sends {name} {wire_type}")
        what = f"column {name}"
        column = [] if values else None
        if kind == KIND_STR or kind == KIND_TEXT or kind == KIND_JSON or kind == KIND_DECIMAL:
            for i in range(rows):
                start = r.string(what)
                if kind == KIND_DECIMAL:
                    _check_decimal(r, start, what, i, decimals[position])
                if values:
                    column.append(r.text(start))
        elif kind == KIND_OPT_DECIMAL:
            nulls = r.at
            r.flags(rows, what)
            r.at += rows
            for i in range(rows):
                start = r.string(what)
                if r.data[nulls + i] == 0:  # (too large for a Nullable column, a value is stored as NULL)
                    _check_decimal(r, start, what, i, None)
                if values:
                    column.append(None if r.data[nulls + i] else r.text(start))
        elif kind == KIND_UINT64 or kind == KIND_DATETIME64_MS:
            r.need(8 * rows, what)
            if values:
                for i in range(rows):
                    column.append(int.from_bytes((<const char *> r.data)[r.at + 8 * i:r.at + 8 * i + 8], "little",
                                                 signed=kind == KIND_DATETIME64_MS))
            r.at += 8 * rows
        elif kind == KIND_OPT_UINT32:
            nulls = r.at
            r.flags(rows, what)
            r.at += rows
            r.need(4 * rows, what)
            if values:
                for i in range(rows):
                    column.append(None if r.data[nulls + i] else
                                  int.from_bytes((<const char *> r.data)[r.at + 4 * i:r.at + 4 * i + 4], "little"))
            r.at += 4 * rows
        elif kind == KIND_BOOL:
            r.flags(rows, what)
            if values:
                column.extend(bool(r.data[r.at + i]) for i in range(rows))
            r.at += rows
        elif kind == KIND_MAP_STR:
            r.need(8 * rows, what)
            last = 0
            ends = []
            for i in range(rows):
                memcpy(&offset, r.data + r.at + 8 * i, 8)
                if offset < last or offset > <uint64_t> r.size:
                    raise ValueError(f"{what}: offset {offset} in row {i} after {last}")
                last = offset
                ends.append(offset)
            r.at += 8 * rows
            if values:  # every key, then every value
                keys = [r.text(r.string(what)) for _ in range(last)]
                items = [r.text(r.string(what)) for _ in range(last)]
                begin = 0
                for end in ends:
                    column.append(dict(zip(keys[begin:end], items[begin:end])))
                    begin = end
            else:
                for _ in range(2 * last):
                    r.string(what)
        else:
            raise ValueError(f"unknown column kind {kind}")
        if values:
            decoded.append(column)
    if r.at != r.size:
        raise ValueError(f"{r.size - r.at} bytes after the block's last column")
    return (rows, decoded) if values else rows


cdef int _check_decimal(_Reader r, Py_ssize_t start, str what, Py_ssize_t row, object bounds) except -1:
    """A decimal's text as ``str(Decimal)`` writes a finite one, -?digits[.digits][E(+|-)digits],
    with an exponent that ClickHouse reads (an Int32: beyond it, code 72), and a value its column
    holds: ``bounds`` is the column's (precision, scale), None for a Nullable one (which stores a
    value too large for it as NULL). ClickHouse refuses (code 69) more significant digits before the
    point than the precision, and more than precision - scale of them once the exponent is added,
    whatever the digits after the point: "0E+7" and "0.5E+7" are refused in a Decimal(18, 12),
    "0E+6" and "99999900E-2" taken. Digits beyond the scale it drops. (Measured on the embedded
    engine: tests/storage/test_native.py holds the reader's verdicts to the engine's.)"""
    cdef Py_ssize_t i = start, end = r.at, digits = 0, whole = 0
    cdef const unsigned char *c = r.data
    cdef int64_t exponent = 0, sign = 1
    if i < end and c[i] == b'-':
        i += 1
    while i < end and b'0' <= c[i] <= b'9':
        if whole or c[i] != b'0':  # (leading zeros are not counted)
            whole += 1
        i += 1
        digits += 1
    if digits and i < end and c[i] == b'.':
        i += 1
        digits = 0
        while i < end and b'0' <= c[i] <= b'9':
            i += 1
            digits += 1
    if digits and i < end and c[i] == b'E':
        i += 1
        if i < end and (c[i] == b'+' or c[i] == b'-'):
            sign = -1 if c[i] == b'-' else 1
            i += 1
        digits = 0
        while i < end and b'0' <= c[i] <= b'9':
            if exponent < 2_147_483_648:  # (stops growing once past an Int32: refused below)
                exponent = exponent * 10 + (c[i] - 48)
            i += 1
            digits += 1
    if not digits or i != end or exponent >= 2_147_483_648:
        raise ValueError(f"{what}: {r.text(start)[:40]!r} in row {row} is not a decimal number")
    if bounds is None:
        return 0
    precision, scale = bounds
    if whole > precision or whole + sign * exponent > precision - scale:
        raise ValueError(f"{what}: {r.text(start)[:40]!r} in row {row} is too large for Decimal({precision}, {scale})")
    return 0


cdef bint _zero_text(str text):
    """Whether a Decimal's text is a zero ("0", "-0", "0.000", "0E-12"; not "NaN")."""
    cdef Py_ssize_t n, i
    cdef const char *c = PyUnicode_AsUTF8AndSize(text, &n)
    cdef bint digit = False
    for i in range(n):
        if c[i] == b'E' or c[i] == b'e':
            break
        if c[i] == b'0':
            digit = True
        elif c[i] != b'.' and c[i] != b'-' and c[i] != b'+':
            return False
    return digit


cdef inline char *_copy(char *at, _Buffer buffer):
    if buffer.size:
        memcpy(at, buffer.data, buffer.size)
    return at + buffer.size


import sys as _sys

if _sys.byteorder != "little":  # Native's numbers are little-endian; the writer copies the host's
    raise ImportError("streams.storage._native writes numbers in the host's byte order, which must be little-endian")
