"""A small Redis client speaking RESP on trio sockets, parsed by ``hiredis.Reader``.

Two connection kinds, each owning one socket and reconnecting by itself:

* :class:`RedisClient` — the *command* connection. Calls from any number of tasks are
  auto-pipelined: every command queued while the previous write was in flight goes out
  in one ``send_all``, and replies are matched to callers in order. Scripts run through
  :meth:`RedisClient.run_script` (``EVALSHA``, falling back to ``EVAL`` on ``NOSCRIPT``,
  e.g. after Redis restarted).
* :class:`RedisSubscriber` — the *pub/sub* connection. ``SUBSCRIBE``/``UNSUBSCRIBE`` of
  many channels; its receive loop hands every message parsed from one socket read to a
  synchronous callback as one batch, so there is no task hop per message. After a
  reconnect it re-subscribes every channel still wanted and reports them as possibly
  having missed messages.

Why not redis.asyncio or redis-py in a thread: measured here (research/spike-integration.md
§2), redis.asyncio through trio-asyncio received 8–10k messages/s and redis-py in a thread
37k/s, while RESP on trio sockets received ≥ 63k/s. Parsing is hiredis' C ``Reader`` (the
one redis-py uses), and commands are encoded with ``hiredis.pack_command``.

Errors are translated at this boundary: callers only ever see :class:`RedisError`
subclasses, never ``OSError``, ``trio.BrokenResourceError`` or ``hiredis`` exceptions.
"""

from __future__ import annotations

import hashlib
import logging
import random
import ssl
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import unquote, urlsplit

import hiredis
import trio

__all__ = [
    "COMMAND_TIMEOUT_S",
    "CONNECT_TIMEOUT_S",
    "RECONNECT_INITIAL_S",
    "RECONNECT_MAX_S",
    "RedisAddress",
    "RedisClient",
    "RedisClientStatistics",
    "RedisError",
    "RedisReplyError",
    "RedisSubscriber",
    "RedisSubscriberStatistics",
    "RedisUnavailable",
    "Reply",
    "Script",
    "backoff_delays",
]

log = logging.getLogger("hub.bridge.resp")

#: Seconds to open the TCP (and TLS) connection and finish the handshake.
CONNECT_TIMEOUT_S: Final = 2.0
#: Seconds a caller waits for a reply before the connection is declared dead.
COMMAND_TIMEOUT_S: Final = 5.0
#: First reconnect delay; doubles per failed attempt up to :data:`RECONNECT_MAX_S`.
RECONNECT_INITIAL_S: Final = 0.05
RECONNECT_MAX_S: Final = 2.0
#: Bytes asked of the socket per read on the command connection.
RECEIVE_BYTES: Final = 256 * 1024
#: Bytes per read on the pub/sub connection: one read is one batch handed to the hub
#: without yielding, so this bounds how long fan-out holds the loop (~200 messages).
PUBSUB_RECEIVE_BYTES: Final = 64 * 1024
#: Calls joined into one pipelined write at most (the rest go in the next write).
MAX_PIPELINE_CALLS: Final = 4096
#: Calls waiting for replies at once; further callers wait (backpressure).
MAX_CALLS_IN_FLIGHT: Final = 8192
#: Channels per SUBSCRIBE/UNSUBSCRIBE command when many are (re)subscribed at once.
SUBSCRIBE_CHUNK: Final = 512
#: The pub/sub connection sends ``PING`` this often, and counts it dead when nothing at
#: all arrived for :data:`PUBSUB_IDLE_TIMEOUT_S` (a half-open TCP connection).
PUBSUB_PING_INTERVAL_S: Final = 3.0
PUBSUB_IDLE_TIMEOUT_S: Final = 3 * PUBSUB_PING_INTERVAL_S

#: A decoded RESP reply: bytes, int, None, a list of replies, or an error reply.
Reply = Any


class RedisError(Exception):
    """Base of every error this module raises."""


