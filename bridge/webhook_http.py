"""The SSRF-guarded HTTP sender of webhooks (httpx on trio).

One attempt = resolve the URL's host, check every address (:mod:`bridge.ssrf`), then
POST to one of the checked addresses: the URL's host is replaced by the address, the
``Host`` header keeps the name, and for https the TLS SNI and certificate check use the
name too (httpcore's ``sni_hostname`` extension). Nothing is resolved again after the
check, so DNS rebinding cannot steer the connection elsewhere.

Redirects are never followed (a 3xx is a failed attempt, "redirect refused"), proxies
from the environment are ignored (``trust_env=False``), and connections are not kept
alive (a pooled connection is keyed by address, so it could otherwise carry a request
for another host name that shares the address).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass

import httpx
import trio

from bridge.ssrf import IPAddress, UrlRefused, WebhookTarget, checked_addresses, parse_webhook_url

__all__ = [
    "MAX_CONNECTIONS",
    "MAX_RESPONSE_BYTES",
    "AttemptResult",
    "WebhookSender",
    "open_webhook_sender",
]

log = logging.getLogger("hub.webhooks.http")

#: Most requests the sender has open at once (the dispatcher limits per endpoint).
MAX_CONNECTIONS = 100
#: Bytes of a response body read (and discarded) at most.
MAX_RESPONSE_BYTES = 64 * 1024
#: Longest ``last_error`` text kept.
MAX_ERROR_CHARS = 500


@dataclass(frozen=True, slots=True)
class AttemptResult:
    """The outcome of one POST: ``ok`` for a 2xx; otherwise ``error`` says what failed
    and ``status_code`` is the answer's status when there was one."""

    ok: bool
    status_code: int | None = None
    error: str | None = None


def _failure(error: str, status_code: int | None = None) -> AttemptResult:
    return AttemptResult(False, status_code, error[:MAX_ERROR_CHARS])


class WebhookSender:
    """Sends signed webhook requests. Built by :func:`open_webhook_sender`.

    Args:
        client: an ``httpx.AsyncClient`` with ``follow_redirects=False`` and
            ``trust_env=False``.
        allow_private: skip the address rule (``WEBHOOK_ALLOW_PRIVATE``, tests only).
        timeout_s: the whole attempt (DNS, connect, TLS, request, answer) must finish
            within this many seconds.

    Cancellation:
        Cancelling :meth:`post` abandons the request; the connection is closed.

    Backpressure:
        None here: the caller bounds concurrency (the dispatcher's limiters).
    """

    def __init__(self, client: httpx.AsyncClient, *, allow_private: bool, timeout_s: float) -> None:
        self._client = client
        self._allow_private = allow_private
        self._timeout_s = timeout_s

    @property
    def allow_private(self) -> bool:
        return self._allow_private

    async def post(self, url: str, *, body: str, headers: Mapping[str, str]) -> AttemptResult:
        """POST ``body`` to ``url`` with ``headers``; never raises for network trouble.

        Returns:
            ``ok`` for a 2xx answer; a failure for any other status (3xx: "redirect
            refused"), a refused address, a connection error or the timeout.
        """
        with trio.move_on_after(self._timeout_s):
            try:
                target = parse_webhook_url(url)
                addresses = await checked_addresses(
                    target.host, target.port, allow_private=self._allow_private
                )
            except UrlRefused as exc:
                return _failure(f"refused: {exc.reason}")
            error = "no address to connect to"
            for address in addresses:
                try:
                    return await self._post_to(target, address, body, headers)
                except httpx.ConnectError as exc:  # try the next checked address
                    error = f"connection to {address} failed: {exc or type(exc).__name__}"
                except httpx.TimeoutException as exc:
                    return _failure(f"timeout: {exc or type(exc).__name__}")
                except httpx.HTTPError as exc:
                    return _failure(f"{type(exc).__name__}: {exc}")
            return _failure(error)
        return _failure(f"timeout: no answer within {self._timeout_s:g} s")

    async def _post_to(
        self, target: WebhookTarget, address: IPAddress, body: str, headers: Mapping[str, str]
    ) -> AttemptResult:
        """One request to ``address`` (already checked) for ``target``."""
        pinned = target.url.copy_with(host=str(address))
        extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
        request_headers = {**headers, "Host": target.host_header}
        async with self._client.stream(
            "POST", pinned, content=body.encode(), headers=request_headers, extensions=extensions
        ) as response:
            received = 0
            async for chunk in response.aiter_raw():
                received += len(chunk)
                if received >= MAX_RESPONSE_BYTES:
                    break
            status = response.status_code
        if 200 <= status < 300:
            return AttemptResult(True, status)
        if 300 <= status < 400:
            location = response.headers.get("Location", "")
            return _failure(f"redirect refused (status {status}, Location: {location})", status)
        return _failure(f"unexpected status {status}", status)


@asynccontextmanager
async def open_webhook_sender(
    *, allow_private: bool, timeout_s: float
) -> AsyncIterator[WebhookSender]:
    """A :class:`WebhookSender` with its own httpx client, closed on exit.

    Resource handling:
        The client (and any open connection) is closed when the block is left.
    """
    client = httpx.AsyncClient(
        follow_redirects=False,
        trust_env=False,
        timeout=httpx.Timeout(timeout_s),
        limits=httpx.Limits(max_connections=MAX_CONNECTIONS, max_keepalive_connections=0),
    )
    async with client:
        yield WebhookSender(client, allow_private=allow_private, timeout_s=timeout_s)
