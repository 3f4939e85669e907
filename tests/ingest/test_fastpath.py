"""The ingest consumer's own delivery parser (``bridge.amqp_fastpath``) against the real
RabbitMQ: every delivery it takes is what pika itself makes of the same message
(properties, body, routing key, redelivered flag), with bodies split over several
frames and with the received bytes cut at every offset.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pika
import pytest
import trio

from bridge.amqp_connection import AmqpLink, open_amqp_link
from bridge.amqp_fastpath import MAX_BODY_BYTES
from bridge.amqp_ingest import EXCHANGE, Delivery, IngestConsumer
from tests.ingest.rabbit import Vhost

TIMEOUT_S = 20
REFERENCE_QUEUE = "fastpath.reference"
#: The consumer's frame size: bodies above ~4 KB take several body frames.
FRAME_MAX = 4096


class ChoppingConsumer(IngestConsumer):
    """The ingest consumer, with the received bytes cut into 1..``chop`` byte pieces
    before its reader sees them (0: as received)."""

    def __init__(self, *args: Any, chop: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._chop = chop
        self._random = random.Random(chop)

    def on_connected(self, connection: Any, generation: int) -> None:
        super().on_connected(connection, generation)
        if not self._chop:
            return
        assert self.reader is not None
        read = self.reader.data_received

        def chopped(data: bytes) -> None:
            at = 0
            while at < len(data):
                step = self._random.randint(1, self._chop)
                read(data[at : at + step])
                at += step

        connection._impl._on_data_available = chopped


@asynccontextmanager
async def consuming(
    url: str, *, chop: int = 0
) -> AsyncIterator[tuple[ChoppingConsumer, AmqpLink, trio.MemoryReceiveChannel[list[Delivery]]]]:
    """The ingest consumer alone (nothing acks: deliveries stay unacked)."""
    send, receive = trio.open_memory_channel[list[Delivery]](1000)
    consumer = ChoppingConsumer(send, prefetch=500, node_id="test-node", chop=chop)
    async with open_amqp_link(url, name="test-node/fastpath", handler=consumer) as link:
        with trio.fail_after(TIMEOUT_S):
            await link.wait_connected()
        yield consumer, link, receive
    receive.close()


async def take(receive: trio.MemoryReceiveChannel[list[Delivery]], count: int) -> list[Delivery]:
    out: list[Delivery] = []
    with trio.fail_after(TIMEOUT_S):
        while len(out) < count:
            out += await receive.receive()
    assert len(out) == count
    return out


def messages() -> list[tuple[str, bytes, pika.BasicProperties]]:
    """(routing key, body, properties): empty and multi-frame bodies, every property."""
    every = pika.BasicProperties(
        content_type="application/json",
        content_encoding="utf-8",
        headers={
            "tenant": "acme",
            "n": 7,
            "big": 2**40,
            "flag": True,
            "nested": {"list": [1, "two", None], "bytes": b"\x00\xff"},
        },
        delivery_mode=2,
        priority=3,
        correlation_id="corr-1",
        reply_to="replies",
        expiration="600000",
        message_id="id-ü-1",
        timestamp=1_764_000_000,
        type="payment.succeeded",
        user_id="guest",
        app_id="billing",
        cluster_id="",
    )
    out: list[tuple[str, bytes, pika.BasicProperties]] = [
        ("public.a", b'{"channel": "public.a", "data": {}}', pika.BasicProperties()),
        ("public.b", b"", pika.BasicProperties(delivery_mode=2)),
        ("user.\u00fc.caf\u00e9", '{"x": "\u00e9\u6f22"}'.encode(), every),
        ("public.big", b"x" * (FRAME_MAX * 5 + 123), pika.BasicProperties(message_id="b")),
        ("public.edge", b"y" * (FRAME_MAX - 8), pika.BasicProperties()),  # one full frame
    ]
    for i in range(40):
        out.append(
            (
                f"public.n{i}",
                b"z" * (i * 97),
                pika.BasicProperties(message_id=f"m{i}", priority=i % 10),
            )
        )
    return out


def publish(url: str, batch: list[tuple[str, bytes, pika.BasicProperties]]) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        channel.queue_declare(REFERENCE_QUEUE, durable=False, auto_delete=False)
        channel.queue_bind(REFERENCE_QUEUE, EXCHANGE, routing_key="#")
        channel.confirm_delivery()
        for routing_key, body, properties in batch:
            channel.basic_publish(EXCHANGE, routing_key, body, properties)
    finally:
        connection.close()


def as_pika_parses(url: str, count: int) -> list[tuple[Any, ...]]:
    """The reference copies, read by pika's own frame decoder."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        out = []
        for _ in range(count):
            method, properties, body = channel.basic_get(REFERENCE_QUEUE, auto_ack=True)
            assert method is not None
            out.append(
                (method.routing_key, method.exchange, method.redelivered, vars(properties), body)
            )
        channel.queue_delete(REFERENCE_QUEUE)
        return out
    finally:
        connection.close()


def seen(delivery: Delivery) -> tuple[Any, ...]:
    return (
        delivery.routing_key,
        delivery.exchange,
        delivery.redelivered,
        vars(delivery.properties),
        delivery.body,
    )


@pytest.mark.parametrize("chop", [0, 1, 7, 300])
async def test_deliveries_are_what_pika_makes_of_them(vhost: Vhost, chop: int) -> None:
    url = f"{vhost.url}?frame_max={FRAME_MAX}"
    batch = messages()
    async with consuming(url, chop=chop) as (consumer, _, receive):
        await trio.to_thread.run_sync(publish, vhost.url, batch)
        deliveries = await take(receive, len(batch))
        assert consumer.reader is not None
        assert consumer.reader.fast == len(batch)  # none went through pika's assembler
    reference = await trio.to_thread.run_sync(as_pika_parses, vhost.url, len(batch))
    assert [seen(d) for d in deliveries] == reference
    assert [d.tag for d in deliveries] == list(range(1, len(batch) + 1))


async def test_a_body_above_the_limit_goes_through_pika_in_order(vhost: Vhost) -> None:
    small = messages()[:3]
    big = ("public.huge", b"h" * (MAX_BODY_BYTES + 1), pika.BasicProperties(message_id="h"))
    batch = [*small, big, *small]
    async with consuming(f"{vhost.url}?frame_max={FRAME_MAX}", chop=300) as (consumer, _, receive):
        await trio.to_thread.run_sync(publish, vhost.url, batch)
        deliveries = await take(receive, len(batch))
        assert consumer.reader is not None
        assert consumer.reader.fast == len(batch) - 1
        assert consumer.reader.slow > MAX_BODY_BYTES // FRAME_MAX  # its frames, one by one
    reference = await trio.to_thread.run_sync(as_pika_parses, vhost.url, len(batch))
    assert [seen(d) for d in deliveries] == reference
    assert [d.tag for d in deliveries] == list(range(1, len(batch) + 1))


async def test_redeliveries_carry_the_flag(vhost: Vhost) -> None:
    batch = messages()[:10]
    async with consuming(vhost.url) as (consumer, link, receive):
        await trio.to_thread.run_sync(publish, vhost.url, batch)
        first = await take(receive, len(batch))
        assert not any(d.redelivered for d in first)
        link.request_reconnect()  # nothing was acked: the broker delivers them again
        again = await take(receive, len(batch))
        assert consumer.reader is not None and consumer.reader.fast == len(batch)
    assert all(d.redelivered for d in again)
    assert [d.body for d in again] == [d.body for d in first]
    assert again[0].generation == first[0].generation + 1
    await trio.to_thread.run_sync(as_pika_parses, vhost.url, len(batch))
