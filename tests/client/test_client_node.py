"""HubClient against a real node (``tests.harness``): SQLite storage, in-memory broker,
real sockets. Server-side disconnects are real too: a slow-consumer close (4009), a node
restart (1001, then refused connections, then a new history epoch) and a logout (4001).
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from hub.client import (
    HubAuthError,
    HubClient,
    Notification,
    RecoveryFailed,
    Tokens,
    login,
    open_hub_client,
)
from tests.harness import PASSWORD, WAIT_S, RunningNode, bearer, make_settings, run_node

TIMEOUT_S = 30
FAST: dict[str, Any] = {"backoff_base_s": 0.02, "backoff_cap_s": 0.2, "rng": random.Random(3)}


def ws_url(http_url: str) -> str:
    return "ws" + http_url.removeprefix("http")


async def publish(node_url: str, admin_token: str, channel: str, data: dict[str, Any]) -> str:
    async with httpx.AsyncClient(base_url=node_url, timeout=WAIT_S) as http:
        response = await http.post(
            "/api/v1/notifications",
            json={"channel": channel, "data": data},
            headers=bearer(admin_token),
        )
    assert response.status_code == 202, response.text
    return str(response.json()["data"]["offsets"][channel])


class Publisher:
    """Publishes over one keep-alive HTTP connection as an admin."""

    def __init__(self, http: httpx.AsyncClient, token: str) -> None:
        self.http = http
        self.token = token

    async def __call__(self, channel: str, data: dict[str, Any]) -> str:
        response = await self.http.post(
            "/api/v1/notifications",
            json={"channel": channel, "data": data},
            headers=bearer(self.token),
        )
        assert response.status_code == 202, response.text
        return str(response.json()["data"]["offsets"][channel])


async def take(client: HubClient, count: int) -> list[Notification]:
    notes: list[Notification] = []
    async for note in client:
        notes.append(note)
        if len(notes) == count:
            break
    return notes


def assert_continuous(notes: list[Notification], first_n: int = 0) -> None:
    assert [n.data["n"] for n in notes] == list(range(first_n, first_n + len(notes)))
    seqs = [int(n.offset.rsplit(":", 1)[1]) for n in notes]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))


@asynccontextmanager
async def node(tmp_path: Path, **overrides: Any) -> AsyncIterator[RunningNode]:
    settings = make_settings(tmp_path / "data", history_size=1000, **overrides)
    async with run_node(settings) as running:
        yield running


async def test_subscribe_and_receive_from_a_real_node(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with node(tmp_path) as hub:
            admin = await hub.create_account(admin=True)
            user = await hub.create_account()
            tokens = await login(hub.url, user.email, PASSWORD)
            publish = Publisher(hub.client, admin.access_token)
            async with open_hub_client(
                ws_url(hub.url),
                token_provider=tokens.get_access_token,
                channels=["global", f"user.{user.user_id}"],
                **FAST,
            ) as client:
                result = await client.subscribe(["admin", "public.news"])
                assert result.forbidden == ("admin",)
                assert result.subscribed == ("public.news",)
                offsets = [await publish("public.news", {"n": i}) for i in range(3)]
                await publish(f"user.{user.user_id}", {"n": "private"})
                notes = await take(client, 4)
                assert [n.offset for n in notes[:3]] == offsets
                assert notes[3].channel == f"user.{user.user_id}"
                assert notes[0].data["n"] == 0 and "id" in notes[0].data
                assert client.last_offsets["public.news"] == offsets[-1]
                await client.unsubscribe(["public.news"])
                await publish("public.news", {"n": 99})
                await publish("global", {"n": 100})
                (note,) = await take(client, 1)
                assert note.channel == "global"


async def test_slow_consumer_close_is_recovered_without_gaps_or_duplicates(
    tmp_path: Path,
) -> None:
    # A tiny send queue and a client that does not read: the node closes it with 4009.
    with trio.fail_after(TIMEOUT_S):
        async with node(tmp_path, ws_send_queue_bytes=4096) as hub:
            admin = await hub.create_account(admin=True)
            publish = Publisher(hub.client, admin.access_token)
            async with open_hub_client(
                ws_url(hub.url),
                token=admin.access_token,
                channels=["public.firehose"],
                buffer_size=1,
                **FAST,
            ) as client:
                pad = "x" * 40_000
                count = 150  # ~6 MB: more than the socket buffers hold
                for i in range(count):
                    await publish("public.firehose", {"n": i, "pad": pad})
                notes = await take(client, count)
                assert_continuous(notes)
                stats = client.statistics()
                assert stats.last_close_code == 4009
                assert stats.reconnects >= 1
                assert stats.recovery_failures == 0
                # And it keeps working live after the recovery.
                await publish("public.firehose", {"n": count})
                (note,) = await take(client, 1)
                assert note.data["n"] == count


async def test_node_restart_reconnects_and_reports_lost_history(tmp_path: Path) -> None:
    """The node goes away (1001), refuses connections for a while, and comes back on the
    same port with an empty in-memory history: the client reconnects by itself and says
    ``recovered: false``; what is published afterwards arrives."""
    from hub.node import open_node, serve_node

    settings = make_settings(tmp_path / "data", history_size=1000)
    failures: list[RecoveryFailed] = []

    async def serve_once(port: int, done: trio.Event, *, task_status: trio.TaskStatus[Any]) -> None:
        try:
            async with open_node(settings) as running:
                shutdown = trio.Event()
                async with trio.open_nursery() as nursery:
                    bound = await nursery.start(
                        partial(serve_node, running, host="127.0.0.1", port=port, shutdown=shutdown)
                    )
                    task_status.started((running, bound[0][1], shutdown))
        finally:
            done.set()

    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            first_done, second_done = trio.Event(), trio.Event()
            first, port, stop_first = await nursery.start(serve_once, 0, first_done)
            url = f"http://127.0.0.1:{port}"
            async with httpx.AsyncClient(base_url=url, timeout=WAIT_S) as http:
                admin = await RunningNode(first, url, http, stop_first).create_account(admin=True)
            tokens = await login(url, admin.email, PASSWORD)
            async with open_hub_client(
                ws_url(url),
                token_provider=tokens.get_access_token,
                channels=["global"],
                on_recovery_failed=failures.append,
                **FAST,
            ) as client:
                await publish(url, tokens.access_token, "global", {"n": 0})
                (before,) = await take(client, 1)
                stop_first.set()  # graceful stop: WebSockets closed with 1001
                await first_done.wait()
                await client.wait_until(lambda s: s.last_close_code == 1001)
                _, _, stop_second = await nursery.start(serve_once, port, second_done)
                await client.wait_until(lambda s: s.reconnects == 1 and s.connected)
                await publish(url, tokens.access_token, "global", {"n": 1})
                (after,) = await take(client, 1)
                assert after.data["n"] == 1
                assert after.offset.split(":")[0] != before.offset.split(":")[0]  # new epoch
                assert failures == [RecoveryFailed("global", before.offset)]
                stop_second.set()


async def test_in_band_token_refresh_keeps_the_connection(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with node(tmp_path) as hub:
            admin = await hub.create_account(admin=True)
            tokens = await login(hub.url, admin.email, PASSWORD)
            first = tokens.access_token

            async def provider() -> str:  # "expiring" from the start: refreshes at once
                return await tokens.get_access_token(min_ttl_s=3599)

            async with open_hub_client(
                ws_url(hub.url),
                token=first,
                token_provider=provider,
                channels=["global"],
                token_refresh_margin_s=3598,
                **FAST,
            ) as client:
                await client.wait_until(lambda s: s.token_refreshes >= 1)
                await publish(hub.url, tokens.access_token, "global", {"n": 1})
                await take(client, 1)  # arrives after `refreshed` on the same connection
                stats = client.statistics()
                assert stats.token_refreshes >= 1
                assert stats.reconnects == 0
            # The old access token's session was rotated, not revoked: still usable.
            me = await hub.client.get("/api/v1/users/me", headers=bearer(tokens.access_token))
            assert me.status_code == 200


async def test_logout_closes_4001_and_the_provider_logs_in_again(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with node(tmp_path) as hub:
            admin = await hub.create_account(admin=True)
            sessions: list[Tokens] = [await login(hub.url, admin.email, PASSWORD)]

            async def provider() -> str:
                sessions.append(await login(hub.url, admin.email, PASSWORD))
                return sessions[-1].access_token

            async with open_hub_client(
                ws_url(hub.url),
                token=sessions[0].access_token,
                token_provider=provider,
                channels=["global"],
                **FAST,
            ) as client:
                await publish(hub.url, sessions[0].access_token, "global", {"n": 0})
                await take(client, 1)
                logout = await hub.client.post(
                    "/api/v1/auth/logout", headers=bearer(sessions[0].access_token)
                )
                assert logout.status_code == 200
                await client.wait_until(lambda s: s.reconnects >= 1 and s.connected)
                await publish(hub.url, sessions[-1].access_token, "global", {"n": 1})
                (note,) = await take(client, 1)
                assert note.data["n"] == 1
                assert client.statistics().last_close_code == 4001
                assert len(sessions) == 2


async def test_revoked_token_without_provider_is_terminal(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with node(tmp_path) as hub:
            user = await hub.create_account()
            await hub.client.post("/api/v1/auth/logout", headers=user.headers)
            with pytest.raises(HubAuthError) as caught:
                async with open_hub_client(ws_url(hub.url), token=user.access_token, **FAST):
                    pass  # pragma: no cover
            assert caught.value.code == 4001


async def test_login_errors_are_typed(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with node(tmp_path) as hub:
            user = await hub.create_account(login=False)
            with pytest.raises(HubAuthError):
                await login(hub.url, user.email, "Wrong-passw0rd")
            tokens = await login(hub.url + "/api/v1", user.email, PASSWORD)
            old_refresh = tokens.refresh_token
            await tokens.refresh()
            assert tokens.refresh_token != old_refresh
