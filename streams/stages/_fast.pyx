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

``RecordBuilder`` builds the attributed record, one per event, from the mapping
``streams.stages.attribution`` declares; its ``construct`` is ``schemas.trusted.construct``'s
state-setting in C (that one, pure Python, serves every other trusted model, so that the contract
imports without a build). Change what a trusted instance holds in both.
"""

from cpython.datetime cimport datetime_new, import_datetime
from cpython.object cimport PyObject_GetAttr, PyObject_SetAttr
from cpython.unicode cimport PyUnicode_GET_LENGTH

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


cdef object construct(cls, dict values, fields_set):
    """A model instance whose state is ``values`` and ``fields_set``, as ``model_construct`` leaves
    it (``schemas.trusted.construct``, whose four ``object.__setattr__`` calls cost 0.7 µs)."""
    instance = cls.__new__(cls)
    PyObject_GenericSetAttr(instance, "__dict__", values)
    PyObject_GenericSetAttr(instance, "__pydantic_fields_set__", fields_set)
    PyObject_GenericSetAttr(instance, "__pydantic_extra__", None)
    PyObject_GenericSetAttr(instance, "__pydantic_private__", None)
    return instance


cdef class RecordBuilder:
    """A trusted model instance from an event, its price and what attribution computed, in C.

    ``Attribution.attribute`` declares the mapping (``streams/stages/attribution.py``): fields set
    to the same value on every record (``constants``), fields copied from the event's attributes
    and from the price's, by name (``from_event``, ``from_priced``: (field, attribute) pairs), and
    the ones it computes per event, given to ``build``. A 40-field dict literal of attribute reads
    and ``construct`` cost 3.3 µs an event in Python: a third of attribution after pricing."""

    cdef object cls, fields_set
    cdef dict template
    cdef tuple from_event, from_priced

    def __init__(self, cls, fields_set, dict constants, from_event, from_priced):
        self.cls, self.fields_set = cls, fields_set
        # Every field in the model's order, then set in place: pydantic writes a model's JSON in the
        # order of its ``__dict__``, so a record whose dict was filled in another order would be
        # published (``usage.attributed``) with its fields in that order.
        self.template = {**dict.fromkeys(cls.__pydantic_fields__), **constants}
        self.from_event = tuple((intern(field), intern(attribute)) for field, attribute in from_event)
        self.from_priced = tuple((intern(field), intern(attribute)) for field, attribute in from_priced)

    def build(self, event, priced, cost_usd, business_path, late, attributed_at):
        cdef dict values = self.template.copy()
        cdef tuple pair
        for pair in self.from_event:
            values[pair[0]] = PyObject_GetAttr(event, pair[1])
        for pair in self.from_priced:
            values[pair[0]] = PyObject_GetAttr(priced, pair[1])
        extra = event.model_extra
        values["extra"] = extra if extra else {}  # (a dict of its own: never one shared by every record)
        values["cost_usd"] = cost_usd
        values["business_path"] = business_path
        values["late"] = late
        values["attributed_at"] = attributed_at
        return construct(self.cls, values, self.fields_set)
