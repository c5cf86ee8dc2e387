"""ClickHouse tables as Costline writes them: each table's columns, their types, which record
attribute each holds, and how a batch of records is encoded into ClickHouse's Native format
(``TableSpec.encode``) with a deduplication token that is the same for a retry of the batch and
different for any other. Pure encoding: sending is ``streams.storage.sink``'s job.
"""

from __future__ import annotations

import hashlib
import itertools
import operator
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any, Generic, NamedTuple, TypeVar

from clickhouse_connect.datatypes.numeric import Decimal as DecimalType
from clickhouse_connect.datatypes.registry import get_from_name
from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.compression import get_compressor
from clickhouse_connect.driver.insert import InsertContext
from clickhouse_connect.driver.transform import NativeTransform

from schemas.attributed import ZERO, AttributedUsage, CostBreakdown
from schemas.quota import QuotaAlert
from schemas.trusted import construct, json_writer
from schemas.usage import epoch_ms
from streams.storage.compiled import native as _native

R = TypeVar("R")
#: The ledger row the stream builds (``streams/storage/_native.pyx``): ``AttributedUsage``'s fields,
#: its token counts and costs as C integers; ``NativeWriter.add_row`` writes it.
LedgerRow = _native.LedgerRow
_MODEL_FIELDS = tuple(AttributedUsage.__pydantic_fields__)
if any(not hasattr(LedgerRow, name) for name in _MODEL_FIELDS):  # (at import: a field added to one only)
    raise TypeError("streams/storage/_native.pyx: LedgerRow lacks AttributedUsage's "
                    f"{[name for name in _MODEL_FIELDS if not hasattr(LedgerRow, name)]}")


def _row_model(row: Any) -> AttributedUsage:
    """``LedgerRow.as_model``: the row's fields, in the model's order (its JSON follows its ``__dict__``)."""
    return construct(AttributedUsage, {name: getattr(row, name) for name in _MODEL_FIELDS})


_native.configure_rows(ZERO, CostBreakdown, _row_model)


def as_record(record: R) -> R | AttributedUsage:
    """A ledger row as the ``AttributedUsage`` it stands for; any other record as it is."""
    return record.as_model() if type(record) is LedgerRow else record
#: A conversion of a whole column of values.
Convert = Callable[[list[Any]], list[Any]]


