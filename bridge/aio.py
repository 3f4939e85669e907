"""The one place asyncio-only libraries (asyncpg, ...) run: an asyncio loop in a thread.

The trio loop never runs asyncio code itself. :func:`open_asyncio_thread` starts one
asyncio event loop (uvloop when importable) in a dedicated daemon thread, and
:meth:`AsyncioThread.run` submits a coroutine to it and waits for the result in trio
without blocking the trio loop: the asyncio side wakes the trio side through the trio
token, so there is no trio worker thread per call.

``trio_asyncio`` is deliberately not used: importing it patches asyncio globally and
makes every asyncio loop in the process several times slower (research/spike-integration.md §1).

Example::

    async def connect() -> asyncpg.Pool:  # runs on the asyncio thread
        return await asyncpg.create_pool(dsn)

    async with open_asyncio_thread(name="hub-aio") as aio:
        pool = await aio.run(connect)
        value = await aio.run(pool.fetchval, "SELECT 1")
        await aio.run(pool.close)
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar, TypeVarTuple

import trio

__all__ = [
    "JOIN_TIMEOUT_S",
    "TASK_DRAIN_TIMEOUT_S",
    "AsyncioThread",
    "AsyncioThreadStatistics",
    "open_asyncio_thread",
]

T = TypeVar("T")
Ts = TypeVarTuple("Ts")

#: Seconds the closing loop gives its leftover tasks to finish after cancelling them.
TASK_DRAIN_TIMEOUT_S = 2.0
#: Seconds ``open_asyncio_thread`` waits for the thread to end when leaving the block.
JOIN_TIMEOUT_S = 5.0


@dataclass(frozen=True, slots=True)
class AsyncioThreadStatistics:
    """``calls_in_flight``: coroutines submitted by :meth:`AsyncioThread.run` whose trio
    caller is still waiting for them."""

    calls_in_flight: int
    loop_running: bool


class AsyncioThread:
    """Handle on an asyncio loop running in its own thread. Create it with
    :func:`open_asyncio_thread`; do not instantiate it directly.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, thread: threading.Thread) -> None:
        self._loop = loop
        self._thread = thread
        self._closed = False
        self._futures: set[concurrent.futures.Future[Any]] = set()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The asyncio loop. Only touch it from the asyncio thread, or with its
        ``*_threadsafe`` methods."""
        return self._loop

    @property
    def closed(self) -> bool:
        """True once the owning ``async with`` block has been left."""
        return self._closed

    def statistics(self) -> AsyncioThreadStatistics:
        """Counters for metrics and tests."""
        return AsyncioThreadStatistics(len(self._futures), self._loop.is_running())

    async def run(self, async_fn: Callable[[*Ts], Coroutine[Any, Any, T]], *args: *Ts) -> T:
        """Run ``async_fn(*args)`` on the asyncio loop and return its result in trio.

        The coroutine object is created in the calling (trio) thread but only starts
        running on the asyncio thread, so ``async_fn`` must not touch trio.

        Args:
            async_fn: An asyncio coroutine function.
            *args: Positional arguments for it (use ``functools.partial`` for keywords).

        Returns:
            What the coroutine returned.

        Raises:
            trio.ClosedResourceError: The bridge is closed, or was closed while the
                coroutine ran (its task was cancelled by the shutdown).
            Exception: Whatever the coroutine raised, unchanged.

        Cancellation:
            If the trio caller is cancelled, the asyncio task is cancelled (its
            ``CancelledError`` is delivered on the asyncio thread at its next await)
            and :class:`trio.Cancelled` is re-raised at once, without waiting for the
            asyncio task to unwind. The result, if it arrives anyway, is dropped. The
            call is always a trio checkpoint.

        Backpressure:
            The bridge has no queue of its own and no limit: each call is one task on
            the asyncio loop, and the caller waits for exactly that task. Limit
            concurrency where the resource is (e.g. the asyncpg pool's size makes
            extra callers wait in ``pool.acquire``).
        """
        if self._closed:
            raise trio.ClosedResourceError("the asyncio thread is closed")
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()

        def wake(_: concurrent.futures.Future[T]) -> None:
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(done.set)

        future = asyncio.run_coroutine_threadsafe(async_fn(*args), self._loop)
        future.add_done_callback(wake)
        self._futures.add(future)
        try:
            await done.wait()
        except BaseException:
            future.cancel()
            raise
        finally:
            self._futures.discard(future)
        try:
            return future.result()
        except concurrent.futures.CancelledError:
            raise trio.ClosedResourceError("the asyncio thread closed during the call") from None

    def _close(self) -> None:
        """Refuse new calls and ask the loop to stop (idempotent)."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(RuntimeError):  # loop already closed
            self._loop.call_soon_threadsafe(self._loop.stop)

    def _abandon_leftovers(self) -> None:
        """After the loop is gone: wake every caller still waiting (a task that ignored
        its cancellation, or a thread that did not end in time) with ClosedResourceError."""
        for future in list(self._futures):
            future.cancel()


