"""JSON over HTTP with the standard library, for the commands that talk to a running worker or
enforcer (health, queries routed to the worker) and for the harness that waits on them."""

from __future__ import annotations

import hmac
import json
import urllib.error
import urllib.request
from collections.abc import Mapping
from typing import Any


def bearer_ok(authorization: str | None, token: str | None) -> bool:
    """Whether an ``Authorization`` header carries ``token`` (always, when no token is set). The
    scheme is compared without regard to case, as HTTP says; the token in constant time."""
    if not token:
        return True
    scheme, _, credentials = (authorization or "").strip().partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(credentials.strip().encode(), token.encode())


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


class Refused(Exception):
    """An HTTP error status, with the ``error`` of its JSON body (or the reason phrase)."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


def post_json(url: str, body: Mapping[str, Any], timeout_s: float, headers: Mapping[str, str] | None = None
              ) -> dict[str, Any]:
    """POSTs ``body`` as JSON and returns the JSON answer; an error status raises ``Refused``, a
    server that does not answer ``OSError``."""
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as resp:
            return json.load(resp)
    except urllib.error.HTTPError as exc:
        try:
            detail = json.load(exc).get("error", exc.reason)
        except ValueError:
            detail = exc.reason
        raise Refused(exc.code, str(detail)) from None
