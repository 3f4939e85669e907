"""The hand-off between the ingest link thread and the trio side, against the real
RabbitMQ: a busy trio side never blocks the link thread and loses or reorders nothing,
batches that queued up behind a busy trio side are handled as one write-combining
batch, a stop right after the last message still acks it, and under steady traffic
deliveries are handed over in batches at most every ``handoff_interval_s``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio

import actors.ingest
from actors.channel import FanoutBatch
from actors.ingest import IngestActor
from bridge.amqp_connection import AmqpLink, open_amqp_link
from bridge.amqp_ingest import QUEUE, Delivery, IngestConsumer
from bridge.dedupe import MemoryDedupe
from tests.ingest.rabbit import Producer, Vhost, publish_paced, queue_depth

TIMEOUT_S = 20
PREFETCH = 100


class CountingBatch(FanoutBatch):
    """A write-combining batch that counts how often it was opened (outermost)."""

    def __init__(self) -> None:
        super().__init__()
        self.opened = 0

    def __enter__(self) -> FanoutBatch:
        if not self.active:
            self.opened += 1
        return super().__enter__()


class GatedRealtime:
    """Records publishes, each with the write-combining batch it was made in; every
    publish waits for ``gate`` (a busy fan-out)."""

    def __init__(self) -> None:
        self.published: list[dict[str, Any]] = []
        self.batches: list[int] = []  # per publish: which opening of the batch
        self.gate = trio.Event()
        self.batch = CountingBatch()

    async def publish(self, channels: list[str], data: dict[str, Any], **_: Any) -> None:
        await self.gate.wait()
        assert self.batch.active
        self.published.append(data)
        self.batches.append(self.batch.opened)

    def fanout_batch(self) -> FanoutBatch:
        return self.batch


class RecordingReceive:
    """The actor's mailbox, recording the size of each batch it takes and how (``wait``:
    the receive it waited on; ``joined``: taken without waiting, behind another)."""

    def __init__(self, receive: trio.MemoryReceiveChannel[list[Delivery]]) -> None:
        self._receive = receive
        self.taken: list[tuple[str, int]] = []

    async def receive(self) -> list[Delivery]:
        batch = await self._receive.receive()
        self.taken.append(("wait", len(batch)))
        return batch

    def receive_nowait(self) -> list[Delivery]:
        batch = self._receive.receive_nowait()
        self.taken.append(("joined", len(batch)))
        return batch

    def close(self) -> None:
        self._receive.close()


@asynccontextmanager
async def ingest(
    url: str,
    realtime: GatedRealtime,
    *,
    mailbox: int,
    ack_batch: int = PREFETCH // 2,
    ack_interval_s: float = 0.005,
    handoff_interval_s: float = 0.0,
    recorder: list[RecordingReceive] | None = None,
) -> AsyncIterator[tuple[IngestActor, IngestConsumer, AmqpLink]]:
    send, channel = trio.open_memory_channel[list[Delivery]](mailbox)
    receive = RecordingReceive(channel)
    if recorder is not None:
        recorder.append(receive)
    consumer = IngestConsumer(
        send, prefetch=PREFETCH, node_id="test-node", handoff_interval_s=handoff_interval_s
    )
    async with open_amqp_link(url, name="test-node/ingest", handler=consumer) as link:
        actor = IngestActor(
            realtime,
            MemoryDedupe(),
            link,
            consumer,
            receive,  # type: ignore[arg-type]  # the actor takes a memory channel's methods
            ack_batch=ack_batch,
            ack_interval_s=ack_interval_s,
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(actor.run)
            with trio.fail_after(TIMEOUT_S):
                await link.wait_connected()
            yield actor, consumer, link
            with trio.fail_after(TIMEOUT_S):
                await actor.stop()
        receive.close()


async def test_a_busy_trio_side_holds_deliveries_in_order(vhost: Vhost) -> None:
    realtime = GatedRealtime()
    total = PREFETCH - 20  # all of it reaches the node while the gate is shut
    messages: list[dict[str, Any] | bytes] = [
        {"channel": "public.handoff", "data": {"n": i}, "id": f"h{i}"} for i in range(total)
    ]
    # A one-batch mailbox: the first delivery is stuck at the gate, the next batch fills
    # the mailbox, and the ones after it must wait for room without blocking the thread.
    async with ingest(vhost.url, realtime, mailbox=1) as (actor, consumer, link):
        async with trio.open_nursery() as nursery:
            # Paced, so that the deliveries reach the node in many separate rounds.
            nursery.start_soon(trio.to_thread.run_sync, publish_paced, vhost.url, messages, 500)
            with trio.fail_after(TIMEOUT_S):
                while consumer.held_batches == 0:
                    # Each call is a round trip through the link thread: it answers
                    # while trio is stuck, and the deliveries of that round are handed
                    # over before the next one.
                    assert await link.call(lambda: 42) == 42
        assert realtime.published == []  # everything is still waiting at the gate
        realtime.gate.set()
        with trio.fail_after(TIMEOUT_S):
            await actor.wait_until(lambda s: s.acked == total)
    assert [data["n"] for data in realtime.published] == list(range(total))
    assert actor.statistics().duplicates == 0
    assert queue_depth(vhost.url, QUEUE) == (0, 0)


async def _fill_behind_the_gate(
    url: str, total: int, **options: Any
) -> tuple[GatedRealtime, RecordingReceive]:
    """``total`` paced messages reach a node whose first publish is stuck at the gate
    (a one-message first batch, then a full mailbox); the gate opens and everything is
    published. Returns the realtime (what was published, in which batch) and the
    mailbox's record."""
    realtime = GatedRealtime()
    messages: list[dict[str, Any] | bytes] = [
        {"channel": "public.handoff", "data": {"n": i}, "id": f"m{i}"} for i in range(total)
    ]
    recorder: list[RecordingReceive] = []
    async with ingest(url, realtime, mailbox=4, recorder=recorder, **options) as (
        actor,
        consumer,
        link,
    ):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.to_thread.run_sync, publish_paced, url, messages, 500)
            with trio.fail_after(TIMEOUT_S):
                while consumer.held_batches == 0:  # the mailbox is full
                    assert await link.call(lambda: 42) == 42
        realtime.gate.set()
        with trio.fail_after(TIMEOUT_S):
            await actor.wait_until(lambda s: s.acked == total)
    assert [data["n"] for data in realtime.published] == list(range(total))
    assert queue_depth(url, QUEUE) == (0, 0)
    return realtime, recorder[0]