def _new_loop(use_uvloop: bool) -> asyncio.AbstractEventLoop:
    if use_uvloop:
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def _thread_main(
    loop: asyncio.AbstractEventLoop, on_started: Callable[[], None], drain_timeout_s: float
) -> None:
    """Body of the asyncio thread: run the loop until stopped, then clean up."""
    asyncio.set_event_loop(loop)
    loop.call_soon(on_started)
    try:
        loop.run_forever()
    finally:
        try:
            _drain(loop, drain_timeout_s)
        finally:
            asyncio.set_event_loop(None)
            loop.close()


def _drain(loop: asyncio.AbstractEventLoop, timeout_s: float) -> None:
    """Cancel leftover tasks, give them a bounded time to unwind, close async generators."""
    tasks = asyncio.all_tasks(loop)
    for task in tasks:
        task.cancel()
    if tasks:
        loop.run_until_complete(asyncio.wait(tasks, timeout=timeout_s))
    loop.run_until_complete(loop.shutdown_asyncgens())
    loop.run_until_complete(loop.shutdown_default_executor())


@contextlib.asynccontextmanager
async def open_asyncio_thread(
    name: str = "hub-aio",
    *,
    use_uvloop: bool = True,
    drain_timeout_s: float = TASK_DRAIN_TIMEOUT_S,
) -> AsyncIterator[AsyncioThread]:
    """Start an asyncio loop in a daemon thread for the duration of the block.

    Args:
        name: The thread's name (shows in stack dumps and ``py-spy``).
        use_uvloop: Use uvloop when it can be imported; the default asyncio loop otherwise.
        drain_timeout_s: On exit, how long cancelled leftover tasks may take to finish.

    Yields:
        The :class:`AsyncioThread` handle; its ``run`` works until the block is left.

    Resource handling:
        On exit, new calls are refused with :class:`trio.ClosedResourceError`, the
        loop is stopped, its leftover tasks are cancelled and given
        ``drain_timeout_s`` to finish, and the thread is joined for at most
        ``JOIN_TIMEOUT_S`` (it is a daemon thread, so a stuck one cannot keep the
        process alive). Trio callers still waiting then get
        :class:`trio.ClosedResourceError`. Close asyncio resources (pools) through
        ``run`` *before* leaving the block.

    Cancellation:
        Starting waits (without blocking trio) until the loop runs; if cancelled
        meanwhile, the thread is stopped and joined as on exit. The exit path runs
        shielded, bounded by the join timeout, so the thread is never leaked by a
        cancelled exit.
    """
    loop = _new_loop(use_uvloop)
    token = trio.lowlevel.current_trio_token()
    started = trio.Event()

    def on_started() -> None:
        with contextlib.suppress(trio.RunFinishedError):
            token.run_sync_soon(started.set)

    thread = threading.Thread(
        target=_thread_main, args=(loop, on_started, drain_timeout_s), name=name, daemon=True
    )
    handle = AsyncioThread(loop, thread)
    thread.start()
    try:
        await started.wait()
        yield handle
    finally:
        handle._close()
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(thread.join, JOIN_TIMEOUT_S)
        handle._abandon_leftovers()
