"""The realtime core of a node: WebSocket upgrades, publishing, drain and statistics.

:func:`open_realtime` builds the node's :class:`~actors.hub.Hub`, opens the broker with
the hub as its event handler, starts the supervised janitor and listens for token
revocations. The front door hands every ``GET /ws/notifications`` upgrade to
:meth:`Realtime.handle_websocket`; REST (and later RabbitMQ) publish through
:meth:`Realtime.publish`.

Revocations (logout, account deletion) made on this node are announced to the other
nodes on the broker's control channel (:meth:`Realtime.announce_revocation`); each node
applies the others' announcements to its revocation list, which closes the sockets at
once. The storage poll of the revocation list stays the safety net (announcements are
at most once).
"""

from __future__ import annotations

import json
import logging
import secrets
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from http import HTTPStatus
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

import trio
from wsproto import ConnectionType
from wsproto.events import AcceptConnection, RejectConnection, Request
from wsproto.extensions import Extension, PerMessageDeflate
from wsproto.frame_protocol import FrameProtocol
from wsproto.handshake import H11Handshake
from wsproto.utilities import RemoteProtocolError

from actors import protocol
from actors.admission import Admission
from actors.channel import FanoutBatch
from actors.close_codes import CloseCode
from actors.connection import Authenticator, ConnectionActor, ConnectionLimits
from actors.hub import Hub
from api.auth.tokens import TokenError
from api.envelope import utc_now_iso
from bridge.broker import BrokerUnavailable, open_broker
from hub.supervisor import supervise

if TYPE_CHECKING:
    from api.auth.revocations import RevocationKind, Revocations
    from api.auth.tokens import AccessClaims
    from bridge.broker import Broker
    from hub.node import Node
    from hub.settings import Settings

log = logging.getLogger("hub.realtime")

#: Seconds to send the 101 (or 400) answer of the handshake.
HANDSHAKE_SEND_TIMEOUT_S = 5.0
#: Seconds :meth:`Realtime.drain` waits for connections to finish their close
#: handshake before it aborts the rest.
DRAIN_TIMEOUT_S = 5.0
#: Seconds a drain waits for the channels' fan-out backlogs to reach the sockets.
SWEEP_DRAIN_TIMEOUT_S = 1.0
#: Seconds to wait for aborted connections to be gone.
ABORT_TIMEOUT_S = 1.0
#: Random bytes in a connection id (hex-encoded).
CONNECTION_ID_BYTES = 8
#: ``type`` of the control message announcing a revocation to the other nodes.
REVOKE_CONTROL_TYPE = "revoke"


class PublishError(ValueError):
    """A publish request the hub refuses (bad channel, data that is not JSON)."""

    def __init__(self, message: str, *, field: str) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


@dataclass(frozen=True, slots=True)
class PublishResult:
    """The answer to a publish: the message id and its offset on each channel."""

    id: str
    offsets: dict[str, str]


@dataclass(frozen=True, slots=True)
class _Upgrade:
    sock: socket.socket
    frames: FrameProtocol
    token: str | None
    origin: str | None


