"""One RabbitMQ connection in its own thread, reconnecting by itself: :class:`AmqpLink`.

pika's ``BlockingConnection`` is not thread-safe and not async; it lives in one dedicated
(daemon) thread that loops on ``process_data_events``. The trio side talks to it only
through :meth:`AmqpLink.call_soon` / :meth:`AmqpLink.call` (both built on pika's one
thread-safe method, ``add_callback_threadsafe``), and the thread talks back through the
trio token (``run_sync_soon``, or ``trio.from_thread.run`` from a :class:`LinkHandler`).
research/spike-integration.md §3 measured this shape here: a forced close redelivered
exactly the unacked prefetch. pika's ``AsyncioConnection`` does not reconnect by itself.

What runs on the connection is a :class:`LinkHandler`: it declares its topology and
starts its consumers in :meth:`LinkHandler.on_connected` (called again after every
reconnect, with a new *generation* number), and moves buffered deliveries to trio in
:meth:`LinkHandler.on_events`. Delivery tags are only meaningful inside one generation.

Reconnects use capped exponential backoff with jitter (``delay * U(0.5, 1.5)``), starting
at :data:`RECONNECT_INITIAL_S`; the backoff resets after a successful connect.

Resource handling:
    :func:`open_amqp_link` starts the thread and, on leaving, stops it: pending
    callbacks run, the connection is closed, the thread is joined for at most
    :data:`STOP_TIMEOUT_S` (it is a daemon thread, so a wedged broker never blocks exit).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import pika
import pika.exceptions
import trio
from pika.adapters.blocking_connection import BlockingConnection

__all__ = [
    "POLL_S",
    "RECONNECT_INITIAL_S",
    "STOP_TIMEOUT_S",
    "AmqpLink",
    "AmqpLinkStatistics",
    "AmqpUnavailable",
    "LinkHandler",
    "LinkState",
    "LinkStop",
    "open_amqp_link",
    "redact_url",
]

log = logging.getLogger("hub.bridge.amqp")

# pika logs every failed connection attempt several times at ERROR, with tracebacks; the
# link logs one WARNING per attempt with the reason instead. An explicitly configured
# level for "pika" is left alone.
if logging.getLogger("pika").level == logging.NOTSET:
    logging.getLogger("pika").setLevel(logging.CRITICAL)

T = TypeVar("T")

#: Longest the thread blocks in ``process_data_events`` before looking at its stop flag
#: again (it is also woken at once by every ``add_callback_threadsafe``).
POLL_S = 0.1
#: First reconnect delay; doubled after each failed attempt up to the link's maximum.
RECONNECT_INITIAL_S = 0.2
#: Seconds :func:`open_amqp_link` waits for the thread to close the connection and end.
STOP_TIMEOUT_S = 3.0
#: Longest the link thread spends running queued callbacks before it closes.
DRAIN_TIMEOUT_S = 2.0
#: Socket connect/read timeout for the TCP connection to the broker.
SOCKET_TIMEOUT_S = 5.0
#: A connection the broker blocks (memory or disk alarm) this long is dropped and made
#: again, rather than leaving a publish (a dead letter, an e-mail job) hanging.
BLOCKED_TIMEOUT_S = 30.0


class AmqpUnavailable(Exception):
    """The broker cannot be reached right now, or the connection was lost before the
    requested operation completed (it may or may not have reached the broker)."""


class LinkStop(Exception):
    """Raised by a :class:`LinkHandler` in the link thread to end the thread for good
    (the trio side is gone); the connection is closed."""


class LinkHandler(Protocol):
    """What runs on an :class:`AmqpLink`. Every method is called in the link thread."""

    def on_connected(self, connection: BlockingConnection, generation: int) -> None:
        """Open channels, declare the topology, start consumers. Raising a pika error
        counts as a failed connect (retried with backoff)."""
        ...

    def on_events(self) -> None:
        """Called after each ``process_data_events`` round (deliveries were buffered
        by consumer callbacks); may block handing them over to trio."""
        ...

    def on_disconnected(self) -> None:
        """The connection of the current generation is gone; drop its state."""
        ...


@dataclass(frozen=True, slots=True)
class AmqpLinkStatistics:
    """``connected``: the connection is open and the handler is set up; ``generation``:
    how many times it got there; ``last_error``: why it last went down."""

    connected: bool
    generation: int
    reconnects: int
    last_error: str | None


def redact_url(url: str) -> str:
    """``amqp://user:secret@host/vhost`` → ``amqp://user:***@host/vhost`` for logs."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    creds, _, host = rest.rpartition("@")
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}"


