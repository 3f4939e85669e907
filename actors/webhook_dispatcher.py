"""The webhook dispatcher: queues events as durable deliveries and sends them (SPEC §5).

Events come from two places:

* :meth:`WebhookDispatcher.on_published`, awaited by ``Realtime.publish`` for every
  message that has an ``event`` (REST ``POST /notifications`` and RabbitMQ alike): the
  deliveries are stored before the publish returns, so a RabbitMQ message is acked, and
  a REST publish answered, only once its webhooks are queued;
* :meth:`WebhookDispatcher.on_hub_event`, subscribed to the node's
  :class:`api.events.HubEvents` (``user.created``, ``user.deleted``): synchronous, it
  hands the event to a bounded mailbox that a task turns into stored deliveries.

Queuing an event is one storage call that inserts one delivery per subscribed endpoint
(``events`` containing the event's name, or ``"*"``). The dispatcher then claims due
deliveries from storage (PostgreSQL: ``FOR UPDATE SKIP LOCKED`` plus a lease, so several
nodes share the work), sends each with at most :data:`MAX_IN_FLIGHT_PER_ENDPOINT`
requests in flight per endpoint on this node, records the outcome and schedules the
retry: attempt ``n`` failing is retried after ``WEBHOOK_RETRY_BASE_S * 2**(n-1)``, up to
:data:`MAX_ATTEMPTS` attempts, then the delivery is ``failed``. Each retry re-signs the
same body with a fresh ``X-Webhook-Timestamp``. A delivery being sent when the node
stops is released (due again at once); one held by a node that died is taken again
when its lease ends. Delivery is at least once: receivers de-duplicate on the id.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import trio

from bridge.secretbox import SecretBox, SecretBoxError
from bridge.webhook_http import AttemptResult, WebhookSender, open_webhook_sender
from bridge.webhook_signing import build_body, signed_headers
from hub.supervisor import supervise
from storage.base import (
    WILDCARD_EVENT,
    ClaimedDelivery,
    DeliveryStatus,
    StorageError,
    StorageUnavailable,
)

if TYPE_CHECKING:
    from hub.node import Node
    from storage.base import Storage

__all__ = [
    "MAX_ATTEMPTS",
    "MAX_IN_FLIGHT",
    "MAX_IN_FLIGHT_PER_ENDPOINT",
    "DispatcherStatistics",
    "WebhookDispatcher",
    "open_webhooks",
]

log = logging.getLogger("hub.webhooks")

#: Attempts of one delivery before it is ``failed`` (SPEC §5).
MAX_ATTEMPTS = 5
#: Requests in flight to one endpoint from this node at most.
MAX_IN_FLIGHT_PER_ENDPOINT = 4
#: Deliveries this node holds at most (in flight or waiting for their endpoint).
MAX_IN_FLIGHT = 64
#: Seconds between looks at storage when nothing woke the dispatcher (deliveries queued
#: by other nodes, retries that became due).
POLL_INTERVAL_S = 5.0
#: Shortest pause when storage says something is due that could not be claimed.
MIN_IDLE_S = 0.01
#: Lease of a claimed delivery: covers waiting for the endpoint's limiter (at most one
#: round of attempts ahead of it) plus its own attempt, with margin.
LEASE_TIMEOUTS = 3
LEASE_MARGIN_S = 30.0
#: ``user.created``/``user.deleted`` events waiting to be stored.
EVENT_MAILBOX_SIZE = 1024
#: Pause after a storage error in the claim loop or while storing a hub event.
STORAGE_RETRY_S = 1.0
#: Seconds a stopping dispatcher spends releasing the deliveries it holds.
RELEASE_TIMEOUT_S = 2.0
#: Seconds the set of event names anyone subscribes to is trusted before it is read
#: again: a publish whose event nobody wants costs no storage write. Endpoints changed
#: on this node count at once; ones registered on another node within this long.
SUBSCRIPTIONS_TTL_S = 1.0
#: Finished deliveries are kept this long, then pruned (checked every hour).
RETENTION = timedelta(days=30)
PRUNE_INTERVAL_S = 3600.0


@dataclass
class DispatcherStatistics:
    """Counters since start (``/metrics`` and tests)."""

    queued: int = 0  # deliveries stored
    attempts: int = 0  # requests made (or refused by the SSRF guard)
    recorded: int = 0  # attempts whose outcome is stored
    succeeded: int = 0
    retried: int = 0  # attempts that failed and were scheduled again
    failed: int = 0  # deliveries given up after MAX_ATTEMPTS
    dropped_events: int = 0  # hub events lost because the mailbox was full
    in_flight: int = 0


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def retry_delay_s(attempt: int, base_s: float) -> float:
    """Delay before the attempt after failed attempt number ``attempt`` (1-based)."""
    return float(base_s * 2 ** (attempt - 1))


class WebhookDispatcher:
    """Queues events for subscribed endpoints and delivers them (see the module doc).

    Args:
        storage: where deliveries live.
        sender: the SSRF-guarded HTTP sender.
        secretbox: opens the endpoints' sealed secrets.
        retry_base_s: delay before the first retry; doubles on each later one.
        timeout_s: the sender's per-attempt timeout (sets the claim lease).

    Cancellation:
        Cancelling :meth:`run` abandons the requests in flight and releases their
        deliveries (bounded by :data:`RELEASE_TIMEOUT_S`); they are sent again later.

    Backpressure:
        At most :data:`MAX_IN_FLIGHT` deliveries are held, and at most
        :data:`MAX_IN_FLIGHT_PER_ENDPOINT` sent at once to one endpoint; the rest wait
        in storage. Hub events beyond :data:`EVENT_MAILBOX_SIZE` waiting to be stored
        are dropped and logged (``on_hub_event`` must not block the request).
    """

    def __init__(
        self,
        storage: Storage,
        sender: WebhookSender,
        secretbox: SecretBox,
        *,
        retry_base_s: float,
        timeout_s: float,
    ) -> None:
        self._storage = storage
        self._sender = sender
        self.secretbox = secretbox
        self._retry_base_s = retry_base_s
        self._lease_s = LEASE_TIMEOUTS * timeout_s + LEASE_MARGIN_S
        self._events_in, self._events_out = trio.open_memory_channel[
            tuple[str, str, str, dict[str, Any]]
        ](EVENT_MAILBOX_SIZE)
        self._wake = trio.Event()
        self._changed = trio.Event()
        self._held: set[uuid.UUID] = set()
        self._per_endpoint: dict[uuid.UUID, int] = {}
        self._limiters: dict[uuid.UUID, trio.CapacityLimiter] = {}
        self._stats = DispatcherStatistics()
        self._subscribed: frozenset[str] = frozenset()
        self._subscribed_at = -math.inf
        self._subscriptions_version = 0

    @property
    def allow_private(self) -> bool:
        """Whether private addresses are allowed (``WEBHOOK_ALLOW_PRIVATE``)."""
        return self._sender.allow_private

    # -- queuing -----------------------------------------------------------------------
    async def enqueue(
        self, event: str, event_id: str, data: Mapping[str, Any], *, timestamp: str | None = None
    ) -> int:
        """Store one delivery of this event per subscribed endpoint and wake the sender.

        Returns:
            How many deliveries were queued (0 when nobody subscribes, or this
            ``event_id`` was queued before).

        Raises:
            StorageError: the deliveries could not be stored.
            TypeError, ValueError: ``data`` is not JSON-serialisable.
        """
        if not await self._anyone_subscribes(event):
            return 0
        body = build_body(
            event_id=event_id, event=event, timestamp=timestamp or _now_iso(), data=data
        )
        queued = await self._storage.enqueue_webhook_deliveries(
            event=event, event_id=event_id, payload=body
        )
        if queued:
            self._stats.queued += queued
            self._wake.set()
            self._bump()
        return queued

    async def on_published(self, event: str, message_id: str, data: Mapping[str, Any]) -> None:
        """The ``Realtime.publish`` hook: queue a published message that has an event.

        The webhook's ``id`` is the message id (a redelivered message is queued once
        per endpoint), ``timestamp`` the message's, ``data`` the message's data.

        Raises:
            StorageUnavailable: the deliveries could not be stored (the publish fails,
                so RabbitMQ redelivers the message and a REST caller gets 503). Any
                other error is logged, never turned into a failed publish.
        """
        timestamp = data.get("timestamp")
        try:
            await self.enqueue(
                event, message_id, data, timestamp=timestamp if isinstance(timestamp, str) else None
            )
        except StorageUnavailable:
            raise
        except (StorageError, TypeError, ValueError) as exc:
            log.error(
                "webhook deliveries of %s %s not queued: %s",
                event,
                message_id,
                exc,
                extra={"event": event, "message_id": message_id},
            )

    def on_hub_event(self, event: str, data: dict[str, Any]) -> None:
        """The :class:`api.events.HubEvents` listener (synchronous, never blocks)."""
        try:
            self._events_in.send_nowait((event, str(uuid.uuid4()), _now_iso(), dict(data)))
        except trio.WouldBlock:
            self._stats.dropped_events += 1
            log.error("webhook event mailbox full: %s dropped", event, extra={"event": event})

    def subscriptions_changed(self) -> None:
        """An endpoint was created or deleted: read the subscriptions again."""
        self._subscriptions_version += 1
        self._subscribed_at = -math.inf

    async def _anyone_subscribes(self, event: str) -> bool:
        """Whether some endpoint may want ``event`` (cached for
        :data:`SUBSCRIPTIONS_TTL_S`)."""
        if trio.current_time() - self._subscribed_at > SUBSCRIPTIONS_TTL_S:
            version, started = self._subscriptions_version, trio.current_time()
            webhooks = await self._storage.list_webhooks()
            subscribed = frozenset(name for webhook in webhooks for name in webhook.events)
            if version == self._subscriptions_version:  # not changed while reading
                self._subscribed, self._subscribed_at = subscribed, started
        else:
            subscribed = self._subscribed
        return event in subscribed or WILDCARD_EVENT in subscribed

    def notify(self) -> None:
        """Look at storage now (something may be due)."""
        self._wake.set()

    # -- observing ---------------------------------------------------------------------
    def statistics(self) -> DispatcherStatistics:
        self._stats.in_flight = len(self._held)
        return self._stats

    async def wait_until(self, predicate: Callable[[DispatcherStatistics], bool]) -> None:
        """Return once ``predicate(self.statistics())`` holds (tests)."""
        while not predicate(self.statistics()):
            await self._changed.wait()

    def _bump(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    # -- running -----------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Store hub events, prune old deliveries and send due ones until cancelled."""
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._store_hub_events)
                nursery.start_soon(self._prune_periodically)
                task_status.started()
                await self._claim_loop(nursery)
        finally:
            await self._release_held()

    async def _claim_loop(self, nursery: trio.Nursery) -> None:
        while True:
            self._wake = trio.Event()
            exclude = [w for w, n in self._per_endpoint.items() if n >= MAX_IN_FLIGHT_PER_ENDPOINT]
            free = MAX_IN_FLIGHT - len(self._held)
            try:
                if free > 0:
                    claimed = await self._storage.claim_webhook_deliveries(
                        limit=free,
                        per_webhook=MAX_IN_FLIGHT_PER_ENDPOINT,
                        lease_s=self._lease_s,
                        exclude=exclude,
                    )
                    for item in claimed:
                        self._hold(item)
                        nursery.start_soon(self._deliver, item)
                    if claimed:
                        continue
                    delay = await self._idle_delay(exclude)
                else:
                    delay = POLL_INTERVAL_S
            except StorageError as exc:
                log.warning("webhook dispatcher cannot reach storage: %s", exc)
                delay = STORAGE_RETRY_S
            with trio.move_on_after(delay):
                await self._wake.wait()

    async def _idle_delay(self, exclude: list[uuid.UUID]) -> float:
        """Seconds until the next delivery is due (at most :data:`POLL_INTERVAL_S`)."""
        due = await self._storage.next_webhook_due_at(exclude=exclude)
        if due is None:
            return POLL_INTERVAL_S
        wait = (due - datetime.now(UTC)).total_seconds()
        return min(max(wait, MIN_IDLE_S), POLL_INTERVAL_S)

    def _hold(self, item: ClaimedDelivery) -> None:
        webhook_id = item.webhook.id
        self._held.add(item.delivery.id)
        self._per_endpoint[webhook_id] = self._per_endpoint.get(webhook_id, 0) + 1
        if webhook_id not in self._limiters:
            self._limiters[webhook_id] = trio.CapacityLimiter(MAX_IN_FLIGHT_PER_ENDPOINT)

    def _let_go(self, item: ClaimedDelivery, *, done: bool) -> None:
        """Forget a delivery task; one that is not ``done`` (cancelled) stays in
        ``_held``, for :meth:`run` to release."""
        webhook_id = item.webhook.id
        if done:
            self._held.discard(item.delivery.id)
        left = self._per_endpoint.get(webhook_id, 1) - 1
        if left <= 0:
            self._per_endpoint.pop(webhook_id, None)
            self._limiters.pop(webhook_id, None)
        else:
            self._per_endpoint[webhook_id] = left
        self._wake.set()
        self._bump()

    async def _deliver(self, item: ClaimedDelivery) -> None:
        """Send one claimed delivery (waiting for its endpoint's limiter) and record it."""
        done = False
        try:
            async with self._limiters[item.webhook.id]:
                result = await self._attempt(item)
                try:
                    await self._record(item, result)
                except StorageError as exc:  # the lease runs out and it is sent again
                    log.warning(
                        "cannot record webhook delivery %s: %s",
                        item.delivery.id,
                        exc,
                        extra={"delivery_id": str(item.delivery.id)},
                    )
                done = True
        finally:
            self._let_go(item, done=done)

    async def _attempt(self, item: ClaimedDelivery) -> AttemptResult:
        delivery, webhook = item.delivery, item.webhook
        self._stats.attempts += 1
        try:
            secret = self.secretbox.open(webhook.secret_ciphertext, associated=webhook.id.bytes)
        except SecretBoxError as exc:
            return AttemptResult(False, None, f"cannot open the endpoint's secret: {exc}")
        headers = signed_headers(
            secret=secret,
            body=delivery.payload,
            event=delivery.event,
            event_id=delivery.event_id,
            attempt=delivery.attempts + 1,
            sent_at=int(time.time()),
        )
        return await self._sender.post(webhook.url, body=delivery.payload, headers=headers)

    async def _record(self, item: ClaimedDelivery, result: AttemptResult) -> None:
        delivery = item.delivery
        attempt = delivery.attempts + 1
        next_attempt_at: datetime | None = None
        if result.ok:
            status = DeliveryStatus.SUCCEEDED
        elif attempt >= MAX_ATTEMPTS:
            status = DeliveryStatus.FAILED
        else:
            status = DeliveryStatus.PENDING
            delay = retry_delay_s(attempt, self._retry_base_s)
            next_attempt_at = datetime.now(UTC) + timedelta(seconds=delay)
        await self._storage.record_webhook_attempt(
            delivery.id,
            status=status,
            status_code=result.status_code,
            error=result.error,
            next_attempt_at=next_attempt_at,
        )
        extra = {
            "webhook_id": str(item.webhook.id),
            "delivery_id": str(delivery.id),
            "event": delivery.event,
            "attempt": attempt,
            "status_code": result.status_code,
        }
        stats = self._stats
        stats.recorded += 1
        if status is DeliveryStatus.SUCCEEDED:
            stats.succeeded += 1
            log.debug("webhook delivered", extra=extra)
        elif status is DeliveryStatus.PENDING:
            stats.retried += 1
            log.warning("webhook attempt failed, will retry: %s", result.error, extra=extra)
        else:
            stats.failed += 1
            log.error("webhook delivery failed for good: %s", result.error, extra=extra)

    async def _release_held(self) -> None:
        held, self._held = list(self._held), set()
        if not held:
            return
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + RELEASE_TIMEOUT_S
            try:
                await self._storage.release_webhook_deliveries(held)
            except (StorageError, trio.ClosedResourceError) as exc:
                log.warning("could not release %d webhook deliveries: %s", len(held), exc)
        self._per_endpoint.clear()
        self._limiters.clear()

    async def _store_hub_events(self) -> None:
        async for event, event_id, timestamp, data in self._events_out:
            while True:
                try:
                    await self.enqueue(event, event_id, data, timestamp=timestamp)
                    break
                except StorageUnavailable as exc:
                    log.warning("storage down, webhook event %s waits: %s", event, exc)
                    await trio.sleep(STORAGE_RETRY_S)
                except (StorageError, TypeError, ValueError) as exc:
                    log.error("webhook event %s dropped: %s", event, exc)
                    break

    async def _prune_periodically(self) -> None:
        while True:
            try:
                pruned = await self._storage.prune_webhook_deliveries(
                    finished_before=datetime.now(UTC) - RETENTION
                )
                if pruned:
                    log.info("pruned %d finished webhook deliveries", pruned)
            except StorageError as exc:
                log.warning("cannot prune webhook deliveries: %s", exc)
            await trio.sleep(PRUNE_INTERVAL_S)