@dataclass(frozen=True)
class TableSpec(Generic[R]):
    """A ClickHouse table, its columns with their types (so no insert needs a DESCRIBE), the record
    attribute each column holds (a dotted path) with an optional conversion of the whole column, and
    the identity of a batch (for the deduplication token): text parts that tell it from any other batch."""

    name: str
    columns: list[tuple[str, str, str, Convert | None]]
    identity: Callable[[Sequence[R]], Iterable[str]]

    def __post_init__(self) -> None:
        # Columns are sent record attributes first, then each nested object's (``usage.*``, ...), so
        # that one pass reads a record's whole row while the record is in cache: the attributes
        # from the model's ``__dict__`` with one C-level getter, each nested object's with one more.
        # The rows are then turned into columns (about twice as fast as one pass per column).
        direct = [c for c in self.columns if "." not in c[2]]
        nested: dict[str, list[tuple[str, str, str, Convert | None]]] = {}
        for column in self.columns:
            if "." in column[2]:
                nested.setdefault(column[2].split(".", 1)[0], []).append(column)
        sent = direct + [c for group in nested.values() for c in group]
        object.__setattr__(self, "_sent", sent)
        object.__setattr__(self, "_row", _row_reader(
            [path for _, _, path, _ in direct],
            {head: [path.split(".", 1)[1] for _, _, path, _ in group] for head, group in nested.items()}))
        object.__setattr__(self, "_wire", [_wire(ch_type, convert) for _, ch_type, _, convert in sent])
        object.__setattr__(self, "_types", [get_from_name(wire_type) for wire_type, _ in self._wire])
        kinds = [_NATIVE_KINDS.get(wire) for wire in self._wire]
        object.__setattr__(self, "_decimals", [_precision_scale(ch_type) for _, ch_type, _, _ in sent])
        object.__setattr__(self, "_plan", None if None in kinds else [
            (name, wire_type, kind, path) for (name, _, path, _), (wire_type, _), kind in zip(sent, self._wire, kinds)])

    @property
    def column_names(self) -> list[str]:
        """The columns in the order they are sent."""
        return [name for name, _, _, _ in self._sent]

    @property
    def wire_types(self) -> list[str]:
        """The types the columns are sent as (see ``_wire``), in the order they are sent."""
        return [wire_type for wire_type, _ in self._wire]

    def row(self, record: R) -> tuple[Any, ...]:
        """A record's values, in the order the columns are sent (before their wire conversion)."""
        return self._row(as_record(record))  # (a row: for the Python encoder and tests; the stream's are C's)

    def to_columns(self, records: Sequence[R]) -> list[list[Any]]:
        """The batch as columns of the wire types, in the order they are sent."""
        if not records:
            return [[] for _ in self.columns]
        kept = isinstance(records, RecordBatch) and records.table is self and records.writer is None
        rows = records.rows if kept else map(self.row, records)
        columns = list(map(list, zip(*rows, strict=True)))
        for i, (_, convert) in enumerate(self._wire):
            if convert is not None:
                columns[i] = convert(columns[i])
        return columns

    def dedup_token(self, records: Sequence[R]) -> str:
        """Identical for a retry of the same batch, different for any other batch."""
        return _token(self.identity(records))

    def writer(self) -> _native.NativeWriter | None:
        """A compiled writer of this table's Native block (``streams.storage._native``), or None
        when a column's conversion has no compiled twin (the table is then encoded in Python)."""
        if self._plan is None:
            return None
        return _native.NativeWriter(self._plan, ZERO, _to_json, epoch_ms)

    def native(self, records: Sequence[R]) -> bytes:
        """The batch in ClickHouse's Native format: one block of the columns in their wire types,
        written as each record was added to its ``RecordBatch``, or now."""
        if isinstance(records, RecordBatch) and records.table is self:
            return b"".join(records.blocks()) if records.writer is not None else self.native_reference(records)
        writer = self.writer()
        if writer is None:
            return self.native_reference(records)
        for record in records:
            writer.add(record)
        return writer.finish()

    def native_reference(self, records: Sequence[R]) -> bytes:
        """The batch in ClickHouse's Native format as ``Client.insert`` would send it: the rows read
        in Python, turned into columns and written by clickhouse-connect's column writers (in
        blocks of its choosing). The compiled writer is tested against this."""
        columns = self.to_columns(records)
        try:
            context = InsertContext(self.name, self.column_names, self._types, data=columns, column_oriented=True)
            chunks = list(NativeTransform.build_insert(context))
        finally:
            # An insert context is a reference cycle that holds the columns until the cycle
            # collector runs, which ``streams.runtime.loop.tune_gc`` makes rare. Emptied here, a
            # batch's columns are freed at once; left alone, every batch not yet collected keeps its
            # columns, and the worker's peak memory grows by about a hundred MB.
            for column in columns:
                column.clear()
        if context.insert_exception is not None:  # a column writer failed (the last chunk is then garbage)
            raise context.insert_exception
        if chunks:  # the first chunk starts with the statement line of an HTTP insert: the body follows it
            chunks[0] = chunks[0][chunks[0].index(b"\n") + 1:]
        return b"".join(chunks)

    def read_block(self, block: bytes, values: bool = False) -> Any:
        """``streams.storage._native.read_block`` with this table's columns: the row count of a
        Native block this table's writer wrote (and, with ``values``, its columns), or
        ``ValueError`` saying why ClickHouse would refuse it."""
        if self._plan is None:
            raise ValueError(f"{self.name} has no compiled writer, so no block of it is read")
        return _native.read_block(block, self._plan, self._decimals, values)

    def block_rows(self, block: bytes) -> list[dict[str, Any]]:
        """A block's rows as dicts by column name, decimals as ``Decimal`` (the in-memory sink's
        rows, and tests')."""
        _, columns = self.read_block(block, values=True)
        columns = [[None if v is None else Decimal(v) for v in column] if bounds is not None else column
                   for column, bounds in zip(columns, self._decimals, strict=True)]
        return [dict(zip(self.column_names, row, strict=True)) for row in zip(*columns, strict=True)]

    def encode(self, records: Sequence[R] | Blocks, compression: str | None = None) -> Encoded:
        """The batch, ready to be sent (and sent again) by the sink. ``compression`` (``ClickHouseSink.compression``:
        lz4 or zstd to a server over HTTP, none to the embedded engine) compresses the body as
        ``Client.insert`` would. Blocks written elsewhere (``Blocks``) are sent one after another
        in one body, as they are: a Native insert reads blocks until its body ends."""
        if isinstance(records, Blocks):
            body, rows = b"".join(records.bodies), records.rows
            # Where each block was read and what it holds (its size and CRC-32, at about 1 GB/s): by
            # position alone, blocks of a usage.ledger made anew, whose offsets start again, would be
            # dropped by ClickHouse as repeats of blocks it took before (its deduplication window).
            token = _token(f"{block_id}:{len(body_)}:{zlib.crc32(body_)}"
                           for block_id, body_ in zip(records.ids, records.bodies, strict=True))
        else:
            body, rows, token = self.native(records), len(records), self.dedup_token(records)
        if compression:
            compressor = get_compressor(compression)
            body = bytes(compressor.compress_block(body)) + (compressor.flush() or b"")
        return Encoded(self, rows, body, token, compression)

    def send(self, client: Client, batch: Encoded) -> None:
        """One attempt at inserting an encoded batch. (Types that differ from the table's, decimals
        sent as text for one, are converted by ClickHouse: see ``_wire``.)"""
        client.raw_insert(self.name, self.column_names, batch.body, fmt="Native", compression=batch.compression,
                          settings=_INSERT_SETTINGS | {"insert_deduplication_token": batch.token})

    def insert(self, client: Client, records: Sequence[R], token: str | None = None) -> None:
        """Encodes and sends a batch in one go, once (tests; everything else lands through ``ClickHouseSink``)."""
        batch = self.encode(records)
        self.send(client, batch._replace(token=token) if token else batch)


