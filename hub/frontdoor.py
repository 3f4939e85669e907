"""The front door: one TCP port for the REST API (hypercorn) and the lean WebSocket path.

Each accepted connection's request head is read once. A ``GET`` upgrade to
:data:`WS_PATH` goes to the realtime core's handler with the bytes already read; every
other request is handed, with those bytes put back in front of the stream, to
hypercorn's own trio ``TCPServer`` — so HTTP keeps hypercorn's full HTTP/1.1 handling
(keep-alive, pipelining, limits) while WebSocket frames never cross the ASGI path, which
measured 20-30x slower for fan-out (research/spike-fanout.md).

A WebSocket upgrade that arrives on a keep-alive connection after an HTTP request is
answered by the ASGI app (404); browsers and our clients open a fresh connection for it.

Resource handling:
    Every connection task is owned by the door's connection nursery. On shutdown the
    listeners close first, then WebSockets are drained (close 1001) by the realtime
    core, then idle HTTP keep-alive connections are told to close and in-flight requests
    get until the grace deadline before they are cancelled.
"""

from __future__ import annotations

import logging
import socket as stdlib_socket
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState
from hypercorn.utils import parse_socket_addr, wrap_app

log = logging.getLogger("hub.frontdoor")

WS_PATH = b"/ws/notifications"
HEAD_LIMIT_BYTES = 16 * 1024
HEAD_TIMEOUT_S = 10.0
RECV_BYTES = 16 * 1024
IDLE_SWEEP_S = 1.0

WebSocketHandler = Callable[[trio.SocketStream, bytes], Awaitable[None]]


class PrefixedStream(trio.abc.HalfCloseableStream):
    """A socket stream that first yields bytes already read from it.

    Hypercorn's ``TCPServer`` reads ``.socket`` for the peer address, so it is exposed.
    :meth:`detach` takes the socket away from hypercorn without closing it: its pending
    receive ends as if the peer had closed, and its later sends and closes do nothing.
    """

    def __init__(
        self, stream: trio.SocketStream, prefix: bytes, on_data: Callable[[], None]
    ) -> None:
        self._stream = stream
        self._prefix = prefix
        self._on_data = on_data
        self._receiving: trio.CancelScope | None = None
        self.detached = False
        self.socket = stream.socket

    def detach(self) -> None:
        self.detached = True
        if self._receiving is not None:
            self._receiving.cancel()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self.detached:
            await trio.lowlevel.checkpoint()
            return b""
        if self._prefix:
            if max_bytes is None or max_bytes >= len(self._prefix):
                data, self._prefix = self._prefix, b""
            else:
                data, self._prefix = self._prefix[:max_bytes], self._prefix[max_bytes:]
            await trio.lowlevel.checkpoint()
            return data
        with trio.CancelScope() as self._receiving:
            data = await self._stream.receive_some(max_bytes)
            if data:
                self._on_data()
            return data
        return b""  # detached while waiting: nothing was read

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self.detached:
            raise trio.ClosedResourceError("the connection was handed to the WebSocket path")
        await self._stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        if self.detached:
            await trio.lowlevel.checkpoint()
            return
        await self._stream.send_eof()

    async def aclose(self) -> None:
        if self.detached:
            await trio.lowlevel.checkpoint()
            return
        await self._stream.aclose()


def rebuild_head(scope: dict[str, Any]) -> bytes:
    """The request head of an ASGI scope, as the client sent it (header names lower-case)."""
    target = scope.get("raw_path") or scope["path"].encode()
    if scope.get("query_string"):
        target += b"?" + scope["query_string"]
    lines = [b"GET " + target + b" HTTP/1.1"]
    lines += [name + b": " + value for name, value in scope["headers"]]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def is_websocket_upgrade(head: bytes) -> bool:
    """True when the request head is ``GET /ws/notifications…`` asking for a WebSocket."""
    line_end = head.find(b"\r\n")
    request_line = head[:line_end].split(b" ")
    if len(request_line) != 3 or request_line[0] != b"GET":
        return False
    path = request_line[1].split(b"?", 1)[0]
    if path.rstrip(b"/") != WS_PATH:
        return False
    for raw in head[line_end + 2 :].split(b"\r\n"):
        name, _, value = raw.partition(b":")
        if name.strip().lower() == b"upgrade" and value.strip().lower() == b"websocket":
            return True
    return False


