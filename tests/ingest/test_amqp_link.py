"""The AMQP link thread against the real RabbitMQ: when it stops, every callback queued
before the stop runs before the connection closes, also when a callback waits on the
connection (a flushing ack, an RPC) and its poll moves the ones behind it into pika's
ready events."""

from __future__ import annotations

import threading

import trio
from pika.adapters.blocking_connection import BlockingChannel, BlockingConnection

from bridge.amqp_connection import open_amqp_link
from tests.ingest.rabbit import Vhost

TIMEOUT_S = 20


class ChannelHandler:
    """Opens one channel per connection; the test's callbacks use it."""

    def __init__(self) -> None:
        self.connection: BlockingConnection | None = None
        self.channel: BlockingChannel | None = None

    def on_connected(self, connection: BlockingConnection, generation: int) -> None:
        self.connection, self.channel = connection, connection.channel()

    def on_events(self) -> None:
        pass

    def on_disconnected(self) -> None:
        self.connection = self.channel = None


async def test_callbacks_queued_before_a_stop_all_run(vhost: Vhost) -> None:
    handler = ChannelHandler()
    entered, release = threading.Event(), threading.Event()
    ran: list[str] = []

    def hold() -> None:
        entered.set()
        release.wait(TIMEOUT_S)

    def waits_on_the_connection(name: str) -> None:
        # Queues one more callback, then polls the connection (as BlockingChannel's
        # basic_ack does when it flushes): that poll turns the queued one into a ready
        # event behind the round that is running.
        assert handler.connection is not None and handler.channel is not None
        handler.connection.add_callback_threadsafe(lambda: ran.append(f"{name}+"))
        handler.channel.basic_qos(prefetch_count=10)
        ran.append(name)

    async with open_amqp_link(vhost.url, name="test-node/link", handler=handler) as link:
        with trio.fail_after(TIMEOUT_S):
            await link.wait_connected()
        # Hold the link thread inside a callback, queue work behind it, then stop: the
        # work runs in the stop's drain, not in a round of its own.
        assert link.call_soon(hold)
        assert await trio.to_thread.run_sync(entered.wait, TIMEOUT_S)
        for name in ("a", "b", "c"):
            assert link.call_soon(lambda name=name: waits_on_the_connection(name))
        stopping = trio.Event()

        async def stop() -> None:
            stopping.set()
            assert await link.stop()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(stop)
            await stopping.wait()
            release.set()
    assert ran == ["a", "b", "c", "a+", "b+", "c+"], ran
