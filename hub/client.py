"""Python client for the hub's realtime API (SPEC §2-§3), on trio.

Typical use::

    tokens = await login("http://127.0.0.1:8000", "me@example.com", "S3cret-password")
    async with open_hub_client(
        "ws://127.0.0.1:8000",
        token_provider=tokens.get_access_token,
        channels=["global", f"user.{user_id}"],
        on_recovery_failed=refetch,  # called when history no longer covers a gap
    ) as client:
        async for note in client:
            print(note.channel, note.offset, note.data)

What the client does for you:

- reads the ``welcome`` frame and pings every ``heartbeat_interval`` seconds it names;
- reconnects with exponential backoff and full jitter when the connection drops (network
  errors, 1001, 1006, 1011, 4008, 4009, 4011 and any code not listed as terminal), resubscribing
  with ``since`` = the last offset seen on each channel, so nothing is missed while the
  server's history covers the gap; when it does not (``recovered: false``) it tells the
  application through ``on_recovery_failed``;
- drops duplicates: a notification whose offset is not newer than the last one seen on its
  channel is never yielded;
- with a ``token_provider``, fetches a token before every (re)connect, refreshes it in-band
  (``{"type":"refresh"}``) before it expires, and gets a new one when the server closes with
  4001 or 4010.

Terminal close codes (4001/4010 without a usable new token, 4003, 1000, 1003, 1007, 1008,
1009) stop the client: iteration then raises :class:`HubClosedError` (or
:class:`HubAuthError`).
"""

from __future__ import annotations

import base64
import binascii
import itertools
import json
import logging
import math
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

import httpx
import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    HandshakeError,
    WebSocketConnection,
    open_websocket_url,
)

__all__ = [
    "DEFAULT_WS_PATH",
    "HubAuthError",
    "HubClient",
    "HubClientError",
    "HubClientStatistics",
    "HubClosedError",
    "HubRequestError",
    "HubUnavailableError",
    "Notification",
    "RecoveryFailed",
    "SubscribeResult",
    "TokenProvider",
    "Tokens",
    "compare_offsets",
    "login",
    "open_hub_client",
    "parse_offset",
    "refresh_tokens",
]

log = logging.getLogger("hub.client")

DEFAULT_WS_PATH = "/ws/notifications"
#: Notifications held for the application before the reader stops reading the socket.
NOTIFICATION_BUFFER_SIZE = 256
BACKOFF_BASE_S = 0.5
BACKOFF_CAP_S = 30.0
#: Ask the provider for a new token this long before the current one expires.
TOKEN_REFRESH_MARGIN_S = 60.0
#: Retry a failed in-band refresh after this long (bounded by the token's expiry).
TOKEN_RETRY_S = 5.0
REPLY_TIMEOUT_S = 10.0
CONNECT_TIMEOUT_S = 10.0
CLOSE_TIMEOUT_S = 2.0
#: The connection counts as dead after this many heartbeat intervals without any frame.
DEAD_AFTER_INTERVALS = 2.5
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
HTTP_TIMEOUT_S = 10.0

#: Close codes after which reconnecting cannot help (the server's table in
#: ``actors/close_codes.py`` marks them "do not reconnect"). 1000 from the server is final.
TERMINAL_CLOSE_CODES = frozenset({1000, 1003, 1007, 1008, 1009, 4003})
#: Close codes that mean "this token is no good": reconnect only with a new one.
AUTH_CLOSE_CODES = frozenset({4001, 4010})

JsonObject = dict[str, Any]
TokenProvider = Callable[[], Awaitable[str]]


# --------------------------------------------------------------------------- errors


class HubClientError(Exception):
    """Base class of every error raised by this module."""


class HubClosedError(HubClientError):
    """The server closed the connection with a terminal code; the client gave up.

    Attributes:
        code: the WebSocket close code (``None`` when the failure was not a close frame).
        reason: the close reason or a description of the failure.
    """

    def __init__(self, code: int | None, reason: str | None = None) -> None:
        super().__init__(f"connection closed: {code} {reason or ''}".rstrip())
        self.code = code
        self.reason = reason


class HubAuthError(HubClosedError):
    """Credentials or token rejected (REST 401/403, close 4001/4010 without a new token)."""


class HubUnavailableError(HubClientError):
    """The hub could not be reached, or answered 5xx. Retrying later may help."""


class HubRequestError(HubClientError):
    """A REST call failed with an error envelope.

    Attributes:
        status: the HTTP status.
        code: the envelope's ``error.code`` (``VALIDATION_ERROR``, ``RATE_LIMIT_EXCEEDED`` …).
    """

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


# --------------------------------------------------------------------------- values


@dataclass(frozen=True, slots=True)
class Notification:
    """One ``{"type":"notification"}`` frame."""

    channel: str
    offset: str
    data: JsonObject


@dataclass(frozen=True, slots=True)
class RecoveryFailed:
    """The server could not replay ``channel`` from ``since`` (``recovered: false``).

    Messages between ``since`` and the first notification that follows are lost to this
    client; the application should refetch the channel's state (e.g. over REST).
    """

    channel: str
    since: str


