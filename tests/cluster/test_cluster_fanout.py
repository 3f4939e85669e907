"""Three nodes on loopback sharing the machine's Redis (under a key prefix of their own).

A message published on any node reaches the subscribers on every node exactly once and
in per-channel order (SPEC §6); a client that moves to another node recovers its gap
from the Redis history.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import redis
import trio

from tests.cluster.conftest import run_cluster
from tests.cluster.wsclient import RecordingClient, tally
from tests.harness import REDIS_URL, WAIT_S

pytestmark = pytest.mark.redis

#: Messages published per test.
MESSAGES = 150


def _numsub(channel: bytes) -> int:
    client = redis.Redis.from_url(REDIS_URL)
    try:
        return int(client.pubsub_numsub(channel)[0][1])
    finally:
        client.close()


async def test_every_node_gets_each_message_once_in_order(
    tmp_path: Path, shared_redis_prefix: str
) -> None:
    async with run_cluster(tmp_path, REDIS_URL, count=3, prefix=shared_redis_prefix) as nodes:
        admin = await nodes[0].create_account(admin=True)
        user = await nodes[0].create_account()
        # Two subscribers per node: the node still holds one Redis subscription.
        clients = [
            RecordingClient([node.url], user.access_token, ["global", "public.cluster"])
            for node in nodes
            for _ in range(2)
        ]
        async with trio.open_nursery() as nursery:
            for client in clients:
                await nursery.start(client.run)
            for channel in (b"global", b"public.cluster"):
                assert _numsub(f"{shared_redis_prefix}hub:ch:".encode() + channel) == 3

            # Publish through the REST API of each node in turn.
            for n in range(MESSAGES):
                node = nodes[n % 3]
                response = await node.client.post(
                    "/api/v1/notifications",
                    json={"channels": ["global", "public.cluster"], "data": {"n": n}},
                    headers=admin.headers,
                )
                assert response.status_code == 202, response.text

            for client in clients:
                await client.wait_until(
                    lambda c=client: (
                        len(c.received("public.cluster")) >= MESSAGES
                        and len(c.received("global")) >= MESSAGES
                    ),
                    WAIT_S,
                )
            nursery.cancel_scope.cancel()

    for client in clients:
        for channel in ("global", "public.cluster"):
            assert client.received(channel) == list(range(MESSAGES)), channel
            counts = tally(client, channel, MESSAGES)
            assert (counts.delivered, counts.lost, counts.duplicated) == (MESSAGES, 0, 0)
            offsets = [d.offset for d in client.deliveries if d.channel == channel]
            epochs = {offset.rsplit(":", 1)[0] for offset in offsets}
            assert len(epochs) == 1
            assert [int(o.rsplit(":", 1)[1]) for o in offsets] == list(range(1, MESSAGES + 1))
        assert client.closes == []


async def test_client_moving_to_another_node_recovers_its_gap(
    tmp_path: Path, shared_redis_prefix: str
) -> None:
    async with run_cluster(tmp_path, REDIS_URL, count=3, prefix=shared_redis_prefix) as nodes:
        user = await nodes[0].create_account()
        realtime = [node.node.realtime for node in nodes]
        first = RecordingClient([nodes[0].url], user.access_token, ["public.move"])
        watcher = RecordingClient([nodes[2].url], user.access_token, ["public.move"])
        async with trio.open_nursery() as nursery:
            await nursery.start(watcher.run)
            async with trio.open_nursery() as session:
                await session.start(first.run)
                for n in range(10):
                    await realtime[1].publish(["public.move"], {"n": n})
                await first.wait_until(lambda: len(first.received("public.move")) == 10)
                session.cancel_scope.cancel()  # the client goes away...

            for n in range(10, 40):  # ...misses these...
                await realtime[n % 3].publish(["public.move"], {"n": n})

            # ...and comes back on another node with ``since``.
            moved = RecordingClient(
                [nodes[2].url],
                user.access_token,
                ["public.move"],
                last_offset=dict(first.last_offset),
            )
            await nursery.start(moved.run)
            assert moved.subscribed[0]["recovered"] == {"public.move": True}
            for n in range(40, 50):
                await realtime[0].publish(["public.move"], {"n": n})
            await moved.wait_until(lambda: len(moved.received("public.move")) == 40)
            await watcher.wait_until(lambda: len(watcher.received("public.move")) == 50)
            nursery.cancel_scope.cancel()

    assert first.received("public.move") == list(range(10))
    assert moved.received("public.move") == list(range(10, 50))
    assert watcher.received("public.move") == list(range(50))
