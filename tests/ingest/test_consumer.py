"""The ingest actor against the real RabbitMQ, with a recording stand-in for the
realtime core (so failures of the publish step can be injected).

End-to-end tests with a real node and WebSocket clients are in ``test_end_to_end.py``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pika
import trio

from actors.channel import FanoutBatch
from actors.ingest import IngestActor
from bridge.amqp_ingest import DEAD_LETTER_QUEUE, QUEUE, IngestLink
from bridge.dedupe import MemoryDedupe
from tests.ingest.rabbit import Producer, Vhost, drain_queue, queue_depth

TIMEOUT_S = 20


class CountingBatch(FanoutBatch):
    """The realtime core's write-combining block, counting its early flushes."""

    def __init__(self) -> None:
        super().__init__()
        self.early_flushes = 0

    def flush(self) -> None:
        if self.active:
            self.early_flushes += 1
        super().flush()


class RecordingRealtime:
    """Records what would be published; ``fail_next`` publishes raise ConnectionError;
    while ``gate`` is an unset event, publishes wait for it."""

    def __init__(self) -> None:
        self.published: list[tuple[list[str], dict[str, Any], str | None, str | None]] = []
        self.fail_next = 0
        self.gate: trio.Event | None = None
        self.batch = CountingBatch()

    async def publish(
        self,
        channels: list[str],
        data: dict[str, Any],
        *,
        event: str | None = None,
        id: str | None = None,
    ) -> None:
        await trio.lowlevel.checkpoint()
        if self.gate is not None:
            await self.gate.wait()
        if self.fail_next:
            self.fail_next -= 1
            raise ConnectionError("history store down")
        self.published.append((channels, data, event, id))

    def fanout_batch(self) -> FanoutBatch:
        return self.batch


