"""Fan-out under stress over real sockets: misbehaving and slow clients beside good ones,
concurrent subscribe/unsubscribe, recovery with ``since``, graceful shutdown."""

from __future__ import annotations

import random
import statistics
from typing import Any

import pytest
import trio

from actors.close_codes import CloseCode
from tests.harness import Account, RunningNode
from tests.realtime import rawws
from tests.realtime.conftest import Client, connect, publish

#: Largest delivery delay a well-behaved client may see while others misbehave.
GOOD_CLIENT_MAX_LATENCY_S = 1.0


@pytest.fixture
def node_overrides(request: pytest.FixtureRequest) -> dict[str, Any]:
    return dict(getattr(request, "param", {}))


def port_of(running: RunningNode) -> int:
    return int(running.url.rsplit(":", 1)[1])


async def collect(
    client: Client, channel: str, count: int, into: list[tuple[dict[str, Any], float]]
) -> None:
    """Receive ``count`` notifications of ``channel``, recording when each arrived."""
    while len(into) < count:
        frame = await client.recv(timeout=30)
        if frame["type"] == "notification" and frame["channel"] == channel:
            into.append((frame, trio.current_time()))


def assert_in_order(received: list[tuple[dict[str, Any], float]], count: int) -> list[float]:
    """Every seq 0..count-1 once, in order; returns the delivery latencies."""
    assert [frame["data"]["seq"] for frame, _ in received] == list(range(count))
    return [at - frame["data"]["sent"] for frame, at in received]


async def test_misbehaving_clients_do_not_affect_a_good_one(
    hub_node: RunningNode, user: Account
) -> None:
    realtime = hub_node.node.realtime
    port = port_of(hub_node)
    count = 300
    received: list[tuple[dict[str, Any], float]] = []
    codes: dict[str, int] = {}

    async def garbage() -> None:
        async with connect(hub_node, user.access_token) as bad:
            await bad.subscribe("public.mix")
            for _ in range(11):
                await bad.ws.send_message("{{{{")
            codes["garbage"] = await bad.close_code() or 0

    async def oversized() -> None:
        async with connect(hub_node, user.access_token) as bad:
            await bad.subscribe("public.mix")
            await bad.ws.send_message("x" * (hub_node.settings.ws_max_frame_bytes + 1))
            codes["oversized"] = await bad.close_code() or 0

    async def binary() -> None:
        async with connect(hub_node, user.access_token) as bad:
            await bad.ws.send_message(b"\x00" * 10)
            codes["binary"] = await bad.close_code() or 0

    async def flood_without_reading() -> None:
        raw = await rawws.raw_connect(port, user.access_token, rcvbuf=4096)
        await raw.send_json({"type": "subscribe", "channels": ["public.mix"]})
        pings = rawws.client_frame(rawws.OP_TEXT, b'{"type":"ping","id":"flood"}') * 1000
        with trio.move_on_after(30):
            try:  # replies pile up unread until the server gives up on this client
                while True:
                    await raw.send(pings)
            except OSError:
                pass
        await raw.aclose()

    async with connect(hub_node, user.access_token) as good:
        await good.subscribe("public.mix")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(collect, good, "public.mix", count, received)
            for misbehave in (garbage, oversized, binary, flood_without_reading):
                nursery.start_soon(misbehave)
            for seq in range(count):
                await realtime.publish(["public.mix"], {"seq": seq, "sent": trio.current_time()})
                await trio.sleep(0.002)
        assert await good.request({"type": "ping"}, "pong") == {"type": "pong"}
    latencies = assert_in_order(received, count)
    assert max(latencies) < GOOD_CLIENT_MAX_LATENCY_S, max(latencies)
    assert codes == {
        "garbage": CloseCode.POLICY_VIOLATION,
        "oversized": CloseCode.MESSAGE_TOO_BIG,
        "binary": CloseCode.UNSUPPORTED_DATA,
    }
    assert realtime.stats()["closed"].get(CloseCode.SLOW_CONSUMER) == 1  # the flooder