async def read_head(stream: trio.SocketStream) -> bytes | None:
    """Read until the end of the request head. ``None`` if the peer went away, sent
    more than :data:`HEAD_LIMIT_BYTES` without one, or took over :data:`HEAD_TIMEOUT_S`.
    Anything after the head stays in the returned bytes."""
    data = b""
    with trio.move_on_after(HEAD_TIMEOUT_S):
        while b"\r\n\r\n" not in data:
            if len(data) > HEAD_LIMIT_BYTES:
                return data  # hypercorn answers the oversized head with 400/431
            try:
                chunk = await stream.receive_some(RECV_BYTES)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return None
            if not chunk:
                return None
            data += chunk
        return data
    return None


class HttpConnection:
    """What the door knows of one HTTP connection: is a request in flight?

    Hypercorn 0.18's own keep-alive timer is cancelled right after it starts (its idle
    task is restarted and stopped within one response cycle), so idle keep-alive
    connections would never time out and would hold a graceful shutdown for its whole
    grace period. The door therefore tracks idleness itself: a connection is busy from
    the first bytes of a request until the app has answered it.
    """

    __slots__ = ("idle_since", "inflight", "stream", "upgrade_head", "wrapped")

    def __init__(self, stream: trio.SocketStream, head: bytes) -> None:
        self.stream = stream
        self.wrapped = PrefixedStream(stream, head, self.mark_data)
        self.inflight = 0
        self.idle_since: float | None = None  # None while a request may be arriving
        self.upgrade_head: bytes | None = None  # set when a later request is an upgrade

    def mark_data(self) -> None:
        self.idle_since = None

    @property
    def idle(self) -> bool:
        return self.inflight == 0 and self.idle_since is not None


