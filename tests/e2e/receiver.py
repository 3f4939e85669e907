"""A minimal webhook receiver on 127.0.0.1: answers every request ``204`` and keeps the
bodies it got."""

from __future__ import annotations

import trio

#: Largest request the receiver reads (the hub's webhook bodies are far smaller).
MAX_REQUEST_BYTES = 1024 * 1024


class WebhookReceiver:
    """Serves until its nursery is cancelled; ``url`` once started.

    Resource handling:
        Start it with ``nursery.start(receiver.run)``; cancelling the nursery stops it.
    """

    def __init__(self) -> None:
        self.url = ""
        self.requests: list[bytes] = []

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}/hooks"
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, self._handle, listeners)
            task_status.started()

    async def _handle(self, stream: trio.SocketStream) -> None:
        async with stream:
            data = b""
            try:
                while b"\r\n\r\n" not in data and len(data) < MAX_REQUEST_BYTES:
                    chunk = await stream.receive_some()
                    if not chunk:
                        return
                    data += chunk
                head, _, body = data.partition(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value.strip())
                while len(body) < length:
                    chunk = await stream.receive_some()
                    if not chunk:
                        return
                    body += chunk
                self.requests.append(body)
                await stream.send_all(
                    b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                )
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
