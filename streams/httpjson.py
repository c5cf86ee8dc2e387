"""JSON over HTTP with the standard library, for the commands that talk to a running worker or
enforcer (health, queries routed to the worker) and for the harness that waits on them."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Mapping
from typing import Any


def get_json(url: str, timeout_s: float = 2.0, headers: Mapping[str, str] | None = None) -> dict[str, Any] | None:
    """The JSON body of a GET (error statuses included), or None when nothing answers."""
    request = urllib.request.Request(url, headers=dict(headers or {}))
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as resp:
            return json.load(resp)
    except urllib.error.HTTPError as exc:
        try:
            return json.load(exc)
        except ValueError:
            return None
    except (OSError, ValueError):
        return None
