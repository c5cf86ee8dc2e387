"""Stage 3: the business path an event's cost is attributed to.

Until path rules are configured, the path is the event's ``service/feature`` (whichever of
the two is present); an event with neither is ``unattributed``.
"""

from __future__ import annotations

from schemas.usage import UsageEvent

UNATTRIBUTED = "unattributed"


def business_path(event: UsageEvent) -> str:
    parts = [p for p in (event.service, event.feature) if p]
    return "/".join(parts) if parts else UNATTRIBUTED
