"""A small WebSocket subscriber for the ingest tests (trio-websocket)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import trio
from trio_websocket import WebSocketConnection, open_websocket_url

WS_PATH = "/ws/notifications"
WAIT_S = 10.0
#: Frames trio-websocket buffers for us; a bulk test reads in a task of its own.
CLIENT_QUEUE = 10_000


@dataclass
class Subscriber:
    """Notifications received, by channel, in arrival order."""

    ws: WebSocketConnection
    notifications: list[dict[str, Any]] = field(default_factory=list)
    changed: trio.Event = field(default_factory=trio.Event)
    collecting: bool = False

    async def send(self, frame: dict[str, Any]) -> None:
        await self.ws.send_message(json.dumps(frame))

    async def recv(self) -> dict[str, Any]:
        with trio.fail_after(WAIT_S):
            message = await self.ws.get_message()
        frame: dict[str, Any] = json.loads(message)
        return frame

    async def subscribe(
        self, *channels: str, since: dict[str, str] | None = None
    ) -> dict[str, Any]:
        frame: dict[str, Any] = {"type": "subscribe", "channels": list(channels)}
        if since:
            frame["since"] = since
        await self.send(frame)
        while True:
            reply = await self.recv()
            if reply["type"] == "subscribed":
                return reply
            if reply["type"] == "notification":
                self._add(reply)

    def _add(self, frame: dict[str, Any]) -> None:
        self.notifications.append(frame)
        self.changed.set()
        self.changed = trio.Event()

    async def collect(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Read notifications until the connection closes. Start it with
        ``await nursery.start(client.collect)``: once started, it is the only reader."""
        from trio_websocket import ConnectionClosed

        self.collecting = True
        task_status.started()
        try:
            while True:
                frame = json.loads(await self.ws.get_message())
                if frame.get("type") == "notification":
                    self._add(frame)
        except ConnectionClosed:
            return
        finally:
            self.collecting = False
            self.changed.set()
            self.changed = trio.Event()

    async def wait_for(self, count: int, timeout: float = WAIT_S) -> None:
        """Wait until ``count`` notifications arrived in all (reading them here unless
        :meth:`collect` runs in a task)."""
        with trio.fail_after(timeout):
            while len(self.notifications) < count:
                if self.collecting:
                    await self.changed.wait()
                    continue
                frame = json.loads(await self.ws.get_message())
                if frame.get("type") == "notification":
                    self._add(frame)

    def ids(self) -> list[str]:
        return [frame["data"]["id"] for frame in self.notifications]


@asynccontextmanager
async def subscriber(base_url: str, token: str) -> AsyncIterator[Subscriber]:
    url = base_url.replace("http://", "ws://") + f"{WS_PATH}?token={token}"
    async with open_websocket_url(
        url, connect_timeout=WAIT_S, disconnect_timeout=WAIT_S, message_queue_size=CLIENT_QUEUE
    ) as ws:
        client = Subscriber(ws)
        welcome = await client.recv()
        assert welcome["type"] == "welcome", welcome
        yield client
