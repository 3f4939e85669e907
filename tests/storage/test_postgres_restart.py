"""PostgreSQL restarts under a running hub: calls fail fast, then recover by themselves.

Runs on a private cluster (``pg_cluster.py``), never on the machine's shared server.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
import trio

from bridge.aio import AsyncioThread
from storage import StorageUnavailable
from storage.migrations import load_migrations
from storage.postgres import PostgresStorage
from tests.services import in_ci
from tests.storage.pg_cluster import PrivateCluster, open_private_cluster

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

#: An outage must be reported within this many seconds.
FAIL_FAST_S = 5.0


@pytest.fixture
async def cluster() -> AsyncIterator[PrivateCluster]:
    try:
        manager = open_private_cluster()
        started = await manager.__aenter__()
    except RuntimeError as exc:
        message = f"cannot run a private PostgreSQL cluster: {exc}"
        if in_ci():
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    try:
        yield started
    finally:
        await manager.__aexit__(None, None, None)


async def expect_unavailable(storage: PostgresStorage, user_id: uuid.UUID) -> None:
    start = trio.current_time()
    with trio.fail_after(FAIL_FAST_S), pytest.raises(StorageUnavailable):
        await storage.get_user(user_id)
    assert trio.current_time() - start < FAIL_FAST_S


@pytest.mark.parametrize("mode", ["fast", "immediate"])
async def test_storage_recovers_after_restart(
    cluster: PrivateCluster, aio: AsyncioThread, mode: str
) -> None:
    storage = await PostgresStorage.open(cluster.dsn, aio, pool_size=4)
    try:
        assert await storage.migrate() == [m.version for m in load_migrations("postgresql")]
        user = await storage.create_user(email="r@example.com", password_hash="h", full_name="R")
        # Open several pooled connections, so that all of them go stale in the outage.
        async with trio.open_nursery() as nursery:
            for _ in range(4):
                nursery.start_soon(storage.get_user, user.id)

        for _ in range(2):  # twice: recovery must not be a one-off
            await cluster.stop(mode)
            for _ in range(3):
                await expect_unavailable(storage, user.id)
            with pytest.raises(StorageUnavailable):
                await storage.ping()

            await cluster.start()
            # The very first call after the restart works: no reopen, no retry loop.
            with trio.fail_after(FAIL_FAST_S):
                assert await storage.get_user(user.id) == user
            with trio.fail_after(FAIL_FAST_S):
                async with trio.open_nursery() as nursery:
                    for _ in range(8):
                        nursery.start_soon(storage.ping)
    finally:
        await storage.aclose()