#: Every landing's settings but its token.
_INSERT_SETTINGS = {
    "input_format_native_allow_types_conversion": 1,
    # Not collapsed at insert: with the default (1) ClickHouse runs each inserted block through its
    # table's merge (for a ReplacingMergeTree, the rows of one key to the latest), which for the
    # ledger's 56 columns took 13.2-13.8 µs of the embedded engine's CPU a row against 9.5-9.6
    # without (100,000 rows in blocks of 5,000, one run each way twice). Nothing is counted twice:
    # Costline's readers of a ReplacingMergeTree read it with FINAL (sql/'s views), which collapses
    # two rows of one key in one block as it collapses them across blocks, until a merge does (a
    # part written this way is of level 0, which FINAL never assumes free of copies). Copies in one
    # block are rare anyway: a backfill's, a sink's blocks of several transactions, a tenant the
    # quota stage does not check for copies. FINAL on 20 such unmerged parts of 5,000 rows took
    # 13.5-15.8 ms against 13.1-16.3 with the default. A reader without FINAL counts copies (it
    # already did across blocks).
    "optimize_on_insert": 0,
}


class Encoded(NamedTuple):
    """A batch of one table in ClickHouse's Native format, and its deduplication token."""

    table: TableSpec[Any]
    rows: int
    body: bytes
    token: str
    #: How ``body`` is compressed, if it is.
    compression: str | None = None


@dataclass
class Blocks:
    """Native blocks of one table written elsewhere (a stream worker's ledger blocks, read back by
    the sink role), each checked with ``TableSpec.read_block``, and the ids that make their
    deduplication token (their topic, partition and offset)."""

    bodies: list[bytes] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)
    rows: int = 0

    def add(self, body: bytes, block_id: str, rows: int) -> None:
        self.bodies.append(body)
        self.ids.append(block_id)
        self.rows += rows

    def __len__(self) -> int:  # (a part with no rows is not landed)
        return self.rows


