"""AMQP 0-9-1 on the trio loop: one connection, its channels, and its frame reader.

:class:`FrameReader` is sans-IO: fed the bytes a connection received, it calls back with
each complete delivery (``Basic.Deliver`` with its content header and body frames,
assembled per channel) and each other method. It parses deliveries itself, by offset in
the received bytes, and leaves every other method to pika's generated codec
(``pika.spec``), which this module also uses to encode what it sends. pika's connection
classes are not used: no thread, no callback manager, no frame objects per delivery.

:func:`open_amqp_connection` opens the TCP (or TLS) connection, does the handshake
(PLAIN, tune, open) and runs the connection's tasks in a nursery while its block runs:

* the **reader** receives, feeds the :class:`FrameReader` and dispatches: replies go to
  the channel's waiting :meth:`AmqpConnection.rpc`, confirms to the publisher waiting in
  :meth:`AmqpConnection.publish_confirmed`, deliveries and the broker's ``Basic.Cancel``
  to the callbacks given to :meth:`AmqpConnection.consume`;
* the **writer** sends what :meth:`AmqpConnection.send` queued, everything queued since
  its last write in one ``send_all``;
* the **heartbeat** sends a heartbeat frame every half interval and declares the
  connection dead when nothing arrived for two intervals.

Cancellation:
    Leaving the block closes the connection politely (``Connection.Close``, waiting at
    most :data:`CLOSE_TIMEOUT_S` for the broker's reply; what :meth:`AmqpConnection.send`
    queued before is written first), then the socket. When the connection is lost or the
    broker closes it, the block is cancelled and :class:`AmqpConnectionLost` is raised
    out of it.

Backpressure:
    Sending never waits: frames queue in memory until the writer has written the ones
    before. What is sent is small (acks, the odd dead letter), and the broker's own flow
    control (``Connection.Blocked``) is reported by :attr:`AmqpConnection.blocked`.
    Receiving is bounded by the consumers' prefetch.
"""

from __future__ import annotations

import logging
import math
import ssl
import struct
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

import trio
from pika import frame as pika_frame
from pika import spec

__all__ = [
    "CLOSE_TIMEOUT_S",
    "CONNECT_TIMEOUT_S",
    "EMPTY_PROPERTIES",
    "FRAME_MAX",
    "AmqpChannelClosed",
    "AmqpConnection",
    "AmqpConnectionLost",
    "AmqpParameters",
    "DeliveryCallback",
    "FrameReader",
    "open_amqp_connection",
]

log = logging.getLogger("hub.bridge.amqp_wire")

M = TypeVar("M")

#: Largest frame this client accepts and sends (the broker may ask for less).
FRAME_MAX = 131_072
#: Bytes asked of the socket per receive.
RECV_BYTES = 256 * 1024
#: Seconds for TCP connect plus the handshake.
CONNECT_TIMEOUT_S = 5.0
#: Seconds a polite close waits for the broker's ``Connection.CloseOk``.
CLOSE_TIMEOUT_S = 1.0
#: Heartbeat interval when the URL sets none (the broker may lower it).
DEFAULT_HEARTBEAT_S = 60

_FRAME_HEADER = struct.Struct(">BHI")
_HEADER_SIZE = 7
_METHOD_ID = struct.Struct(">I")
_DELIVER = struct.pack(">HH", 60, 60)
_CONTENT_HEADER = struct.Struct(">HHQH")  # class, weight, body size, first flag word
_TAG = struct.Struct(">Q")
_FRAME_END = spec.FRAME_END
_METHOD = spec.FRAME_METHOD
_HEADER = spec.FRAME_HEADER
_BODY = spec.FRAME_BODY
_HEARTBEAT = spec.FRAME_HEARTBEAT
_HEARTBEAT_FRAME = pika_frame.Heartbeat().marshal()

#: The properties of every delivery that has none (shared: treat as read-only).
EMPTY_PROPERTIES = spec.BasicProperties()

