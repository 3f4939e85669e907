"""The hand-off between the ingest link and the ingest actor, against the real RabbitMQ:
what arrives while the actor is busy waits in order and is handled as one
write-combining batch (up to the limit), nothing is lost or repeated, and a stop right
after the last message still acks it.
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
from bridge.amqp_ingest import QUEUE, IngestLink
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


class CountingLink(IngestLink):
    """The ingest link, with an event for "this many deliveries have arrived"."""

    def __init__(self, url: str) -> None:
        super().__init__(url, name="test-node/ingest", prefetch=PREFETCH, node_id="test-node")
        self.arrived = 0
        self.want = 0
        self.reached = trio.Event()

    def _on_delivery(self, *args: Any) -> None:
        super()._on_delivery(*args)
        self.arrived += 1
        if self.arrived >= self.want:
            self.reached.set()

    async def wait_arrived(self, count: int) -> None:
        self.want = count
        if self.arrived < count:
            self.reached = trio.Event()
            await self.reached.wait()


@asynccontextmanager
async def ingest(
    url: str,
    realtime: GatedRealtime,
    *,
    ack_batch: int = PREFETCH // 2,
    ack_interval_s: float = 0.005,
) -> AsyncIterator[tuple[IngestActor, CountingLink]]:
    link = CountingLink(url)
    actor = IngestActor(
        realtime, MemoryDedupe(), link, ack_batch=ack_batch, ack_interval_s=ack_interval_s
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(link.run)
        await nursery.start(actor.run)
        with trio.fail_after(TIMEOUT_S):
            await link.wait_connected()
        yield actor, link
        with trio.fail_after(TIMEOUT_S):
            await actor.stop()


async def _arrive_behind_the_gate(url: str, total: int) -> GatedRealtime:
    """``total`` paced messages (many separate reads) reach a node whose first publish
    is stuck at the gate; once all have arrived the gate opens. Returns the realtime:
    what was published, in which write-combining batch."""
    realtime = GatedRealtime()
    messages: list[dict[str, Any] | bytes] = [
        {"channel": "public.handoff", "data": {"n": i}, "id": f"m{i}"} for i in range(total)
    ]
    async with ingest(url, realtime) as (actor, link):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.to_thread.run_sync, publish_paced, url, messages, 500)
            with trio.fail_after(TIMEOUT_S):
                await link.wait_arrived(total)
        assert realtime.published == []  # everything is still waiting at the gate
        realtime.gate.set()
        with trio.fail_after(TIMEOUT_S):
            await actor.wait_until(lambda s: s.acked == total)
        assert actor.statistics().duplicates == 0
    assert [data["n"] for data in realtime.published] == list(range(total))
    assert queue_depth(url, QUEUE) == (0, 0)
    return realtime


def _batch_sizes(realtime: GatedRealtime) -> list[int]:
    return [realtime.batches.count(b) for b in sorted(set(realtime.batches))]


async def test_what_arrived_meanwhile_is_handled_as_one_batch(vhost: Vhost) -> None:
    total = PREFETCH - 20
    realtime = await _arrive_behind_the_gate(vhost.url, total)
    # The first batch waited at the gate; everything that arrived meanwhile, over many
    # reads, was published in one write-combining batch after it.
    sizes = _batch_sizes(realtime)
    assert len(sizes) == 2, sizes
    assert sizes[0] < total // 2, sizes


async def test_batches_stop_at_the_limit(vhost: Vhost, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(actors.ingest, "MERGE_MAX_DELIVERIES", 10)
    total = PREFETCH - 20
    realtime = await _arrive_behind_the_gate(vhost.url, total)
    sizes = _batch_sizes(realtime)
    assert max(sizes) == 10, sizes
    assert len(sizes) >= total // 10, sizes


async def test_stop_right_after_the_last_message_acks_it(vhost: Vhost) -> None:
    realtime = GatedRealtime()
    realtime.gate.set()
    total = 30
    # Acks would only go out at the stop: a batch larger than the stream, a long interval.
    async with ingest(vhost.url, realtime, ack_batch=PREFETCH // 2, ack_interval_s=60.0) as (
        actor,
        _,
    ):
        producer = Producer(vhost.url)
        for i in range(total):
            producer.publish({"channel": "public.handoff", "data": {"n": i}, "id": f"s{i}"})
        producer.close()
        with trio.fail_after(TIMEOUT_S):
            await actor.wait_until(lambda s: s.published == total)
        assert actor.statistics().acked == 0  # nothing flushed yet: the stop must do it
    assert actor.statistics().acked == total
    assert queue_depth(vhost.url, QUEUE) == (0, 0)  # nothing was requeued
