"""The Redis broker (bridge/broker_redis.py) through the Broker contract, without nodes.

A small recording handler stands in for the hub (it implements the two calls of
``BrokerEventHandler``); everything else is real: Redis, the Lua scripts, the pub/sub.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import redis
import trio

from bridge.broker import Publication, parse_offset
from bridge.broker_redis import (
    KEY_PREFIX,
    META_TTL_MIN_S,
    BrokerUnavailable,
    RedisBroker,
    open_redis_broker,
)
from tests.cluster.redis_server import RedisServer
from tests.harness import REDIS_URL, WAIT_S, make_settings

pytestmark = pytest.mark.redis


class Recorder:
    """A stand-in hub: records publications and gap reports, lets tests wait on them."""

    def __init__(self) -> None:
        self.publications: list[tuple[str, Publication]] = []
        self.gaps: list[str] = []
        self._changed = trio.Event()

    def handle_publication(self, channel: str, publication: Publication) -> None:
        self.publications.append((channel, publication))
        self._notify()

    def handle_gap(self, channel: str) -> None:
        self.gaps.append(channel)
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def payloads(self, channel: str) -> list[bytes]:
        return [p.payload for c, p in self.publications if c == channel]

    async def wait_until(self, predicate: Any) -> None:
        with trio.fail_after(WAIT_S):
            while not predicate():
                await self._changed.wait()


@asynccontextmanager
async def broker(
    tmp_path: Path, url: str, prefix: str = "", **overrides: Any
) -> AsyncIterator[tuple[RedisBroker, Recorder]]:
    recorder = Recorder()
    settings = make_settings(tmp_path, redis_url=url, **overrides)
    async with open_redis_broker(settings, recorder, key_prefix=prefix + KEY_PREFIX) as b:
        await b.wait_connected()
        yield b, recorder


def sync_redis() -> redis.Redis:
    return redis.Redis.from_url(REDIS_URL)


async def test_history_and_offsets(tmp_path: Path, shared_redis_prefix: str) -> None:
    async with broker(
        tmp_path, REDIS_URL, shared_redis_prefix, history_size=3, history_ttl=600
    ) as (b, _):
        empty = await b.history("public.h", None)
        assert empty.recovered and empty.publications == []
        epoch = parse_offset(empty.position)[0]  # type: ignore[index]
        assert empty.position == f"{epoch}:0"

        offsets = [await b.publish("public.h", f"m{i}".encode()) for i in range(1, 6)]
        assert offsets == [f"{epoch}:{i}" for i in range(1, 6)]  # the epoch fixed by history

        result = await b.history("public.h", f"{epoch}:2")
        assert result.recovered and result.position == f"{epoch}:5"
        assert [p.payload for p in result.publications] == [b"m3", b"m4", b"m5"]
        assert [p.offset for p in result.publications] == offsets[2:]
        assert (await b.history("public.h", f"{epoch}:5")).publications == []
        assert (await b.history("public.h", f"{epoch}:5")).recovered
        for since in (f"{epoch}:1", f"{epoch}:6", "other:3", "garbage", ""):
            missed = await b.history("public.h", since)
            assert not missed.recovered, since  # trimmed, ahead, foreign epoch, malformed
            assert missed.publications == [] and missed.position == f"{epoch}:5"

    client = sync_redis()
    try:
        meta = f"{shared_redis_prefix}hub:meta:{{public.h}}"
        stream = f"{shared_redis_prefix}hub:stream:{{public.h}}"
        assert client.xlen(stream) == 3  # exact MAXLEN
        assert 600 - 5 <= client.ttl(stream) <= 600  # HISTORY_TTL
        assert client.ttl(meta) > META_TTL_MIN_S - 5
    finally:
        client.close()


async def test_entries_older_than_the_ttl_are_not_replayed(
    tmp_path: Path, shared_redis_prefix: str
) -> None:
    """Each message counts as gone ``HISTORY_TTL`` after it was published, even while
    newer publications keep the stream key alive."""
    async with broker(tmp_path, REDIS_URL, shared_redis_prefix, history_ttl=1) as (b, _):
        first = await b.publish("public.ttl", b"old")
        await trio.sleep(2.1)  # let the first entry age past the 1 s TTL (wall clock)
        second = await b.publish("public.ttl", b"new")
        epoch = parse_offset(first)[0]  # type: ignore[index]
        assert not (await b.history("public.ttl", f"{epoch}:0")).recovered
        kept = await b.history("public.ttl", first)
        assert kept.recovered and [p.offset for p in kept.publications] == [second]


async def test_dedupe_and_fan_out_only_to_subscribed(
    tmp_path: Path, shared_redis_prefix: str
) -> None:
    async with broker(tmp_path, REDIS_URL, shared_redis_prefix) as (b, rec):
        await b.subscribe("public.a")
        first = await b.publish("public.a", b"x", message_id="id-1")
        again = await b.publish("public.a", b"x", message_id="id-1")
        assert first == again
        await b.publish("public.b", b"not subscribed")
        await b.publish("public.a", b"y")
        await rec.wait_until(lambda: len(rec.publications) == 2)
        assert rec.payloads("public.a") == [b"x", b"y"]
        assert b.statistics()["duplicates"] == 1

        channel = f"{shared_redis_prefix}hub:ch:public.a"
        client = sync_redis()
        try:
            assert client.pubsub_numsub(channel)[0][1] == 1
            await b.unsubscribe("public.a")
            await b.publish("public.a", b"after")
            assert client.pubsub_numsub(channel)[0][1] == 0
        finally:
            client.close()
        assert rec.payloads("public.a") == [b"x", b"y"]


async def test_history_meets_the_live_stream_exactly(
    tmp_path: Path, shared_redis_prefix: str
) -> None:
    """While another task publishes, every ``history`` answer is a prefix of what this
    node has handed to the hub when it returns: the hub's held live publications (those
    after ``position``) continue it without overlap or gap."""
    async with broker(tmp_path, REDIS_URL, shared_redis_prefix) as (b, rec):
        await b.subscribe("public.live")
        origin = (await b.history("public.live", None)).position
        async with trio.open_nursery() as nursery:

            async def publish_many() -> None:
                for i in range(300):
                    await b.publish("public.live", str(i).encode())

            nursery.start_soon(publish_many)
            for _ in range(20):
                result = await b.history("public.live", origin)
                handed = [p.offset for _, p in rec.publications]
                replay = [p.offset for p in result.publications]
                assert replay == handed[: len(replay)]
                assert result.position == (replay[-1] if replay else origin)
        await rec.wait_until(lambda: len(rec.publications) == 300)


async def test_control_channel_reaches_every_node(tmp_path: Path, shared_redis_prefix: str) -> None:
    got: dict[str, list[bytes]] = {"one": [], "two": []}
    done = trio.Event()

    def listener(name: str) -> Any:
        def callback(payload: bytes) -> None:
            got[name].append(payload)
            if all(len(v) == 2 for v in got.values()):
                done.set()

        return callback

    async with (
        broker(tmp_path / "1", REDIS_URL, shared_redis_prefix) as (one, _),
        broker(tmp_path / "2", REDIS_URL, shared_redis_prefix) as (two, _),
    ):
        one.subscribe_control(listener("one"))
        two.subscribe_control(listener("two"))
        await one.publish_control(b'{"kind":"session","id":"s1"}')
        await two.publish_control(b'{"kind":"user","id":"u1"}')
        with trio.fail_after(WAIT_S):
            await done.wait()
    expected = [b'{"kind":"session","id":"s1"}', b'{"kind":"user","id":"u1"}']
    assert got == {"one": expected, "two": expected}


async def test_lost_history_is_reported_as_a_gap(
    tmp_path: Path, own_redis: tuple[RedisServer, trio.Nursery]
) -> None:
    server, server_nursery = own_redis
    async with broker(tmp_path, server.url) as (b, rec):
        await b.subscribe("public.e")
        old = await b.publish("public.e", b"before")
        await rec.wait_until(lambda: len(rec.publications) == 1)

        await server.restart(server_nursery)  # empty: the epoch is gone
        with trio.fail_after(WAIT_S):
            while True:
                try:
                    await b.ping()
                    break
                except BrokerUnavailable:
                    await b.wait_connected()
        await rec.wait_until(lambda: rec.gaps == ["public.e"])

        new = await b.publish("public.e", b"after")
        assert parse_offset(new)[0] != parse_offset(old)[0]  # type: ignore[index]
        assert parse_offset(new)[1] == 1  # type: ignore[index]
        assert not (await b.history("public.e", old)).recovered
        await rec.wait_until(lambda: rec.payloads("public.e") == [b"before", b"after"])


async def test_outage_answers_without_failing_and_publish_raises(
    tmp_path: Path, own_redis: tuple[RedisServer, trio.Nursery]
) -> None:
    server, server_nursery = own_redis
    async with broker(tmp_path, server.url) as (b, rec):
        await b.subscribe("public.o")
        offset = await b.publish("public.o", b"one")
        await rec.wait_until(lambda: len(rec.publications) == 1)
        await server.kill()

        with pytest.raises(BrokerUnavailable):
            await b.ping()
        with pytest.raises(BrokerUnavailable):
            await b.publish("public.o", b"two")
        result = await b.history("public.o", offset)  # subscribing must not break
        assert not result.recovered and result.position == offset
        await b.subscribe("public.new")  # wanted; subscribed when Redis is back
        assert (await b.history("public.new", None)).recovered

        await server.start(server_nursery)
        with trio.fail_after(WAIT_S):
            await b.wait_connected()
        # Both channels resync: the first lost its epoch, the second was subscribed
        # while nothing could vouch for it.
        await rec.wait_until(lambda: sorted(rec.gaps) == ["public.new", "public.o"])
