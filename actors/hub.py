"""The hub: this node's registry of connection actors and channel actors.

It indexes connections by user and by session (so a logout or an account deletion
closes exactly those sockets), keeps one :class:`~actors.channel.ChannelActor` per
channel with local subscribers, takes and drops the node's broker subscription per
channel, and receives every publication (and every gap: 4011) from the broker
(:class:`~bridge.broker.BrokerEventHandler`).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

import trio

from actors.channel import ChannelActor, ChannelState, FanoutBatch, FanoutStats
from actors.close_codes import CloseCode

if TYPE_CHECKING:
    from actors.connection import ConnectionActor
    from api.auth.tokens import AccessClaims
    from bridge.broker import Broker, Publication

log = logging.getLogger("hub.realtime.hub")

#: Seconds an empty channel actor lingers before the janitor retires it, so a client
#: that resubscribes quickly does not churn the broker subscription.
CHANNEL_LINGER_S = 5.0
#: Seconds between two janitor sweeps.
JANITOR_INTERVAL_S = 1.0


class Hub:
    """Registry of this node's connections and channels.

    Mailbox:
        None: every method except :meth:`join` and :meth:`run_janitor` is a direct,
        synchronous call that never blocks, safe from any task (the broker's reader, the
        REST handler, a connection actor, a revocation callback).

    Backpressure:
        None is needed here; it lives in each connection's bounded send queue.

    Cancellation:
        :meth:`join` may be cancelled while it waits for the broker: a channel it was
        creating is then forgotten, and whoever else waited for it creates it again.
        :meth:`run_janitor` is restarted by the supervisor when it crashes and stops
        when cancelled.

    Resource handling:
        Connection actors add themselves once accepted and remove themselves when they
        end; the hub never closes a socket itself, it asks the actor to (``close_soon``).
    """

    def __init__(self) -> None:
        self.broker: Broker
        self.connections: set[ConnectionActor] = set()
        self.channels: dict[str, ChannelActor] = {}
        self._by_user: dict[str, set[ConnectionActor]] = {}
        self._by_session: dict[str, set[ConnectionActor]] = {}
        self._idle: dict[str, float] = {}  # channel -> when it became empty
        self._empty: trio.Event | None = None
        self.draining = False
        self.opened = 0
        self.fanout = FanoutStats()
        #: Open it around a batch of publications: small channels then write each
        #: subscriber once per batch (:class:`~actors.channel.FanoutBatch`).
        self.fanout_batch = FanoutBatch()
        self.publications = 0
        self.gaps = 0
        #: frames not written, by reason ("slow_consumer": queued when closed with 4009;
        #: "closing": published to a connection already closing)
        self.dropped: Counter[str] = Counter()
        self.closed: Counter[int] = Counter()
        #: Where channel actors run their sweeps (the realtime core's nursery);
        #: ``None``: sweeps run inline.
        self.nursery: trio.Nursery | None = None

    @property
    def delivered(self) -> int:
        """Frames handed to local subscribers (one per subscriber and message)."""
        return self.fanout.delivered

    @property
    def on_fanout(self) -> Callable[[float], None] | None:
        """Called, per message, with the seconds its fan-out took (the metrics
        histogram): from its arrival here until every local subscriber had it."""
        return self.fanout.on_fanout

    @on_fanout.setter
    def on_fanout(self, hook: Callable[[float], None] | None) -> None:
        self.fanout.on_fanout = hook

    def _spawn(self, task: Callable[[], Awaitable[object]]) -> None:
        """Start a channel's sweep task; raises RuntimeError when there is no nursery
        (or it is closing): the channel then sweeps inline."""
        if self.nursery is None:
            raise RuntimeError("no nursery for fan-out sweeps")
        self.nursery.start_soon(task)

    # -- connections -------------------------------------------------------------------
    def add_connection(self, conn: ConnectionActor) -> None:
        """Register an accepted, authenticated connection."""
        self.connections.add(conn)
        self._by_user.setdefault(conn.user_id, set()).add(conn)
        self._by_session.setdefault(conn.session_id, set()).add(conn)
        self.opened += 1

    def reindex_session(self, conn: ConnectionActor, old_session_id: str) -> None:
        """Move ``conn`` from ``old_session_id`` to its current session (after refresh)."""
        if old_session_id == conn.session_id:
            return
        _discard(self._by_session, old_session_id, conn)
        self._by_session.setdefault(conn.session_id, set()).add(conn)

    def remove_connection(self, conn: ConnectionActor, close_code: int | None) -> None:
        """Forget ``conn`` and its subscriptions, counting its close code. Called once
        per connection actor, registered or refused."""
        if close_code is not None:
            self.closed[close_code] += 1
        if conn not in self.connections:
            return
        self.connections.discard(conn)
        _discard(self._by_user, conn.user_id, conn)
        _discard(self._by_session, conn.session_id, conn)
        for name in list(conn.channels):
            self.leave(conn, name)
        if not self.connections and self._empty is not None:
            self._empty.set()

    def close_all(self, code: CloseCode) -> None:
        for conn in list(self.connections):
            conn.close_soon(code)

    def abort_all(self) -> None:
        for conn in list(self.connections):
            conn.abort()

    async def wait_empty(self) -> None:
        """Return once no connection is registered."""
        while self.connections:
            if self._empty is None or self._empty.is_set():
                self._empty = trio.Event()
            await self._empty.wait()

    def close_revoked(
        self, kind: str, ident: str, is_revoked: Callable[[AccessClaims], bool]
    ) -> None:
        """Close (4001) the sockets of session or user ``ident`` whose token
        ``is_revoked`` now says is revoked (a user revocation spares tokens issued
        after it)."""
        index = self._by_session if kind == "session" else self._by_user
        for conn in list(index.get(ident, ())):
            if conn.claims is not None and is_revoked(conn.claims):
                conn.close_soon(CloseCode.UNAUTHORIZED, "token revoked")

    # -- channels ----------------------------------------------------------------------
    async def join(self, name: str) -> ChannelActor:
        """The active actor of channel ``name``, created (with the node's broker
        subscription) when there is none. The caller then adds its connection with
        :meth:`ChannelActor.begin_recovery` before it next awaits.

        Raises:
            Exception: whatever the broker raised while subscribing.
        """
        while True:
            actor = self.channels.get(name)
            if actor is None:
                actor = self.channels[name] = ChannelActor(
                    name, self.fanout, self._spawn, self.fanout_batch
                )
                try:
                    await self.broker.subscribe(name)
                except BaseException:
                    del self.channels[name]
                    assert actor.transition is not None
                    actor.transition.set()
                    raise
                actor.state = ChannelState.ACTIVE
                assert actor.transition is not None
                actor.transition.set()
                actor.transition = None
                # Watched from birth: if its first subscriber never arrives, it retires.
                self._idle[name] = trio.current_time()
                return actor
            if actor.state is ChannelState.ACTIVE:
                return actor
            assert actor.transition is not None
            await actor.transition.wait()

    def leave(self, conn: ConnectionActor, name: str) -> None:
        """Remove ``conn`` from channel ``name``; an emptied channel starts to linger."""
        actor = conn.channels.pop(name, None)
        if actor is None:
            return
        actor.remove(conn)
        if actor.is_empty and actor.state is ChannelState.ACTIVE:
            self._idle[name] = trio.current_time()

    async def wait_fanout_room(self, channels: Sequence[str]) -> None:
        """Return once every channel of ``channels`` that has local subscribers has
        room in its fan-out backlog (:meth:`ChannelActor.wait_room`): local
        publishers call it first, so this node never accepts faster than it fans out.

        Cancellation: safe to cancel; nothing is reserved.
        """
        for name in channels:
            actor = self.channels.get(name)
            if actor is not None and not actor.has_room:
                await actor.wait_room()

    async def wait_swept(self) -> None:
        """Return once every channel's fan-out backlog is empty.

        Cancellation: safe to cancel (the drain bounds it with a timeout).
        """
        for actor in list(self.channels.values()):
            await actor.wait_swept()

    def handle_publication(self, channel: str, publication: Publication) -> None:
        """:class:`~bridge.broker.BrokerEventHandler`: fan out to local subscribers."""
        self.publications += 1
        actor = self.channels.get(channel)
        if actor is None or actor.state is ChannelState.CLOSING:
            return
        try:
            actor.broadcast(publication)
        except Exception:  # a bug in fan-out must not fail the publisher
            log.exception("fan-out to channel %s failed", channel)

    def handle_gap(self, channel: str) -> None:
        """:class:`~bridge.broker.BrokerEventHandler`: this node may have missed
        publications on ``channel`` that its history no longer holds. Close (4011) every
        local subscriber of it, live or recovering, so each reconnects and learns
        ``recovered:false`` instead of living with a silent gap."""
        actor = self.channels.get(channel)
        if actor is None:
            return
        self.gaps += 1
        for conn in [*actor.subscribers, *actor.recovering]:
            conn.close_soon(CloseCode.INSUFFICIENT_STATE)

    async def run_janitor(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Retire channel actors that stayed empty for :data:`CHANNEL_LINGER_S`.

        Cancellation:
            Cancel the surrounding scope to stop. A retirement interrupted while the
            broker unsubscribes leaves the actor CLOSING; the node is stopping then.
        """
        task_status.started()
        while True:
            await trio.sleep(JANITOR_INTERVAL_S)
            horizon = trio.current_time() - CHANNEL_LINGER_S
            for name, since in list(self._idle.items()):
                if since <= horizon:
                    await self._retire(name)

    async def _retire(self, name: str) -> None:
        self._idle.pop(name, None)
        actor = self.channels.get(name)
        if actor is None or actor.state is not ChannelState.ACTIVE or not actor.is_empty:
            return
        actor.state = ChannelState.CLOSING
        actor.transition = trio.Event()
        try:
            await self.broker.unsubscribe(name)
        finally:
            del self.channels[name]
            actor.transition.set()

    def channel_counts(self) -> dict[str, int]:
        """Local subscribers of each active channel (including those recovering)."""
        return {
            name: len(actor.subscribers) + len(actor.recovering)
            for name, actor in self.channels.items()
        }

    def statistics(self) -> dict[str, object]:
        """Counts for ``/metrics`` and tests; ``closed`` is by close code, ``closing``
        counts connections that are closing now, by code."""
        closing = Counter(c.close_code for c in self.connections if c.close_code is not None)
        return {
            "connections": len(self.connections),
            "connections_opened": self.opened,
            "channels": len(self.channels),
            "publications": self.publications,
            "delivered": self.delivered,
            "fanout_writes": self.fanout.writes,
            "gaps": self.gaps,
            "closed": dict(self.closed),
            "closing": dict(closing),
            "dropped": dict(self.dropped),
        }


def _discard(index: dict[str, set[ConnectionActor]], key: str, conn: ConnectionActor) -> None:
    members = index.get(key)
    if members is not None:
        members.discard(conn)
        if not members:
            del index[key]