class RecordBatch(list[R]):
    """Records for one table, each written into the batch's Native columns as it is added.

    The thread that builds a record adds it while the record is still in the CPU's cache; encoding
    the batch, once the whole batch is built, then only joins the columns. Read then instead, each
    row costs several cache misses. (A table without a compiled writer keeps each row's tuple, for
    the Python encoder.)"""

    def __init__(self, table: TableSpec[R], compiled: bool = True, block_bytes: int | None = None) -> None:
        """``compiled=False``: rows kept for the Python encoder (the reference path's batches).
        ``block_bytes``: a block is finished once it holds this many bytes, and the next one begun
        (the ledger blocks a stream worker publishes, each one Kafka record: see ``LEDGER_BLOCK_BYTES``)."""
        super().__init__()
        self.table = table
        self.writer = table.writer() if compiled else None
        self.rows: list[tuple[Any, ...]] = []
        self.block_bytes = block_bytes if self.writer is not None else None
        self._finished: list[bytes] = []

    def add(self, record: R) -> None:
        if self.writer is not None:
            self.writer.add(record)  # (first: a record it refuses is not kept either)
            if self.block_bytes is not None and self.writer.nbytes >= self.block_bytes:
                self._finished.append(self.writer.finish())
                self.writer = self.table.writer()
        else:
            self.rows.append(self.table.row(record))
        self.append(record)

    def blocks(self) -> list[bytes]:
        """The batch as Native blocks (more than one only with ``block_bytes``); call once."""
        last = self.writer.finish()
        return [*self._finished, last] if last else self._finished


def _row_reader(direct: list[str], nested: dict[str, list[str]]) -> Callable[[Any], tuple[Any, ...]]:
    """A function from a record to the tuple of its ``direct`` attributes (read from its
    ``__dict__``, where a pydantic model keeps its fields), then each nested object's attributes."""
    own = _tuple_getter(operator.itemgetter, direct)
    parts = [(head, _tuple_getter(operator.attrgetter, names)) for head, names in nested.items()]

    def row(record: Any) -> tuple[Any, ...]:
        values = record.__dict__
        out = own(values)
        for head, read in parts:
            out += read(values[head])
        return out

    return row


def _tuple_getter(getter: Callable[..., Callable[[Any], Any]], names: list[str]) -> Callable[[Any], tuple[Any, ...]]:
    """``itemgetter``/``attrgetter`` of ``names``, returning a tuple even for one name (or none)."""
    if len(names) > 1:
        return getter(*names)
    if names:
        one = getter(names[0])
        return lambda value: (one(value),)
    return lambda value: ()


def _wire(ch_type: str, convert: Convert | None) -> tuple[str, Convert | None]:
    """How a column is sent, and the conversion of the whole column: decimals as their exact text
    and low-cardinality strings as plain strings, which ClickHouse converts to the table's type on
    insert (exactly: a decimal string is parsed, never rounded through a float). The client would
    otherwise encode each decimal through str → Decimal → scaled int, and build each dictionary, in
    Python on the worker's busy thread; the conversion runs in ClickHouse instead. Other types are
    sent as they are."""
    if ch_type.startswith("Decimal("):
        if convert is not None:
            return "String", lambda column: _decimal_texts(convert(column))
        return "String", _decimal_texts
    if ch_type.startswith("Nullable(Decimal("):
        return "Nullable(String)", _optional_decimal_texts
    if ch_type == "LowCardinality(String)":
        return "String", convert
    if ch_type.startswith("DateTime64(3,") and convert is None:
        return ch_type, _milliseconds
    return ch_type, convert


def _precision_scale(ch_type: str) -> tuple[int, int] | None:
    """A ``Decimal(P, S)`` column's (P, S) (nullable or not), as clickhouse-connect reads the type;
    None for any other type."""
    column_type = get_from_name(ch_type)
    return (column_type.prec, column_type.scale) if isinstance(column_type, DecimalType) else None


def _token(parts: Iterable[str]) -> str:
    """A deduplication token: the same parts give the same token, any other parts another."""
    return hashlib.sha256("\x01".join(parts).encode()).hexdigest()


def _milliseconds(column: list[datetime]) -> list[datetime] | list[int]:
    """A column of one and the same time (``attributed_at`` of a batch) as that time's epoch
    milliseconds, which is what a ``DateTime64(3)`` column holds (floored, as the client would):
    the client writes integers as they are, instead of converting each time in Python, row by
    row. Other columns of times are left to the client."""
    first = column[0]
    if column[-1] is first and column.count(first) == len(column):
        return [epoch_ms(first)] * len(column)
    return column