@dataclass(frozen=True, slots=True)
class SubscribeResult:
    """Outcome of :meth:`HubClient.subscribe`."""

    subscribed: tuple[str, ...]
    forbidden: tuple[str, ...]
    recovered: Mapping[str, bool] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class HubClientStatistics:
    """Counters of one client, as returned by :meth:`HubClient.statistics`."""

    connected: bool
    connects: int
    reconnects: int
    duplicates_dropped: int
    recovery_failures: int
    token_refreshes: int
    bad_frames: int
    buffered: int
    last_close_code: int | None


RecoveryCallback = Callable[[RecoveryFailed], Awaitable[None] | None]


# --------------------------------------------------------------------------- offsets


def parse_offset(offset: str) -> tuple[str, int] | None:
    """Split ``"<epoch>:<seq>"`` into ``(epoch, seq)``; ``None`` if it has another shape.

    Offsets are opaque to applications; the client only relies on this shape to drop
    duplicates. The epoch is everything before the last colon.
    """
    epoch, sep, seq = offset.rpartition(":")
    if not sep or not seq.isdigit():
        return None
    return epoch, int(seq)


def compare_offsets(offset: str, last: str | None) -> int:
    """Compare a received offset with the last one seen on the same channel.

    Returns:
        1 if ``offset`` is newer (or ``last`` is ``None``, or the epoch changed: a reset),
        0 if it is the same message again, -1 if it is older. Offsets that do not parse are
        treated as newer, so an unexpected format never loses messages.
    """
    if last is None:
        return 1
    new, old = parse_offset(offset), parse_offset(last)
    if new is None or old is None:
        return 0 if offset == last else 1
    if new[0] != old[0]:
        return 1
    return (new[1] > old[1]) - (new[1] < old[1])


