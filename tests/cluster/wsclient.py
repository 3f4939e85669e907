"""A WebSocket subscriber that records everything it sees, for Jepsen-style counting.

It behaves like a well-written client (SPEC §3): it resubscribes with ``since`` = the
last offset it got on each channel whenever the server closes with a code that asks for
a reconnect (1001, 1006, 1011, 4008, 4009, 4011), moving to the next node of its list
each time. Unlike the real client library it does not drop duplicates, so the tests can
count them.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio
from trio_websocket import ConnectionClosed, HandshakeError, open_websocket_url

#: Close codes after which the client reconnects and recovers.
RECONNECT_CODES = frozenset({1001, 1006, 1011, 4008, 4009, 4011})
#: Seconds for any one network step.
STEP_TIMEOUT_S = 10.0
#: Pause before retrying a node that refused the connection (client behaviour, not
#: synchronisation: the node may be restarting).
RETRY_PAUSE_S = 0.05
WS_PATH = "/ws/notifications"


@dataclass
class Delivery:
    channel: str
    offset: str
    data: dict[str, Any]
    node: int


@dataclass
class RecordingClient:
    """Subscribes ``channels`` on ``urls[0]``, follows reconnects round the list.

    Args:
        urls: ``http://host:port`` of the nodes.
        token: an access token valid on every node (shared JWT key).
        channels: channels to subscribe.
        cover: called when the server answers ``recovered:false``; whatever it returns
            is stored in :attr:`not_recovered` with the channel (the tests pass the
            publisher's progress, to know which messages the client was told about).
    """

    urls: list[str]
    token: str
    channels: list[str]
    cover: Callable[[], int] = lambda: 0
    deliveries: list[Delivery] = field(default_factory=list)
    closes: list[int] = field(default_factory=list)
    not_recovered: list[tuple[str, int]] = field(default_factory=list)
    subscribed: list[dict[str, Any]] = field(default_factory=list)
    last_offset: dict[str, str] = field(default_factory=dict)
    _changed: trio.Event = field(default_factory=trio.Event)
    _node: int = 0

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_until(
        self, predicate: Callable[[], bool], timeout: float = STEP_TIMEOUT_S
    ) -> None:
        """Wait until ``predicate()`` is true (checked after every frame or close)."""
        with trio.fail_after(timeout):
            while not predicate():
                await self._changed.wait()

    def received(self, channel: str) -> list[Any]:
        """The ``data.n`` of every notification on ``channel``, in arrival order."""
        return [d.data.get("n") for d in self.deliveries if d.channel == channel]

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect, subscribe, record; reconnect on the codes above. Reports started
        after the first ``subscribed`` reply."""
        first = True
        while True:
            url = self.urls[self._node % len(self.urls)]
            ws_url = url.replace("http://", "ws://") + WS_PATH + f"?token={self.token}"
            try:
                async with open_websocket_url(
                    ws_url,
                    connect_timeout=STEP_TIMEOUT_S,
                    disconnect_timeout=1.0,
                    message_queue_size=4096,
                ) as ws:
                    await self._session(ws, task_status if first else None)
                    first = False
            except ConnectionClosed as closed:
                code = closed.reason.code if closed.reason is not None else 1006
                self.closes.append(code)
                self._notify()
                if code not in RECONNECT_CODES:
                    return
                first = False
            except (HandshakeError, OSError, trio.BrokenResourceError):
                await trio.sleep(RETRY_PAUSE_S)
            self._node += 1

    async def _session(self, ws: Any, task_status: trio.TaskStatus[None] | None) -> None:
        welcome = json.loads(await ws.get_message())
        assert welcome["type"] == "welcome", welcome
        frame: dict[str, Any] = {"type": "subscribe", "channels": self.channels}
        if self.last_offset:
            frame["since"] = dict(self.last_offset)
        await ws.send_message(json.dumps(frame))
        node = self._node % len(self.urls)
        while True:
            message = json.loads(await ws.get_message())
            kind = message["type"]
            if kind == "notification":
                self.deliveries.append(
                    Delivery(message["channel"], message["offset"], message["data"], node)
                )
                self.last_offset[message["channel"]] = message["offset"]
            elif kind == "subscribed":
                self.subscribed.append(message)
                for channel, ok in (message.get("recovered") or {}).items():
                    if not ok:
                        self.not_recovered.append((channel, self.cover()))
                if task_status is not None:
                    task_status.started()
                    task_status = None
            elif kind == "error":
                raise AssertionError(f"error frame: {message}")
            self._notify()


@dataclass(frozen=True)
class Tally:
    """Jepsen-style count of one subscriber on one channel (by message number ``n``).

    delivered: distinct messages received; recovered: not received but announced by a
    ``recovered:false`` answered after they were published; lost: neither;
    duplicated: received more than once; reordered: received after a later one.
    """

    delivered: int
    recovered: int
    lost: int
    duplicated: int
    reordered: int
    lost_ids: tuple[int, ...] = ()


def tally(client: RecordingClient, channel: str, total: int) -> Tally:
    """Count ``client``'s view of messages ``0 … total-1`` on ``channel``."""
    got = [n for n in client.received(channel) if isinstance(n, int)]
    seen: set[int] = set()
    duplicated = reordered = 0
    highest = -1
    for n in got:
        if n in seen:
            duplicated += 1
            continue
        seen.add(n)
        if n < highest:
            reordered += 1
        highest = max(highest, n)
    covered_up_to = max((upto for ch, upto in client.not_recovered if ch == channel), default=0)
    missing = [n for n in range(total) if n not in seen]
    recovered = [n for n in missing if n < covered_up_to]
    lost = tuple(n for n in missing if n >= covered_up_to)
    return Tally(len(seen), len(recovered), len(lost), duplicated, reordered, lost)