@pytest.mark.parametrize("node_overrides", [{"ws_send_queue_bytes": 4096}], indirect=True)
async def test_slow_reader_is_closed_with_4009_while_others_keep_their_latency(
    hub_node: RunningNode, user: Account
) -> None:
    realtime = hub_node.node.realtime
    slow_user = await hub_node.create_account()
    slow = await rawws.raw_connect(port_of(hub_node), slow_user.access_token, rcvbuf=4096)
    await slow.send_json({"type": "subscribe", "channels": ["public.load"]})
    await slow.json_until("subscribed")  # from here on it never reads

    received: list[tuple[dict[str, Any], float]] = []
    pad = "x" * 1000
    async with connect(hub_node, user.access_token) as good:
        await good.subscribe("public.load")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(collect, good, "public.load", 10**9, received)  # until cancelled
            published = 0
            with trio.fail_after(60):
                while CloseCode.SLOW_CONSUMER not in realtime.stats()["closing"]:
                    await realtime.publish(
                        ["public.load"], {"seq": published, "sent": trio.current_time(), "pad": pad}
                    )
                    published += 1
                    await trio.sleep(0.001)
                for _ in range(50):  # the others keep getting messages afterwards
                    await realtime.publish(
                        ["public.load"], {"seq": published, "sent": trio.current_time(), "pad": pad}
                    )
                    published += 1
                    await trio.sleep(0.001)
            nursery.cancel_scope.cancel()  # stop the background reader, read the rest here
        await collect(good, "public.load", published, received)
    latencies = assert_in_order(received, published)
    assert max(latencies) < GOOD_CLIENT_MAX_LATENCY_S, max(latencies)
    assert statistics.median(latencies) < 0.1

    # The slow client now reads what reached it: whole notifications, a prefix of the
    # stream with no gap, then the close frame with 4009.
    seqs = []
    with trio.fail_after(10):
        while True:
            frame = await slow.frame()
            if frame.opcode == rawws.OP_CLOSE:
                assert frame.close_code == CloseCode.SLOW_CONSUMER
                break
            seqs.append(frame.json()["data"]["seq"])
    assert seqs == list(range(len(seqs))) and len(seqs) < published
    stats = realtime.hub.statistics()
    assert stats["dropped"]["slow_consumer"] > 0  # what was queued for it was let go
    await slow.aclose()
    with trio.fail_after(10):
        await realtime.hub.wait_empty()


async def test_200_connections_subscribe_and_unsubscribe_concurrently(
    hub_node: RunningNode, admin: Account
) -> None:
    channels = [f"public.c{i}" for i in range(10)]
    accounts = [await hub_node.create_account() for _ in range(10)]
    finals: dict[int, set[str]] = {}
    inboxes: dict[int, list[str]] = {}
    all_subscribed = trio.Event()
    all_received = trio.Event()
    done = trio.Event()
    connected = received = 0

    async def one(index: int) -> None:
        nonlocal connected, received
        rng = random.Random(index)
        mine: set[str] = set()
        async with connect(hub_node, accounts[index % 10].access_token) as client:
            for _ in range(8):
                join = rng.sample(channels, 3)
                reply = await client.subscribe(*join)
                assert reply["channels"] == join
                mine |= set(join)
                leave = rng.sample(sorted(mine), 2)
                reply = await client.request(
                    {"type": "unsubscribe", "channels": leave}, "unsubscribed"
                )
                mine -= set(leave)
            finals[index] = mine
            connected += 1
            if connected == 200:
                all_subscribed.set()
            inbox: list[str] = []
            inboxes[index] = inbox
            while len(inbox) < len(mine):
                frame = await client.recv(timeout=30)
                if frame["type"] == "notification":
                    inbox.append(frame["channel"])
            received += 1
            if received == 200:
                all_received.set()
            await done.wait()
            # every publish has completed: nothing beyond `mine` may be waiting
            await client.send({"type": "ping"})
            assert (await client.recv())["type"] == "pong"

    async with trio.open_nursery() as nursery:
        for index in range(200):
            nursery.start_soon(one, index)
        with trio.fail_after(60):
            await all_subscribed.wait()
        stats = hub_node.node.realtime.stats()
        assert stats["connections"] == 200
        for channel in channels:
            await publish(hub_node, admin, channel=channel, data={"c": channel})
        with trio.fail_after(30):
            await all_received.wait()
        done.set()
    for index, mine in finals.items():
        assert sorted(inboxes[index]) == sorted(mine), index
    hub = hub_node.node.realtime.hub
    with trio.fail_after(10):
        await hub.wait_empty()
    assert sum(len(actor.subscribers) for actor in hub.channels.values()) == 0


