"""The reservations' journal: the local file (durable across a process's death) and the merge of
the file with the compacted topic at restore."""

from __future__ import annotations

import json
import uuid

import pytest

from streams.enforcement.journal import FileJournal, ReservationJournal
from streams.messaging.topics import ensure_topics
from streams.settings import Settings


def hold(tenant: str = "acme", n: int = 1) -> dict:
    return {"reservation_id": f"r{n}", "tenant_id": tenant, "idempotency_key": f"k{n}", "expires_at": "x",
            "amounts": [], "answer": {"granted": True}}


def test_the_file_keeps_what_is_live_and_what_is_gone_and_skips_a_torn_last_line(tmp_path):
    path = tmp_path / "reservations.jsonl"
    journal = FileJournal(path)
    for n in range(1, 5):
        journal(f"r{n}", hold(n=n))
    journal("r2", None)
    journal("r4", None)
    journal("r4", hold(n=4))        # (an id may come back: the last line wins)
    journal.close()
    with path.open("ab") as out:
        out.write(b'["r5", {"reservation_id": "r5", "ten')   # a write cut short
    live, gone = FileJournal(path).load()
    assert sorted(live) == ["r1", "r3", "r4"] and gone == {"r2"}
    # Loading rewrote the file with the live holds alone, one line each.
    assert [json.loads(line)[0] for line in path.read_text().splitlines()] == ["r1", "r3", "r4"]


def test_the_file_is_rewritten_once_it_holds_four_times_its_live_holds(tmp_path, monkeypatch):
    monkeypatch.setattr(FileJournal, "COMPACT_AFTER", 40)
    path = tmp_path / "reservations.jsonl"
    journal = FileJournal(path)
    for n in range(100):          # each hold granted, then gone; every tenth kept
        journal(f"r{n}", hold(n=n))
        if n % 10:
            journal(f"r{n}", None)
    journal.close()
    lines = path.read_text().splitlines()
    assert len(lines) < 40                                   # rewritten on the way, not 190 lines
    assert sorted(FileJournal(path).load()[0]) == sorted(f"r{n}" for n in range(0, 100, 10))


@pytest.mark.integration
def test_restore_takes_the_topics_records_and_the_files_changes_over_them(kafka_servers, tmp_path):
    from confluent_kafka import Consumer

    from streams.messaging.topics import admin, pipeline_topics

    settings = Settings.from_env({"KAFKA_BOOTSTRAP_SERVERS": kafka_servers, "COSTLINE_HOME": str(tmp_path),
                                  "COSTLINE_TOPIC_PREFIX": f"journal-{uuid.uuid4().hex[:8]}."})
    ensure_topics(settings)
    try:
        first = ReservationJournal(settings)
        for n in (1, 2, 3):
            first(f"r{n}", hold(n=n))
        first("r2", None)
        first.close()                                 # (flushes the topic's copy)
        # The file alone knows the last changes: r3 gone and r4 granted (the topic never had them,
        # as when the machine went before Kafka acknowledged them).
        first.file("r3", None)
        first.file("r4", hold(n=4))
        first.file.close()
        consumer = Consumer({"bootstrap.servers": kafka_servers, "group.id": f"restore-{uuid.uuid4().hex}"})
        second = ReservationJournal(settings)
        restored = second.restore(consumer)
        assert sorted(r["reservation_id"] for r in restored) == ["r1", "r4"]
        second.close()
        # Another machine (no file): the topic's copy alone, which lags behind the file.
        other = ReservationJournal(Settings.from_env({"KAFKA_BOOTSTRAP_SERVERS": kafka_servers,
                                                      "COSTLINE_HOME": str(tmp_path / "elsewhere"),
                                                      "COSTLINE_TOPIC_PREFIX": settings.topic_prefix}))
        assert sorted(r["reservation_id"] for r in other.restore(consumer)) == ["r1", "r3"]
        other.close()
        consumer.close()
    finally:
        admin(settings).delete_topics(list(pipeline_topics(settings)))


def test_holds_whose_lease_ended_leave_the_file_in_one_write(tmp_path, monkeypatch):
    journal = FileJournal(tmp_path / "reservations.jsonl")
    for n in range(1, 4):
        journal(f"r{n}", hold(n=n))
    writes = []
    real_write = __import__("os").write
    monkeypatch.setattr("streams.enforcement.journal.os.write", lambda fd, data: writes.append(data) or
                        real_write(fd, data))
    journal.write([("r1", None), ("r3", None)])
    assert len(writes) == 1 and writes[0].count(b"\n") == 2
    journal.close()
    assert sorted(FileJournal(tmp_path / "reservations.jsonl").load()[0]) == ["r2"]
