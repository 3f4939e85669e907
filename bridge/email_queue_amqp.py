"""The e-mail job queue on RabbitMQ: :class:`AmqpEmailQueue` (SPEC §4).

Same interface as the in-process queue (:class:`bridge.email_queue.EmailQueue`), so the
worker (:mod:`actors.email_worker`) does not know which one it runs on. Topology (all
durable, default exchange)::

    email_queue                jobs; x-dead-letter-routing-key=email_queue.dead
    email_queue.delay.<ms>     retries wait here: x-message-ttl=<ms>, then RabbitMQ
                               dead-letters them back to email_queue (x-expires removes
                               an unused delay queue after <ms> + 60 s)
    email_queue.dead           jobs given up on, with x-hub-reason

* ``put`` publishes persistent with publisher confirms: when it returns, RabbitMQ has
  the job on disk.
* ``get`` takes a delivered job (manual ack, prefetch :data:`EMAIL_PREFETCH`).
* ``retry`` publishes the updated job to the delay queue (confirmed), then acks the
  original; ``dead`` publishes to ``email_queue.dead`` (confirmed), then acks. Both run
  as one step in the link thread, so the original is never acked before its successor
  is stored.
* A body that is not a job is moved to ``email_queue.dead`` at once (``malformed``).

Delivery is at least once: when the connection drops while a job is being sent, RabbitMQ
requeues it and it is sent again (its ``attempts`` may then be counted once less).

Resource handling:
    :func:`open_amqp_email_queue` owns the link thread; leaving it closes the
    connection (jobs taken and not acked are requeued by RabbitMQ).
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict, deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import Any

import pika
import pika.exceptions
import trio
from pika.adapters.blocking_connection import BlockingChannel, BlockingConnection
from pika.spec import Basic, BasicProperties

from bridge.amqp_connection import AmqpLink, AmqpUnavailable, LinkStop, open_amqp_link
from bridge.email_queue import BadJob, EmailJob, QueueUnavailable

__all__ = [
    "DEAD_QUEUE",
    "EMAIL_PREFETCH",
    "QUEUE",
    "AmqpEmailQueue",
    "open_amqp_email_queue",
]

log = logging.getLogger("hub.bridge.email_queue_amqp")

QUEUE = "email_queue"
DEAD_QUEUE = "email_queue.dead"
DELAY_QUEUE_PREFIX = "email_queue.delay."
#: Jobs RabbitMQ may push before they are acked (the worker sends 5 at a time).
EMAIL_PREFETCH = 10
#: Seconds ``put`` waits for a connection before raising ``AmqpUnavailable``.
PUT_CONNECT_TIMEOUT_S = 5.0
#: Seconds an unused delay queue outlives its delay.
DELAY_QUEUE_GRACE_MS = 60_000
#: Seconds one hand-off to trio waits before the thread services the connection again.
HANDOFF_WAIT_S = 0.25

_PERSISTENT = 2  # delivery_mode


@dataclass(frozen=True, slots=True)
class _Handle:
    generation: int
    tag: int


def _props(job_id: str, headers: dict[str, Any] | None = None) -> BasicProperties:
    return BasicProperties(
        content_type="application/json",
        delivery_mode=_PERSISTENT,
        message_id=job_id,
        headers=headers,
    )


def _body(job: EmailJob) -> bytes:
    return json.dumps(job.to_json(), ensure_ascii=False).encode()


class _EmailLinkHandler:
    """The link-thread side: consumer, confirmed publishes, acks."""

    def __init__(
        self, send: trio.MemorySendChannel[tuple[EmailJob, _Handle]], *, node_id: str
    ) -> None:
        self._send = send
        self._node_id = node_id
        self._token = trio.lowlevel.current_trio_token()
        self._connection: BlockingConnection | None = None
        self._consume: BlockingChannel | None = None
        self._publish: BlockingChannel | None = None
        self._generation = 0
        self._buffer: list[tuple[EmailJob, _Handle]] = []

    # -- LinkHandler -------------------------------------------------------------------
    def on_connected(self, connection: BlockingConnection, generation: int) -> None:
        consume = connection.channel()
        consume.queue_declare(DEAD_QUEUE, durable=True)
        consume.queue_declare(
            QUEUE,
            durable=True,
            arguments={"x-dead-letter-exchange": "", "x-dead-letter-routing-key": DEAD_QUEUE},
        )
        consume.basic_qos(prefetch_count=EMAIL_PREFETCH)
        publish = connection.channel()
        publish.confirm_delivery()
        self._connection, self._consume, self._publish = connection, consume, publish
        self._generation = generation
        consume.basic_consume(QUEUE, self._on_message, auto_ack=False)

    def on_events(self) -> None:
        for channel in (self._consume, self._publish):
            if channel is not None and channel.is_closed:  # closed by the broker: start over
                raise pika.exceptions.ChannelClosed(0, "an e-mail queue channel was closed")
        while self._buffer:
            item = self._buffer[0]
            try:
                accepted = trio.from_thread.run(self._offer, item, trio_token=self._token)
            except (trio.BrokenResourceError, trio.ClosedResourceError, trio.RunFinishedError):
                raise LinkStop("e-mail queue closed") from None
            except trio.Cancelled:
                raise LinkStop("e-mail queue cancelled") from None
            if accepted:
                self._buffer.pop(0)
            else:
                assert self._connection is not None
                self._connection.process_data_events(time_limit=0)

    async def _offer(self, item: tuple[EmailJob, _Handle]) -> bool:
        with trio.move_on_after(HANDOFF_WAIT_S):
            await self._send.send(item)
            return True
        return False

    def on_disconnected(self) -> None:
        self._connection = self._consume = self._publish = None
        self._buffer = []

    def _on_message(
        self,
        channel: BlockingChannel,
        method: Basic.Deliver,
        properties: BasicProperties,
        body: bytes,
    ) -> None:
        handle = _Handle(self._generation, method.delivery_tag)
        try:
            job = EmailJob.from_json(json.loads(body))
        except (ValueError, BadJob) as exc:
            log.error("malformed e-mail job moved to %s: %s", DEAD_QUEUE, exc)
            self._park(handle, body, properties.message_id or "", f"malformed: {exc}")
            return
        self._buffer.append((job, handle))

    # -- run in the link thread through AmqpLink.call / call_soon -----------------------
    def _current(self, handle: _Handle) -> bool:
        return handle.generation == self._generation and self._consume is not None

    def put(self, job: EmailJob) -> None:
        assert self._publish is not None
        self._publish.basic_publish("", QUEUE, _body(job), _props(job.job_id), mandatory=True)

    def ack(self, handle: _Handle) -> None:
        if self._current(handle):
            assert self._consume is not None
            self._consume.basic_ack(handle.tag)

    def retry(self, handle: _Handle, job: EmailJob, delay_s: float) -> None:
        if not self._current(handle):
            return  # the original is back in email_queue already
        assert self._publish is not None and self._consume is not None
        delay_ms = max(1, round(delay_s * 1000))
        queue = f"{DELAY_QUEUE_PREFIX}{delay_ms}"
        self._publish.queue_declare(
            queue,
            durable=True,
            arguments={
                "x-message-ttl": delay_ms,
                "x-dead-letter-exchange": "",
                "x-dead-letter-routing-key": QUEUE,
                "x-expires": delay_ms + DELAY_QUEUE_GRACE_MS,
            },
        )
        try:
            self._publish.basic_publish("", queue, _body(job), _props(job.job_id), mandatory=True)
        except (pika.exceptions.NackError, pika.exceptions.UnroutableError) as exc:
            log.error("RabbitMQ refused the retry of e-mail job %s: %s", job.job_id, exc)
            self._consume.basic_nack(handle.tag, requeue=True)
            return
        self._consume.basic_ack(handle.tag)

    def dead(self, handle: _Handle, job: EmailJob, reason: str) -> None:
        if self._current(handle):
            self._park(handle, _body(job), job.job_id, reason)

    def _park(self, handle: _Handle, body: bytes, job_id: str, reason: str) -> None:
        assert self._publish is not None and self._consume is not None
        headers = {
            "x-hub-reason": reason[:500],
            "x-hub-node": self._node_id,
            "x-hub-dead-lettered-at": datetime.now(UTC).isoformat(timespec="milliseconds"),
        }
        try:
            self._publish.basic_publish(
                "", DEAD_QUEUE, body, _props(job_id, headers), mandatory=True
            )
        except (pika.exceptions.NackError, pika.exceptions.UnroutableError) as exc:
            log.error("RabbitMQ refused the dead e-mail job %s: %s", job_id, exc)
            self._consume.basic_nack(handle.tag, requeue=True)
            return
        self._consume.basic_ack(handle.tag)


class AmqpEmailQueue:
    """:class:`bridge.email_queue.EmailQueue` on RabbitMQ. Create it with
    :func:`open_amqp_email_queue`.

    Backpressure:
        ``put`` waits for the broker's confirm. ``get`` waits for a delivery; at most
        :data:`EMAIL_PREFETCH` jobs are delivered and not yet acked.

    Cancellation:
        ``get`` can be cancelled without losing a job. Cancelling ``put`` after it was
        submitted may still enqueue the job. ``ack``/``retry``/``dead`` lost with the
        connection leave the job to be redelivered (at least once).
    """

    def __init__(
        self,
        link: AmqpLink,
        handler: _EmailLinkHandler,
        receive: trio.MemoryReceiveChannel[tuple[EmailJob, _Handle]],
    ) -> None:
        self._link = link
        self._handler = handler
        self._receive = receive
        self._handles: defaultdict[str, deque[_Handle]] = defaultdict(deque)

    @property
    def link(self) -> AmqpLink:
        return self._link

    async def check_ready(self) -> None:
        """Readiness check for ``node.ready_checks`` (raises while disconnected)."""
        await self._link.check_ready()

    def _take(self, job: EmailJob) -> _Handle | None:
        handles = self._handles.get(job.job_id)
        if not handles:
            log.warning("e-mail job %s is not one this queue delivered", job.job_id)
            return None
        handle = handles.popleft()
        if not handles:
            del self._handles[job.job_id]
        return handle

    async def put(self, job: EmailJob) -> None:
        """Store ``job`` in ``email_queue`` (confirmed by RabbitMQ).

        Raises:
            QueueUnavailable: no connection within :data:`PUT_CONNECT_TIMEOUT_S`, or it
                was lost before the confirm (the job may or may not be stored).
        """
        try:
            await self._link.call(
                partial(self._handler.put, job), connect_timeout_s=PUT_CONNECT_TIMEOUT_S
            )
        except AmqpUnavailable as exc:
            raise QueueUnavailable(str(exc)) from exc

    async def get(self) -> EmailJob:
        job, handle = await self._receive.receive()
        self._handles[job.job_id].append(handle)
        return job

    async def ack(self, job: EmailJob) -> None:
        handle = self._take(job)
        if handle is not None:
            self._link.call_soon(partial(self._handler.ack, handle))
        await trio.lowlevel.checkpoint()

    async def retry(self, job: EmailJob, delay_s: float) -> None:
        handle = self._take(job)
        if handle is None:
            await trio.lowlevel.checkpoint()
            return
        try:
            await self._link.call(partial(self._handler.retry, handle, job, delay_s))
        except AmqpUnavailable as exc:
            log.warning(
                "retry of e-mail job %s not stored (%s); RabbitMQ redelivers it", job.job_id, exc
            )

    async def dead(self, job: EmailJob, reason: str) -> None:
        handle = self._take(job)
        if handle is None:
            await trio.lowlevel.checkpoint()
            return
        try:
            await self._link.call(partial(self._handler.dead, handle, job, reason))
        except AmqpUnavailable as exc:
            log.warning(
                "dead e-mail job %s not stored (%s); RabbitMQ redelivers it", job.job_id, exc
            )

    def statistics(self) -> dict[str, int]:
        """``taken``: jobs handed to the worker and not yet acked, retried or dead;
        ``buffered``: delivered jobs waiting for the worker."""
        buffered = self._receive.statistics().current_buffer_used
        return {"taken": sum(len(h) for h in self._handles.values()), "buffered": buffered}


@asynccontextmanager
async def open_amqp_email_queue(
    url: str, *, node_id: str, reconnect_max_s: float = 10.0
) -> AsyncIterator[AmqpEmailQueue]:
    """Connect (in the background, with reconnects) and yield the queue at once.

    Resource handling:
        Leaving the block closes the connection within the link's stop timeout.
    """
    send, receive = trio.open_memory_channel[tuple[EmailJob, _Handle]](EMAIL_PREFETCH)
    handler = _EmailLinkHandler(send, node_id=node_id)
    async with open_amqp_link(
        url, name=f"{node_id}/email", handler=handler, reconnect_max_s=reconnect_max_s
    ) as link:
        try:
            yield AmqpEmailQueue(link, handler, receive)
        finally:
            receive.close()
