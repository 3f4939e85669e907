"""The Redis broker: fan-out across nodes, history and recovery in Redis (SPEC §6).

Every node holds one Redis subscription per channel that has local subscribers (the
hub's channel actors come and go with :meth:`RedisBroker.subscribe` /
:meth:`RedisBroker.unsubscribe`), never one global channel that every node filters.

Keys (``P`` = the key prefix, ``hub:`` by default; ``{channel}`` is a Redis Cluster hash
tag, so one channel's keys share a slot):

=========================  ==============================================================
``P meta:{channel}``       hash ``e`` = epoch, ``s`` = sequence of the latest publication;
                           expires :data:`META_TTL_MIN_S` (or ``HISTORY_TTL`` if longer)
                           after the last publish.
``P stream:{channel}``     stream of the last ``HISTORY_SIZE`` publications; entry id
                           ``<seq>-0``, fields ``t`` (Redis time, s) and ``d`` (payload);
                           expires ``HISTORY_TTL`` after the last publish.
``P dedupe:{channel}:id``  offset of a publication with a ``message_id``, for 600 s.
``P ch:<channel>``         pub/sub channel; message = ``b"<epoch>:<seq>\\n" + payload``.
``P control``              pub/sub channel for node-wide events (:meth:`publish_control`).
=========================  ==============================================================

One Lua script per publish makes the offset the stream position: it ensures the epoch
(a new random one when the meta key is missing, i.e. Redis restarted, was flushed or the
key expired — the stale stream is deleted with it), increments the sequence, appends to
the stream with an exact ``MAXLEN`` (so recovery is deterministic), sets the TTLs and
publishes, atomically.

Continuity: for each subscribed channel the broker knows the ``(epoch, seq)`` it last
handed to the hub. A pub/sub message that is not the next one (a gap, or another epoch),
and every channel after the pub/sub connection is re-established, is *resynced*: the
missed publications are read back from the stream and handed to the hub in order
(clients notice nothing), or — when they are gone (another epoch, trimmed or expired) —
the hub is told with ``handle_gap(channel)`` and closes that channel's local subscribers
with 4011 so they reconnect and recover with ``since`` (and get ``recovered:false``).

``history`` returns only after this node has handed the hub every publication up to the
position it reports, so a subscriber's replay and its live stream meet without a gap or
a duplicate.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractContextManager, asynccontextmanager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import hiredis
import trio

from bridge.broker import (
    DEDUPE_WINDOW_S,
    Broker,
    BrokerEventHandler,
    BrokerUnavailable,
    HistoryResult,
    Publication,
    format_offset,
    parse_offset,
)
from bridge.resp import (
    RedisAddress,
    RedisClient,
    RedisError,
    RedisSubscriber,
    Script,
)

if TYPE_CHECKING:
    from hub.settings import Settings

__all__ = [
    "CONTROL_SUFFIX",
    "KEY_PREFIX",
    "META_TTL_MIN_S",
    "BrokerUnavailable",
    "RedisBroker",
    "RedisKeys",
    "open_redis_broker",
]

log = logging.getLogger("hub.broker.redis")

#: Default prefix of every key and pub/sub channel.
KEY_PREFIX: Final = "hub:"
#: Name (after the prefix) of the control pub/sub channel: ``hub:control``.
CONTROL_SUFFIX: Final = "control"
#: The epoch and sequence of a channel outlive its history, so a client coming back to
#: a quiet channel after ``HISTORY_TTL`` still recovers (nothing was missed).
META_TTL_MIN_S: Final = 7 * 86400
#: Random bytes in an epoch (hex-encoded).
EPOCH_BYTES: Final = 4
#: Channels resynced per pipelined write.
RESYNC_BATCH: Final = 256
#: Seconds before a channel whose resync script failed (an error reply) is tried again.
RESYNC_RETRY_S: Final = 1.0
#: Pub/sub messages held for one channel while it resyncs; beyond, the channel's
#: subscribers are told they missed messages (``handle_gap``).
MAX_SYNC_BUFFER: Final = 10_000
#: Seconds ``history`` waits for this node's pub/sub to catch up with the position it
#: read (normally microseconds).
CATCH_UP_TIMEOUT_S: Final = 2.0
#: Seconds ``open_redis_broker`` waits for Redis before starting anyway (not ready).
STARTUP_WAIT_S: Final = 2.0

# KEYS: meta, stream, dedupe (or meta again). ARGV: payload, epoch candidate, history size,
# history ttl, meta ttl, pub/sub channel, dedupe ttl ('' = no dedupe).
# Returns {1, offset} or, for a repeated message id, {0, first offset}.
PUBLISH_SCRIPT: Final = Script(
    """