@asynccontextmanager
async def open_webhooks(node: Node) -> AsyncIterator[WebhookDispatcher]:
    """Start the node's webhook dispatcher and hook it to the node's events.

    Needs ``node.storage``, ``node.services`` (its ``events``) and ``node.realtime``
    (its ``event_hook`` is set to :meth:`WebhookDispatcher.on_published` for the
    duration of the block).

    Resource handling:
        Owns the HTTP client and the dispatcher task (supervised: restarted with backoff
        when it crashes). Leaving the block unhooks the events, stops the dispatcher
        (releasing the deliveries it held) and closes the client.
    """
    settings = node.settings
    secretbox = SecretBox(settings.resolved_webhook_key())
    if not settings.webhook_secret_key and settings.uses_postgres:
        log.warning(
            "WEBHOOK_SECRET_KEY is not set: webhook secrets are sealed with a key derived "
            "from JWT_SECRET_KEY; set WEBHOOK_SECRET_KEY so rotating the JWT key keeps them"
        )
    async with open_webhook_sender(
        allow_private=settings.webhook_allow_private, timeout_s=settings.webhook_timeout_s
    ) as sender:
        dispatcher = WebhookDispatcher(
            node.storage,
            sender,
            secretbox,
            retry_base_s=settings.webhook_retry_base_s,
            timeout_s=settings.webhook_timeout_s,
        )
        unsubscribe = node.services.events.subscribe(dispatcher.on_hub_event)
        node.realtime.event_hook = dispatcher.on_published
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(supervise, "webhook-dispatcher", dispatcher.run)
                try:
                    yield dispatcher
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            node.realtime.event_hook = None
            unsubscribe()
