"""A small client for ``costline enforcer``, for AI gateways in Python (standard library only).

    from streams.enforcement.client import EnforcerClient

    enforcer = EnforcerClient("http://127.0.0.1:6067", token="...")
    decision = enforcer.decision("acme", user="u-42")
    if decision["decision"] == "block":
        ...  # refuse the model call

A gateway that would rather not make an HTTP call per request embeds ``streams.enforcement.enforcer.Enforcer``
instead: the same decisions, kept current in-process from Kafka.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import quote, urlencode

from streams.errors import CostlineError
from streams.httpjson import Refused, post_json


class EnforcerUnavailable(CostlineError):
    """The enforcer did not answer in time or refused the request."""


class EnforcerClient:
    def __init__(self, base_url: str = "http://127.0.0.1:6067", token: str | None = None, timeout_s: float = 0.5,
                 fail_open: bool = False) -> None:
        """``fail_open``: answer ``allow`` (with ``"unavailable": true``) when the enforcer cannot be reached,
        instead of raising ``EnforcerUnavailable``."""
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.timeout_s = timeout_s
        self.fail_open = fail_open
        #: Where a tenant's (or a partition's) reservations were redirected to: the next request goes there at once.
        self._owners: dict[tuple[str, str], str] = {}

    def reserve(self, tenant: str, provider: str, model: str, idempotency_key: str, *, input_tokens: int = 0,
                max_tokens: int | None = None, n: int = 1, user: str | None = None, business_path: str | None = None,
                lease_s: float | None = None) -> dict[str, Any]:
        """Holds budget for a call about to be made (``POST /v1/reservations``): the answer has
        ``granted``, and then the ``reservation_id`` to put on the call's usage event; refused, it
        has ``refused_by`` (the limit, its window and what remains). Never fails open: a call that
        cannot be reserved raises ``EnforcerUnavailable``."""
        body = {"tenant_id": tenant, "user_id": user, "provider": provider, "model": model,
                "business_path": business_path, "input_tokens": input_tokens, "max_tokens": max_tokens, "n": n,
                "idempotency_key": idempotency_key, **({"lease_s": lease_s} if lease_s else {})}
        return self._post("/v1/reservations", body, ("tenant", tenant))

    def release(self, reservation_id: str) -> bool:
        """Frees a reservation whose call was never made; False when it was settled or had expired."""
        path = f"/v1/reservations/{quote(reservation_id, safe='')}/release"
        return bool(self._post(path, {}, ("partition", reservation_id.partition("-")[0]))["released"])

    def _post(self, path: str, body: dict[str, Any], route: tuple[str, str]) -> dict[str, Any]:
        """POSTs to the enforcer that owns ``route`` (a tenant, or a reservation's partition): the
        configured one, or the owner it redirected to before. One redirect is followed; a second
        means the enforcers disagree on their layout."""
        base = self._owners.get(route, self.base_url)
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        for hop in (0, 1):
            try:
                return post_json(f"{base}{path}", body, self.timeout_s, headers)
            except Refused as exc:
                if exc.status == 307 and exc.location and exc.location.endswith(path) and hop == 0:
                    base = exc.location[:-len(path)]
                    if len(self._owners) >= 10_000:
                        self._owners.clear()
                    self._owners[route] = base
                    continue
                if exc.status == 307:
                    raise EnforcerUnavailable(f"the enforcers disagree on who owns {route[0]} {route[1]} "
                                              f"({exc.detail}): give every one the same COSTLINE_ENFORCER_PEERS"
                                              ) from None
                raise EnforcerUnavailable(f"the enforcer refused the request ({exc.status}): {exc.detail}") from None
            except (OSError, ValueError) as exc:
                self._owners.pop(route, None)  # (an owner gone: ask the configured enforcer again next time)
                raise EnforcerUnavailable(f"the enforcer at {base} did not answer: {exc}") from None
        raise AssertionError("unreachable: the loop returns or raises")

    def decision(self, tenant: str, *, user: str | None = None, model: str | None = None,
                 business_path: str | None = None) -> dict[str, Any]:
        scope = {k: v for k, v in {"user": user, "model": model, "business_path": business_path}.items() if v}
        url = f"{self.base_url}/v1/decisions/{quote(tenant, safe='')}" + (f"?{urlencode(scope)}" if scope else "")
        request = urllib.request.Request(url, headers={"Authorization": f"Bearer {self.token}"} if self.token else {})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as resp:
                return json.load(resp)
        except (OSError, ValueError) as exc:
            if self.fail_open:
                return {"tenant_id": tenant, "decision": "allow", "limits": [], "unavailable": True}
            raise EnforcerUnavailable(f"the enforcer at {self.base_url} did not answer: {exc}") from None