def _groups(taken: list[tuple[str, int]]) -> list[int]:
    """Per delivery, the receive it came with: a waited-for batch and the batches
    joined behind it are one group."""
    groups: list[int] = []
    group = -1
    for way, size in taken:
        if way == "wait":
            group += 1
        groups += [group] * size
    return groups


async def test_batches_that_queued_up_are_handled_as_one(vhost: Vhost) -> None:
    realtime, mailbox = await _fill_behind_the_gate(vhost.url, PREFETCH - 20)
    # The first batch waited at the gate; the ones behind it in the mailbox were taken
    # together with the next one, and published in one write-combining batch.
    how = [way for way, _ in mailbox.taken]
    assert how[:3] == ["wait", "wait", "joined"], mailbox.taken
    groups = _groups(mailbox.taken)
    assert len(groups) == len(realtime.batches)
    pairs = set(zip(groups, realtime.batches, strict=True))
    # One write-combining batch per group, and one group per write-combining batch.
    assert len(pairs) == len({g for g, _ in pairs}) == len({b for _, b in pairs}), pairs
    assert len(set(realtime.batches)) < len(mailbox.taken)


async def test_joining_stops_at_the_limit(vhost: Vhost, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(actors.ingest, "MERGE_MAX_DELIVERIES", 1)
    realtime, mailbox = await _fill_behind_the_gate(vhost.url, PREFETCH - 20)
    assert {way for way, _ in mailbox.taken} == {"wait"}, mailbox.taken
    assert len(set(realtime.batches)) == len(mailbox.taken)


async def test_stop_right_after_the_last_message_acks_it(vhost: Vhost) -> None:
    realtime = GatedRealtime()
    realtime.gate.set()
    total = 30
    # Acks would only go out at the stop: a batch larger than the stream, a long interval.
    async with ingest(
        vhost.url, realtime, mailbox=4, ack_batch=PREFETCH // 2, ack_interval_s=60.0
    ) as (actor, _, _):
        producer = Producer(vhost.url)
        for i in range(total):
            producer.publish({"channel": "public.handoff", "data": {"n": i}, "id": f"s{i}"})
        producer.close()
        with trio.fail_after(TIMEOUT_S):
            await actor.wait_until(lambda s: s.published == total)
        assert actor.statistics().acked == 0  # nothing flushed yet: the stop must do it
    assert actor.statistics().acked == total
    assert queue_depth(vhost.url, QUEUE) == (0, 0)  # nothing was requeued


async def test_steady_traffic_is_handed_over_in_paced_batches(vhost: Vhost) -> None:
    realtime = GatedRealtime()
    realtime.gate.set()
    total, rate, interval = 400, 800, 0.05  # half a second of traffic
    messages: list[dict[str, Any] | bytes] = [
        {"channel": "public.handoff", "data": {"n": i}, "id": f"p{i}"} for i in range(total)
    ]
    async with ingest(vhost.url, realtime, mailbox=4, handoff_interval_s=interval) as (
        actor,
        consumer,
        _,
    ):
        started = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.to_thread.run_sync, publish_paced, vhost.url, messages, rate)
            with trio.fail_after(TIMEOUT_S):
                await actor.wait_until(lambda s: s.published == total)
        elapsed = trio.current_time() - started
    # One message per round would be ~400 hand-overs; paced, one per interval at most
    # (plus the first, which goes at once).
    assert consumer.handoffs <= elapsed / interval + 2, (consumer.handoffs, elapsed)
    assert consumer.handoffs >= 2  # the traffic was not held for the whole stream
    assert [data["n"] for data in realtime.published] == list(range(total))
