"""REST and accounts in a cluster: what one node decides holds on the others at once.

Rate limits, sessions, revocations and caches are shared through Redis: a limit counted
on node A holds on node B, and a logout or an account deletion on A is refused on B
(REST 401, WebSocket closed with 4001) within a second. Each node here has its own
SQLite file, so B's storage poll of revocations can never see what A did: only the
broker's control channel can carry it. And while Redis is unreachable, publishing
answers 503 and a logout still works.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import trio

from actors.close_codes import CloseCode
from tests.cluster.conftest import run_cluster
from tests.harness import REDIS_URL, RunningNode, make_settings, run_node
from tests.realtime.conftest import connect

pytestmark = pytest.mark.redis

#: The issue's bound: a revocation made on one node holds on the others within this.
CROSS_NODE_S = 1.0
WRONG_PASSWORD = "Wr0ng-password"


async def refused_on(node: RunningNode, headers: dict[str, str]) -> str:
    """The 401 message ``node`` answers an admin-only request with ``headers``."""
    response = await node.client.post(
        "/api/v1/notifications", json={"channel": "admin", "data": {}}, headers=headers
    )
    assert response.status_code == 401, response.text
    message: str = response.json()["error"]["message"]
    return message


async def test_limit_logout_and_deletion_on_one_node_hold_on_the_other(
    tmp_path: Path, shared_redis_prefix: str
) -> None:
    async with run_cluster(
        tmp_path, REDIS_URL, count=2, prefix=shared_redis_prefix, rate_limit_login="4/minute"
    ) as (a, b):
        # Two sessions of one admin, both opened on A (two logins counted on A).
        account = await a.create_account(admin=True)
        first = dict(account.headers)
        await a.login(account)
        second = dict(account.headers)
        assert first != second

        # The login limit (4 a minute per IP) is one counter for both nodes.
        body = {"email": account.email, "password": WRONG_PASSWORD}
        statuses = [
            (await node.client.post("/api/v1/auth/login", json=body)).status_code
            for node in (b, a, b, a)
        ]
        assert statuses == [401, 401, 429, 429]

        # Both tokens work on B (shared JWT key; the admin route needs no storage).
        for headers in (first, second):
            response = await b.client.post(
                "/api/v1/notifications", json={"channel": "admin", "data": {}}, headers=headers
            )
            assert response.status_code == 202, response.text

        async with (
            connect(b, first["Authorization"].removeprefix("Bearer ")) as ws_first,
            connect(b, second["Authorization"].removeprefix("Bearer ")) as ws_second,
        ):
            await ws_first.subscribe("admin")
            await ws_second.subscribe("admin")

            # Logout on A: B closes that session's socket and refuses its token.
            assert (await a.client.post("/api/v1/auth/logout", headers=first)).status_code == 200
            assert await ws_first.close_code(CROSS_NODE_S) == CloseCode.UNAUTHORIZED
            assert await refused_on(b, first) == "Token has been revoked"
            # The other session lives on.
            response = await b.client.post(
                "/api/v1/notifications", json={"channel": "admin", "data": {}}, headers=second
            )
            assert response.status_code == 202, response.text

            # Account deleted on A: every token of the user is refused on B.
            assert (await a.client.delete("/api/v1/users/me", headers=second)).status_code == 200
            assert await ws_second.close_code(CROSS_NODE_S) == CloseCode.UNAUTHORIZED
            assert await refused_on(b, second) == "Token has been revoked"


def dead_redis_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"redis://127.0.0.1:{port}/0"


async def test_publish_is_503_while_redis_is_down_and_logout_still_works(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Nothing listens there: do not wait for it at start (the node starts not ready).
    monkeypatch.setattr("bridge.broker_redis.STARTUP_WAIT_S", 0.0)
    settings = make_settings(tmp_path, redis_url=dead_redis_url())
    async with run_node(settings, redis_prefix="unused:") as node:
        admin = await node.create_account(admin=True)
        response = await node.client.post(
            "/api/v1/notifications",
            json={"channels": ["global", "admin"], "data": {"title": "t"}, "id": "m-1"},
            headers=admin.headers,
        )
        assert response.status_code == 503, response.text
        assert response.headers["Retry-After"] == "1"
        assert response.json()["error"]["code"] == "SERVICE_UNAVAILABLE"

        ready = await node.client.get("/ready")
        assert ready.status_code == 503
        assert "redis" in ready.json()["error"]["details"]["down"]

        # The logout cannot be announced to other nodes, but it holds here.
        async with connect(node, admin.access_token) as ws:
            logout = await node.client.post("/api/v1/auth/logout", headers=admin.headers)
            assert logout.status_code == 200, logout.text
            with trio.fail_after(CROSS_NODE_S):
                assert await ws.close_code() == CloseCode.UNAUTHORIZED
        assert await refused_on(node, admin.headers) == "Token has been revoked"
