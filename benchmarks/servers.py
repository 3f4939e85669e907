"""One handle for the three servers a workload runs against: the hub and its two peers.

:func:`open_server` starts ``hub serve`` (:class:`benchmarks.loadgen.NodeProcess`, with an
admin and a user created and logged in) or a peer (:class:`benchmarks.peers.PeerProcess`)
pinned to a CPU, and yields a :class:`Server` that says how subscribers connect
(:meth:`Server.spec`) and where to publish. Leaving the ``with`` block stops the process
group, whatever happened.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from benchmarks.fanout import ADMIN_EMAIL, PASSWORD, USER_EMAIL
from benchmarks.loadgen import (
    HUB_NOTIFICATION_MARKER,
    SOCKETIO_NOTIFICATION_MARKER,
    NodeProcess,
    SubscriberSpec,
    free_port,
)
from benchmarks.peers import SOCKETIO_FRAME_OVERHEAD, PeerProcess

#: The servers, in the order every workload runs them.
SERVERS = ("hub", "websockets", "socketio")
#: What each is, for tables and plots.
LABELS = {
    "hub": "notification-hub (trio)",
    "websockets": "websockets broadcast() (asyncio + uvloop)",
    "socketio": "python-socketio on uvicorn",
}


@dataclass
class Server:
    """A running server.

    Attributes:
        name: ``"hub"``, ``"websockets"`` or ``"socketio"``.
        port: where WebSocket clients connect.
        publish_port: where ``POST /api/v1/notifications`` goes.
        pid: the server process (for CPU time and RSS).
        tokens: ``"admin"`` (publishing) and ``"user"`` bearer tokens (peers ignore them).
        frame_overhead: bytes the server's framing adds around the hub's notification.
        node: the hub's :class:`NodeProcess` (``None`` for peers).
    """

    name: str
    port: int
    publish_port: int
    pid: int
    tokens: dict[str, str] = field(default_factory=lambda: {"admin": "peer", "user": "peer"})
    frame_overhead: int = 0
    node: NodeProcess | None = None

    def spec(self, channels: Sequence[str], token: str | None = None) -> SubscriberSpec:
        """How one subscriber connects and subscribes to ``channels``."""
        subscribe = {"type": "subscribe", "channels": list(channels)}
        if self.name == "socketio":
            return SubscriberSpec(
                host="127.0.0.1",
                port=self.port,
                path="/socket.io/?EIO=4&transport=websocket",
                messages=(b"40", b'42["subscribe",' + _dumps(subscribe) + b"]"),
                ready_marker=b'42["subscribed"',
                validator="socketio-hub",
                count_marker=SOCKETIO_NOTIFICATION_MARKER,
            )
        headers: tuple[tuple[str, str], ...] = ()
        if self.name == "hub":
            headers = (("Authorization", f"Bearer {token or self.tokens['user']}"),)
        return SubscriberSpec(
            host="127.0.0.1",
            port=self.port,
            path="/ws/notifications",
            headers=headers,
            messages=(_dumps(subscribe),),
            ready_marker=b'"type":"subscribed"',
            validator="hub",
            count_marker=HUB_NOTIFICATION_MARKER,
        )


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


@contextlib.contextmanager
def open_server(
    name: str,
    *,
    cpu: int | None = 0,
    env: dict[str, str] | None = None,
    heartbeat_s: float | None = None,
    redis_url: str | None = None,
    node: NodeProcess | None = None,
    login: bool = True,
) -> Iterator[Server]:
    """Start ``name`` pinned to ``cpu`` and stop it on exit.

    Args:
        env: hub only: settings (``HEARTBEAT_INTERVAL``, ``REDIS_URL``, …).
        heartbeat_s: peers only: their keepalive (see :class:`PeerProcess`).
        redis_url: socket.io only: ``AsyncRedisManager``.
        node: hub only: a prepared, not yet started :class:`NodeProcess` (e.g. with
            users seeded); the admin and user are created in it.
        login: hub only: create and log in the admin and the user.
    """
    if name == "hub":
        hub = node or NodeProcess(port=free_port(), cpu=cpu, env_overrides=dict(env or {}))
        with hub:
            tokens = {}
            if login:
                hub.create_user(ADMIN_EMAIL, PASSWORD, admin=True)
                hub.create_user(USER_EMAIL, PASSWORD)
            hub.start()
            if login:
                tokens = {
                    "admin": hub.login(ADMIN_EMAIL, PASSWORD),
                    "user": hub.login(USER_EMAIL, PASSWORD),
                }
            yield Server("hub", hub.port, hub.port, hub.pid, tokens, 0, hub)
        return
    if name not in ("websockets", "socketio"):
        raise ValueError(f"unknown server {name!r}")
    with PeerProcess(
        name, free_port(), cpu=cpu, heartbeat_s=heartbeat_s, redis_url=redis_url
    ) as peer:
        peer.start()
        overhead = SOCKETIO_FRAME_OVERHEAD if name == "socketio" else 0
        yield Server(name, peer.port, peer.publish_port, peer.pid, frame_overhead=overhead)