if ARGV[7] ~= '' then
  local seen = redis.call('GET', KEYS[3])
  if seen then return {0, seen} end
end
local epoch = redis.call('HGET', KEYS[1], 'e')
if not epoch then
  epoch = ARGV[2]
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'e', epoch, 's', 0)
end
local seq = redis.call('HINCRBY', KEYS[1], 's', 1)
redis.call('EXPIRE', KEYS[1], ARGV[5])
if tonumber(ARGV[3]) > 0 then
  redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[3], seq .. '-0',
             't', redis.call('TIME')[1], 'd', ARGV[1])
  redis.call('EXPIRE', KEYS[2], ARGV[4])
end
local offset = epoch .. ':' .. seq
redis.call('PUBLISH', ARGV[6], offset .. '\\n' .. ARGV[1])
if ARGV[7] ~= '' then redis.call('SET', KEYS[3], offset, 'EX', ARGV[7]) end
return {1, offset}
"""
)

# KEYS: meta, stream. ARGV: epoch candidate, meta ttl, since epoch ('' = no since), since
# seq, history ttl, most entries. Returns {epoch, top, status[, entries]} with status
# 0 = not recoverable, 1 = recovered (entries after since), 2 = no since asked.
HISTORY_SCRIPT: Final = Script(
    """
local epoch = redis.call('HGET', KEYS[1], 'e')
local top = 0
if not epoch then
  epoch = ARGV[1]
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'e', epoch, 's', 0)
  redis.call('EXPIRE', KEYS[1], ARGV[2])
else
  top = tonumber(redis.call('HGET', KEYS[1], 's'))