class RedisUnavailable(RedisError):
    """Not connected, the connection broke, or a reply did not come in time.

    A command that was written before the connection broke may or may not have run.
    """


class RedisReplyError(RedisError):
    """Redis answered a command with an error reply (``-ERR …``)."""


# -- addresses and connections ----------------------------------------------------------
@dataclass(frozen=True, slots=True)
class RedisAddress:
    """Where and how to connect, parsed from ``redis://[[user]:password@]host[:port][/db]``
    (``rediss://`` for TLS)."""

    host: str = "127.0.0.1"
    port: int = 6379
    db: int = 0
    username: str | None = None
    password: str | None = None
    tls: bool = False

    @classmethod
    def from_url(cls, url: str) -> RedisAddress:
        """Parse a Redis URL.

        Raises:
            ValueError: not a ``redis://`` or ``rediss://`` URL, or a bad port or db.
        """
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss"):
            raise ValueError(f"not a redis:// URL: {parts.scheme}://…")
        path = parts.path.strip("/")
        db = int(path) if path else 0
        return cls(
            host=parts.hostname or "127.0.0.1",
            port=parts.port or 6379,
            db=db,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
            tls=parts.scheme == "rediss",
        )

    def __str__(self) -> str:  # never shows the password
        return f"{'rediss' if self.tls else 'redis'}://{self.host}:{self.port}/{self.db}"


def backoff_delays(
    initial_s: float = RECONNECT_INITIAL_S, max_s: float = RECONNECT_MAX_S
) -> Iterable[float]:
    """Capped exponential backoff with jitter: each delay is drawn from [d/2, d] where d
    doubles from ``initial_s`` up to ``max_s``. Infinite."""
    delay = initial_s
    while True:
        yield delay * (0.5 + random.random() / 2)
        delay = min(delay * 2, max_s)


#: While Redis stays unreachable, one failed attempt in this many is logged as a warning.
LOG_EVERY_FAILURES: Final = 10


def _log_failure(kind: str, address: RedisAddress, error: Exception, failures: int) -> None:
    """Log the first failed connection attempt, then one in :data:`LOG_EVERY_FAILURES`."""
    level = logging.WARNING if failures % LOG_EVERY_FAILURES == 0 else logging.DEBUG
    log.log(
        level,
        "redis %s connection to %s failed (attempt %d): %s",
        kind,
        address,
        failures + 1,
        error,
    )


class _Connection:
    """One socket plus a hiredis reader. No concurrency control: its owner serialises
    writes and has one reader task."""

    def __init__(self, stream: trio.abc.Stream, receive_bytes: int = RECEIVE_BYTES) -> None:
        self.receive_bytes = receive_bytes
        self.stream = stream
        self.reader = hiredis.Reader()

    async def send(self, data: bytes) -> None:
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as error:
            raise RedisUnavailable(f"write failed: {error!r}") from None

    async def receive_replies(self) -> list[Reply]:
        """Wait for at least one complete reply; return every reply parsed so far."""
        replies: list[Reply] = []
        reader = self.reader
        while True:
            reply = reader.gets()
            while reply is not False:
                replies.append(reply)
                reply = reader.gets()
            if replies:
                return replies
            try:
                data = await self.stream.receive_some(self.receive_bytes)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as error:
                raise RedisUnavailable(f"read failed: {error!r}") from None
            if not data:
                raise RedisUnavailable("connection closed by Redis")
            try:
                reader.feed(data)
            except hiredis.ProtocolError as error:  # pragma: no cover - corrupt stream
                raise RedisUnavailable(f"protocol error: {error}") from None

    async def call(self, *args: Any) -> Reply:
        """Send one command and wait for its reply (handshake use only)."""
        await self.send(hiredis.pack_command(args))
        (reply,) = await self.receive_replies()
        if isinstance(reply, hiredis.ReplyError):
            raise RedisReplyError(str(reply))
        return reply

    async def aclose(self) -> None:
        with trio.move_on_after(CONNECT_TIMEOUT_S) as scope:
            scope.shield = True
            try:
                await self.stream.aclose()
            except (trio.BrokenResourceError, OSError):
                pass