def token_expiry(token: str) -> float | None:
    """The ``exp`` claim (epoch seconds) of a JWT, read without verifying it."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        payload = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, binascii.Error):
        return None
    exp = payload.get("exp") if isinstance(payload, dict) else None
    return float(exp) if isinstance(exp, int | float) else None


def full_jitter_delay(attempt: int, base_s: float, cap_s: float, rng: random.Random) -> float:
    """Exponential backoff with full jitter: uniform in ``[0, min(cap, base * 2**attempt)]``."""
    return rng.uniform(0.0, min(cap_s, base_s * math.pow(2.0, min(attempt, 62))))


# --------------------------------------------------------------------------- REST helpers


def _api_url(base_url: str, path: str) -> str:
    base = base_url.rstrip("/")
    if not base.endswith("/api/v1"):
        base += "/api/v1"
    return base + path


def _raise_for_envelope(response: httpx.Response) -> JsonObject:
    try:
        body = response.json()
    except ValueError:
        body = None
    if response.status_code < 400 and isinstance(body, dict) and body.get("status") == "success":
        data = body.get("data")
        return data if isinstance(data, dict) else {}
    error = body.get("error", {}) if isinstance(body, dict) else {}
    code = str(error.get("code", "HTTP_ERROR")) if isinstance(error, dict) else "HTTP_ERROR"
    message = str(error.get("message", response.reason_phrase)) if isinstance(error, dict) else ""
    if response.status_code in (401, 403):
        raise HubAuthError(None, f"{response.status_code} {code}: {message}")
    if response.status_code >= 500:
        raise HubUnavailableError(f"{response.status_code} {code}: {message}")
    raise HubRequestError(response.status_code, code, message)


async def _post(
    base_url: str, path: str, body: JsonObject, http: httpx.AsyncClient | None
) -> JsonObject:
    url = _api_url(base_url, path)
    try:
        if http is not None:
            response = await http.post(url, json=body)
        else:
            async with httpx.AsyncClient(timeout=HTTP_TIMEOUT_S) as own:
                response = await own.post(url, json=body)
    except httpx.TransportError as error:
        raise HubUnavailableError(f"POST {path}: {error!r}") from error
    return _raise_for_envelope(response)


@dataclass
class Tokens:
    """An access/refresh token pair from ``POST /auth/login``; refreshes itself.

    ``tokens.get_access_token`` is a ready-made ``token_provider`` for :class:`HubClient`.
    Refresh tokens rotate on every refresh (SPEC §2) and reusing an old one revokes the
    session, so concurrent refreshes are serialised by a lock.
    """

    base_url: str
    access_token: str
    refresh_token: str
    expires_in: float
    token_type: str = "Bearer"
    obtained_at: float = field(default_factory=time.time)
    http: httpx.AsyncClient | None = field(default=None, repr=False, compare=False)
    _lock: trio.Lock | None = field(default=None, init=False, repr=False, compare=False)

    @classmethod
    def _from_data(cls, base_url: str, data: JsonObject, http: httpx.AsyncClient | None) -> Tokens:
        try:
            return cls(
                base_url=base_url,
                access_token=str(data["access_token"]),
                refresh_token=str(data["refresh_token"]),
                expires_in=float(data.get("expires_in", 3600)),
                token_type=str(data.get("token_type", "Bearer")),
                http=http,
            )
        except KeyError as missing:
            raise HubRequestError(200, "BAD_RESPONSE", f"no {missing} in token response") from None

    @property
    def access_expires_at(self) -> float:
        """Epoch seconds at which the access token expires (its ``exp`` claim if readable)."""
        return token_expiry(self.access_token) or self.obtained_at + self.expires_in

    async def refresh(self) -> str:
        """Exchange the refresh token for a new pair (``POST /auth/refresh``).

        Returns:
            The new access token; ``access_token`` and ``refresh_token`` are updated.

        Raises:
            HubAuthError: the refresh token was rejected (expired, revoked, reused).
            HubUnavailableError: the hub could not be reached.
        """
        if self._lock is None:
            self._lock = trio.Lock()
        async with self._lock:
            await self._refresh_locked(self.access_token)
        return self.access_token

    async def _refresh_locked(self, seen_access_token: str) -> None:
        if self.access_token != seen_access_token:
            return  # another task refreshed while we waited for the lock
        data = await _post(
            self.base_url, "/auth/refresh", {"refresh_token": self.refresh_token}, self.http
        )
        fresh = Tokens._from_data(self.base_url, data, self.http)
        self.access_token, self.refresh_token = fresh.access_token, fresh.refresh_token
        self.expires_in, self.obtained_at = fresh.expires_in, fresh.obtained_at

    async def get_access_token(self, *, min_ttl_s: float = TOKEN_REFRESH_MARGIN_S) -> str:
        """The current access token, refreshed first if it expires within ``min_ttl_s``.

        This is the one-line ``token_provider``: ``token_provider=tokens.get_access_token``.
        """
        if self._lock is None:
            self._lock = trio.Lock()
        async with self._lock:
            if self.access_expires_at - time.time() <= min_ttl_s:
                await self._refresh_locked(self.access_token)
            return self.access_token


async def login(
    base_url: str, email: str, password: str, *, http: httpx.AsyncClient | None = None
) -> Tokens:
    """Log in over REST (``POST /api/v1/auth/login``).

    Args:
        base_url: ``http://host:port`` of any node (``/api/v1`` is appended if missing).
        email: the account's e-mail.
        password: its password.
        http: an ``httpx.AsyncClient`` to reuse (keep-alive); one is opened per call otherwise.

    Returns:
        :class:`Tokens`, whose ``get_access_token`` is a ready ``token_provider``.

    Raises:
        HubAuthError: 401 (wrong credentials) or 403 (not verified, inactive).
        HubRequestError: any other error envelope (e.g. 429 ``RATE_LIMIT_EXCEEDED``).
        HubUnavailableError: network failure or 5xx.
    """
    data = await _post(base_url, "/auth/login", {"email": email, "password": password}, http)
    return Tokens._from_data(base_url, data, http)


async def refresh_tokens(
    base_url: str, refresh_token: str, *, http: httpx.AsyncClient | None = None
) -> Tokens:
    """Exchange a refresh token for a new pair (``POST /api/v1/auth/refresh``)."""
    data = await _post(base_url, "/auth/refresh", {"refresh_token": refresh_token}, http)
    return Tokens._from_data(base_url, data, http)


# --------------------------------------------------------------------------- the client


class _Reply:
    """A request waiting for its reply on one connection."""

    __slots__ = ("channels", "done", "error", "expect", "forbidden", "frame")

    def __init__(self, expect: str, channels: Iterable[str] = ()) -> None:
        self.expect = expect
        self.channels = tuple(channels)
        self.done = trio.Event()
        self.frame: JsonObject | None = None
        self.error: JsonObject | None = None
        self.forbidden: list[str] = []


class _SubscribeWaiter:
    """A :meth:`HubClient.subscribe` call waiting until each of its channels is settled."""

    __slots__ = ("done", "forbidden", "pending", "recovered", "subscribed")

    def __init__(self, channels: Iterable[str]) -> None:
        self.pending = set(channels)
        self.subscribed: list[str] = []
        self.forbidden: list[str] = []
        self.recovered: dict[str, bool] = {}
        self.done = trio.Event()
        if not self.pending:
            self.done.set()

    def settle(self, channel: str, *, ok: bool, recovered: bool | None = None) -> None:
        if channel not in self.pending:
            return
        self.pending.discard(channel)
        (self.subscribed if ok else self.forbidden).append(channel)
        if recovered is not None:
            self.recovered[channel] = recovered
        if not self.pending:
            self.done.set()

    def result(self) -> SubscribeResult:
        return SubscribeResult(tuple(self.subscribed), tuple(self.forbidden), dict(self.recovered))


class _ConnectionEnded(Exception):
    """Internal: the current connection is over; ``code`` says why (``None``: network)."""

    def __init__(self, code: int | None, reason: str | None) -> None:
        super().__init__(code, reason)
        self.code = code
        self.reason = reason


class HubClient:
    """A reconnecting subscriber of the hub's WebSocket API.

    Build it with :func:`open_hub_client`, or construct it and run :meth:`run` in a nursery
    of your own (``await nursery.start(client.run)``), then iterate over it.

    Args:
        url: ``ws://host:port`` (the path defaults to ``/ws/notifications``) or a full URL.
        token: an access token for the first connection.
        token_provider: ``async () -> str`` returning a valid access token. Called before
            each reconnect, shortly before the token expires (the new one is sent in-band)
            and after close 4001/4010. If it returns the token that was just rejected, or
            raises :class:`HubAuthError`, the client stops with :class:`HubAuthError`. Other
            exceptions are logged and retried with backoff.
        channels: channels to subscribe to on every connection.
        since: initial offsets per channel, e.g. saved from ``last_offsets`` by an earlier
            process, so the first subscription replays what was missed.
        on_recovery_failed: called (sync or async) with :class:`RecoveryFailed` when the
            server answers ``recovered: false``. It runs in the reader task before any later
            notification is delivered, so the application can refetch in order; a slow
            callback delays delivery (see Backpressure).
        token_in_query: send the token as ``?token=`` instead of ``Authorization: Bearer``.
        backoff_base_s, backoff_cap_s: the reconnect delay before attempt ``n`` (0-based) is
            uniform in ``[0, min(cap, base * 2**n)]``; ``n`` resets after a connection that
            reached the subscribed state.
        max_reconnect_attempts: give up after this many failed attempts in a row (``None``:
            never). Giving up raises :class:`HubUnavailableError` from iteration.
        token_refresh_margin_s: how long before ``exp`` the provider is asked for a new token.
        buffer_size: notifications buffered for the application.
        rng: random source for the jitter (tests pass a seeded one).

    Backpressure:
        Notifications go through a bounded buffer of ``buffer_size``. When the application
        stops iterating, the reader blocks, the socket stops being read, and eventually the
        server closes the connection as a slow consumer (4009). The client then reconnects
        and recovers with ``since`` once the application reads again, so a slow application
        loses nothing while the server's history still covers the gap; beyond it,
        ``on_recovery_failed`` is called. Pings are sent by a separate task, so a paused
        application is not mistaken for a dead one.

    Cancellation:
        Cancelling a pending ``subscribe``/``unsubscribe``/iteration leaves the client
        usable; cancelled subscribe calls keep their channels in the subscription set (they
        are subscribed on this or the next connection). Cancelling :meth:`run` (or leaving
        :func:`open_hub_client`) closes the connection; :meth:`aclose` is idempotent.
    """

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        token_provider: TokenProvider | None = None,
        channels: Iterable[str] = (),
        since: Mapping[str, str] | None = None,
        on_recovery_failed: RecoveryCallback | None = None,
        token_in_query: bool = False,
        backoff_base_s: float = BACKOFF_BASE_S,
        backoff_cap_s: float = BACKOFF_CAP_S,
        max_reconnect_attempts: int | None = None,
        token_refresh_margin_s: float = TOKEN_REFRESH_MARGIN_S,
        buffer_size: int = NOTIFICATION_BUFFER_SIZE,
        rng: random.Random | None = None,
    ) -> None:
        if token is None and token_provider is None:
            raise ValueError("give a token or a token_provider")
        self._url = _websocket_url(url)
        self._token = token
        self._provider = token_provider
        self._channels: dict[str, None] = dict.fromkeys(channels)
        self._offsets: dict[str, str] = dict(since or {})
        self._on_recovery_failed = on_recovery_failed
        self._token_in_query = token_in_query
        self._backoff_base_s = backoff_base_s
        self._backoff_cap_s = backoff_cap_s
        self._max_attempts = max_reconnect_attempts
        self._refresh_margin_s = token_refresh_margin_s
        self._rng = rng or random.Random()
        self._send_notes, self._recv_notes = trio.open_memory_channel[Notification](buffer_size)
        self._ids = itertools.count(1)
        self._ws: WebSocketConnection | None = None
        self._replies: dict[str, _Reply] = {}
        self._waiters: list[_SubscribeWaiter] = []
        self._ready = trio.Event()
        self._stopped = trio.Event()
        self._terminal: HubClientError | None = None
        self._run_scope: trio.CancelScope | None = None
        self._closing = False
        # statistics
        self._connects = 0
        self._duplicates = 0
        self._recovery_failures = 0
        self._token_refreshes = 0
        self._bad_frames = 0
        self._last_close_code: int | None = None
        self._changed = trio.Event()

    # ----------------------------------------------------------------- public API

    @property
    def last_offsets(self) -> dict[str, str]:
        """Offset of the newest notification received per channel (a copy).

        Includes notifications still in the buffer. Save it and pass it back as ``since``
        to resume in a later process.
        """
        return dict(self._offsets)

    @property
    def channels(self) -> tuple[str, ...]:
        """The channels this client subscribes to on every connection."""
        return tuple(self._channels)

    @property
    def connected(self) -> bool:
        """True while a connection is open and its subscriptions are confirmed."""
        return self._ready.is_set()

    def statistics(self) -> HubClientStatistics:
        """Counters: connections, duplicates dropped, recovery failures, refreshes …"""
        return HubClientStatistics(
            connected=self.connected,
            connects=self._connects,
            reconnects=max(0, self._connects - 1),
            duplicates_dropped=self._duplicates,
            recovery_failures=self._recovery_failures,
            token_refreshes=self._token_refreshes,
            bad_frames=self._bad_frames,
            buffered=self._recv_notes.statistics().current_buffer_used,
            last_close_code=self._last_close_code,
        )

    async def wait_until(
        self, predicate: Callable[[HubClientStatistics], bool]
    ) -> HubClientStatistics:
        """Wait until ``predicate(self.statistics())`` is true; return those statistics.

        The predicate is checked now and after every change of connection state (connect,
        disconnect, close code, refresh, recovery failure). Example:
        ``await client.wait_until(lambda s: s.reconnects >= 1 and s.connected)``.

        Raises:
            HubClientError: the client stopped before the predicate became true.
        """
        while True:
            stats = self.statistics()
            if predicate(stats):
                await trio.lowlevel.checkpoint()
                return stats
            self._raise_if_stopped()
            await self._changed.wait()

    async def wait_connected(self) -> None:
        """Wait until a connection is open and subscribed.

        Raises:
            HubClientError: the client stopped (terminal close, gave up, or closed).
        """
        await self.wait_until(lambda stats: stats.connected)

    async def subscribe(self, channels: Iterable[str]) -> SubscribeResult:
        """Add ``channels`` to the subscription set and wait until the server settles them.

        Channels the server refuses (``FORBIDDEN``) are returned in ``forbidden`` and removed
        from the set. While disconnected, waits for the next connection.

        Raises:
            HubClientError: the client stopped before the subscription was settled.
        """
        wanted = [c for c in dict.fromkeys(channels)]
        for channel in wanted:
            self._channels.setdefault(channel, None)
        waiter = _SubscribeWaiter(wanted)
        self._waiters.append(waiter)
        request_id: str | None = None
        try:
            ws = self._ws
            if ws is not None and wanted:
                request_id = self._register("subscribed", wanted)
                frame = {**self._subscribe_frame(wanted, None), "id": request_id}
                try:
                    await self._send(ws, frame)
                except ConnectionClosed:
                    pass  # the next connection subscribes to every channel in the set
            while not waiter.done.is_set():
                self._raise_if_stopped()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_set_then_cancel, waiter.done, nursery.cancel_scope)
                    nursery.start_soon(_set_then_cancel, self._stopped, nursery.cancel_scope)
        finally:
            self._waiters.remove(waiter)
            if request_id is not None:
                self._replies.pop(request_id, None)
        return waiter.result()

    async def unsubscribe(self, channels: Iterable[str]) -> None:
        """Remove ``channels`` from the set, forget their offsets and tell the server.

        Notifications of these channels still in flight are dropped. Returns once the server
        confirms, or at once when disconnected.
        """
        gone = [c for c in dict.fromkeys(channels) if c in self._channels]
        for channel in gone:
            del self._channels[channel]
            self._offsets.pop(channel, None)
            for waiter in self._waiters:
                waiter.settle(channel, ok=False)
        ws = self._ws
        if ws is None or not gone:
            await trio.lowlevel.checkpoint()
            return
        with trio.move_on_after(REPLY_TIMEOUT_S):
            try:
                await self._request(ws, {"type": "unsubscribe", "channels": gone}, "unsubscribed")
            except ConnectionClosed:
                pass

    def __aiter__(self) -> HubClient:
        return self

    async def __anext__(self) -> Notification:
        """The next notification, in per-channel offset order, without duplicates.

        Raises:
            StopAsyncIteration: the client was closed.
            HubClientError: the client stopped on a terminal error (after every buffered
                notification has been yielded).
        """
        try:
            note = await self._recv_notes.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            if self._terminal is not None and not self._closing:
                raise self._terminal from None
            raise StopAsyncIteration from None
        return note

    async def aclose(self) -> None:
        """Close the connection (code 1000) and stop reconnecting. Idempotent, bounded by
        ``CLOSE_TIMEOUT_S``. Iteration then ends with ``StopAsyncIteration``."""
        self._closing = True
        ws = self._ws
        if ws is not None:
            with trio.move_on_after(CLOSE_TIMEOUT_S):
                await ws.aclose(1000)
        if self._run_scope is not None:
            self._run_scope.cancel()
        self._stop(None)
        await trio.lowlevel.checkpoint()

    # ----------------------------------------------------------------- supervisor

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect, subscribe and keep reconnecting until closed or a terminal error.

        Reports started once the first connection is subscribed. A terminal error before
        that is raised from ``nursery.start``; after it, it is raised from iteration and
        ``run`` returns normally.

        Cancellation:
            Cancelling ``run`` closes the current connection (bounded) and ends iteration.
        """
        started = False
        attempt = 0
        rejected_token: str | None = None
        use_initial_token = self._token is not None
        with trio.CancelScope() as scope:
            self._run_scope = scope
            try:
                while True:
                    token: str | None = None
                    failure: _ConnectionEnded
                    try:
                        token = await self._token_for_connect(use_initial_token)
                        use_initial_token = False
                        if rejected_token is not None and token == rejected_token:
                            raise HubAuthError(
                                self._last_close_code, "token rejected and no new token"
                            )
                        rejected_token = None

                        def on_ready() -> None:
                            nonlocal started, attempt
                            attempt = 0
                            if not started:
                                started = True
                                task_status.started()

                        await self._connection(token, on_ready)
                        failure = _ConnectionEnded(None, "connection ended")  # pragma: no cover
                    except _ConnectionEnded as ended:
                        failure = ended
                    except HubClosedError:
                        raise
                    except (HubClientError, OSError) as error:
                        failure = _ConnectionEnded(None, repr(error))
                    except Exception as error:
                        if self._provider is None or token is not None:
                            raise
                        log.warning("token provider failed: %r", error)
                        failure = _ConnectionEnded(None, f"token provider: {error!r}")
                    if self._closing:
                        return
                    code = failure.code
                    if code is not None:
                        self._last_close_code = code
                        self._state_changed()
                    if code in TERMINAL_CLOSE_CODES:
                        raise HubClosedError(code, failure.reason)
                    if code in AUTH_CLOSE_CODES:
                        if self._provider is None:
                            raise HubAuthError(code, failure.reason)
                        rejected_token = token
                    if self._max_attempts is not None and attempt >= self._max_attempts:
                        raise HubUnavailableError(
                            f"gave up after {attempt} attempts; last: {code} {failure.reason}"
                        )
                    delay = full_jitter_delay(
                        attempt, self._backoff_base_s, self._backoff_cap_s, self._rng
                    )
                    attempt += 1
                    log.info(
                        "hub connection lost (%s %s); retry in %.2fs", code, failure.reason, delay
                    )
                    await trio.sleep(delay)
            except HubClientError as error:
                if not started:
                    self._stop(error)
                    raise
                self._stop(error)
            finally:
                self._run_scope = None
                self._stop(None)

    async def _token_for_connect(self, use_initial: bool) -> str:
        if (use_initial or self._provider is None) and self._token is not None:
            return self._token
        assert self._provider is not None
        token = await self._provider()
        self._token = token
        return token

    # ----------------------------------------------------------------- one connection

    async def _connection(self, token: str, on_ready: Callable[[], None]) -> None:
        """Run one connection until it ends; always raises :class:`_ConnectionEnded`."""
        url, headers = self._url, [(b"User-Agent", b"notification-hub-client")]
        if self._token_in_query:
            url = _with_query(url, token=token)
        else:
            headers.append((b"Authorization", f"Bearer {token}".encode()))
        ended: _ConnectionEnded | None = None
        try:
            async with open_websocket_url(
                url,
                extra_headers=headers,
                max_message_size=MAX_MESSAGE_BYTES,
                connect_timeout=CONNECT_TIMEOUT_S,
                disconnect_timeout=CLOSE_TIMEOUT_S,
            ) as ws:
                try:
                    await self._session(ws, token, on_ready)
                except _ConnectionEnded as error:
                    ended = error
                except ConnectionClosed as error:
                    ended = _ended_from(error)
                if ended is None or ended.code is None:
                    # A closed connection records the server's code; otherwise we are
                    # abandoning a live one (dead peer, timeout).
                    if ws.closed is not None and ws.closed.code != 1000:
                        ended = _ConnectionEnded(ws.closed.code, ws.closed.reason)
                    elif ended is None:
                        ended = _ConnectionEnded(None, "connection ended")
        except ConnectionRejected as error:
            status = error.status_code
            if status in (401, 403):
                raise _ConnectionEnded(4001 if status == 401 else 4003, f"HTTP {status}") from None
            raise _ConnectionEnded(None, f"handshake rejected: HTTP {status}") from None
        except HandshakeError as error:
            raise _ConnectionEnded(None, f"handshake failed: {error!r}") from None
        except ConnectionClosed as error:
            raise _ended_from(error) from None
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as error:
            raise _ConnectionEnded(None, repr(error)) from None
        finally:
            self._ws = None
            if self._ready.is_set():
                self._ready = trio.Event()
                self._state_changed()
            for reply in self._replies.values():
                reply.done.set()
            self._replies.clear()
        raise ended

    async def _session(
        self, ws: WebSocketConnection, token: str, on_ready: Callable[[], None]
    ) -> None:
        welcome = None
        with trio.move_on_after(CONNECT_TIMEOUT_S):
            welcome = _decode(await ws.get_message())
        if welcome is None or welcome.get("type") != "welcome":
            raise _ConnectionEnded(None, f"expected a welcome frame, got {welcome!r}")
        interval = _positive_float(welcome.get("heartbeat_interval"), 30.0)
        self._connects += 1
        self._ws = ws
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._reader, ws, interval)
                nursery.start_soon(self._pinger, ws, interval)
                channels = list(self._channels)
                if channels:
                    since = {c: self._offsets[c] for c in channels if c in self._offsets}
                    with trio.move_on_after(REPLY_TIMEOUT_S) as timeout:
                        await self._request(
                            ws, self._subscribe_frame(channels, since), "subscribed", channels
                        )
                    if timeout.cancelled_caught:
                        raise _ConnectionEnded(None, "no reply to subscribe")
                self._ready.set()
                on_ready()
                self._state_changed()
                if self._provider is not None:
                    nursery.start_soon(self._refresher, ws, token)
        except BaseExceptionGroup as group:
            ended = _connection_outcome(group)
            if ended is None:
                raise
            raise ended from None

    async def _reader(self, ws: WebSocketConnection, interval: float) -> None:
        idle_timeout = interval * DEAD_AFTER_INTERVALS + REPLY_TIMEOUT_S
        while True:
            with trio.move_on_after(idle_timeout):
                try:
                    message = await ws.get_message()
                except ConnectionClosed as error:
                    raise _ended_from(error) from None
                await self._dispatch(message)
                continue
            raise _ConnectionEnded(None, f"no frame for {idle_timeout:.0f}s")

    async def _pinger(self, ws: WebSocketConnection, interval: float) -> None:
        ping = json.dumps({"type": "ping"})
        while True:
            await trio.sleep(interval)
            try:
                await self._send(ws, ping)
            except ConnectionClosed:
                return  # the reader reports why

    async def _refresher(self, ws: WebSocketConnection, token: str) -> None:
        assert self._provider is not None
        current = token
        while True:
            expiry = token_expiry(current)
            if expiry is None:
                return
            await trio.sleep(max(0.0, expiry - self._refresh_margin_s - time.time()))
            try:
                fresh = await self._provider()
            except HubAuthError as error:
                log.warning("token refresh refused: %s; the server will close at expiry", error)
                return
            except Exception as error:
                log.warning("token provider failed: %r; retrying", error)
                fresh = current
            if fresh == current:
                # Nothing new yet: ask again a little later, until the token expires (then
                # the server closes with 4010 and the reconnect asks the provider again).
                remaining = expiry - time.time()
                if remaining <= 0:
                    return
                await trio.sleep(min(TOKEN_RETRY_S, remaining))
                continue
            reply = None
            with trio.move_on_after(REPLY_TIMEOUT_S):
                try:
                    reply = await self._request(
                        ws, {"type": "refresh", "token": fresh}, "refreshed"
                    )
                except ConnectionClosed:
                    return
            self._token = fresh
            if reply is not None and reply.error is None and reply.frame is not None:
                self._token_refreshes += 1
                self._state_changed()
                current = fresh
            else:
                log.warning("in-band refresh failed: %r", reply.error if reply else "timeout")
                return

    # ----------------------------------------------------------------- frames

    def _subscribe_frame(self, channels: list[str], since: Mapping[str, str] | None) -> JsonObject:
        frame: JsonObject = {"type": "subscribe", "channels": channels}
        if since:
            frame["since"] = dict(since)
        return frame

    async def _send(self, ws: WebSocketConnection, frame: JsonObject | str) -> None:
        text = frame if isinstance(frame, str) else json.dumps(frame, separators=(",", ":"))
        await ws.send_message(text)

    def _register(self, expect: str, channels: Iterable[str] = ()) -> str:
        request_id = f"c{next(self._ids)}"
        self._replies[request_id] = _Reply(expect, channels)
        return request_id

    async def _request(
        self,
        ws: WebSocketConnection,
        frame: JsonObject,
        expect: str,
        channels: Iterable[str] = (),
    ) -> _Reply:
        request_id = self._register(expect, channels)
        reply = self._replies[request_id]
        try:
            await self._send(ws, {**frame, "id": request_id})
            await reply.done.wait()
        finally:
            self._replies.pop(request_id, None)
        return reply

    def _reply_for(self, frame: JsonObject, expect: str | None) -> _Reply | None:
        request_id = frame.get("id")
        if request_id is not None:
            return self._replies.get(str(request_id))
        if expect is None:
            return None
        for reply in self._replies.values():  # servers that do not echo ids: oldest first
            if reply.expect == expect and not reply.done.is_set():
                return reply
        return None

    async def _dispatch(self, message: str | bytes) -> None:
        frame = _decode(message)
        if frame is None:
            self._bad_frames += 1
            log.warning("ignored a frame that is not a JSON object")
            return
        kind = frame.get("type")
        if kind == "notification":
            await self._on_notification(frame)
        elif kind == "subscribed":
            await self._on_subscribed(frame)
        elif kind in ("unsubscribed", "refreshed"):
            reply = self._reply_for(frame, kind)
            if reply is not None:
                reply.frame = frame
                reply.done.set()
        elif kind == "error":
            self._on_error(frame)
        elif kind in ("pong", "welcome"):
            pass
        else:
            log.debug("ignored frame type %r", kind)

    async def _on_notification(self, frame: JsonObject) -> None:
        channel, offset, data = frame.get("channel"), frame.get("offset"), frame.get("data")
        if not isinstance(channel, str) or not isinstance(offset, str):
            self._bad_frames += 1
            return
        if channel not in self._channels:
            return  # unsubscribed meanwhile
        if compare_offsets(offset, self._offsets.get(channel)) <= 0:
            self._duplicates += 1
            return
        self._offsets[channel] = offset
        note = Notification(channel, offset, data if isinstance(data, dict) else {"value": data})
        try:
            await self._send_notes.send(note)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass  # the client is closing

    async def _on_subscribed(self, frame: JsonObject) -> None:
        reply = self._reply_for(frame, "subscribed")
        channels = [c for c in frame.get("channels", []) if isinstance(c, str)]
        recovered_map = frame.get("recovered")
        recovered: dict[str, bool] = (
            {str(k): bool(v) for k, v in recovered_map.items()}
            if isinstance(recovered_map, dict)
            else {}
        )
        # Servers may report the channel's current position; adopting it lets a later
        # reconnect recover messages published before this channel's first notification.
        positions = frame.get("offsets")
        if isinstance(positions, dict):
            for channel, offset in positions.items():
                if (
                    isinstance(offset, str)
                    and channel in self._channels
                    and compare_offsets(offset, self._offsets.get(channel)) > 0
                    and channel not in recovered  # a replay follows; keep the asked offset
                ):
                    self._offsets[channel] = offset
        for channel in channels:
            for waiter in self._waiters:
                waiter.settle(channel, ok=True, recovered=recovered.get(channel))
        if reply is not None:
            reply.frame = frame
            reply.done.set()
        for channel, ok in recovered.items():
            if not ok:
                await self._recovery_failed(channel)

    async def _recovery_failed(self, channel: str) -> None:
        self._recovery_failures += 1
        self._state_changed()
        event = RecoveryFailed(channel, self._offsets.get(channel, ""))
        log.info("history no longer covers %s since %s", channel, event.since)
        if self._on_recovery_failed is not None:
            result = self._on_recovery_failed(event)
            if result is not None:
                await result

    def _on_error(self, frame: JsonObject) -> None:
        code, channel = frame.get("code"), frame.get("channel")
        if code in ("FORBIDDEN", "VALIDATION_ERROR") and isinstance(channel, str):
            self._channels.pop(channel, None)
            self._offsets.pop(channel, None)
            for waiter in self._waiters:
                waiter.settle(channel, ok=False)
            reply = self._reply_for(frame, None)
            if reply is not None:
                reply.forbidden.append(channel)
            return
        reply = self._reply_for(frame, None)
        if reply is None:
            log.warning("hub error frame: %s", frame)
            return
        reply.error = frame
        reply.done.set()
        if reply.expect == "subscribed":
            # The whole request failed (e.g. LIMIT_EXCEEDED): drop its channels.
            log.warning("subscribe refused: %s", frame)
            for channel in reply.channels:
                self._channels.pop(channel, None)
                for waiter in self._waiters:
                    waiter.settle(channel, ok=False)

    # ----------------------------------------------------------------- stopping

    def _stop(self, error: HubClientError | None) -> None:
        if self._stopped.is_set():
            return
        self._terminal = error
        self._stopped.set()
        self._state_changed()
        self._send_notes.close()
        for waiter in self._waiters:
            waiter.done.set()

    def _state_changed(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _raise_if_stopped(self) -> None:
        if self._stopped.is_set():
            raise self._terminal or HubClientError("client closed")


async def _set_then_cancel(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


def _leaves(error: BaseException) -> Iterable[BaseException]:
    if isinstance(error, BaseExceptionGroup):
        for inner in error.exceptions:
            yield from _leaves(inner)
    else:
        yield error


def _connection_outcome(group: BaseExceptionGroup[BaseException]) -> _ConnectionEnded | None:
    """The reason a connection ended, if every error in ``group`` is such a reason."""
    leaves = list(_leaves(group))
    if not leaves or not all(isinstance(e, _ConnectionEnded | ConnectionClosed) for e in leaves):
        return None
    reasons = [e if isinstance(e, _ConnectionEnded) else _ended_from(e) for e in leaves]  # type: ignore[arg-type]
    return next((r for r in reasons if r.code is not None), reasons[0])


def _ended_from(error: ConnectionClosed) -> _ConnectionEnded:
    reason = error.reason
    if reason is None:
        return _ConnectionEnded(None, "connection closed")
    return _ConnectionEnded(reason.code, reason.reason)


def _decode(message: str | bytes) -> JsonObject | None:
    try:
        frame = json.loads(message)
    except (ValueError, UnicodeDecodeError):
        return None
    return frame if isinstance(frame, dict) else None


def _positive_float(value: object, default: float) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
        return float(value)
    return default


def _websocket_url(url: str) -> str:
    parts = urlsplit(url)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    if scheme not in ("ws", "wss"):
        raise ValueError(f"not a ws:// or wss:// URL: {url!r}")
    path = parts.path if parts.path not in ("", "/") else DEFAULT_WS_PATH
    return urlunsplit((scheme, parts.netloc, path, parts.query, ""))


def _with_query(url: str, **params: str) -> str:
    parts = urlsplit(url)
    query = "&".join(q for q in (parts.query, urlencode(params)) if q)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, query, ""))