class Realtime:
    """The node's realtime core (see the module docstring).

    Args:
        settings: the node's settings.
        hub: the node's registry (already connected to ``broker``).
        broker: where publications go and history comes from.
        authenticate: checks an access token (sync, no I/O), raising ``TokenError``.
    """

    def __init__(
        self, settings: Settings, hub: Hub, broker: Broker, authenticate: Authenticator
    ) -> None:
        self._settings = settings
        self._hub = hub
        self._broker = broker
        self._authenticate = authenticate
        self._limits = ConnectionLimits.from_settings(settings)
        self._allowed_origins = {_norm_origin(o) for o in settings.allowed_origins}
        self.handshake_failures = 0
        #: Refuses upgrades (503) when the node is full; the node gives it its descriptor
        #: budget when it starts serving (actors/admission.py).
        self.admission = Admission(max_connections=settings.ws_max_connections)
        #: Awaited with ``(event, message id, data)`` for each published message that has
        #: an ``event`` (the webhook dispatcher sets it; see actors/webhook_dispatcher.py).
        self.event_hook: Callable[[str, str, dict[str, Any]], Awaitable[None]] | None = None

    def fanout_batch(self) -> FanoutBatch:
        """A context manager for publishing many messages at once: while it is open,
        small channels write each subscriber once, when it closes, instead of once per
        message (:class:`~actors.channel.FanoutBatch`)."""
        return self._hub.fanout_batch

    @property
    def hub(self) -> Hub:
        """The node's registry of connections and channels (metrics, tests)."""
        return self._hub

    # -- WebSocket ---------------------------------------------------------------------
    async def handle_websocket(self, stream: trio.SocketStream, head: bytes) -> None:
        """Serve one ``GET /ws/notifications`` upgrade until the connection closes.

        ``head`` holds every byte read from ``stream`` so far (the request head and
        possibly the first frames). When the node is full (``WS_MAX_CONNECTIONS``) or
        short of file descriptors (``FD_RESERVE``), the upgrade is answered HTTP 503 with
        the error envelope and ``Retry-After`` before any handshake (:attr:`admission`).
        A malformed upgrade gets an HTTP 400; anything else is upgraded first and then,
        when the origin, the token or the node's state says no, closed with 4003, 4001
        or 1001 (browsers cannot read an HTTP status on a failed WebSocket).

        Backpressure:
            A refusal is one write of a few hundred bytes (at most
            :data:`HANDSHAKE_SEND_TIMEOUT_S`); established connections are not touched.

        Cancellation:
            Cancelling this call aborts the connection (no close handshake).
        """
        counted = not self._hub.draining  # a draining node refuses after the upgrade (1001)
        if counted:
            refusal = self.admission.admit()
            if refusal is not None:
                await _send_and_close(stream, self.admission.answer(refusal, head))
                return
        try:
            conn = await self._accept(stream, head)
            del stream, head  # keep nothing of the handshake alive for the connection's life
            if conn is not None:
                await conn.run()
        finally:
            if counted:
                self.admission.release()

    async def _accept(self, stream: trio.SocketStream, head: bytes) -> ConnectionActor | None:
        """Upgrade, then build the connection's actor: registered when accepted, or
        already closing (1001, 4003, 4001) when refused."""
        upgrade = await self._upgrade(stream, head)
        if upgrade is None:
            return None
        claims: AccessClaims | None = None
        refuse: CloseCode | None = None
        if self._hub.draining:
            refuse = CloseCode.GOING_AWAY
        elif not self._origin_allowed(upgrade.origin):
            refuse = CloseCode.FORBIDDEN_ORIGIN
        elif upgrade.token is None:
            refuse = CloseCode.UNAUTHORIZED
        else:
            try:
                claims = self._authenticate(upgrade.token)
            except TokenError:
                refuse = CloseCode.UNAUTHORIZED
        conn = ConnectionActor(
            upgrade.sock,
            upgrade.frames,
            hub=self._hub,
            limits=self._limits,
            authenticate=self._authenticate,
            claims=claims,
            connection_id=secrets.token_hex(CONNECTION_ID_BYTES),
        )
        if refuse is not None:
            conn.close_soon(refuse)
        else:
            # No checkpoint since authenticate(): a revocation cannot slip in between.
            self._hub.add_connection(conn)
        return conn

    async def _upgrade(self, stream: trio.SocketStream, head: bytes) -> _Upgrade | None:
        """Complete the HTTP side of the handshake and take the raw socket over; answer
        a malformed upgrade with an HTTP error and return ``None``."""
        end = head.find(b"\r\n\r\n")
        handshake = H11Handshake(ConnectionType.SERVER)
        request: Request | None = None
        reject = RejectConnection(status_code=400)
        if end >= 0:
            try:
                handshake.receive_data(head[: end + 4])
                request = next((e for e in handshake.events() if isinstance(e, Request)), None)
            except RemoteProtocolError as exc:
                if isinstance(exc.event_hint, RejectConnection):
                    reject = exc.event_hint
        if request is None:
            self.handshake_failures += 1
            await _send_and_close(stream, _http_error(reject))
            return None
        headers = dict(request.extra_headers)
        extensions: list[Extension] = []
        if self._settings.ws_allow_deflate and any(
            str(offer).split(";", 1)[0].strip().lower() == "permessage-deflate"
            for offer in request.extensions
        ):
            extensions.append(PerMessageDeflate())
        reply = handshake.send(AcceptConnection(extensions=extensions))
        sent = False
        with trio.move_on_after(HANDSHAKE_SEND_TIMEOUT_S):
            try:
                await stream.send_all(reply)
                sent = True
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
        if not sent:
            self.handshake_failures += 1
            await _send_and_close(stream, b"")
            return None
        # Only wsproto's frame parser is kept (with the extensions the handshake
        # accepted); the h11 handshake state is dropped.
        frames = FrameProtocol(client=False, extensions=extensions)
        if len(head) > end + 4:
            frames.receive_bytes(head[end + 4 :])
        # Take the socket from trio's stream: from here the actor drives it directly
        # (non-blocking send/recv plus trio.lowlevel.wait_*).
        sock = socket.socket(fileno=stream.socket.detach())
        sock.setblocking(False)
        return _Upgrade(sock, frames, _token(headers, request.target), _origin(headers))

    def _origin_allowed(self, origin: str | None) -> bool:
        """Any origin when ``ALLOWED_ORIGINS`` is empty or lists ``*``; a request with
        no ``Origin`` header (not a browser) is allowed too."""
        if not self._allowed_origins or "*" in self._allowed_origins or origin is None:
            return True
        return _norm_origin(origin) in self._allowed_origins

    async def drain(self) -> None:
        """Close every WebSocket with 1001 and return once all are gone.

        New upgrades are refused with 1001 from now on. Publications already accepted
        are first written to the sockets (at most :data:`SWEEP_DRAIN_TIMEOUT_S`).
        Connections that do not finish their close handshake within
        :data:`DRAIN_TIMEOUT_S` are aborted.
        """
        hub = self._hub
        hub.draining = True
        with trio.move_on_after(SWEEP_DRAIN_TIMEOUT_S):
            await hub.wait_swept()  # what was accepted reaches the sockets first
        hub.close_all(CloseCode.GOING_AWAY)
        with trio.move_on_after(DRAIN_TIMEOUT_S):
            await hub.wait_empty()
            return
        log.warning("aborting %d websockets that did not close in time", len(hub.connections))
        hub.abort_all()
        with trio.move_on_after(ABORT_TIMEOUT_S):
            await hub.wait_empty()

    # -- publishing --------------------------------------------------------------------
    async def publish(
        self,
        channels: Sequence[str],
        data: Mapping[str, Any],
        *,
        event: str | None = None,
        id: str | None = None,
    ) -> PublishResult:
        """Publish one message to one or more channels.

        Fills ``data.id`` (the message id) and ``data.timestamp`` (UTC, ISO 8601) when
        missing, gives the message an offset on every channel, keeps it in each
        channel's history and delivers it to every subscriber.

        Args:
            channels: channel names, or one name (duplicates are ignored); each must be
                one someone may subscribe to (``global``, ``public.*``, ``user.<id>``,
                ``admin``, ``admin.*``).
            data: the notification's JSON object.
            event: optional event name (sent with the notification, used by webhooks).
            id: optional message id; a repeated id on a channel within ten minutes is
                published once (the first offset is returned again).

        Raises:
            PublishError: a bad channel or data that cannot be encoded as JSON.
            BrokerUnavailable: the broker (Redis) is unreachable; the message may have
                been published on some channels: retry with the same ``id``.
            Exception: whatever :attr:`event_hook` raised (after delivery; a retry with
                the same ``id`` is not delivered twice).
        """
        names = list(dict.fromkeys([channels] if isinstance(channels, str) else channels))
        if not names:
            raise PublishError("at least one channel is required", field="channels")
        bad = [name for name in names if not protocol.is_known_channel(name)]
        if bad:
            raise PublishError(
                f"not a channel anyone can subscribe to: {', '.join(bad[:5])}", field="channels"
            )
        if type(data) is not dict and not isinstance(data, Mapping):  # the ABC check is slow
            raise PublishError("data must be a JSON object", field="data")
        message_id = id or str(uuid.uuid4())
        body_data = dict(data)
        body_data.setdefault("id", message_id)
        if "timestamp" not in body_data:
            body_data["timestamp"] = utc_now_iso()
        try:
            body = protocol.message_body(body_data, event)
        except (TypeError, ValueError) as exc:
            raise PublishError(f"data is not valid JSON: {exc}", field="data") from None
        await self._hub.wait_fanout_room(names)
        offsets = await self._publish_all(names, body, id)
        if event is not None and self.event_hook is not None:
            await self.event_hook(event, message_id, body_data)
        return PublishResult(message_id, offsets)

    async def _publish_all(
        self, names: list[str], body: bytes, message_id: str | None
    ) -> dict[str, str]:
        """Publish ``body`` on every channel of ``names`` (concurrently when the broker
        gains by it: the Redis client pipelines the calls into one write) and return the
        offsets in ``names`` order.

        Each channel gets exactly one publish, so per-channel order is the callers' order.
        Every channel is attempted even when another fails; then the first failure is
        raised (a retry with the same ``message_id`` publishes only what was missed).
        """
        broker = self._broker
        if len(names) == 1:
            return {names[0]: await broker.publish(names[0], body, message_id=message_id)}
        offsets: dict[str, str] = {}
        errors: list[Exception] = []

        async def publish_one(name: str) -> None:
            try:
                offsets[name] = await broker.publish(name, body, message_id=message_id)
            except Exception as error:  # raised below, once every channel was tried
                errors.append(error)

        if broker.concurrent_publishes:
            async with trio.open_nursery() as nursery:
                for name in names:
                    nursery.start_soon(publish_one, name)
        else:  # one after another: a task per channel would cost more than the publish
            for name in names:
                await publish_one(name)
        if errors:
            raise errors[0]
        return {name: offsets[name] for name in names}

    # -- revocations across nodes ------------------------------------------------------
    async def announce_revocation(self, kind: RevocationKind, ident: str, ts: float) -> None:
        """Tell the other nodes that session or user ``ident`` was revoked here, so they
        refuse its tokens and close its sockets now rather than at their next storage
        poll. Call it after revoking locally (``revoke_session(ident, ts)`` or
        ``revoke_user(ident, ts)``, the same ``ts``).

        Best effort: when the broker is unreachable it logs and returns (the storage
        poll of every node picks the revocation up within a few seconds).
        """
        message = {
            "type": REVOKE_CONTROL_TYPE,
            "kind": kind,
            "id": ident,
            "ts": ts,
            "node": self._settings.hub_node_id,
        }
        try:
            await self._broker.publish_control(json.dumps(message).encode())
        except BrokerUnavailable as error:
            log.warning(
                "could not announce a %s revocation to the other nodes (%s); "
                "they pick it up from storage",
                kind,
                error,
            )

    def stats(self) -> dict[str, Any]:
        """Counters for ``/metrics`` and tests."""
        return {
            **self._hub.statistics(),
            "handshake_failures": self.handshake_failures,
            "broker": self._broker.statistics(),
        }


