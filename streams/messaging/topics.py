"""Creates Costline's topics with the right partition counts and cleanup policies."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, AlterConfigOpType, ConfigEntry, ConfigResource, NewTopic, ResourceType

from streams.errors import CostlineError
from streams.settings import Settings
from streams.stages.validation import MAX_EVENT_BYTES_CEILING, MAX_RECORD_BYTES

T = TypeVar("T")
log = logging.getLogger(__name__)

#: A stream worker's ledger block is finished once it holds this many bytes (``RecordBatch``), so
#: a batch of 5,000 events is a few records of usage.ledger.
LEDGER_BLOCK_BYTES = 1024 * 1024
#: The largest record of usage.ledger, and of usage.dlq, where the sink dead-letters a block. A
#: block may pass ``LEDGER_BLOCK_BYTES`` by one row, and a row its event (up to
#: ``MAX_EVENT_BYTES_CEILING``, the largest COSTLINE_MAX_EVENT_BYTES) by up to six times: its
#: free-form JSON (``extra``, ``raw_usage``) is written with all but printable ASCII escaped, DEL
#: (1 byte, legal unescaped in the event) as the 6 of "\u007f", "é" (2) as 6, and "1e15" (4) is
#: written as "1000000000000000.0". Lowered below that, a block could be refused by the broker and
#: its batch's transaction aborted again and again (``tests/storage/test_native.py`` writes the
#: largest row). 26 MiB.
MAX_LEDGER_RECORD_BYTES = LEDGER_BLOCK_BYTES + 6 * MAX_EVENT_BYTES_CEILING + 1024 * 1024


class KafkaUnavailable(CostlineError):
    """The Kafka cluster did not answer; the message says how to fix it."""


def admin(settings: Settings) -> AdminClient:
    return AdminClient({"bootstrap.servers": settings.kafka_bootstrap_servers, "log_level": 0,
                        "logger": SilentLogger()})


def check_reachable(settings: Settings, timeout_s: float = 5.0) -> None:
    try:
        admin(settings).list_topics(timeout=timeout_s)
    except KafkaException:
        raise KafkaUnavailable(
            f"no Kafka broker answered at {settings.kafka_bootstrap_servers} within {timeout_s:.0f}s: "
            "start one with `scripts/kafka start` or set KAFKA_BOOTSTRAP_SERVERS"
        ) from None


def pipeline_topics(settings: Settings) -> dict[str, dict[str, str]]:
    """The topics a pipeline of these settings uses, with the configuration each is created with."""
    t = settings.topics
    # usage.raw and usage.dlq take records far above the 1 MiB event limit, so that an oversized
    # event reaches the worker and lands in the dead-letter topic instead of bouncing at the producer.
    big = {"max.message.bytes": str(MAX_RECORD_BYTES), **EVENT_TIMES}
    return {
        t.raw: big,
        t.attributed: EVENT_TIMES,
        t.ledger: {"max.message.bytes": str(MAX_LEDGER_RECORD_BYTES)},
        t.dlq: {"retention.ms": str(30 * 24 * 3600 * 1000), **big, "max.message.bytes": str(MAX_LEDGER_RECORD_BYTES)},
        t.alerts: {},
        t.state: {"cleanup.policy": "compact"},
        # Compacted (a hold's latest record), and deleted a while after the longest lease (3,600 s)
        # could have ended: an ended hold is never restored, so its expiry needs no tombstone here.
        t.reservations: {"cleanup.policy": "compact,delete", "retention.ms": str(2 * 3600 * 1000)},
        changelog_topic(settings): {"cleanup.policy": "compact"},
        # The OpenTelemetry Collector's spans (``COSTLINE_OTLP_TOPIC``): created if the Collector
        # has not written to it yet, with the broker's defaults; an existing one is left as it is.
        # And where the OTLP input keeps its positions in that topic (``streams.runtime.spans``).
        # (Compacted soon: a position a turn and partition, read whole at every assignment.)
        **({settings.otlp_topic: {}, otlp_positions_topic(settings): {
            "cleanup.policy": "compact", "segment.ms": str(600_000), "min.cleanable.dirty.ratio": "0.1"}}
           if settings.otlp_topic else {}),
    }


#: The topics whose record timestamps are event times take any of them. A broker refuses a record
#: timestamped more than ``message.timestamp.after.max.ms`` ahead (one hour by default in Kafka 4),
#: and fails the records batched with it too: an event a day ahead must reach the worker, which
#: dead-letters it with its reason, and must not take valid events down with it.
EVENT_TIMES = {"message.timestamp.after.max.ms": str(2**63 - 1)}


def ensure_topics(settings: Settings, timeout_s: float = 15.0) -> list[str]:
    """Creates missing topics; returns the names created. Existing topics keep their configuration,
    but for the limits of ``ENFORCED``, which are raised to what this version needs.
    Returns once every partition of the pipeline's topics has a leader: a topic created a moment
    ago answers NOT_LEADER_FOR_PARTITION until then, and the worker would start on those errors."""
    check_reachable(settings)
    client = admin(settings)
    wanted = pipeline_topics(settings)
    existing = set(client.list_topics(timeout=timeout_s).topics)
    missing = [
        NewTopic(name, num_partitions=settings.partitions, replication_factor=-1, config=config)
        for name, config in wanted.items()
        if name not in existing
    ]
    created: list[str] = []
    _enforce(client, {name: config for name, config in wanted.items() if name in existing}, timeout_s)
    if not missing:
        _wait_for_leaders(client, list(wanted), timeout_s)
        return created
    for name, future in client.create_topics(missing, operation_timeout=timeout_s).items():
        try:
            future.result(timeout=timeout_s)
            created.append(name)
        except KafkaException as exc:
            if exc.args[0].name() != "TOPIC_ALREADY_EXISTS":
                raise KafkaUnavailable(f"could not create topic {name}: {exc.args[0].str()}") from None
    _wait_for_leaders(client, list(wanted), timeout_s)
    return created


#: The settings ``ensure_topics`` gives topics that exist already (created by an earlier version,
#: or by hand): without them, events over an hour ahead, and the largest ledger blocks and their
#: dead letters, would be refused. A limit is only ever raised (an operator's higher one is kept);
#: the rest of a topic's configuration is the operator's.
ENFORCED = ("message.timestamp.after.max.ms", "max.message.bytes")


def _enforce(client: AdminClient, existing: dict[str, dict[str, str]], timeout_s: float) -> None:
    """Raises each existing topic's ``ENFORCED`` settings to its wanted configuration's, one setting
    at a time (an alter is all or nothing per topic: a broker that does not know one setting would
    otherwise keep the other from being set). A failure is logged and the start goes on: the
    topic then refuses what it refused before."""
    wanted = {name: config for name, config in existing.items() if any(key in config for key in ENFORCED)}
    if not wanted:
        return
    try:
        described = {resource.name: future.result(timeout=timeout_s) for resource, future in
                     client.describe_configs([ConfigResource(ResourceType.TOPIC, name) for name in wanted]).items()}
    except (KafkaException, TimeoutError) as exc:
        log.warning("could not read the configuration of %s: %s", ", ".join(wanted), exc)
        return
    for key in ENFORCED:
        low = [name for name, config in wanted.items() if key in config and name in described
               and (key not in described[name] or int(described[name][key].value) < int(config[key]))]
        if not low:
            continue
        resources = [ConfigResource(ResourceType.TOPIC, name, incremental_configs=[
            ConfigEntry(key, wanted[name][key], incremental_operation=AlterConfigOpType.SET)]) for name in low]
        for resource, future in client.incremental_alter_configs(resources).items():
            try:
                future.result(timeout=timeout_s)
            except (KafkaException, TimeoutError) as exc:  # no permission, say
                log.warning("could not set %s=%s on %s: %s", key, wanted[resource.name][key], resource.name, exc)


def _wait_for_leaders(client: AdminClient, topics: list[str], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        metadata = client.list_topics(timeout=timeout_s).topics
        leaderless = [name for name in topics if name not in metadata or metadata[name].error is not None
                      or any(p.leader < 0 or p.error is not None for p in metadata[name].partitions.values())]
        if not leaderless:
            return
        if time.monotonic() > deadline:
            raise KafkaUnavailable(f"topics {', '.join(leaderless)} have no partition leader after {timeout_s:.0f}s: "
                                   "check the broker's log")
        time.sleep(0.2)


#: What a (re)starting broker answers until it has loaded its group coordinator and elected its
#: partition leaders; librdkafka does not always mark these retriable.
_STARTING = {KafkaError.NOT_COORDINATOR, KafkaError.COORDINATOR_LOAD_IN_PROGRESS, KafkaError.COORDINATOR_NOT_AVAILABLE,
             KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError.LEADER_NOT_AVAILABLE, KafkaError._TIMED_OUT,
             KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN,
             # The client's metadata lacks the partition while the restarted broker has not yet
             # served it (seen: a worker rewinding after an aborted transaction exited on it).
             KafkaError._UNKNOWN_PARTITION}

#: Consumer setting for every reader of a backlog. When a partition's local queue is full
#: (``queued.max.messages.kbytes`` or ``queued.min.messages``), librdkafka postpones that partition's next fetch by
#: ``fetch.queue.backoff.ms``, 1,000 ms by default (librdkafka >= 2.4). The worker drains its queue
#: in about half a second, so with the default it then waited in ``poll`` for the rest: 35% of the
#: loop thread's time on a backlog, 9% at 10 ms (docs/performance.md). Back at the default the
#: loop starves on every full queue.
REFETCH_PROMPTLY = {"fetch.queue.backoff.ms": 10}

#: Consumer settings for topics the worker writes in transactions: read only what was committed,
#: and learn the end of a partition from the consumer (its last offsets can be transaction markers,
#: which are never delivered). Their readers read backlogs (restores, replay, the enforcer's start):
#: ``REFETCH_PROMPTLY`` too.
READ_TRANSACTIONAL = {"isolation.level": "read_committed", "enable.partition.eof": True, **REFETCH_PROMPTLY}


def retrying(call: Callable[[], T], timeout_s: float = 60.0) -> T:
    """Retries ``call`` for up to ``timeout_s`` while Kafka answers with a retriable error, as a
    broker does while it starts (or restarts) and loads its coordinator and partition leaders."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return call()
        except KafkaException as exc:
            if not is_transient(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def is_transient(exc: KafkaException) -> bool:
    """Whether the cluster may answer if asked again (a broker starting, moving a leader or away)."""
    error = exc.args[0]
    return isinstance(error, KafkaError) and (error.retriable() or error.code() in _STARTING)


def changelog_topic(settings: Settings) -> str:
    """The compacted topic of the worker's quota tables and positions, partitioned like usage.raw."""
    return f"{settings.deployment}-quota-changelog"


def otlp_positions_topic(settings: Settings) -> str:
    """The compacted topic of the OTLP input's next offset in each partition of the spans topic."""
    return f"{settings.deployment}-otlp-positions"


class SilentLogger:
    """librdkafka logs connection refusals itself; errors are raised to callers instead."""

    def log(self, *args: object, **kwargs: object) -> None:
        pass