def _decimal_texts(column: list[Any]) -> list[str]:
    """Decimals as text; a column of zeros (the audio, image and per-call cost classes of most
    batches) without formatting each one. ``list.count`` compares in C, and with the first value:
    a zero the pricing stage shares is then matched by identity, without a comparison (counting
    ``0`` would compare each Decimal with an int), and a column that starts with another value is
    not counted at all."""
    first = column[0]
    if first == 0 and column.count(first) == len(column):
        return ["0"] * len(column)
    return list(map(str, column))


def _optional_decimal_texts(column: list[Decimal | None]) -> list[str | None]:
    """Optional decimals as text (None stays NULL); a column of NULLs without a look at each."""
    if column[0] is None and column.count(None) == len(column):
        return column
    return [None if value is None else str(value) for value in column]


_DECIMAL = "Decimal(18, 12)"
_TOKEN_CLASSES = [
    "input_tokens", "cache_read_tokens", "cache_write_tokens", "output_tokens", "reasoning_tokens",
    "cache_write_1h_tokens", "input_audio_tokens", "cache_audio_read_tokens", "input_image_tokens",
    "cache_image_read_tokens", "output_audio_tokens", "output_image_tokens",
]
_COST_CLASSES = [
    "input", "cache_read", "cache_write", "output", "reasoning",
    "input_audio", "input_image", "output_audio", "output_image", "request",
]


#: ``json.dumps(value, separators=(",", ":"))``, with the encoder built once.
_to_json = json_writer()


def _jsons(column: list[Any]) -> list[str]:
    """JSON objects as text, an empty or missing one as ""."""
    return [_to_json(value) if value else "" for value in column]


def _texts(column: list[str | None]) -> list[str]:
    """Optional text in a non-nullable String column: a missing value as ""."""
    return ["" if value is None else value for value in column]


#: The compiled writer's code for a column sent as a wire type after a conversion (``_wire``'s
#: pairs); a pair not here keeps its table on the Python encoder.
_NATIVE_KINDS: dict[tuple[str, Convert | None], int] = {
    ("String", None): _native.KIND_STR,
    ("String", _texts): _native.KIND_TEXT,
    ("String", _decimal_texts): _native.KIND_DECIMAL,
    ("Nullable(String)", _optional_decimal_texts): _native.KIND_OPT_DECIMAL,
    ("String", _jsons): _native.KIND_JSON,
    ("UInt64", None): _native.KIND_UINT64,
    ("Nullable(UInt32)", None): _native.KIND_OPT_UINT32,
    ("Bool", None): _native.KIND_BOOL,
    ("Map(String, String)", None): _native.KIND_MAP_STR,
    ("DateTime64(3, 'UTC')", _milliseconds): _native.KIND_DATETIME64_MS,
}


def _ledger_identity(records: Sequence[AttributedUsage]) -> Iterable[str]:
    """Each record's ``event_id``, in order, then its ``attributed_at`` as runs of one value
    ("time*count"): a batch attributed at one time has a single run, so the token costs no per-row
    time formatting, and any other pairing of ids and times still gives other parts."""
    yield from map(_EVENT_ID, records)
    times = list(map(_ATTRIBUTED_AT, records))
    if times and times.count(times[0]) == len(times):  # one run (compared in C)
        yield f"{times[0].isoformat()}*{len(times)}"
        return
    for at, run in itertools.groupby(times):
        yield f"{at.isoformat()}*{sum(1 for _ in run)}"


_EVENT_ID = operator.attrgetter("event_id")
_ALERT_ID = operator.attrgetter("alert_id")
_ATTRIBUTED_AT = operator.attrgetter("attributed_at")

