"""The RESP client (bridge/resp.py) against a real Redis.

Commands and pipelining run on the shared Redis under a key prefix of the test's own;
everything that breaks a connection (kills, a stopped server) runs on a private
``redis-server``.
"""

from __future__ import annotations

import secrets
import signal

import hiredis
import pytest
import trio

from bridge.resp import (
    RedisAddress,
    RedisClient,
    RedisReplyError,
    RedisSubscriber,
    RedisUnavailable,
    Script,
)
from tests.cluster.redis_server import RedisServer, free_port
from tests.harness import REDIS_URL, WAIT_S

pytestmark = pytest.mark.redis

SHARED = RedisAddress.from_url(REDIS_URL)


def test_address_from_url() -> None:
    address = RedisAddress.from_url("rediss://user:p%40ss@cache.example:6380/3")
    assert (address.host, address.port, address.db, address.tls) == ("cache.example", 6380, 3, True)
    assert (address.username, address.password) == ("user", "p@ss")
    assert "p@ss" not in str(address)
    assert RedisAddress.from_url("redis://127.0.0.1") == RedisAddress()
    with pytest.raises(ValueError, match="redis://"):
        RedisAddress.from_url("http://127.0.0.1:6379")


async def test_concurrent_calls_are_pipelined_and_matched(shared_redis_prefix: str) -> None:
    key = f"{shared_redis_prefix}counter"
    client = RedisClient(SHARED)
    async with trio.open_nursery() as nursery:
        await nursery.start(client.run)
        await client.wait_connected()
        results: list[int] = []

        async def incr() -> None:
            results.append(await client.execute("INCR", key))

        async with trio.open_nursery() as callers:
            for _ in range(500):
                callers.start_soon(incr)
        stats = client.statistics()
        nursery.cancel_scope.cancel()
    assert sorted(results) == list(range(1, 501))
    assert stats.commands >= 500
    assert stats.writes < stats.commands / 4  # many commands per write


async def test_error_replies(shared_redis_prefix: str) -> None:
    key = f"{shared_redis_prefix}text"
    client = RedisClient(SHARED)
    async with trio.open_nursery() as nursery:
        await nursery.start(client.run)
        await client.wait_connected()
        await client.execute("SET", key, "not a number")
        with pytest.raises(RedisReplyError, match="not an integer"):
            await client.execute("INCR", key)
        replies = await client.execute_many([("GET", key), ("INCR", key), ("STRLEN", key)])
        assert replies[0] == b"not a number"
        assert isinstance(replies[1], hiredis.ReplyError)
        assert replies[2] == 12
        assert await client.execute("PING") == b"PONG"  # the connection is still in step
        nursery.cancel_scope.cancel()


async def test_script_falls_back_to_eval_when_not_cached(shared_redis_prefix: str) -> None:
    key = f"{shared_redis_prefix}scripted"
    # A source no one has loaded before, so the first EVALSHA meets NOSCRIPT.
    script = Script(f"-- {secrets.token_hex(8)}\nreturn redis.call('INCRBY', KEYS[1], ARGV[1])")
    client = RedisClient(SHARED)
    async with trio.open_nursery() as nursery:
        await nursery.start(client.run)
        await client.wait_connected()
        assert await client.run_script(script, [key], [5]) == 5
        before = client.statistics().commands
        assert await client.run_script(script, [key], [2]) == 7
        assert client.statistics().commands == before + 1  # cached now: EVALSHA only
        replies = await client.run_script_many(script, [([key], [1]), ([key], [1])])
        assert replies == [8, 9]
        with pytest.raises(RedisReplyError):
            await client.run_script(Script("return redis.call('NOSUCHCOMMAND')"), [], [])
        nursery.cancel_scope.cancel()


async def test_unreachable_redis_fails_fast() -> None:
    client = RedisClient(RedisAddress(port=free_port()))
    async with trio.open_nursery() as nursery:
        await nursery.start(client.run)
        with trio.fail_after(1):
            with pytest.raises(RedisUnavailable):
                await client.execute("PING")
        assert not client.connected
        nursery.cancel_scope.cancel()