@asynccontextmanager
async def open_hub_client(
    url: str,
    *,
    token: str | None = None,
    token_provider: TokenProvider | None = None,
    channels: Iterable[str] = (),
    wait_connected: bool = True,
    **options: Any,
) -> AsyncIterator[HubClient]:
    """Open a :class:`HubClient` whose connection is owned by this context manager.

    Args:
        url: ``ws://host:port`` or the full WebSocket URL.
        token: access token for the first connection.
        token_provider: ``async () -> str``; see :class:`HubClient`.
        channels: channels to subscribe to.
        wait_connected: return only once the first connection is subscribed (the default).
            Connection failures before that are retried with backoff; a terminal close
            (e.g. 4001 with no provider) is raised here.
        **options: other :class:`HubClient` arguments (``on_recovery_failed``, ``since`` …).

    Resource handling:
        Leaving the block closes the connection with 1000 (bounded) and stops the
        background tasks. Exceptions raised inside the block propagate unchanged.
    """
    client = HubClient(
        url, token=token, token_provider=token_provider, channels=channels, **options
    )
    try:
        async with trio.open_nursery() as nursery:
            if wait_connected:
                await nursery.start(client.run)
            else:
                nursery.start_soon(client.run)
            try:
                yield client
            finally:
                await client.aclose()
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # ``run`` never raises once started, so a lone error here is the caller's own (or
        # the first connection's): re-raise it unwrapped, keeping its original context.
        if len(group.exceptions) != 1:
            raise
        error = group.exceptions[0]
        context = error.__context__
        try:
            raise error
        finally:
            error.__context__ = context
            del error, context