def _http_error(reject: RejectConnection) -> bytes:
    """A minimal ``Connection: close`` HTTP error answer for a refused upgrade."""
    status = reject.status_code
    lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}".encode()]
    lines += [name + b": " + value for name, value in reject.headers]
    lines += [b"Content-Length: 0", b"Connection: close", b"", b""]
    return b"\r\n".join(lines)


async def _send_and_close(stream: trio.SocketStream, data: bytes) -> None:
    with trio.move_on_after(HANDSHAKE_SEND_TIMEOUT_S):
        try:
            if data:
                await stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
    with trio.move_on_after(HANDSHAKE_SEND_TIMEOUT_S):
        await stream.aclose()


def _token(headers: Mapping[bytes, bytes], target: str) -> str | None:
    """The bearer token from ``Authorization``, else from ``?token=``."""
    auth = headers.get(b"authorization", b"")
    if auth[:7].lower() == b"bearer ":
        token = auth[7:].strip().decode("latin-1")
        return token or None
    query = target.partition("?")[2]
    values = parse_qs(query).get("token") if query else None
    return values[0] if values and values[0] else None


def _origin(headers: Mapping[bytes, bytes]) -> str | None:
    value = headers.get(b"origin")
    return value.decode("latin-1") if value is not None else None


def _norm_origin(origin: str) -> str:
    return origin.strip().rstrip("/").lower()


