"""The channel actor: one per channel with subscribers on this node.

It owns the channel's subscriber set and its fan-out backlog: each publication is
encoded into one frame, appended to the backlog, and written to every subscriber by
sweeps over the subscriber set (research/spike-fanout.md, design "(b+)", plus the
coalescing fast path: frames queued for one socket go out in one write). It exists from
the first subscribe until a short linger after the last subscriber leaves (the hub's
janitor then retires it and drops the node's broker subscription).
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import trio

from actors import protocol
from actors.close_codes import CloseCode
from actors.wsframes import text_frame
from bridge.broker import parse_offset

if TYPE_CHECKING:
    from actors.connection import ConnectionActor
    from bridge.broker import HistoryResult, Publication

log = logging.getLogger("hub.realtime.channel")

#: Most live publications held for one subscriber while its ``since`` replay is
#: fetched; more and the subscriber is closed as a slow consumer (4009).
MAX_RECOVERY_BUFFER = 1000
#: Channels with at most this many subscribers are written to inline, inside the
#: publishing call, when nothing is pending (no task hop; holds the loop ≤ ~0.5 ms).
INLINE_MAX_SUBSCRIBERS = 64
#: A sweep lets other tasks run after this many seconds of writing: a REST request or
#: a handshake waits at most this long per checkpoint of its own behind a sweep.
SWEEP_SLICE_S = 0.00025
#: A sweep reads the clock every this many socket writes.
SWEEP_CLOCK_EVERY = 16
#: While a :class:`FanoutBatch` is open, a small channel writes out its deferred
#: frames early once it holds this many (far below :data:`BACKLOG_MAX_FRAMES`, so a
#: publisher in the batch never waits for room that only the batch's end would make).
DEFER_MAX_FRAMES = 32
#: Local publishers wait (:meth:`ChannelActor.wait_room`) while the backlog holds this
#: many frames or :data:`BACKLOG_MAX_BYTES`; they resume once a sweep halves it.
BACKLOG_MAX_FRAMES = 128
BACKLOG_MAX_BYTES = 1024 * 1024


class ChannelState(enum.Enum):
    JOINING = "joining"  # waiting for the broker subscription
    ACTIVE = "active"
    CLOSING = "closing"  # the broker subscription is being dropped


class FanoutStats:
    """Counters a channel actor reports into (the hub owns one for the node).

    Attributes:
        delivered: frames handed to subscribers (one per subscriber and message).
        writes: writes that handed them (one per subscriber and sweep or batch; the
            ratio ``delivered / writes`` is how much fan-out coalesced).
        on_fanout: called, per message, with the seconds from its arrival in the
            backlog until every subscriber had been handed it (``None``: not measured).
    """

    __slots__ = ("delivered", "on_fanout", "writes")

    def __init__(self) -> None:
        self.delivered = 0
        self.writes = 0
        self.on_fanout: Callable[[float], None] | None = None


class FanoutBatch:
    """Write-combining for a batch of publications (the hub owns one for the node).

    While it is open (``with batch:``; it nests), a small channel does not write a
    publication to its subscribers inline: it keeps the frame in its backlog and
    registers here, and when the outermost ``with`` ends, every registered channel
    writes each subscriber all its frames in one ``send``. A publisher handing over
    many publications at once (the RabbitMQ consumer with a batch of deliveries) thus
    costs one system call per subscriber and batch instead of one per message; a
    batch of one costs what an inline write does.

    Latency: a frame waits for the end of the batch, or until its channel holds
    :data:`DEFER_MAX_FRAMES`. Large channels are unaffected (they sweep anyway).

    Cancellation: leaving the ``with`` by an exception or a cancellation writes out
    what is deferred all the same (the flush never blocks).
    """

    __slots__ = ("_channels", "_depth")

    def __init__(self) -> None:
        self._depth = 0
        self._channels: list[ChannelActor] = []

    @property
    def active(self) -> bool:
        return self._depth > 0

    def __enter__(self) -> FanoutBatch:
        self._depth += 1
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._depth -= 1
        if not self._depth:
            self.flush()

    def defer(self, actor: ChannelActor) -> None:
        self._channels.append(actor)

    def flush(self) -> None:
        """Write out every channel's deferred frames now."""
        while self._channels:
            channels, self._channels = self._channels, []
            for actor in channels:
                try:
                    actor.write_deferred()
                except Exception:  # a bug in fan-out must not fail the publisher
                    log.exception("fan-out to channel %s failed", actor.name)