async def test_client_reconnects_after_kill(own_redis: tuple[RedisServer, trio.Nursery]) -> None:
    server, server_nursery = own_redis
    states: list[bool] = []
    client = RedisClient(RedisAddress.from_url(server.url), on_state=states.append)
    async with trio.open_nursery() as nursery:
        await nursery.start(client.run)
        await client.wait_connected()
        await client.execute("SET", "k", "v")
        await server.restart(server_nursery)
        with trio.fail_after(WAIT_S):
            while True:  # calls fail fast until the reconnect, then work again
                try:
                    assert await client.execute("GET", "k") is None  # a fresh, empty server
                    break
                except RedisUnavailable:
                    await client.wait_connected()
        assert states[:2] == [True, False]
        assert client.statistics().reconnects >= 1
        nursery.cancel_scope.cancel()


async def test_stalled_redis_times_out(own_redis: tuple[RedisServer, trio.Nursery]) -> None:
    """A Redis that stops answering (SIGSTOP: the TCP connection stays open) fails the
    waiting call after the command timeout and the connection is dropped."""
    server, _ = own_redis
    client = RedisClient(RedisAddress.from_url(server.url), command_timeout_s=0.3)
    async with trio.open_nursery() as nursery:
        await nursery.start(client.run)
        await client.wait_connected()
        assert server.process is not None
        server.process.send_signal(signal.SIGSTOP)
        try:
            with trio.fail_after(WAIT_S), pytest.raises(RedisUnavailable, match="no reply"):
                await client.execute("PING")
        finally:
            server.process.send_signal(signal.SIGCONT)
        with trio.fail_after(WAIT_S):
            await client.wait_connected()
            assert await client.execute("PING") == b"PONG"
        nursery.cancel_scope.cancel()


async def test_subscriber_batches_and_resubscribes(
    own_redis: tuple[RedisServer, trio.Nursery],
) -> None:
    server, _ = own_redis
    address = RedisAddress.from_url(server.url)
    batches: list[list[tuple[bytes, bytes]]] = []
    connected: list[frozenset[bytes]] = []
    changed = trio.Event()

    def on_messages(batch: list[tuple[bytes, bytes]]) -> None:
        nonlocal changed
        batches.append(batch)
        changed.set()
        changed = trio.Event()

    def received() -> list[tuple[bytes, bytes]]:
        return [message for batch in batches for message in batch]

    reconnected = trio.Event()

    def on_connected(channels: frozenset[bytes]) -> None:
        connected.append(channels)
        if len(connected) > 1:
            reconnected.set()

    subscriber = RedisSubscriber(address, on_messages=on_messages, on_connected=on_connected)
    client = RedisClient(address)
    async with trio.open_nursery() as nursery:
        await nursery.start(client.run)
        await nursery.start(subscriber.run)
        await subscriber.wait_connected()
        assert await subscriber.subscribe([b"a", b"b"])
        # Published in one pipelined write: they arrive in few reads, so few batches.
        channels = (b"a", b"b")
        await client.execute_many([("PUBLISH", channels[i % 2], str(i)) for i in range(300)])
        with trio.fail_after(WAIT_S):
            while len(received()) < 300:
                await changed.wait()
        assert [int(payload) for _, payload in received()] == list(range(300))
        assert len(batches) < 300

        await subscriber.unsubscribe([b"b"])
        assert await client.execute("CLIENT", "KILL", "TYPE", "pubsub") == 1
        with trio.fail_after(WAIT_S):
            await reconnected.wait()
        assert connected[-1] == frozenset({b"a"})
        await client.execute("PUBLISH", "b", "ignored")
        await client.execute("PUBLISH", "a", "again")
        with trio.fail_after(WAIT_S):
            while received()[-1] != (b"a", b"again"):
                await changed.wait()
        assert (b"b", b"ignored") not in received()
        nursery.cancel_scope.cancel()