async def _connect(
    address: RedisAddress, client_name: str, receive_bytes: int = RECEIVE_BYTES
) -> _Connection:
    """Open a socket, authenticate, select the db and name the client.

    Raises:
        RedisUnavailable: could not connect or finish the handshake in time.
        RedisReplyError: authentication or ``SELECT`` was refused.
    """
    with trio.move_on_after(CONNECT_TIMEOUT_S) as scope:
        try:
            stream: trio.abc.Stream = await trio.open_tcp_stream(address.host, address.port)
        except OSError as error:
            raise RedisUnavailable(f"cannot connect to {address}: {error}") from None
        if address.tls:
            stream = trio.SSLStream(
                stream, ssl.create_default_context(), server_hostname=address.host
            )
        conn = _Connection(stream, receive_bytes)
        try:
            if address.password is not None:
                if address.username:
                    await conn.call(b"AUTH", address.username, address.password)
                else:
                    await conn.call(b"AUTH", address.password)
            if address.db:
                await conn.call(b"SELECT", address.db)
            await conn.call(b"CLIENT", b"SETNAME", client_name)
        except BaseException:
            await conn.aclose()
            raise
        return conn
    assert scope.cancelled_caught
    raise RedisUnavailable(f"connecting to {address} timed out")


# -- the command connection -------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Script:
    """A Lua script, known to Redis by the SHA1 of its source."""

    source: str
    sha1: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha1", hashlib.sha1(self.source.encode()).hexdigest())


class _Call:
    """Replies of one call, filled in order by the reader task."""

    __slots__ = ("done", "error", "expected", "replies")

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.replies: list[Reply] = []
        self.error: RedisError | None = None
        self.done = trio.Event()


@dataclass(frozen=True, slots=True)
class RedisClientStatistics:
    """``connected``: a live connection exists; ``calls_in_flight``: calls waiting for
    replies; ``writes``/``commands``: pipelined writes and commands sent (their ratio is
    the mean pipeline depth); ``reconnects``: connections opened after the first."""

    connected: bool
    calls_in_flight: int
    writes: int
    commands: int
    reconnects: int


