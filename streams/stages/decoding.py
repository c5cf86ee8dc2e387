"""The usage contract's fast decoder: a ``msgspec`` type derived from the pydantic models at import.

``UsageEvent.model_validate_json`` costs about 20 µs an event on this project's hosts, most of it
pydantic building two model instances and calling Python validators field by field; ``msgspec``
decodes the same JSON into a typed struct, checking types and bounds, in about 3 µs. The pydantic
model stays the one definition of the contract (and the JSON Schema's source): ``decoder_for``
reads its fields and builds the struct type from them, so a field added to the model is decoded
here without a line changed, and a constraint this module does not know how to translate fails
the import instead of being skipped.

The fast decoder only ever *accepts*. Anything it does not accept — a value of the wrong type, a
bound crossed, an unknown field (the contract keeps extra fields; a struct cannot), whitespace to
strip, a provider to lowercase, a time written in any form but RFC 3339's plain one, a model
validator that objects — is handed to pydantic, which decides, and words the reason. So both paths
accept exactly the same inputs, reject with the same reasons, and an accepted event equals
pydantic's, field for field (``tests/stages/test_decoding.py`` proves it with hypothesis).
What breaks if this is changed: a translation that accepts more than pydantic would let an event
into the ledger that the contract refuses; the property test is there to catch exactly that.
"""

from __future__ import annotations

import re
import types
import typing
from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any, Literal, TypeVar, Union

import annotated_types
import msgspec
from pydantic import AwareDatetime, BaseModel
from pydantic.fields import FieldInfo
from pydantic.functional_validators import AfterValidator
from pydantic.types import StringConstraints

from schemas.trusted import construct
from streams.storage.compiled import fast

M = TypeVar("M", bound=BaseModel)

#: The one form of time the fast path parses itself: RFC 3339 with a ``T``, seconds, up to six
#: fraction digits and ``Z`` or an offset. ``datetime.fromisoformat`` and pydantic read these the
#: same; every other form (a space, a comma, seven digits, a bare date) goes to pydantic.
_RFC3339 = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d{1,6})?(?:Z|[+-](?:[01]\d|2[0-3]):[0-5]\d)").fullmatch
#: How deep the fast path takes a free-form JSON value (``raw_usage``: providers' usage objects are 2-3
#: levels deep). pydantic refuses JSON nested 200 levels deep; msgspec reads about 990 and then
#: raises ``RecursionError``, and a record pydantic would never accept was then published, whose
#: JSON pydantic could not write (past 255 levels): deeper values are pydantic's to decide.
MAX_DEPTH = 32


class Undecided(Exception):
    """The fast path does not decide this input: pydantic does."""


class Decoder:
    """Bytes → the struct twin of ``model`` (``Decoder.struct``), checked as pydantic would check
    the model, or ``Undecided``. Built by ``decoder_for``.

    The twin has the model's field names, values and types, its methods and properties, nested
    models as their own twins, and ``model_extra`` (always empty: an event with extra fields is
    pydantic's), so the stages read it as they read the model. It is not turned into a model
    instance: building one from Python costs more than pydantic's whole validation (measured: 21 µs
    against 16 an event; the nested ``TokenUsage`` alone, 5 µs). ``twin_as_model`` makes one where
    a model is needed.
    """

    def __init__(self, model: type[BaseModel]) -> None:
        self.model = model
        plan = _struct_for(model)
        self.struct = plan.struct
        self._decode = msgspec.json.Decoder(self.struct).decode
        self._stripped, self._lowered, self._converted, self._nested = (
            plan.stripped, plan.lowered, plan.converted, plan.nested)
        self._after = _after_validators(model)
        # The same steps in C (``streams/stages/_fast.pyx``): times of the one form every producer
        # writes are parsed there, every other time by its Python parser (``_TimeParser``).
        self._finisher = fast.Finisher(
            plan.stripped, plan.lowered,
            [(name, convert.after, convert) for name, convert in plan.converted if isinstance(convert, _TimeParser)],
            [(name, convert) for name, convert in plan.converted if not isinstance(convert, _TimeParser)],
            [(name, nested._finisher) for name, nested in plan.nested], self._after, Undecided)
        self.finish = self._finisher.finish

    def decode(self, value: bytes) -> msgspec.Struct:
        try:
            decoded = self._decode(value)
        except (msgspec.DecodeError, RecursionError):  # (a ValidationError is a DecodeError)
            raise Undecided from None
        return self.finish(decoded)

    def finish_in_python(self, decoded: msgspec.Struct) -> msgspec.Struct:
        """``finish``, step by step in Python: what the compiled ``Finisher`` is tested against.
        Checks what msgspec does not and converts times, in place (nested twins first)."""
        # Text pydantic would strip or lowercase is left to it (Rust's notions of white space and
        # of case differ from Python's at the edges; Python's ``strip`` removes a superset of what
        # Rust's ``trim`` does, so text Python finds nothing to strip from, Rust does not either).
        for name in self._stripped:
            text = getattr(decoded, name)
            if text is not None and text.strip() != text:
                raise Undecided
        for name in self._lowered:
            text = getattr(decoded, name)
            if text is not None and not (text.isascii() and text.lower() == text):
                raise Undecided
        for name, convert in self._converted:
            value = getattr(decoded, name)
            if value is not None:
                setattr(decoded, name, convert(value))
        for name, nested in self._nested:
            value = getattr(decoded, name)
            if value is not None:
                nested.finish_in_python(value)
        for check in self._after:  # the model's own validators, on the struct: it has the same fields
            try:
                check(decoded)
            except Exception:  # noqa: BLE001 - pydantic words the reason
                raise Undecided from None
        return decoded


