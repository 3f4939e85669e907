"""Fixtures for the realtime tests: a real node on SQLite, accounts with tokens, and
WebSocket clients from third-party libraries (trio-websocket in the loop, the
``websockets`` sync client in a worker thread).

Storage is not on the realtime path, so these tests run on SQLite only.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import pytest
import trio
from trio_websocket import WebSocketConnection, open_websocket_url

from tests.harness import WAIT_S, Account, RunningNode

WS_PATH = "/ws/notifications"


@pytest.fixture
def backend() -> str:
    """Realtime tests run on SQLite only (overrides the two-backend fixture)."""
    return "sqlite"


def ws_url(running: RunningNode, token: str | None = None) -> str:
    base = running.url.replace("http://", "ws://") + WS_PATH
    return f"{base}?token={token}" if token is not None else base


@dataclass
class Client:
    """A trio-websocket connection with JSON helpers."""

    ws: WebSocketConnection

    async def send(self, frame: dict[str, Any]) -> None:
        await self.ws.send_message(json.dumps(frame))

    async def recv(self, timeout: float = WAIT_S) -> dict[str, Any]:
        with trio.fail_after(timeout):
            message = await self.ws.get_message()
        assert isinstance(message, str)
        frame: dict[str, Any] = json.loads(message)
        return frame

    async def recv_until(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = WAIT_S
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """The first frame matching ``predicate`` and the frames received before it."""
        skipped = []
        with trio.fail_after(timeout):
            while True:
                frame = await self.recv()
                if predicate(frame):
                    return frame, skipped
                skipped.append(frame)

    async def request(self, frame: dict[str, Any], reply_type: str) -> dict[str, Any]:
        """Send ``frame`` and return the reply of ``reply_type`` (other frames skipped)."""
        await self.send(frame)
        reply, _ = await self.recv_until(lambda f: f["type"] == reply_type)
        return reply

    async def subscribe(self, *channels: str, **extra: Any) -> dict[str, Any]:
        return await self.request(
            {"type": "subscribe", "channels": list(channels), **extra}, "subscribed"
        )

    async def close_code(self, timeout: float = WAIT_S) -> int | None:
        """Read until the server closes; the close code it sent."""
        from trio_websocket import ConnectionClosed

        with trio.fail_after(timeout):
            try:
                while True:
                    await self.ws.get_message()
            except ConnectionClosed as closed:
                return closed.reason.code
        return None  # pragma: no cover


@asynccontextmanager
async def connect(
    running: RunningNode,
    token: str | None,
    *,
    headers: list[tuple[bytes, bytes]] | None = None,
    welcome: bool = True,
    via_header: bool = False,
) -> AsyncIterator[Client]:
    """Open a WebSocket with trio-websocket; wait for the welcome frame unless told not."""
    extra = list(headers or [])
    url = ws_url(running, None if via_header else token)
    if via_header and token is not None:
        extra.append((b"Authorization", f"Bearer {token}".encode()))
    async with open_websocket_url(
        url,
        extra_headers=extra,
        connect_timeout=WAIT_S,
        disconnect_timeout=WAIT_S,
        message_queue_size=1024,
    ) as ws:
        client = Client(ws)
        if welcome:
            frame = await client.recv()
            assert frame["type"] == "welcome", frame
        yield client


async def publish(running: RunningNode, admin: Account, **body: Any) -> dict[str, Any]:
    """``POST /api/v1/notifications``; the ``data`` of the 202 answer."""
    response = await running.client.post("/api/v1/notifications", json=body, headers=admin.headers)
    assert response.status_code == 202, response.text
    data: dict[str, Any] = response.json()["data"]
    return data


@pytest.fixture
async def admin(hub_node: RunningNode) -> Account:
    return await hub_node.create_account(admin=True)


@pytest.fixture
async def user(hub_node: RunningNode) -> Account:
    return await hub_node.create_account()