class LinkState:
    """The connection state of a RabbitMQ link as the trio side sees it (readiness,
    metrics, tests). Only the trio thread reads and changes it."""

    def __init__(self) -> None:
        self._connected = False
        self._generation = 0
        self._reconnects = 0
        self._last_error: str | None = None
        self._changed = trio.Event()

    @property
    def connected(self) -> bool:
        """True while the connection is open and set up."""
        return self._connected

    @property
    def generation(self) -> int:
        """The current connection's number (0 before the first connect)."""
        return self._generation

    def statistics(self) -> AmqpLinkStatistics:
        return AmqpLinkStatistics(
            self._connected, self._generation, self._reconnects, self._last_error
        )

    async def check_ready(self) -> None:
        """Readiness check for ``node.ready_checks``.

        Raises:
            AmqpUnavailable: the link is not connected.
        """
        if not self._connected:
            raise AmqpUnavailable(f"RabbitMQ is not connected ({self._last_error or 'starting'})")

    async def wait_connected(self, generation_above: int = 0) -> int:
        """Wait until the link is connected with a generation above ``generation_above``
        and return that generation."""
        while not (self._connected and self._generation > generation_above):
            await self._changed.wait()
        return self._generation

    async def wait_disconnected(self) -> None:
        """Wait until the link is not connected."""
        while self._connected:
            await self._changed.wait()

    def _set_connected(self, connected: bool, error: str | None = None) -> None:
        self._connected = connected
        if error is not None:
            self._last_error = error
        self._changed.set()
        self._changed = trio.Event()


class _PendingCall:
    """One :meth:`AmqpLink.call` in flight: the thread fills ``value`` or ``error``."""

    __slots__ = ("done", "error", "value")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.value: Any = None
        self.error: BaseException | None = None


