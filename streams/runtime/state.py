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

Cold tenants are kept as bytes. A worker with many tenants holds a few entries per tenant in the
tables named ``cold`` (the per-tenant ones; not the dedup groups, which the quota stage indexes by
identity): a window per limit, keyed by ``[tenant, limit, scope, start]``, the tenant's watermark
and open windows, its billing periods; each a dict of ``Decimal`` and ``datetime`` objects, most of
them untouched for minutes. Their entries are grouped by ``group_of(table, key)`` (the tenant), and
at most ``live_entries`` entries are kept as objects: at each drain, beyond that number, the groups
changed or read back longest ago are each replaced by one bytes object: their entries as the
changelog writes them, in one JSON document, lz4-compressed (the keys and values of a tenant repeat
its name, its limits and its window starts). With 100,000 tenants that is about 0.37 KB a frozen
tenant, its index included, against 3.7 KB held entry by entry (``docs/performance.md``). A key missing from the live entries
is looked for in its group: reading or writing any entry of a frozen group thaws the whole group,
each entry through ``restore_entry``, the path every entry takes after a restart, so an entry
thawed equals the entry frozen (``tests/runtime/test_paths.py`` runs the stream with a budget of a
few entries and compares it with the reference path). What breaks if an entry is frozen while a
stage holds it between batches: the stage would change an object the table no longer holds.
Freezing happens only in ``drain``, after the batch, and no stage keeps an entry of these tables
past its batch. What breaks if a write did not thaw its group first: the group, thawed later,
would put the older value back.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, MutableMapping
from typing import Any

import lz4.block
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
        self._tables = tables

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)

    def __setitem__(self, key: str, value: Any) -> None:
        self.data[key] = value
        self._dirty[(self.name, key)] = self.partition

    def __delitem__(self, key: str) -> None:
        del self.data[key]
        self._dirty[(self.name, key)] = self.partition

    def pop(self, key: str, *default: Any) -> Any:
        if key in self.data:
            self._dirty[(self.name, key)] = self.partition
        return self.data.pop(key, *default)

    def __iter__(self) -> Iterator[str]:
        return iter(self.data)

    def __len__(self) -> int:
        return len(self.data)

    def __contains__(self, key: object) -> bool:
        return key in self.data


class ColdTable(TrackedTable):
    """A cold table's view: a key its live entries lack may be in its group's frozen bytes, which any
    read or write of the key thaws first (see the module docstring). The usual call, on a live entry,
    costs what ``TrackedTable``'s does; ``_frozen`` is empty until the budget is first exceeded."""

    __slots__ = ()

    def __getitem__(self, key: str) -> Any:
        data = self.data
        if key not in data and self._tables._frozen:
            self._tables.thaw_group_of(self.name, key)
        return data[key]

    def get(self, key: str, default: Any = None) -> Any:
        value = self.data.get(key)  # (None is never an entry: the changelog writes it as a tombstone)
        if value is None:
            if self._tables._frozen and self._tables.thaw_group_of(self.name, key):
                value = self.data.get(key)
            if value is None:
                return default
        return value

    def __setitem__(self, key: str, value: Any) -> None:
        if key not in self.data and self._tables._frozen:
            self._tables.thaw_group_of(self.name, key)
        self.data[key] = value
        self._dirty[(self.name, key)] = self.partition

    def __delitem__(self, key: str) -> None:
        if key not in self.data and self._tables._frozen:
            self._tables.thaw_group_of(self.name, key)
        super().__delitem__(key)

    def pop(self, key: str, *default: Any) -> Any:
        if key not in self.data and self._tables._frozen:
            self._tables.thaw_group_of(self.name, key)
        return super().pop(key, *default)

    def __contains__(self, key: object) -> bool:
        data = self.data
        if key in data:
            return True
        return bool(self._tables._frozen) and self._tables.thaw_group_of(self.name, key) and key in data  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[str]:
        self._tables.thaw_all()  # (every tenant as objects: for tests and tools, not the stream)
        return iter(self.data)

    def __len__(self) -> int:
        self._tables.thaw_all()
        return len(self.data)