class ChannelActor:
    """The subscribers of one channel on this node, and the fan-out to them.

    Mailbox:
        The backlog: :meth:`broadcast` appends one encoded frame per publication (in
        broker order) and returns at once. A sweep then visits every subscriber and
        writes, in one ``send``, all the frames it has not had yet (the bytes joined
        once and shared by every subscriber at the same position). A message that
        arrives mid-sweep reaches the rest of that sweep's subscribers and the others
        in the next sweep, so a message waits at most about one sweep. Small channels
        (:data:`INLINE_MAX_SUBSCRIBERS`) with an empty backlog are written to inline.

    Backpressure:
        Towards local publishers: :meth:`wait_room` blocks while the backlog is full
        (:data:`BACKLOG_MAX_FRAMES` / :data:`BACKLOG_MAX_BYTES`); the REST publish
        handler and the RabbitMQ consumer wait there, so a node never accepts faster
        than it fans out. Publications from other nodes (Redis) are never refused:
        their publishers wait on their own node. Towards subscribers: none by design;
        each subscriber's bounded send queue absorbs what its socket does not take at
        once, and overflowing it closes that subscriber with 4009 (its own actor does
        that). A slow subscriber never slows the others.

    Cancellation:
        The sweep task checkpoints every :data:`SWEEP_SLICE_S` of writing. Cancelled (the
        node stopping), it leaves the backlog and positions consistent: the next
        publication starts a new sweep that goes on where it stopped.

    Resource handling:
        Subscribers are added and removed by their connection actors through the hub;
        a closed connection removes itself from every channel when it ends. The sweep
        task runs in the nursery given to :meth:`start_sweeps` (the realtime core's);
        without one, sweeps run inline.
    """

    __slots__ = (
        "_backlog",
        "_backlog_bytes",
        "_base",
        "_batch",
        "_deferred",
        "_idle",
        "_position",
        "_room",
        "_spawn",
        "_stats",
        "_sweeping",
        "_times",
        "name",
        "recovering",
        "state",
        "subscribers",
        "transition",
    )

    def __init__(
        self,
        name: str,
        stats: FanoutStats | None = None,
        spawn: Callable[[Callable[[], Awaitable[object]]], None] | None = None,
        batch: FanoutBatch | None = None,
    ) -> None:
        self.name = name
        self.subscribers: set[ConnectionActor] = set()
        #: Subscribers waiting for their history: live publications are held for them.
        self.recovering: dict[ConnectionActor, list[tuple[Publication, bytes]]] = {}
        self.state = ChannelState.JOINING
        #: Set when the current JOINING or CLOSING transition ends.
        self.transition: trio.Event | None = trio.Event()
        self._stats = stats if stats is not None else FanoutStats()
        #: Starts a task (``nursery.start_soon``); ``None``: sweep inline.
        self._spawn = spawn
        #: Defers inline writes while open; ``_deferred``: registered with it.
        self._batch = batch
        self._deferred = False
        #: Frames not yet written to every subscriber; ``_backlog[0]`` has number
        #: ``_base`` (frames are numbered from 0 in arrival order).
        self._backlog: list[bytes] = []
        self._backlog_bytes = 0
        #: When each backlog frame arrived (perf_counter), for ``on_fanout``.
        self._times: list[float] = []
        self._base = 0
        #: Number of the next frame each subscriber needs; absent: ``_base``.
        self._position: dict[ConnectionActor, int] = {}
        self._sweeping = False
        self._room: trio.Event | None = None
        self._idle: trio.Event | None = None

    @property
    def is_empty(self) -> bool:
        return not self.subscribers and not self.recovering

    @property
    def backlog(self) -> int:
        """Frames not yet written to every subscriber."""
        return len(self._backlog)

    @property
    def has_room(self) -> bool:
        return len(self._backlog) < BACKLOG_MAX_FRAMES and self._backlog_bytes < BACKLOG_MAX_BYTES

    async def wait_room(self) -> None:
        """Return once the backlog has room for another publication.

        Cancellation: safe to cancel; nothing is taken or reserved.
        """
        while not self.has_room:
            if self._room is None:
                self._room = trio.Event()
            await self._room.wait()

    async def wait_swept(self) -> None:
        """Return once the backlog is empty (every subscriber was handed every frame).

        Cancellation: safe to cancel.
        """
        while self._backlog:
            if self._idle is None:
                self._idle = trio.Event()
            await self._idle.wait()

    def broadcast(self, publication: Publication) -> None:
        """Encode ``publication`` once and queue it for every subscriber.

        Never blocks. On a small idle channel the frame is written before this returns;
        otherwise a sweep (started here if none runs) writes it.
        """
        payload = protocol.notification(self.name, publication.offset, publication.payload)
        frame = text_frame(payload)
        if self.recovering:
            for conn, held in self.recovering.items():
                held.append((publication, frame))
                if len(held) > MAX_RECOVERY_BUFFER:
                    conn.close_soon(CloseCode.SLOW_CONSUMER)
        inline = len(self.subscribers) <= INLINE_MAX_SUBSCRIBERS and (
            not self._backlog or self._deferred
        )
        self._append(frame)
        if self._sweeping:
            return  # the running sweep picks it up
        if not inline:
            self._start_sweep()
            return
        batch = self._batch
        if batch is not None and batch.active:
            if not self._deferred:
                self._deferred = True
                batch.defer(self)
            if len(self._backlog) < DEFER_MAX_FRAMES:
                return
        self._sweep_inline()

    def write_deferred(self) -> None:
        """Write what an open :class:`FanoutBatch` deferred (it calls this at its end)."""
        self._deferred = False
        if not self._backlog or self._sweeping:
            return
        if len(self.subscribers) <= INLINE_MAX_SUBSCRIBERS:
            self._sweep_inline()
        else:
            self._start_sweep()

    def _start_sweep(self) -> None:
        """Sweep in a task of its own (inline without a nursery, or when it is closing:
        the node is stopping)."""
        if self._spawn is not None:
            self._sweeping = True
            try:
                self._spawn(self._sweep)
                return
            except RuntimeError:
                self._sweeping = False
        self._sweep_inline()

    def _append(self, frame: bytes) -> None:
        self._backlog.append(frame)
        self._backlog_bytes += len(frame)
        self._times.append(time.perf_counter())

    def _write_pending(self, conn: ConnectionActor, head: int, joined: dict[int, bytes]) -> None:
        """Write to ``conn`` every frame it has not had, up to ``head``, in one send."""
        start = self._position.get(conn, self._base)
        if start >= head:
            return
        data = joined.get(start)
        if data is None:
            index = start - self._base
            if head - start == 1:
                data = self._backlog[index]
            else:
                data = b"".join(self._backlog[index : head - self._base])
            joined[start] = data
        self._position[conn] = head
        stats = self._stats
        stats.delivered += head - start
        stats.writes += 1
        conn.send_frame(data)

    def _sweep_inline(self) -> None:
        """One complete sweep without yielding (small channels, or no nursery)."""
        head = self._base + len(self._backlog)
        joined: dict[int, bytes] = {}
        for conn in self.subscribers:
            self._write_pending(conn, head, joined)
        self._trim(head)

    async def _sweep(self) -> None:
        """Sweep until every subscriber has every frame of the backlog."""
        try:
            await self._sweep_passes()
        except Exception:  # a bug in fan-out must not take the node down
            log.exception("fan-out to channel %s failed; its backlog is dropped", self.name)
            self._trim(self._base + len(self._backlog), observe=False)
        finally:
            self._sweeping = False

    async def _sweep_passes(self) -> None:
        clock = time.perf_counter
        while self._backlog:
            pass_head = self._base + len(self._backlog)
            head = pass_head
            joined: dict[int, bytes] = {}
            subscribers = self.subscribers
            slice_end = clock() + SWEEP_SLICE_S
            countdown = SWEEP_CLOCK_EVERY
            for conn in list(subscribers):
                countdown -= 1
                if not countdown:
                    countdown = SWEEP_CLOCK_EVERY
                    if clock() >= slice_end:
                        await trio.lowlevel.checkpoint()
                        slice_end = clock() + SWEEP_SLICE_S
                        now_head = self._base + len(self._backlog)
                        if now_head != head:
                            head = now_head
                            joined = {}
                if conn in subscribers:
                    self._write_pending(conn, head, joined)
            # Every subscriber now has every frame before pass_head (newcomers
            # start at the head they joined at).
            self._trim(pass_head)

    def _trim(self, upto: int, *, observe: bool = True) -> None:
        """Forget frames before ``upto``: every subscriber has had them."""
        count = upto - self._base
        if count <= 0:
            return
        on_fanout = self._stats.on_fanout
        if on_fanout is not None and observe:
            now = time.perf_counter()
            for arrived in self._times[:count]:
                on_fanout(now - arrived)
        if count == len(self._backlog):
            self._backlog.clear()
            self._times.clear()
            self._backlog_bytes = 0
            self._position.clear()  # everyone is at the head: absent means _base
        else:
            self._backlog_bytes -= sum(len(frame) for frame in self._backlog[:count])
            del self._backlog[:count]
            del self._times[:count]
        self._base = upto
        room = self._room
        if room is not None and (
            len(self._backlog) <= BACKLOG_MAX_FRAMES // 2
            and self._backlog_bytes <= BACKLOG_MAX_BYTES // 2
        ):
            self._room = None
            room.set()
        idle = self._idle
        if idle is not None and not self._backlog:
            self._idle = None
            idle.set()

    def begin_recovery(self, conn: ConnectionActor) -> None:
        """Hold live publications for ``conn`` until :meth:`finish_recovery`."""
        self.recovering[conn] = []

    def finish_recovery(self, conn: ConnectionActor, history: HistoryResult) -> list[bytes]:
        """Make ``conn`` a live subscriber and return the frames it must get first.

        Those are the replayed publications (when recovered) followed by the live ones
        held meanwhile that come after ``history.position``; in that order, nothing
        is missing or repeated. Returns ``[]`` when ``conn`` left meanwhile.
        """
        held = self.recovering.pop(conn, None)
        if held is None:
            return []
        frames = [
            text_frame(protocol.notification(self.name, pub.offset, pub.payload))
            for pub in (history.publications if history.recovered else ())
        ]
        position = parse_offset(history.position)
        for publication, frame in held:
            parsed = parse_offset(publication.offset)
            if (
                position is not None
                and parsed is not None
                and parsed[0] == position[0]
                and parsed[1] <= position[1]
            ):
                continue  # already part of the history answer (or before the position)
            frames.append(frame)
        self.subscribers.add(conn)
        if self._backlog:
            self._position[conn] = self._base + len(self._backlog)
        return frames

    def remove(self, conn: ConnectionActor) -> None:
        """Forget ``conn`` (live or recovering). Idempotent."""
        self.subscribers.discard(conn)
        self.recovering.pop(conn, None)
        self._position.pop(conn, None)
