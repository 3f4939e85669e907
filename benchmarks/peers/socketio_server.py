"""The python-socketio peer: ``AsyncServer`` on uvicorn, rooms as channels.

``python -m benchmarks.peers.socketio_server --port P [--heartbeat S] [--redis-url URL]``

- Socket.IO (engine.io v4) at ``/socket.io/``: the event ``subscribe``
  (``{"type":"subscribe","channels":[…]}``) enters one room per channel and answers with
  the event ``subscribed``; notifications are the event ``notification`` whose argument is
  the hub's frame, emitted to the channel's room (``sio.emit(…, room=channel)``).
- ``POST /api/v1/notifications`` and ``GET /health``: a plain ASGI app mounted beside
  socket.io on the same uvicorn server (``socketio.ASGIApp(other_asgi_app=…)``); the 202
  goes out once ``emit()`` returned (every recipient's send queued), as in the hub.
- ``--redis-url``: ``AsyncRedisManager`` (python-socketio's way to run several servers):
  every emit goes through Redis pub/sub to every server, which delivers to its own room
  members. Offsets are counted by the server that takes the publish.
- ``--heartbeat S``: engine.io pings every ``S`` s with a ``2S`` s timeout (clients answer
  ``2`` with ``3``); without it the interval is an hour, since the counting subscribers
  never answer. uvicorn's own WebSocket pings are off either way (socket.io has its own).

uvicorn runs as ``uvicorn[standard]`` would: uvloop, httptools, and its default WebSocket
implementation.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from benchmarks.peers import PUBLISH_PATH, Channels, accepted, parse_publish

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

#: engine.io ping interval when heartbeats are off: longer than any run.
NO_HEARTBEAT_S = 3600


def build_app(heartbeat_s: float | None, redis_url: str | None) -> Any:
    """The ASGI application: socket.io plus the publish route."""
    import socketio

    manager = socketio.AsyncRedisManager(redis_url) if redis_url else None
    interval = heartbeat_s or NO_HEARTBEAT_S
    sio = socketio.AsyncServer(
        async_mode="asgi",
        client_manager=manager,
        ping_interval=interval,
        ping_timeout=2 * interval,  # as the hub's HEARTBEAT_TIMEOUT: twice the interval
        cors_allowed_origins=[],
    )
    channels = Channels()

    @sio.on("subscribe")
    async def subscribe(sid: str, frame: Any) -> None:
        names = frame.get("channels", []) if isinstance(frame, dict) else []
        names = [name for name in names if isinstance(name, str)]
        for name in names:
            await sio.enter_room(sid, name)
        await sio.emit("subscribed", {"type": "subscribed", "channels": names}, to=sid)

    @sio.on("ping")
    async def ping(sid: str, frame: Any = None) -> None:
        await sio.emit("pong", {"type": "pong"}, to=sid)

    async def publish(body: bytes) -> tuple[int, bytes]:
        try:
            names, data, message_id = parse_publish(body)
        except ValueError as error:
            return 400, json.dumps({"status": "error", "error": str(error)}).encode()
        data = Channels.message_data(data, message_id)
        offsets: dict[str, str] = {}
        for name in names:
            offset = offsets[name] = channels.next_offset(name)
            frame = {"type": "notification", "channel": name, "offset": offset, "data": data}
            await sio.emit("notification", frame, room=name)
        return 202, accepted(data["id"], offsets)

    async def other(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        if scope["method"] == "POST" and scope["path"] == PUBLISH_PATH:
            status, payload = await publish(body)
        elif scope["path"] == "/health":
            status, payload = 200, b'{"status":"ok"}'
        else:
            status, payload = 404, b'{"status":"error"}'
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(payload)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": payload})

    return socketio.ASGIApp(sio, other_asgi_app=other)


def main(argv: Sequence[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(prog="python -m benchmarks.peers.socketio_server")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--heartbeat", type=float, default=None, help="engine.io ping interval")
    parser.add_argument("--redis-url", default=None, help="AsyncRedisManager on this Redis")
    args = parser.parse_args(argv)
    uvicorn.run(
        build_app(args.heartbeat, args.redis_url),
        host="127.0.0.1",
        port=args.port,
        log_level="warning",
        access_log=False,
        loop="uvloop",
        http="httptools",
        ws_ping_interval=None,
        ws_ping_timeout=None,
        backlog=4096,
        timeout_keep_alive=60,
    )


if __name__ == "__main__":
    main()