@asynccontextmanager
async def running_ingest(
    url: str, realtime: RecordingRealtime, *, prefetch: int = 50
) -> AsyncIterator[IngestActor]:
    link = IngestLink(url, name="test-node/ingest", prefetch=prefetch, node_id="test-node")
    actor = IngestActor(
        realtime,
        MemoryDedupe(),
        link,
        ack_batch=prefetch // 2,
        ack_interval_s=0.005,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(link.run)
        await nursery.start(actor.run)
        with trio.fail_after(TIMEOUT_S):
            await link.wait_connected()
        yield actor
        with trio.fail_after(TIMEOUT_S):
            await actor.stop()


async def test_messages_are_published_in_order_and_acked(vhost: Vhost) -> None:
    realtime = RecordingRealtime()
    async with running_ingest(vhost.url, realtime) as actor:
        producer = Producer(vhost.url)
        for i in range(300):
            producer.publish({"channel": "public.orders", "data": {"n": i}, "id": f"m{i}"})
        producer.close()
        with trio.fail_after(TIMEOUT_S):
            await actor.wait_until(lambda s: s.acked == 300)
    assert [data["n"] for _, data, _, _ in realtime.published] == list(range(300))
    assert queue_depth(vhost.url, QUEUE) == (0, 0)  # nothing came back when we left


async def test_poison_goes_to_the_dead_letter_queue_and_good_ones_flow(vhost: Vhost) -> None:
    realtime = RecordingRealtime()
    poison: list[tuple[bytes, str]] = [
        (b"not json", "invalid_json"),
        (b"[1, 2]", "invalid_schema"),
        (b'{"channel": "public.x"}', "invalid_schema"),
        (b'{"channel": "bad name!", "data": {}}', "invalid_channel"),
        (b'{"channel": "nowhere", "data": {}}', "invalid_channel"),
        (b'{"channel": "public.x", "data": {}, "extra": 1}', "invalid_schema"),
        (b'{"channel": "public.x", "data": {"x": "' + b"a" * 70_000 + b'"}}', "oversize"),
    ]
    async with running_ingest(vhost.url, realtime) as actor:
        producer = Producer(vhost.url)
        for i in range(20):
            body, _ = poison[i % len(poison)]
            producer.publish(body, routing_key=f"poison.{i}")
            producer.publish({"channel": "public.x", "data": {"n": i}})
        producer.close()
        with trio.fail_after(TIMEOUT_S):
            await actor.wait_until(lambda s: s.acked == 40)
        assert actor.statistics().dead_lettered == 20
    assert [data["n"] for _, data, _, _ in realtime.published] == list(range(20))
    dead = drain_queue(vhost.url, DEAD_LETTER_QUEUE)
    assert len(dead) == 20
    for i, (headers, body) in enumerate(dead):
        assert (body, headers["x-hub-reason"]) == poison[i % len(poison)]
        assert headers["x-hub-reason-detail"]
        assert headers["x-hub-original-routing-key"] == f"poison.{i}"
    assert queue_depth(vhost.url, QUEUE) == (0, 0)


async def test_repeated_ids_are_published_once(vhost: Vhost) -> None:
    realtime = RecordingRealtime()
    async with running_ingest(vhost.url, realtime) as actor:
        producer = Producer(vhost.url)
        for _ in range(3):
            producer.publish({"channel": "global", "data": {}, "id": "same"})
            producer.publish({"channel": "global", "data": {"k": 1}}, message_id="amqp-id")
            producer.publish({"channel": "global", "data": {"k": 2}})  # id = hash of body
        producer.close()
        with trio.fail_after(TIMEOUT_S):
            await actor.wait_until(lambda s: s.acked == 9)
        assert actor.statistics().duplicates == 6
    ids = [id for *_, id in realtime.published]
    assert ids[:2] == ["same", "amqp-id"]
    assert ids[2].startswith("sha256:")
    assert len(ids) == 3


async def test_a_failing_publish_holds_the_message_until_it_succeeds(vhost: Vhost) -> None:
    realtime = RecordingRealtime()
    realtime.fail_next = 4
    async with running_ingest(vhost.url, realtime) as actor:
        producer = Producer(vhost.url)
        for i in range(10):
            producer.publish({"channel": "global", "data": {"n": i}})
        producer.close()
        with trio.fail_after(TIMEOUT_S):
            await actor.wait_until(lambda s: s.acked == 10)
        assert actor.statistics().publish_retries == 4
        # Before each retry's wait, what the batch had published was written out.
        assert realtime.batch.early_flushes == 4
    assert [data["n"] for _, data, _, _ in realtime.published] == list(range(10))


def publish_many(url: str, count: int, channel: str = "public.stream") -> None:
    producer = Producer(url, confirm=False)
    try:
        for i in range(count):
            producer.publish({"channel": channel, "data": {"n": i}, "id": f"s{i}"})
    finally:
        producer.close()


async def test_connection_cut_mid_stream_loses_nothing_and_publishes_once(vhost: Vhost) -> None:
    total = 5000
    realtime = RecordingRealtime()
    async with running_ingest(vhost.url, realtime, prefetch=200) as actor:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.to_thread.run_sync, publish_many, vhost.url, total)
            with trio.fail_after(TIMEOUT_S):
                await actor.wait_until(lambda s: s.published >= total // 3)
            # Hold the publish step so that deliveries are in flight (unacked) at the cut.
            realtime.gate = gate = trio.Event()
            generation = actor.link.generation
            closed = await trio.to_thread.run_sync(vhost.close_connections, "test-node/ingest")
            assert closed == 1
            with trio.fail_after(TIMEOUT_S):
                await actor.link.wait_disconnected()
            gate.set()
            with trio.fail_after(TIMEOUT_S):
                await actor.link.wait_connected(generation_above=generation)
                await actor.wait_until(lambda s: s.published == total)
                await actor.wait_until(lambda s: s.acked == s.received)
        stats = actor.statistics()
    numbers = [data["n"] for _, data, _, _ in realtime.published]
    assert sorted(numbers) == list(range(total))  # 0 lost, 0 published twice
    assert stats.redelivered > 0 and stats.duplicates == stats.received - total
    assert queue_depth(vhost.url, QUEUE) == (0, 0)


async def test_an_existing_queue_with_other_arguments_is_used_as_it_is(vhost: Vhost) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(vhost.url))
    connection.channel().queue_declare(QUEUE, durable=True, arguments={"x-max-length": 100000})
    connection.close()
    realtime = RecordingRealtime()
    async with running_ingest(vhost.url, realtime) as actor:
        producer = Producer(vhost.url)
        producer.publish({"channel": "global", "data": {"n": 1}})
        producer.close()
        with trio.fail_after(TIMEOUT_S):
            await actor.wait_until(lambda s: s.acked == 1)
    assert len(realtime.published) == 1


