"""Which partition a key lands on: Kafka's default partitioner (murmur2 of the key, positive, modulo
the partition count), as the Java client, aiokafka and our producers (``murmur2_random``) compute it.

The enforcers use it to give each tenant one owner, partitioned like ``usage.raw``; the in-memory
broker of the loop's tests uses it so that a key lands where a real broker would put it. It must
stay bit-for-bit Kafka's (``tests/messaging/test_partitioning.py`` checks it against a real
producer): an owner computed differently would split a tenant's reservations across enforcers.
"""

from __future__ import annotations

_SEED = 0x9747B28C
_M = 0x5BD1E995
_MASK = 0xFFFFFFFF


def murmur2(data: bytes) -> int:
    """Kafka's 32-bit murmur2 (``org.apache.kafka.common.utils.Utils.murmur2``), unsigned."""
    length = len(data)
    h = (_SEED ^ length) & _MASK
    whole = length - length % 4
    for i in range(0, whole, 4):
        k = int.from_bytes(data[i:i + 4], "little")
        k = (k * _M) & _MASK
        k ^= k >> 24
        k = (k * _M) & _MASK
        h = ((h * _M) & _MASK) ^ k
    rest = length % 4
    if rest == 3:
        h ^= data[whole + 2] << 16
    if rest >= 2:
        h ^= data[whole + 1] << 8
    if rest >= 1:
        h ^= data[whole]
        h = (h * _M) & _MASK
    h ^= h >> 13
    h = (h * _M) & _MASK
    return h ^ (h >> 15)


def partition_of(key: bytes, partitions: int) -> int:
    """The partition of a keyed record among ``partitions``."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions
