"""RabbitMQ ingest, the trio side (SPEC §4): validate, dedupe, publish, then ack.

Deliveries arrive from the ingest link (:mod:`bridge.amqp_ingest`, on the same trio
loop): everything that arrived while the previous batch was being handled comes as one
batch. Each message, one at a time and in delivery order:

1. is parsed and validated (:func:`parse_message`); an invalid one is dead-lettered to
   ``hub.dlx`` with ``x-hub-reason`` and logged;
2. gets its id: the message's ``id``, else the AMQP ``message_id`` property, else
   ``"sha256:" + sha256(body)[:32 hex]`` (so identical bodies without ids count as
   repeats of each other within the window);
3. is dropped when that id was published in the last ``AMQP_DEDUPE_TTL_S`` seconds;
4. is handed to fan-out and history with ``await realtime.publish(...)``;
5. only then is its delivery marked done; acks go out in batches (``multiple=True``)
   when ``AMQP_ACK_BATCH`` are done or ``AMQP_ACK_INTERVAL_MS`` after the first one.

A crash (or a lost connection) before step 5 means redelivery; the dedupe window makes
the repeat invisible to clients as long as this process lives.

Cancellation:
    Leaving :func:`open_ingest` stops taking new messages, lets the message being
    published finish (at most :data:`SHUTDOWN_TIMEOUT_S`), flushes the acks, then closes
    the connection; whatever was received and not acked is redelivered by RabbitMQ.

Backpressure:
    RabbitMQ sends at most ``AMQP_PREFETCH`` unacked messages, so at most that many wait
    in the link's inbox for this actor; the rest stays in the queue. The link's reader
    never waits for this actor, so it keeps the connection serviced.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
from bisect import bisect_left
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import trio

from actors.protocol import MAX_CHANNEL_LENGTH, is_known_channel
from bridge.amqp_ingest import Delivery, IngestLink
from bridge.dedupe import Dedupe, MemoryDedupe
from hub.supervisor import supervise

if TYPE_CHECKING:
    from pika.spec import BasicProperties

    from hub.node import Node

__all__ = [
    "MAX_MESSAGE_BYTES",
    "IngestActor",
    "IngestStatistics",
    "InvalidMessage",
    "Notification",
    "open_ingest",
    "parse_message",
]

log = logging.getLogger("hub.actors.ingest")

#: Most deliveries handled under one write-combining batch (what waits in the link's
#: inbox beyond that is the next batch).
MERGE_MAX_DELIVERIES = 256
#: Largest accepted message body (bigger ones are dead-lettered as ``oversize``).
MAX_MESSAGE_BYTES = 64 * 1024
#: Most channels in one message's ``channels``.
MAX_CHANNELS = 100
#: Longest ``id`` and ``event``.
MAX_ID_LENGTH = 128
MAX_EVENT_LENGTH = 128
#: Backoff of a publish that failed for a transient reason (the message is held, unacked).
PUBLISH_RETRY_INITIAL_S = 0.05
PUBLISH_RETRY_MAX_S = 5.0
#: Seconds the graceful stop waits for the message being published.
SHUTDOWN_TIMEOUT_S = 3.0
#: Upper bounds (seconds) of the in-node delay histogram
#: (``hub_amqp_ingest_delay_seconds``; :attr:`IngestStatistics.delay_counts`).
DELAY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

_FIELDS = frozenset({"channel", "channels", "data", "event", "id"})
_EVENT_RE = re.compile(rf"[A-Za-z0-9_.:-]{{1,{MAX_EVENT_LENGTH}}}")


# -- validation ------------------------------------------------------------------------
class InvalidMessage(Exception):
    """A message that can never be published; dead-lettered with ``reason``.

    Attributes:
        reason: ``oversize``, ``invalid_json``, ``invalid_schema``, ``invalid_channel``,
            ``rejected`` (the realtime core refused it) or ``internal_error`` (a bug
            while parsing): the ``x-hub-reason`` header.
        detail: a human sentence, the ``x-hub-reason-detail`` header.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class Notification(NamedTuple):
    """A valid message, ready for ``Realtime.publish`` (a named tuple: immutable and
    cheap to build, one per message)."""

    channels: list[str]
    data: dict[str, Any]
    event: str | None
    id: str


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


