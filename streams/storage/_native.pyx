# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
"""A table's rows written into ClickHouse's Native format as each record is added.

``TableSpec.native`` (streams/storage/tables.py) encoded a batch in three passes of Python: each
record's row read into a tuple, the rows turned into columns, each column converted and written by
clickhouse-connect's column writers: 12 µs an event for the ledger's 56 columns, a fifth of the
worker's loop thread. ``NativeWriter`` reads each record's attributes once, from its ``__dict__``,
and appends each value to its column's buffer in C, so a finished batch is only its buffers
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


cdef class NativeWriter:
    """One batch of one table: ``add`` each record, then ``finish`` for the Native block."""
    cdef list _columns
    cdef Py_ssize_t _rows
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
            self._columns.append(column)

    def __len__(self):
        return self._rows

    def add(self, object record):
        """Appends ``record``'s row to the columns. Raises ``TypeError`` (``OverflowError``) for a
        value its column cannot hold, and then holds what it held before."""
        cdef dict own = record.__dict__  # (where a pydantic model keeps its fields)
        cdef object nested = None, last_head = None, value
        cdef _Column column
        cdef PyObject *found
        for column in self._columns:
            column.mark_values, column.mark_extra, column.mark_offsets = \
                column.values.size, column.extra.size, column.offsets.size
            column.mark_entries, column.mark_all_zero = column.entries, column.all_zero
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
            # Every column back to where this row started: the writer holds the rows added before,
            # and can take more (a half-written row would make the whole block unreadable).
            for column in self._columns:
                column.values.size, column.extra.size, column.offsets.size = \
                    column.mark_values, column.mark_extra, column.mark_offsets
                column.entries, column.all_zero = column.mark_entries, column.mark_all_zero
            raise
        self._rows += 1

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
