"""RabbitMQ → a real node → WebSocket subscribers (trio-websocket), on a vhost of its own.

The node is the one ``hub serve`` runs (``tests.harness.run_node``), on SQLite, with
``AMQP_URL`` pointing at the test vhost. Producers are plain pika publishers.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from actors.ingest import IngestActor, open_ingest
from bridge.amqp_ingest import DEAD_LETTER_QUEUE, QUEUE
from tests.harness import RunningNode, make_settings, run_node
from tests.ingest.rabbit import Producer, Vhost, drain_queue, publish_paced, queue_depth
from tests.ingest.ws import subscriber

WAIT_S = 20.0


@asynccontextmanager
async def node_with_ingest(
    vhost: Vhost, data_dir: Path, **overrides: Any
) -> AsyncIterator[tuple[RunningNode, IngestActor]]:
    """A served node consuming from ``vhost``; yields once the consumer is connected."""
    settings = make_settings(data_dir, amqp_url=vhost.url, **overrides)
    async with run_node(settings) as running:
        actor = getattr(running.node, "ingest", None)
        if actor is None:  # until hub/node.py enters open_ingest itself
            async with open_ingest(running.node) as actor:
                assert actor is not None
                with trio.fail_after(WAIT_S):
                    await actor.link.wait_connected()
                yield running, actor
        else:
            with trio.fail_after(WAIT_S):
                await actor.link.wait_connected()
            yield running, actor


def publish_all(url: str, messages: list[dict[str, Any] | bytes]) -> None:
    producer = Producer(url, confirm=False)
    try:
        for message in messages:
            producer.publish(message)
    finally:
        producer.close()


async def test_a_pika_publisher_reaches_websocket_subscribers(vhost: Vhost, tmp_path: Path) -> None:
    async with node_with_ingest(vhost, tmp_path / "data") as (running, _):
        alice = await running.create_account()
        bob = await running.create_account()
        async with (
            subscriber(running.url, alice.access_token) as a,
            subscriber(running.url, bob.access_token) as b,
        ):
            await a.subscribe("public.news", f"user.{alice.user_id}")
            await b.subscribe("public.news")
            producer = Producer(vhost.url)
            producer.publish(
                {
                    "channel": "public.news",
                    "data": {"title": "Hello", "body": "world"},
                    "event": "news.posted",
                    "id": "news-1",
                }
            )
            producer.publish(
                {"channels": [f"user.{alice.user_id}"], "data": {"title": "Just you"}},
                message_id="dm-1",
            )
            producer.close()
            await a.wait_for(2)
            await b.wait_for(1)
        first, second = a.notifications
        assert first["channel"] == "public.news"
        assert first["event"] == "news.posted"
        assert first["data"]["id"] == "news-1" and first["data"]["title"] == "Hello"
        assert first["data"]["timestamp"]
        assert second["channel"] == f"user.{alice.user_id}"
        assert second["data"]["id"] == "dm-1"
        assert [n["data"]["id"] for n in b.notifications] == ["news-1"]


async def test_poison_is_dead_lettered_and_good_messages_keep_flowing(
    vhost: Vhost, tmp_path: Path
) -> None:
    messages: list[dict[str, Any] | bytes] = []
    for i in range(50):
        messages.append({"channel": "public.flow", "data": {"n": i}, "id": f"g{i}"})
        messages.append(b"{broken" if i % 2 else {"channel": "secret.x", "data": {}})
    async with node_with_ingest(vhost, tmp_path / "data") as (running, actor):
        user = await running.create_account()
        async with subscriber(running.url, user.access_token) as client:
            await client.subscribe("public.flow")
            await trio.to_thread.run_sync(publish_all, vhost.url, messages)
            async with trio.open_nursery() as nursery:
                await nursery.start(client.collect)
                await client.wait_for(50)
                with trio.fail_after(WAIT_S):
                    await actor.wait_until(lambda s: s.acked == 100)
                nursery.cancel_scope.cancel()
        assert client.ids() == [f"g{i}" for i in range(50)], [
            (n["data"]["id"], n["offset"]) for n in client.notifications[:5]
        ]
    dead = drain_queue(vhost.url, DEAD_LETTER_QUEUE)
    reasons = sorted(headers["x-hub-reason"] for headers, _ in dead)
    assert reasons == ["invalid_channel"] * 25 + ["invalid_json"] * 25
    assert queue_depth(vhost.url, QUEUE) == (0, 0)


async def test_connection_cut_mid_stream_loses_nothing_and_duplicates_nothing(
    vhost: Vhost, tmp_path: Path
) -> None:
    total = 5000
    messages: list[dict[str, Any] | bytes] = [
        {"channel": "public.stream", "data": {"n": i}, "id": f"s{i}"} for i in range(total)
    ]
    # No ack leaves the node before the end of the test (batch and interval out of
    # reach), so every delivery before the cut is redelivered after it, and every
    # message clients already have comes back once more. The paced producer (about 3 s
    # for the stream) puts the cut in the middle.
    overrides = {"amqp_prefetch": 12000, "amqp_ack_batch": 6000, "amqp_ack_interval_ms": 60000}
    async with node_with_ingest(vhost, tmp_path / "data", **overrides) as (running, actor):
        user = await running.create_account()
        async with subscriber(running.url, user.access_token) as client:
            await client.subscribe("public.stream")
            async with trio.open_nursery() as nursery:
                await nursery.start(client.collect)
                nursery.start_soon(
                    trio.to_thread.run_sync, publish_paced, vhost.url, messages, total / 3
                )
                await client.wait_for(total // 4, timeout=WAIT_S)
                cut_at = len(client.notifications)  # at least these come back
                generation = actor.link.generation
                closed = await trio.to_thread.run_sync(vhost.close_connections, "/ingest")
                assert closed == 1
                with trio.fail_after(WAIT_S):
                    await actor.link.wait_connected(generation_above=generation)
                await client.wait_for(total, timeout=WAIT_S)
                # Requeued deliveries keep their place ahead of later messages: once a
                # marker published now is through, so is every redelivery.
                await trio.to_thread.run_sync(
                    publish_all, vhost.url, [{"channel": "public.marker", "data": {}}]
                )
                with trio.fail_after(WAIT_S):
                    await actor.wait_until(lambda s: s.published == total + 1)
                nursery.cancel_scope.cancel()
        stats = actor.statistics()
        ids = client.ids()
        assert sorted(ids) == sorted(f"s{i}" for i in range(total))  # 0 lost, 0 twice
        assert ids == [f"s{i}" for i in range(total)], "per-channel order"
        assert stats.redelivered >= cut_at, stats
    assert queue_depth(vhost.url, QUEUE) == (0, 0)  # acked when the node stopped


async def test_ready_is_503_while_the_broker_is_away(vhost: Vhost, tmp_path: Path) -> None:
    async with node_with_ingest(vhost, tmp_path / "data", amqp_reconnect_max_s=0.5) as (
        running,
        actor,
    ):
        response = await running.client.get("/ready")
        assert response.status_code == 200, response.text
        assert response.json()["data"]["checks"]["rabbitmq"] is True
        await trio.to_thread.run_sync(vhost.set_access, False)
        try:
            await trio.to_thread.run_sync(vhost.close_connections, "/ingest")
            with trio.fail_after(WAIT_S):
                await actor.link.wait_disconnected()
            response = await running.client.get("/ready")
            assert response.status_code == 503
            assert response.json()["error"]["details"]["down"] == ["rabbitmq"]
        finally:
            await trio.to_thread.run_sync(vhost.set_access, True)
        with trio.fail_after(WAIT_S):
            await actor.link.wait_connected()
        response = await running.client.get("/ready")
        assert response.status_code == 200, response.text


async def test_without_amqp_url_ingest_does_nothing(tmp_path: Path) -> None:
    async with run_node(make_settings(tmp_path / "data", amqp_url=None)) as running:
        async with open_ingest(running.node) as actor:
            assert actor is None
        assert "rabbitmq" not in running.node.ready_checks


async def test_stop_hands_the_queue_back_and_is_idempotent(vhost: Vhost, tmp_path: Path) -> None:
    async with node_with_ingest(vhost, tmp_path / "data") as (_, actor):
        with trio.fail_after(WAIT_S):
            await actor.stop()
        assert not actor.link.connected
        producer = Producer(vhost.url)  # with confirms: stored when publish returns
        for i in range(3):
            producer.publish({"channel": "global", "data": {}, "id": f"x{i}"})
        producer.close()
        assert queue_depth(vhost.url, QUEUE) == (3, 0)  # waiting for the next consumer
        with trio.fail_after(WAIT_S):
            await actor.stop()