async def test_a_deleted_queue_is_declared_again(vhost: Vhost) -> None:
    realtime = RecordingRealtime()
    async with running_ingest(vhost.url, realtime) as actor:
        generation = actor.link.generation
        connection = pika.BlockingConnection(pika.URLParameters(vhost.url))
        connection.channel().queue_delete(QUEUE)  # the broker cancels our consumer
        connection.close()
        with trio.fail_after(TIMEOUT_S):
            await actor.link.wait_connected(generation_above=generation)
        producer = Producer(vhost.url)
        producer.publish({"channel": "global", "data": {"n": 2}})
        producer.close()
        with trio.fail_after(TIMEOUT_S):
            await actor.wait_until(lambda s: s.acked == 1)
    assert [data for _, data, _, _ in realtime.published] == [{"n": 2}]


async def test_a_dead_letter_exchange_of_another_type_is_used_as_it_is(vhost: Vhost) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(vhost.url))
    connection.channel().exchange_declare("hub.dlx", exchange_type="fanout", durable=True)
    connection.close()
    realtime = RecordingRealtime()
    try:
        async with running_ingest(vhost.url, realtime) as actor:
            producer = Producer(vhost.url)
            producer.publish(b"not json")
            producer.publish({"channel": "global", "data": {}})
            producer.close()
            with trio.fail_after(TIMEOUT_S):
                await actor.wait_until(lambda s: s.acked == 2)
        assert [headers["x-hub-reason"] for headers, _ in drain_queue(vhost.url)] == [
            "invalid_json"
        ]
    finally:
        connection = pika.BlockingConnection(pika.URLParameters(vhost.url))
        connection.channel().exchange_delete("hub.dlx")
        connection.close()


def delete_exchange(url: str, name: str) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        connection.channel().exchange_delete(name)
    finally:
        connection.close()


async def test_a_dead_letter_the_broker_did_not_take_is_not_acked(vhost: Vhost) -> None:
    # An operator deletes hub.dlx while the node runs: the dead letter is refused (the
    # broker closes the channel: 404), so the original must stay unacked, and whatever
    # the same connection handled after it must not ack it either. The node reconnects,
    # declares hub.dlx again, and the redelivered original is dead-lettered then.
    # Prefetch 2 acks every delivery as soon as it is done (ack batch 1): the ack comes
    # before the link has replaced the connection.
    realtime = RecordingRealtime()
    async with running_ingest(vhost.url, realtime, prefetch=2) as actor:
        generation = actor.link.generation
        await trio.to_thread.run_sync(delete_exchange, vhost.url, "hub.dlx")
        producer = Producer(vhost.url)
        producer.publish(b"not json", routing_key="poison.0")
        producer.publish({"channel": "public.x", "data": {"n": 1}, "id": "after"})
        producer.close()
        with trio.fail_after(TIMEOUT_S):
            await actor.link.wait_connected(generation_above=generation)
            await actor.wait_until(lambda s: s.dead_lettered == 1 and s.acked == s.received)
        stats = actor.statistics()
    assert stats.received == 4  # both came back
    assert stats.redelivered == 2 and stats.duplicates == 1
    assert [data for _, data, _, _ in realtime.published] == [{"n": 1}]
    dead = drain_queue(vhost.url, DEAD_LETTER_QUEUE)
    assert [(headers["x-hub-reason"], body) for headers, body in dead] == [
        ("invalid_json", b"not json")
    ]
    assert queue_depth(vhost.url, QUEUE) == (0, 0)
