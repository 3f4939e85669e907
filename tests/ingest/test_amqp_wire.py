"""The ingest's own AMQP client (``bridge.amqp_wire``) against the real RabbitMQ: every
delivery is what pika itself makes of the same message (properties, body, routing key,
redelivered flag), with bodies split over several frames and with the received bytes cut
at every offset; a refused login is reported. Then its frame reader alone, with frames a
broker should never send, and its URL parsing.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pika
import pytest
import trio
from pika import frame as pika_frame
from pika import spec

from bridge.amqp_connection import AmqpUnavailable
from bridge.amqp_ingest import EXCHANGE, Delivery, IngestLink
from bridge.amqp_wire import AmqpConnectionLost, AmqpParameters, FrameReader
from tests.ingest.rabbit import HOST, PORT, Vhost

TIMEOUT_S = 20
REFERENCE_QUEUE = "fastpath.reference"
#: The consumer's frame size: bodies above ~4 KB take several body frames.
FRAME_MAX = 4096


def chop_reads(monkeypatch: pytest.MonkeyPatch, chop: int) -> None:
    """Cut the bytes every connection receives into 1..``chop`` byte pieces before its
    frame reader sees them (0: as received)."""
    if not chop:
        return
    feed = FrameReader.feed
    rng = random.Random(chop)

    def chopped(self: FrameReader, data: bytes) -> None:
        at = 0
        while at < len(data):
            step = rng.randint(1, chop)
            feed(self, data[at : at + step])
            at += step

    monkeypatch.setattr(FrameReader, "feed", chopped)


@asynccontextmanager
async def consuming(url: str) -> AsyncIterator[IngestLink]:
    """The ingest link alone (nothing acks: deliveries stay unacked)."""
    link = IngestLink(url, name="test-node/wire", prefetch=500, node_id="test-node")
    async with trio.open_nursery() as nursery:
        await nursery.start(link.run)
        with trio.fail_after(TIMEOUT_S):
            await link.wait_connected()
        yield link
        await link.stop()


async def take(link: IngestLink, count: int) -> list[Delivery]:
    out: list[Delivery] = []
    with trio.fail_after(TIMEOUT_S):
        while len(out) < count:
            batch = await link.next_batch(1000)
            assert batch is not None
            out += batch
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
async def test_deliveries_are_what_pika_makes_of_them(
    vhost: Vhost, chop: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    chop_reads(monkeypatch, chop)
    url = f"{vhost.url}?frame_max={FRAME_MAX}"
    batch = messages()
    async with consuming(url) as link:
        await trio.to_thread.run_sync(publish, vhost.url, batch)
        deliveries = await take(link, len(batch))
    reference = await trio.to_thread.run_sync(as_pika_parses, vhost.url, len(batch))
    assert [seen(d) for d in deliveries] == reference
    assert [d.tag for d in deliveries] == list(range(1, len(batch) + 1))


async def test_a_large_body_over_many_frames_between_small_ones(
    vhost: Vhost, monkeypatch: pytest.MonkeyPatch
) -> None:
    chop_reads(monkeypatch, 3000)
    small = messages()[:3]
    big = ("public.huge", bytes(range(256)) * 1000, pika.BasicProperties(message_id="h"))
    batch = [*small, big, *small]
    async with consuming(f"{vhost.url}?frame_max={FRAME_MAX}") as link:
        await trio.to_thread.run_sync(publish, vhost.url, batch)
        deliveries = await take(link, len(batch))
    reference = await trio.to_thread.run_sync(as_pika_parses, vhost.url, len(batch))
    assert [seen(d) for d in deliveries] == reference
    assert [d.tag for d in deliveries] == list(range(1, len(batch) + 1))


async def test_redeliveries_carry_the_flag(vhost: Vhost) -> None:
    batch = messages()[:10]
    async with consuming(vhost.url) as link:
        await trio.to_thread.run_sync(publish, vhost.url, batch)
        first = await take(link, len(batch))
        assert not any(d.redelivered for d in first)
        link.request_reconnect()  # nothing was acked: the broker delivers them again
        again = await take(link, len(batch))
    assert all(d.redelivered for d in again)
    assert [d.body for d in again] == [d.body for d in first]
    assert again[0].generation == first[0].generation + 1
    await trio.to_thread.run_sync(as_pika_parses, vhost.url, len(batch))


async def test_a_refused_login_is_reported(vhost: Vhost) -> None:
    url = vhost.url.replace("guest:guest@", "guest:wrong@")
    assert url != vhost.url
    link = IngestLink(url, name="test-node/wire", prefetch=10, node_id="test-node")
    async with trio.open_nursery() as nursery:
        await nursery.start(link.run)
        with trio.fail_after(TIMEOUT_S):
            while link.statistics().last_error is None:
                await link._changed.wait()
        with pytest.raises(AmqpUnavailable, match="ACCESS_REFUSED"):
            await link.check_ready()
        assert not link.connected
        assert await link.stop()


# -- the frame reader alone ------------------------------------------------------------
def _reader() -> tuple[FrameReader, list[Any]]:
    seen: list[Any] = []
    reader = FrameReader(lambda *args: seen.append(args), lambda *args: seen.append(args))
    return reader, seen


def test_a_frame_without_its_end_marker_is_refused() -> None:
    reader, _ = _reader()
    frame = bytearray(pika_frame.Heartbeat().marshal())
    frame[-1] = 0
    with pytest.raises(AmqpConnectionLost, match="no frame end"):
        reader.feed(bytes(frame))


def test_content_without_a_method_is_refused() -> None:
    reader, _ = _reader()
    body = pika_frame.Body(1, b"stray").marshal()
    with pytest.raises(AmqpConnectionLost, match="unexpected body frame"):
        reader.feed(body)


def test_a_body_longer_than_announced_is_refused() -> None:
    reader, seen = _reader()
    deliver = spec.Basic.Deliver(consumer_tag="c", delivery_tag=1, exchange="x", routing_key="r")
    data = b"".join(
        [
            pika_frame.Method(1, deliver).marshal(),
            pika_frame.Header(1, 3, spec.BasicProperties()).marshal(),
            pika_frame.Body(1, b"ab").marshal(),
            pika_frame.Body(1, b"cd").marshal(),
        ]
    )
    with pytest.raises(AmqpConnectionLost, match="longer than announced"):
        reader.feed(data)
    assert seen == []


def test_other_methods_and_heartbeats_pass_through_in_order() -> None:
    reader, seen = _reader()
    deliver = spec.Basic.Deliver(consumer_tag="c", delivery_tag=9, exchange="x", routing_key="r")
    data = b"".join(
        [
            pika_frame.Method(1, spec.Basic.QosOk()).marshal(),
            pika_frame.Heartbeat().marshal(),
            pika_frame.Method(1, deliver).marshal(),
            pika_frame.Header(1, 0, spec.BasicProperties()).marshal(),
            pika_frame.Method(2, spec.Basic.Ack(delivery_tag=4, multiple=True)).marshal(),
        ]
    )
    for at in range(len(data)):  # every split point
        reader.feed(data[:at])
        reader.feed(data[at:])
    kinds = [type(item[1]).__name__ if len(item) == 3 else "delivery" for item in seen]
    assert kinds == ["QosOk", "delivery", "Ack"] * len(data)
    assert seen[1][:6] == (1, "c", 9, False, "x", "r") and seen[1][7] == b""


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("amqp://", ("localhost", 5672, "guest", "guest", "/", False, 60)),
        ("amqps://h", ("h", 5671, "guest", "guest", "/", True, 60)),
        (
            "amqp://u%40x:p%2Fw@broker:5673/%2Fprod?heartbeat=15",
            ("broker", 5673, "u@x", "p/w", "/prod", False, 15),
        ),
        ("amqp://u:p@h/", ("h", 5672, "u", "p", "/", False, 60)),
    ],
)
def test_urls(url: str, expected: tuple[Any, ...]) -> None:
    params = AmqpParameters.from_url(url)
    got = (params.host, params.port, params.username, params.password, params.vhost)
    assert (*got, params.tls, params.heartbeat_s) == expected


def test_a_url_of_another_scheme_is_refused() -> None:
    with pytest.raises(ValueError, match="amqp://"):
        AmqpParameters.from_url("http://h")


# -- connection failures ----------------------------------------------------------------
class FreezingProxy:
    """A TCP proxy in front of RabbitMQ whose connections can go silent at once: after
    :meth:`freeze`, nothing more is forwarded either way and no close is passed on (a
    network that drops everything). Connections made after that work normally."""

    def __init__(self) -> None:
        self.port = 0
        self._frozen: list[trio.Event] = []

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)

    def freeze(self) -> None:
        for frozen in self._frozen:
            frozen.set()

    async def _handle(self, client: trio.SocketStream) -> None:
        frozen = trio.Event()
        self._frozen.append(frozen)
        async with client, await trio.open_tcp_stream(HOST, PORT) as upstream:

            async def pump(src: trio.SocketStream, dst: trio.SocketStream) -> None:
                async for chunk in src:
                    if frozen.is_set():
                        await trio.sleep_forever()
                    await dst.send_all(chunk)
                if frozen.is_set():
                    await trio.sleep_forever()
                await dst.send_eof()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(pump, client, upstream)
                nursery.start_soon(pump, upstream, client)


async def test_a_silent_broker_is_detected_by_heartbeats(vhost: Vhost) -> None:
    async with trio.open_nursery() as outer:
        proxy = FreezingProxy()
        await outer.start(proxy.serve)
        url = vhost.url.replace(f"{HOST}:{PORT}", f"127.0.0.1:{proxy.port}") + "?heartbeat=1"
        assert str(proxy.port) in url
        async with consuming(url) as link:
            first = link.generation
            proxy.freeze()
            started = trio.current_time()
            with trio.fail_after(TIMEOUT_S):
                await link.wait_disconnected()
            silent_for = trio.current_time() - started
            assert "no data from the broker" in str(link.statistics().last_error)
            assert 1.0 <= silent_for <= 5.0, silent_for  # two heartbeat intervals, give or take
            with trio.fail_after(TIMEOUT_S):
                await link.wait_connected(generation_above=first)
        outer.cancel_scope.cancel()


async def test_a_channel_the_broker_closes_is_replaced(vhost: Vhost) -> None:
    batch = messages()[:5]
    async with consuming(vhost.url) as link:
        await trio.to_thread.run_sync(publish, vhost.url, batch)
        first = await take(link, len(batch))
        # An ack for a tag the broker never delivered: it closes the channel (406).
        link.ack_upto(first[0].generation, 10_000)
        with trio.fail_after(TIMEOUT_S):
            await link.wait_connected(generation_above=first[0].generation)
        assert "PRECONDITION_FAILED" in str(link.statistics().last_error)
        again = await take(link, len(batch))  # nothing was acked: all of it comes back
    assert [d.body for d in again] == [d.body for d in first]
    assert all(d.redelivered for d in again)
    await trio.to_thread.run_sync(as_pika_parses, vhost.url, len(batch))