def twin_as_model(value: Any, model: type[M]) -> M:
    """``value`` as a ``model`` instance: itself if it is one, else built from its twin's fields
    (in the model's field order, so that its dump equals pydantic's)."""
    if isinstance(value, model):
        return value
    values = {}
    for name in model.__pydantic_fields__:
        field = getattr(value, name)
        nested = _MODEL_OF.get(type(field))
        values[name] = twin_as_model(field, nested) if nested is not None else field
    instance = construct(model, values)
    if model.model_config.get("extra") == "allow":
        object.__setattr__(instance, "__pydantic_extra__", {})
    return instance


def twin_fields(value: Any, model: type[BaseModel]) -> dict[str, Any]:
    """A model's or its twin's fields, in the model's order (how a twin is serialized)."""
    return {name: getattr(value, name) for name in model.__pydantic_fields__}


class _Twin(msgspec.Struct):
    """The base of every struct twin: what the stages read of a model besides its fields."""

    #: Always empty: an event with fields the contract does not name is decided by pydantic.
    model_extra: typing.ClassVar[dict[str, Any]] = {}


#: The model of each twin type.
_MODEL_OF: dict[type, type[BaseModel]] = {}


class _Plan(typing.NamedTuple):
    struct: type[msgspec.Struct]
    #: Fields pydantic strips of white space, and lowercases.
    stripped: list[str]
    lowered: list[str]
    #: Fields whose decoded value is converted (a time: parsed, then the contract's after-validators).
    converted: list[tuple[str, Callable[[Any], Any]]]
    nested: list[tuple[str, Decoder]]


def decoder_for(model: type[BaseModel]) -> Decoder:
    return Decoder(model)


def _struct_for(model: type[BaseModel]) -> _Plan:
    """The struct type of ``model``'s fields and what is done to a decoded struct to finish it."""
    config = model.model_config
    if not config.get("strict"):
        raise TypeError(f"{model.__name__}: only strict models are translated (msgspec never coerces)")
    if model.__pydantic_decorators__.field_validators or model.__pydantic_decorators__.validators:
        raise TypeError(f"{model.__name__}: field validators are not translated; teach streams.stages.decoding")
    if any(d.info.mode != "after" for d in model.__pydantic_decorators__.model_validators.values()):
        raise TypeError(f"{model.__name__}: only 'after' model validators are translated")
    fields: list[tuple[str, Any, Any]] = []
    plan = _Plan(msgspec.Struct, [], [], [], [])
    for name, info in model.__pydantic_fields__.items():
        if info.alias not in (None, name) or info.validation_alias is not None:
            raise TypeError(f"{model.__name__}.{name}: aliases are not translated")
        field = _translate(f"{model.__name__}.{name}", _annotated(info))
        plan.stripped.extend([name] if field.strip else [])
        plan.lowered.extend([name] if field.lower else [])
        plan.converted.extend([(name, field.convert)] if field.convert else [])
        plan.nested.extend([(name, field.nested)] if field.nested else [])
        if info.is_required():
            fields.append((name, field.annotation, msgspec.NODEFAULT))
        elif info.default_factory is not None:
            fields.append((name, field.annotation, msgspec.field(default_factory=info.default_factory)))
        else:
            fields.append((name, field.annotation, info.default))
    # Unknown fields are kept by the contract (``extra="allow"``) but cannot be kept by a struct:
    # such an event is left to pydantic. (A model that forbids them would be refused there too.)
    required = [f for f in fields if f[2] is msgspec.NODEFAULT]
    struct = msgspec.defstruct(f"Checked{model.__name__}", required + [f for f in fields if f not in required],
                               bases=(_Twin,), namespace=_methods(model), forbid_unknown_fields=True)
    _MODEL_OF[struct] = model
    return plan._replace(struct=struct)


class _Translated(typing.NamedTuple):
    annotation: Any
    strip: bool = False
    lower: bool = False
    convert: Callable[[Any], Any] | None = None
    nested: Decoder | None = None


