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
    get until the grace deadline before they are cancelled. A connection whose handler
    fails is logged and closed; it never takes the other connections down.

File descriptors:
    The door counts the sockets it has accepted and not closed in a
    :class:`~hub.descriptors.DescriptorBudget`, which the realtime core reads to refuse
    WebSocket upgrades (HTTP 503) before the node runs out. When ``accept`` fails all
    the same for want of descriptors (``EMFILE``, ``ENFILE``) or memory (``ENOMEM``,
    ``ENOBUFS``), the loop does not crash or spin: the connections waiting in the backlog
    are answered 503 one by one through a spare descriptor held for that purpose (they
    would otherwise wait, unanswered, until a descriptor frees up), then accepting pauses
    for a delay growing from 10 ms to 0.5 s. Established connections are never touched.
    The first failure of a burst is logged, not every one.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import socket as stdlib_socket
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState
from hypercorn.utils import parse_socket_addr, wrap_app

from api.envelope import raw_failure
from api.errors import ApiError
from hub.descriptors import BurstLog, DescriptorBudget, open_files_limit, retry_after_s

log = logging.getLogger("hub.frontdoor")

WS_PATH = b"/ws/notifications"
HEAD_LIMIT_BYTES = 16 * 1024
HEAD_TIMEOUT_S = 10.0
RECV_BYTES = 16 * 1024
IDLE_SWEEP_S = 1.0
#: ``accept`` errors that mean "no resources right now": retry later, never crash.
ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
#: Pause after such an error; it doubles while they go on, up to the maximum.
ACCEPT_RETRY_MIN_S = 0.01
ACCEPT_RETRY_MAX_S = 0.5
#: Waiting connections answered 503 through the spare descriptor per failed ``accept``.
SHED_BATCH = 64
#: How long shedding waits for the connection it saw waiting (another task may take it).
SHED_ACCEPT_WAIT_S = 0.05
#: Bytes of a shed connection's request read (and dropped) before it is closed, so that
#: the close does not reset the connection before the client reads the 503.
SHED_DRAIN_BYTES = 64 * 1024

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
    """Serves HTTP through hypercorn and WebSocket upgrades through ``ws_handler``.

    Args:
        app: the ASGI app.
        config: hypercorn's settings (:func:`hypercorn_config`).
        ws_handler: serves a WebSocket upgrade (the stream and the bytes read so far).
        descriptors: where accepted sockets are counted; a budget of its own when
            ``None`` (the node passes the one its realtime core admits against).
    """

    def __init__(
        self,
        app: Any,
        config: HypercornConfig,
        ws_handler: WebSocketHandler,
        *,
        descriptors: DescriptorBudget | None = None,
    ) -> None:
        self._app = wrap_app(app, config.wsgi_max_body_size, "asgi")
        self.config = config
        self.ws_handler = ws_handler
        self.descriptors = descriptors or DescriptorBudget(open_files_limit())
        self._spare: int | None = None
        self._accept_burst = BurstLog(log)
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

    async def _serve_connection(self, stream: trio.SocketStream) -> None:
        """Serve one accepted connection, then close it and take it off the budget.

        A handler that fails is logged and ends this connection only.

        Cancellation:
            Cancelling closes the connection at once (the door's shutdown does).
        """
        try:
            await self._handle(stream)
        except Exception:
            log.exception("connection handler failed")
        finally:
            await trio.aclose_forcefully(stream)
            self.descriptors.socket_closed()

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
        try:
            peer = parse_socket_addr(stream.socket.family, stream.socket.getpeername())
        except OSError:
            return  # reset by the client after sending its request (ENOTCONN)
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

    async def _accept_loop(self, listener: trio.SocketListener, nursery: trio.Nursery) -> NoReturn:
        """Accept connections on ``listener`` forever; each is served in ``nursery``.

        Backpressure:
            When ``accept`` fails for want of descriptors or memory
            (:data:`ACCEPT_CAPACITY_ERRNOS`), the connections waiting in the backlog are
            answered 503 (:meth:`_shed`), then accepting pauses for
            :data:`ACCEPT_RETRY_MIN_S`, doubling up to :data:`ACCEPT_RETRY_MAX_S` while the
            failures go on. Other ``accept`` errors are raised (trio already retries the
            harmless ones, such as a connection reset before it was accepted).

        Cancellation:
            Cancelling stops accepting; accepted connections live on in ``nursery``.
        """
        delay = ACCEPT_RETRY_MIN_S
        while True:
            try:
                stream = await listener.accept()
            except OSError as error:
                if error.errno not in ACCEPT_CAPACITY_ERRNOS:
                    raise
                self._accept_failed(error.errno)
                await self._shed(listener)
                await trio.sleep(delay)
                delay = min(delay * 2, ACCEPT_RETRY_MAX_S)
                continue
            delay = ACCEPT_RETRY_MIN_S
            self.descriptors.socket_opened()
            self._accept_burst.recovered("accepting connections again")
            nursery.start_soon(self._serve_connection, stream)

    def _accept_failed(self, number: int) -> None:
        name = errno.errorcode.get(number, str(number))
        self.descriptors.accept_failed(name)
        self._accept_burst.event(
            "accept failed with %s (%s; %d descriptors in use of %d, %d accepted sockets): "
            "waiting connections are answered 503 and accepting is retried",
            name,
            os.strerror(number),
            self.descriptors.in_use,
            self.descriptors.limit,
            self.descriptors.sockets,
        )

    async def _shed(self, listener: trio.SocketListener) -> None:
        """Answer up to :data:`SHED_BATCH` connections waiting in ``listener``'s backlog
        with 503, each through the spare descriptor (closed to accept it, reopened once
        the answer is written); nothing without a spare or a waiting connection.

        Backpressure:
            Each answer is one non-blocking write into the socket's empty send buffer;
            no connection is waited for, so a slow client cannot hold the spare.

        Cancellation:
            Safe to cancel: at most the connection being answered is closed unanswered.
        """
        for _ in range(SHED_BATCH):
            if self._spare is None:
                self._spare = _open_spare()
            if self._spare is None or not _readable(listener.socket):
                return
            os.close(self._spare)
            self._spare = None
            stream: trio.SocketStream | None = None
            with trio.move_on_after(SHED_ACCEPT_WAIT_S):
                try:
                    stream = await listener.accept()
                except OSError:
                    pass  # a thread took the descriptor first: retried after the pause
            if stream is None:
                return
            _answer_and_close(stream, _unavailable())
            self.descriptors.shed += 1
            self._spare = _open_spare()

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
                self._spare = _open_spare()
                self.descriptors.rebase()
                _check_room(self.descriptors)
                try:
                    async with trio.open_nursery() as accept_nursery:
                        accept_nursery.start_soon(self._sweep_idle)
                        for listener in listeners:
                            accept_nursery.start_soon(self._accept_loop, listener, conn_nursery)
                        task_status.started(self.bound)
                        await shutdown.wait()
                        accept_nursery.cancel_scope.cancel()
                finally:
                    for listener in listeners:
                        await trio.aclose_forcefully(listener)
                    if self._spare is not None:
                        os.close(self._spare)
                        self._spare = None
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


