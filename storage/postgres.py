"""PostgreSQL backend: an asyncpg pool that lives on the ``bridge.aio`` asyncio thread.

Each :class:`~storage.base.Storage` method is one coroutine submitted with
:meth:`bridge.aio.AsyncioThread.run` (one hop between the loops per call); methods
that touch several rows run in one transaction inside that coroutine. asyncpg
exceptions are translated here, on the trio side, into ``storage.base`` errors.

Outages: the pool connects lazily (``min_size=0``) with a short connect timeout, so
opening never waits for the server; while the server is down every call fails fast
with :class:`StorageUnavailable`, and when it is back the pool replaces its dead
connections by itself, without reopening the storage.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import Callable, Collection, Coroutine, Sequence
from datetime import datetime, timedelta
from typing import Any, TypeVar

import asyncpg
import asyncpg.exceptions._base as asyncpg_base
import trio

from bridge.aio import AsyncioThread
from storage._shared import (
    DELIVERY_COLUMNS,
    LIKE_ESCAPE,
    NUL_MESSAGE,
    ORDER_SQL,
    REASON_REUSE,
    REASON_USER_DELETED,
    SESSION_COLUMNS,
    USER_COLUMNS,
    WEBHOOK_COLUMNS,
    as_utc,
    check_events,
    check_outcome,
    check_page,
    check_query,
    like_pattern,
    utcnow,
)
from storage.base import (
    WILDCARD_EVENT,
    ClaimedDelivery,
    Conflict,
    DeliveryStatus,
    RefreshSession,
    Role,
    RotateOutcome,
    StorageError,
    StorageUnavailable,
    User,
    UserQuery,
    Webhook,
    WebhookDelivery,
)
from storage.migrations import load_migrations

__all__ = [
    "CLOSE_TIMEOUT_S",
    "COMMAND_TIMEOUT_S",
    "CONNECT_TIMEOUT_S",
    "PostgresStorage",
]

T = TypeVar("T")

#: Seconds to open one connection (covers a server that accepts TCP but never answers).
CONNECT_TIMEOUT_S = 2.5
#: Default per-statement timeout, so a hung server turns into StorageUnavailable.
COMMAND_TIMEOUT_S = 10.0
#: Seconds ``aclose`` gives borrowed connections before terminating the pool.
CLOSE_TIMEOUT_S = 5.0
#: Idle pooled connections are closed after this many seconds.
MAX_INACTIVE_CONNECTION_LIFETIME_S = 300.0

_SCHEMA_RE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
_LOCK_NAMESPACE = "notification-hub:migrate:"

# Whitelisted ORDER BY expressions: never built from caller input. COLLATE "C" gives
# code-point order, the same as SQLite's BINARY collation.
_SORT_SQL = {
    "created_at": "created_at",
    "updated_at": "updated_at",
    "email": 'lower(email) COLLATE "C"',
    "full_name": 'lower(full_name) COLLATE "C"',
}

# Connection-level failures: the server is down, restarting, refusing or unreachable.
_UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.QueryCanceledError,
    asyncpg.ReadOnlySQLTransactionError,
    asyncpg_base.InternalClientError,
)
# Bad input: NUL or invalid text, values too long, constraint or foreign-key violations.
_BAD_INPUT: tuple[type[BaseException], ...] = (
    asyncpg.DataError,  # SQLSTATE class 22, e.g. 22021 for a NUL byte in text
    asyncpg_base.DataError,  # client-side encoding errors (wrong Python type)
    asyncpg.CheckViolationError,
    asyncpg.NotNullViolationError,
    asyncpg.ForeignKeyViolationError,
)


def _user(row: asyncpg.Record) -> User:
    return User(
        id=row["id"],
        email=row["email"],
        password_hash=row["password_hash"],
        full_name=row["full_name"],
        avatar_url=row["avatar_url"],
        is_verified=row["is_verified"],
        is_active=row["is_active"],
        role=Role(row["role"]),
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        deleted_at=row["deleted_at"],
    )


def _session(row: asyncpg.Record) -> RefreshSession:
    return RefreshSession(
        id=row["id"],
        user_id=row["user_id"],
        token_hash=row["token_hash"],
        created_at=row["created_at"],
        expires_at=row["expires_at"],
        rotated_at=row["rotated_at"],
        revoked_at=row["revoked_at"],
        revoked_reason=row["revoked_reason"],
        ip_address=row["ip_address"],
        user_agent=row["user_agent"],
    )


def _webhook(row: asyncpg.Record, prefix: str = "") -> Webhook:
    return Webhook(
        id=row[prefix + "id"],
        url=row[prefix + "url"],
        events=tuple(row[prefix + "events"]),
        description=row[prefix + "description"],
        secret_ciphertext=row[prefix + "secret_ciphertext"],
        created_at=row[prefix + "created_at"],
        updated_at=row[prefix + "updated_at"],
    )


def _delivery(row: asyncpg.Record) -> WebhookDelivery:
    return WebhookDelivery(
        id=row["id"],
        webhook_id=row["webhook_id"],
        event=row["event"],
        event_id=row["event_id"],
        payload=row["payload"],
        status=DeliveryStatus(row["status"]),
        attempts=row["attempts"],
        next_attempt_at=row["next_attempt_at"],
        last_status_code=row["last_status_code"],
        last_error=row["last_error"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


def _translate(exc: Exception) -> Exception | None:
    """The storage-level exception for an asyncpg/socket error, or None to re-raise as is."""
    if isinstance(exc, asyncpg.UniqueViolationError):
        return Conflict(exc.detail or str(exc))
    if isinstance(exc, asyncpg.CharacterNotInRepertoireError) and "0x00" in str(exc):
        return ValueError(NUL_MESSAGE)
    if isinstance(exc, _BAD_INPUT):
        return ValueError(f"rejected by the database: {exc}")
    if isinstance(exc, _UNAVAILABLE):
        return StorageUnavailable(f"postgresql: {type(exc).__name__}: {exc}")
    if isinstance(exc, asyncpg.PostgresError):
        return StorageError(f"postgresql: {type(exc).__name__}: {exc}")
    return None


class _Params:
    """Collects query arguments and hands out their ``$n`` placeholders."""

    def __init__(self) -> None:
        self.values: list[object] = []

    def add(self, value: object) -> str:
        self.values.append(value)
        return f"${len(self.values)}"


async def _close_pool(pool: asyncpg.Pool) -> None:
    """Graceful close, bounded; then terminate (runs on the asyncio thread)."""
    try:
        await asyncio.wait_for(pool.close(), CLOSE_TIMEOUT_S)
    except Exception:
        pool.terminate()


class PostgresStorage:
    """:class:`storage.base.Storage` on PostgreSQL. Open with :meth:`open`.

    Cancellation:
        Cancelling a call cancels its asyncio task (asyncpg then cancels the running
        statement and resets the connection before reusing it) and re-raises
        :class:`trio.Cancelled` at once. An uncommitted transaction is rolled back.

    Backpressure:
        At most ``pool_size`` statements run at once; further callers wait on the
        asyncio side for a free connection (they stay cancellable from trio).
    """

    backend = "postgresql"

    def __init__(self, pool: asyncpg.Pool, aio: AsyncioThread, schema: str | None) -> None:
        self._pool = pool
        self._aio = aio
        self._schema = schema
        self._closed = False

    @classmethod
    async def open(
        cls,
        dsn: str,
        aio: AsyncioThread,
        *,
        schema: str | None = None,
        pool_size: int = 20,
        connect_timeout_s: float = CONNECT_TIMEOUT_S,
        command_timeout_s: float = COMMAND_TIMEOUT_S,
    ) -> PostgresStorage:
        """Create the pool on the asyncio thread. No connection is made yet.

        Args:
            dsn: ``postgresql://user:password@host:port/database``.
            aio: The running asyncio bridge; it must outlive the storage.
            schema: Schema used as ``search_path`` of every connection; ``migrate``
                creates it when missing. Lower-case letters, digits and ``_`` only.
            pool_size: Most connections open at once.
            connect_timeout_s: Timeout to open one connection.
            command_timeout_s: Default timeout of each statement.

        Raises:
            ValueError: A bad schema name or DSN.
        """
        if schema is not None and not _SCHEMA_RE.match(schema):
            raise ValueError("schema must match [a-z_][a-z0-9_]{0,62}")
        server_settings = {"application_name": "notification-hub"}
        if schema is not None:
            server_settings["search_path"] = schema

        async def create() -> asyncpg.Pool:
            return await asyncpg.create_pool(
                dsn,
                min_size=0,
                max_size=pool_size,
                timeout=connect_timeout_s,
                command_timeout=command_timeout_s,
                max_inactive_connection_lifetime=MAX_INACTIVE_CONNECTION_LIFETIME_S,
                server_settings=server_settings,
            )

        try:
            pool = await aio.run(create)
        except asyncpg_base.ClientConfigurationError as exc:
            raise ValueError(f"bad PostgreSQL settings: {exc}") from exc
        return cls(pool, aio, schema)

    @property
    def schema(self) -> str | None:
        return self._schema

    async def _call(self, fn: Callable[[], Coroutine[Any, Any, T]]) -> T:
        """Run ``fn()`` on the asyncio thread and translate its errors."""
        if self._closed:
            raise trio.ClosedResourceError("storage is closed")
        try:
            return await self._aio.run(fn)
        except Exception as exc:
            translated = _translate(exc)
            if translated is None:
                raise
            raise translated from exc

    # ----------------------------------------------------------------- lifecycle

    async def migrate(self) -> list[str]:
        migrations = load_migrations("postgresql")
        pool = self._pool
        schema = self._schema

        async def work() -> list[str]:
            async with pool.acquire() as con, con.transaction():
                # Serialise migrators of this schema; released at commit/rollback.
                await con.execute(
                    "SELECT pg_advisory_xact_lock(hashtextextended("
                    "$1::text || coalesce($2::text, current_schema(), ''), 0))",
                    _LOCK_NAMESPACE,
                    schema,
                )
                if schema is not None:
                    await con.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
                await con.execute(
                    "CREATE TABLE IF NOT EXISTS schema_migrations ("
                    "version text PRIMARY KEY, applied_at timestamptz NOT NULL)"
                )
                rows = await con.fetch("SELECT version FROM schema_migrations")
                done = {r["version"] for r in rows}
                applied: list[str] = []
                for migration in migrations:
                    if migration.version in done:
                        continue
                    await con.execute(migration.sql)
                    await con.execute(
                        "INSERT INTO schema_migrations (version, applied_at) VALUES ($1, $2)",
                        migration.version,
                        utcnow(),
                    )
                    applied.append(migration.version)
                return applied

        return await self._call(work)

    async def ping(self) -> None:
        pool = self._pool

        async def work() -> None:
            await pool.fetchval("SELECT 1")

        await self._call(work)

    async def aclose(self) -> None:
        """Close the pool (gracefully, then forcibly after ``CLOSE_TIMEOUT_S``). Idempotent.

        Cancellation:
            Shielded for a bounded time so the pool is closed even when the caller is
            being cancelled.
        """
        if self._closed:
            return
        self._closed = True
        pool = self._pool
        with trio.CancelScope(shield=True, deadline=trio.current_time() + CLOSE_TIMEOUT_S + 1):
            try:
                await self._aio.run(_close_pool, pool)
            except trio.ClosedResourceError:
                pass  # the bridge is already gone, and its loop with the sockets

    # --------------------------------------------------------------------- users

    async def create_user(
        self,
        *,
        email: str,
        password_hash: str,
        full_name: str,
        role: Role = Role.USER,
        is_verified: bool = False,
    ) -> User:
        pool = self._pool
        now = utcnow()
        args = (uuid.uuid4(), email, password_hash, full_name, is_verified, Role(role).value, now)

        async def work() -> User:
            row = await pool.fetchrow(
                "INSERT INTO users (id, email, password_hash, full_name, is_verified, role, "
                f"created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $7) "
                f"RETURNING {USER_COLUMNS}",
                *args,
            )
            return _user(row)

        return await self._call(work)

    async def get_user(self, user_id: uuid.UUID, *, include_deleted: bool = False) -> User | None:
        pool = self._pool
        sql = f"SELECT {USER_COLUMNS} FROM users WHERE id = $1"
        if not include_deleted:
            sql += " AND deleted_at IS NULL"

        async def work() -> User | None:
            row = await pool.fetchrow(sql, user_id)
            return None if row is None else _user(row)

        return await self._call(work)

    async def get_user_by_email(self, email: str) -> User | None:
        pool = self._pool

        async def work() -> User | None:
            row = await pool.fetchrow(
                f"SELECT {USER_COLUMNS} FROM users "
                "WHERE lower(email) = lower($1) AND deleted_at IS NULL",
                email,
            )
            return None if row is None else _user(row)

        return await self._call(work)

    async def update_user(
        self,
        user_id: uuid.UUID,
        *,
        full_name: str | None = None,
        avatar_url: str | None = None,
        clear_avatar: bool = False,
        is_verified: bool | None = None,
        is_active: bool | None = None,
    ) -> User | None:
        if clear_avatar and avatar_url is not None:
            raise ValueError("give avatar_url or clear_avatar, not both")
        pool = self._pool
        params = _Params()
        sets = [f"updated_at = {params.add(utcnow())}"]
        if full_name is not None:
            sets.append(f"full_name = {params.add(full_name)}")
        if avatar_url is not None or clear_avatar:
            sets.append(f"avatar_url = {params.add(avatar_url)}")
        if is_verified is not None:
            sets.append(f"is_verified = {params.add(is_verified)}")
        if is_active is not None:
            sets.append(f"is_active = {params.add(is_active)}")
        sql = (
            f"UPDATE users SET {', '.join(sets)} "
            f"WHERE id = {params.add(user_id)} AND deleted_at IS NULL RETURNING {USER_COLUMNS}"
        )

        async def work() -> User | None:
            row = await pool.fetchrow(sql, *params.values)
            return None if row is None else _user(row)

        return await self._call(work)

    async def soft_delete_user(self, user_id: uuid.UUID) -> bool:
        pool = self._pool
        now = utcnow()

        async def work() -> bool:
            async with pool.acquire() as con, con.transaction():
                found = await con.fetchval(
                    "UPDATE users SET deleted_at = $2, updated_at = $2 "
                    "WHERE id = $1 AND deleted_at IS NULL RETURNING true",
                    user_id,
                    now,
                )
                if not found:
                    return False
                await con.execute(
                    "UPDATE refresh_sessions SET revoked_at = $2, revoked_reason = $3 "
                    "WHERE user_id = $1 AND revoked_at IS NULL",
                    user_id,
                    now,
                    REASON_USER_DELETED,
                )
                return True

        return await self._call(work)

    async def list_users(self, query: UserQuery) -> tuple[list[User], int]:
        check_query(query)
        pool = self._pool
        params = _Params()
        where = ["deleted_at IS NULL"]
        if query.is_active is not None:
            where.append(f"is_active = {params.add(query.is_active)}")
        if query.created_after is not None:
            where.append(f"created_at >= {params.add(as_utc(query.created_after))}")
        if query.search:
            p = params.add(like_pattern(query.search))
            where.append(
                f"(lower(email) LIKE {p} ESCAPE '{LIKE_ESCAPE}' "
                f"OR lower(full_name) LIKE {p} ESCAPE '{LIKE_ESCAPE}')"
            )
        where_sql = " AND ".join(where)
        filter_args = list(params.values)
        order = ORDER_SQL[query.order]
        page_sql = (
            f"SELECT {USER_COLUMNS} FROM users WHERE {where_sql} "
            f"ORDER BY {_SORT_SQL[query.sort]} {order}, id {order} "
            f"LIMIT {params.add(query.limit)} OFFSET {params.add((query.page - 1) * query.limit)}"
        )
        page_args = params.values

        async def work() -> tuple[list[User], int]:
            async with (
                pool.acquire() as con,
                con.transaction(isolation="repeatable_read", readonly=True),
            ):
                total = await con.fetchval(
                    f"SELECT count(*) FROM users WHERE {where_sql}", *filter_args
                )
                rows = await con.fetch(page_sql, *page_args)
            return [_user(r) for r in rows], int(total)

        return await self._call(work)

    # ------------------------------------------------------------ refresh sessions

    async def create_session(
        self,
        *,
        user_id: uuid.UUID,
        token_hash: str,
        expires_at: datetime,
        ip_address: str | None = None,
        user_agent: str | None = None,
    ) -> RefreshSession:
        pool = self._pool
        args = (
            uuid.uuid4(),
            user_id,
            token_hash,
            utcnow(),
            as_utc(expires_at),
            ip_address,
            user_agent,
        )

        async def work() -> RefreshSession:
            row = await pool.fetchrow(
                "INSERT INTO refresh_sessions (id, user_id, token_hash, created_at, expires_at, "
                "ip_address, user_agent) VALUES ($1, $2, $3, $4, $5, $6, $7) "
                f"RETURNING {SESSION_COLUMNS}",
                *args,
            )
            return _session(row)

        return await self._call(work)

    async def get_session(self, session_id: uuid.UUID) -> RefreshSession | None:
        pool = self._pool

        async def work() -> RefreshSession | None:
            row = await pool.fetchrow(
                f"SELECT {SESSION_COLUMNS} FROM refresh_sessions WHERE id = $1", session_id
            )
            return None if row is None else _session(row)

        return await self._call(work)

    async def rotate_session(
        self, session_id: uuid.UUID, *, presented_hash: str, new_hash: str, new_expires_at: datetime
    ) -> RotateOutcome:
        pool = self._pool
        now = utcnow()
        new_expires = as_utc(new_expires_at)

        async def work() -> RotateOutcome:
            async with pool.acquire() as con, con.transaction():
                # The compare-and-swap. A parallel rotation of the same row waits for
                # our row lock, then re-checks token_hash against the committed value.
                swapped = await con.fetchval(
                    "UPDATE refresh_sessions SET token_hash = $3, expires_at = $4, "
                    "rotated_at = $5 WHERE id = $1 AND token_hash = $2 "
                    "AND revoked_at IS NULL AND expires_at > $5 RETURNING true",
                    session_id,
                    presented_hash,
                    new_hash,
                    new_expires,
                    now,
                )
                if swapped:
                    return RotateOutcome.ROTATED
                row = await con.fetchrow(
                    "SELECT revoked_at, expires_at FROM refresh_sessions WHERE id = $1 FOR UPDATE",
                    session_id,
                )
                if row is None:
                    return RotateOutcome.UNKNOWN
                if row["revoked_at"] is not None or row["expires_at"] <= now:
                    return RotateOutcome.REVOKED
                await con.execute(
                    "UPDATE refresh_sessions SET revoked_at = $2, revoked_reason = $3 "
                    "WHERE id = $1",
                    session_id,
                    now,
                    REASON_REUSE,
                )
                return RotateOutcome.REUSED

        return await self._call(work)

    async def revoke_session(self, session_id: uuid.UUID, *, reason: str) -> bool:
        pool = self._pool
        now = utcnow()

        async def work() -> bool:
            found = await pool.fetchval(
                "UPDATE refresh_sessions SET revoked_at = $2, revoked_reason = $3 "
                "WHERE id = $1 AND revoked_at IS NULL RETURNING true",
                session_id,
                now,
                reason,
            )
            return bool(found)

        return await self._call(work)

    async def revoke_user_sessions(self, user_id: uuid.UUID, *, reason: str) -> int:
        pool = self._pool
        now = utcnow()

        async def work() -> int:
            status: str = await pool.execute(
                "UPDATE refresh_sessions SET revoked_at = $2, revoked_reason = $3 "
                "WHERE user_id = $1 AND revoked_at IS NULL",
                user_id,
                now,
                reason,
            )
            return int(status.rsplit(" ", 1)[-1])  # "UPDATE <count>"

        return await self._call(work)

    async def revoked_since(self, since: datetime) -> list[RefreshSession]:
        pool = self._pool
        since_utc = as_utc(since)

        async def work() -> list[RefreshSession]:
            rows = await pool.fetch(
                f"SELECT {SESSION_COLUMNS} FROM refresh_sessions "
                "WHERE revoked_at >= $1 ORDER BY revoked_at, id",
                since_utc,
            )
            return [_session(r) for r in rows]

        return await self._call(work)

    # ------------------------------------------------------------ e-mail verification

    async def create_verification(
        self, *, user_id: uuid.UUID, token_hash: str, expires_at: datetime
    ) -> None:
        pool = self._pool
        expires = as_utc(expires_at)

        async def work() -> None:
            await pool.execute(
                "INSERT INTO email_verifications (token_hash, user_id, expires_at) "
                "VALUES ($1, $2, $3)",
                token_hash,
                user_id,
                expires,
            )

        await self._call(work)

    async def consume_verification(self, token_hash: str) -> uuid.UUID | None:
        pool = self._pool
        now = utcnow()

        async def work() -> uuid.UUID | None:
            async with pool.acquire() as con, con.transaction():
                user_id: uuid.UUID | None = await con.fetchval(
                    "UPDATE email_verifications SET used_at = $2 "
                    "WHERE token_hash = $1 AND used_at IS NULL AND expires_at > $2 "
                    "RETURNING user_id",
                    token_hash,
                    now,
                )
                if user_id is None:
                    return None
                found = await con.fetchval(
                    "UPDATE users SET is_verified = true, updated_at = $2 "
                    "WHERE id = $1 AND deleted_at IS NULL RETURNING true",
                    user_id,
                    now,
                )
                return user_id if found else None

        return await self._call(work)

    # ------------------------------------------------------------------- webhooks

    async def create_webhook(
        self,
        *,
        webhook_id: uuid.UUID,
        url: str,
        events: Sequence[str],
        description: str | None,
        secret_ciphertext: str,
    ) -> Webhook:
        names = check_events(events)
        pool = self._pool
        now = utcnow()

        async def work() -> Webhook:
            row = await pool.fetchrow(
                "INSERT INTO webhooks (id, url, events, description, secret_ciphertext, "
                "created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $6) "
                f"RETURNING {WEBHOOK_COLUMNS}",
                webhook_id,
                url,
                names,
                description,
                secret_ciphertext,
                now,
            )
            return _webhook(row)

        return await self._call(work)

    async def get_webhook(self, webhook_id: uuid.UUID) -> Webhook | None:
        pool = self._pool

        async def work() -> Webhook | None:
            row = await pool.fetchrow(
                f"SELECT {WEBHOOK_COLUMNS} FROM webhooks WHERE id = $1", webhook_id
            )
            return None if row is None else _webhook(row)

        return await self._call(work)

    async def list_webhooks(self) -> list[Webhook]:
        pool = self._pool

        async def work() -> list[Webhook]:
            rows = await pool.fetch(
                f"SELECT {WEBHOOK_COLUMNS} FROM webhooks ORDER BY created_at, id"
            )
            return [_webhook(r) for r in rows]

        return await self._call(work)

    async def delete_webhook(self, webhook_id: uuid.UUID) -> bool:
        pool = self._pool

        async def work() -> bool:
            found = await pool.fetchval(
                "DELETE FROM webhooks WHERE id = $1 RETURNING true", webhook_id
            )
            return bool(found)

        return await self._call(work)

    async def enqueue_webhook_deliveries(self, *, event: str, event_id: str, payload: str) -> int:
        pool = self._pool
        now = utcnow()

        async def work() -> int:
            status: str = await pool.execute(
                "INSERT INTO webhook_deliveries (id, webhook_id, event, event_id, payload, "
                "status, attempts, next_attempt_at, created_at, updated_at) "
                "SELECT gen_random_uuid(), w.id, $1, $2, $3, 'pending', 0, $4, $4, $4 "
                "FROM webhooks w WHERE w.events && $5::text[] "
                "ON CONFLICT (webhook_id, event_id) DO NOTHING",
                event,
                event_id,
                payload,
                now,
                [event, WILDCARD_EVENT],
            )
            return int(status.rsplit(" ", 1)[-1])  # "INSERT 0 <count>"

        return await self._call(work)

    async def claim_webhook_deliveries(
        self,
        *,
        limit: int,
        per_webhook: int,
        lease_s: float,
        exclude: Collection[uuid.UUID] = (),
    ) -> list[ClaimedDelivery]:
        if limit < 1 or per_webhook < 1:
            return []
        pool = self._pool
        now = utcnow()
        lease_end = now + timedelta(seconds=lease_s)
        excluded = list(exclude)
        # Candidates are locked with SKIP LOCKED (rows another node is claiming right now
        # are passed over), then capped per endpoint and leased, all in one statement.
        scan = limit * per_webhook
        columns = ", ".join(f"d.{c.strip()}" for c in DELIVERY_COLUMNS.split(","))
        webhook_columns = ", ".join(
            f"w.{c.strip()} AS w_{c.strip()}" for c in WEBHOOK_COLUMNS.split(",")
        )
        sql = (
            "WITH candidates AS ("
            "  SELECT id, webhook_id, next_attempt_at FROM webhook_deliveries"
            "  WHERE status = 'pending' AND next_attempt_at <= $1"
            "  AND NOT (webhook_id = ANY($2::uuid[]))"
            "  ORDER BY next_attempt_at, id LIMIT $3 FOR UPDATE SKIP LOCKED"
            "), picked AS ("
            "  SELECT id FROM (SELECT id, next_attempt_at, row_number() OVER ("
            "    PARTITION BY webhook_id ORDER BY next_attempt_at, id) AS rn FROM candidates) r"
            "  WHERE rn <= $4 ORDER BY next_attempt_at, id LIMIT $5"
            "), leased AS ("
            "  UPDATE webhook_deliveries d SET next_attempt_at = $6, updated_at = $1"
            "  FROM picked WHERE d.id = picked.id RETURNING d.*"
            f") SELECT {columns}, {webhook_columns} FROM leased d"
            " JOIN webhooks w ON w.id = d.webhook_id ORDER BY d.created_at, d.id"
        )

        async def work() -> list[ClaimedDelivery]:
            rows = await pool.fetch(sql, now, excluded, scan, per_webhook, limit, lease_end)
            return [ClaimedDelivery(_delivery(r), _webhook(r, "w_")) for r in rows]

        return await self._call(work)

    async def record_webhook_attempt(
        self,
        delivery_id: uuid.UUID,
        *,
        status: DeliveryStatus,
        status_code: int | None,
        error: str | None,
        next_attempt_at: datetime | None,
    ) -> bool:
        check_outcome(status, next_attempt_at)
        pool = self._pool
        args = (
            delivery_id,
            DeliveryStatus(status).value,
            None if next_attempt_at is None else as_utc(next_attempt_at),
            status_code,
            error,
            utcnow(),
        )

        async def work() -> bool:
            found = await pool.fetchval(
                "UPDATE webhook_deliveries SET attempts = attempts + 1, status = $2, "
                "next_attempt_at = $3, last_status_code = $4, last_error = $5, updated_at = $6 "
                "WHERE id = $1 AND status = 'pending' RETURNING true",
                *args,
            )
            return bool(found)

        return await self._call(work)

    async def release_webhook_deliveries(self, delivery_ids: Collection[uuid.UUID]) -> int:
        if not delivery_ids:
            return 0
        pool = self._pool
        ids = list(delivery_ids)
        now = utcnow()

        async def work() -> int:
            status: str = await pool.execute(
                "UPDATE webhook_deliveries SET next_attempt_at = $2, updated_at = $2 "
                "WHERE id = ANY($1::uuid[]) AND status = 'pending'",
                ids,
                now,
            )
            return int(status.rsplit(" ", 1)[-1])

        return await self._call(work)

    async def next_webhook_due_at(self, *, exclude: Collection[uuid.UUID] = ()) -> datetime | None:
        pool = self._pool
        excluded = list(exclude)

        async def work() -> datetime | None:
            due: datetime | None = await pool.fetchval(
                "SELECT min(next_attempt_at) FROM webhook_deliveries "
                "WHERE status = 'pending' AND NOT (webhook_id = ANY($1::uuid[]))",
                excluded,
            )
            return due

        return await self._call(work)

    async def list_webhook_deliveries(
        self,
        webhook_id: uuid.UUID,
        *,
        page: int = 1,
        limit: int = 20,
        status: DeliveryStatus | None = None,
    ) -> tuple[list[WebhookDelivery], int]:
        check_page(page, limit)
        pool = self._pool
        status_value = None if status is None else DeliveryStatus(status).value
        where = "webhook_id = $1 AND ($2::text IS NULL OR status = $2)"

        async def work() -> tuple[list[WebhookDelivery], int]:
            async with (
                pool.acquire() as con,
                con.transaction(isolation="repeatable_read", readonly=True),
            ):
                total = await con.fetchval(
                    f"SELECT count(*) FROM webhook_deliveries WHERE {where}",
                    webhook_id,
                    status_value,
                )
                rows = await con.fetch(
                    f"SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries WHERE {where} "
                    "ORDER BY created_at DESC, id DESC LIMIT $3 OFFSET $4",
                    webhook_id,
                    status_value,
                    limit,
                    (page - 1) * limit,
                )
            return [_delivery(r) for r in rows], int(total)

        return await self._call(work)

    async def prune_webhook_deliveries(self, *, finished_before: datetime) -> int:
        pool = self._pool
        before = as_utc(finished_before)

        async def work() -> int:
            status: str = await pool.execute(
                "DELETE FROM webhook_deliveries WHERE status <> 'pending' AND updated_at < $1",
                before,
            )
            return int(status.rsplit(" ", 1)[-1])

        return await self._call(work)
