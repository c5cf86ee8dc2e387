"""Creates Costline's topics with the right partition counts and cleanup policies."""

from __future__ import annotations

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from streams.quotas import QUOTA_TABLES
from streams.settings import Settings


class KafkaUnavailable(RuntimeError):
    """The Kafka cluster did not answer; the message says how to fix it."""


def admin(settings: Settings) -> AdminClient:
    return AdminClient({"bootstrap.servers": settings.kafka_bootstrap_servers, "log_level": 0,
                        "logger": _SilentLogger()})


def check_reachable(settings: Settings, timeout_s: float = 5.0) -> None:
    try:
        admin(settings).list_topics(timeout=timeout_s)
    except KafkaException:
        raise KafkaUnavailable(
            f"no Kafka broker answered at {settings.kafka_bootstrap_servers} within {timeout_s:.0f}s: "
            "start one with `scripts/kafka start` or set KAFKA_BOOTSTRAP_SERVERS"
        ) from None


def ensure_topics(settings: Settings, timeout_s: float = 15.0) -> list[str]:
    """Creates missing topics; returns the names created. Existing topics are left as they are."""
    check_reachable(settings)
    client = admin(settings)
    t = settings.topics
    wanted: dict[str, dict[str, str]] = {
        t.raw: {},
        t.attributed: {},
        t.dlq: {"retention.ms": str(30 * 24 * 3600 * 1000)},
        t.alerts: {},
        t.state: {"cleanup.policy": "compact"},
    }
    for changelog in table_changelogs(settings):
        wanted[changelog] = {"cleanup.policy": "compact"}
    existing = set(client.list_topics(timeout=timeout_s).topics)
    missing = [
        NewTopic(name, num_partitions=settings.partitions, replication_factor=-1, config=config)
        for name, config in wanted.items()
        if name not in existing
    ]
    if not missing:
        return []
    created = []
    for name, future in client.create_topics(missing, operation_timeout=timeout_s).items():
        try:
            future.result(timeout=timeout_s)
            created.append(name)
        except KafkaException as exc:
            if exc.args[0].name() != "TOPIC_ALREADY_EXISTS":
                raise KafkaUnavailable(f"could not create topic {name}: {exc.args[0].str()}") from None
    return created


def table_changelogs(settings: Settings) -> list[str]:
    """The changelog topics of the worker's Faust tables (Faust's naming: app id, table, "changelog")."""
    return [f"{settings.app_id}-{table}-changelog" for table in QUOTA_TABLES]


class _SilentLogger:
    """librdkafka logs connection refusals itself; errors are raised to callers instead."""

    def log(self, *args: object, **kwargs: object) -> None:
        pass
