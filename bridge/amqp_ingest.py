"""The RabbitMQ side of ingest (SPEC §4): topology, the consumer, acks and dead letters.

:class:`IngestLink` is the ingest's RabbitMQ connection. It runs on the node's trio loop
(:mod:`bridge.amqp_wire`: no thread, no hand-over between threads), declares the
topology, consumes ``hub.notifications`` with manual acks and a prefetch, and reconnects
by itself with capped exponential backoff and jitter. Deliveries wait in its inbox until
the ingest actor (:mod:`actors.ingest`) takes them with :meth:`IngestLink.next_batch`:
everything that arrived while the actor was busy comes as one batch. The actor acks with
:meth:`IngestLink.ack_upto` and dead-letters with :meth:`IngestLink.dead_letter`, which
returns only once the broker confirmed the dead letter, so the ack that covers the
original is sent after it.

Topology (all durable)::

    exchange hub.notifications (topic) --#--> queue hub.notifications
                                               x-dead-letter-exchange=hub.dlx
    exchange hub.dlx (topic) --#--> queue hub.notifications.dead

Dead letters: the hub publishes an invalid message itself to ``hub.dlx`` (same routing
key, body and properties, with ``x-hub-reason`` and ``x-hub-reason-detail`` headers
added) on a channel in confirm mode, then acks the original. The queue's own
``x-dead-letter-exchange`` catches what the broker dead-letters by itself (a TTL or
length limit set by an operator policy); those carry RabbitMQ's ``x-death`` header
instead of ``x-hub-reason``.
"""

from __future__ import annotations

import logging
import random
import uuid
from datetime import UTC, datetime
from typing import Any, NamedTuple

import trio
from pika.spec import Basic as BasicMethods
from pika.spec import BasicProperties, Exchange, Queue

from bridge.amqp_connection import RECONNECT_INITIAL_S, LinkState, redact_url
from bridge.amqp_wire import (
    AmqpChannelClosed,
    AmqpConnection,
    AmqpConnectionLost,
    open_amqp_connection,
)

__all__ = [
    "DEAD_LETTER_EXCHANGE",
    "DEAD_LETTER_QUEUE",
    "EXCHANGE",
    "QUEUE",
    "Delivery",
    "IngestLink",
    "declare_ingest_topology",
]

log = logging.getLogger("hub.bridge.amqp_ingest")

EXCHANGE = "hub.notifications"
QUEUE = "hub.notifications"
DEAD_LETTER_EXCHANGE = "hub.dlx"
DEAD_LETTER_QUEUE = "hub.notifications.dead"
#: Longest ``x-hub-reason-detail`` header value.
MAX_DETAIL_CHARS = 500
#: Longest wait for the broker's confirm of a dead letter (a broker that blocks
#: publishing, a memory or disk alarm); the connection is then made again.
DEAD_LETTER_TIMEOUT_S = 30.0
#: Seconds :meth:`IngestLink.stop` waits for the connection to close.
STOP_TIMEOUT_S = 3.0

_PERSISTENT = 2  # delivery_mode: persistent
_PRECONDITION_FAILED = 406


class Delivery(NamedTuple):
    """One message as received. ``tag`` is only meaningful within ``generation``;
    ``received_at`` is the ``trio.current_time()`` of the socket read that brought it.

    A named tuple: immutable, and cheap to build for every message.
    """

    generation: int
    tag: int
    body: bytes
    properties: BasicProperties
    routing_key: str
    exchange: str
    redelivered: bool
    received_at: float


# -- topology --------------------------------------------------------------------------
async def _declare_queue(
    conn: AmqpConnection, channel: int, name: str, arguments: dict[str, Any]
) -> int:
    """Declare ``name`` durable with ``arguments``; when it already exists with other
    arguments, use it as it is (a warning) rather than refusing to start. Returns the
    channel to keep using (the broker closes the first one on a mismatch)."""
    try:
        await conn.rpc(
            channel, Queue.Declare(queue=name, durable=True, arguments=arguments), Queue.DeclareOk
        )
        return channel
    except AmqpChannelClosed as exc:
        if exc.reply_code != _PRECONDITION_FAILED:
            raise
        log.warning(
            "queue %s exists with other arguments than %s; using it as it is (%s)",
            name,
            arguments,
            exc.reply_text,
        )
        channel = await conn.open_channel()
        await conn.rpc(channel, Queue.Declare(queue=name, passive=True), Queue.DeclareOk)
        return channel