LEDGER: TableSpec[AttributedUsage] = TableSpec("usage_ledger", identity=_ledger_identity, columns=[
    ("event_id", "String", "event_id", None),
    ("event_time", "DateTime64(3, 'UTC')", "event_time", None),
    ("tenant_id", "LowCardinality(String)", "tenant_id", None),
    ("user_id", "String", "user_id", _texts),
    ("provider", "LowCardinality(String)", "provider", None),
    ("model", "LowCardinality(String)", "model", None),
    ("matched_model", "LowCardinality(String)", "matched_model", _texts),
    ("service", "LowCardinality(String)", "service", _texts),
    ("route", "LowCardinality(String)", "route", _texts),
    ("feature", "LowCardinality(String)", "feature", _texts),
    ("step", "LowCardinality(String)", "step", _texts),
    ("business_path", "LowCardinality(String)", "business_path", None),
    ("trace_id", "String", "trace_id", _texts),
    ("span_id", "String", "span_id", _texts),
    ("parent_span_id", "String", "parent_span_id", _texts),
    ("status", "LowCardinality(String)", "status", None),
    ("latency_ms", "Nullable(UInt32)", "latency_ms", None),
    ("batch", "Bool", "batch", None),
    ("tags", "Map(String, String)", "tags", None),
    ("extra", "String", "extra", _jsons),
    ("raw_usage", "String", "raw_usage", _jsons),
    ("raw_usage_format", "LowCardinality(String)", "raw_usage_format", _texts),
    *[(name, "UInt64", f"usage.{name}", None) for name in _TOKEN_CLASSES],
    *[(f"cost_{name}", _DECIMAL, f"cost.{name}", None) for name in _COST_CLASSES],
    ("cost_usd", _DECIMAL, "cost_usd", None),
    ("revenue_usd", f"Nullable({_DECIMAL})", "revenue_usd", None),  # (margin_usd: ClickHouse computes it, sql/0006)
    ("billing_period", "LowCardinality(String)", "billing_period", _texts),
    ("currency", "LowCardinality(String)", "currency", None),
    ("priced", "Bool", "priced", None),
    ("unpriced_reason", "String", "unpriced_reason", _texts),
    ("price_source", "LowCardinality(String)", "price_source", _texts),
    ("pricing_version", "LowCardinality(String)", "pricing_version", _texts),
    ("discount", "LowCardinality(String)", "discount", _texts),
    ("discount_percent", "Decimal(9, 4)", "discount_percent", None),
    ("late", "Bool", "late", None),
    ("attributed_at", "DateTime64(3, 'UTC')", "attributed_at", None),
])

ALERTS: TableSpec[QuotaAlert] = TableSpec("quota_alerts", identity=lambda alerts: map(_ALERT_ID, alerts), columns=[
    ("alert_id", "String", "alert_id", None),
    ("tenant_id", "LowCardinality(String)", "tenant_id", None),
    ("limit_id", "LowCardinality(String)", "limit_id", None),
    ("metric", "LowCardinality(String)", "metric", None),
    ("scope", "LowCardinality(String)", "scope", None),
    ("scope_value", "String", "scope_value", None),
    ("window_start", "DateTime64(3, 'UTC')", "window_start", None),
    ("window_end", "DateTime64(3, 'UTC')", "window_end", None),
    ("threshold_percent", "Decimal(9, 4)", "threshold_percent", None),
    ("level", "LowCardinality(String)", "level", None),
    ("usage", "Decimal(38, 12)", "usage", None),
    ("limit_value", "Decimal(38, 12)", "limit", None),
    ("crossed_at", "DateTime64(3, 'UTC')", "crossed_at", None),
    ("event_id", "String", "event_id", None),
])


@dataclass(frozen=True)
class Superseded:
    """An attribution replaced by ``costline reprice``: the figures before and after."""

    reprice_id: str
    superseded_at: datetime
    event_id: str
    event_time: datetime
    tenant_id: str
    attributed_at: datetime
    cost_usd: Decimal
    new_cost_usd: Decimal
    priced: bool
    price_source: str
    pricing_version: str
    new_pricing_version: str
    revenue_usd: Decimal | None
    new_revenue_usd: Decimal | None


@dataclass(frozen=True)
class RepriceRun:
    """One ``costline reprice`` run and its totals."""

    reprice_id: str
    started_at: datetime
    since: datetime
    until: datetime | None
    tenant_id: str | None
    events: int
    changed: int
    old_cost_usd: Decimal
    new_cost_usd: Decimal
    pricing_version: str
    old_revenue_usd: Decimal
    new_revenue_usd: Decimal


