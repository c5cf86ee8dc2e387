"""A small client for ``costline enforcer``, for AI gateways in Python (standard library only).

    from streams.enforcement.client import EnforcerClient

    enforcer = EnforcerClient("http://127.0.0.1:6067", token="...")
    decision = enforcer.decision("acme", user="u-42")
    if decision["decision"] == "block":
        ...  # refuse the model call
    hold = enforcer.reserve("acme", "openai", "gpt-4o", idempotency_key=event_id, input_tokens=1200, max_tokens=500)

Each thread keeps one connection to each enforcer it talks to (HTTP/1.1 keep-alive): a
reservation then costs a request, not a new connection too. A connection the enforcer closed
while idle is opened again once, and the request sent again (reservations and releases are
idempotent). With several enforcers sharing the tenants, any one of them will do as
``base_url``: a request for a tenant another one owns is redirected there, and the owner is
remembered (``streams.enforcement.layout``).

A gateway that would rather not make an HTTP call per request embeds ``streams.enforcement.enforcer.Enforcer``
instead: the same decisions, kept current in-process from Kafka.
"""

from __future__ import annotations

import http.client
import json
import threading
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

from streams.errors import CostlineError


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
        #: Per thread: base URL → its kept-alive connection.
        self._local = threading.local()

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

    def decision(self, tenant: str, *, user: str | None = None, model: str | None = None,
                 business_path: str | None = None) -> dict[str, Any]:
        scope = {k: v for k, v in {"user": user, "model": model, "business_path": business_path}.items() if v}
        path = f"/v1/decisions/{quote(tenant, safe='')}" + (f"?{urlencode(scope)}" if scope else "")
        try:
            status, _, answer = self._request(self.base_url, "GET", path, None)
        except (OSError, http.client.HTTPException, ValueError) as exc:
            if self.fail_open:
                return {"tenant_id": tenant, "decision": "allow", "limits": [], "unavailable": True}
            raise EnforcerUnavailable(f"the enforcer at {self.base_url} did not answer: {exc}") from None
        if status != 200:
            if self.fail_open:
                return {"tenant_id": tenant, "decision": "allow", "limits": [], "unavailable": True}
            raise EnforcerUnavailable(f"the enforcer refused the request ({status}): {answer.get('error', '')}")
        return answer

    def _post(self, path: str, body: dict[str, Any], route: tuple[str, str]) -> dict[str, Any]:
        """POSTs to the enforcer that owns ``route`` (a tenant, or a reservation's partition): the
        configured one, or the owner it redirected to before. One redirect is followed; a second
        means the enforcers disagree on their layout."""
        base = self._owners.get(route, self.base_url)
        data = json.dumps(body).encode()
        for hop in (0, 1):
            try:
                status, location, answer = self._request(base, "POST", path, data)
            except (OSError, http.client.HTTPException, ValueError) as exc:
                self._owners.pop(route, None)  # (an owner gone: ask the configured enforcer again next time)
                raise EnforcerUnavailable(f"the enforcer at {base} did not answer: {exc}") from None
            if status == 200:
                return answer
            if status != 307 or not location or not location.endswith(path):
                raise EnforcerUnavailable(f"the enforcer refused the request ({status}): {answer.get('error', '')}")
            if hop == 1:
                raise EnforcerUnavailable(f"the enforcers disagree on who owns {route[0]} {route[1]} "
                                          f"({answer.get('error', '')}): give every one the same "
                                          "COSTLINE_ENFORCER_PEERS")
            base = location[:-len(path)]
            if len(self._owners) >= 10_000:
                self._owners.clear()
            self._owners[route] = base
        raise AssertionError("unreachable: the second hop returns or raises")

    def _request(self, base: str, method: str, path: str, data: bytes | None) -> tuple[int, str | None, Any]:
        """(status, Location header, JSON body) of one request on this thread's connection to ``base``."""
        connections: dict[str, http.client.HTTPConnection] = self._local.__dict__.setdefault("open", {})
        headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {self.token}"} if self.token
                                                          else {})}
        for attempt in (0, 1):
            connection = connections.get(base)
            reused = connection is not None
            if connection is None:
                url = urlsplit(base)
                kind = http.client.HTTPSConnection if url.scheme == "https" else http.client.HTTPConnection
                connection = connections[base] = kind(url.hostname, url.port, timeout=self.timeout_s)
            try:
                connection.request(method, path, body=data, headers=headers)
                response = connection.getresponse()
                payload = response.read()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                connection.close()
                del connections[base]
                if reused and attempt == 0:
                    continue  # closed by the enforcer while idle: once more on a new connection
                raise
            except BaseException:
                connection.close()
                del connections[base]
                raise
            if response.will_close:
                connection.close()
                del connections[base]
            return response.status, response.getheader("Location"), json.loads(payload)
        raise AssertionError("unreachable: the second attempt returns or raises")