#: ``callback(channel, delivery_tag, redelivered, exchange, routing_key, properties,
#: body)``, called by the reader for each delivery (``consumer_tag`` chose the callback).
DeliveryCallback = Callable[[int, bool, str, str, spec.BasicProperties, bytes], None]


class AmqpConnectionLost(Exception):
    """The connection is gone: lost, refused, timed out, or closed by the broker
    (``reply_code`` and ``reply_text`` then say why)."""

    def __init__(self, text: str, reply_code: int = 0) -> None:
        super().__init__(text)
        self.reply_code = reply_code


class AmqpChannelClosed(Exception):
    """The broker closed a channel (``reply_code`` 406 PRECONDITION_FAILED, 404
    NOT_FOUND, …); the connection is still usable."""

    def __init__(self, channel: int, reply_code: int, reply_text: str) -> None:
        super().__init__(f"channel {channel} closed by the broker: {reply_code} {reply_text}")
        self.channel = channel
        self.reply_code = reply_code
        self.reply_text = reply_text


def _short_string(buf: bytes, at: int) -> tuple[str, int]:
    end = at + 1 + buf[at]
    return buf[at + 1 : end].decode("utf-8", "surrogateescape"), end


# -- the reader -----------------------------------------------------------------------
class _Content:
    """A content-bearing method whose header and body frames are still arriving."""

    __slots__ = ("body_size", "have", "method", "parts", "properties")

    def __init__(self, method: Any) -> None:
        self.method = method  # a tuple for a delivery, a pika method otherwise
        self.properties: spec.BasicProperties | None = None
        self.body_size = -1
        self.have = 0
        self.parts: list[bytes] = []


