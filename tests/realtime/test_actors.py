"""Fault isolation of the actors: a crashing connection actor closes only its own
connection (1011), a crashing janitor is restarted by the supervisor, and channel
actors linger, then retire.

These tests serve :class:`~actors.realtime.Realtime` on a plain trio listener with a
broker fake (a :class:`MemoryBroker` that fails on purpose), since no real input makes
our own code crash.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import pytest
import trio

from actors.close_codes import CloseCode
from actors.hub import CHANNEL_LINGER_S, JANITOR_INTERVAL_S, Hub
from actors.realtime import Realtime
from api.auth.tokens import TokenService
from bridge.broker import HistoryResult
from bridge.broker_memory import MemoryBroker
from hub.frontdoor import read_head
from hub.supervisor import SupervisorStats, supervise
from tests.harness import JWT_SECRET, make_settings
from tests.realtime.conftest import Client

BOOM = "public.boom"


class FaultyBroker(MemoryBroker):
    """Fails ``history`` on :data:`BOOM` and the first ``unsubscribe``."""

    def __init__(self, hub: Hub) -> None:
        super().__init__(hub, history_size=10, history_ttl_s=60)
        self.unsubscribed: list[str] = []
        self.failed_unsubscribe = False

    async def history(self, channel: str, since: str | None) -> HistoryResult:
        if channel == BOOM:
            raise RuntimeError("history store exploded")
        return await super().history(channel, since)

    async def unsubscribe(self, channel: str) -> None:
        await super().unsubscribe(channel)
        if not self.failed_unsubscribe:
            self.failed_unsubscribe = True
            raise RuntimeError("unsubscribe exploded")
        self.unsubscribed.append(channel)


class RacingBroker(MemoryBroker):
    """Publishes while a ``history`` call is in flight, as a remote broker would see:
    one message that the history answer includes, one that comes after it."""

    async def history(self, channel: str, since: str | None) -> HistoryResult:
        if channel != "public.race" or since is None:
            return await super().history(channel, since)
        self.publish_nowait(channel, b'"data":{"n":"during-1"}')  # held, and in history
        await trio.lowlevel.checkpoint()
        result = self.history_nowait(channel, since)
        await trio.lowlevel.checkpoint()
        self.publish_nowait(channel, b'"data":{"n":"during-2"}')  # held, after history
        await trio.lowlevel.checkpoint()
        return result


@dataclass
class Served:
    port: int
    realtime: Realtime
    broker: MemoryBroker
    tokens: TokenService

    def token(self) -> str:
        user = SimpleNamespace(id=uuid.uuid4(), role="user")
        return self.tokens.issue_pair(user, "session-1").access_token  # type: ignore[arg-type]


@asynccontextmanager
async def serve_realtime(
    tmp_path: Path, broker_class: type[MemoryBroker] | None = None
) -> AsyncIterator[Served]:
    settings = make_settings(tmp_path)
    hub = Hub()
    broker = (
        FaultyBroker(hub)
        if broker_class is None
        else broker_class(hub, history_size=100, history_ttl_s=60)
    )
    hub.broker = broker
    tokens = TokenService(JWT_SECRET, 3600, 86400)
    realtime = Realtime(settings, hub, broker, tokens.decode_access)

    async def handler(stream: trio.SocketStream) -> None:
        head = await read_head(stream)
        if head is not None:
            await realtime.handle_websocket(stream, head)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        yield Served(port, realtime, broker, tokens)
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def client_of(served: Served) -> AsyncIterator[Client]:
    from trio_websocket import open_websocket_url

    url = f"ws://127.0.0.1:{served.port}/ws/notifications?token={served.token()}"
    async with open_websocket_url(url, message_queue_size=64) as ws:
        client = Client(ws)
        assert (await client.recv())["type"] == "welcome"
        yield client


async def test_a_crashing_connection_actor_closes_only_its_connection(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="hub.realtime")
    async with (
        serve_realtime(tmp_path) as served,
        client_of(served) as victim,
        client_of(served) as bystander,
    ):
        await bystander.subscribe("public.ok")
        await victim.send({"type": "subscribe", "channels": [BOOM]})
        assert await victim.close_code() == CloseCode.INTERNAL_ERROR
        await served.realtime.publish(["public.ok"], {"n": 1})
        frame = await bystander.recv()
        assert frame["channel"] == "public.ok" and frame["data"]["n"] == 1
        assert await bystander.request({"type": "ping"}, "pong") == {"type": "pong"}
        assert served.realtime.stats()["connections"] == 1
    assert "connection actor failed" in caplog.text
    assert "history store exploded" in caplog.text


async def test_janitor_retires_idle_channels_and_is_restarted_after_a_crash(
    autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    hub = Hub()
    broker = FaultyBroker(hub)
    hub.broker = broker
    name = f"janitor-{uuid.uuid4().hex[:6]}"
    async with trio.open_nursery() as nursery:
        await nursery.start(supervise, name, hub.run_janitor)
        await hub.join("public.first")
        await trio.sleep(CHANNEL_LINGER_S / 2)
        assert "public.first" in hub.channels  # still lingering
        await trio.sleep(CHANNEL_LINGER_S)
        assert "public.first" not in hub.channels  # retired (its unsubscribe crashed)
        assert SupervisorStats.restarts.get(name) == 1
        await hub.join("public.second")
        await trio.sleep(CHANNEL_LINGER_S + 2 * JANITOR_INTERVAL_S + 1)
        assert hub.channels == {}
        assert broker.unsubscribed == ["public.second"]
        nursery.cancel_scope.cancel()
    assert f"service {name} crashed" in caplog.text


async def test_joining_waits_for_a_retirement_in_progress(autojump_clock: trio.abc.Clock) -> None:
    hub = Hub()

    class SlowBroker(MemoryBroker):
        calls: list[str] = []

        async def subscribe(self, channel: str) -> None:
            self.calls.append(f"sub {channel}")
            await trio.sleep(1)

        async def unsubscribe(self, channel: str) -> None:
            self.calls.append(f"unsub {channel}")
            await trio.sleep(1)
            self.calls.append(f"unsub done {channel}")

    broker = SlowBroker(hub, history_size=1, history_ttl_s=60)
    hub.broker = broker
    first = await hub.join("public.x")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(hub._retire, "public.x")
        await trio.sleep(0.1)  # the retirement is waiting for the broker
        second = await hub.join("public.x")
    assert second is not first
    assert broker.calls == ["sub public.x", "unsub public.x", "unsub done public.x", "sub public.x"]


async def test_publications_during_a_history_fetch_are_neither_lost_nor_repeated(
    tmp_path: Path,
) -> None:
    async with serve_realtime(tmp_path, RacingBroker) as served:
        async with client_of(served) as first:
            await first.subscribe("public.race")
            await served.realtime.publish(["public.race"], {"n": "before"})
            since = (await first.recv())["offset"]
        await served.realtime.publish(["public.race"], {"n": "missed"})
        async with client_of(served) as again:
            await again.send(
                {"type": "subscribe", "channels": ["public.race"], "since": {"public.race": since}}
            )
            reply, before = await again.recv_until(lambda f: f["type"] == "subscribed")
            assert before == [] and reply["recovered"] == {"public.race": True}
            frames = [await again.recv() for _ in range(3)]
            assert [f["data"]["n"] for f in frames] == ["missed", "during-1", "during-2"]
            assert await again.request({"type": "ping"}, "pong") == {"type": "pong"}
