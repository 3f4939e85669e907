"""Faults: Redis restarted empty, and the pub/sub connection dropped, while messages flow.

Each test runs its own ``redis-server`` (never the machine's shared one). Every
subscriber's view is counted as Jepsen does — delivered, recovered (announced through
``recovered:false``), lost, duplicated — and nothing may be lost: a message a client did
not get must have been announced to it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio

from bridge.broker_redis import BrokerUnavailable, RedisBroker
from tests.cluster.conftest import run_cluster
from tests.cluster.redis_server import RedisServer
from tests.cluster.wsclient import RecordingClient, tally
from tests.harness import RunningNode

pytestmark = pytest.mark.redis

CHANNEL = "public.jepsen"
#: Messages streamed through the fault.
TOTAL = 1000
#: The fault is injected once this many messages were published.
FAULT_AT = 300
#: Seconds the whole stream (including the outage) may take.
STREAM_TIMEOUT_S = 40.0


@dataclass
class Progress:
    """The publisher's position: ``started`` = messages whose publish began."""

    started: int = 0
    done: int = 0
    failures: int = 0
    changed: trio.Event = field(default_factory=trio.Event)

    def bump(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    async def wait_done(self, count: int) -> None:
        while self.done < count:
            await self.changed.wait()


def broker_of(node: RunningNode) -> RedisBroker:
    broker = node.node.realtime._broker
    assert isinstance(broker, RedisBroker)
    return broker


async def publish_stream(node: RunningNode, progress: Progress, total: int) -> None:
    """Publish ``{"n": 0…total-1}`` in order on :data:`CHANNEL`, retrying each with the
    same id while Redis is down (as the RabbitMQ ingest does with redeliveries)."""
    realtime = node.node.realtime
    broker = broker_of(node)
    for n in range(total):
        progress.started = n + 1
        while True:
            try:
                await realtime.publish([CHANNEL], {"n": n}, id=f"jepsen-{n}")
                break
            except BrokerUnavailable:
                progress.failures += 1
                await broker.wait_connected()
        progress.done = n + 1
        progress.bump()


async def test_redis_restart_loses_nothing_silently(
    tmp_path: Path, own_redis: tuple[RedisServer, trio.Nursery]
) -> None:
    server, server_nursery = own_redis
    async with run_cluster(tmp_path, server.url, count=3) as nodes:
        user = await nodes[0].create_account()
        urls = [node.url for node in nodes]
        progress = Progress()
        # Two subscribers start on each node; on 4011 they move to the next node.
        clients = [
            RecordingClient(
                urls[i:] + urls[:i], user.access_token, [CHANNEL], cover=lambda: progress.started
            )
            for i in range(3)
            for _ in range(2)
        ]
        async with trio.open_nursery() as nursery:
            for client in clients:
                await nursery.start(client.run)
            nursery.start_soon(publish_stream, nodes[0], progress, TOTAL)

            with trio.fail_after(STREAM_TIMEOUT_S):
                await progress.wait_done(FAULT_AT)
                await server.kill()

                # Redis is down: not ready, but connections stay open and answer.
                for node in nodes:
                    response = await node.client.get("/ready")
                    assert response.status_code == 503, response.text
                    assert "redis" in response.json()["error"]["details"]["down"]
                assert all(client.closes == [] for client in clients)
                late = RecordingClient([urls[1]], user.access_token, ["public.during-outage"])
                await nursery.start(late.run)  # subscribing works during the outage

                await server.start(server_nursery)  # back, empty: a new epoch
                for client in clients:
                    await client.wait_until(
                        lambda c=client: TOTAL - 1 in c.received(CHANNEL), STREAM_TIMEOUT_S
                    )
            for node in nodes:
                await broker_of(node).wait_connected()
                response = await node.client.get("/ready")
                assert response.status_code == 200, response.text
            nursery.cancel_scope.cancel()

    assert progress.failures > 0  # the outage was real
    for client in clients:
        counts = tally(client, CHANNEL, TOTAL)
        assert counts.lost == 0, counts
        assert counts.reordered == 0, counts
        # Only a publish in flight when Redis died can be seen twice (its dedupe key
        # died with Redis); the publisher here waits for each reply, so at most one.
        assert counts.duplicated <= 1, counts
        assert counts.delivered + counts.recovered == TOTAL, counts
        # The history was lost with Redis: the clients were told (4011, then
        # ``recovered:false`` on the new node), never left with a silent gap.
        assert 4011 in client.closes
        assert client.not_recovered


async def test_pubsub_drop_is_replayed_from_history(
    tmp_path: Path, own_redis: tuple[RedisServer, trio.Nursery]
) -> None:
    """When only the pub/sub connections drop (Redis keeps its data), the nodes replay
    what they missed from the stream: clients see every message once, stay connected
    and are never asked to recover."""
    server, _ = own_redis
    async with run_cluster(tmp_path, server.url, count=2) as nodes:
        user = await nodes[0].create_account()
        progress = Progress()
        clients = [RecordingClient([node.url], user.access_token, [CHANNEL]) for node in nodes]
        from bridge.resp import RedisAddress, RedisClient

        admin = RedisClient(RedisAddress.from_url(server.url), name="test-admin")
        async with trio.open_nursery() as nursery:
            await nursery.start(admin.run)
            await admin.wait_connected()
            for client in clients:
                await nursery.start(client.run)
            nursery.start_soon(publish_stream, nodes[0], progress, TOTAL)
            with trio.fail_after(STREAM_TIMEOUT_S):
                for at in (FAULT_AT, 2 * FAULT_AT):
                    await progress.wait_done(at)
                    killed = await admin.execute("CLIENT", "KILL", "TYPE", "pubsub")
                    assert killed == len(nodes)
                for client in clients:
                    await client.wait_until(
                        lambda c=client: len(c.received(CHANNEL)) >= TOTAL, STREAM_TIMEOUT_S
                    )
            nursery.cancel_scope.cancel()

        stats = [broker_of(node).statistics() for node in nodes]
    for client in clients:
        assert client.received(CHANNEL) == list(range(TOTAL))
        assert client.closes == []
        assert client.not_recovered == []
    assert all(s["lost"] == 0 for s in stats), stats
    assert sum(s["redis_reconnects"] for s in stats) >= 2 * len(nodes), stats