def _methods(model: type[BaseModel]) -> dict[str, Any]:
    """The model's own public methods and properties (``timestamp_ms``, ``uncached_input_tokens``):
    they read the fields by name, so they work on the twin as they are."""
    return {name: value for name, value in vars(model).items()
            if not name.startswith("_") and isinstance(value, property | types.FunctionType)}


def _annotated(info: FieldInfo) -> Any:
    return Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation


def _translate(where: str, annotation: Any) -> _Translated:
    """A pydantic annotation → the msgspec annotation and what finishes a decoded value. Raises
    ``TypeError`` for anything not translated."""
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        args = typing.get_args(annotation)
        if len(args) != 2 or type(None) not in args:
            raise TypeError(f"{where}: only 'X | None' unions are translated")
        inner = _translate(where, next(a for a in args if a is not type(None)))
        return inner._replace(annotation=inner.annotation | None)
    if origin is Annotated:
        base, *metadata = typing.get_args(annotation)
        return _constrained(where, base, metadata)
    return _constrained(where, annotation, [])


def _constrained(where: str, base: Any, metadata: list[Any]) -> _Translated:
    bounds: dict[str, Any] = {}
    strip = lower = False
    after: list[Callable[[Any], Any]] = []
    for item in _flatten(metadata):
        if isinstance(item, StringConstraints):
            if item.to_upper or item.pattern is not None or item.ascii_only or item.strict is False:
                raise TypeError(f"{where}: {item} is not translated")
            strip, lower = bool(item.strip_whitespace), bool(item.to_lower)
            bounds |= {k: v for k, v in (("min_length", item.min_length), ("max_length", item.max_length))
                       if v is not None}
        elif isinstance(item, annotated_types.Ge):
            bounds["ge"] = item.ge
        elif isinstance(item, annotated_types.Le):
            bounds["le"] = item.le
        elif isinstance(item, annotated_types.MinLen):
            bounds["min_length"] = item.min_length
        elif isinstance(item, annotated_types.MaxLen):
            bounds["max_length"] = item.max_length
        elif isinstance(item, AfterValidator):
            after.append(item.func)
        else:
            raise TypeError(f"{where}: constraint {item!r} is not translated")
    if isinstance(base, type) and issubclass(base, BaseModel):
        if bounds or after or strip or lower:
            raise TypeError(f"{where}: constraints on a nested model are not translated")
        inner = Decoder(base)
        return _Translated(inner.struct, nested=inner)
    if base is AwareDatetime:
        if bounds:
            raise TypeError(f"{where}: bounds on a time are not translated")
        return _Translated(str, convert=_TimeParser(after))
    if after:
        raise TypeError(f"{where}: an after-validator on {base!r} is not translated")
    meta = Annotated[base, msgspec.Meta(**bounds)] if bounds else base
    if base is str:
        return _Translated(meta, strip=strip, lower=lower)
    if base in (int, bool) or typing.get_origin(base) is Literal:
        return _Translated(meta)
    if _plain_container(base):
        return _Translated(meta, convert=_shallow if typing.get_args(base)[1] is Any else None)
    raise TypeError(f"{where}: type {base!r} is not translated")


def _flatten(metadata: list[Any]) -> list[Any]:
    """Constraints, with those pydantic nests in a ``FieldInfo`` (``Annotated[int, Field(ge=0)]``) unnested."""
    out: list[Any] = []
    for item in metadata:
        out.extend(_flatten(item.metadata) if isinstance(item, FieldInfo) else [item])
    return out


def _plain_container(base: Any) -> bool:
    """``dict[str, str]`` and ``dict[str, Any]``: msgspec decodes JSON objects into dicts of the
    same values pydantic does (a value outside msgspec's numbers makes it refuse: pydantic decides)."""
    return typing.get_origin(base) is dict and typing.get_args(base) in ((str, str), (str, Any))


def _shallow(value: Any) -> Any:
    """``value`` if it nests at most ``MAX_DEPTH`` levels deep, else ``Undecided``."""
    level, depth = [value], 1
    while level:
        if depth > MAX_DEPTH:
            raise Undecided
        level = [item for node in level
                 for item in (node.values() if isinstance(node, dict) else node if isinstance(node, list) else ())
                 if isinstance(item, dict | list)]
        depth += 1
    return value


class _TimeParser:
    """A time field's text → its aware time, then the field's after-validators (``after``)."""

    def __init__(self, after: list[Callable[[Any], Any]]) -> None:
        self.after = tuple(after)

    def __call__(self, text: str) -> datetime:
        if _RFC3339(text) is None:
            raise Undecided
        try:
            at = datetime.fromisoformat(text)
            for step in self.after:
                at = step(at)
        except (ValueError, OverflowError):
            raise Undecided from None
        return at


def _after_validators(model: type[BaseModel]) -> list[Callable[[Any], Any]]:
    """The model's own ``mode="after"`` model validators, as plain functions of the instance."""
    return [d.func for d in model.__pydantic_decorators__.model_validators.values()]