class AmqpLink(LinkState):
    """A pika ``BlockingConnection`` owned by one thread, with reconnects.

    Create it with :func:`open_amqp_link`.

    Args:
        url: ``amqp://user:password@host:port/vhost?heartbeat=30`` (pika URL syntax).
        name: shown in the RabbitMQ management UI as the connection name and used for
            the thread name.
        handler: what runs on the connection (see :class:`LinkHandler`).
        reconnect_max_s: cap of the reconnect backoff.

    Cancellation:
        :meth:`call` can be cancelled while it waits; the callable may still run in the
        link thread afterwards (its result is then dropped).

    Backpressure:
        The link thread blocks while its handler hands deliveries to trio, so a slow
        trio side stops reading from the socket, and the broker stops at the prefetch.
    """

    def __init__(
        self,
        url: str,
        *,
        name: str,
        handler: LinkHandler,
        reconnect_max_s: float = 30.0,
    ) -> None:
        super().__init__()
        self.url = url
        self.name = name
        self.handler = handler
        self.reconnect_max_s = max(reconnect_max_s, RECONNECT_INITIAL_S)
        self._params = pika.URLParameters(url)
        self._params.connection_attempts = 1
        self._params.socket_timeout = SOCKET_TIMEOUT_S
        self._params.blocked_connection_timeout = BLOCKED_TIMEOUT_S
        self._params.client_properties = {"connection_name": name, "product": "notification-hub"}
        self._token: trio.lowlevel.TrioToken | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._reconnect_now = threading.Event()
        self._lock = threading.Lock()  # guards _conn and _pending across the two threads
        self._conn: BlockingConnection | None = None
        self._pending: set[_PendingCall] = set()
        self._thread_done = trio.Event()

    # -- trio side ---------------------------------------------------------------------
    def call_soon(self, fn: Callable[[], object]) -> bool:
        """Run ``fn()`` in the link thread soon; callbacks run in submission order.

        Returns:
            False when there is no open connection (``fn`` will not run).
        """
        with self._lock:
            conn = self._conn
            if conn is None:
                return False
            try:
                conn.add_callback_threadsafe(fn)
            except pika.exceptions.AMQPError:
                return False
        return True

    async def call(self, fn: Callable[[], T], *, connect_timeout_s: float = 0.0) -> T:
        """Run ``fn()`` in the link thread and return its result.

        Args:
            fn: runs in the link thread; may use the handler's channels.
            connect_timeout_s: wait this long for a connection when there is none.

        Raises:
            AmqpUnavailable: not connected, the connection was lost before ``fn``
                finished, or ``fn`` raised a pika error (translated, with the pika
                error as ``__cause__``).
            Exception: whatever else ``fn`` raised.
        """
        if not self._connected and connect_timeout_s > 0:
            with trio.move_on_after(connect_timeout_s):
                await self.wait_connected()
        pending = _PendingCall()
        token = self._token
        assert token is not None

        def run_in_thread() -> None:
            with self._lock:
                if pending not in self._pending:
                    return  # already failed by a disconnect
            try:
                pending.value = fn()
            except pika.exceptions.AMQPError as exc:  # translated at the boundary
                pending.error = AmqpUnavailable(f"{type(exc).__name__}: {exc}")
                pending.error.__cause__ = exc
            except Exception as exc:
                pending.error = exc
            with self._lock:
                if pending not in self._pending:
                    return
                self._pending.discard(pending)
            try:
                token.run_sync_soon(pending.done.set)
            except trio.RunFinishedError:
                pass

        with self._lock:
            conn = self._conn
            if conn is None:
                raise AmqpUnavailable(
                    f"RabbitMQ is not connected ({self._last_error or 'starting'})"
                )
            self._pending.add(pending)
            try:
                conn.add_callback_threadsafe(run_in_thread)
            except pika.exceptions.AMQPError:
                self._pending.discard(pending)
                raise AmqpUnavailable("RabbitMQ connection is closing") from None
        try:
            await pending.done.wait()
        finally:
            with self._lock:
                self._pending.discard(pending)
        if pending.error is not None:
            raise pending.error
        return pending.value  # type: ignore[no-any-return]

    def request_reconnect(self) -> None:
        """Drop the current connection and connect again at once (its unacked deliveries
        are requeued by the broker)."""
        self._reconnect_now.set()
        self.call_soon(lambda: None)

    def start(self) -> None:
        """Start the link thread (done by :func:`open_amqp_link`)."""
        self._token = trio.lowlevel.current_trio_token()
        self._thread = threading.Thread(
            target=self._thread_main, name=f"amqp-{self.name}", daemon=True
        )
        self._thread.start()

    async def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> bool:
        """Ask the thread to run its pending callbacks, close the connection and end.

        Returns:
            True when the thread ended within ``timeout_s``.
        """
        self._stop.set()
        self.call_soon(lambda: None)  # wake process_data_events
        if self._thread is None:
            return True
        with trio.move_on_after(timeout_s):
            await self._thread_done.wait()
        return self._thread_done.is_set()

    def _set_state(self, connected: bool, generation: int, error: str | None) -> None:
        self._generation = generation
        self._set_connected(connected, error)

    # -- link thread -------------------------------------------------------------------
    def _notify(self, fn: Callable[..., object], *args: Any) -> None:
        assert self._token is not None
        try:
            self._token.run_sync_soon(fn, *args)
        except trio.RunFinishedError:
            self._stop.set()

    def _fail_pending(self, reason: str) -> None:
        with self._lock:
            self._conn = None
            pending, self._pending = self._pending, set()
        error = AmqpUnavailable(reason)
        for call in pending:
            call.error = error
            self._notify(call.done.set)

    def _thread_main(self) -> None:
        delay = RECONNECT_INITIAL_S
        generation = 0
        try:
            while not self._stop.is_set():
                conn: BlockingConnection | None = None
                error: str | None = None
                try:
                    conn = BlockingConnection(self._params)
                    generation += 1
                    self.handler.on_connected(conn, generation)
                    with self._lock:
                        self._conn = conn
                    self._notify(self._set_state, True, generation, None)
                    log.info(
                        "connected to RabbitMQ",
                        extra={
                            "link": self.name,
                            "generation": generation,
                            "url": redact_url(self.url),
                        },
                    )
                    delay = RECONNECT_INITIAL_S
                    self._serve(conn)
                except LinkStop:
                    self._stop.set()
                    self._drain(conn)
                except (pika.exceptions.AMQPError, OSError) as exc:
                    error = f"{type(exc).__name__}: {exc}".rstrip(": ")
                except Exception as exc:  # a bug in a handler: log it, reconnect
                    error = f"{type(exc).__name__}: {exc}"
                    log.exception("AMQP link %s failed", self.name)
                finally:
                    self._fail_pending(error or "RabbitMQ connection closed")
                    self._close(conn)
                    self.handler.on_disconnected()
                    self._notify(self._set_state, False, generation, error)
                if self._stop.is_set():
                    break
                if self._reconnect_now.is_set():
                    self._reconnect_now.clear()
                    continue
                self._reconnects += 1
                wait = delay * (0.5 + random.random())
                log.warning(
                    "RabbitMQ connection %s failed (%s); reconnecting in %.2fs",
                    self.name,
                    error,
                    wait,
                    extra={"link": self.name, "url": redact_url(self.url)},
                )
                self._stop.wait(wait)
                delay = min(delay * 2, self.reconnect_max_s)
        finally:
            self._notify(self._thread_done.set)

    def _serve(self, conn: BlockingConnection) -> None:
        while not self._stop.is_set() and not self._reconnect_now.is_set():
            conn.process_data_events(time_limit=POLL_S)
            self.handler.on_events()
        if self._stop.is_set():
            self._drain(conn)

    @staticmethod
    def _drain(conn: BlockingConnection | None) -> None:
        """Run the callbacks queued so far (final acks) before the connection closes.

        One round of ``process_data_events`` is not enough: a callback that waits on
        the connection (``BlockingChannel.basic_ack`` flushes) polls, and its poll turns
        the callbacks queued behind it into pika's ready events, which that round does
        not dispatch. So rounds go on until a marker queued behind them has run and
        nothing is left ready, for at most :data:`DRAIN_TIMEOUT_S`.
        """
        if conn is None or not conn.is_open:
            return
        drained: list[bool] = []
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        try:
            conn.add_callback_threadsafe(lambda: drained.append(True))
            while conn.is_open and time.monotonic() < deadline:
                conn.process_data_events(time_limit=0)
                if drained and not conn._ready_events:  # pika < 2 (pinned)
                    return
        except (pika.exceptions.AMQPError, OSError):
            pass

    @staticmethod
    def _close(conn: BlockingConnection | None) -> None:
        if conn is None or conn.is_closed:
            return
        try:
            conn.close()
        except (pika.exceptions.AMQPError, OSError):
            pass


@asynccontextmanager
async def open_amqp_link(
    url: str,
    *,
    name: str,
    handler: LinkHandler,
    reconnect_max_s: float = 30.0,
    stop_timeout_s: float = STOP_TIMEOUT_S,
) -> AsyncIterator[AmqpLink]:
    """Start an :class:`AmqpLink` thread; it connects (and reconnects) on its own.

    The block is entered at once, without waiting for the first connection: use
    :meth:`AmqpLink.wait_connected` for that.

    Resource handling:
        Leaving the block stops the thread, bounded by ``stop_timeout_s`` even when the
        block is left by cancellation (the wait is shielded with a deadline).
    """
    link = AmqpLink(url, name=name, handler=handler, reconnect_max_s=reconnect_max_s)
    link.start()
    try:
        yield link
    finally:
        with trio.CancelScope(shield=True):
            if not await link.stop(stop_timeout_s):
                log.warning("AMQP link %s did not stop within %.1fs", name, stop_timeout_s)
