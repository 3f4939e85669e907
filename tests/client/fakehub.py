"""A scripted, in-process stand-in for the hub's WebSocket endpoint (SPEC §3).

It speaks the protocol over real loopback sockets (trio-websocket's server) so the client
is tested end to end, while each test decides what the "server" does: close with a code,
lose its history, refuse a channel, answer a refresh. Every step the server observes is
put on :attr:`FakeHub.events`, so tests wait on those instead of sleeping.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest, serve_websocket

EVENT_BUFFER = 1000


@dataclass
class FakeConnection:
    ws: WebSocketConnection
    token: str | None
    channels: set[str] = field(default_factory=set)


@dataclass
class FakeHub:
    """Server state: per-channel history with ``"<epoch>:<seq>"`` offsets, connections."""

    port: int = 0
    heartbeat_interval: float = 30.0
    epoch: str = "e1"
    history_size: int = 100
    rejected_tokens: set[str] = field(default_factory=set)
    forbidden: set[str] = field(default_factory=set)
    refuse_refresh: bool = False
    echo_ids: bool = True
    connections: list[FakeConnection] = field(default_factory=list)
    history: dict[str, list[tuple[str, dict[str, Any]]]] = field(default_factory=dict)
    seq: dict[str, int] = field(default_factory=dict)
    tokens_seen: list[str | None] = field(default_factory=list)
    frames: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._send_events, self.events = trio.open_memory_channel[tuple[str, Any]](EVENT_BUFFER)
        self._nursery: trio.Nursery | None = None
        self._server_scope: trio.CancelScope | None = None

    async def start(self) -> None:
        """Listen (again) on :attr:`port`; the first start picks a free port."""
        assert self._nursery is not None
        await self._nursery.start(self._serve)

    async def stop(self) -> None:
        """Stop listening and drop every connection without a close frame (as a crashed
        node would: the client sees 1006, then refused connections)."""
        assert self._server_scope is not None
        self._server_scope.cancel()
        self._server_scope = None
        self.connections.clear()
        await trio.lowlevel.checkpoint()

    async def _serve(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        with trio.CancelScope() as scope:
            self._server_scope = scope
            async with trio.open_nursery() as nursery:
                server = await nursery.start(
                    serve_websocket, self._handle, "127.0.0.1", self.port, None
                )
                self.port = server.port
                task_status.started()

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    # ------------------------------------------------------------------ test controls

    async def wait_for(self, kind: str, match: Callable[[Any], bool] | None = None) -> Any:
        """Skip events until one of ``kind`` (for which ``match`` is true) arrives; return
        its value."""
        async for event, value in self.events:
            if event == kind and (match is None or match(value)):
                return value
        raise AssertionError(f"no {kind} event")  # pragma: no cover

    async def publish(self, channel: str, data: dict[str, Any]) -> str:
        self.seq[channel] = self.seq.get(channel, 0) + 1
        offset = f"{self.epoch}:{self.seq[channel]}"
        kept = self.history.setdefault(channel, [])
        kept.append((offset, data))
        del kept[: -self.history_size]
        frame = _notification(channel, offset, data)
        for conn in list(self.connections):
            if channel in conn.channels:
                try:
                    await conn.ws.send_message(frame)
                except ConnectionClosed:
                    pass
        return offset

    async def send_raw(self, frame: dict[str, Any]) -> None:
        """Send ``frame`` to every connection (e.g. a duplicate notification)."""
        for conn in list(self.connections):
            try:
                await conn.ws.send_message(json.dumps(frame))
            except ConnectionClosed:
                pass

    async def close_all(self, code: int, reason: str = "") -> None:
        for conn in list(self.connections):
            await conn.ws.aclose(code, reason or None)

    def lose_history(self, new_epoch: str) -> None:
        """What a restart of an in-memory node looks like: new epoch, nothing kept."""
        self.epoch = new_epoch
        self.history.clear()
        self.seq.clear()

    # ------------------------------------------------------------------ protocol

    async def _handle(self, request: WebSocketRequest) -> None:
        headers = dict(request.headers)
        auth = headers.get(b"authorization", b"").decode()
        token = auth.removeprefix("Bearer ") if auth.startswith("Bearer ") else None
        if token is None and "token=" in request.path:
            token = request.path.split("token=", 1)[1].split("&", 1)[0]
        ws = await request.accept()
        self.tokens_seen.append(token)
        if token is None or token in self.rejected_tokens:
            await ws.aclose(4001, "unauthorized")
            await self._send_events.send(("rejected", token))
            return
        conn = FakeConnection(ws, token)
        self.connections.append(conn)
        try:
            await ws.send_message(
                json.dumps(
                    {
                        "type": "welcome",
                        "connection_id": f"c{len(self.tokens_seen)}",
                        "user_id": "u1",
                        "heartbeat_interval": self.heartbeat_interval,
                    }
                )
            )
            await self._send_events.send(("connected", conn))
            while True:
                frame = json.loads(await ws.get_message())
                self.frames.append(frame)
                await self._on_frame(conn, frame)
        except ConnectionClosed as closed:
            await self._send_events.send(("closed", closed.reason.code if closed.reason else None))
        finally:
            if conn in self.connections:
                self.connections.remove(conn)

    def _reply(self, payload: dict[str, Any], frame: dict[str, Any]) -> str:
        if self.echo_ids and "id" in frame:
            payload["id"] = frame["id"]
        return json.dumps(payload)

    async def _on_frame(self, conn: FakeConnection, frame: dict[str, Any]) -> None:
        kind = frame.get("type")
        if kind == "ping":
            await conn.ws.send_message(self._reply({"type": "pong"}, frame))
            await self._send_events.send(("ping", None))
        elif kind == "subscribe":
            await self._subscribe(conn, frame)
        elif kind == "unsubscribe":
            conn.channels.difference_update(frame["channels"])
            await conn.ws.send_message(
                self._reply({"type": "unsubscribed", "channels": frame["channels"]}, frame)
            )
            await self._send_events.send(("unsubscribe", frame))
        elif kind == "refresh":
            if self.refuse_refresh:
                reply = {"type": "error", "code": "UNAUTHORIZED", "message": "bad token"}
            else:
                conn.token = frame["token"]
                reply = {"type": "refreshed"}
            await conn.ws.send_message(self._reply(reply, frame))
            await self._send_events.send(("refresh", frame["token"]))

    async def _subscribe(self, conn: FakeConnection, frame: dict[str, Any]) -> None:
        since: dict[str, str] = frame.get("since") or {}
        ok: list[str] = []
        for channel in frame["channels"]:
            if channel in self.forbidden:
                error = {"type": "error", "code": "FORBIDDEN", "channel": channel}
                await conn.ws.send_message(self._reply(error, frame))
            else:
                ok.append(channel)
        recovered: dict[str, bool] = {}
        replay: list[str] = []
        for channel in ok:
            if channel not in since:
                continue
            kept = self.history.get(channel, [])
            offsets = [offset for offset, _ in kept]
            asked = since[channel]
            epoch, _, seq = asked.rpartition(":")
            current = self.seq.get(channel, 0)
            if epoch == self.epoch and int(seq) == current:
                recovered[channel] = True
            elif asked in offsets:
                recovered[channel] = True
                # Replays from the asked offset *inclusive*: the client must drop the dup.
                start = offsets.index(asked)
                replay += [_notification(channel, o, d) for o, d in kept[start:]]
            else:
                recovered[channel] = False
        reply: dict[str, Any] = {"type": "subscribed", "channels": ok}
        if recovered:
            reply["recovered"] = recovered
        await conn.ws.send_message(self._reply(reply, frame))
        for text in replay:
            await conn.ws.send_message(text)
        conn.channels.update(ok)
        await self._send_events.send(("subscribe", frame))


def _notification(channel: str, offset: str, data: dict[str, Any]) -> str:
    return json.dumps({"type": "notification", "channel": channel, "offset": offset, "data": data})


@asynccontextmanager
async def open_fake_hub(**options: Any) -> AsyncIterator[FakeHub]:
    """Serve a :class:`FakeHub` on a free loopback port for the duration of the block."""
    hub = FakeHub(**options)
    async with trio.open_nursery() as nursery:
        hub._nursery = nursery
        await hub.start()
        yield hub
        nursery.cancel_scope.cancel()