#: One decoder for every message (``json.loads`` with options builds one per call).
_DECODER = json.JSONDecoder(parse_constant=_no_constants)


def _channels(message: dict[str, Any]) -> list[str]:
    """The message's channels, without repeats, in their first order (a new list)."""
    if "channel" in message:
        if "channels" in message:
            raise InvalidMessage(
                "invalid_schema", "exactly one of 'channel' or 'channels' is required"
            )
        name = message["channel"]
        if not isinstance(name, str):
            raise InvalidMessage("invalid_schema", "'channel' must be a string")
        _check_channel(name)
        return [name]
    names = message.get("channels")
    if names is None and "channels" not in message:
        raise InvalidMessage("invalid_schema", "exactly one of 'channel' or 'channels' is required")
    if not isinstance(names, list) or not names:
        raise InvalidMessage("invalid_schema", "'channels' must be a non-empty list")
    if len(names) > MAX_CHANNELS:
        raise InvalidMessage("invalid_schema", f"more than {MAX_CHANNELS} channels")
    if not all(isinstance(name, str) for name in names):
        raise InvalidMessage("invalid_schema", "'channels' must hold strings")
    for name in names:
        _check_channel(name)
    return list(dict.fromkeys(names))


def _check_channel(name: str) -> None:
    if not is_known_channel(name):
        shown = name[:MAX_CHANNEL_LENGTH]
        raise InvalidMessage(
            "invalid_channel",
            f"{shown!r} is not a channel: at most {MAX_CHANNEL_LENGTH} characters of "
            "[A-Za-z0-9_.:-] in global, public.*, user.<id>, admin or admin.*",
        )


def derive_id(body: bytes, properties: BasicProperties | None) -> str:
    """The id of a message without one: the AMQP ``message_id`` when usable, else
    ``"sha256:"`` and the first 32 hex digits of the body's SHA-256."""
    message_id = properties.message_id if properties is not None else None
    if isinstance(message_id, str) and 0 < len(message_id) <= MAX_ID_LENGTH:
        return message_id
    return "sha256:" + hashlib.sha256(body).hexdigest()[:32]


