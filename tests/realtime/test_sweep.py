"""Fan-out sweeps on channels too large for inline writes, over real sockets.

A channel with more than :data:`~actors.channel.INLINE_MAX_SUBSCRIBERS` subscribers is
written to by a sweep task that coalesces every frame a socket has not had into one
write. These tests check what users rely on: every subscriber gets every message once,
in order, while others join, leave and recover; publishers are held back while the
backlog is full; a shutdown first writes what was accepted.
"""

from __future__ import annotations

import json
from typing import Any

import trio

from actors.channel import BACKLOG_MAX_FRAMES, INLINE_MAX_SUBSCRIBERS, SWEEP_CLOCK_EVERY
from actors.close_codes import CloseCode
from tests.harness import Account, RunningNode
from tests.realtime import rawws
from tests.realtime.conftest import connect

#: Subscribers of the swept channel: enough to leave the inline path and for sweeps to
#: yield (and let publishers in) several times per pass.
CROWD = max(INLINE_MAX_SUBSCRIBERS, SWEEP_CLOCK_EVERY) * 4 + 1
#: Seconds a whole test may take.
DEADLINE_S = 60


def port_of(running: RunningNode) -> int:
    return int(running.url.rsplit(":", 1)[1])


async def subscribed(running: RunningNode, token: str, channel: str) -> rawws.RawClient:
    """A raw WebSocket subscribed to ``channel`` (welcome and subscribed read)."""
    client = await rawws.raw_connect(port_of(running), token)
    await client.json_until("welcome")
    await client.send_json({"type": "subscribe", "id": 1, "channels": [channel]})
    await client.json_until("subscribed")
    return client


async def read_notifications(
    client: rawws.RawClient, channel: str, count: int
) -> list[tuple[str, int]]:
    """``(offset, seq)`` of the next ``count`` notifications of ``channel``."""
    received: list[tuple[str, int]] = []
    while len(received) < count:
        frame = await client.frame()
        assert frame.opcode == rawws.OP_TEXT, frame
        value = frame.json()
        if value["type"] == "notification" and value["channel"] == channel:
            received.append((value["offset"], value["data"]["seq"]))
    return received


async def test_a_large_channel_gets_every_message_once_in_order_under_backpressure(
    hub_node: RunningNode, user: Account
) -> None:
    realtime = hub_node.node.realtime
    hub = realtime.hub
    channel = "public.sweep"
    publishers = 64
    each = BACKLOG_MAX_FRAMES // 8
    total = publishers * each
    results: dict[int, list[tuple[str, int]]] = {}
    largest_backlog = 0
    with trio.fail_after(DEADLINE_S):
        crowd = [await subscribed(hub_node, user.access_token, channel) for _ in range(CROWD)]
        delivered_before = hub.delivered

        async def reader(index: int, client: rawws.RawClient) -> None:
            results[index] = await read_notifications(client, channel, total)

        async def publisher(first: int) -> None:
            nonlocal largest_backlog
            for seq in range(first, first + each):
                await realtime.publish([channel], {"seq": seq})
                largest_backlog = max(largest_backlog, hub.channels[channel].backlog)

        async with trio.open_nursery() as nursery:
            for index, client in enumerate(crowd):
                nursery.start_soon(reader, index, client)
            # Many concurrent publishers outrun the sweeps: only the backlog limit
            # holds them back.
            async with trio.open_nursery() as publishing:
                for first in range(0, total, each):
                    publishing.start_soon(publisher, first)
        for client in crowd:
            await client.aclose()
    assert len(results) == CROWD
    first = results[0]
    assert sorted(seq for _, seq in first) == list(range(total))  # each message once
    assert all(received == first for received in results.values())  # one order for all
    offsets = [int(offset.rsplit(":", 1)[1]) for offset, _ in first]
    assert offsets == sorted(offsets)  # the broker's order
    assert hub.delivered - delivered_before == CROWD * total
    # Frames were coalesced, and the publishers were held at the limit.
    assert BACKLOG_MAX_FRAMES // 2 < largest_backlog <= BACKLOG_MAX_FRAMES


async def test_joining_leaving_and_recovering_during_sweeps_lose_nothing(
    hub_node: RunningNode, user: Account
) -> None:
    realtime = hub_node.node.realtime
    channel = "public.sweep-churn"
    stop = trio.Event()
    published = 0
    milestone: tuple[int, trio.Event] | None = None
    seen: list[int] = []

    async def publisher() -> None:
        nonlocal published
        while not stop.is_set():
            await realtime.publish([channel], {"seq": published})
            published += 1
            if milestone is not None and published >= milestone[0]:
                milestone[1].set()
            if published % 4 == 0:
                await trio.sleep(0.02)  # bursts coalesce; the pace stays within history

    async def drain_forever(client: rawws.RawClient) -> None:
        while await client.sock.recv(65536):
            pass

    with trio.fail_after(DEADLINE_S):
        crowd = [await subscribed(hub_node, user.access_token, channel) for _ in range(CROWD)]
        async with trio.open_nursery() as nursery:
            for client in crowd:
                nursery.start_soon(drain_forever, client)
            nursery.start_soon(publisher)
            since: str | None = None
            for _round in range(6):
                async with connect(hub_node, user.access_token) as client:
                    extra = {"since": {channel: since}} if since else {}
                    reply = await client.subscribe(channel, **extra)
                    if since:
                        assert reply["recovered"] == {channel: True}, (since, published, reply)
                    else:
                        since = reply["offsets"][channel]
                    for _ in range(40):
                        frame = await client.recv()
                        assert frame["type"] == "notification"
                        seen.append(frame["data"]["seq"])
                        since = frame["offset"]
                milestone = (published + 20, trio.Event())
                await milestone[1].wait()
            stop.set()
            nursery.cancel_scope.cancel()
        for client in crowd:
            await client.aclose()
    assert seen == list(range(seen[0], seen[0] + len(seen)))


async def test_a_drain_writes_the_backlog_before_closing_with_1001(
    hub_node: RunningNode, user: Account
) -> None:
    realtime = hub_node.node.realtime
    channel = "public.sweep-drain"
    total = 50
    received: dict[int, list[int]] = {}

    async def read_until_closed(index: int, client: rawws.RawClient) -> None:
        seqs = received[index] = []
        while True:
            frame = await client.frame()
            if frame.opcode == rawws.OP_CLOSE:
                assert frame.close_code == CloseCode.GOING_AWAY
                break
            value = frame.json()
            if value["type"] == "notification":
                seqs.append(value["data"]["seq"])
        await client.aclose()

    with trio.fail_after(DEADLINE_S):
        crowd = [await subscribed(hub_node, user.access_token, channel) for _ in range(CROWD)]
        for seq in range(total):  # no checkpoint in between: all of it waits in the backlog
            realtime.hub.handle_publication(channel, _publication(channel, seq))
        assert realtime.hub.channels[channel].backlog == total
        async with trio.open_nursery() as nursery:
            nursery.start_soon(realtime.drain)
            for index, client in enumerate(crowd):
                nursery.start_soon(read_until_closed, index, client)
    assert len(received) == CROWD
    assert all(seqs == list(range(total)) for seqs in received.values())


def _publication(channel: str, seq: int) -> Any:
    """A publication as the broker hands it to the hub (offsets as the memory broker
    numbers them), without going through ``publish`` (which would checkpoint)."""
    from bridge.broker import Publication

    body = json.dumps({"data": {"seq": seq}})[1:-1].encode()
    return Publication(offset=f"drain:{seq + 1}", payload=body)
