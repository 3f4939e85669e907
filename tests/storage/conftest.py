"""Fixtures for the storage suite: every contract test runs on SQLite and on PostgreSQL.

PostgreSQL is the machine's server at ``PG_DSN``; each test works in a fresh schema
that is dropped at teardown. SQLite works in a file under ``tmp_path``.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from bridge.aio import AsyncioThread, open_asyncio_thread
from storage import Storage
from storage.postgres import PostgresStorage
from storage.sqlite import SQLiteStorage
from tests.services import require_service

PG_HOST = "127.0.0.1"
PG_PORT = 5432
PG_DSN = f"postgresql://postgres@{PG_HOST}:{PG_PORT}/test"


async def drop_schema(dsn: str, schema: str) -> None:
    """Drop ``schema`` and everything in it (runs on the asyncio thread)."""
    conn = await asyncpg.connect(dsn, timeout=5)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


class StorageFactory:
    """Opens any number of storages on one database (one SQLite file or one PostgreSQL
    schema) and closes them all at teardown. ``open`` does not migrate."""

    def __init__(self, backend: str, aio: AsyncioThread, sqlite_path: Path, schema: str) -> None:
        self.backend = backend
        self.aio = aio
        self.sqlite_path = sqlite_path
        self.schema = schema
        self._opened: list[Storage] = []

    async def open(self) -> Storage:
        storage: Storage
        if self.backend == "sqlite":
            storage = await SQLiteStorage.open(self.sqlite_path)
        else:
            storage = await PostgresStorage.open(PG_DSN, self.aio, schema=self.schema, pool_size=5)
        self._opened.append(storage)
        return storage

    async def aclose(self) -> None:
        for storage in self._opened:
            await storage.aclose()
        if self.backend == "postgresql":
            await self.aio.run(drop_schema, PG_DSN, self.schema)


@pytest.fixture
async def aio() -> AsyncIterator[AsyncioThread]:
    async with open_asyncio_thread(name="test-aio") as bridge:
        yield bridge


@pytest.fixture
def postgres_dsn() -> str:
    """The shared server's DSN; fails in CI, skips elsewhere, when it is down."""
    require_service("PostgreSQL", PG_HOST, PG_PORT)
    return PG_DSN


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def backend(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    if name == "postgresql":
        require_service("PostgreSQL", PG_HOST, PG_PORT)
    return name


@pytest.fixture
async def storage_factory(
    backend: str, aio: AsyncioThread, tmp_path: Path
) -> AsyncIterator[StorageFactory]:
    factory = StorageFactory(
        backend, aio, tmp_path / "db" / "hub.db", f"test_storage_{uuid.uuid4().hex[:16]}"
    )
    try:
        yield factory
    finally:
        await factory.aclose()


@pytest.fixture
async def storage(storage_factory: StorageFactory) -> Storage:
    """A migrated storage of the parametrised backend."""
    opened = await storage_factory.open()
    await opened.migrate()
    return opened
