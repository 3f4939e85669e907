"""The broker contract: PUB/SUB between nodes plus the per-channel history behind ``since``.

The realtime core talks to one :class:`Broker`. The in-process broker
(:mod:`bridge.broker_memory`) is the embedded default for a single node; a Redis broker
(``REDIS_URL``) implements the same contract for a cluster: PUBLISH on a per-channel
topic, one SUBSCRIBE per channel per node (only for channels with local subscribers),
and history in a capped stream per channel.

Publications flow back through a :class:`BrokerEventHandler` (the node's hub) that the
broker is opened with: every publication on a channel the node subscribed to is handed
to ``handle_publication`` exactly once, in per-channel order, whether it was published
on this node or another.

Offsets are opaque strings ``"<epoch>:<seq>"``. ``seq`` counts publications of one
channel from 1; ``epoch`` names one life of the channel's stream and changes whenever
the stream is lost or recreated (a node restart for the memory broker, an expired or
flushed key for Redis), so an offset from another epoch can never be mistaken for a
position in the current one.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from hub.settings import Settings

log = logging.getLogger("hub.broker")

#: Seconds within which a repeated message id (per channel) is published only once.
DEDUPE_WINDOW_S = 600.0

#: Receives each node-wide control message (see :meth:`Broker.subscribe_control`).
ControlCallback = Callable[[bytes], None]


class BrokerUnavailable(Exception):
    """The broker's backend cannot be reached; the publish did not happen (or, when the
    connection broke after it was sent, its outcome is unknown: retry with the same
    ``message_id``)."""


@dataclass(frozen=True, slots=True)
class Publication:
    """One message on one channel: its ``offset`` and the ``payload`` bytes the
    publisher gave (opaque to the broker)."""

    offset: str
    payload: bytes


@dataclass(frozen=True, slots=True)
class HistoryResult:
    """The answer to :meth:`Broker.history`.

    Attributes:
        recovered: True when every publication after ``since`` is still retained (or
            no ``since`` was given); False when ``since`` is from another epoch, older
            than the retained window, ahead of the stream or malformed.
        publications: when ``recovered``, every retained publication after ``since``,
            oldest first; empty otherwise.
        position: the channel's current offset (that of its latest publication, or
            ``"<epoch>:0"``). A subscriber is live from here on.
    """

    recovered: bool
    publications: list[Publication]
    position: str


class BrokerEventHandler(Protocol):
    """Receives publications from the broker (implemented by the node's hub).

    A handler may also have a ``fanout_batch`` context manager (the hub's
    :class:`~actors.channel.FanoutBatch`): a broker that reads publications in batches
    opens it around each batch, so fan-out can combine the batch's writes.
    """

    def handle_publication(self, channel: str, publication: Publication) -> None:
        """Deliver ``publication`` to this node's subscribers of ``channel``.

        Must not block or await: brokers call it from their reader, one publication at
        a time, in order.
        """

    def handle_gap(self, channel: str) -> None:
        """Publications on ``channel`` may have been lost for this node (they are no
        longer in the history: Redis restarted empty, trimmed or expired while this node
        was cut off). The handler closes the channel's local subscribers so that they
        reconnect and recover with ``since`` (and learn ``recovered:false``).

        Must not block or await (called from the broker's reader).
        """


class Broker(Protocol):
    """PUB/SUB plus history, as the realtime core needs it.

    Calls for one channel are made in order by the hub: ``subscribe`` is awaited before
    the channel is used, and ``unsubscribe`` is awaited before the channel may be
    subscribed again.

    Cancellation:
        Cancelling ``subscribe``/``unsubscribe`` leaves the node's interest in the
        channel unknown; the hub only cancels them when the node stops. A cancelled
        ``publish`` may or may not have published (callers retry with the same
        ``message_id``, which dedupes).

    Attributes:
        concurrent_publishes: True when publishing to many channels is cheaper with
            concurrent ``publish`` calls (the Redis client pipelines them into one
            write) than one after another (the in-process broker).
    """

    concurrent_publishes: bool

    async def publish(self, channel: str, payload: bytes, *, message_id: str | None = None) -> str:
        """Append ``payload`` to the channel's history, fan it out to every node
        subscribed to ``channel`` and return its offset.

        Args:
            channel: a valid channel name.
            payload: bytes handed unchanged to subscribers and history.
            message_id: when given, a second publish of the same id on the same channel
                within :data:`DEDUPE_WINDOW_S` publishes nothing and returns the first
                offset.
        """
        ...

    async def history(self, channel: str, since: str | None) -> HistoryResult:
        """Retained publications after ``since`` (see :class:`HistoryResult`)."""
        ...

    async def subscribe(self, channel: str) -> None:
        """Start handing this channel's publications to the handler."""
        ...

    async def unsubscribe(self, channel: str) -> None:
        """Stop handing this channel's publications to the handler."""
        ...

    def statistics(self) -> dict[str, int]:
        """Counters for ``/metrics`` and tests."""
        ...

    async def ping(self) -> None:
        """Readiness check: return when the backend is reachable.

        Raises:
            BrokerUnavailable: it is not.
        """
        ...

    def subscribe_control(self, callback: ControlCallback) -> None:
        """Call ``callback(payload)`` for every node-wide control message, from every
        node including this one. At most once (a node cut off from the backend misses
        what is sent meanwhile): keep the truth elsewhere and treat these as fast hints.
        ``callback`` runs in the broker's reader and must not block."""
        ...

    async def publish_control(self, payload: bytes) -> None:
        """Send ``payload`` to the control callbacks of every node.

        Raises:
            BrokerUnavailable: the backend is unreachable; nothing was sent.
        """
        ...


def format_offset(epoch: str, seq: int) -> str:
    """``"<epoch>:<seq>"``; ``epoch`` must not contain ``:``."""
    return f"{epoch}:{seq}"


def parse_offset(offset: str) -> tuple[str, int] | None:
    """``(epoch, seq)`` of an offset, or ``None`` when it is not one of ours."""
    epoch, sep, seq = offset.rpartition(":")
    if not sep or not epoch or not seq.isdigit() or len(seq) > 19:
        return None
    return epoch, int(seq)


@asynccontextmanager
async def open_broker(
    settings: Settings, handler: BrokerEventHandler, *, redis_prefix: str = ""
) -> AsyncIterator[Broker]:
    """Open the broker the settings ask for, delivering publications to ``handler``:
    the Redis broker (shared by every node) when ``REDIS_URL`` is set, else the
    in-process one.

    Args:
        redis_prefix: prepended to the Redis broker's key prefix (``hub:``); tests
            isolate themselves on a shared Redis with it.

    Resource handling:
        The broker's background tasks (and connections) live until the ``async with``
        block is left.
    """
    if settings.redis_url:
        from bridge.broker_redis import KEY_PREFIX, open_redis_broker

        async with open_redis_broker(
            settings, handler, key_prefix=redis_prefix + KEY_PREFIX
        ) as redis_broker:
            yield redis_broker
        return
    from bridge.broker_memory import open_memory_broker

    async with open_memory_broker(
        handler, history_size=settings.history_size, history_ttl_s=settings.history_ttl
    ) as broker:
        yield broker
