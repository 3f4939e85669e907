"""``bridge.aio``: an asyncio loop in a thread, driven from trio without blocking it."""

from __future__ import annotations

import asyncio
import threading

import pytest
import trio

from bridge.aio import AsyncioThread, open_asyncio_thread


async def test_runs_on_the_asyncio_thread() -> None:
    async def where(x: int, y: int) -> tuple[int, str, int]:
        loop = asyncio.get_running_loop()
        return threading.get_ident(), type(loop).__module__, x + y

    async with open_asyncio_thread(name="t-aio") as aio:
        ident, loop_module, total = await aio.run(where, 2, 3)
    assert ident != threading.get_ident()
    assert total == 5
    assert loop_module.startswith("uvloop")  # uvloop is a dependency


async def test_default_loop_without_uvloop() -> None:
    async def loop_type() -> str:
        return type(asyncio.get_running_loop()).__module__

    async with open_asyncio_thread(use_uvloop=False) as aio:
        assert (await aio.run(loop_type)).startswith("asyncio")


async def test_exceptions_propagate_unchanged() -> None:
    class Boom(Exception):
        pass

    async def fail() -> None:
        raise Boom("bang")

    async with open_asyncio_thread() as aio:
        with pytest.raises(Boom, match="bang"):
            await aio.run(fail)
        assert aio.statistics().calls_in_flight == 0


async def test_trio_keeps_running_while_a_call_waits() -> None:
    """The call waits for an asyncio event that only a trio task sets: if ``run``
    blocked the trio loop, this would deadlock (and fail after the timeout)."""
    async with open_asyncio_thread() as aio:
        gate = await aio.run(_make_event)

        async def open_gate() -> None:
            aio.loop.call_soon_threadsafe(gate.set)

        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(aio.run, gate.wait)
                nursery.start_soon(open_gate)


async def _make_event() -> asyncio.Event:
    return asyncio.Event()


async def test_cancellation_cancels_the_asyncio_task() -> None:
    async with open_asyncio_thread() as aio:
        token = trio.lowlevel.current_trio_token()
        started, cancelled = trio.Event(), trio.Event()

        async def wait_forever() -> None:
            token.run_sync_soon(started.set)
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                token.run_sync_soon(cancelled.set)
                raise

        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(aio.run, wait_forever)
                await started.wait()
                assert aio.statistics().calls_in_flight == 1
                nursery.cancel_scope.cancel()
            await cancelled.wait()
        assert aio.statistics().calls_in_flight == 0
        # The loop is still healthy afterwards.
        assert await aio.run(_answer) == 42


async def _answer() -> int:
    return 42


async def test_cancel_returns_promptly_even_if_the_task_ignores_it() -> None:
    """Cancelled is re-raised at once; the asyncio side unwinds on its own time."""
    async with open_asyncio_thread() as aio:
        token = trio.lowlevel.current_trio_token()
        started = trio.Event()
        release = asyncio.Event()

        async def stubborn() -> None:
            token.run_sync_soon(started.set)
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                await release.wait()  # keeps running after the cancel

        with trio.fail_after(5):
            with trio.CancelScope() as scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(aio.run, stubborn)
                    await started.wait()
                    scope.cancel()
            assert scope.cancelled_caught
        aio.loop.call_soon_threadsafe(release.set)


async def test_many_concurrent_calls() -> None:
    async def echo(i: int) -> int:
        await asyncio.sleep(0)
        return i

    results: list[int] = []

    async def call(aio: AsyncioThread, i: int) -> None:
        results.append(await aio.run(echo, i))

    async with open_asyncio_thread() as aio:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                for i in range(500):
                    nursery.start_soon(call, aio, i)
    assert sorted(results) == list(range(500))


async def test_exit_stops_the_loop_and_joins_the_thread() -> None:
    async with open_asyncio_thread(name="t-exit") as aio:
        loop = aio.loop
        assert aio.statistics().loop_running
    assert aio.closed and loop.is_closed()
    assert not any(t.name == "t-exit" for t in threading.enumerate())
    with pytest.raises(trio.ClosedResourceError):
        await aio.run(_answer)


async def test_call_in_flight_at_exit_gets_closed_resource_error() -> None:
    errors: list[BaseException] = []
    token = trio.lowlevel.current_trio_token()
    started = trio.Event()

    async def forever() -> None:
        token.run_sync_soon(started.set)
        await asyncio.Event().wait()

    async def call(aio: AsyncioThread) -> None:
        try:
            await aio.run(forever)
        except trio.ClosedResourceError as exc:
            errors.append(exc)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery, open_asyncio_thread() as aio:
            nursery.start_soon(call, aio)
            await started.wait()
    assert len(errors) == 1


async def test_task_ignoring_cancellation_does_not_hang_exit() -> None:
    """A task that swallows its cancel outlives the drain: its caller still wakes up."""
    errors: list[BaseException] = []
    token = trio.lowlevel.current_trio_token()
    started = trio.Event()

    async def deaf() -> None:
        token.run_sync_soon(started.set)
        while True:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                continue

    async def call(aio: AsyncioThread) -> None:
        try:
            await aio.run(deaf)
        except trio.ClosedResourceError as exc:
            errors.append(exc)

    with trio.fail_after(10):
        async with (
            trio.open_nursery() as nursery,
            open_asyncio_thread(drain_timeout_s=0.05) as aio,
        ):
            nursery.start_soon(call, aio)
            await started.wait()
    assert len(errors) == 1
