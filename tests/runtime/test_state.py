"""The changelogged tables: each changed key once per batch, in the partition of the event that
changed it; and the state read back from those records."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
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


def test_cold_groups_beyond_the_budget_are_held_as_bytes_and_read_back_whole_and_equal():
    """Entries grouped by tenant (``t0/w`` and ``t0`` are tenant t0's), with room for three live ones."""
    state = ChangelogTables("cl", NAMES, restore_entry, cold=("quota_windows", "quota_tenants"), live_entries=3,
                            group_of=lambda table, key: key.split("/")[0])
    view = state.views(0)
    windows, tenants = view["quota_windows"], view["quota_tenants"]
    at = datetime(2026, 6, 1, 9, tzinfo=UTC)

    def window(n: int) -> dict:
        return {"usage": Decimal(f"0.00000000000{n + 1}"), "partition": 0, "offset": n}

    def tenant(n: int) -> dict:
        return {"watermark": at + timedelta(hours=n), "windows": {f"t{n}/w": "2026-06-02T00:00:00+00:00"},
                "next_expiry": None}

    log = []
    for n in range(3):
        windows[f"t{n}/w"], tenants[f"t{n}"] = window(n), tenant(n)
        view["quota_seen"][f"0:{n}:{n}"] = {"p": 0, "t": n, "events": {}}  # not cold: never frozen
        log += state.drain({0: n + 1})
    # Six entries, room for three: the tenants changed longest ago, t0 then t1, are frozen whole.
    assert (sorted(state.data["quota_windows"]), sorted(state.data["quota_tenants"])) == (["t2/w"], ["t2"])
    assert (state.frozen_groups, state.frozen) == (2, 4) and len(state.data["quota_seen"]) == 3
    # A frozen tenant is the changelog's JSON of its entries, compressed.
    written = {key.decode(): json.loads(value) for _, key, value in log if key.startswith(b"quota_")}
    assert json.loads(state._unpack(state._frozen["t0"])) == {
        "quota_windows": {"t0/w": written["quota_windows|t0/w"]}, "quota_tenants": {"t0": written["quota_tenants|t0"]}}
    # Reading one entry thaws its tenant whole, as the objects they were.
    assert windows["t0/w"] == window(0) and state.data["quota_tenants"]["t0"] == tenant(0)
    assert (state.thawed, state.frozen_groups) == (2, 1)
    # Writing one without reading it thaws the tenant first: its other entry is kept, not lost.
    tenants["t1"] = {**tenant(1), "next_expiry": at}
    assert state.data["quota_windows"]["t1/w"] == window(1) and state.thawed == 4
    log += state.drain({0: 4})
    # Used since t2 was changed, t0 and t1 are live; t2 and then t0 go cold: t1 was used last.
    assert sorted(state.data["quota_tenants"]) == ["t1"] and state.frozen_groups == 2
    assert "t2/w" in windows and windows.pop("t0/w") == window(0) and windows.pop("nobody/w", None) is None
    log += state.drain({0: 5})
    assert log[-2] == (0, b"quota_windows|t0/w", None)
    # A restore keeps the cold tables' entries frozen by tenant, and checks each one all the same.
    restored = ChangelogTables("cl", NAMES, restore_entry, cold=("quota_windows", "quota_tenants"),
                               group_of=lambda table, key: key.split("/")[0])
    assert restored.load([*log, (0, b"quota_windows|t3/w", b'{"usage":"not a number"}')]) == len(log) - 5
    assert (restored.data["quota_windows"], restored.data["quota_tenants"], restored.frozen_groups) == ({}, {}, 3)
    view = restored.views(0)
    assert view["quota_windows"].get("t3/w") is None and view["quota_windows"]["t2/w"] == window(2)
    assert view["quota_tenants"]["t1"]["next_expiry"] == at and "t0/w" not in view["quota_windows"]
    # Iterating a cold table (tools and tests, not the stream) thaws every tenant.
    assert sorted(view["quota_tenants"]) == ["t0", "t1", "t2"] and restored.frozen_groups == 0


def test_only_tables_it_has_can_be_cold():
    with pytest.raises(ValueError, match="cold tables \\['quota_windos'\\]"):
        ChangelogTables("cl", NAMES, cold=("quota_windos",))