class RedisClient:
    """The command connection: auto-pipelined, reconnecting.

    Create it, start :meth:`run` in a nursery (``await nursery.start(client.run)``), then
    call :meth:`execute`, :meth:`execute_many` or :meth:`run_script` from any task.

    Args:
        address: where Redis is.
        name: ``CLIENT SETNAME`` of the connection (shows in ``CLIENT LIST``).
        on_state: called with ``True`` when a connection is up and ``False`` when it is
            lost (synchronously, from the connection task).
        command_timeout_s: seconds a call waits for its reply; then the connection is
            dropped (a stalled or half-open Redis) and reconnected.

    Backpressure:
        At most :data:`MAX_CALLS_IN_FLIGHT` calls wait for replies; further callers wait
        for a slot. Commands queued while a write is in flight are joined into the next
        write (up to :data:`MAX_PIPELINE_CALLS` calls), so concurrency becomes pipeline depth.

    Cancellation:
        A caller cancelled after its command was queued stops waiting at once; the command
        is still sent and its reply dropped. A call is always a checkpoint.

    Resource handling:
        The socket belongs to :meth:`run`; cancelling ``run`` closes it, and every waiting
        caller gets :class:`RedisUnavailable`.
    """

    def __init__(
        self,
        address: RedisAddress,
        *,
        name: str = "hub",
        on_state: Callable[[bool], None] | None = None,
        command_timeout_s: float = COMMAND_TIMEOUT_S,
    ) -> None:
        self.address = address
        self._name = name
        self._command_timeout_s = command_timeout_s
        self._on_state = on_state
        self._conn: _Connection | None = None
        self._outbox: list[bytes] = []
        self._connection_scope: trio.CancelScope | None = None
        self._waiting: deque[_Call] = deque()
        self._wake_writer = trio.Event()
        self._slots = trio.Semaphore(MAX_CALLS_IN_FLIGHT)
        self._connected_event = trio.Event()
        self._writes = 0
        self._commands = 0
        self._connections = 0

    # -- state ---------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self._conn is not None

    def statistics(self) -> RedisClientStatistics:
        return RedisClientStatistics(
            connected=self.connected,
            calls_in_flight=len(self._waiting),
            writes=self._writes,
            commands=self._commands,
            reconnects=max(0, self._connections - 1),
        )

    async def wait_connected(self) -> None:
        """Return once a connection is up (at once if it already is)."""
        while self._conn is None:
            await self._connected_event.wait()
        await trio.lowlevel.checkpoint()

    # -- calls ---------------------------------------------------------------------
    async def execute(self, *args: Any) -> Reply:
        """Run one command and return its reply.

        Raises:
            RedisUnavailable: not connected, the connection broke, or no reply within
                :data:`COMMAND_TIMEOUT_S`.
            RedisReplyError: Redis answered with an error.
        """
        (reply,) = await self.execute_many([args])
        if isinstance(reply, hiredis.ReplyError):
            raise RedisReplyError(str(reply))
        return reply

    async def execute_many(self, commands: Sequence[Sequence[Any]]) -> list[Reply]:
        """Send several commands in one write and return their replies in order.

        Error replies are returned as ``hiredis.ReplyError`` values in the list, not
        raised, so one failing command does not hide the others' results.

        Raises:
            RedisUnavailable: as for :meth:`execute`.
        """
        if not commands:
            await trio.lowlevel.checkpoint()
            return []
        if self._conn is None:
            await trio.lowlevel.checkpoint()
            raise RedisUnavailable(f"not connected to {self.address}")
        packed = b"".join(hiredis.pack_command(tuple(command)) for command in commands)
        async with self._slots:
            conn = self._conn
            if conn is None:
                raise RedisUnavailable(f"not connected to {self.address}")
            call = _Call(len(commands))
            self._outbox.append(packed)
            self._commands += len(commands)
            self._waiting.append(call)
            self._wake_writer.set()
            with trio.move_on_after(self._command_timeout_s) as scope:
                await call.done.wait()
            if scope.cancelled_caught:
                self._kill(conn, "no reply in time")
                raise RedisUnavailable(
                    f"no reply from {self.address} within {self._command_timeout_s}s"
                )
        if call.error is not None:
            raise call.error
        return call.replies

    async def run_script(self, script: Script, keys: Sequence[Any], args: Sequence[Any]) -> Reply:
        """``EVALSHA`` the script; on ``NOSCRIPT`` (never loaded, or Redis restarted)
        send it with ``EVAL``, which also caches it for the next calls.

        Raises:
            RedisUnavailable: as for :meth:`execute`.
            RedisReplyError: the script failed.
        """
        tail = (len(keys), *keys, *args)
        try:
            return await self.execute(b"EVALSHA", script.sha1, *tail)
        except RedisReplyError as error:
            if not str(error).startswith("NOSCRIPT"):
                raise
        return await self.execute(b"EVAL", script.source, *tail)

    async def run_script_many(
        self, script: Script, calls: Sequence[tuple[Sequence[Any], Sequence[Any]]]
    ) -> list[Reply]:
        """Run ``script`` once per ``(keys, args)`` in ``calls``, pipelined in one write.

        Replies come back in order; a failing run is a ``hiredis.ReplyError`` value in
        the list. Runs that met ``NOSCRIPT`` are sent again with ``EVAL``.

        Raises:
            RedisUnavailable: as for :meth:`execute`.
        """
        tails = [(len(keys), *keys, *args) for keys, args in calls]
        sha = script.sha1
        replies = await self.execute_many([(b"EVALSHA", sha, *tail) for tail in tails])
        missing = [
            i
            for i, reply in enumerate(replies)
            if isinstance(reply, hiredis.ReplyError) and str(reply).startswith("NOSCRIPT")
        ]
        if missing:
            again = await self.execute_many([(b"EVAL", script.source, *tails[i]) for i in missing])
            for i, reply in zip(missing, again, strict=True):
                replies[i] = reply
        return replies

    async def ping(self) -> None:
        """Raise :class:`RedisUnavailable` unless Redis answers ``PING``."""
        await self.execute(b"PING")

    # -- the connection task ---------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep a connection open until cancelled, reconnecting with backoff.

        Reports started at once (Redis may be down when the node starts); use
        :meth:`wait_connected` to wait for the first connection.

        Cancellation:
            Cancelling closes the socket and fails every waiting call.
        """
        task_status.started()
        delays = iter(backoff_delays())
        failures = 0
        while True:
            try:
                conn = await _connect(self.address, self._name)
            except RedisError as error:
                _log_failure("command", self.address, error, failures)
                failures += 1
                await trio.sleep(next(delays))
                continue
            delays = iter(backoff_delays())
            failures = 0
            self._connections += 1
            try:
                self._up(conn)
                async with trio.open_nursery() as nursery:
                    self._connection_scope = nursery.cancel_scope
                    nursery.start_soon(self._writer, conn)
                    nursery.start_soon(self._reader, conn)
            except* RedisUnavailable as group:
                log.warning(
                    "redis command connection to %s lost: %s", self.address, group.exceptions[0]
                )
            finally:
                self._down(conn)
                await conn.aclose()

    def _up(self, conn: _Connection) -> None:
        self._conn = conn
        self._connected_event.set()
        self._connected_event = trio.Event()
        if self._connections > 1:
            log.info("redis command connection to %s restored", self.address)
        if self._on_state is not None:
            self._on_state(True)

    def _down(self, conn: _Connection) -> None:
        if self._conn is not conn:
            return
        self._conn = None
        error = RedisUnavailable(f"connection to {self.address} lost")
        while self._waiting:
            call = self._waiting.popleft()
            call.error = error
            call.done.set()
        self._outbox.clear()
        if self._on_state is not None:
            self._on_state(False)

    def _kill(self, conn: _Connection, why: str) -> None:
        """Declare ``conn`` dead: fail its calls and make ``run`` reconnect."""
        if self._conn is conn:
            log.warning("dropping redis connection to %s: %s", self.address, why)
            self._down(conn)
            if self._connection_scope is not None:
                self._connection_scope.cancel()

    async def _writer(self, conn: _Connection) -> None:
        while True:
            await self._wake_writer.wait()
            self._wake_writer = trio.Event()
            while self._outbox:
                if len(self._outbox) <= MAX_PIPELINE_CALLS:
                    batch, self._outbox = self._outbox, []
                else:
                    batch = self._outbox[:MAX_PIPELINE_CALLS]
                    del self._outbox[:MAX_PIPELINE_CALLS]
                self._writes += 1
                await conn.send(b"".join(batch))

    async def _reader(self, conn: _Connection) -> None:
        waiting = self._waiting
        while True:
            replies = await conn.receive_replies()
            for reply in replies:
                if not waiting:
                    raise RedisUnavailable("reply without a request (protocol out of step)")
                call = waiting[0]
                call.replies.append(reply)
                if len(call.replies) == call.expected:
                    waiting.popleft()
                    call.done.set()


# -- the pub/sub connection -------------------------------------------------------------
#: ``on_messages`` receives a list of ``(channel, payload)`` pairs, in arrival order.
MessageBatch = list[tuple[bytes, bytes]]


@dataclass(frozen=True, slots=True)
class RedisSubscriberStatistics:
    """``channels``: channels wanted; ``messages``/``batches``: received so far (their
    ratio is the mean batch handed to ``on_messages``); ``reconnects``: connections
    opened after the first."""

    connected: bool
    channels: int
    messages: int
    batches: int
    reconnects: int


class RedisSubscriber:
    """The pub/sub connection: one Redis subscription per wanted channel.

    The set of wanted channels is plain state (:meth:`subscribe` adds, :meth:`unsubscribe`
    removes); when connected, changes are sent at once, and after every (re)connect the
    whole set is subscribed again.

    Args:
        address: where Redis is.
        on_messages: called with every message parsed from one socket read, in order.
            It runs in the receive task and must not block (hand off with ``send_nowait``
            or do the work inline).
        on_connected: called with the set of wanted channels each time the connection is
            (re)established and every one of them is confirmed subscribed. Messages
            published while this connection was down are lost to pub/sub; the owner
            must treat every listed channel as possibly having missed messages.
        on_disconnected: called when the connection is lost.
        name: ``CLIENT SETNAME`` of the connection.

    Backpressure:
        None inside: the receive loop reads as fast as ``on_messages`` returns. If the
        owner falls behind, Redis buffers up to its ``client-output-buffer-limit pubsub``
        and then drops the connection, which is handled like any other disconnect.

    Cancellation:
        :meth:`subscribe` may be cancelled while it waits for the confirmation; the
        channel stays wanted (call :meth:`unsubscribe` to undo).

    Resource handling:
        The socket belongs to :meth:`run`; cancelling it closes the socket.
    """

    def __init__(
        self,
        address: RedisAddress,
        *,
        on_messages: Callable[[MessageBatch], None],
        on_connected: Callable[[frozenset[bytes]], None] | None = None,
        on_disconnected: Callable[[], None] | None = None,
        name: str = "hub-pubsub",
    ) -> None:
        self.address = address
        self._on_messages = on_messages
        self._on_connected = on_connected
        self._on_disconnected = on_disconnected
        self._name = name
        self._wanted: set[bytes] = set()
        self._confirm: dict[bytes, list[trio.Event]] = {}
        self._conn: _Connection | None = None
        self._live = False
        self._send_lock = trio.StrictFIFOLock()
        self._live_event = trio.Event()
        self._messages = 0
        self._batches = 0
        self._connections = 0

    @property
    def connected(self) -> bool:
        """True when every wanted channel is confirmed subscribed on a live connection."""
        return self._live

    @property
    def channels(self) -> frozenset[bytes]:
        return frozenset(self._wanted)

    def statistics(self) -> RedisSubscriberStatistics:
        return RedisSubscriberStatistics(
            connected=self._live,
            channels=len(self._wanted),
            messages=self._messages,
            batches=self._batches,
            reconnects=max(0, self._connections - 1),
        )

    async def wait_connected(self) -> None:
        """Return once the connection is live (at once if it already is)."""
        while not self._live:
            await self._live_event.wait()
        await trio.lowlevel.checkpoint()

    async def subscribe(self, channels: Iterable[bytes]) -> bool:
        """Want ``channels``; if connected, subscribe them and wait for Redis to confirm.

        Returns:
            True when every channel is confirmed subscribed on the live connection (a
            message published from now on will arrive). False when the connection is
            down or still (re)subscribing: the channels are then reported through
            ``on_connected`` once they are live.
        """
        new = [channel for channel in channels if channel not in self._wanted]
        self._wanted.update(new)
        conn = self._conn
        if not new:
            await trio.lowlevel.checkpoint()
            return self._live
        if conn is None:
            await trio.lowlevel.checkpoint()
            return False
        events = [self._expect(channel) for channel in new]
        try:
            await self._send_chunked(conn, b"SUBSCRIBE", new)
        except RedisUnavailable:
            return False
        for event in events:
            await event.wait()
        return self._live and self._conn is conn

    async def unsubscribe(self, channels: Iterable[bytes]) -> None:
        """Stop wanting ``channels`` (does not wait for Redis to confirm)."""
        gone = [channel for channel in channels if channel in self._wanted]
        self._wanted.difference_update(gone)
        conn = self._conn
        if not gone or conn is None:
            await trio.lowlevel.checkpoint()
            return
        try:
            await self._send_chunked(conn, b"UNSUBSCRIBE", gone)
        except RedisUnavailable:
            pass  # the next connection will not subscribe them

    def _expect(self, channel: bytes) -> trio.Event:
        event = trio.Event()
        self._confirm.setdefault(channel, []).append(event)
        return event

    async def _send_chunked(self, conn: _Connection, verb: bytes, channels: list[bytes]) -> None:
        data = b"".join(
            hiredis.pack_command((verb, *channels[i : i + SUBSCRIBE_CHUNK]))
            for i in range(0, len(channels), SUBSCRIBE_CHUNK)
        )
        async with self._send_lock:
            await conn.send(data)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep the pub/sub connection open until cancelled, reconnecting with backoff.

        Reports started at once; :meth:`wait_connected` waits for the connection.
        """
        task_status.started()
        delays = iter(backoff_delays())
        failures = 0
        while True:
            try:
                conn = await _connect(self.address, self._name, PUBSUB_RECEIVE_BYTES)
            except RedisError as error:
                _log_failure("pub/sub", self.address, error, failures)
                failures += 1
                await trio.sleep(next(delays))
                continue
            delays = iter(backoff_delays())
            failures = 0
            self._connections += 1
            self._conn = conn
            lost = False
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._receive_loop, conn)
                    nursery.start_soon(self._pinger, conn)
                    await self._resubscribe(conn)
            except* RedisUnavailable as group:
                lost = True
                log.warning(
                    "redis pub/sub connection to %s lost: %s", self.address, group.exceptions[0]
                )
            finally:
                self._conn = None
                was_live, self._live = self._live, False
                self._fail_confirmations()
                if lost and was_live and self._on_disconnected is not None:
                    self._on_disconnected()
                await conn.aclose()

    async def _resubscribe(self, conn: _Connection) -> None:
        wanted = sorted(self._wanted)
        events = [self._expect(channel) for channel in wanted]
        if wanted:
            await self._send_chunked(conn, b"SUBSCRIBE", wanted)
        for event in events:
            await event.wait()
        if self._conn is not conn:
            return
        self._live = True
        self._live_event.set()
        self._live_event = trio.Event()
        if self._connections > 1:
            log.info(
                "redis pub/sub connection to %s restored; %d channels resubscribed",
                self.address,
                len(wanted),
            )
        if self._on_connected is not None:
            self._on_connected(frozenset(self._wanted))

    def _fail_confirmations(self) -> None:
        for events in self._confirm.values():
            for event in events:
                event.set()
        self._confirm.clear()

    async def _pinger(self, conn: _Connection) -> None:
        ping = hiredis.pack_command((b"PING",))
        while True:
            await trio.sleep(PUBSUB_PING_INTERVAL_S)
            async with self._send_lock:
                await conn.send(ping)

    async def _receive_loop(self, conn: _Connection) -> None:
        on_messages = self._on_messages
        while True:
            with trio.move_on_after(PUBSUB_IDLE_TIMEOUT_S) as scope:
                replies = await conn.receive_replies()
            if scope.cancelled_caught:
                raise RedisUnavailable(f"nothing received for {PUBSUB_IDLE_TIMEOUT_S}s")
            batch: MessageBatch = []
            for reply in replies:
                if isinstance(reply, hiredis.ReplyError):
                    raise RedisUnavailable(f"pub/sub error reply: {reply}")
                kind = reply[0]
                if kind == b"message":
                    batch.append((reply[1], reply[2]))
                elif kind == b"subscribe":
                    events = self._confirm.get(reply[1])
                    if events:
                        events.pop(0).set()
                        if not events:
                            del self._confirm[reply[1]]
            if batch:
                self._messages += len(batch)
                self._batches += 1
                on_messages(batch)
