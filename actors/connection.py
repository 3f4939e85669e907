"""The connection actor: one per accepted WebSocket, owning its socket and its state.

Writes follow design "(b+)" of research/spike-fanout.md: every outgoing frame (a
notification from the fan-out, a reply, an error, the close frame) goes through
:meth:`ConnectionActor._write`, which sends directly with a non-blocking ``send()`` while
nothing is pending, and otherwise appends to a bounded per-connection queue drained by a
writer task that coalesces everything queued into one ``sendmsg``. So frames are never
reordered or interleaved, the fan-out never awaits per subscriber, and a connection with
nothing pending has no writer task at all.

Incoming frames are parsed by wsproto (after the handshake only its frame parser is
kept). The heartbeat watchdog is the deadline of the reader's cancel scope: every
received chunk moves it to ``now + HEARTBEAT_TIMEOUT``, and it is also capped by the
token's expiry, so one timer serves both 4008 and 4010.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from itertools import islice
from typing import TYPE_CHECKING

import trio
from wsproto.frame_protocol import Opcode, ParseFailed

from actors import protocol
from actors.close_codes import CLOSE_INFO, CloseCode, ErrorCode
from actors.wsframes import close_frame, pong_frame, text_frame
from api.auth.tokens import TokenError

if TYPE_CHECKING:
    import socket

    from wsproto.frame_protocol import Frame, FrameProtocol

    from actors.channel import ChannelActor
    from actors.hub import Hub
    from api.auth.tokens import AccessClaims
    from hub.settings import Settings

log = logging.getLogger("hub.realtime.connection")

#: Bytes asked of the kernel per ``recv``.
RECV_BYTES = 16 * 1024
#: Most queued frames handed to one ``sendmsg`` (below every platform's IOV_MAX).
WRITE_BATCH_FRAMES = 256
#: Seconds a closing connection gets to flush its queue, send the close frame and hear
#: the peer's close frame before the socket is closed regardless.
CLOSE_TIMEOUT_S = 3.0
#: Close code recorded (never sent) when the peer vanished without a close frame.
ABNORMAL_CLOSURE = 1006
#: The heartbeat deadline moves only when it would move by at least this fraction of
#: the timeout (at most one second), so a chatty client does not churn trio's timers.
HEARTBEAT_SLACK_FRACTION = 0.05
HEARTBEAT_SLACK_MAX_S = 1.0

Authenticator = Callable[[str], "AccessClaims"]


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """Per-connection limits, shared by every connection of the node."""

    heartbeat_interval_s: float
    heartbeat_timeout_s: float
    heartbeat_slack_s: float
    max_message_bytes: int
    send_queue_bytes: int
    max_channels: int

    @classmethod
    def from_settings(cls, settings: Settings) -> ConnectionLimits:
        return cls(
            heartbeat_interval_s=settings.heartbeat_interval,
            heartbeat_timeout_s=settings.heartbeat_timeout,
            heartbeat_slack_s=min(
                HEARTBEAT_SLACK_MAX_S, settings.heartbeat_timeout * HEARTBEAT_SLACK_FRACTION
            ),
            max_message_bytes=settings.ws_max_frame_bytes,
            send_queue_bytes=settings.ws_send_queue_bytes,
            max_channels=settings.ws_max_channels,
        )


def _utf8_len(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


class ConnectionActor:
    """One WebSocket client: its socket, subscriptions, token and send queue.

    The actor's task is the one :meth:`run` is awaited in (the front door's connection
    task); it reads and handles client frames one at a time. A writer task is started
    in the actor's own nursery only while frames are queued.

    Mailbox:
        None for client frames: they are read from the socket by the actor itself, so
        TCP is the backpressure. Other actors talk to it through two direct,
        non-blocking calls: :meth:`send_frame` (append a frame to the ordered output)
        and :meth:`close_soon` (ask it to close with a code).

    Backpressure:
        Outgoing bytes that the kernel does not take at once wait in a queue bounded
        by ``WS_SEND_QUEUE_BYTES``; when it would overflow, queued frames are dropped
        and the connection is closed with 4009 (slow consumer). Writers are never
        blocked by it. The reader's own replays wait for the queue to drain.

    Cancellation:
        :meth:`close_soon` cancels the reader's scope; the actor then sends its close
        frame and waits at most :data:`CLOSE_TIMEOUT_S` for the peer. :meth:`abort`
        cancels everything at once. Cancelling the task that runs :meth:`run` does the
        same as :meth:`abort`.

    Resource handling:
        The actor owns the socket and closes it when :meth:`run` returns, after removing
        itself from the hub (and so from every channel). A crash in the actor is logged
        and closes only this connection (1011 when a close frame can still be sent).
    """

    __slots__ = (
        "_authenticate",
        "_broken",
        "_close_code",
        "_close_reason",
        "_close_sent",
        "_closing",
        "_drained",
        "_frames",
        "_hb_deadline",
        "_head_offset",
        "_hub",
        "_limits",
        "_nursery",
        "_parts",
        "_parts_bytes",
        "_peer_closed",
        "_queue",
        "_queued",
        "_scope",
        "_sock",
        "_strikes",
        "_token_deadline",
        "_writer_running",
        "channels",
        "claims",
        "connection_id",
    )

    def __init__(
        self,
        sock: socket.socket,
        frames: FrameProtocol,
        *,
        hub: Hub,
        limits: ConnectionLimits,
        authenticate: Authenticator,
        claims: AccessClaims | None,
        connection_id: str,
    ) -> None:
        self._sock = sock
        self._frames = frames
        self._hub = hub
        self._limits = limits
        self._authenticate = authenticate
        self.claims = claims
        self.connection_id = connection_id
        self.channels: dict[str, ChannelActor] = {}
        self._queue: deque[bytes] | None = None
        self._queued = 0
        self._head_offset = 0
        self._writer_running = False
        self._drained: trio.Event | None = None
        self._nursery: trio.Nursery | None = None
        self._scope: trio.CancelScope | None = None
        self._closing = False
        self._close_code: int | None = None
        self._close_reason = ""
        self._close_sent = False
        self._peer_closed = False
        self._broken = False
        self._parts: list[str] | None = None
        self._parts_bytes = 0
        self._strikes = protocol.BadFrameCounter()
        self._hb_deadline = 0.0
        self._token_deadline = _token_deadline(claims) if claims is not None else 0.0

    @property
    def user_id(self) -> str:
        return self.claims.user_id if self.claims is not None else ""

    @property
    def session_id(self) -> str:
        return self.claims.session_id if self.claims is not None else ""

    @property
    def close_code(self) -> int | None:
        """The code the connection closed (or is closing) with, if any yet."""
        return self._close_code

    # -- what other actors call (non-blocking) -----------------------------------------
    def send_frame(self, frame: bytes) -> None:
        """Append an encoded frame to the ordered output; dropped once closing.

        Never blocks: the frame is written now if nothing is pending and the kernel
        takes it, else queued. Overflowing the queue closes the connection with 4009.
        """
        if not self._closing:
            self._write(frame)
        else:
            self._hub.dropped["closing"] += 1

    def close_soon(self, code: int, reason: str | None = None) -> None:
        """Ask the actor to close with ``code``. Idempotent: the first code wins."""
        if self._closing:
            return
        self._closing = True
        self._close_code = code
        if reason is None:
            try:
                reason = CLOSE_INFO[CloseCode(code)].reason
            except (ValueError, KeyError):
                reason = ""
        self._close_reason = reason
        if code == CloseCode.SLOW_CONSUMER:
            self._drop_queued()
        if self._scope is not None:
            self._scope.cancel()

    def abort(self) -> None:
        """Stop at once: no close handshake, the socket is closed."""
        if self._close_code is None:
            self._close_code = ABNORMAL_CLOSURE
        self._closing = True
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()
        elif self._scope is not None:
            self._scope.cancel()

    # -- the actor's life --------------------------------------------------------------
    async def run(self) -> None:
        """Serve the connection until it closes; always closes the socket."""
        log.debug(
            "websocket open",
            extra={"connection_id": self.connection_id, "user_id": self.user_id or None},
        )
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                if not self._closing:
                    assert self.claims is not None
                    self._write(
                        text_frame(
                            protocol.welcome(
                                self.connection_id,
                                self.claims.user_id,
                                self._limits.heartbeat_interval_s,
                            )
                        )
                    )
                    await self._serve()
                await self._finish()
                nursery.cancel_scope.cancel()
        except Exception:
            log.exception("connection actor crashed", extra={"connection_id": self.connection_id})
            if self._close_code is None:
                self._close_code = CloseCode.INTERNAL_ERROR
        finally:
            self._closing = True
            self._nursery = None
            self._queue = None
            self._hub.remove_connection(self, self._close_code)
            self._dispose_socket()
            log.debug(
                "websocket closed",
                extra={
                    "connection_id": self.connection_id,
                    "user_id": self.user_id or None,
                    "close_code": self._close_code,
                },
            )

    async def _serve(self) -> None:
        """Read and handle frames until a close is requested, the peer closes, or the
        deadline (heartbeat or token expiry) passes."""
        self._hb_deadline = trio.current_time() + self._limits.heartbeat_timeout_s
        with trio.CancelScope(deadline=min(self._hb_deadline, self._token_deadline)) as scope:
            self._scope = scope
            try:
                await self._read_loop()
            except Exception:
                log.exception(
                    "connection actor failed", extra={"connection_id": self.connection_id}
                )
                self._close_code = None
                self._closing = False
                self.close_soon(CloseCode.INTERNAL_ERROR)
        self._scope = None
        if not self._closing:  # the deadline passed
            if trio.current_time() >= self._token_deadline:
                self.close_soon(CloseCode.TOKEN_EXPIRED)
            else:
                self.close_soon(CloseCode.HEARTBEAT_TIMEOUT)

    async def _read_loop(self) -> None:
        sock = self._sock
        while True:
            if not await self._handle_frames():
                return
            await trio.lowlevel.wait_readable(sock)
            try:
                data = sock.recv(RECV_BYTES)
            except BlockingIOError:
                continue
            except OSError:
                self._lost()
                return
            if not data:
                self._lost()
                return
            self._heard()
            self._frames.receive_bytes(data)

    async def _handle_frames(self) -> bool:
        """Handle every complete frame received so far; False once closing."""
        try:
            for frame in self._frames.received_frames():
                opcode = frame.opcode
                if opcode is Opcode.TEXT:  # continuations carry the message's opcode
                    if not await self._on_text(frame):
                        return False
                elif opcode is Opcode.PING:
                    self.send_frame(pong_frame(bytes(frame.payload)))  # type: ignore[arg-type]
                elif opcode is Opcode.CLOSE:
                    self._on_peer_close(frame.payload)  # type: ignore[arg-type]
                    return False
                elif opcode is Opcode.BINARY:
                    self.close_soon(CloseCode.UNSUPPORTED_DATA)
                    return False
                # PONG: receiving it already fed the watchdog.
        except ParseFailed as exc:  # bad UTF-8 → 1007, bad framing → 1002
            self.close_soon(int(exc.code))
            return False
        return True

    def _heard(self) -> None:
        """Feed the heartbeat watchdog."""
        deadline = trio.current_time() + self._limits.heartbeat_timeout_s
        if deadline - self._hb_deadline >= self._limits.heartbeat_slack_s:
            self._hb_deadline = deadline
            if self._scope is not None:
                self._scope.deadline = min(deadline, self._token_deadline)

    def _on_peer_close(self, payload: tuple[int, str]) -> None:
        """The peer sent its close frame: echo its code (RFC 6455 §5.5.1) unless we were
        closing already."""
        self._peer_closed = True
        if not self._closing:
            code = payload[0] if payload[0] not in (1005, ABNORMAL_CLOSURE) else 1000
            self._closing = True
            self._close_code = int(code)
            self._close_reason = ""

    async def _finish(self) -> None:
        """Send the close frame after everything queued, then wait (bounded) for the
        queue to flush and for the peer's close frame."""
        if self._broken:
            return
        if not self._close_sent:
            self._close_sent = True
            self._write(close_frame(self._close_code or CloseCode.NORMAL, self._close_reason))
        with trio.move_on_after(CLOSE_TIMEOUT_S):
            await self._flushed()
            if not self._peer_closed and not self._broken:
                await self._await_peer_close()

    async def _await_peer_close(self) -> None:
        sock = self._sock
        while True:
            try:
                if any(f.opcode is Opcode.CLOSE for f in self._frames.received_frames()):
                    return
            except ParseFailed:
                return
            await trio.lowlevel.wait_readable(sock)
            try:
                data = sock.recv(RECV_BYTES)
            except BlockingIOError:
                continue
            except OSError:
                return
            if not data:
                return
            self._frames.receive_bytes(data)

    def _dispose_socket(self) -> None:
        sock = self._sock
        if sock.fileno() < 0:
            return
        trio.lowlevel.notify_closing(sock)
        sock.close()

    # -- client frames -----------------------------------------------------------------
    async def _on_text(self, frame: Frame) -> bool:
        """Collect a text message (wsproto hands over fragments and partial frames as
        they arrive) and handle it when complete. Returns False when closing."""
        limit = self._limits.max_message_bytes
        data = frame.payload
        assert isinstance(data, str)
        if self._parts is None:
            if frame.message_finished:
                if _utf8_len(data) > limit:
                    self.close_soon(CloseCode.MESSAGE_TOO_BIG)
                    return False
                return await self._on_message(data)
            self._parts = []
            self._parts_bytes = 0
        self._parts.append(data)
        self._parts_bytes += _utf8_len(data)
        if self._parts_bytes > limit:
            self.close_soon(CloseCode.MESSAGE_TOO_BIG)
            return False
        if not frame.message_finished:
            return True
        text = "".join(self._parts)
        self._parts = None
        return await self._on_message(text)

    async def _on_message(self, text: str) -> bool:
        try:
            frame = protocol.parse_client_frame(text)
        except protocol.FrameError as exc:
            return self._reject(ErrorCode.VALIDATION_ERROR, exc.message, exc.frame_id)
        if isinstance(frame, protocol.Subscribe):
            await self._subscribe(frame)
        elif isinstance(frame, protocol.Unsubscribe):
            for name in frame.channels:
                self._hub.leave(self, name)
            self.send_frame(text_frame(protocol.unsubscribed(frame.id, list(frame.channels))))
        elif isinstance(frame, protocol.Ping):
            self.send_frame(text_frame(protocol.pong(frame.id)))
        else:
            self._refresh(frame)
        return not self._closing

    def _reject(
        self, code: ErrorCode, message: str, frame_id: protocol.FrameId, channel: str | None = None
    ) -> bool:
        """Answer a bad frame with an error; close 1008 past the limit. Returns False
        when the connection is closing."""
        self.send_frame(text_frame(protocol.error(code, message, frame_id, channel=channel)))
        return self._strike()

    def _strike(self) -> bool:
        """Count one bad frame; close 1008 past the limit. False when closing."""
        if self._strikes.hit(trio.current_time()):
            self.close_soon(CloseCode.POLICY_VIOLATION)
            return False
        return True

    async def _subscribe(self, frame: protocol.Subscribe) -> None:
        claims = self.claims
        assert claims is not None
        hub = self._hub
        accepted: list[str] = []
        new: list[str] = []
        invalid = False
        for name in frame.channels:
            problem = protocol.check_subscription(name, claims.user_id, claims.is_admin)
            if problem is ErrorCode.VALIDATION_ERROR:
                invalid = True
                self.send_frame(
                    text_frame(
                        protocol.error(problem, "invalid channel name", frame.id, channel=name)
                    )
                )
            elif problem is ErrorCode.FORBIDDEN:
                self.send_frame(
                    text_frame(
                        protocol.error(
                            problem,
                            "not allowed to subscribe to this channel",
                            frame.id,
                            channel=name,
                        )
                    )
                )
            elif name in self.channels:
                accepted.append(name)  # already subscribed: idempotent, no replay
            elif len(self.channels) + len(new) >= self._limits.max_channels:
                self.send_frame(
                    text_frame(
                        protocol.error(
                            ErrorCode.LIMIT_EXCEEDED,
                            f"at most {self._limits.max_channels} channels per connection",
                            frame.id,
                            channel=name,
                        )
                    )
                )
            else:
                accepted.append(name)
                new.append(name)
        if invalid and not self._strike():  # a frame with bad names counts once
            return
        for name in new:
            actor = await hub.join(name)
            actor.begin_recovery(self)  # from here on, live publications are held
            self.channels[name] = actor
        histories = {name: await hub.broker.history(name, frame.since.get(name)) for name in new}
        recovered = (
            {name: histories[name].recovered for name in new if name in frame.since}
            if frame.since
            else None
        )
        positions = {name: histories[name].position for name in new}
        self.send_frame(text_frame(protocol.subscribed(frame.id, accepted, recovered, positions)))
        for name in new:
            actor = self.channels.get(name)
            if actor is None:
                continue
            for replay in actor.finish_recovery(self, histories[name]):
                self.send_frame(replay)
            await self._wait_send_room()

    def _refresh(self, frame: protocol.Refresh) -> None:
        assert self.claims is not None
        try:
            claims = self._authenticate(frame.token)
        except TokenError:
            self._reject(ErrorCode.UNAUTHORIZED, "token is invalid, expired or revoked", frame.id)
            return
        if claims.user_id != self.claims.user_id:
            self._reject(ErrorCode.UNAUTHORIZED, "token belongs to another user", frame.id)
            return
        old_session = self.claims.session_id
        self.claims = claims
        self._hub.reindex_session(self, old_session)
        self._token_deadline = _token_deadline(claims)
        if self._scope is not None:
            self._scope.deadline = min(self._hb_deadline, self._token_deadline)
        is_admin = claims.is_admin
        for name in list(self.channels):  # the role may have changed
            if not protocol.may_subscribe(name, claims.user_id, is_admin):
                self._hub.leave(self, name)
                self.send_frame(
                    text_frame(
                        protocol.error(
                            ErrorCode.FORBIDDEN,
                            "no longer allowed on this channel",
                            None,
                            channel=name,
                        )
                    )
                )
        self.send_frame(text_frame(protocol.refreshed(frame.id)))

    # -- the ordered output ------------------------------------------------------------
    def _write(self, frame: bytes) -> None:
        """Send now if nothing is pending, else queue; the one path every frame takes."""
        queue = self._queue
        if queue is None:
            if self._broken:
                return
            try:
                sent = self._sock.send(frame)
            except BlockingIOError:
                sent = 0
            except OSError:
                self._lost()
                return
            if sent == len(frame):
                return
            self._queue = deque((frame,))
            self._head_offset = sent
            self._queued = len(frame) - sent
            self._start_writer()
        else:
            queue.append(frame)
            self._queued += len(frame)
        if self._queued > self._limits.send_queue_bytes and not self._close_sent:
            self.close_soon(CloseCode.SLOW_CONSUMER)

    def _start_writer(self) -> None:
        if self._writer_running:
            return
        if self._nursery is None:
            self._lost()
            return
        self._writer_running = True
        self._nursery.start_soon(self._writer)

    async def _writer(self) -> None:
        """Drain the queue, coalescing up to :data:`WRITE_BATCH_FRAMES` frames per
        ``sendmsg``; exits when the queue is empty."""
        sock = self._sock
        try:
            while self._queue:
                await trio.lowlevel.wait_writable(sock)
                queue = self._queue
                if not queue:
                    break
                head = queue[0]
                buffers = [memoryview(head)[self._head_offset :] if self._head_offset else head]
                buffers.extend(islice(queue, 1, WRITE_BATCH_FRAMES))
                try:
                    sent = sock.sendmsg(buffers)
                except BlockingIOError:
                    continue
                except OSError:
                    self._lost()
                    break
                self._consumed(sent)
        finally:
            self._writer_running = False
            drained = self._drained
            if drained is not None:
                self._drained = None
                drained.set()

    def _consumed(self, sent: int) -> None:
        queue = self._queue
        assert queue is not None
        self._queued -= sent
        offset = self._head_offset + sent
        while queue and offset >= len(queue[0]):
            offset -= len(queue.popleft())
        self._head_offset = offset
        if not queue:
            self._queue = None
            self._head_offset = 0
            self._queued = 0

    def _drop_queued(self) -> None:
        """Forget queued frames, except the rest of one already partly sent (the peer
        must get it whole before the close frame)."""
        queue = self._queue
        if queue is None:
            return
        self._hub.dropped["slow_consumer"] += len(queue) - (1 if self._head_offset else 0)
        if self._head_offset:
            head = queue[0]
            queue.clear()
            queue.append(head)
            self._queued = len(head) - self._head_offset
        else:
            self._queue = None
            self._queued = 0

    async def _flushed(self) -> None:
        """Return once the queue is empty (or the socket broke)."""
        while self._queue is not None and not self._broken:
            if self._drained is None:
                self._drained = trio.Event()
            await self._drained.wait()

    async def _wait_send_room(self) -> None:
        """Wait while over half the send queue is in use (paces ``since`` replays)."""
        if self._queued > self._limits.send_queue_bytes // 2:
            await self._flushed()

    def _lost(self) -> None:
        """The socket failed or the peer vanished: stop without a close handshake."""
        self._broken = True
        self._queue = None
        self._queued = 0
        if not self._closing:
            self._closing = True
            self._close_code = ABNORMAL_CLOSURE
        if self._scope is not None:
            self._scope.cancel()


def _token_deadline(claims: AccessClaims) -> float:
    """The token's expiry on trio's clock."""
    return trio.current_time() + (claims.expires_at - time.time())