def parse_message(body: bytes, properties: BasicProperties | None = None) -> Notification:
    """Validate one AMQP message body (docs/producers.md, "Message format").

    Raises:
        InvalidMessage: with the dead-letter reason.
    """
    if len(body) > MAX_MESSAGE_BYTES:
        raise InvalidMessage("oversize", f"{len(body)} bytes > {MAX_MESSAGE_BYTES}")
    try:
        message = _DECODER.decode(body.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise InvalidMessage("invalid_json", str(exc)[:200]) from None
    if not isinstance(message, dict):
        raise InvalidMessage("invalid_schema", "the body must be a JSON object")
    if not _FIELDS.issuperset(message):
        unknown = sorted(set(message) - _FIELDS)
        raise InvalidMessage("invalid_schema", f"unknown field(s): {', '.join(unknown)[:200]}")
    data = message.get("data")
    if not isinstance(data, dict):
        raise InvalidMessage("invalid_schema", "'data' must be a JSON object")
    channels = _channels(message)
    event = message.get("event")
    if event is not None and not (isinstance(event, str) and _EVENT_RE.fullmatch(event)):
        raise InvalidMessage(
            "invalid_schema", f"'event' must be 1-{MAX_EVENT_LENGTH} characters of [A-Za-z0-9_.:-]"
        )
    raw_id = message.get("id")
    if raw_id is None:
        message_id = derive_id(body, properties)
    elif isinstance(raw_id, int) and not isinstance(raw_id, bool):
        message_id = str(raw_id)
    elif isinstance(raw_id, str) and 0 < len(raw_id) <= MAX_ID_LENGTH and raw_id.isprintable():
        message_id = raw_id
    else:
        raise InvalidMessage(
            "invalid_schema", f"'id' must be a string of 1-{MAX_ID_LENGTH} printable characters"
        )
    return Notification(channels, data, event, message_id)


# -- the actor -------------------------------------------------------------------------
class WriteBatch(Protocol):
    """A reusable ``with`` block that combines fan-out writes (``FanoutBatch``)."""

    def __enter__(self) -> object: ...

    def __exit__(self, *exc_info: object) -> object: ...

    def flush(self) -> None:
        """Write out what is deferred now, the block staying open."""
        ...


class Publisher(Protocol):
    """What ingest needs from the realtime core (``actors.realtime.Realtime``)."""

    async def publish(
        self,
        channels: list[str],
        data: dict[str, Any],
        *,
        event: str | None = None,
        id: str | None = None,
    ) -> Any: ...

    def fanout_batch(self) -> WriteBatch:
        """Open around a batch of publishes: fan-out writes each subscriber once."""
        ...


@dataclass(frozen=True, slots=True)
class IngestStatistics:
    """Counters since start. ``acked``: deliveries covered by acks sent to the broker
    (acks of a connection that was lost meanwhile are counted but never arrive).

    ``delay_counts``/``delay_sum_s``: the in-node delay of every handled delivery, from
    the socket read that brought it to the end of its batch (validated, deduped,
    published, fan-out written): how many fell in each of :data:`DELAY_BUCKETS` (not
    cumulative; the last entry counts those over the largest bound), and their sum.
    Time spent in the inbox waiting for the actor is part of it; RabbitMQ's own
    queueing is not.
    """

    received: int
    published: int
    duplicates: int
    dead_lettered: int
    redelivered: int
    publish_retries: int
    acked: int
    delay_counts: tuple[int, ...]
    delay_sum_s: float


class IngestActor:
    """Consumes delivery batches, publishes valid messages, acks in batches.

    Args:
        publisher: the realtime core.
        dedupe: recently published ids.
        link: the ingest link: deliveries, acks and dead letters.
        ack_batch: flush acks once this many deliveries are done.
        ack_interval_s: flush acks at most this long after the first unflushed one.

    Cancellation:
        :meth:`stop` is the graceful way (see the module docstring); cancelling
        :meth:`run` abandons the message being published: it is redelivered.

    Backpressure:
        One message at a time; the memory channel and the prefetch bound the rest.
    """

    def __init__(
        self,
        publisher: Publisher,
        dedupe: Dedupe,
        link: IngestLink,
        *,
        ack_batch: int,
        ack_interval_s: float,
    ) -> None:
        self._publisher = publisher
        self._dedupe = dedupe
        self._link = link
        #: A connection whose acks must not go out any more (a dead letter of it was
        #: not confirmed: an ack covering it would lose the message).
        self._no_acks_generation = 0
        self._ack_batch = max(1, ack_batch)
        self._ack_interval_s = ack_interval_s
        self._ack_generation = 0
        self._ack_tag = 0
        self._unflushed = 0
        self._ack_due = trio.Event()
        self._stopping = False
        self._running = False
        self._exited = trio.Event()
        self._changed = trio.Event()
        self._received = self._published = self._duplicates = self._dead = 0
        self._redelivered = self._retries = self._acked = 0
        self._delay_counts = [0] * (len(DELAY_BUCKETS) + 1)
        self._delay_sum_s = 0.0

    @property
    def link(self) -> IngestLink:
        """The ingest's RabbitMQ link (``link.statistics()``: connection state)."""
        return self._link

    def statistics(self) -> IngestStatistics:
        return IngestStatistics(
            self._received,
            self._published,
            self._duplicates,
            self._dead,
            self._redelivered,
            self._retries,
            self._acked,
            tuple(self._delay_counts),
            self._delay_sum_s,
        )

    async def wait_until(self, predicate: Callable[[IngestStatistics], bool]) -> None:
        """Return once ``predicate(self.statistics())`` holds (tests, benchmarks)."""
        while not predicate(self.statistics()):
            await self._changed.wait()

    def _bump(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    # -- acks --------------------------------------------------------------------------
    def _done(self, delivery: Delivery) -> None:
        if delivery.generation != self._ack_generation:
            self._flush_acks()
            self._ack_generation = delivery.generation
        self._ack_tag = delivery.tag
        self._unflushed += 1
        if self._unflushed >= self._ack_batch:
            self._flush_acks()
        elif self._unflushed == 1:
            self._ack_due.set()

    def _flush_acks(self) -> None:
        if self._unflushed:
            if self._ack_generation != self._no_acks_generation:
                self._link.ack_upto(self._ack_generation, self._ack_tag)
            self._acked += self._unflushed
            self._unflushed = 0
            self._bump()
        if self._ack_due.is_set():
            self._ack_due = trio.Event()

    async def _ack_timer(self) -> None:
        while True:
            await self._ack_due.wait()
            await trio.sleep(self._ack_interval_s)
            self._flush_acks()

    # -- messages ----------------------------------------------------------------------
    async def _dead_letter(self, delivery: Delivery, error: InvalidMessage) -> None:
        """Dead-letter ``delivery``; returns once the broker confirmed it (or refused
        it). When that is unknown, no more acks go out on its connection, which the link
        replaces: the message is redelivered and judged again."""
        if not await self._link.dead_letter(delivery, error.reason, error.detail):
            self._flush_acks()  # the deliveries before it are done
            self._no_acks_generation = delivery.generation
            return
        self._dead += 1
        log.warning(
            "invalid message dead-lettered to hub.dlx: %s",
            error,
            extra={
                "reason": error.reason,
                "routing_key": delivery.routing_key,
                "message_id": delivery.properties.message_id,
                "bytes": len(delivery.body),
            },
        )

    async def _publish(self, message: Notification) -> None:
        backoff = PUBLISH_RETRY_INITIAL_S
        while True:
            try:
                await self._publisher.publish(
                    message.channels, message.data, event=message.event, id=message.id
                )
                return
            except (ValueError, TypeError) as exc:  # the realtime core refused this message
                raise InvalidMessage("rejected", str(exc)[:200] or type(exc).__name__) from exc
            except Exception as exc:  # transient (history store down…): hold and retry
                self._retries += 1
                delay = backoff * (0.5 + random.random())
                log.warning(
                    "publish failed, retrying in %.2fs (the message stays unacked): %s",
                    delay,
                    exc,
                    extra={"message_id": message.id},
                )
                # What this batch published before stays deferred no longer.
                self._publisher.fanout_batch().flush()
                await trio.sleep(delay)
                backoff = min(backoff * 2, PUBLISH_RETRY_MAX_S)

    async def _handle(self, delivery: Delivery) -> None:
        self._received += 1
        if delivery.redelivered:
            self._redelivered += 1
        try:
            try:
                message = parse_message(delivery.body, delivery.properties)
            except InvalidMessage:
                raise
            except Exception as exc:  # a bug must not turn one message into a stall loop
                log.exception("could not parse a message; dead-lettering it")
                raise InvalidMessage("internal_error", type(exc).__name__) from exc
            if await self._dedupe.seen(message.id):
                self._duplicates += 1
                return
            await self._publish(message)
        except InvalidMessage as error:
            await self._dead_letter(delivery, error)
            return
        await self._dedupe.remember(message.id)
        self._published += 1

    async def _consume(self) -> None:
        # No checkpoint of its own: next_batch() is one, batch or not. A node that falls
        # behind gets everything that arrived meanwhile (up to MERGE_MAX_DELIVERIES) as
        # one batch and writes each subscriber once for all of it, which is how it
        # catches up; next_batch() returns None once stop() closed the deliveries.
        while not self._stopping:
            batch = await self._link.next_batch(MERGE_MAX_DELIVERIES)
            if batch is None:
                return
            # Small channels write each subscriber once per batch, not once per
            # message: a backlog drains with a fraction of the system calls.
            with self._publisher.fanout_batch():
                for delivery in batch:
                    if self._stopping:
                        return
                    await self._handle(delivery)
                    self._done(delivery)
            self._count_delays(batch)
            self._bump()

    def _count_delays(self, batch: list[Delivery]) -> None:
        """Add the batch's in-node delays to the histogram: one clock read per batch,
        one bucket lookup per socket read the batch came from."""
        now = trio.current_time()
        counts = self._delay_counts
        last_read = None
        index = 0
        delay = total = 0.0
        for delivery in batch:
            if delivery.received_at != last_read:
                last_read = delivery.received_at
                delay = now - last_read
                index = bisect_left(DELAY_BUCKETS, delay)
            counts[index] += 1
            total += delay
        self._delay_sum_s += total

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Consume until :meth:`stop` (returns) or a crash (raises; the connection is
        recycled first, so deliveries this run did not finish are redelivered)."""
        self._running = True
        self._exited = trio.Event()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._ack_timer)
                task_status.started()
                await self._consume()
                nursery.cancel_scope.cancel()
        except BaseException:
            self._flush_acks()  # everything marked done was published
            self._link.request_reconnect()
            raise
        finally:
            self._flush_acks()
            self._running = False
            self._exited.set()

    async def stop(self) -> None:
        """Stop consuming: let the message being published finish, flush the acks, then
        close the connection (RabbitMQ requeues whatever was received and not done, for
        other nodes or the next start). Idempotent.

        Call it when the node starts shutting down, before its WebSockets are drained,
        so no message is acked that no client can receive any more; leaving
        :func:`open_ingest` calls it too.

        Cancellation:
            Callers bound it (``open_ingest`` shields it with a deadline); cancelled,
            the connection is closed without the last acks (those messages come back).
        """
        self._stopping = True
        self._link.close_deliveries()  # ends a wait for the next batch
        if self._running:
            await self._exited.wait()
        self._flush_acks()  # queued before the link's polite close, so written first
        await self._link.stop()


@asynccontextmanager
async def open_ingest(node: Node) -> AsyncIterator[IngestActor | None]:
    """Consume ``hub.notifications`` into ``node.realtime`` while the block runs.

    Yields ``None`` (and does nothing) when ``AMQP_URL`` is not set. Registers
    ``node.ready_checks["rabbitmq"]`` (503 on ``/ready`` while the broker is away),
    combined with the check already there (the e-mail queue's), if any.
    The block is entered without waiting for the broker; the link connects and
    reconnects (capped exponential backoff with jitter) on its own.

    Resource handling:
        Leaving the block stops gracefully (see the module docstring), bounded by
        :data:`SHUTDOWN_TIMEOUT_S` in all, even when cancelled.
    """
    settings = node.settings
    if not settings.amqp_url:
        yield None
        return
    link = IngestLink(
        settings.amqp_url,
        name=f"{settings.hub_node_id}/ingest",
        prefetch=settings.amqp_prefetch,
        node_id=settings.hub_node_id,
        reconnect_max_s=settings.amqp_reconnect_max_s,
    )
    dedupe = MemoryDedupe(settings.amqp_dedupe_ttl_s, max_keys=settings.amqp_dedupe_max_keys)
    actor = IngestActor(
        node.realtime,
        dedupe,
        link,
        ack_batch=min(settings.amqp_ack_batch, max(1, settings.amqp_prefetch // 2)),
        ack_interval_s=settings.amqp_ack_interval_ms / 1000,
    )
    # One "rabbitmq" check for every RabbitMQ connection of the node: the e-mail queue
    # may have registered its own already.
    other_check = node.ready_checks.get("rabbitmq")

    async def check_rabbitmq() -> None:
        await link.check_ready()
        if other_check is not None:
            await other_check()

    node.ready_checks["rabbitmq"] = check_rabbitmq
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(link.run)
            await nursery.start(supervise, "amqp-ingest", actor.run)
            try:
                yield actor
            finally:
                with trio.CancelScope(shield=True) as scope:
                    scope.deadline = trio.current_time() + SHUTDOWN_TIMEOUT_S
                    await actor.stop()
                nursery.cancel_scope.cancel()
    finally:
        if other_check is not None:
            node.ready_checks["rabbitmq"] = other_check
        else:
            node.ready_checks.pop("rabbitmq", None)