class FrameReader:
    """Splits received bytes into frames and calls back with what they carry.

    Args:
        on_delivery: ``on_delivery(channel, consumer_tag, delivery_tag, redelivered,
            exchange, routing_key, properties, body)`` for every complete
            ``Basic.Deliver``.
        on_method: ``on_method(channel, method, content)`` for every other method;
            ``content`` is ``(properties, body)`` for a ``Basic.Return`` (after its
            content arrived), else ``None``.

    Raises (from :meth:`feed`):
        AmqpConnectionLost: a malformed frame (the connection must be closed).
    """

    __slots__ = ("_content", "_on_delivery", "_on_method", "_pending", "frames")

    def __init__(
        self,
        on_delivery: Callable[[int, str, int, bool, str, str, spec.BasicProperties, bytes], None],
        on_method: Callable[[int, Any, tuple[spec.BasicProperties, bytes] | None], None],
    ) -> None:
        self._on_delivery = on_delivery
        self._on_method = on_method
        self._pending = b""
        self._content: dict[int, _Content] = {}
        #: Frames read so far.
        self.frames = 0

    def feed(self, data: bytes) -> None:
        """Handle every complete frame in what was received so far."""
        buf = self._pending + data if self._pending else data
        size = len(buf)
        unpack = _FRAME_HEADER.unpack_from
        pos = 0
        frames = 0
        while size - pos >= _HEADER_SIZE:
            kind, channel, length = unpack(buf, pos)
            end = pos + _HEADER_SIZE + length + 1
            if end > size:
                break
            if buf[end - 1] != _FRAME_END:
                raise AmqpConnectionLost(f"malformed frame (type {kind}): no frame end")
            frames += 1
            start = pos + _HEADER_SIZE
            if kind == _METHOD:
                if buf[start : start + 4] == _DELIVER:
                    self._start_delivery(buf, channel, start + 4)
                else:
                    self._method(buf, channel, start)
            elif kind == _HEADER:
                self._header(buf, channel, start, end - 1)
            elif kind == _BODY:
                self._body(buf[start : end - 1], channel)
            elif kind != _HEARTBEAT:
                raise AmqpConnectionLost(f"malformed frame: unknown type {kind}")
            pos = end
        self._pending = buf[pos:] if pos < size else b""
        self.frames += frames

    def _start_delivery(self, buf: bytes, channel: int, at: int) -> None:
        consumer_tag, at = _short_string(buf, at)
        delivery_tag = _TAG.unpack_from(buf, at)[0]
        redelivered = bool(buf[at + 8] & 1)
        exchange, at = _short_string(buf, at + 9)
        routing_key, _ = _short_string(buf, at)
        self._expect_content(
            channel, (consumer_tag, delivery_tag, redelivered, exchange, routing_key)
        )

    def _expect_content(self, channel: int, method: Any) -> None:
        if channel in self._content:
            raise AmqpConnectionLost(f"channel {channel}: a method arrived inside content")
        self._content[channel] = _Content(method)

    def _method(self, buf: bytes, channel: int, start: int) -> None:
        method_id = _METHOD_ID.unpack_from(buf, start)[0]
        cls = spec.methods.get(method_id)
        if cls is None:
            raise AmqpConnectionLost(f"unknown method {method_id:#x}")
        method = cls()
        method.decode(buf, start + 4)
        if type(method) is spec.Basic.Return:
            self._expect_content(channel, method)
            return
        self._on_method(channel, method, None)

    def _header(self, buf: bytes, channel: int, start: int, end: int) -> None:
        content = self._content.get(channel)
        if content is None or content.body_size >= 0:
            raise AmqpConnectionLost(f"channel {channel}: an unexpected content header")
        _class, _weight, body_size, flags = _CONTENT_HEADER.unpack_from(buf, start)
        if flags:
            properties = spec.BasicProperties()
            properties.decode(buf[start + 12 : end])
        else:
            properties = EMPTY_PROPERTIES
        content.properties = properties
        content.body_size = body_size
        if body_size == 0:
            self._complete(channel, content, b"")

    def _body(self, part: bytes, channel: int) -> None:
        content = self._content.get(channel)
        if content is None or content.body_size < 0:
            raise AmqpConnectionLost(f"channel {channel}: an unexpected body frame")
        if content.have == 0 and len(part) == content.body_size:
            self._complete(channel, content, part)  # the usual case: one body frame
            return
        content.parts.append(part)
        content.have += len(part)
        if content.have >= content.body_size:
            if content.have > content.body_size:
                raise AmqpConnectionLost(f"channel {channel}: a body longer than announced")
            self._complete(channel, content, b"".join(content.parts))

    def _complete(self, channel: int, content: _Content, body: bytes) -> None:
        del self._content[channel]
        method = content.method
        properties = content.properties
        assert properties is not None
        if type(method) is tuple:
            consumer_tag, delivery_tag, redelivered, exchange, routing_key = method
            self._on_delivery(
                channel, consumer_tag, delivery_tag, redelivered, exchange, routing_key,
                properties, body,
            )  # fmt: skip
        else:
            self._on_method(channel, method, (properties, body))


# -- the connection -------------------------------------------------------------------
@dataclass(frozen=True)
class AmqpParameters:
    """What an ``amqp://`` or ``amqps://`` URL says (RabbitMQ's URI spec, read as pika
    reads it; query parameters ``heartbeat``, ``frame_max`` and ``channel_max`` are
    understood, others are ignored)."""

    host: str
    port: int
    username: str
    password: str
    vhost: str
    tls: bool
    heartbeat_s: int = DEFAULT_HEARTBEAT_S
    frame_max: int = FRAME_MAX
    channel_max: int = 2047

    @classmethod
    def from_url(cls, url: str) -> AmqpParameters:
        parts = urlsplit(url)
        if parts.scheme not in ("amqp", "amqps"):
            raise ValueError("an AMQP URL starts with amqp:// or amqps://")
        tls = parts.scheme == "amqps"
        path = parts.path[1:] if parts.path.startswith("/") else parts.path
        query: dict[str, str] = {}
        for item in filter(None, parts.query.split("&")):
            key, _, value = item.partition("=")
            query[key] = unquote(value)

        def number(key: str, default: int) -> int:
            try:
                return int(query.get(key, default))
            except ValueError:
                raise ValueError(f"{key} in the AMQP URL must be a number") from None

        return cls(
            host=parts.hostname or "localhost",
            port=parts.port or (5671 if tls else 5672),
            username=unquote(parts.username) if parts.username is not None else "guest",
            password=unquote(parts.password) if parts.password is not None else "guest",
            vhost=unquote(path) if path else "/",  # as pika reads it: "amqp://h/" is "/"
            tls=tls,
            heartbeat_s=number("heartbeat", DEFAULT_HEARTBEAT_S),
            frame_max=min(max(number("frame_max", FRAME_MAX), 4096), FRAME_MAX),
            channel_max=number("channel_max", 2047),
        )


