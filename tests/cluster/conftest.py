"""Fixtures for the cluster tests: several real nodes in one trio loop sharing one Redis.

``shared_redis_prefix`` isolates a test on the machine's shared Redis (127.0.0.1:6379)
with a key prefix of its own and deletes its keys afterwards. ``own_redis`` starts a
private ``redis-server`` for tests that kill or restart Redis.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.cluster.redis_server import RedisServer, redis_server_binary
from tests.harness import REDIS_HOST, REDIS_PORT, REDIS_URL, RunningNode, make_settings, run_node
from tests.services import in_ci, require_service

#: Node settings of every cluster test (each node runs on its own SQLite file: storage
#: is not on the fan-out path): history large enough for the streams the tests send.
CLUSTER_OVERRIDES: dict[str, Any] = {"history_size": 2000, "history_ttl": 600}


# -- Redis ------------------------------------------------------------------------------
@pytest.fixture
def shared_redis_prefix() -> Iterator[str]:
    """A key prefix of this test's own on the shared Redis; every key under it is
    deleted afterwards (and checked gone)."""
    require_service("Redis", REDIS_HOST, REDIS_PORT)
    prefix = f"test-cluster-{secrets.token_hex(4)}:"
    yield prefix
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    try:
        keys = list(client.scan_iter(f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
        assert not list(client.scan_iter(f"{prefix}*", count=1000))
    finally:
        client.close()


@pytest.fixture
async def own_redis(tmp_path: Path) -> AsyncIterator[tuple[RedisServer, trio.Nursery]]:
    """A private redis-server on a free port (and the nursery that reads its log)."""
    if redis_server_binary() is None:
        if in_ci():
            pytest.fail("redis-server is not installed; CI=true, so this is a failure")
        pytest.skip("redis-server is not installed")
    server = RedisServer(tmp_path / "redis")
    async with trio.open_nursery() as nursery:
        await server.start(nursery)
        try:
            yield server, nursery
        finally:
            await server.kill()
            nursery.cancel_scope.cancel()


# -- nodes ------------------------------------------------------------------------------
@asynccontextmanager
async def run_cluster(
    tmp_path: Path, redis_url: str, *, count: int, prefix: str = "", **overrides: Any
) -> AsyncIterator[list[RunningNode]]:
    """``count`` nodes on 127.0.0.1 (free ports), each with its own SQLite, all on
    ``redis_url`` under ``prefix``. Tokens are valid on every node (shared JWT key).

    An exception raised in the block is re-raised after the nodes stopped even if a
    node's shutdown swallowed it (``open_node`` cancels its nursery before its exit
    stack unwinds, so an exit callback that awaits turns the test's failure into a
    ``Cancelled`` that the nursery absorbs; reported to the lead).
    """
    failure: BaseException | None = None
    async with AsyncExitStack() as stack:
        nodes = []
        for i in range(count):
            settings = make_settings(
                tmp_path / f"node{i + 1}",
                redis_url=redis_url,
                hub_node_id=f"node{i + 1}-{secrets.token_hex(2)}",
                **{**CLUSTER_OVERRIDES, **overrides},
            )
            nodes.append(await stack.enter_async_context(run_node(settings, redis_prefix=prefix)))
        try:
            yield nodes
        except BaseException as error:
            failure = error
            raise
    if failure is not None:
        raise failure