async def _declare_exchange(conn: AmqpConnection, channel: int, name: str) -> int:
    """Declare topic exchange ``name``; one that exists with another type is used as it
    is (a warning), like :func:`_declare_queue`."""
    try:
        await conn.rpc(
            channel,
            Exchange.Declare(exchange=name, type="topic", durable=True),
            Exchange.DeclareOk,
        )
        return channel
    except AmqpChannelClosed as exc:
        if exc.reply_code != _PRECONDITION_FAILED:
            raise
        log.warning("exchange %s exists with other properties; using it as it is", name)
        channel = await conn.open_channel()
        await conn.rpc(channel, Exchange.Declare(exchange=name, passive=True), Exchange.DeclareOk)
        return channel


async def declare_ingest_topology(conn: AmqpConnection, channel: int) -> int:
    """Declare the exchanges, queues and bindings of the module docstring (idempotent).

    Returns:
        The channel to keep using (see :func:`_declare_queue`).
    """
    channel = await _declare_exchange(conn, channel, EXCHANGE)
    channel = await _declare_exchange(conn, channel, DEAD_LETTER_EXCHANGE)
    channel = await _declare_queue(conn, channel, DEAD_LETTER_QUEUE, {})
    await conn.rpc(
        channel,
        Queue.Bind(queue=DEAD_LETTER_QUEUE, exchange=DEAD_LETTER_EXCHANGE, routing_key="#"),
        Queue.BindOk,
    )
    channel = await _declare_queue(
        conn, channel, QUEUE, {"x-dead-letter-exchange": DEAD_LETTER_EXCHANGE}
    )
    await conn.rpc(
        channel, Queue.Bind(queue=QUEUE, exchange=EXCHANGE, routing_key="#"), Queue.BindOk
    )
    return channel