@dataclass
class _Channel:
    number: int
    replies: trio.MemorySendChannel[Any]
    receive: trio.MemoryReceiveChannel[Any]
    lock: trio.Lock = field(default_factory=trio.Lock)
    open: bool = True
    # publisher confirms (after Confirm.Select)
    confirming: bool = False
    next_seq: int = 1
    confirms: dict[int, list[Any]] = field(default_factory=dict)  # seq → [Event, acked]
    returned: bool = False


class AmqpConnection:
    """One AMQP connection served by the tasks of :func:`open_amqp_connection`.

    Every method is called from the trio loop; at most one :meth:`rpc` runs per channel
    at a time (a lock per channel keeps them in turn).
    """

    def __init__(self, stream: trio.abc.Stream, params: AmqpParameters, name: str) -> None:
        self._stream = stream
        self.params = params
        self.name = name
        self.frame_max = params.frame_max
        self.heartbeat_s = params.heartbeat_s
        self._channels: dict[int, _Channel] = {}
        self._next_channel = 1
        self._consumers: dict[str, tuple[DeliveryCallback, Callable[[], None] | None]] = {}
        self._out: list[bytes] = []
        self._out_ready = trio.Event()
        self._closing = False
        self._closed = trio.Event()
        self._lost: AmqpConnectionLost | None = None
        self._last_received = trio.current_time()
        self._sent_since_tick = False
        self.reader = FrameReader(self._on_delivery, self._on_method)
        #: True while the broker blocks publishes on this connection (an alarm).
        self.blocked = False
        #: Socket reads so far.
        self.reads = 0
        #: Called (in the reader task) when the broker closes a channel.
        self.on_channel_closed: Callable[[AmqpChannelClosed], None] | None = None
        self._add_channel(0)

    # -- sending -----------------------------------------------------------------------
    def send(self, data: bytes) -> None:
        """Queue ``data`` (whole frames) for the writer; never waits."""
        self._out.append(data)
        self._out_ready.set()

    def send_method(self, channel: int, method: Any) -> None:
        self.send(pika_frame.Method(channel, method).marshal())

    # -- channels and RPCs -------------------------------------------------------------
    def _add_channel(self, number: int) -> None:
        send, receive = trio.open_memory_channel[Any](math.inf)
        self._channels[number] = _Channel(number, send, receive)

    def _open_state(self, channel: int) -> _Channel:
        """``channel``'s state; raises :class:`AmqpChannelClosed` once it is closed."""
        state = self._channels[channel]
        if not state.open:
            raise AmqpChannelClosed(channel, 504, "CHANNEL_ERROR - channel is closed")
        return state

    async def open_channel(self) -> int:
        """Open a new channel and return its number."""
        number = self._next_channel
        self._next_channel += 1
        self._add_channel(number)
        await self.rpc(number, spec.Channel.Open(), spec.Channel.OpenOk)
        return number

    async def rpc(self, channel: int, method: Any, reply: type[M]) -> M:
        """Send ``method`` on ``channel`` and return the broker's ``reply``.

        Raises:
            AmqpChannelClosed: the broker closed the channel instead (an error reply).
            AmqpConnectionLost: the connection went away meanwhile.
        """
        state = self._open_state(channel)
        async with state.lock:
            self.send_method(channel, method)
            return await self._expect(state, reply)

    async def _expect(self, state: _Channel, reply: type[M]) -> M:
        answer = await state.receive.receive()
        if isinstance(answer, Exception):
            raise answer
        if not isinstance(answer, reply):
            raise AmqpConnectionLost(
                f"channel {state.number}: expected {reply.__name__}, got {type(answer).__name__}"
            )
        return answer

    async def confirm_select(self, channel: int) -> None:
        """Put ``channel`` in publisher-confirm mode."""
        await self.rpc(channel, spec.Confirm.Select(), spec.Confirm.SelectOk)
        self._channels[channel].confirming = True

    async def publish_confirmed(
        self,
        channel: int,
        exchange: str,
        routing_key: str,
        body: bytes,
        properties: spec.BasicProperties,
        *,
        mandatory: bool = True,
    ) -> tuple[bool, bool]:
        """Publish on a confirm-mode channel and wait for the broker's confirm.

        Returns:
            ``(acked, returned)``: ``acked`` False for a nack; ``returned`` True when a
            mandatory message could not be routed (the broker returned it).
        """
        state = self._open_state(channel)
        assert state.confirming, "confirm_select() the channel first"
        method = spec.Basic.Publish(exchange=exchange, routing_key=routing_key, mandatory=mandatory)
        frames = [
            pika_frame.Method(channel, method).marshal(),
            pika_frame.Header(channel, len(body), properties).marshal(),
        ]
        chunk = self.frame_max - 8
        frames += (
            pika_frame.Body(channel, body[at : at + chunk]).marshal()
            for at in range(0, len(body), chunk)
        )
        async with state.lock:  # one publish in flight per channel: a Return is its own
            seq = state.next_seq
            state.next_seq += 1
            done = trio.Event()
            state.confirms[seq] = [done, False]
            state.returned = False
            self.send(b"".join(frames))
            await done.wait()
            acked = state.confirms.pop(seq)[1]
            if isinstance(acked, Exception):
                raise acked
            return bool(acked), state.returned

    async def consume(
        self,
        channel: int,
        queue: str,
        consumer_tag: str,
        on_delivery: DeliveryCallback,
        on_cancel: Callable[[], None] | None = None,
    ) -> None:
        """Start consuming ``queue`` with manual acks. ``on_delivery`` runs in the reader
        task for each delivery; ``on_cancel`` when the broker cancels the consumer (the
        queue was deleted, its node went away)."""
        self._consumers[consumer_tag] = (on_delivery, on_cancel)
        await self.rpc(
            channel,
            spec.Basic.Consume(queue=queue, consumer_tag=consumer_tag),
            spec.Basic.ConsumeOk,
        )

    def ack(self, channel: int, delivery_tag: int, *, multiple: bool) -> None:
        """Queue a ``Basic.Ack`` (never waits)."""
        if self._channels[channel].open:
            self.send_method(channel, spec.Basic.Ack(delivery_tag=delivery_tag, multiple=multiple))

    # -- the reader's callbacks --------------------------------------------------------
    def _on_delivery(
        self,
        channel: int,
        consumer_tag: str,
        delivery_tag: int,
        redelivered: bool,
        exchange: str,
        routing_key: str,
        properties: spec.BasicProperties,
        body: bytes,
    ) -> None:
        consumer = self._consumers.get(consumer_tag)
        if consumer is None:  # cancelled meanwhile: the broker requeues it at the close
            return
        consumer[0](delivery_tag, redelivered, exchange, routing_key, properties, body)

    def _on_method(self, channel: int, method: Any, content: Any) -> None:
        state = self._channels.get(channel)
        if state is None:
            raise AmqpConnectionLost(f"a frame on channel {channel}, which is not open")
        kind = type(method)
        if state.confirming and kind in (spec.Basic.Ack, spec.Basic.Nack):
            self._confirmed(state, method.delivery_tag, method.multiple, kind is spec.Basic.Ack)
        elif kind is spec.Basic.Return:
            state.returned = True
        elif kind is spec.Basic.Cancel:  # the broker cancels a consumer
            _, on_cancel = self._consumers.pop(method.consumer_tag, (None, None))
            if on_cancel is not None:
                on_cancel()
        elif kind is spec.Channel.Close:
            self.send_method(channel, spec.Channel.CloseOk())
            error = AmqpChannelClosed(channel, method.reply_code, method.reply_text)
            self._channel_gone(state, error)
            if self.on_channel_closed is not None:
                self.on_channel_closed(error)
        elif kind is spec.Channel.Flow:
            self.send_method(channel, spec.Channel.FlowOk(active=method.active))
        elif kind is spec.Connection.Close:
            self.send_method(0, spec.Connection.CloseOk())
            raise AmqpConnectionLost(
                f"closed by the broker: {method.reply_code} {method.reply_text}", method.reply_code
            )
        elif kind is spec.Connection.Blocked:
            self.blocked = True
            log.warning("RabbitMQ blocks publishing: %s", method.reason, extra={"link": self.name})
        elif kind is spec.Connection.Unblocked:
            self.blocked = False
        elif kind is spec.Connection.CloseOk and self._closing:
            self._closed.set()
        else:
            state.replies.send_nowait(method)

    def _confirmed(self, state: _Channel, seq: int, multiple: bool, acked: bool) -> None:
        for pending_seq, pending in list(state.confirms.items()):
            if pending_seq == seq or (multiple and pending_seq < seq):
                pending[1] = pending[1] or acked
                pending[0].set()

    def _channel_gone(self, state: _Channel, error: Exception) -> None:
        state.open = False
        state.replies.send_nowait(error)
        for pending in state.confirms.values():
            pending[1] = error
            pending[0].set()

    def _fail_all(self, error: AmqpConnectionLost) -> None:
        self._lost = error
        for state in self._channels.values():
            if state.open:
                self._channel_gone(state, error)

    @property
    def last_received(self) -> float:
        """``trio.current_time()`` of the latest socket read: in the reader's callbacks,
        when the frames being dispatched arrived."""
        return self._last_received

    # -- the tasks ---------------------------------------------------------------------
    async def _read(self) -> None:
        stream = self._stream
        feed = self.reader.feed
        try:
            while True:
                data = await stream.receive_some(RECV_BYTES)
                if not data:
                    raise AmqpConnectionLost("the broker closed the socket")
                self._last_received = trio.current_time()
                self.reads += 1
                feed(data)
                if self._closed.is_set():
                    return
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise AmqpConnectionLost(f"{type(exc).__name__}: {exc}".rstrip(": ")) from exc
        except AmqpConnectionLost as exc:
            self._fail_all(exc)
            raise

    async def _write(self) -> None:
        stream = self._stream
        try:
            while True:
                await self._out_ready.wait()
                self._out_ready = trio.Event()
                data = b"".join(self._out) if len(self._out) > 1 else self._out[0]
                self._out.clear()
                await stream.send_all(data)
                self._sent_since_tick = True
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise AmqpConnectionLost(f"{type(exc).__name__}: {exc}".rstrip(": ")) from exc

    async def _heartbeat(self) -> None:
        if self.heartbeat_s <= 0:
            return
        interval = self.heartbeat_s / 2
        while True:
            await trio.sleep(interval)
            if not self._sent_since_tick:
                self.send(_HEARTBEAT_FRAME)
            self._sent_since_tick = False
            if trio.current_time() - self._last_received > 2 * self.heartbeat_s:
                error = AmqpConnectionLost(f"no data from the broker for {2 * self.heartbeat_s} s")
                self._fail_all(error)
                raise error

    async def _handshake(self) -> None:
        params = self.params
        self.send(pika_frame.ProtocolHeader().marshal())
        zero = self._channels[0]
        start = await self._expect(zero, spec.Connection.Start)
        mechanisms = (start.mechanisms or b"").split()
        if b"PLAIN" not in mechanisms and "PLAIN" not in mechanisms:
            raise AmqpConnectionLost(f"the broker offers no PLAIN login ({start.mechanisms!r})")
        properties = {
            "product": "notification-hub",
            "connection_name": self.name,
            "capabilities": {
                "publisher_confirms": True,
                "basic.nack": True,
                "consumer_cancel_notify": True,
                "connection.blocked": True,
                "authentication_failure_close": True,
            },
        }
        response = f"\0{params.username}\0{params.password}"
        self.send_method(0, spec.Connection.StartOk(properties, "PLAIN", response, "en_US"))
        tune = await self._expect(zero, spec.Connection.Tune)
        self.frame_max = min(params.frame_max, tune.frame_max or params.frame_max)
        self.heartbeat_s = min(params.heartbeat_s, tune.heartbeat) if tune.heartbeat else 0
        if params.heartbeat_s == 0:
            self.heartbeat_s = 0
        channel_max = min(params.channel_max, tune.channel_max or params.channel_max)
        self.send_method(0, spec.Connection.TuneOk(channel_max, self.frame_max, self.heartbeat_s))
        self.send_method(0, spec.Connection.Open(virtual_host=params.vhost))
        await self._expect(zero, spec.Connection.OpenOk)

    async def _close(self) -> None:
        """``Connection.Close``, then wait (bounded) for the broker's reply."""
        if self._lost is not None:
            return
        self._closing = True
        self.send_method(0, spec.Connection.Close(200, "Normal shutdown", 0, 0))
        with trio.move_on_after(CLOSE_TIMEOUT_S):
            await self._closed.wait()


