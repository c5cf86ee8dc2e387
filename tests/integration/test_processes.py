"""``costline worker --processes 2``: two stream workers and a sink on one host share the stream;
one killed (-9) is started again, and every event lands once."""

from __future__ import annotations

import os
import signal
from datetime import UTC, datetime, timedelta

from schemas.dead_letter import HEADER_MESSAGE, HEADER_REASON, HEADER_TOPIC
from schemas.usage import TokenUsage, UsageEvent
from streams.httpjson import get_json
from streams.messaging.producer import UsageProducer
from streams.operations.processes import WorkerProcess, descendants, wait_for
from streams.storage.query import query
from tests.integration.conftest import costline, read_topic


def send(producer: UsageProducer, first: int, count: int) -> None:
    at = datetime.now(UTC) - timedelta(minutes=5)
    for i in range(first, first + count):
        producer.send(UsageEvent(event_id=f"multi-{i}", timestamp=at, tenant_id=f"tenant-{i % 40}",
                                 provider="openai", model="gpt-4o-mini",
                                 usage=TokenUsage(input_tokens=1_000 + i % 7, output_tokens=100)))
    producer.flush()


def test_two_stream_workers_and_a_sink_share_the_stream_and_survive_a_kill_9(worker, kafka_servers):
    supervisor = WorkerProcess(worker.env, worker.log_path.parent / "supervisor.log", processes=2)
    port = supervisor.settings.web_port
    try:
        supervisor.start()
        streams = [f"http://127.0.0.1:{port + i}/v1/health" for i in (1, 2)]
        wait_for(lambda: all((get_json(url) or {}).get("status") == "ok" for url in streams), 90,
                 "both stream workers to be ready")
        assert len(descendants(supervisor.process.pid)) >= 3   # the sink and two stream workers

        def landed() -> int:
            return int(query(supervisor.settings, "SELECT count() FROM usage WHERE startsWith(event_id, 'multi-')")
                       .rows[0][0])

        with UsageProducer(kafka_servers, supervisor.settings.topics.raw) as producer:
            send(producer, 0, 3000)
            wait_for(lambda: landed() == 3000, 120, "the first 3,000 events to land")
            # Both stream workers had partitions and counted events.
            assert all(get_json(url)["events_in"] > 0 for url in streams)
            # kill -9 the first stream worker: the supervisor starts it again, and it rejoins.
            victim = next(pid for pid in descendants(supervisor.process.pid)
                          if f"COSTLINE_WEB_PORT={port + 1}\0".encode() in open(f"/proc/{pid}/environ", "rb").read())
            os.kill(victim, signal.SIGKILL)
            send(producer, 3000, 2000)
            wait_for(lambda: landed() == 5000, 180, "all 5,000 events to land")
            wait_for(lambda: (get_json(streams[0]) or {}).get("status") == "ok", 90, "the killed worker back")
            assert "stream-1 exited (status -9); starting it again" in supervisor.log_tail(1_000_000)
        rows = query(supervisor.settings, "SELECT count(), uniqExact(event_id), sum(input_tokens) FROM usage "
                                          "WHERE startsWith(event_id, 'multi-')").rows[0]
        assert [int(v) for v in rows] == [5000, 5000, sum(1_000 + i % 7 for i in range(5000))]

        # A damaged ledger block is dead-lettered with its reason; the sink goes on. Replayed, it
        # goes back to usage.ledger (not usage.raw), and is refused there again.
        t = supervisor.settings.topics
        with UsageProducer(kafka_servers, t.ledger) as producer:
            producer.send_raw(b"\x01\x02 not a block")
        [dead] = read_topic(kafka_servers, t.dlq, 1, 60)
        headers = dict(dead.headers())
        assert (headers[HEADER_REASON], headers[HEADER_TOPIC]) == (b"invalid_block", t.ledger.encode())
        assert headers[HEADER_MESSAGE].startswith(b"not a ledger block: a block of 1 columns")
        assert costline(supervisor, "replay", "--from-dlq", "--reason", "invalid_block") == \
            "read 1 dead letters, re-submitted 1"
        again = read_topic(kafka_servers, t.dlq, 2, 60)
        assert [dict(r.headers())[HEADER_TOPIC] for r in again] == [t.ledger.encode()] * 2
        assert landed() == 5000
        children = descendants(supervisor.process.pid)
    finally:
        supervisor.stop()
    assert children and not [pid for pid in children if os.path.exists(f"/proc/{pid}")]  # stopped with it
