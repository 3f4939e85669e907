"""Write-combining for a batch of publications (``Realtime.fanout_batch``), over real
sockets.

The RabbitMQ consumer opens a batch around every hand-over of deliveries; small
channels then write each subscriber once per batch instead of once per message. These
tests check that this saves the writes, keeps every message once and in order, never
holds a publisher on a full backlog, and writes what it kept even when the batch ends
by an exception.
"""

from __future__ import annotations

import pytest
import trio

from actors.channel import BACKLOG_MAX_FRAMES, DEFER_MAX_FRAMES
from tests.harness import Account, RunningNode
from tests.realtime import rawws
from tests.realtime.test_sweep import read_notifications, subscribed

#: Seconds a whole test may take.
DEADLINE_S = 30


async def test_a_batch_writes_each_subscriber_once_in_order(
    hub_node: RunningNode, user: Account
) -> None:
    realtime = hub_node.node.realtime
    hub = realtime.hub
    channels = ("public.batch-a", "public.batch-b")
    each = 10
    with trio.fail_after(DEADLINE_S):
        clients = {
            channels[0]: [await subscribed(hub_node, user.access_token, channels[0]) for _ in "ab"],
            channels[1]: [await subscribed(hub_node, user.access_token, channels[1])],
        }
        writes_before, delivered_before = hub.fanout.writes, hub.delivered
        with realtime.fanout_batch():
            for seq in range(each):
                for channel in channels:
                    await realtime.publish([channel], {"seq": seq})
            # Kept for the end of the batch: nothing was written yet.
            assert hub.fanout.writes == writes_before
            assert [hub.channels[name].backlog for name in channels] == [each, each]
        # One write per subscriber carried all of its channel's messages.
        assert hub.fanout.writes - writes_before == 3
        assert hub.delivered - delivered_before == 3 * each
        assert all(hub.channels[name].backlog == 0 for name in channels)
        for channel, group in clients.items():
            for client in group:
                received = await read_notifications(client, channel, each)
                assert [seq for _, seq in received] == list(range(each))
                offsets = [int(offset.rsplit(":", 1)[1]) for offset, _ in received]
                assert offsets == sorted(offsets)
                await client.aclose()


async def test_a_long_batch_writes_early_and_never_holds_a_publisher(
    hub_node: RunningNode, user: Account
) -> None:
    realtime = hub_node.node.realtime
    hub = realtime.hub
    channel = "public.batch-long"
    total = 2 * BACKLOG_MAX_FRAMES  # the backlog limit would stop a publisher for good
    largest_backlog = 0
    received: list[tuple[str, int]] = []

    async def reader(client: rawws.RawClient) -> None:
        received.extend(await read_notifications(client, channel, total))

    with trio.fail_after(DEADLINE_S):
        client = await subscribed(hub_node, user.access_token, channel)
        writes_before = hub.fanout.writes
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader, client)
            with realtime.fanout_batch():
                for seq in range(total):
                    await realtime.publish([channel], {"seq": seq})
                    largest_backlog = max(largest_backlog, hub.channels[channel].backlog)
        await client.aclose()
    assert 0 < largest_backlog < DEFER_MAX_FRAMES
    assert hub.fanout.writes - writes_before == total // DEFER_MAX_FRAMES
    assert [seq for _, seq in received] == list(range(total))


async def test_a_batch_ended_by_an_exception_writes_what_it_kept(
    hub_node: RunningNode, user: Account
) -> None:
    realtime = hub_node.node.realtime
    channel = "public.batch-error"
    with trio.fail_after(DEADLINE_S):
        client = await subscribed(hub_node, user.access_token, channel)

        async def publish_then_fail() -> None:
            with realtime.fanout_batch():
                for seq in range(5):
                    await realtime.publish([channel], {"seq": seq})
                raise RuntimeError("the publisher failed after five messages")

        with pytest.raises(RuntimeError):
            await publish_then_fail()
        assert realtime.hub.channels[channel].backlog == 0
        received = await read_notifications(client, channel, 5)
        await client.aclose()
    assert [seq for _, seq in received] == list(range(5))