class FrontDoor:
    """Serves HTTP through hypercorn and WebSocket upgrades through ``ws_handler``."""

    def __init__(
        self,
        app: Any,
        config: HypercornConfig,
        ws_handler: WebSocketHandler,
    ) -> None:
        self._app = wrap_app(app, config.wsgi_max_body_size, "asgi")
        self.config = config
        self.ws_handler = ws_handler
        self.context = WorkerContext(None)
        self.state: dict[str, Any] = {}
        self._http: dict[tuple[str, int], HttpConnection] = {}
        self._http_idle = trio.Event()
        self._http_idle.set()
        self._closing = False
        self.bound: list[tuple[str, int]] = []

    @property
    def http_connections(self) -> int:
        return len(self._http)

    async def app(
        self, scope: Any, receive: Any, send: Any, sync_spawn: Any, call_soon: Any
    ) -> None:
        """The ASGI app as hypercorn calls it, counting requests per connection.

        A WebSocket upgrade that arrives on a keep-alive connection after other requests
        (proxies such as nginx with upstream keep-alive do that) is taken back from
        hypercorn and handed to the realtime core like a first request would be.
        """
        conn = self._http.get(scope.get("client"))
        if (
            conn is not None
            and scope["type"] == "websocket"
            and scope["path"].rstrip("/").encode() == WS_PATH
        ):
            conn.upgrade_head = rebuild_head(scope)
            conn.wrapped.detach()
            return
        if conn is None or scope["type"] != "http":
            await self._app(scope, receive, send, sync_spawn, call_soon)
            return
        conn.inflight += 1
        conn.idle_since = None
        try:
            await self._app(scope, receive, send, sync_spawn, call_soon)
        finally:
            conn.inflight -= 1
            if conn.inflight == 0:
                conn.idle_since = trio.current_time()
                if self._closing:
                    self._abort(conn)

    def _abort(self, conn: HttpConnection) -> None:
        """Close an idle connection now; hypercorn's reader sees it closed and ends."""
        trio.lowlevel.notify_closing(conn.stream.socket)
        conn.stream.socket.close()

    async def _sweep_idle(self) -> None:
        """Close keep-alive connections idle for longer than ``keep_alive_timeout``."""
        while True:
            await trio.sleep(IDLE_SWEEP_S)
            deadline = trio.current_time() - self.config.keep_alive_timeout
            for conn in list(self._http.values()):
                if conn.idle and conn.idle_since is not None and conn.idle_since < deadline:
                    self._abort(conn)

    async def _handle(self, stream: trio.SocketStream) -> None:
        head = await read_head(stream)
        if head is None:
            with trio.move_on_after(1):
                await stream.aclose()
            return
        if is_websocket_upgrade(head):
            # Build the call first and drop our reference, so the head bytes live only
            # as long as the realtime core keeps them (not for the socket's lifetime).
            handle = self.ws_handler(stream, head)
            del head
            await handle
            return
        peer = parse_socket_addr(stream.socket.family, stream.socket.getpeername())
        conn = HttpConnection(stream, head)
        del head
        if not self._http:
            self._http_idle = trio.Event()
        self._http[peer] = conn
        try:
            server = TCPServer(
                self.app,
                self.config,
                self.context,
                ConnectionState(self.state.copy()),
                conn.wrapped,  # type: ignore[arg-type]
            )
            await server.run()
        except OSError:
            pass  # closed by the door while hypercorn was finishing with it
        finally:
            del self._http[peer]
            if not self._http:
                self._http_idle.set()
        if conn.upgrade_head is not None:
            upgrade = self.ws_handler(stream, conn.upgrade_head)
            del conn
            await upgrade

    async def serve(
        self,
        host: str,
        port: int,
        *,
        shutdown: trio.Event,
        before_http_drain: Callable[[], Awaitable[None]] | None = None,
        task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run the app's lifespan and serve until ``shutdown`` is set, then drain.

        Cancellation:
            Cancelling this task cancels every connection at once (no drain). Set
            ``shutdown`` instead for a graceful stop bounded by ``config.graceful_timeout``.
        """
        lifespan = Lifespan(self.app, self.config, self.state)
        async with trio.open_nursery() as lifespan_nursery:
            await lifespan_nursery.start(lifespan.handle_lifespan)
            await lifespan.wait_for_startup()
            async with trio.open_nursery() as conn_nursery:
                listeners = await trio.open_tcp_listeners(port, host=host, backlog=4096)
                for listener in listeners:
                    listener.socket.setsockopt(
                        stdlib_socket.IPPROTO_TCP, stdlib_socket.TCP_NODELAY, 1
                    )
                self.bound = [listener.socket.getsockname()[:2] for listener in listeners]
                async with trio.open_nursery() as accept_nursery:
                    accept_nursery.start_soon(self._sweep_idle)
                    for listener in listeners:
                        accept_nursery.start_soon(
                            partial(
                                trio.serve_listeners,
                                self._handle,
                                [listener],
                                handler_nursery=conn_nursery,
                            )
                        )
                    task_status.started(self.bound)
                    await shutdown.wait()
                    accept_nursery.cancel_scope.cancel()
                for listener in listeners:
                    await listener.aclose()
                deadline = trio.current_time() + self.config.graceful_timeout
                if before_http_drain is not None:
                    with trio.move_on_at(deadline):
                        await before_http_drain()
                await self.context.terminated.set()
                self._closing = True
                for conn in list(self._http.values()):
                    if conn.idle:
                        self._abort(conn)
                with trio.move_on_at(deadline):
                    await self._http_idle.wait()
                conn_nursery.cancel_scope.cancel()
            await lifespan.wait_for_shutdown()
            lifespan_nursery.cancel_scope.cancel()


def hypercorn_config(*, graceful_timeout_s: float, max_body_bytes: int) -> HypercornConfig:
    """Hypercorn settings for the node: no access log (we log requests ourselves)."""
    config = HypercornConfig()
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.graceful_timeout = graceful_timeout_s
    config.keep_alive_timeout = 5
    config.include_server_header = False
    config.wsgi_max_body_size = max_body_bytes
    return config
