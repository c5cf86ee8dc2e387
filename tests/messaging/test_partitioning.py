"""Our partitioner against a real broker's placement of keyed records."""

from __future__ import annotations

import uuid

import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import NewTopic

from streams.messaging.partitioning import murmur2, partition_of
from streams.messaging.topics import admin
from streams.settings import Settings


def test_known_values_of_kafkas_murmur2():
    # Values from the Java client's own tests of Utils.murmur2 (as signed ints there).
    assert murmur2(b"21") & 0xFFFFFFFF == (-973932308) & 0xFFFFFFFF
    assert murmur2(b"foobar") & 0xFFFFFFFF == (-790332482) & 0xFFFFFFFF
    assert murmur2(b"a-little-bit-long-string") & 0xFFFFFFFF == (-985981536) & 0xFFFFFFFF
    assert murmur2(b"a-little-bit-longer-string") & 0xFFFFFFFF == (-1486304829) & 0xFFFFFFFF
    assert murmur2(b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8") & 0xFFFFFFFF == (-58897971) & 0xFFFFFFFF
    assert murmur2(b"abc") & 0xFFFFFFFF == 479470107


@pytest.mark.integration
def test_keys_land_where_the_producer_puts_them(kafka_servers):
    """1,000 tenant keys (every length mod 4, non-ASCII too) sent by a murmur2 producer to a 7-partition topic."""
    topic = f"partitioning-{uuid.uuid4().hex[:8]}"
    client = admin(Settings.from_env({"KAFKA_BOOTSTRAP_SERVERS": kafka_servers}))
    client.create_topics([NewTopic(topic, num_partitions=7, replication_factor=1)])[topic].result(30)
    try:
        producer = Producer({"bootstrap.servers": kafka_servers, "partitioner": "murmur2_random"})
        placed: dict[bytes, int] = {}

        def report(error, message) -> None:
            assert error is None, error
            placed[message.key()] = message.partition()

        for i in range(1000):
            producer.produce(topic, key=(f"tenant-{i}" + "é" * (i % 5)).encode(), value=b"x", on_delivery=report)
        assert producer.flush(30) == 0
        assert len(placed) == 1000 and len(set(placed.values())) == 7
        assert {key: partition_of(key, 7) for key in placed} == placed
    finally:
        client.delete_topics([topic])
