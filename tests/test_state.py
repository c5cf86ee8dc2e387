"""The quota tables' changelog records: each changed key once per batch, in its event's partition."""

from __future__ import annotations

import json

from streams.state import ChangelogTables


def test_a_batch_drains_each_changed_key_once_with_tombstones_and_the_next_offsets():
    state = ChangelogTables("cl")
    windows, tenants = state.table("quota_windows"), state.table("quota_tenants")
    state.partition = 2
    windows["w1"] = {"usage": "1"}
    windows["w1"] = {"usage": "3"}          # written twice in the batch: one record, the last value
    tenants["acme"] = {"watermark": "t"}
    state.partition = 0
    windows["w2"] = {"usage": "5"}
    del windows["w2"]                        # created and deleted: a tombstone
    records = state.drain({2: 41, 0: 7})
    assert records == [
        (2, b"quota_windows|w1", json.dumps({"usage": "3"}, separators=(",", ":")).encode()),
        (2, b"quota_tenants|acme", b'{"watermark":"t"}'),
        (0, b"quota_windows|w2", None),
        (2, b"_offset|2", b"41"),
        (0, b"_offset|0", b"7"),
    ]
    assert state.offsets == {2: 41, 0: 7}
    assert state.drain({}) == []             # nothing changed since
    assert dict(windows) == {"w1": {"usage": "3"}}


def test_clear_drops_tables_pending_changes_and_positions():
    state = ChangelogTables("cl")
    state.partition = 1
    state.table("quota_seen")["acme\x1fe-1"] = {"p": 1, "o": 0, "t": 1.0}
    state.drain({1: 1})
    state.table("quota_seen")["acme\x1fe-2"] = {"p": 1, "o": 1, "t": 2.0}
    state.clear()
    assert (len(state.table("quota_seen")), state.dirty, state.offsets) == (0, {}, {})
    assert state.drain({}) == []