def _revocation_applier(node_id: str, revocations: Revocations) -> Callable[[bytes], None]:
    """The control callback that applies revocations announced by other nodes
    (:meth:`Realtime.announce_revocation`) to this node's revocation list.

    Messages from this node are skipped (already applied), and the revocation list's own
    listeners never announce, so nodes cannot echo each other's announcements.
    """

    def on_control(payload: bytes) -> None:
        try:
            message = json.loads(payload)
        except ValueError:
            log.warning("malformed control message ignored")
            return
        if not isinstance(message, dict) or message.get("type") != REVOKE_CONTROL_TYPE:
            return  # another kind of node-wide event
        if message.get("node") == node_id:
            return
        kind, ident, ts = message.get("kind"), message.get("id"), message.get("ts")
        if (
            not isinstance(ident, str)
            or not ident
            or not isinstance(ts, int | float)
            or isinstance(ts, bool)
        ):
            log.warning("malformed revocation announcement ignored")
            return
        if kind == "session":
            revocations.revoke_session(ident, float(ts))
        elif kind == "user":
            revocations.revoke_user(ident, float(ts))
        else:
            log.warning("revocation announcement of unknown kind %r ignored", kind)

    return on_control


@asynccontextmanager
async def open_realtime(node: Node) -> AsyncIterator[Realtime]:
    """Start the node's realtime core and yield it.

    With ``REDIS_URL`` the broker is the Redis one (keys under ``node.redis_prefix``),
    and it becomes the node's ``redis`` readiness check (it replaces the account
    services' weaker one: both connections up and Redis answering).

    Resource handling:
        Owns the broker, the hub's janitor (supervised: restarted with backoff when it
        crashes) and the revocation subscriptions (local listener and the broker's
        control channel). Connections are owned by the front door's tasks; leaving the
        block aborts any still open.
    """
    hub = Hub()
    hub.on_fanout = node.metrics.observe_fanout
    async with open_broker(node.settings, hub, redis_prefix=node.redis_prefix) as broker:
        hub.broker = broker
        if node.settings.redis_url:
            node.ready_checks["redis"] = broker.ping
        realtime = Realtime(node.settings, hub, broker, node.services.authenticate)
        revocations = node.services.revocations

        def on_revocation(kind: str, ident: str) -> None:
            # Never announce from here: nodes would echo each other's announcements.
            hub.close_revoked(kind, ident, revocations.is_revoked)

        broker.subscribe_control(_revocation_applier(node.settings.hub_node_id, revocations))
        unsubscribe: Callable[[], None] = revocations.subscribe(on_revocation)
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(supervise, "realtime-janitor", hub.run_janitor)
                hub.nursery = nursery
                try:
                    yield realtime
                finally:
                    hub.nursery = None
                    hub.abort_all()
                    nursery.cancel_scope.cancel()
        finally:
            unsubscribe()