def _columns(record_type: type, types: dict[str, str]) -> list[tuple[str, str, str, Convert | None]]:
    """Columns named as the record's fields, in the record's order."""
    return [(name, types[name], name, None) for name in record_type.__dataclass_fields__]


AUDIT: TableSpec[Superseded] = TableSpec(
    "attribution_audit",
    identity=lambda rows: [rows[0].reprice_id, *map(_EVENT_ID, rows)],
    columns=_columns(Superseded, {
        "reprice_id": "String", "superseded_at": "DateTime64(3, 'UTC')", "event_id": "String",
        "event_time": "DateTime64(3, 'UTC')", "tenant_id": "LowCardinality(String)",
        "attributed_at": "DateTime64(3, 'UTC')", "cost_usd": _DECIMAL, "new_cost_usd": _DECIMAL, "priced": "Bool",
        "price_source": "LowCardinality(String)", "pricing_version": "LowCardinality(String)",
        "new_pricing_version": "LowCardinality(String)", "revenue_usd": f"Nullable({_DECIMAL})",
        "new_revenue_usd": f"Nullable({_DECIMAL})"}))

REPRICE_RUNS: TableSpec[RepriceRun] = TableSpec(
    "reprice_runs",
    identity=lambda runs: [run.reprice_id for run in runs],
    columns=_columns(RepriceRun, {
        "reprice_id": "String", "started_at": "DateTime64(3, 'UTC')", "since": "DateTime64(3, 'UTC')",
        "until": "Nullable(DateTime64(3, 'UTC'))", "tenant_id": "Nullable(String)", "events": "UInt64",
        "changed": "UInt64", "old_cost_usd": "Decimal(38, 12)", "new_cost_usd": "Decimal(38, 12)",
        "pricing_version": "LowCardinality(String)", "old_revenue_usd": "Decimal(38, 12)",
        "new_revenue_usd": "Decimal(38, 12)"}))


@dataclass(frozen=True)
class IssuedInvoice:
    """One issue of a tenant's invoice for a month (``costline invoice --record``)."""

    invoice_id: str
    tenant_id: str
    period: str
    period_start: datetime
    period_end: datetime
    issued_at: datetime
    currency: str
    total: Decimal
    cost_usd: Decimal
    margin_usd: Decimal
    streamed_revenue_usd: Decimal
    rated_usage_usd: Decimal
    unrated_calls: int


@dataclass(frozen=True)
class IssuedLine:
    """One line of an issued invoice, in its order (``position``)."""

    invoice_id: str
    tenant_id: str
    period: str
    issued_at: datetime
    position: int
    line_id: str
    kind: str
    description: str
    quantity: Decimal
    unit_amount: Decimal | None
    amount_unrounded: Decimal
    amount: Decimal


_INVOICE_ID = operator.attrgetter("invoice_id")
_MONEY = "Decimal(38, 12)"
_TIME = "DateTime64(3, 'UTC')"

INVOICES: TableSpec[IssuedInvoice] = TableSpec(
    "invoices",
    identity=lambda rows: map(_INVOICE_ID, rows),
    columns=_columns(IssuedInvoice, {
        "invoice_id": "String", "tenant_id": "LowCardinality(String)", "period": "LowCardinality(String)",
        "period_start": _TIME, "period_end": _TIME, "issued_at": _TIME, "currency": "LowCardinality(String)",
        "total": "Decimal(38, 2)", "cost_usd": _MONEY, "margin_usd": _MONEY, "streamed_revenue_usd": _MONEY,
        "rated_usage_usd": _MONEY, "unrated_calls": "UInt64"}))

INVOICE_LINES: TableSpec[IssuedLine] = TableSpec(
    "invoice_lines",
    identity=lambda rows: [f"{row.invoice_id}:{row.position}" for row in rows],
    columns=_columns(IssuedLine, {
        "invoice_id": "String", "tenant_id": "LowCardinality(String)", "period": "LowCardinality(String)",
        "issued_at": _TIME, "position": "UInt16", "line_id": "String", "kind": "LowCardinality(String)",
        "description": "String", "quantity": _MONEY, "unit_amount": f"Nullable({_MONEY})",
        "amount_unrounded": _MONEY, "amount": "Decimal(38, 2)"}))