def _check_room(budget: DescriptorBudget) -> None:
    """Warn at start when the open-file limit leaves no room for WebSockets."""
    if not budget.has_room():
        log.warning(
            "the open-file limit (%d) leaves no room for WebSocket connections: %d "
            "descriptors are open and %d are kept in reserve (FD_RESERVE); raise the "
            "limit (ulimit -n) or lower FD_RESERVE",
            budget.limit,
            budget.in_use,
            budget.reserve,
        )


def _open_spare() -> int | None:
    """A descriptor held so that one can be freed when the process has none left."""
    try:
        return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None


def _readable(sock: trio.socket.SocketType) -> bool:
    """True when a connection waits in listening socket ``sock``'s backlog (no wait;
    ``poll`` needs no descriptor, unlike ``epoll``)."""
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    return bool(poller.poll(0))


def _unavailable() -> bytes:
    """The 503 answer of a connection the node has no descriptor for."""
    return raw_failure(
        ApiError(
            503,
            "This node is out of file descriptors; try again later (or another node)",
            details={"reason": "descriptors"},
            retry_after=retry_after_s(),
        )
    )


def _answer_and_close(stream: trio.SocketStream, answer: bytes) -> None:
    """Write ``answer`` without waiting, drop what the client sent, close: all at once.

    Reading what already arrived keeps the close from resetting the connection (a
    reset can discard the answer before the client reads it).
    """
    sock = stdlib_socket.socket(fileno=stream.socket.detach())
    with sock:
        sock.setblocking(False)
        with contextlib.suppress(OSError):
            sock.send(answer)
            sock.shutdown(stdlib_socket.SHUT_WR)
        with contextlib.suppress(OSError):
            sock.recv(SHED_DRAIN_BYTES)


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
