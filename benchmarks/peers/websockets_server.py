"""The lean-asyncio reference peer: the ``websockets`` library and its ``broadcast()``.

``python -m benchmarks.peers.websockets_server --port P --publish-port Q [--heartbeat S]``

- WebSocket ``/ws/notifications`` on port ``P`` (any path is accepted, no auth): sends
  ``{"type":"welcome",…}``, answers ``subscribe`` with ``subscribed`` and ``ping`` with
  ``pong``; a connection's channels are kept in one ``set`` of connections per channel.
- ``POST /api/v1/notifications`` on port ``Q`` (HTTP/1.1 keep-alive, h11 on asyncio
  streams): per channel, the next offset, one frame, ``websockets.broadcast()`` to that
  channel's set, then 202 (see :mod:`benchmarks.peers`).

This is what the websockets documentation recommends for fan-out: ``broadcast()`` writes
the frame to every connection's transport synchronously, with no backpressure (a slow
client's buffer grows) and no per-connection task. ``--heartbeat S`` turns on the
library's keepalive pings (``ping_interval = ping_timeout = S``); without it they are
off, since the counting subscribers never answer pings. Compression is off (the hub
does not compress either). The loop is uvloop.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
from collections.abc import Sequence
from typing import Any

import h11
from websockets.asyncio.server import ServerConnection, broadcast, serve

from benchmarks.peers import PUBLISH_PATH, Channels, accepted, install_uvloop, parse_publish

#: Largest publish body read (as the hub: 1 MiB).
MAX_BODY = 1 << 20


class Peer:
    """Channel sets and the two servers' handlers."""

    def __init__(self, heartbeat_s: float | None) -> None:
        self.heartbeat_s = heartbeat_s
        self.channels = Channels()
        self.subscribers: dict[str, set[ServerConnection]] = {}
        self.connections = 0

    async def websocket(self, ws: ServerConnection) -> None:
        """One client: welcome, then subscribe/unsubscribe/ping until it goes away."""
        self.connections += 1
        mine: set[str] = set()
        try:
            await ws.send(
                json.dumps(
                    {
                        "type": "welcome",
                        "connection_id": str(ws.id),
                        "user_id": "peer",
                        "heartbeat_interval": self.heartbeat_s or 0,
                    },
                    separators=(",", ":"),
                )
            )
            async for message in ws:
                try:
                    frame = json.loads(message)
                    kind = frame.get("type")
                except (ValueError, AttributeError):
                    await ws.send('{"type":"error","code":"VALIDATION_ERROR"}')
                    continue
                reply: dict[str, Any]
                if kind == "subscribe":
                    names = [c for c in frame.get("channels", []) if isinstance(c, str)]
                    for name in names:
                        self.subscribers.setdefault(name, set()).add(ws)
                        mine.add(name)
                    reply = {"type": "subscribed", "channels": names}
                elif kind == "unsubscribe":
                    names = [c for c in frame.get("channels", []) if isinstance(c, str)]
                    for name in names:
                        self.subscribers.get(name, set()).discard(ws)
                        mine.discard(name)
                    reply = {"type": "unsubscribed", "channels": names}
                elif kind == "ping":
                    reply = {"type": "pong"}
                else:
                    reply = {"type": "error", "code": "VALIDATION_ERROR"}
                if "id" in frame:
                    reply["id"] = frame["id"]
                await ws.send(json.dumps(reply, separators=(",", ":")))
        finally:
            self.connections -= 1
            for name in mine:
                members = self.subscribers.get(name)
                if members is not None:
                    members.discard(ws)
                    if not members:
                        del self.subscribers[name]

    def publish(self, body: bytes) -> tuple[int, bytes]:
        """Fan one publish out; ``(status, response body)``."""
        try:
            names, data, message_id = parse_publish(body)
        except ValueError as error:
            return 400, json.dumps({"status": "error", "error": str(error)}).encode()
        data = Channels.message_data(data, message_id)
        offsets: dict[str, str] = {}
        for name in names:
            offset = offsets[name] = self.channels.next_offset(name)
            frame = {"type": "notification", "channel": name, "offset": offset, "data": data}
            members = self.subscribers.get(name)
            if members:
                broadcast(members, json.dumps(frame, separators=(",", ":"), ensure_ascii=False))
        return 202, accepted(data["id"], offsets)

    async def http(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One keep-alive HTTP/1.1 connection of the publish endpoint."""
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                request: h11.Request | None = None
                body = b""
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        data = await reader.read(65536)
                        conn.receive_data(data)
                        if not data and conn.their_state is not h11.DONE:
                            return
                        continue
                    if isinstance(event, h11.Request):
                        request = event
                    elif isinstance(event, h11.Data):
                        body += bytes(event.data)
                        if len(body) > MAX_BODY:
                            return
                    elif isinstance(event, h11.EndOfMessage):
                        break
                    elif isinstance(event, h11.ConnectionClosed):
                        return
                assert request is not None
                if request.method == b"POST" and request.target == PUBLISH_PATH.encode():
                    status, payload = self.publish(body)
                elif request.target == b"/health":
                    status, payload = 200, b'{"status":"ok"}'
                else:
                    status, payload = 404, b'{"status":"error"}'
                headers = [
                    ("Content-Type", "application/json"),
                    ("Content-Length", str(len(payload))),
                ]
                writer.write(conn.send(h11.Response(status_code=status, headers=headers)))
                writer.write(conn.send(h11.Data(data=payload)))
                writer.write(conn.send(h11.EndOfMessage()))
                await writer.drain()
                if conn.our_state is h11.MUST_CLOSE:
                    return
                conn.start_next_cycle()
        except (h11.RemoteProtocolError, ConnectionError):
            return
        finally:
            writer.close()


async def run(port: int, publish_port: int, heartbeat_s: float | None) -> None:
    """Serve until SIGTERM or SIGINT."""
    peer = Peer(heartbeat_s)
    stop = asyncio.get_running_loop().create_future()
    for signum in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(signum, stop.set_result, None)
    http = await asyncio.start_server(peer.http, "127.0.0.1", publish_port, backlog=1024)
    async with serve(
        peer.websocket,
        "127.0.0.1",
        port,
        compression=None,
        ping_interval=heartbeat_s,
        ping_timeout=heartbeat_s,
        backlog=4096,
    ):
        await stop
    http.close()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(http.wait_closed(), 2)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.peers.websockets_server")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--publish-port", type=int, required=True)
    parser.add_argument("--heartbeat", type=float, default=None, help="ping interval/timeout")
    args = parser.parse_args(argv)
    install_uvloop()
    asyncio.run(run(args.port, args.publish_port, args.heartbeat))


if __name__ == "__main__":
    main()