@pytest.mark.parametrize("node_overrides", [{"history_size": 10_000}], indirect=True)
async def test_reconnect_with_since_has_no_gaps_or_duplicates(
    hub_node: RunningNode, user: Account
) -> None:
    realtime = hub_node.node.realtime
    channel = "public.recover"
    seen: list[int] = []
    stop = trio.Event()
    published = 0
    milestone: tuple[int, trio.Event] | None = None

    async def publisher() -> None:
        nonlocal published
        while not stop.is_set():
            await realtime.publish([channel], {"seq": published})
            published += 1
            if milestone is not None and published >= milestone[0]:
                milestone[1].set()
            await trio.sleep(0.0005)

    async with trio.open_nursery() as nursery:
        since: str | None = None
        nursery.start_soon(publisher)
        for _round in range(8):
            async with connect(hub_node, user.access_token) as client:
                extra = {"since": {channel: since}} if since else {}
                reply = await client.subscribe(channel, **extra)
                if since:
                    assert reply["recovered"] == {channel: True}
                else:
                    since = reply["offsets"][channel]
                for _ in range(20):
                    frame = await client.recv()
                    assert frame["type"] == "notification"
                    seen.append(frame["data"]["seq"])
                    since = frame["offset"]
            # disconnected: wait until 30 more messages were published meanwhile
            milestone = (published + 30, trio.Event())
            await milestone[1].wait()
        stop.set()
    assert seen == list(range(seen[0], seen[0] + len(seen)))


async def test_recovery_outcomes(hub_node: RunningNode, user: Account, admin: Account) -> None:
    channel = "public.outcomes"
    async with connect(hub_node, user.access_token) as client:
        reply = await client.subscribe(channel)
    position = reply["offsets"][channel]  # nothing received yet: resume from here
    first = await publish(hub_node, admin, channel=channel, data={"n": 1})
    await publish(hub_node, admin, channel=channel, data={"n": 2})
    async with connect(hub_node, user.access_token) as client:
        reply = await client.subscribe(channel, since={channel: position})
        assert reply["recovered"] == {channel: True}
        replay = [await client.recv(), await client.recv()]
        assert [f["data"]["n"] for f in replay] == [1, 2]
        assert replay[0]["offset"] == first["offsets"][channel]
        live = await publish(hub_node, admin, channel=channel, data={"n": 3})
        frame = await client.recv()
        assert frame["offset"] == live["offsets"][channel] and frame["data"]["n"] == 3
    epoch = position.rsplit(":", 1)[0]
    async with connect(hub_node, user.access_token) as client:
        reply = await client.subscribe(
            channel, "public.other", since={channel: "another-epoch:1", "public.other": "x"}
        )
        assert reply["recovered"] == {channel: False, "public.other": False}
        reply = await client.subscribe("public.third", since={"public.third": f"{epoch}:0"})
        assert reply["recovered"] == {"public.third": False}  # epochs are per channel
        assert await client.request({"type": "ping"}, "pong") == {"type": "pong"}  # no replay


@pytest.mark.parametrize("node_overrides", [{"history_size": 3}], indirect=True)
async def test_since_older_than_history_is_not_recovered(
    hub_node: RunningNode, user: Account, admin: Account
) -> None:
    channel = "public.short"
    offsets = [
        (await publish(hub_node, admin, channel=channel, data={"n": n}))["offsets"][channel]
        for n in range(5)
    ]
    async with connect(hub_node, user.access_token) as client:
        reply = await client.subscribe(channel, since={channel: offsets[0]})
        assert reply["recovered"] == {channel: False}
        assert await client.request({"type": "ping"}, "pong") == {"type": "pong"}
        reply = await client.request({"type": "unsubscribe", "channels": [channel]}, "unsubscribed")
        reply = await client.subscribe(channel, since={channel: offsets[1]})
        assert reply["recovered"] == {channel: True}
        assert [(await client.recv())["data"]["n"] for _ in range(3)] == [2, 3, 4]


async def test_graceful_shutdown_closes_websockets_with_1001(
    hub_node: RunningNode, user: Account
) -> None:
    async with (
        connect(hub_node, user.access_token) as one,
        connect(hub_node, user.access_token) as two,
    ):
        await one.subscribe("global")
        hub_node.shutdown.set()
        with trio.fail_after(5):
            assert await one.close_code() == CloseCode.GOING_AWAY
            assert await two.close_code() == CloseCode.GOING_AWAY
