"""The channel actor: one per channel with subscribers on this node.

It owns the channel's subscriber set and turns each publication into one frame that it
writes to every subscriber (research/spike-fanout.md, design "(b+)"). It exists from the
first subscribe until a short linger after the last subscriber leaves (the hub's
janitor then retires it and drops the node's broker subscription).
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING

import trio

from actors import protocol
from actors.close_codes import CloseCode
from actors.wsframes import text_frame
from bridge.broker import parse_offset

if TYPE_CHECKING:
    from actors.connection import ConnectionActor
    from bridge.broker import HistoryResult, Publication

#: Most live publications held for one subscriber while its ``since`` replay is
#: fetched; more and the subscriber is closed as a slow consumer (4009).
MAX_RECOVERY_BUFFER = 1000


class ChannelState(enum.Enum):
    JOINING = "joining"  # waiting for the broker subscription
    ACTIVE = "active"
    CLOSING = "closing"  # the broker subscription is being dropped


class ChannelActor:
    """The subscribers of one channel on this node, and the fan-out to them.

    Mailbox:
        None. The broker's handler calls :meth:`broadcast` directly; it is synchronous
        and never blocks, so a publication reaches every subscriber's socket (or send
        queue) before the call returns, in broker order.

    Backpressure:
        None towards the publisher, by design: each subscriber's bounded send queue
        absorbs bursts, and a subscriber whose queue overflows is closed with 4009
        by its own connection actor. A slow subscriber never slows the others.

    Cancellation:
        Nothing to cancel: every method is synchronous. The only waiting around a
        channel is the hub's, for :attr:`transition` (broker subscribe/unsubscribe).

    Resource handling:
        Subscribers are added and removed by their connection actors through the hub;
        a closed connection removes itself from every channel when it ends.
    """

    __slots__ = ("name", "recovering", "state", "subscribers", "transition")

    def __init__(self, name: str) -> None:
        self.name = name
        self.subscribers: set[ConnectionActor] = set()
        #: Subscribers waiting for their history: live publications are held for them.
        self.recovering: dict[ConnectionActor, list[tuple[Publication, bytes]]] = {}
        self.state = ChannelState.JOINING
        #: Set when the current JOINING or CLOSING transition ends.
        self.transition: trio.Event | None = trio.Event()

    @property
    def is_empty(self) -> bool:
        return not self.subscribers and not self.recovering

    def broadcast(self, publication: Publication) -> int:
        """Encode ``publication`` once and write it to every subscriber.

        Returns:
            How many subscribers it was handed to.
        """
        payload = protocol.notification(self.name, publication.offset, publication.payload)
        frame = text_frame(payload)
        for conn in self.subscribers:
            conn.send_frame(frame)
        if self.recovering:
            for conn, held in self.recovering.items():
                held.append((publication, frame))
                if len(held) > MAX_RECOVERY_BUFFER:
                    conn.close_soon(CloseCode.SLOW_CONSUMER)
        return len(self.subscribers)

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
        return frames

    def remove(self, conn: ConnectionActor) -> None:
        """Forget ``conn`` (live or recovering). Idempotent."""
        self.subscribers.discard(conn)
        self.recovering.pop(conn, None)
