"""Fixtures shared by the suites: test settings and a real running node per backend.

``hub_node`` runs every test that uses it twice: on SQLite (a fresh file in
``tmp_path``) and on PostgreSQL (one fresh schema per test module, dropped afterwards).
PostgreSQL missing → skip locally, failure under ``CI=true`` (``tests.services``).
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import (
    PG_HOST,
    PG_PORT,
    PG_URL,
    REDIS_HOST,
    REDIS_PORT,
    REDIS_URL,
    RunningNode,
    make_settings,
    run_node,
)
from tests.services import require_service


def _drop_schema(schema: str) -> None:
    import asyncpg

    async def drop() -> None:
        conn = await asyncpg.connect(PG_URL)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await conn.close()

    asyncio.run(drop())


@pytest.fixture(scope="module")
def pg_schema(request: pytest.FixtureRequest) -> Iterator[str]:
    """A PostgreSQL schema for this test module, dropped when the module is done."""
    module = request.module.__name__.rsplit(".", 1)[-1][:30]
    schema = f"t_{module}_{secrets.token_hex(3)}"
    yield schema
    try:
        _drop_schema(schema)
    except OSError:
        pass  # the server is gone; nothing to clean


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest) -> str:
    if request.param == "postgres":
        require_service("PostgreSQL", PG_HOST, PG_PORT)
    return str(request.param)


@pytest.fixture
def storage_schema(backend: str, request: pytest.FixtureRequest) -> str | None:
    """The module's PostgreSQL schema on the postgres backend, else ``None``."""
    if backend != "postgres":
        return None
    return str(request.getfixturevalue("pg_schema"))


@pytest.fixture
def node_overrides() -> dict[str, Any]:
    """Settings a test module wants for ``hub_node`` (override this fixture)."""
    return {}


@pytest.fixture
async def hub_node(
    backend: str, storage_schema: str | None, tmp_path: Path, node_overrides: dict[str, Any]
) -> AsyncIterator[RunningNode]:
    """A running node on ``backend`` with the module's ``node_overrides``."""
    schema = storage_schema
    settings = make_settings(tmp_path / "data", backend=backend, **node_overrides)
    async with run_node(settings, schema=schema) as running:
        yield running


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    """A key prefix of this test's own on the shared Redis; its keys are deleted after."""
    require_service("Redis", REDIS_HOST, REDIS_PORT)
    prefix = f"test-{secrets.token_hex(4)}:"
    yield prefix
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    try:
        keys = list(client.scan_iter(f"{prefix}*"))
        if keys:
            client.delete(*keys)
    finally:
        client.close()