async def _connect_stream(params: AmqpParameters) -> trio.abc.Stream:
    if params.tls:
        return await trio.open_ssl_over_tcp_stream(
            params.host, params.port, ssl_context=ssl.create_default_context()
        )
    return await trio.open_tcp_stream(params.host, params.port)


def _first_loss(group: BaseExceptionGroup[Any]) -> BaseException | None:
    for error in group.exceptions:
        if isinstance(error, BaseExceptionGroup):
            found = _first_loss(error)
            if found is not None:
                return found
        elif isinstance(error, AmqpConnectionLost):
            return error
    return None


@asynccontextmanager
async def open_amqp_connection(url: str, *, name: str) -> AsyncIterator[AmqpConnection]:
    """Connect to ``url``, log in and serve the connection while the block runs.

    Args:
        url: ``amqp://user:password@host:port/vhost?heartbeat=30``.
        name: the connection's name in the RabbitMQ management UI.

    Raises:
        AmqpConnectionLost: the broker is unreachable, refused the login, or the
            connection was lost while the block ran (the block is cancelled first).
    """
    params = AmqpParameters.from_url(url)
    try:
        with trio.fail_after(CONNECT_TIMEOUT_S):
            stream = await _connect_stream(params)
    except (OSError, trio.TooSlowError) as exc:
        reason = "timed out" if isinstance(exc, trio.TooSlowError) else str(exc)
        raise AmqpConnectionLost(
            f"cannot connect to {params.host}:{params.port}: {reason}"
        ) from exc
    conn = AmqpConnection(stream, params, name)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(conn._read)
            nursery.start_soon(conn._write)
            try:
                with trio.fail_after(CONNECT_TIMEOUT_S):
                    await conn._handshake()
            except trio.TooSlowError:
                raise AmqpConnectionLost(
                    "the broker did not finish the handshake in time"
                ) from None
            except AmqpChannelClosed as exc:  # channel 0: the login was refused
                raise AmqpConnectionLost(str(exc), exc.reply_code) from None
            nursery.start_soon(conn._heartbeat)
            yield conn
            await conn._close()
            nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        lost = _first_loss(group)
        if lost is not None:
            raise lost from None
        if len(group.exceptions) == 1 and not isinstance(group.exceptions[0], BaseExceptionGroup):
            raise group.exceptions[0] from None  # the block's own error, as it was raised
        raise
    finally:
        # At once: the AMQP close (if any) is done, and a TLS close must not wait for a
        # peer that may never answer.
        await trio.aclose_forcefully(stream)
