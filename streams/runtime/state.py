"""A stage's state: in-memory tables, changelogged to a compacted Kafka topic.

The worker owns the tables of the source partitions assigned to it. Every key written while an
event of partition *p* is processed belongs to partition *p* of the changelog (the source topic
is keyed by tenant, and so are the quota keys): a stage writes through ``views(p)``, the tables
as seen from partition *p*, which note each changed key with its partition. The keys a batch
changed are written once each, at the end of the batch, inside the Kafka transaction that also
holds the batch's source positions (``streams.runtime.checkpoint``). A worker that takes over a
partition reads that partition of the changelog up to its last committed record
(``read_committed``) and has exactly the state that belongs with the committed position:
nothing of a batch that was not committed.

Record key ``<table>|<key>``, value the entry as JSON (decimals and times as text), or a
tombstone for a deleted key. Each batch also writes ``_offset|<partition>``: the next source
offset to read. It is the worker's position, committed atomically with the state it belongs
to; a worker that takes over a partition starts reading there (the consumer group's own
committed offset trails it). The stage that owns the tables turns restored entries back into
its in-memory types (``restore_entry``), so it never reads the changelog's text encoding.

Cold entries are kept as their changelog bytes. A worker with many tenants holds a few entries per
tenant, each a dict of ``Decimal`` and ``datetime`` objects of about a kilobyte, most of them
untouched for minutes. In the tables named ``cold`` (the per-tenant ones; not the dedup groups,
which the quota stage indexes by identity) at most ``live_entries`` entries are kept as objects:
at each drain, beyond that number, the entries changed or read back longest ago are replaced by
the bytes the changelog holds for them (with 100,000 tenants: 3.2 KB of state a tenant against
4.4 KB, ``docs/performance.md``). Reading one turns it back into an object through
``restore_entry``: the path every entry takes after a restart, so an entry thawed equals the
entry frozen (``tests/runtime/test_paths.py`` runs the stream with a budget of a few entries and
compares it with the reference path). What breaks if an entry is frozen while a stage holds it
between batches: the stage would change an object the table no longer holds. Freezing happens
only in ``drain``, after the batch, and no stage keeps an entry of these tables past its batch.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterable, Iterator, MutableMapping
from typing import Any

import msgspec

log = logging.getLogger(__name__)

_SEP = "|"
_OFFSET = "_offset"
#: (partition, key, value) of one changelog record; value None is a tombstone.
ChangelogRecord = tuple[int, bytes, bytes | None]


class TrackedTable(MutableMapping[str, Any]):
    """One table as seen from one source partition: a dict that notes each key written or
    deleted, with that partition, until the next drain. Views of one table share its data."""

    __slots__ = ("name", "data", "partition", "_dirty", "_tables")

    def __init__(self, name: str, data: dict[str, Any], partition: int, dirty: dict[tuple[str, str], int],
                 tables: ChangelogTables) -> None:
        self.name = name
        self.data = data
        self.partition = partition
        self._dirty = dirty
        #: Where a frozen entry (its changelog bytes: see the module docstring) is turned back into an object.
        self._tables = tables

    def __getitem__(self, key: str) -> Any:
        value = self.data[key]
        return self._tables.thaw(self.name, key, value) if value.__class__ is bytes else value

    def get(self, key: str, default: Any = None) -> Any:
        value = self.data.get(key, default)
        return self._tables.thaw(self.name, key, value) if value.__class__ is bytes else value

    def __setitem__(self, key: str, value: Any) -> None:
        self.data[key] = value
        self._dirty[(self.name, key)] = self.partition

    def __delitem__(self, key: str) -> None:
        del self.data[key]
        self._dirty[(self.name, key)] = self.partition

    def pop(self, key: str, *default: Any) -> Any:
        if key in self.data:
            self._dirty[(self.name, key)] = self.partition
        value = self.data.pop(key, *default)
        return self._tables.restored(self.name, value) if value.__class__ is bytes else value

    def __iter__(self) -> Iterator[str]:
        return iter(self.data)

    def __len__(self) -> int:
        return len(self.data)

    def __contains__(self, key: object) -> bool:
        return key in self.data


class ChangelogTables:
    """Named tables of one worker and their changelog topic (see the module docstring)."""

    def __init__(self, topic: str, names: Iterable[str],
                 restore_entry: Callable[[str, Any], Any] = lambda table, value: value, *,
                 cold: Iterable[str] = (), live_entries: int = 50_000) -> None:
        """``cold``: the tables whose entries changed longest ago are held as their changelog bytes
        beyond ``live_entries`` entries of them all (see the module docstring)."""
        self.topic = topic
        self.names = tuple(names)
        #: Turns an entry read back from the changelog (JSON) into what the stage keeps in memory.
        self.restore_entry = restore_entry
        self.data: dict[str, dict[str, Any]] = {name: {} for name in self.names}
        self.dirty: dict[tuple[str, str], int] = {}
        #: The next source offset per partition, as of the state held.
        self.offsets: dict[int, int] = {}
        self._views: dict[int, dict[str, TrackedTable]] = {}
        self.cold = frozenset(cold)
        unknown = self.cold - set(self.names)
        if unknown:
            raise ValueError(f"cold tables {sorted(unknown)} are not among {self.names}")
        self.live_entries = live_entries
        #: The live (object) entries of the cold tables, the one changed or read longest ago first.
        self._live: dict[tuple[str, str], None] = {}
        #: Entries frozen and thawed so far (tests, benchmarks).
        self.frozen = self.thawed = 0

    def views(self, partition: int) -> dict[str, TrackedTable]:
        """The tables, by name, as written by the events of ``partition``."""
        found = self._views.get(partition)
        if found is None:
            found = self._views[partition] = {
                name: TrackedTable(name, self.data[name], partition, self.dirty, self) for name in self.names}
        return found

    def restored(self, name: str, value: bytes) -> Any:
        """A changelog value of table ``name`` as the stage keeps it in memory."""
        return self.restore_entry(name, _decode(value))

    def thaw(self, name: str, key: str, frozen: bytes) -> Any:
        """A frozen entry as an object again, held live until it is the coldest once more."""
        value = self.data[name][key] = self.restored(name, frozen)
        self._live[(name, key)] = None
        self.thawed += 1
        return value

    def drain(self, offsets: dict[int, int]) -> list[ChangelogRecord]:
        """The changelog records of the keys changed since the last drain, and of the next source
        ``offsets`` of the batch they belong to."""
        records = []
        cold, live = self.cold, self._live
        for (name, key), partition in self.dirty.items():
            data = self.data[name]
            value = data.get(key)
            if value is not None and value.__class__ is not bytes:  # (bytes: a frozen entry is its encoding)
                value = _encode(value)
            records.append((partition, f"{name}{_SEP}{key}".encode(), value))
            if name in cold:
                live.pop((name, key), None)  # (changed: now the most recently used, at the end)
                if value is not None:
                    live[(name, key)] = None
        self.dirty.clear()
        if len(live) > self.live_entries:
            self._freeze(len(live) - self.live_entries)
        for partition, offset in offsets.items():
            self.offsets[partition] = offset
            records.append((partition, f"{_OFFSET}{_SEP}{partition}".encode(), str(offset).encode()))
        return records

    def _freeze(self, count: int) -> None:
        """The ``count`` entries changed or read longest ago, replaced by their changelog bytes.
        (An entry dropped since was dropped from ``_live`` by the drain that wrote its tombstone.)"""
        live = self._live
        coldest = list(itertools.islice(live, count))
        for name, key in coldest:
            del live[(name, key)]
            data = self.data[name]
            value = data.get(key)
            if value is not None and value.__class__ is not bytes:
                data[key] = _encode(value)
        self.frozen += len(coldest)

    def clear(self) -> None:
        """Drops all state. The consumer rebalances eagerly: a rebalance revokes every partition, and
        the new assignment is restored whole, so no key needs to know its partition."""
        for data in self.data.values():
            data.clear()
        self.dirty.clear()
        self.offsets.clear()
        self._live.clear()

    def load(self, records: Iterable[ChangelogRecord]) -> int:
        """Replaces the state with the changelog ``records`` (in log order); returns how many
        table records were read."""
        self.clear()
        read = 0
        for partition, raw_key, value in records:
            name, _, key = raw_key.decode().partition(_SEP)
            if name == _OFFSET:
                self.offsets[partition] = int(value or b"0")
                continue
            data = self.data.get(name)
            if data is None:
                continue  # a table this version does not keep
            if value is None:
                data.pop(key, None)
            else:
                try:
                    entry = self.restored(name, value)
                    # A cold table's entry is kept as it was read, frozen, until first used: restoring a
                    # worker's whole state as objects would take the memory freezing saves (it is
                    # restored here all the same, so an entry this version cannot read is left out now).
                    data[key] = value if name in self.cold else entry
                except (ValueError, KeyError, TypeError, ArithmeticError) as exc:
                    # An entry this version cannot read (written by another one) is left out, not
                    # let to fail every event of its partition; the stage rebuilds it as events come.
                    log.warning("left out changelog entry %s|%s: %s", name, key, exc)
                    data.pop(key, None)
                    continue
            read += 1
        return read


#: The changelog's JSON encoder: decimals as their exact text (``str``), times in RFC 3339 (UTC as
#: ``Z``), both read back by the stages' ``restore_entry`` (``Decimal``, ``datetime.fromisoformat``).
#: msgspec's encoder, in C: the standard library's with a Python ``default`` for each decimal and time
#: cost 4-9 µs an entry against 0.4-0.7, a tenth of the quota stage with a few entries per event.
#: Any other type than JSON's, decimals, times and bytes raises ``TypeError`` (bytes are written as
#: base64: never an entry's value; a frozen entry is drained as the bytes it is).
_encode = msgspec.json.Encoder(decimal_format="string").encode
#: The changelog's JSON decoder (plain JSON values; ``restore_entry`` converts them).
_decode = msgspec.json.Decoder().decode
