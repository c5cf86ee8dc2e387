"""Topics of an isolated pipeline: created by ensure_topics, deleted again by remove_isolated_topics."""

import pytest
from confluent_kafka.admin import AlterConfigOpType, ConfigEntry, ConfigResource, ResourceType

from streams.messaging.topics import (
    MAX_LEDGER_RECORD_BYTES,
    admin,
    ensure_topics,
    pipeline_topics,
)
from streams.operations.processes import isolated_env, remove_isolated_topics, wait_for
from streams.settings import Settings
from streams.stages.validation import MAX_RECORD_BYTES


def test_an_isolated_pipelines_topics_are_created_and_deleted(kafka_servers, tmp_path):
    settings = Settings.from_env(isolated_env(tmp_path / "home", kafka_servers, tmp_path / "config"))
    names = set(pipeline_topics(settings))
    assert len(names) == 8 and all(n.startswith(settings.topic_prefix) for n in names)
    assert set(ensure_topics(settings)) == names
    # usage.ledger and usage.dlq take the largest ledger block (tests/storage/test_native.py).
    client = admin(settings)  # (held: a client collected while its future waits destroys it)

    def max_bytes(topic: str) -> int:
        resource = ConfigResource(ResourceType.TOPIC, topic)
        return int(client.describe_configs([resource])[resource].result(timeout=10)["max.message.bytes"].value)

    t = settings.topics
    assert [max_bytes(t.ledger), max_bytes(t.dlq), max_bytes(t.raw)] == [MAX_LEDGER_RECORD_BYTES] * 2 + [
        MAX_RECORD_BYTES]
    def set_max_bytes(topic: str, value: int) -> None:
        resource = ConfigResource(ResourceType.TOPIC, topic, incremental_configs=[ConfigEntry(
            "max.message.bytes", str(value), incremental_operation=AlterConfigOpType.SET)])
        client.incremental_alter_configs([resource])[resource].result(timeout=10)
        wait_for(lambda: max_bytes(topic) == value, 30, f"the broker to apply {topic}'s limit")

    # A topic made before (here: the dead-letter topic at the raw topic's limit) is given the limit;
    # a higher limit an operator set is kept.
    set_max_bytes(t.dlq, MAX_RECORD_BYTES)
    set_max_bytes(t.ledger, 2 * MAX_LEDGER_RECORD_BYTES)
    assert ensure_topics(settings) == []
    wait_for(lambda: max_bytes(t.dlq) == MAX_LEDGER_RECORD_BYTES, 30, "ensure_topics to raise the limit")
    assert max_bytes(t.ledger) == 2 * MAX_LEDGER_RECORD_BYTES
    remove_isolated_topics(settings)
    wait_for(lambda: names.isdisjoint(admin(settings).list_topics(timeout=10).topics), 30,
             "the broker's metadata to drop the deleted topics")


def test_topics_of_a_pipeline_not_made_by_isolated_env_are_never_deleted(tmp_path):
    settings = Settings.from_env({"COSTLINE_HOME": str(tmp_path), "COSTLINE_TOPIC_PREFIX": "staging."})
    with pytest.raises(ValueError, match="not an isolated pipeline"):
        remove_isolated_topics(settings)
