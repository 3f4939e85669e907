"""``GET /health`` and ``GET /ready`` (SPEC §1): readiness names the dependency that is down.

Outages are real: Redis and RabbitMQ URLs point at a port nobody listens on, and
PostgreSQL is reached through a proxy on a private port that the test cuts and restores.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import trio

from tests.harness import PG_HOST, PG_PORT, RunningNode, make_settings, run_node
from tests.ops.scrape import wait_ready_status
from tests.ops.tcp_proxy import TcpProxy
from tests.services import require_service


def closed_port() -> int:
    """A local TCP port nobody listens on (bound and released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_health_and_ready_when_everything_is_up(hub_node: RunningNode) -> None:
    health = await hub_node.client.get("/health")
    assert health.status_code == 200
    assert health.json()["data"] == {"status": "ok", "node_id": hub_node.settings.hub_node_id}
    ready = await hub_node.client.get("/ready")
    assert ready.status_code == 200
    assert ready.json()["data"] == {"status": "ready", "checks": {"storage": True}}


@pytest.mark.parametrize(
    ("setting", "url", "name"),
    [
        ("redis_url", "redis://127.0.0.1:{port}/0", "redis"),
        ("amqp_url", "amqp://guest:guest@127.0.0.1:{port}/%2F", "rabbitmq"),
    ],
)
async def test_ready_names_the_service_that_is_down(
    tmp_path: Path, setting: str, url: str, name: str
) -> None:
    overrides = {setting: url.format(port=closed_port())}
    async with run_node(make_settings(tmp_path / "data", **overrides)) as running:
        response = await running.client.get("/ready")
        assert response.status_code == 503
        error = response.json()["error"]
        assert error["code"] == "SERVICE_UNAVAILABLE"
        assert error["details"]["down"] == [name]
        assert error["details"]["checks"]["storage"] is True
        assert name in error["message"]
        health = await running.client.get("/health")
        assert health.status_code == 200, "a node whose dependency is down is still alive"


@pytest.mark.postgres
async def test_ready_names_storage_while_postgresql_is_down_and_recovers(
    tmp_path: Path, pg_schema: str
) -> None:
    require_service("PostgreSQL", PG_HOST, PG_PORT)
    proxy = TcpProxy(PG_HOST, PG_PORT)
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy.run)
        url = f"postgresql://postgres@127.0.0.1:{proxy.port}/test"
        settings = make_settings(tmp_path / "data", database_url=url)
        async with run_node(settings, schema=pg_schema) as running:
            await wait_ready_status(running, 200)

            await proxy.cut()  # PostgreSQL "goes down": connections reset, new ones refused
            body = await wait_ready_status(running, 503)
            assert body["error"]["details"]["down"] == ["storage"]
            assert (await running.client.get("/health")).status_code == 200

            await nursery.start(proxy.run)  # back on the same address: no restart needed
            body = await wait_ready_status(running, 200)
            assert body["data"]["checks"] == {"storage": True}
        await proxy.cut()
