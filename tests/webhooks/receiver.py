"""A real webhook receiver for tests: a tiny h11 HTTP/1.1 server on 127.0.0.1.

Every request is recorded and its signature checked with exactly the snippet our docs
give receivers::

    hmac.compare_digest(signature, hmac.new(secret.encode(), payload.encode(),
                                            hashlib.sha256).hexdigest())

What it answers is programmable: ``fail_first`` 500s, then 200; or always a status;
or a redirect; or nothing until ``gate`` is set (to hold requests in flight).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial

import h11
import trio

#: Largest request body the receiver reads.
MAX_BODY_BYTES = 2 * 1024 * 1024
READ_SIZE = 65536


@dataclass
class Received:
    """One request as the receiver saw it."""

    method: str
    target: str
    headers: dict[str, str]
    body: bytes
    verified: bool

    @property
    def payload(self) -> str:
        return self.body.decode()


@dataclass
class Receiver:
    """The server's state and behaviour; ``url`` is set once it listens."""

    secrets: dict[str, str] = field(default_factory=dict)  # path → secret
    fail_first: int = 0
    status: int = 200
    redirect_to: str | None = None
    gate: trio.Event | None = None
    received: list[Received] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    url: str = ""
    _changed: trio.Event = field(default_factory=trio.Event)

    def url_for(self, path: str) -> str:
        return self.url + path

    def verify(self, path: str, payload: str, signature: str) -> bool:
        secret = self.secrets.get(path)
        if secret is None:
            return False
        return hmac.compare_digest(
            signature, hmac.new(secret.encode(), payload.encode(), hashlib.sha256).hexdigest()
        )

    async def wait_until(self, predicate: Callable[[Receiver], bool]) -> None:
        while not predicate(self):
            await self._changed.wait()

    def _bump(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _answer(self, index: int) -> tuple[int, list[tuple[str, str]]]:
        if self.redirect_to is not None:
            return 302, [("Location", self.redirect_to)]
        if index < self.fail_first:
            return 500, []
        return self.status, []

    async def _handle(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_BODY_BYTES)
        request: h11.Request | None = None
        body = b""
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await stream.receive_some(READ_SIZE)
                    conn.receive_data(data)
                    if not data and conn.their_state is not h11.DONE:
                        return
                    continue
                if isinstance(event, h11.Request):
                    request, body = event, b""
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage) and request is not None:
                    await self._respond(stream, conn, request, body)
                    return  # one request per connection (the hub keeps none alive)
                elif isinstance(event, h11.ConnectionClosed):
                    return
        except (h11.RemoteProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
            return
        finally:
            await stream.aclose()

    async def _respond(
        self, stream: trio.SocketStream, conn: h11.Connection, request: h11.Request, body: bytes
    ) -> None:
        headers = {k.decode().lower(): v.decode() for k, v in request.headers}
        target = request.target.decode()
        path = target.split("?", 1)[0]
        payload = body.decode("utf-8", "replace")
        verified = self.verify(path, payload, headers.get("x-webhook-signature", ""))
        index = len(self.received)
        self.received.append(Received(request.method.decode(), target, headers, body, verified))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        self._bump()
        try:
            if self.gate is not None:
                await self.gate.wait()
            status, extra = self._answer(index)
            out = [("Content-Length", "2"), ("Connection", "close"), *extra]
            await stream.send_all(conn.send(h11.Response(status_code=status, headers=out)))
            await stream.send_all(conn.send(h11.Data(data=b"ok")))
            await stream.send_all(conn.send(h11.EndOfMessage()))
        finally:
            self.in_flight -= 1
            self._bump()


@asynccontextmanager
async def open_receiver(**behaviour: object) -> AsyncIterator[Receiver]:
    """Serve a :class:`Receiver` on 127.0.0.1 (a free port) for the block."""
    receiver = Receiver(**behaviour)  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            partial(trio.serve_tcp, receiver._handle, 0, host="127.0.0.1")
        )
        port = listeners[0].socket.getsockname()[1]
        receiver.url = f"http://127.0.0.1:{port}"
        try:
            yield receiver
        finally:
            nursery.cancel_scope.cancel()