# -- the link --------------------------------------------------------------------------
class IngestLink(LinkState):
    """Consumes ``hub.notifications`` on the trio loop, reconnecting by itself.

    Args:
        url: ``amqp://user:password@host:port/vhost?heartbeat=30``.
        name: the connection's name in the RabbitMQ management UI.
        prefetch: unacked deliveries the broker may push (``basic_qos``).
        node_id: written into dead letters (``x-hub-node``).
        reconnect_max_s: cap of the reconnect backoff.

    :meth:`run` is the link's task (``await nursery.start(link.run)``); it returns after
    :meth:`stop`.

    Backpressure:
        The reader never waits for the actor: deliveries wait in the inbox, and the
        broker stops at ``prefetch`` unacked deliveries, which bounds it.

    Cancellation:
        Cancelling :meth:`run` drops the connection without a polite close: what was not
        acked is redelivered. :meth:`stop` is the polite way: acks queued before it are
        written before the connection closes.
    """

    def __init__(
        self,
        url: str,
        *,
        name: str,
        prefetch: int,
        node_id: str,
        reconnect_max_s: float = 10.0,
    ) -> None:
        super().__init__()
        self.url = url
        self.name = name
        self._prefetch = prefetch
        self._node_id = node_id
        self.reconnect_max_s = max(reconnect_max_s, RECONNECT_INITIAL_S)
        self._conn: AmqpConnection | None = None
        self._channel = 0
        self._dlx_channel = 0
        self._wake = trio.Event()  # stop, a reconnect request, a cancel, a closed channel
        self._reconnect_requested = False
        self._stopping = False
        self._running = False
        self._run_done = trio.Event()
        # the inbox
        self._inbox: list[Delivery] = []
        self._inbox_ready = trio.Event()
        self._waiting = False
        self._deliveries_closed = False
        #: Batches taken by the actor.
        self.batches = 0

    # -- state -------------------------------------------------------------------------
    @property
    def reads(self) -> int:
        """Socket reads of the current connection (0 while there is none)."""
        conn = self._conn
        return conn.reads if conn is not None else 0

    def request_reconnect(self) -> None:
        """Drop the current connection and connect again at once (its unacked
        deliveries are requeued by the broker)."""
        self._reconnect_requested = True
        self._wake.set()

    # -- deliveries --------------------------------------------------------------------
    def _on_delivery(
        self,
        tag: int,
        redelivered: bool,
        exchange: str,
        routing_key: str,
        properties: BasicProperties,
        body: bytes,
    ) -> None:
        # In the reader task, for every delivery: keep it short.
        conn = self._conn
        received_at = conn.last_received if conn is not None else trio.current_time()
        self._inbox.append(
            Delivery(
                self._generation,
                tag,
                body,
                properties,
                routing_key,
                exchange,
                redelivered,
                received_at,
            )
        )
        if self._waiting:
            self._inbox_ready.set()

    async def next_batch(self, limit: int) -> list[Delivery] | None:
        """The deliveries received and not taken yet (at most ``limit``; waits for one),
        or ``None`` once :meth:`close_deliveries` was called.

        Cancellation: safe; nothing is taken from the inbox unless this returns.
        """
        if self._inbox and not self._deliveries_closed:
            await trio.lowlevel.checkpoint()
        while not self._inbox or self._deliveries_closed:
            if self._deliveries_closed:
                return None
            self._waiting = True
            try:
                await self._inbox_ready.wait()
            finally:
                self._waiting = False
                self._inbox_ready = trio.Event()
        inbox = self._inbox
        if len(inbox) <= limit:
            self._inbox = []
            batch = inbox
        else:
            batch = inbox[:limit]
            del inbox[:limit]
        self.batches += 1
        return batch

    def close_deliveries(self) -> None:
        """Make :meth:`next_batch` return ``None`` from now on (the actor stops); what
        waits in the inbox is redelivered by the broker after the close."""
        self._deliveries_closed = True
        self._inbox_ready.set()

    def ack_upto(self, generation: int, tag: int) -> None:
        """Ack every delivery of ``generation`` up to ``tag`` (``multiple=True``); never
        waits (the connection's writer sends it).

        Ignored when the connection of that generation is gone: the broker has already
        requeued those deliveries, and they come back (and are deduplicated).
        """
        conn = self._conn
        if generation != self._generation or conn is None:
            return
        conn.ack(self._channel, tag, multiple=True)

    async def dead_letter(self, delivery: Delivery, reason: str, detail: str) -> bool:
        """Publish ``delivery`` to ``hub.dlx`` with the reason headers and wait for the
        broker's confirm.

        Returns:
            True when the original may be acked: the dead letter is stored, or the
            broker refused it (a nack: logged, and the original is still acked, so an
            invalid message is never redelivered in a loop). False when it is unknown
            whether the dead letter arrived (the connection went away, or no confirm
            came in :data:`DEAD_LETTER_TIMEOUT_S`): then the original must not be acked,
            and the link reconnects, so it is redelivered and judged again.
        """
        conn = self._conn
        if delivery.generation != self._generation or conn is None:
            return False
        props = delivery.properties
        headers = dict(props.headers or {})
        headers.update(
            {
                "x-hub-reason": reason,
                "x-hub-reason-detail": detail[:MAX_DETAIL_CHARS],
                "x-hub-original-exchange": delivery.exchange,
                "x-hub-original-routing-key": delivery.routing_key,
                "x-hub-node": self._node_id,
                "x-hub-dead-lettered-at": datetime.now(UTC).isoformat(timespec="milliseconds"),
            }
        )
        dead_props = BasicProperties(
            content_type=props.content_type,
            content_encoding=props.content_encoding,
            headers=headers,
            delivery_mode=_PERSISTENT,
            priority=props.priority,
            correlation_id=props.correlation_id,
            message_id=props.message_id,
            timestamp=props.timestamp,
            type=props.type,
            app_id=props.app_id,
        )
        outcome: tuple[bool, bool] | None = None
        try:
            with trio.move_on_after(DEAD_LETTER_TIMEOUT_S):
                outcome = await conn.publish_confirmed(
                    self._dlx_channel,
                    DEAD_LETTER_EXCHANGE,
                    delivery.routing_key,
                    delivery.body,
                    dead_props,
                    mandatory=True,
                )
        except (AmqpConnectionLost, AmqpChannelClosed) as exc:
            log.warning("a dead letter was not confirmed (%s); the original comes back", exc)
            self.request_reconnect()
            return False
        if outcome is None:
            log.error(
                "RabbitMQ did not confirm a dead letter in %.0f s; reconnecting",
                DEAD_LETTER_TIMEOUT_S,
            )
            self.request_reconnect()
            return False
        acked, returned = outcome
        if not acked or returned:
            log.error(
                "RabbitMQ refused the dead letter (%s); the invalid message is dropped",
                "unroutable" if returned else "nack",
                extra={"reason": reason, "routing_key": delivery.routing_key},
            )
        return True

    # -- the connection ----------------------------------------------------------------
    def _on_cancelled(self) -> None:
        # The queue was deleted or its node is going away: reconnect (and redeclare).
        log.warning("RabbitMQ cancelled the ingest consumer; reconnecting")
        self.request_reconnect()

    def _on_channel_closed(self, error: AmqpChannelClosed) -> None:
        if error.channel in (self._channel, self._dlx_channel) and self._connected:
            log.warning("an ingest channel was closed by RabbitMQ (%s); reconnecting", error)
            self._last_error = str(error)
            self.request_reconnect()

    async def _set_up(self, conn: AmqpConnection) -> None:
        channel = await declare_ingest_topology(conn, await conn.open_channel())
        await conn.rpc(channel, BasicMethods.Qos(prefetch_count=self._prefetch), BasicMethods.QosOk)
        dlx_channel = await conn.open_channel()
        await conn.confirm_select(dlx_channel)
        conn.on_channel_closed = self._on_channel_closed
        self._channel, self._dlx_channel = channel, dlx_channel
        self._generation += 1  # deliveries from now on belong to this connection
        self._conn = conn
        await conn.consume(
            channel,
            QUEUE,
            f"hub.ingest.{uuid.uuid4().hex}",
            self._on_delivery,
            self._on_cancelled,
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect, consume, reconnect; return after :meth:`stop`."""
        self._running = True
        self._run_done = trio.Event()
        task_status.started()
        delay = RECONNECT_INITIAL_S
        try:
            while not self._stopping:
                error: str | None = None
                self._wake = trio.Event()
                self._reconnect_requested = False
                try:
                    async with open_amqp_connection(self.url, name=self.name) as conn:
                        await self._set_up(conn)
                        self._set_connected(True)
                        log.info(
                            "connected to RabbitMQ",
                            extra={
                                "link": self.name,
                                "generation": self._generation,
                                "url": redact_url(self.url),
                            },
                        )
                        delay = RECONNECT_INITIAL_S
                        if not self._stopping:
                            await self._wake.wait()
                        # Leaving the block writes what was queued (the last acks),
                        # then closes the connection politely.
                except (AmqpConnectionLost, AmqpChannelClosed) as exc:
                    error = str(exc)
                except Exception as exc:  # a bug: log it, reconnect
                    log.exception("the ingest link failed", extra={"link": self.name})
                    error = f"{type(exc).__name__}: {exc}"
                finally:
                    self._conn = None
                    self._inbox = []  # the broker requeues them
                    if self._connected:
                        self._reconnects += 1
                    self._set_connected(False, error or self._last_error)
                if self._stopping:
                    break
                if self._reconnect_requested and error is None:
                    continue  # asked for: connect again at once
                log.warning(
                    "RabbitMQ connection failed (%s); retrying in about %.1fs",
                    error,
                    delay,
                    extra={"link": self.name, "url": redact_url(self.url)},
                )
                with trio.move_on_after(delay * (0.5 + random.random())):
                    await self._wake.wait()
                delay = min(delay * 2, self.reconnect_max_s)
        finally:
            self._running = False
            self._run_done.set()

    async def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> bool:
        """Close the connection politely (acks queued before this are written first)
        and end :meth:`run`. Idempotent.

        Returns:
            True when :meth:`run` ended within ``timeout_s``.
        """
        self._stopping = True
        self.close_deliveries()
        self._wake.set()
        if not self._running:
            return True
        with trio.move_on_after(timeout_s):
            await self._run_done.wait()
        return self._run_done.is_set()
