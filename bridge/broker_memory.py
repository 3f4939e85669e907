"""The in-process broker: PUB/SUB and history inside one node (the embedded default).

Each channel that has been published to gets a stream: a random ``epoch`` (so offsets
from before a restart are recognised as foreign), a sequence counter and the last
``history_size`` publications, each dropped once older than ``history_ttl_s``. A stream
whose every entry has expired is forgotten after ``history_ttl_s`` without publications;
the next publication starts a new epoch.

Every call completes synchronously (there is no I/O), so ``publish`` hands the
publication to the handler before it returns and ``history`` can never race a publish.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import trio

from bridge.broker import (
    DEDUPE_WINDOW_S,
    Broker,
    BrokerEventHandler,
    ControlCallback,
    HistoryResult,
    Publication,
    format_offset,
    parse_offset,
)

log = logging.getLogger("hub.broker.memory")

#: Most (channel, message id) pairs remembered for deduplication.
DEDUPE_MAX_ENTRIES = 100_000
#: Longest pause between two sweeps of expired history and idle streams.
PRUNE_INTERVAL_MAX_S = 30.0
#: Random bytes in an epoch (hex-encoded, so twice as many characters).
EPOCH_BYTES = 4
#: ``publish`` lets other tasks run at least this often (seconds of back-to-back
#: publishing); in between it returns without a trip through the scheduler.
PUBLISH_YIELD_INTERVAL_S = 0.0005


#: Nothing kept per publication is an object the garbage collector tracks: history is
#: two deques of atoms (payload bytes, publish times) per channel, the dedupe window
#: two dicts from ``"<channel>\n<id>"`` strings to atoms. Long-lived tracked objects
#: made at the publish rate (a tuple per history entry, two per remembered id) while as
#: many old ones are freed keep the collector's young-generation count from growing, so
#: its first pass comes late and finds them all there: at 10,000 messages/s, 220,000-
#: 300,000 tuples and 80-100 ms with the loop stopped, measured on a node.
DEDUPE_KEY_SEPARATOR = "\n"  # in no channel name


class _Stream:
    """One channel's stream. History entry ``i`` has sequence number
    ``seq - len(payloads) + 1 + i``; its offset is derived from it and the epoch."""

    __slots__ = ("epoch", "last_publish", "payloads", "seq", "times")

    def __init__(self, now: float) -> None:
        self.epoch = secrets.token_hex(EPOCH_BYTES)
        self.seq = 0
        self.payloads: deque[bytes] = deque()
        self.times: deque[float] = deque()
        self.last_publish = now

    def position(self) -> str:
        return format_offset(self.epoch, self.seq)

    def first_seq(self) -> int:
        """The sequence number of the oldest entry kept (``seq + 1`` when none is)."""
        return self.seq - len(self.payloads) + 1


class MemoryBroker:
    """A :class:`~bridge.broker.Broker` for one node.

    Args:
        handler: receives every publication, synchronously, inside ``publish``.
        history_size: publications kept per channel (0 disables history).
        history_ttl_s: seconds a publication is kept.
        clock: seconds on a monotonic clock (trio's by default; tests may pass their own).

    Backpressure:
        None is needed: ``publish`` calls the handler directly, and the handler (the
        hub) never blocks.

    Cancellation:
        Every method is atomic: it either checks for cancellation before doing
        anything, or completes and then yields without being cancellable. ``publish``
        is the exception to the yielding: it yields when the last publish that did was
        :data:`PUBLISH_YIELD_INTERVAL_S` or more ago, so a busy publisher (RabbitMQ
        ingest: one publish per message) pays for a pass through the scheduler (a
        quarter of its cost per message) about once per half millisecond rather than per
        message, and other tasks still wait at most that long. It is always a
        cancellation point.

    Resource handling:
        Memory only: per channel at most ``history_size`` entries (expired after
        ``history_ttl_s``) and at most :data:`DEDUPE_MAX_ENTRIES` remembered ids.
        :meth:`prune` (run by :func:`open_memory_broker`) drops what expired.
    """

    #: Publishing is local and cheap: one after another.
    concurrent_publishes = False

    def __init__(
        self,
        handler: BrokerEventHandler,
        *,
        history_size: int,
        history_ttl_s: float,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        self._handler = handler
        self._history_size = history_size
        self._history_ttl_s = history_ttl_s
        self._clock = clock
        self._streams: dict[str, _Stream] = {}
        self._subscribed: set[str] = set()
        # Remembered ids: when each expires, in insertion order, which is expiry order
        # (OrderedDict pops its oldest entry in O(1); deleting a plain dict's first key
        # repeatedly degrades to a scan), and the offset each was published at.
        self._dedupe: OrderedDict[str, float] = OrderedDict()
        self._dedupe_offsets: dict[str, str] = {}
        self._control_callbacks: list[ControlCallback] = []
        self._published = 0
        self._duplicates = 0
        self._yield_at = 0.0  # perf_counter() from which publish yields again

    async def publish(self, channel: str, payload: bytes, *, message_id: str | None = None) -> str:
        """:meth:`publish_nowait`, a cancellation point; a schedule point (after the
        publication, not cancellable) at least every :data:`PUBLISH_YIELD_INTERVAL_S`."""
        await trio.lowlevel.checkpoint_if_cancelled()
        offset = self.publish_nowait(channel, payload, message_id=message_id)
        if time.perf_counter() >= self._yield_at:
            await trio.lowlevel.cancel_shielded_checkpoint()
            self._yield_at = time.perf_counter() + PUBLISH_YIELD_INTERVAL_S
        return offset

    def publish_nowait(self, channel: str, payload: bytes, *, message_id: str | None = None) -> str:
        """The synchronous body of :meth:`publish`."""
        now = self._clock()
        key = None
        if message_id is not None:
            key = channel + DEDUPE_KEY_SEPARATOR + message_id
            expires = self._dedupe.get(key)
            if expires is not None and expires > now:
                self._duplicates += 1
                return self._dedupe_offsets[key]
        stream = self._streams.get(channel)
        if stream is None:
            stream = self._streams[channel] = _Stream(now)
        seq = stream.seq = stream.seq + 1
        stream.last_publish = now
        offset = format_offset(stream.epoch, seq)
        publication = Publication(offset, payload)
        if self._history_size:
            payloads = stream.payloads
            payloads.append(payload)
            stream.times.append(now)
            if len(payloads) > self._history_size:
                payloads.popleft()
                stream.times.popleft()
        if key is not None:
            self._remember(key, offset, now)
        self._published += 1
        self._handler.handle_publication(channel, publication)
        return offset

    async def history(self, channel: str, since: str | None) -> HistoryResult:
        await trio.lowlevel.checkpoint_if_cancelled()
        result = self.history_nowait(channel, since)
        await trio.lowlevel.cancel_shielded_checkpoint()
        return result

    def history_nowait(self, channel: str, since: str | None) -> HistoryResult:
        """The synchronous body of :meth:`history`."""
        now = self._clock()
        stream = self._streams.get(channel)
        if stream is None:
            # Fix the epoch now, so the position handed out stays meaningful.
            stream = self._streams[channel] = _Stream(now)
        self._expire(stream, now)
        position = stream.position()
        if since is None:
            return HistoryResult(True, [], position)
        parsed = parse_offset(since)
        if parsed is None or parsed[0] != stream.epoch or parsed[1] > stream.seq:
            return HistoryResult(False, [], position)
        after = parsed[1]
        if after == stream.seq:
            return HistoryResult(True, [], position)
        first = stream.first_seq()
        if not stream.payloads or first > after + 1:
            return HistoryResult(False, [], position)
        skip = after + 1 - first
        epoch = stream.epoch
        publications = [
            Publication(format_offset(epoch, first + i), payload)
            for i, payload in enumerate(stream.payloads)
            if i >= skip
        ]
        return HistoryResult(True, publications, position)

    async def subscribe(self, channel: str) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()
        self._subscribed.add(channel)
        await trio.lowlevel.cancel_shielded_checkpoint()

    async def unsubscribe(self, channel: str) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()
        self._subscribed.discard(channel)
        await trio.lowlevel.cancel_shielded_checkpoint()

    def statistics(self) -> dict[str, int]:
        return {
            "streams": len(self._streams),
            "subscribed": len(self._subscribed),
            "published": self._published,
            "duplicates": self._duplicates,
            "dedupe_entries": len(self._dedupe),
        }

    async def ping(self) -> None:
        """Always ready (nothing to reach)."""
        await trio.lowlevel.checkpoint()

    def subscribe_control(self, callback: ControlCallback) -> None:
        """Call ``callback(payload)`` for each :meth:`publish_control` (this node is
        the only one)."""
        self._control_callbacks.append(callback)

    async def publish_control(self, payload: bytes) -> None:
        """Hand ``payload`` to every control callback, synchronously."""
        await trio.lowlevel.checkpoint_if_cancelled()
        for callback in list(self._control_callbacks):
            try:
                callback(payload)
            except Exception:  # one bad listener must not fail the publisher
                log.exception("control callback failed")
        await trio.lowlevel.cancel_shielded_checkpoint()

    def prune(self) -> None:
        """Drop expired history, idle streams and expired dedupe entries. A stream of a
        channel the node is subscribed to is kept (its subscribers hold its epoch)."""
        now = self._clock()
        for channel, stream in list(self._streams.items()):
            self._expire(stream, now)
            if (
                not stream.payloads
                and now - stream.last_publish > self._history_ttl_s
                and channel not in self._subscribed
            ):
                del self._streams[channel]
        dedupe, offsets = self._dedupe, self._dedupe_offsets
        while dedupe and next(iter(dedupe.values())) <= now:
            del offsets[dedupe.popitem(last=False)[0]]

    async def run_pruner(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Call :meth:`prune` periodically until cancelled.

        Cancellation:
            Cancel the surrounding scope to stop; a sweep is synchronous and never
            interrupted halfway.
        """
        task_status.started()
        interval = min(PRUNE_INTERVAL_MAX_S, self._history_ttl_s)
        while True:
            await trio.sleep(interval)
            self.prune()

    def _expire(self, stream: _Stream, now: float) -> None:
        times = stream.times
        horizon = now - self._history_ttl_s
        while times and times[0] <= horizon:
            times.popleft()
            stream.payloads.popleft()

    def _remember(self, key: str, offset: str, now: float) -> None:
        dedupe = self._dedupe
        dedupe[key] = now + DEDUPE_WINDOW_S
        dedupe.move_to_end(key)  # a refreshed id moves to the end: order stays expiry
        self._dedupe_offsets[key] = offset
        if len(dedupe) > DEDUPE_MAX_ENTRIES:
            del self._dedupe_offsets[dedupe.popitem(last=False)[0]]


_check: type[Broker] = MemoryBroker


@asynccontextmanager
async def open_memory_broker(
    handler: BrokerEventHandler, *, history_size: int, history_ttl_s: float
) -> AsyncIterator[MemoryBroker]:
    """A :class:`MemoryBroker` with its pruning task (restarted by the supervisor).

    Resource handling:
        The pruning task is cancelled when the block is left; the history is lost.
    """
    from hub.supervisor import supervise

    broker = MemoryBroker(handler, history_size=history_size, history_ttl_s=history_ttl_s)
    async with trio.open_nursery() as nursery:
        await nursery.start(supervise, "broker-memory-pruner", broker.run_pruner)
        try:
            yield broker
        finally:
            nursery.cancel_scope.cancel()
