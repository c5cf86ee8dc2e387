"""Building a model instance from values the pipeline computed itself, already of their types.

Pydantic's ``model_construct`` skips validation but still walks every field (defaults, aliases,
the set of fields given), which in the attribution and quota stages costs more than the rest of
their per-event work. ``construct`` sets the instance's state directly, as ``model_construct``
does, and insists on every field instead of filling in defaults.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from json.encoder import c_encode_basestring, c_encode_basestring_ascii, c_make_encoder  # type: ignore[attr-defined]
from typing import Any, TypeVar

from pydantic import BaseModel

M = TypeVar("M", bound=BaseModel)


def construct(cls: type[M], values: dict[str, Any]) -> M:
    fields = cls.__pydantic_fields__  # ``model_fields`` is a descriptor that costs ~5 µs a read
    if len(values) != len(fields):
        missing = sorted(set(fields) - set(values))
        raise TypeError(f"{cls.__name__} needs every field to be built from trusted values; missing {missing}")
    instance = cls.__new__(cls)
    object.__setattr__(instance, "__dict__", values)
    # Every field is set, so every instance of the class shares one set of their names (building it
    # per instance was two thirds of this function). Pydantic reads it, copies it in ``model_copy``
    # and, on assignment to a field, adds the field's name, which it already holds.
    object.__setattr__(instance, "__pydantic_fields_set__", all_fields(cls))
    object.__setattr__(instance, "__pydantic_extra__", None)
    object.__setattr__(instance, "__pydantic_private__", None)
    return instance


_FIELD_SETS: dict[type[BaseModel], set[str]] = {}


def all_fields(cls: type[BaseModel]) -> set[str]:
    names = _FIELD_SETS.get(cls)
    if names is None:
        names = _FIELD_SETS[cls] = set(cls.__pydantic_fields__)
    return names


def json_writer(*, ascii_only: bool = True, default: Callable[[Any], Any] | None = None) -> Callable[[Any], str]:
    """``json.dumps(value, separators=(",", ":"), ensure_ascii=ascii_only, default=default)`` for
    plain trees of values (no check for circular references), with the C encoder built once:
    ``JSONEncoder.encode`` builds it again on every call, which costs about a microsecond, as much
    as encoding a small object does."""
    if c_make_encoder is None:  # a Python without the _json accelerator
        return json.JSONEncoder(separators=(",", ":"), ensure_ascii=ascii_only, default=default,
                                check_circular=False).encode
    strings = c_encode_basestring_ascii if ascii_only else c_encode_basestring
    chunks = c_make_encoder(None, default or _refuse, strings, None, ":", ",", False, False, True)
    return lambda value: "".join(chunks(value, 0))


def _refuse(value: Any) -> Any:
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")