end
if ARGV[3] == '' then return {epoch, top, 2} end
local since = tonumber(ARGV[4])
if ARGV[3] ~= epoch or since == nil or since > top then return {epoch, top, 0} end
if since == top then return {epoch, top, 1, {}} end
local first = (since + 1) .. '-0'
local entries = redis.call('XRANGE', KEYS[2], first, '+', 'COUNT', ARGV[6])
if #entries == 0 or entries[1][1] ~= first then return {epoch, top, 0} end
local horizon = tonumber(redis.call('TIME')[1]) - tonumber(ARGV[5])
if tonumber(entries[1][2][2]) <= horizon then return {epoch, top, 0} end
return {epoch, top, 1, entries}
"""
)

_NOT_RECOVERED, _RECOVERED, _NO_SINCE = 0, 1, 2

ControlCallback = Callable[[bytes], None]


@dataclass(frozen=True, slots=True)
class RedisKeys:
    """Key and pub/sub channel names under one prefix (see the module docstring)."""

    prefix: str = KEY_PREFIX

    def meta(self, channel: str) -> str:
        return f"{self.prefix}meta:{{{channel}}}"

    def stream(self, channel: str) -> str:
        return f"{self.prefix}stream:{{{channel}}}"

    def dedupe(self, channel: str, message_id: str) -> str:
        return f"{self.prefix}dedupe:{{{channel}}}:{message_id}"

    def pubsub(self, channel: str) -> bytes:
        return f"{self.prefix}ch:{channel}".encode()

    @property
    def pubsub_prefix(self) -> bytes:
        return f"{self.prefix}ch:".encode()

    @property
    def control(self) -> bytes:
        return f"{self.prefix}{CONTROL_SUFFIX}".encode()


class _ChannelSync:
    """What this node handed the hub for one subscribed channel.

    ``epoch is None`` until the position is known. While ``syncing``, pub/sub messages
    are held in ``buffer`` (in arrival order) instead of being handed over.
    ``uncertain``: a subscriber was given a position this node had not reached (or
    none, Redis being unreachable), so nothing proves it will see every publication
    after it; the next resync reports a gap instead of replaying.
    ``waiters``: tasks in ``history`` waiting for ``changed`` (only then is it set).
    """

    __slots__ = ("buffer", "changed", "epoch", "seq", "syncing", "uncertain", "waiters")

    def __init__(self) -> None:
        self.epoch: str | None = None
        self.seq = 0
        self.syncing = True
        self.uncertain = False
        self.buffer: list[tuple[str, int, str, bytes]] = []
        self.changed = trio.Event()
        self.waiters = 0

    def notify(self) -> None:
        if self.waiters:
            self.changed.set()
            self.changed = trio.Event()


class RedisBroker:
    """A :class:`~bridge.broker.Broker` shared by every node through Redis.

    Build it with :func:`open_redis_broker`, which runs its connections.

    Args:
        handler: the hub; gets ``handle_publication`` (in order, once) and, when it has
            one, ``handle_gap(channel)``.
        address: where Redis is; the broker opens two connections to it (commands and
            pub/sub) when :meth:`run` starts.
        keys: key names.
        history_size: ``HISTORY_SIZE`` (0 keeps no history).
        history_ttl_s: ``HISTORY_TTL``.
        node_id: names the connections (``CLIENT LIST``: ``hub-<id>``, ``hub-pubsub-<id>``).

    Backpressure:
        ``publish`` waits for Redis' reply (one round trip, pipelined with every other
        concurrent command on the node). Fan-out never waits: pub/sub messages are
        handed to the hub synchronously from the receive loop, in batches per socket
        read.

    Cancellation:
        A cancelled ``publish`` may or may not have published; retry with the same
        ``message_id`` (deduplicated for 600 s on every node). ``subscribe`` and
        ``unsubscribe`` leave the wanted set updated even when cancelled.
    """

    #: Concurrent calls are pipelined into one write.
    concurrent_publishes = True

    def __init__(
        self,
        handler: BrokerEventHandler,
        *,
        address: RedisAddress,
        keys: RedisKeys,
        history_size: int,
        history_ttl_s: int,
        node_id: str = "hub",
    ) -> None:
        self._handler = handler
        #: Open around each batch read from the pub/sub connection (the hub's
        #: write-combining, ``Hub.fanout_batch``; optional for other handlers).
        self._fanout_batch: AbstractContextManager[object] = (
            getattr(handler, "fanout_batch", None) or nullcontext()
        )
        self._gap = getattr(handler, "handle_gap", None)
        self.keys = keys
        self._history_size = history_size
        self._history_ttl_s = int(history_ttl_s)
        self._meta_ttl_s = max(META_TTL_MIN_S, self._history_ttl_s)
        self._client = RedisClient(address, name=f"hub-{node_id}")
        self._subscriber = RedisSubscriber(
            address,
            on_messages=self._on_messages,
            on_connected=self._on_connected,
            on_disconnected=self._on_disconnected,
            name=f"hub-pubsub-{node_id}",
        )
        self._prefix_len = len(keys.pubsub_prefix)
        self._control_channel = keys.control
        self._control_callbacks: list[ControlCallback] = []
        self._channels: dict[str, _ChannelSync] = {}
        self._dirty: set[str] = set()
        self._dirty_event = trio.Event()
        self._counters = dict.fromkeys(
            (
                "published",
                "duplicates",
                "received",
                "handed",
                "stale",
                "gaps",
                "resynced",
                "replayed",
                "lost",
                "publish_failures",
                "control_received",
            ),
            0,
        )

    # -- the Broker contract -------------------------------------------------------------
    async def publish(self, channel: str, payload: bytes, *, message_id: str | None = None) -> str:
        """See :meth:`bridge.broker.Broker.publish`.

        Raises:
            BrokerUnavailable: Redis is unreachable; nothing was published, or (if the
                connection broke after the command was sent) the outcome is unknown.
        """
        keys = self.keys
        meta = keys.meta(channel)
        dedupe_key = keys.dedupe(channel, message_id) if message_id is not None else meta
        try:
            reply = await self._client.run_script(
                PUBLISH_SCRIPT,
                (meta, keys.stream(channel), dedupe_key),
                (
                    payload,
                    _new_epoch(),
                    self._history_size,
                    self._history_ttl_s,
                    self._meta_ttl_s,
                    keys.pubsub(channel),
                    int(DEDUPE_WINDOW_S) if message_id is not None else b"",
                ),
            )
        except RedisError as error:
            self._counters["publish_failures"] += 1
            raise BrokerUnavailable(f"publish to {channel!r} failed: {error}") from None
        fresh, offset = reply
        if fresh:
            self._counters["published"] += 1
        else:
            self._counters["duplicates"] += 1
        return offset.decode()

    async def history(self, channel: str, since: str | None) -> HistoryResult:
        """See :meth:`bridge.broker.Broker.history`.

        Returns once this node has handed the hub every publication up to the returned
        position (or after :data:`CATCH_UP_TIMEOUT_S`), so a replay and the live stream
        meet exactly. While Redis is unreachable it does not fail: it answers
        ``recovered=False`` (when ``since`` was given) at the last position this node
        knows, and the channel is resynced — its subscribers told with ``handle_gap`` if
        anything may have been missed — once Redis is back.
        """
        parsed = parse_offset(since) if since is not None else None
        args = (
            _new_epoch(),
            self._meta_ttl_s,
            b"" if since is None else (parsed[0] if parsed else "-"),
            parsed[1] if parsed else 0,
            self._history_ttl_s,
            max(1, self._history_size),
        )
        try:
            reply = await self._client.run_script(
                HISTORY_SCRIPT, (self.keys.meta(channel), self.keys.stream(channel)), args
            )
        except RedisError as error:
            log.warning("history of %s unavailable: %s", channel, error)
            state = self._channels.get(channel)
            if state is not None and state.epoch is None:
                state.uncertain = True
            position = (
                format_offset(state.epoch, state.seq)
                if state is not None and state.epoch is not None
                else ""
            )
            return HistoryResult(since is None, [], position)
        epoch, top, status, entries = _parse_history(reply)
        await self._catch_up(channel, epoch, top)
        return HistoryResult(
            status != _NOT_RECOVERED,
            [publication for _seq, publication in entries],
            format_offset(epoch, top),
        )

    async def subscribe(self, channel: str) -> None:
        """See :meth:`bridge.broker.Broker.subscribe`.

        Never fails because of Redis: while it is unreachable the channel is kept wanted,
        and it is subscribed and its position read when Redis is back.
        """
        state = self._channels.get(channel)
        if state is not None:
            await trio.lowlevel.checkpoint()
            return
        state = self._channels[channel] = _ChannelSync()
        live = await self._subscriber.subscribe([self.keys.pubsub(channel)])
        if self._channels.get(channel) is not state:
            return  # unsubscribed meanwhile
        if not live:
            return  # ``_on_connected`` resyncs it
        try:
            reply = await self._client.run_script(
                HISTORY_SCRIPT,
                (self.keys.meta(channel), self.keys.stream(channel)),
                (_new_epoch(), self._meta_ttl_s, b"", 0, self._history_ttl_s, 1),
            )
        except RedisError:
            self._mark_dirty(channel)  # read the position once the commands work again
            return
        if self._channels.get(channel) is state:
            epoch, top, _status, _pubs = _parse_history(reply)
            self._settle(channel, state, epoch, top, [])

    async def unsubscribe(self, channel: str) -> None:
        """See :meth:`bridge.broker.Broker.unsubscribe`."""
        state = self._channels.pop(channel, None)
        self._dirty.discard(channel)
        if state is not None:
            state.notify()
        await self._subscriber.unsubscribe([self.keys.pubsub(channel)])

    def statistics(self) -> dict[str, int]:
        client = self._client.statistics()
        subscriber = self._subscriber.statistics()
        return {
            **self._counters,
            "channels": len(self._channels),
            "syncing": sum(1 for state in self._channels.values() if state.syncing),
            "redis_connected": int(client.connected and subscriber.connected),
            "redis_reconnects": client.reconnects + subscriber.reconnects,
            "redis_commands": client.commands,
            "redis_writes": client.writes,
            "pubsub_batches": subscriber.batches,
        }

    # -- readiness and node-wide events ----------------------------------------------------
    async def ping(self) -> None:
        """Readiness check (``node.ready_checks["redis"]``): both connections are up and
        Redis answers.

        Raises:
            BrokerUnavailable: the pub/sub connection is down or Redis does not answer.
        """
        if not self._subscriber.connected:
            await trio.lowlevel.checkpoint()
            raise BrokerUnavailable("redis pub/sub connection is down")
        try:
            await self._client.ping()
        except RedisError as error:
            raise BrokerUnavailable(str(error)) from None

    def subscribe_control(self, callback: ControlCallback) -> None:
        """Call ``callback(payload)`` for every message on the control channel
        (``hub:control``), from every node including this one, in publish order.

        Delivery is at most once: a message published while this node's pub/sub
        connection is down never arrives, so keep the source of truth elsewhere
        (storage) and treat these as fast hints. ``callback`` runs in the pub/sub
        receive loop and must not block.
        """
        self._control_callbacks.append(callback)

    async def publish_control(self, payload: bytes) -> None:
        """Send ``payload`` to every node's control callbacks.

        Raises:
            BrokerUnavailable: Redis is unreachable; nothing was sent.
        """
        try:
            await self._client.execute(b"PUBLISH", self._control_channel, payload)
        except RedisError as error:
            raise BrokerUnavailable(f"control publish failed: {error}") from None

    # -- pub/sub receive path (synchronous, in the subscriber's receive loop) -------------
    def _on_messages(self, batch: list[tuple[bytes, bytes]]) -> None:
        with self._fanout_batch:  # small channels: one write per subscriber and batch
            self._feed_batch(batch)

    def _feed_batch(self, batch: list[tuple[bytes, bytes]]) -> None:
        channels = self._channels
        prefix_len = self._prefix_len
        self._counters["received"] += len(batch)
        for redis_channel, data in batch:
            if redis_channel == self._control_channel:
                self._on_control(data)
                continue
            channel = redis_channel[prefix_len:].decode()
            state = channels.get(channel)
            if state is None:
                continue  # unsubscribed; the UNSUBSCRIBE is on its way
            cut = data.find(b"\n")
            offset = data[:cut].decode()
            parsed = parse_offset(offset)
            if parsed is None:
                log.error("malformed message on %s; ignored", redis_channel)
                continue
            self._feed(channel, state, parsed[0], parsed[1], offset, data[cut + 1 :])

    def _feed(
        self, channel: str, state: _ChannelSync, epoch: str, seq: int, offset: str, payload: bytes
    ) -> None:
        """Hand one publication over if it is the next one; hold it and resync if not."""
        if state.syncing:
            state.buffer.append((epoch, seq, offset, payload))
            if len(state.buffer) > MAX_SYNC_BUFFER:
                self._overflow(channel, state)
            return
        if epoch == state.epoch:
            if seq == state.seq + 1:
                state.seq = seq
                self._counters["handed"] += 1
                self._hand(channel, Publication(offset, payload))
                state.notify()
                return
            if seq <= state.seq:
                self._counters["stale"] += 1
                return
        self._counters["gaps"] += 1
        log.info(
            "gap on %s: have %s:%d, got %s:%d; resyncing",
            channel,
            state.epoch,
            state.seq,
            epoch,
            seq,
        )
        state.syncing = True
        state.buffer.append((epoch, seq, offset, payload))
        self._mark_dirty(channel)

    def _overflow(self, channel: str, state: _ChannelSync) -> None:
        """Too much held while resyncing: give up on continuity for this channel."""
        last_epoch, last_seq, _offset, _payload = state.buffer[-1]
        log.warning("resync of %s held over %d messages; reporting a gap", channel, MAX_SYNC_BUFFER)
        state.buffer.clear()
        state.epoch, state.seq = last_epoch, last_seq
        state.syncing = False
        self._dirty.discard(channel)
        self._report_gap(channel)
        state.notify()

    def _on_control(self, payload: bytes) -> None:
        self._counters["control_received"] += 1
        for callback in self._control_callbacks:
            try:
                callback(payload)
            except Exception:  # one bad listener must not stop the receive loop
                log.exception("control callback failed")

    def _on_connected(self, channels: frozenset[bytes]) -> None:
        """The pub/sub connection is (re)established: every channel may have missed
        messages while it was down, so resync them all."""
        for channel, state in self._channels.items():
            state.syncing = True
            self._mark_dirty(channel)

    def _on_disconnected(self) -> None:
        """Hold every channel's messages from now on: whatever arrives on the next
        connection waits for that channel's resync."""
        for state in self._channels.values():
            state.syncing = True
        log.warning("redis pub/sub lost; %d channels will resync", len(self._channels))

    # -- resync ------------------------------------------------------------------------
    def _mark_dirty(self, channel: str) -> None:
        self._dirty.add(channel)
        self._dirty_event.set()

    async def run_resync(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Resync channels marked dirty, in pipelined batches, until cancelled.

        A batch that meets a lost connection is retried once both connections are back;
        a channel whose script failed (an error reply) after :data:`RESYNC_RETRY_S`.

        Cancellation:
            Cancel the surrounding scope to stop (the node is stopping; channels being
            resynced stay held).
        """
        task_status.started()
        while True:
            await self._dirty_event.wait()
            self._dirty_event = trio.Event()
            await self._subscriber.wait_connected()
            await self._client.wait_connected()
            failed: list[str] = []
            while self._dirty:
                batch = [self._dirty.pop() for _ in range(min(RESYNC_BATCH, len(self._dirty)))]
                try:
                    failed += await self._resync(batch)
                except RedisError as error:
                    log.warning("resync failed (%s); retrying after reconnect", error)
                    self._dirty.update(c for c in batch if c in self._channels)
                    self._dirty_event.set()
                    break
            if failed:
                await trio.sleep(RESYNC_RETRY_S)
                for channel in failed:
                    if channel in self._channels:
                        self._mark_dirty(channel)

    async def _resync(self, batch: list[str]) -> list[str]:
        """Read the position (and what was missed) of ``batch`` and apply it; returns the
        channels whose script failed."""
        keys = self.keys
        states = [self._channels.get(channel) for channel in batch]
        calls = []
        for channel, state in zip(batch, states, strict=True):
            since_epoch = state.epoch if state is not None and state.epoch is not None else ""
            calls.append(
                (
                    (keys.meta(channel), keys.stream(channel)),
                    (
                        _new_epoch(),
                        self._meta_ttl_s,
                        since_epoch or b"",
                        state.seq if state is not None else 0,
                        self._history_ttl_s,
                        max(1, self._history_size),
                    ),
                )
            )
        replies = await self._client.run_script_many(HISTORY_SCRIPT, calls)
        failed: list[str] = []
        for channel, state, reply in zip(batch, states, replies, strict=True):
            if state is None or self._channels.get(channel) is not state:
                continue
            if isinstance(reply, hiredis.ReplyError):
                log.error("resync of %s failed: %s", channel, reply)
                failed.append(channel)
                continue
            self._counters["resynced"] += 1
            epoch, top, status, entries = _parse_history(reply)
            self._settle(channel, state, epoch, top, entries, status=status)
        return failed

    def _settle(
        self,
        channel: str,
        state: _ChannelSync,
        epoch: str,
        top: int,
        entries: list[tuple[int, Publication]],
        *,
        status: int = _NO_SINCE,
    ) -> None:
        """Apply a position read from Redis: replay what was missed (or report a gap),
        then hand over what was held meanwhile."""
        if state.uncertain:
            self._report_gap(channel)
        elif state.epoch is None:
            pass  # first position: nobody was promised anything before it
        elif status == _RECOVERED and epoch == state.epoch:
            for seq, publication in entries:
                if seq > state.seq:
                    state.seq = seq
                    self._counters["replayed"] += 1
                    self._hand(channel, publication)
        else:
            self._report_gap(channel)
        state.epoch, state.seq = epoch, top
        state.uncertain = False
        held, state.buffer = state.buffer, []
        state.syncing = False
        for i, (m_epoch, m_seq, offset, payload) in enumerate(held):
            self._feed(channel, state, m_epoch, m_seq, offset, payload)
            if state.syncing:  # another gap: keep the rest for the next resync
                state.buffer.extend(held[i + 1 :])
                break
        state.notify()

    def _hand(self, channel: str, publication: Publication) -> None:
        try:
            self._handler.handle_publication(channel, publication)
        except Exception:  # the hub's bug must not stop the pub/sub receive loop
            log.exception("handle_publication failed on %s", channel)

    def _report_gap(self, channel: str) -> None:
        self._counters["lost"] += 1
        log.warning("publications on %s may have been missed; closing its subscribers", channel)
        if self._gap is not None:
            self._gap(channel)
        else:
            log.error("the hub has no handle_gap(); subscribers of %s are not told", channel)

    async def _catch_up(self, channel: str, epoch: str, top: int) -> None:
        """Wait until every publication up to ``epoch:top`` was handed to the hub."""
        state = self._channels.get(channel)
        if state is None:
            await trio.lowlevel.checkpoint()
            return
        state.waiters += 1
        try:
            with trio.move_on_after(CATCH_UP_TIMEOUT_S):
                while self._channels.get(channel) is state and (
                    state.syncing or (state.epoch == epoch and state.seq < top)
                ):
                    await state.changed.wait()
        finally:
            state.waiters -= 1
        if self._channels.get(channel) is state and (
            state.syncing or state.epoch is None or (state.epoch == epoch and state.seq < top)
        ):
            # The subscriber holds a position this node has not reached: when the channel
            # settles, a replay could repeat what its history answer already held.
            log.warning("pub/sub of %s did not reach %s:%d in time", channel, epoch, top)
            state.uncertain = True
        await trio.lowlevel.checkpoint()

    # -- lifecycle -------------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run both connections and the resync loop until cancelled.

        Resource handling:
            Cancelling closes both sockets.
        """
        await self._subscriber.subscribe([self._control_channel])
        async with trio.open_nursery() as nursery:
            await nursery.start(self._client.run)
            await nursery.start(self._subscriber.run)
            await nursery.start(self.run_resync)
            task_status.started()

    async def wait_connected(self) -> None:
        """Return once both connections are up."""
        await self._client.wait_connected()
        await self._subscriber.wait_connected()


def _new_epoch() -> str:
    return secrets.token_hex(EPOCH_BYTES)


def _parse_history(reply: Any) -> tuple[str, int, int, list[tuple[int, Publication]]]:
    """``(epoch, top, status, [(seq, publication)])`` from the history script's reply."""
    epoch = reply[0].decode()
    top, status = int(reply[1]), int(reply[2])
    entries: list[tuple[int, Publication]] = []
    if status == _RECOVERED and len(reply) > 3:
        for entry_id, fields in reply[3]:
            seq = int(entry_id.split(b"-", 1)[0])
            payload = fields[fields.index(b"d") + 1]
            entries.append((seq, Publication(format_offset(epoch, seq), payload)))
    return epoch, top, status, entries


_check: type[Broker] = RedisBroker


@asynccontextmanager
async def open_redis_broker(
    settings: Settings,
    handler: BrokerEventHandler,
    *,
    key_prefix: str = KEY_PREFIX,
) -> AsyncIterator[RedisBroker]:
    """A :class:`RedisBroker` on ``settings.redis_url`` with its connections running.

    Waits up to :data:`STARTUP_WAIT_S` for Redis; if it is down, the node starts anyway
    (not ready) and the broker connects when Redis comes up.

    Args:
        settings: ``redis_url``, ``history_size``, ``history_ttl``, ``hub_node_id``.
        handler: the hub.
        key_prefix: prefix of every key and pub/sub channel (tests isolate with it).

    Resource handling:
        Both connections close when the block is left.
    """
    if not settings.redis_url:
        raise ValueError("REDIS_URL is not set")
    broker = RedisBroker(
        handler,
        address=RedisAddress.from_url(settings.redis_url),
        keys=RedisKeys(key_prefix),
        history_size=settings.history_size,
        history_ttl_s=settings.history_ttl,
        node_id=settings.hub_node_id,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(broker.run)
        with trio.move_on_after(STARTUP_WAIT_S) as scope:
            await broker.wait_connected()
        if scope.cancelled_caught:
            log.warning(
                "redis at %s not reachable yet; starting without it (not ready)",
                RedisAddress.from_url(settings.redis_url),
            )
        try:
            yield broker
        finally:
            nursery.cancel_scope.cancel()
