"""The changelogged tables: each changed key once per batch, in the partition of the event that
changed it; and the state read back from those records."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal

import pytest

from streams.runtime.state import ChangelogTables
from streams.stages.quotas import QuotaTables, restore_entry

NAMES = QuotaTables._fields


def test_a_batch_drains_each_changed_key_once_with_tombstones_and_the_next_offsets():
    state = ChangelogTables("cl", NAMES)
    on_2, on_0 = state.views(2), state.views(0)
    on_2["quota_windows"]["w1"] = {"usage": Decimal(1)}
    on_2["quota_windows"]["w1"] = {"usage": Decimal(3)}  # written twice in the batch: one record, the last value
    on_2["quota_tenants"]["acme"] = {"watermark": datetime(2026, 6, 1, tzinfo=UTC)}
    on_0["quota_windows"]["w2"] = {"usage": Decimal(5)}
    del on_0["quota_windows"]["w2"]                      # created and deleted: a tombstone
    assert on_0["quota_windows"].pop("missing", None) is None  # nothing to delete: no record
    records = state.drain({2: 41, 0: 7})
    assert records == [
        (2, b"quota_windows|w1", json.dumps({"usage": "3"}, separators=(",", ":")).encode()),
        (2, b"quota_tenants|acme", b'{"watermark":"2026-06-01T00:00:00Z"}'),  # RFC 3339; +00:00 reads back too
        (0, b"quota_windows|w2", None),
        (2, b"_offset|2", b"41"),
        (0, b"_offset|0", b"7"),
    ]
    assert state.offsets == {2: 41, 0: 7}
    assert state.drain({}) == []                          # nothing changed since
    assert dict(state.views(5)["quota_windows"]) == {"w1": {"usage": Decimal(3)}}  # one table, every view


def test_loading_the_drained_records_gives_back_the_state_with_its_types_and_positions():
    state = ChangelogTables("cl", NAMES, restore_entry)
    view = state.views(1)
    at = datetime(2026, 6, 1, 9, tzinfo=UTC)
    view["quota_windows"]["w"] = {"usage": Decimal("0.000000000001"), "partition": 1, "offset": 4}
    view["quota_tenants"]["acme"] = {"watermark": at, "windows": {"w": "2026-06-02T00:00:00+00:00"},
                                     "next_expiry": None}
    view["quota_seen"]["1:1000:4"] = {"p": 1, "t": 1000, "events": {"acme\x1fe-1": 4}}
    log = state.drain({1: 5})
    view["quota_windows"]["gone"] = {"usage": Decimal(1), "partition": 1, "offset": 5}
    log += state.drain({1: 6})
    del view["quota_windows"]["gone"]
    log += state.drain({1: 7})

    restored = ChangelogTables("cl", NAMES, restore_entry)
    assert restored.load([*log, (1, b"retired_table|x", b"{}")]) == 5  # 3 entries, 1 written then deleted
    assert restored.data == state.data and restored.offsets == {1: 7}
    assert restored.data["quota_windows"]["w"]["usage"] == Decimal("0.000000000001")
    assert restored.data["quota_tenants"]["acme"]["watermark"] == at


def test_clear_drops_tables_pending_changes_and_positions():
    state = ChangelogTables("cl", NAMES)
    state.views(1)["quota_seen"]["1:1:0"] = {"p": 1, "t": 1, "events": {}}
    state.drain({1: 1})
    state.views(1)["quota_seen"]["1:2:1"] = {"p": 1, "t": 2, "events": {}}
    state.clear()
    assert (len(state.views(1)["quota_seen"]), state.dirty, state.offsets) == (0, {}, {})
    assert state.drain({}) == []


def test_an_entry_this_version_cannot_read_is_left_out_instead_of_failing_its_partition():
    state = ChangelogTables("cl", NAMES, restore_entry)
    read = state.load([
        (0, b"quota_seen|acme\x1fe-1", b'{"p": 0, "o": 3, "t": 990.0}'),          # no events: left out
        (0, b"quota_seen|0:995:4", b'{"p": 0, "t": 995, "events": {"acme\\u001fe-2": 4}}'),
        (0, b"quota_tenants|acme", b'{"watermark": "2026-06-01T09:00:00+00:00", "windows": {}}'),
        (0, b"quota_windows|w", b'{"usage": "not a number"}'),                    # left out
    ])
    assert read == 2 and list(state.data["quota_seen"]) == ["0:995:4"] and "w" not in state.data["quota_windows"]
    assert state.data["quota_tenants"]["acme"]["next_expiry"] is None


def test_cold_entries_beyond_the_budget_are_held_as_their_changelog_bytes_and_read_back_equal():
    state = ChangelogTables("cl", NAMES, restore_entry, cold=("quota_windows", "quota_tenants"), live_entries=2)
    view = state.views(0)
    at = datetime(2026, 6, 1, 9, tzinfo=UTC)
    for n in range(4):
        view["quota_windows"][f"w{n}"] = {"usage": Decimal(f"0.00000000000{n + 1}"), "partition": 0, "offset": n}
        view["quota_seen"][f"0:{n}:{n}"] = {"p": 0, "t": n, "events": {}}  # not cold: never frozen
        log = state.drain({0: n + 1})
    # The two changed longest ago are bytes: exactly what the changelog holds for them.
    data = state.data["quota_windows"]
    assert [type(data[f"w{n}"]) for n in range(4)] == [bytes, bytes, dict, dict]
    assert data["w0"] == b'{"usage":"1E-12","partition":0,"offset":0}' and state.frozen == 2
    assert all(type(group) is dict for group in state.data["quota_seen"].values())
    # Read, an entry is the object it was, and live again; the one used longest ago goes cold instead.
    assert view["quota_windows"]["w0"] == {"usage": Decimal("1E-12"), "partition": 0, "offset": 0}
    assert state.thawed == 1 and type(data["w0"]) is dict
    view["quota_tenants"]["acme"] = {"watermark": at, "windows": {}, "next_expiry": None}
    log += state.drain({0: 5})
    # w2 and w3 were changed before w0 was read: they go cold, w0 stays.
    assert [type(data[f"w{n}"]) for n in range(4)] == [dict, bytes, bytes, bytes]
    assert view["quota_windows"].get("w1")["offset"] == 1 and view["quota_windows"].pop("w2")["offset"] == 2
    assert log[-2] == (0, b"quota_tenants|acme", b'{"watermark":"2026-06-01T09:00:00Z","windows":{},"next_expiry":null}')
    # A restore keeps a cold table's entries as they were read, and checks them all the same.
    restored = ChangelogTables("cl", NAMES, restore_entry, cold=("quota_windows",))
    assert restored.load([(0, b"quota_windows|w", b'{"usage":"2","partition":0,"offset":9}'),
                          (0, b"quota_windows|bad", b'{"usage":"not a number"}')]) == 1
    assert restored.data["quota_windows"] == {"w": b'{"usage":"2","partition":0,"offset":9}'}
    assert restored.views(0)["quota_windows"]["w"]["usage"] == Decimal(2)


def test_only_tables_it_has_can_be_cold():
    with pytest.raises(ValueError, match="cold tables \\['quota_windos'\\]"):
        ChangelogTables("cl", NAMES, cold=("quota_windos",))