class ChangelogTables:
    """Named tables of one worker and their changelog topic (see the module docstring)."""

    def __init__(self, topic: str, names: Iterable[str],
                 restore_entry: Callable[[str, Any], Any] = lambda table, value: value, *,
                 cold: Iterable[str] = (), live_entries: int = 50_000,
                 group_of: Callable[[str, str], str] = lambda table, key: key) -> None:
        """``cold``: the tables whose entries, grouped by ``group_of(table, key)``, are held as bytes
        beyond ``live_entries`` entries of them all, the groups used longest ago first (see the module
        docstring)."""
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
        self.group_of = group_of
        #: Group → the (table, key) of its live entries in the cold tables, the group changed or read
        #: longest ago first. A group is either here or in ``_frozen``, never both. (A list, not a set:
        #: a tenant has about six entries, which a set holds in 32 slots, 0.7 KB a tenant, and a list
        #: in 0.1; a membership test over six is as fast.)
        self._live: dict[str, list[tuple[str, str]]] = {}
        self._live_count = 0
        #: Group → its entries as bytes (``_pack``), and the compression dictionary they are packed with.
        self._frozen: dict[str, bytes] = {}
        self._dictionary: bytes | None = None
        #: Entries frozen and thawed so far (tests, benchmarks).
        self.frozen = self.thawed = 0

    def views(self, partition: int) -> dict[str, TrackedTable]:
        """The tables, by name, as written by the events of ``partition``."""
        found = self._views.get(partition)
        if found is None:
            found = self._views[partition] = {
                name: (ColdTable if name in self.cold else TrackedTable)(
                    name, self.data[name], partition, self.dirty, self) for name in self.names}
        return found

    @property
    def frozen_groups(self) -> int:
        return len(self._frozen)

    def thaw_group_of(self, name: str, key: str) -> bool:
        """Thaws the group of ``key`` of cold table ``name`` if it is frozen; whether it was."""
        group = self.group_of(name, key)
        frozen = self._frozen.pop(group, None)
        if frozen is None:
            return False
        self._thaw(group, frozen)
        return True

    def thaw_all(self) -> None:
        for group in list(self._frozen):
            self._thaw(group, self._frozen.pop(group))

    def _thaw(self, group: str, frozen: bytes) -> None:
        members = []
        restore, data = self.restore_entry, self.data
        for name, entries in _decode(self._unpack(frozen)).items():
            table = data[name]
            for key, entry in entries.items():
                table[key] = restore(name, entry)
                members.append((name, key))
        self._live[group] = members  # (the most recently used: last)
        self._live_count += len(members)
        self.thawed += len(members)

    def drain(self, offsets: dict[int, int]) -> list[ChangelogRecord]:
        """The changelog records of the keys changed since the last drain, and of the next source
        ``offsets`` of the batch they belong to."""
        records = []
        cold, live, group_of = self.cold, self._live, self.group_of
        counted = 0
        for (name, key), partition in self.dirty.items():
            value = self.data[name].get(key)
            records.append((partition, f"{name}{_SEP}{key}".encode(), None if value is None else _encode(value)))
            if name in cold:
                group = group_of(name, key)
                members = live.pop(group, None)  # (changed: now the most recently used, at the end)
                if members is None:
                    members = []
                member = (name, key)
                if value is None:
                    if member in members:
                        members.remove(member)
                        counted -= 1
                elif member not in members:
                    members.append(member)
                    counted += 1
                if members:
                    live[group] = members
        self._live_count += counted
        self.dirty.clear()
        if self._live_count > self.live_entries:
            self._freeze()
        for partition, offset in offsets.items():
            self.offsets[partition] = offset
            records.append((partition, f"{_OFFSET}{_SEP}{partition}".encode(), str(offset).encode()))
        return records

    def _freeze(self) -> None:
        """The groups changed or read longest ago, each replaced by one bytes object, until at most
        ``live_entries`` entries are live."""
        live, data, frozen = self._live, self.data, self._frozen
        while self._live_count > self.live_entries and live:
            group = next(iter(live))
            members = live.pop(group)
            entries: dict[str, dict[str, Any]] = {}
            for name, key in members:
                entries.setdefault(name, {})[key] = data[name].pop(key)
            frozen[group] = self._pack(_encode(entries))
            self._live_count -= len(members)
            self.frozen += len(members)

    def _pack(self, document: bytes) -> bytes:
        """A frozen group's JSON, compressed with lz4 against a dictionary: the first group frozen.
        Tenants' documents share their shape, their field and limit names and their window starts:
        with the simulated mix, 1.3 KB of JSON a tenant is 486 bytes on its own and 220 against
        another tenant's document, in 4 µs (2 to read back). The frozen bytes never leave the process,
        so any dictionary does, as long as it never changes while a group is frozen with it."""
        if self._dictionary is None:
            self._dictionary = document
        return lz4.block.compress(document, store_size=True, dict=self._dictionary)

    def _unpack(self, frozen: bytes) -> bytes:
        return lz4.block.decompress(frozen, dict=self._dictionary)

    def clear(self) -> None:
        """Drops all state. The consumer rebalances eagerly: a rebalance revokes every partition, and
        the new assignment is restored whole, so no key needs to know its partition."""
        for data in self.data.values():
            data.clear()
        self.dirty.clear()
        self.offsets.clear()
        self._live.clear()
        self._live_count = 0
        self._frozen.clear()

    def load(self, records: Iterable[ChangelogRecord]) -> int:
        """Replaces the state with the changelog ``records`` (in log order); returns how many
        table records were read."""
        self.clear()
        read = 0
        # A cold table's entries are kept as they were read, grouped and frozen, until first used:
        # restoring a worker's whole state as objects would take the memory freezing saves. Each is
        # restored here all the same, so an entry this version cannot read is left out now.
        staged: dict[str, dict[str, dict[str, bytes]]] = {}
        for partition, raw_key, value in records:
            name, _, key = raw_key.decode().partition(_SEP)
            if name == _OFFSET:
                self.offsets[partition] = int(value or b"0")
                continue
            data = self.data.get(name)
            if data is None:
                continue  # a table this version does not keep
            cold = name in self.cold
            try:
                group = self.group_of(name, key) if cold else ""
                entry = None if value is None else self.restore_entry(name, _decode(value))
            except (ValueError, KeyError, TypeError, ArithmeticError) as exc:
                # An entry this version cannot read (written by another one) is left out, as a
                # tombstone would leave it, not let to fail every event of its partition; the stage
                # rebuilds it as events come.
                log.warning("left out changelog entry %s|%s: %s", name, key, exc)
                group, value, entry = None, None, None
            else:
                read += 1
            if not cold:
                if entry is None:
                    data.pop(key, None)
                else:
                    data[key] = entry
            elif value is None:  # (a group that could not be named has nothing staged)
                staged.get(group, {}).get(name, {}).pop(key, None)
            else:
                staged.setdefault(group, {}).setdefault(name, {})[key] = value
        for group, tables in staged.items():
            entries = {name: {key: msgspec.Raw(value) for key, value in table.items()}
                       for name, table in tables.items() if table}
            if entries:
                self._frozen[group] = self._pack(_encode(entries))
        return read


#: The changelog's JSON encoder: decimals as their exact text (``str``), times in RFC 3339 (UTC as
#: ``Z``), both read back by the stages' ``restore_entry`` (``Decimal``, ``datetime.fromisoformat``).
#: msgspec's encoder, in C: the standard library's with a Python ``default`` for each decimal and time
#: cost 4-9 µs an entry against 0.4-0.7, a tenth of the quota stage with a few entries per event.
#: Any other type than JSON's, decimals, times and bytes raises ``TypeError`` (bytes, written as
#: base64, are never an entry's value).
_encode = msgspec.json.Encoder(decimal_format="string").encode
#: The changelog's JSON decoder (plain JSON values; ``restore_entry`` converts them).
_decode = msgspec.json.Decoder().decode



