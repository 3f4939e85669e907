"""The RabbitMQ side of ingest (SPEC §4): topology, the consumer, acks and dead letters.

:class:`IngestConsumer` is the :class:`~bridge.amqp_connection.LinkHandler` of the
ingest link. In the link thread it declares the topology, consumes ``hub.notifications``
with manual acks and a prefetch, and hands deliveries to trio without waiting: they
join an outbox, and trio is woken only when no wake-up is pending already, so a busy
trio side takes everything that arrived meanwhile as one batch (one wake-up per batch,
not per round of the connection). The trio side
(:mod:`actors.ingest`) acks through :meth:`IngestConsumer.ack_upto` and dead-letters
through :meth:`IngestConsumer.dead_letter`, both submitted with
:meth:`~bridge.amqp_connection.AmqpLink.call_soon`, so they run in the link thread in
the order they were submitted: a dead letter is always published (and confirmed)
before the ack that covers the original.

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
import threading
import time
import uuid
from datetime import UTC, datetime
from typing import Any, NamedTuple

import pika
import pika.exceptions
import trio
from pika.adapters.blocking_connection import BlockingChannel, BlockingConnection
from pika.spec import Basic, BasicProperties

from bridge.amqp_connection import LinkStop
from bridge.amqp_fastpath import DeliveryReader

__all__ = [
    "DEAD_LETTER_EXCHANGE",
    "DEAD_LETTER_QUEUE",
    "EXCHANGE",
    "QUEUE",
    "Delivery",
    "IngestConsumer",
    "declare_ingest_topology",
]

log = logging.getLogger("hub.bridge.amqp_ingest")

EXCHANGE = "hub.notifications"
QUEUE = "hub.notifications"
DEAD_LETTER_EXCHANGE = "hub.dlx"
DEAD_LETTER_QUEUE = "hub.notifications.dead"
#: Longest ``x-hub-reason-detail`` header value.
MAX_DETAIL_CHARS = 500

_PERSISTENT = 2  # delivery_mode: persistent


class Delivery(NamedTuple):
    """One message as received. ``tag`` is only meaningful within ``generation``.

    A named tuple: immutable, and built for every message in the link thread at a
    third of the cost of a frozen dataclass.
    """

    generation: int
    tag: int
    body: bytes
    properties: BasicProperties
    routing_key: str
    exchange: str
    redelivered: bool


def _declare_queue(
    connection: BlockingConnection, channel: BlockingChannel, name: str, arguments: dict[str, Any]
) -> BlockingChannel:
    """Declare ``name`` durable with ``arguments``; when it already exists with other
    arguments, use it as it is (a warning) rather than refusing to start. Returns the
    channel to keep using (the broker closes the first one on a mismatch)."""
    try:
        channel.queue_declare(name, durable=True, arguments=arguments)
        return channel
    except pika.exceptions.ChannelClosedByBroker as exc:
        if exc.reply_code != 406:  # PRECONDITION_FAILED
            raise
        log.warning(
            "queue %s exists with other arguments than %s; using it as it is (%s)",
            name,
            arguments,
            exc.reply_text,
        )
        channel = connection.channel()
        channel.queue_declare(name, passive=True)
        return channel


def _declare_exchange(
    connection: BlockingConnection, channel: BlockingChannel, name: str
) -> BlockingChannel:
    """Declare topic exchange ``name``; one that exists with another type is used as it
    is (a warning), like :func:`_declare_queue`."""
    try:
        channel.exchange_declare(name, exchange_type="topic", durable=True)
        return channel
    except pika.exceptions.ChannelClosedByBroker as exc:
        if exc.reply_code != 406:
            raise
        log.warning("exchange %s exists with other properties; using it as it is", name)
        channel = connection.channel()
        channel.exchange_declare(name, passive=True)
        return channel


def declare_ingest_topology(
    connection: BlockingConnection, channel: BlockingChannel
) -> BlockingChannel:
    """Declare the exchanges, queues and bindings of the module docstring (idempotent).

    Returns:
        The channel to keep using (see :func:`_declare_queue`).
    """
    channel = _declare_exchange(connection, channel, EXCHANGE)
    channel = _declare_exchange(connection, channel, DEAD_LETTER_EXCHANGE)
    channel = _declare_queue(connection, channel, DEAD_LETTER_QUEUE, {})
    channel.queue_bind(DEAD_LETTER_QUEUE, DEAD_LETTER_EXCHANGE, routing_key="#")
    channel = _declare_queue(
        connection, channel, QUEUE, {"x-dead-letter-exchange": DEAD_LETTER_EXCHANGE}
    )
    channel.queue_bind(QUEUE, EXCHANGE, routing_key="#")
    return channel


class IngestConsumer:
    """Consumes ``hub.notifications`` in the link thread and feeds batches to trio.

    Args:
        send: where batches of :class:`Delivery` go (a bounded trio memory channel).
        prefetch: unacked deliveries the broker may push (``basic_qos``).
        node_id: written into dead letters (``x-hub-node``).
        handoff_interval_s: hand deliveries to trio at most this often. The first
            delivery after a quiet spell goes at once; under steady traffic, deliveries
            wait up to this long and go as one batch, which costs the trio side (a
            wake-up, a task switch, a fan-out write per subscriber) once per batch.

    Backpressure:
        The link thread never waits for trio: it keeps servicing the connection
        (heartbeats, acks, a close from the broker). Deliveries not yet taken by trio
        wait in the outbox, and when the memory channel is full, in one pending send;
        the broker stops at ``prefetch`` unacked deliveries, which bounds both.

    Cancellation:
        The pending send (a trio system task) ends when the receiving side is closed
        or the run ends; its deliveries are then redelivered by the broker.
    """

    def __init__(
        self,
        send: trio.MemorySendChannel[list[Delivery]],
        *,
        prefetch: int,
        node_id: str,
        handoff_interval_s: float = 0.0,
    ) -> None:
        self._send = send
        self._prefetch = prefetch
        self._node_id = node_id
        self._token = trio.lowlevel.current_trio_token()
        self._connection: BlockingConnection | None = None
        self._channel: BlockingChannel | None = None
        self._dlx_channel: BlockingChannel | None = None
        #: The reader of the current connection's deliveries (link thread only).
        self.reader: DeliveryReader | None = None
        self._generation = 0
        self._buffer: list[Delivery] = []  # link thread only
        self._handoff_interval_s = handoff_interval_s
        self._last_handoff = 0.0  # link thread only
        self._timer_armed = False  # link thread only
        #: Batches the link thread handed to trio.
        self.handoffs = 0
        self._cancelled = False
        # The outbox and its wake-up flag are shared by the link thread and trio.
        self._lock = threading.Lock()
        self._outbox: list[Delivery] = []
        self._wake_pending = False  # a _hand_over is queued in trio
        self._sending = False  # trio only: a send waits for room in the channel
        self._closed = False  # the trio side stopped taking deliveries
        self.dead_lettered = 0
        #: Hand-offs that found the memory channel full (trio was behind).
        self.held_batches = 0

    # -- LinkHandler -------------------------------------------------------------------
    def on_connected(self, connection: BlockingConnection, generation: int) -> None:
        channel = declare_ingest_topology(connection, connection.channel())
        channel.basic_qos(prefetch_count=self._prefetch)
        dlx_channel = connection.channel()
        dlx_channel.confirm_delivery()
        self._generation = generation
        self._cancelled = False
        self._timer_armed = False  # a timer of the previous connection died with it
        # Deliveries go straight to the buffer. The DeliveryReader parses them out of
        # the received bytes (pika's frame objects, callbacks and buffer copies were
        # most of the link thread's CPU per message: benchmarks.ingest_cpu); what it
        # leaves to pika arrives through the consumer sink, which pika's own
        # BlockingChannel.consume() uses too (_basic_consume_impl(alternate_event_sink=
        # …); pyproject pins pika below 2). The broker's cancel arrives there as well.
        consumer_tag = f"hub.ingest.{uuid.uuid4().hex}"
        self.reader = DeliveryReader(
            connection._impl, channel._impl, consumer_tag, self._on_delivery
        )
        channel._basic_consume_impl(
            queue=QUEUE,
            auto_ack=False,
            exclusive=False,
            consumer_tag=consumer_tag,
            alternate_event_sink=self._on_consumer_event,
        )
        self._channel, self._dlx_channel = channel, dlx_channel
        self._connection = connection

    def on_events(self) -> None:
        if self._cancelled:
            raise pika.exceptions.ConsumerCancelled("the broker cancelled the consumer")
        for channel in (self._channel, self._dlx_channel):
            if channel is not None and channel.is_closed:  # closed by the broker: start over
                raise pika.exceptions.ChannelClosed(0, "an ingest channel was closed")
        if self._closed:
            raise LinkStop("ingest stopped")
        if not self._buffer:
            return
        if self._handoff_interval_s:
            now = time.monotonic()
            wait = self._last_handoff + self._handoff_interval_s - now
            if wait > 0:  # too soon after the last one: keep collecting
                self._arm_handoff()
                return
            self._last_handoff = now
        self.handoffs += 1
        batch, self._buffer = self._buffer, []
        with self._lock:
            self._outbox += batch
            if self._wake_pending:
                return  # trio has not taken the last ones yet: it takes these too
            self._wake_pending = True
        try:
            self._token.run_sync_soon(self._hand_over)
        except trio.RunFinishedError:
            raise LinkStop("ingest stopped") from None

    def _arm_handoff(self) -> None:
        """Make ``process_data_events`` return when the buffer is due (a pika timer:
        nothing else wakes the link thread for deliveries)."""
        if self._timer_armed or self._connection is None:
            return
        self._timer_armed = True
        wait = max(0.0, self._last_handoff + self._handoff_interval_s - time.monotonic())
        self._connection.call_later(wait, self._on_handoff_due)

    def _on_handoff_due(self) -> None:
        # A timer of the link thread: process_data_events returns, on_events hands over.
        self._timer_armed = False

    # -- in trio -----------------------------------------------------------------------
    def _take_outbox(self) -> list[Delivery]:
        with self._lock:
            self._wake_pending = False
            batch, self._outbox = self._outbox, []
        return batch

    def _hand_over(self) -> None:
        """In trio (``run_sync_soon``): move the outbox into the memory channel; when
        the channel is full, a system task waits for room (and takes whatever reaches
        the outbox meanwhile, in order)."""
        if self._sending:
            with self._lock:
                self._wake_pending = False  # _send_when_room takes the outbox
            return
        batch = self._take_outbox()
        if not batch:
            return
        try:
            self._send.send_nowait(batch)
        except trio.WouldBlock:
            self.held_batches += 1
            self._sending = True
            trio.lowlevel.spawn_system_task(self._send_when_room, batch)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._closed = True

    async def _send_when_room(self, batch: list[Delivery]) -> None:
        try:
            while batch:
                await self._send.send(batch)
                batch = self._take_outbox()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._closed = True
        finally:
            self._sending = False

    def on_disconnected(self) -> None:
        self._channel = self._dlx_channel = None
        self._connection = None
        self._buffer = []
        with self._lock:  # the broker requeues them
            self._outbox = []

    def _on_consumer_event(self, evt: Any) -> None:
        """What pika delivers to the ingest consumer itself, in the link thread: the
        deliveries the :class:`DeliveryReader` left to pika, and the broker's cancel of
        the consumer (the sink replaces pika's consumer callbacks)."""
        method = getattr(evt, "method", None)
        if type(method) is not Basic.Deliver:  # a _ConsumerCancellationEvt
            self._on_cancelled(evt)
            return
        self._on_delivery(
            method.delivery_tag,
            method.redelivered,
            method.exchange,
            method.routing_key,
            evt.properties,
            evt.body,
        )

    def _on_delivery(
        self,
        tag: int,
        redelivered: bool,
        exchange: str,
        routing_key: str,
        properties: BasicProperties,
        body: bytes,
    ) -> None:
        """A delivery, in the link thread (from the :class:`DeliveryReader` or pika): it
        joins the buffer, and the first of a batch arms the hand-over."""
        buffer = self._buffer
        buffer.append(
            Delivery(self._generation, tag, body, properties, routing_key, exchange, redelivered)
        )
        if len(buffer) == 1:
            self._arm_handoff()

    def _on_cancelled(self, frame: Any) -> None:
        # The queue was deleted or the node is going away: reconnect (and redeclare).
        log.warning("RabbitMQ cancelled the ingest consumer; reconnecting")
        self._cancelled = True

    # -- called in the link thread through AmqpLink.call_soon ---------------------------
    def ack_upto(self, generation: int, tag: int) -> None:
        """Ack every delivery of ``generation`` up to ``tag`` (``multiple=True``).

        Ignored when the connection of that generation is gone: the broker has already
        requeued those deliveries, and they come back (and are deduplicated).
        """
        channel = self._channel
        if generation != self._generation or channel is None or not channel.is_open:
            return
        channel.basic_ack(delivery_tag=tag, multiple=True)

    def dead_letter(self, delivery: Delivery, reason: str, detail: str) -> None:
        """Publish ``delivery`` to ``hub.dlx`` with the reason headers and wait for the
        broker's confirm. The ack of the original is submitted after this call by the
        trio side, so it reaches the broker only after the dead letter is stored.

        A nack from the broker is logged and the original is still acked: an invalid
        message is never redelivered in a loop.
        """
        channel = self._dlx_channel
        if delivery.generation != self._generation or channel is None or not channel.is_open:
            return  # the original is redelivered and judged again
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
        try:
            channel.basic_publish(
                DEAD_LETTER_EXCHANGE,
                delivery.routing_key,
                delivery.body,
                dead_props,
                mandatory=True,
            )
            self.dead_lettered += 1
        except (pika.exceptions.NackError, pika.exceptions.UnroutableError) as exc:
            log.error(
                "RabbitMQ refused the dead letter (%s); the invalid message is dropped",
                type(exc).__name__,
                extra={"reason": reason, "routing_key": delivery.routing_key},
            )
