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


#: One publication kept in history: ``(seq, offset, payload, at)``. A plain tuple of
#: atoms on purpose (no :class:`Publication`, no named tuple): the garbage collector
#: stops tracking such a tuple at its first pass, so a full history (``history_size`` ×
#: channels entries, replaced at the publish rate) does not feed the collector's oldest
#: generation, whose full passes stall the loop for tens of milliseconds.
_Entry = tuple[int, str, bytes, float]
_SEQ, _OFFSET, _PAYLOAD, _AT = range(4)


class _Stream:
    __slots__ = ("entries", "epoch", "last_publish", "seq")

    def __init__(self, now: float) -> None:
        self.epoch = secrets.token_hex(EPOCH_BYTES)
        self.seq = 0
        self.entries: deque[_Entry] = deque()
        self.last_publish = now

    def position(self) -> str:
        return format_offset(self.epoch, self.seq)


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
        # Insertion order is expiry order; OrderedDict pops its oldest entry in O(1)
        # (deleting a plain dict's first key repeatedly degrades to a scan).
        self._dedupe: OrderedDict[tuple[str, str], tuple[str, float]] = OrderedDict()
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
            key = (channel, message_id)
            seen = self._dedupe.get(key)
            if seen is not None and seen[1] > now:
                self._duplicates += 1
                return seen[0]
        stream = self._streams.get(channel)
        if stream is None:
            stream = self._streams[channel] = _Stream(now)
        seq = stream.seq = stream.seq + 1
        stream.last_publish = now
        offset = format_offset(stream.epoch, seq)
        publication = Publication(offset, payload)
        if self._history_size:
            entries = stream.entries
            entries.append((seq, offset, payload, now))
            if len(entries) > self._history_size:
                entries.popleft()
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
        entries = stream.entries
        if not entries or entries[0][_SEQ] > after + 1:
            return HistoryResult(False, [], position)
        skip = after + 1 - entries[0][_SEQ]
        publications = [
            Publication(entry[_OFFSET], entry[_PAYLOAD])
            for i, entry in enumerate(entries)
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
                not stream.entries
                and now - stream.last_publish > self._history_ttl_s
                and channel not in self._subscribed
            ):
                del self._streams[channel]
        dedupe = self._dedupe
        while dedupe and next(iter(dedupe.values()))[1] <= now:
            dedupe.popitem(last=False)

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
        entries = stream.entries
        horizon = now - self._history_ttl_s
        while entries and entries[0][_AT] <= horizon:
            entries.popleft()

    def _remember(self, key: tuple[str, str], offset: str, now: float) -> None:
        self._dedupe[key] = (offset, now + DEDUPE_WINDOW_S)
        self._dedupe.move_to_end(key)  # a refreshed id moves to the end: order stays expiry
        if len(self._dedupe) > DEDUPE_MAX_ENTRIES:
            self._dedupe.popitem(last=False)


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
