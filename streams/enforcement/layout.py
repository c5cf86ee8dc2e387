"""Which enforcer owns a tenant's reservations, when several share the tenants.

Every instance is started with the same ordered list of base URLs (``COSTLINE_ENFORCER_PEERS``)
and its own entry in it (``COSTLINE_ENFORCER_URL``). A tenant belongs to ``usage.raw``'s
partition of its key (``streams.messaging.partitioning``), and partition *p* to peer *p* mod the
number of peers: one owner per tenant, the same on every instance, with no coordination. A
reservation's id starts with its tenant's partition, so any instance can send its release to the
owner. An instance asked about a tenant it does not own answers ``307`` with the owner's URL
(``streams.enforcement.server``); ``EnforcerClient`` follows it and remembers the owner.

Only holds need one owner: the rule ``counted + held + estimate ≤ cap`` is exact only where all
of a tenant's holds are. Decisions (``GET /v1/decisions``) come from ``quota.state``, which every
instance reads whole, so any instance answers them.

Changing the list moves tenants: restart every instance with the new list (each restores the
holds of the tenants it then owns from the journal). Two instances with different lists could
both own a tenant; the client refuses to follow a second redirect, which is how that shows.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from streams.messaging.partitioning import partition_of
from streams.settings import Settings, SettingsError


@dataclass(frozen=True)
class EnforcerLayout:
    peers: tuple[str, ...]
    #: This instance's index in ``peers``.
    me: int
    partitions: int

    @classmethod
    def from_settings(cls, settings: Settings) -> EnforcerLayout:
        own = settings.enforcer_url.rstrip("/")
        peers = tuple(url.strip().rstrip("/") for url in settings.enforcer_peers.split(",") if url.strip()) or (own,)
        if own not in peers:
            raise SettingsError(f"COSTLINE_ENFORCER_URL={own!r} is not one of COSTLINE_ENFORCER_PEERS "
                                f"({', '.join(peers)}): set it to this instance's entry in the list")
        if len(set(peers)) != len(peers):
            raise SettingsError("COSTLINE_ENFORCER_PEERS lists an enforcer twice: give each instance once")
        return cls(peers, peers.index(own), settings.partitions)

    def partition(self, tenant: str) -> int:
        return partition_of(tenant.encode(), self.partitions)

    def owner_of(self, tenant: str) -> str:
        return self.peers[self.partition(tenant) % len(self.peers)]

    def owns(self, tenant: str) -> bool:
        return len(self.peers) == 1 or self.partition(tenant) % len(self.peers) == self.me

    def reservation_id(self, tenant: str) -> str:
        """A new id that names its tenant's partition: ``<partition>-<32 hex digits>``."""
        return f"{self.partition(tenant)}-{uuid.uuid4().hex}"

    def owner_of_reservation(self, reservation_id: str) -> str | None:
        """The instance holding a reservation; None when the id names no partition (an id from an
        enforcer before this layout, or not ours): then it can only be here, if anywhere."""
        head, dash, _ = reservation_id.partition("-")
        if not dash or not (head.isascii() and head.isdigit()) or int(head) >= self.partitions:
            return None
        return self.peers[int(head) % len(self.peers)]
