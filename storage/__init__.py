"""Persistence for the hub: one :class:`Storage` contract, SQLite and PostgreSQL backends.

``open_storage`` picks the backend from the settings; everything else imports the
contract names from here (``from storage import Storage, Conflict, ...``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from storage.base import (
    SORT_FIELDS,
    WILDCARD_EVENT,
    ClaimedDelivery,
    Conflict,
    DeliveryStatus,
    RefreshSession,
    Role,
    RotateOutcome,
    Storage,
    StorageError,
    StorageUnavailable,
    User,
    UserQuery,
    Webhook,
    WebhookDelivery,
)

if TYPE_CHECKING:
    from bridge.aio import AsyncioThread
    from hub.settings import Settings

__all__ = [
    "SORT_FIELDS",
    "WILDCARD_EVENT",
    "ClaimedDelivery",
    "Conflict",
    "DeliveryStatus",
    "RefreshSession",
    "Role",
    "RotateOutcome",
    "Storage",
    "StorageError",
    "StorageUnavailable",
    "User",
    "UserQuery",
    "Webhook",
    "WebhookDelivery",
    "open_storage",
]


@asynccontextmanager
async def open_storage(
    settings: Settings, aio: AsyncioThread | None = None, *, schema: str | None = None
) -> AsyncIterator[Storage]:
    """Open the configured storage for the duration of the block, then close it.

    PostgreSQL when ``settings.uses_postgres`` (pool of ``settings.db_pool_size``
    connections on the ``aio`` bridge), else SQLite at ``settings.sqlite_path``.
    Migrations are not applied here: call ``await storage.migrate()``.

    Args:
        settings: The node settings.
        aio: The running asyncio bridge; required for PostgreSQL, ignored for SQLite.
            It must stay open until this block is left.
        schema: PostgreSQL only: the schema to work in (created by ``migrate``).

    Yields:
        An open :class:`Storage`.

    Raises:
        ValueError: PostgreSQL is configured but ``aio`` is missing, or a bad schema.
        StorageUnavailable: The SQLite file cannot be opened.

    Resource handling:
        The storage is closed on exit (``aclose`` is bounded and shielded), also when
        the block raises or is cancelled.
    """
    storage: Storage
    if settings.uses_postgres:
        if aio is None:
            raise ValueError("PostgreSQL storage needs the asyncio bridge (bridge.aio)")
        from storage.postgres import PostgresStorage

        assert settings.database_url is not None
        storage = await PostgresStorage.open(
            settings.database_url, aio, schema=schema, pool_size=settings.db_pool_size
        )
    else:
        from storage.sqlite import SQLiteStorage

        storage = await SQLiteStorage.open(settings.sqlite_path)
    try:
        yield storage
    finally:
        await storage.aclose()
