"""A TCP proxy on a private port that a test can cut and restore (a dependency outage).

The node under test is pointed at the proxy instead of the real server. :meth:`cut`
closes the listener and every proxied connection (the server looks down: connections
reset, new ones refused); :meth:`restore` listens on the same port again.
"""

from __future__ import annotations

import trio

#: Bytes per read when pumping.
CHUNK = 64 * 1024


class TcpProxy:
    """Forwards ``127.0.0.1:<port>`` to ``target_host:target_port``.

    Resource handling:
        Runs in a nursery of its own inside :meth:`run`; :meth:`cut` cancels it (every
        connection closes). Use it with ``nursery.start(proxy.run)``.
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self._scope: trio.CancelScope | None = None
        self._stopped = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen (on :attr:`port`, or a free one the first time) until cut."""
        self._stopped = trio.Event()
        try:
            with trio.CancelScope() as scope:
                self._scope = scope
                listeners = await trio.open_tcp_listeners(self.port, host="127.0.0.1")
                self.port = listeners[0].socket.getsockname()[1]
                async with trio.open_nursery() as nursery:
                    await nursery.start(trio.serve_listeners, self._handle, listeners)
                    task_status.started()
        finally:
            self._stopped.set()

    async def cut(self) -> None:
        """Stop listening and close every proxied connection; return once done."""
        if self._scope is not None:
            self._scope.cancel()
        await self._stopped.wait()

    async def _handle(self, client: trio.SocketStream) -> None:
        async with client:
            try:
                server = await trio.open_tcp_stream(*self.target)
            except OSError:
                return
            async with server, trio.open_nursery() as nursery:
                nursery.start_soon(self._pump, client, server, nursery.cancel_scope)
                nursery.start_soon(self._pump, server, client, nursery.cancel_scope)

    @staticmethod
    async def _pump(
        source: trio.SocketStream, sink: trio.SocketStream, scope: trio.CancelScope
    ) -> None:
        try:
            while data := await source.receive_some(CHUNK):
                await sink.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        scope.cancel()  # one side ended: end the pair
