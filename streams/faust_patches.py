"""Corrections to faust-streaming 0.15 and aiokafka 0.14 that the delivery guarantees depend on.
Import this module before anything else imports ``faust``. Each was found by the fault suite's
rebalance case, which lost up to 483 of 2,400 events without them.

1. After a rebalance Faust seeks every partition back to its committed offset, to re-read what
   it had fetched but not processed; aiokafka's ``seek_to_committed`` skips the seek when the
   committed offset is 0 (``if offset and offset > 0``), so a partition committed at its first
   record continued from the fetch position, past everything dropped in the rebalance. The
   corrected seek also goes back to offset 0, and to the beginning where nothing is committed
   (the worker seeds a committed offset for every partition at start-up; see
   ``streams.topics.seed_group_offsets``).

2. During a rebalance Faust's stream iterator skips the messages it fetched before the rebalance
(an older consumer generation, or while flow control is suspended) and *acknowledges* them, so
the next commit can move the group's offset past records that no agent processed. The
correction: a message that no stream took into processing (not ``tracked``) is never
acknowledged. Such a message is fetched again after the rebalance, from the committed offset,
and processed then. Faust's Cython stream iterator acknowledges inline, where no patch can
reach, so the pure-Python iterator is selected (``NO_CYTHON``).

3. The batch engine writes usage.attributed and quota.alerts in Kafka transactions; Faust's
consumer reads ``read_committed`` only under its own exactly-once mode, so the sink agents
would land records of aborted transactions. Faust's worker consumer reads ``read_committed``.
"""

from __future__ import annotations

import os

os.environ["NO_CYTHON"] = "1"

import faust.streams  # noqa: E402
from aiokafka import AIOKafkaConsumer  # noqa: E402
from faust.events import Event  # noqa: E402
from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread  # noqa: E402

if faust.streams._CStreamIterator is not None:  # pragma: no cover - faust was imported before this module
    raise ImportError("import streams.faust_patches before faust: the Cython stream iterator is already in use")

_original_ack = Event.ack


def _ack_only_processed(self: Event) -> bool:
    if not self.message.tracked:
        return False
    return _original_ack(self)


Event.ack = _ack_only_processed  # type: ignore[method-assign]


_original_seek_to_committed = AIOKafkaConsumer.seek_to_committed


async def _seek_to_committed_including_zero(self: AIOKafkaConsumer, *partitions: object) -> dict:
    committed = await _original_seek_to_committed(self, *partitions)
    for tp, offset in committed.items():
        if offset == 0:
            self._fetcher.seek_to(tp, 0)
        elif offset is None or offset < 0:
            await self.seek_to_beginning(tp)
    return committed


AIOKafkaConsumer.seek_to_committed = _seek_to_committed_including_zero  # type: ignore[method-assign]


_original_create_worker_consumer = AIOKafkaConsumerThread._create_worker_consumer


def _create_read_committed_consumer(self: AIOKafkaConsumerThread, transport: object) -> AIOKafkaConsumer:
    consumer = _original_create_worker_consumer(self, transport)
    consumer._isolation_level = "read_committed"  # read when the fetcher is created, at start()
    return consumer


AIOKafkaConsumerThread._create_worker_consumer = _create_read_committed_consumer  # type: ignore[method-assign]
