"""SQLite backend: the stdlib ``sqlite3`` on one connection, driven from a worker thread.

Used when ``DATABASE_URL`` is unset (a single node). Every call takes a trio lock and
runs its whole transaction in ``trio.to_thread.run_sync``, so the trio loop never
blocks on the file. The database is in WAL mode with a busy timeout, and writes use
``BEGIN IMMEDIATE``, so several processes (``hub migrate`` beside ``hub serve``) may
share the file safely.

Storage format: UUIDs as lower-case text, timestamps as ISO-8601 UTC text with
microseconds (text order is time order), booleans as 0/1.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import uuid
from collections.abc import Callable, Collection, Iterator, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import TypeVar

import trio

from storage._shared import (
    DELIVERY_COLUMNS,
    LIKE_ESCAPE,
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
    reject_nul,
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

__all__ = ["BUSY_TIMEOUT_S", "CLOSE_TIMEOUT_S", "SQLiteStorage"]

T = TypeVar("T")

#: How long a statement waits for another process's write lock before failing.
BUSY_TIMEOUT_S = 5.0
#: Upper bound for ``aclose`` to wait for an in-flight statement.
CLOSE_TIMEOUT_S = BUSY_TIMEOUT_S + 1.0

_UNAVAILABLE_CODES = (
    "SQLITE_BUSY",
    "SQLITE_LOCKED",
    "SQLITE_IOERR",
    "SQLITE_CANTOPEN",
    "SQLITE_FULL",
    "SQLITE_READONLY",
    "SQLITE_PROTOCOL",
)
_CONFLICT_CODES = ("SQLITE_CONSTRAINT_UNIQUE", "SQLITE_CONSTRAINT_PRIMARYKEY")

# Whitelisted ORDER BY expressions: never built from caller input.
_SORT_SQL = {
    "created_at": "created_at",
    "updated_at": "updated_at",
    "email": "py_lower(email)",
    "full_name": "py_lower(full_name)",
}


def _ts(value: datetime) -> str:
    """A datetime as the stored text form (UTC, microseconds, fixed width)."""
    return as_utc(value).isoformat(timespec="microseconds")


def _dt(text: str | None) -> datetime | None:
    return None if text is None else datetime.fromisoformat(text)


def _dt_required(text: str) -> datetime:
    return datetime.fromisoformat(text)


def _py_lower(value: str | bytes | int | float | None) -> str | bytes | int | float | None:
    """SQL function ``py_lower``: Unicode-aware ``lower`` (SQLite's only folds ASCII)."""
    return value.lower() if isinstance(value, str) else value


def _user(row: sqlite3.Row) -> User:
    return User(
        id=uuid.UUID(row["id"]),
        email=row["email"],
        password_hash=row["password_hash"],
        full_name=row["full_name"],
        avatar_url=row["avatar_url"],
        is_verified=bool(row["is_verified"]),
        is_active=bool(row["is_active"]),
        role=Role(row["role"]),
        created_at=_dt_required(row["created_at"]),
        updated_at=_dt_required(row["updated_at"]),
        deleted_at=_dt(row["deleted_at"]),
    )


def _session(row: sqlite3.Row) -> RefreshSession:
    return RefreshSession(
        id=uuid.UUID(row["id"]),
        user_id=uuid.UUID(row["user_id"]),
        token_hash=row["token_hash"],
        created_at=_dt_required(row["created_at"]),
        expires_at=_dt_required(row["expires_at"]),
        rotated_at=_dt(row["rotated_at"]),
        revoked_at=_dt(row["revoked_at"]),
        revoked_reason=row["revoked_reason"],
        ip_address=row["ip_address"],
        user_agent=row["user_agent"],
    )


def _webhook(row: sqlite3.Row, prefix: str = "") -> Webhook:
    return Webhook(
        id=uuid.UUID(row[prefix + "id"]),
        url=row[prefix + "url"],
        events=tuple(json.loads(row[prefix + "events"])),
        description=row[prefix + "description"],
        secret_ciphertext=row[prefix + "secret_ciphertext"],
        created_at=_dt_required(row[prefix + "created_at"]),
        updated_at=_dt_required(row[prefix + "updated_at"]),
    )


def _delivery(row: sqlite3.Row) -> WebhookDelivery:
    return WebhookDelivery(
        id=uuid.UUID(row["id"]),
        webhook_id=uuid.UUID(row["webhook_id"]),
        event=row["event"],
        event_id=row["event_id"],
        payload=row["payload"],
        status=DeliveryStatus(row["status"]),
        attempts=int(row["attempts"]),
        next_attempt_at=_dt(row["next_attempt_at"]),
        last_status_code=row["last_status_code"],
        last_error=row["last_error"],
        created_at=_dt_required(row["created_at"]),
        updated_at=_dt_required(row["updated_at"]),
    )


def _not_in(column: str, ids: Collection[uuid.UUID]) -> tuple[str, list[str]]:
    """``AND column NOT IN (?, …)`` and its parameters; empty when ``ids`` is."""
    if not ids:
        return "", []
    marks = ", ".join("?" for _ in ids)
    return f" AND {column} NOT IN ({marks})", [str(i) for i in ids]


def _translate(exc: sqlite3.Error) -> Exception:
    """The storage-level exception for a ``sqlite3`` error."""
    name = getattr(exc, "sqlite_errorname", "") or ""
    if isinstance(exc, sqlite3.IntegrityError):
        if name in _CONFLICT_CODES:
            return Conflict(str(exc))
        return ValueError(f"rejected by the database: {exc}")
    if isinstance(exc, sqlite3.DataError):
        return ValueError(f"rejected by the database: {exc}")
    if name.startswith(_UNAVAILABLE_CODES):
        return StorageUnavailable(f"sqlite: {exc}")
    return StorageError(f"sqlite: {exc}")


@contextlib.contextmanager
def _transaction(conn: sqlite3.Connection, *, write: bool) -> Iterator[None]:
    """``BEGIN IMMEDIATE`` (write) or ``BEGIN`` (read) … ``COMMIT``; rollback on error."""
    conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _split_statements(script: str) -> list[str]:
    """Cut an SQL script into complete statements (``executescript`` would commit)."""
    statements: list[str] = []
    pending = ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            if pending.strip():
                statements.append(pending)
            pending = ""
    if pending.strip() and not all(
        not ln.strip() or ln.lstrip().startswith("--") for ln in pending.splitlines()
    ):
        raise ValueError("migration script ends with an incomplete statement")
    return statements


def _connect(path: Path) -> sqlite3.Connection:
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(
        path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
    )
    try:
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT_S * 1000)}")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.create_function("py_lower", 1, _py_lower, deterministic=True)
    except BaseException:
        conn.close()
        raise
    return conn


class SQLiteStorage:
    """:class:`storage.base.Storage` on a SQLite file. Open with :meth:`open`.

    Cancellation:
        Waiting for the connection lock is cancellable. A statement already handed to
        the worker thread runs to the end of its transaction (at most about
        ``BUSY_TIMEOUT_S``); the cancellation is delivered when it returns, and the
        transaction has then either committed or rolled back as a whole.

    Backpressure:
        Calls are serialised on one connection: extra callers wait for the lock in
        FIFO order.
    """

    backend = "sqlite"

    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        self._conn: sqlite3.Connection | None = conn
        self._path = path
        self._lock = trio.Lock()

    @classmethod
    async def open(cls, path: Path) -> SQLiteStorage:
        """Open (and create, with its parent folder) the database file at ``path``.

        Raises:
            StorageUnavailable: The file cannot be created or opened.
        """
        try:
            conn = await trio.to_thread.run_sync(_connect, path)
        except sqlite3.Error as exc:
            raise _translate(exc) from exc
        except OSError as exc:
            raise StorageUnavailable(f"sqlite: cannot open {path}: {exc}") from exc
        return cls(conn, path)

    @property
    def path(self) -> Path:
        return self._path

    async def _run(self, fn: Callable[[sqlite3.Connection], T], *params: object) -> T:
        """Run ``fn(conn)`` in a worker thread, holding the connection lock.

        ``params`` are only checked for NUL characters (so that SQLite refuses what
        PostgreSQL refuses); ``fn`` carries its own arguments.
        """
        reject_nul(params)
        async with self._lock:
            conn = self._conn
            if conn is None:
                raise trio.ClosedResourceError("storage is closed")
            return await trio.to_thread.run_sync(self._call, fn, conn)

    @staticmethod
    def _call(fn: Callable[[sqlite3.Connection], T], conn: sqlite3.Connection) -> T:
        try:
            return fn(conn)
        except sqlite3.Error as exc:
            raise _translate(exc) from exc

    # ----------------------------------------------------------------- lifecycle

    async def migrate(self) -> list[str]:
        migrations = load_migrations("sqlite")

        def work(conn: sqlite3.Connection) -> list[str]:
            with _transaction(conn, write=True):
                conn.execute(
                    "CREATE TABLE IF NOT EXISTS schema_migrations ("
                    "version TEXT PRIMARY KEY NOT NULL, applied_at TEXT NOT NULL)"
                )
                done = {r[0] for r in conn.execute("SELECT version FROM schema_migrations")}
                applied: list[str] = []
                for migration in migrations:
                    if migration.version in done:
                        continue
                    for statement in _split_statements(migration.sql):
                        conn.execute(statement)
                    conn.execute(
                        "INSERT INTO schema_migrations (version, applied_at) VALUES (?, ?)",
                        (migration.version, _ts(utcnow())),
                    )
                    applied.append(migration.version)
                return applied

        return await self._run(work)

    async def ping(self) -> None:
        await self._run(lambda conn: conn.execute("SELECT 1").fetchall())

    async def aclose(self) -> None:
        """Close the connection. Idempotent.

        Cancellation:
            Shielded for at most ``CLOSE_TIMEOUT_S`` so the file is closed even when
            the caller is being cancelled.
        """
        with trio.CancelScope(shield=True, deadline=trio.current_time() + CLOSE_TIMEOUT_S):
            async with self._lock:
                conn, self._conn = self._conn, None
                if conn is not None:
                    await trio.to_thread.run_sync(conn.close)

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
        now = _ts(utcnow())
        params = (
            str(uuid.uuid4()),
            email,
            password_hash,
            full_name,
            int(is_verified),
            Role(role).value,
            now,
            now,
        )

        def work(conn: sqlite3.Connection) -> User:
            rows = conn.execute(
                "INSERT INTO users (id, email, password_hash, full_name, is_verified, role, "
                "created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
                f"RETURNING {USER_COLUMNS}",
                params,
            ).fetchall()
            return _user(rows[0])

        return await self._run(work, *params)

    async def get_user(self, user_id: uuid.UUID, *, include_deleted: bool = False) -> User | None:
        sql = f"SELECT {USER_COLUMNS} FROM users WHERE id = ?"
        if not include_deleted:
            sql += " AND deleted_at IS NULL"

        def work(conn: sqlite3.Connection) -> User | None:
            row = conn.execute(sql, (str(user_id),)).fetchone()
            return None if row is None else _user(row)

        return await self._run(work)

    async def get_user_by_email(self, email: str) -> User | None:
        def work(conn: sqlite3.Connection) -> User | None:
            row = conn.execute(
                f"SELECT {USER_COLUMNS} FROM users "
                "WHERE lower(email) = lower(?) AND deleted_at IS NULL",
                (email,),
            ).fetchone()
            return None if row is None else _user(row)

        return await self._run(work, email)

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
        sets = ["updated_at = ?"]
        params: list[object] = [_ts(utcnow())]
        if full_name is not None:
            sets.append("full_name = ?")
            params.append(full_name)
        if avatar_url is not None or clear_avatar:
            sets.append("avatar_url = ?")
            params.append(avatar_url)
        if is_verified is not None:
            sets.append("is_verified = ?")
            params.append(int(is_verified))
        if is_active is not None:
            sets.append("is_active = ?")
            params.append(int(is_active))
        params.append(str(user_id))
        sql = (
            f"UPDATE users SET {', '.join(sets)} WHERE id = ? AND deleted_at IS NULL "
            f"RETURNING {USER_COLUMNS}"
        )

        def work(conn: sqlite3.Connection) -> User | None:
            rows = conn.execute(sql, params).fetchall()
            return _user(rows[0]) if rows else None

        return await self._run(work, *params)

    async def soft_delete_user(self, user_id: uuid.UUID) -> bool:
        now = _ts(utcnow())
        uid = str(user_id)

        def work(conn: sqlite3.Connection) -> bool:
            with _transaction(conn, write=True):
                cur = conn.execute(
                    "UPDATE users SET deleted_at = ?, updated_at = ? "
                    "WHERE id = ? AND deleted_at IS NULL",
                    (now, now, uid),
                )
                if cur.rowcount == 0:
                    return False
                conn.execute(
                    "UPDATE refresh_sessions SET revoked_at = ?, revoked_reason = ? "
                    "WHERE user_id = ? AND revoked_at IS NULL",
                    (now, REASON_USER_DELETED, uid),
                )
                return True

        return await self._run(work)

    async def list_users(self, query: UserQuery) -> tuple[list[User], int]:
        check_query(query)
        where = ["deleted_at IS NULL"]
        params: list[object] = []
        if query.is_active is not None:
            where.append("is_active = ?")
            params.append(int(query.is_active))
        if query.created_after is not None:
            where.append("created_at >= ?")
            params.append(_ts(query.created_after))
        if query.search:
            where.append(
                f"(py_lower(email) LIKE ? ESCAPE '{LIKE_ESCAPE}' "
                f"OR py_lower(full_name) LIKE ? ESCAPE '{LIKE_ESCAPE}')"
            )
            pattern = like_pattern(query.search)
            params += [pattern, pattern]
        where_sql = " AND ".join(where)
        order = ORDER_SQL[query.order]
        page_sql = (
            f"SELECT {USER_COLUMNS} FROM users WHERE {where_sql} "
            f"ORDER BY {_SORT_SQL[query.sort]} {order}, id {order} LIMIT ? OFFSET ?"
        )
        page_params = [*params, query.limit, (query.page - 1) * query.limit]

        def work(conn: sqlite3.Connection) -> tuple[list[User], int]:
            with _transaction(conn, write=False):
                total = conn.execute(
                    f"SELECT count(*) FROM users WHERE {where_sql}", params
                ).fetchone()[0]
                rows = conn.execute(page_sql, page_params).fetchall()
            return [_user(r) for r in rows], int(total)

        return await self._run(work, *params)

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
        params = (
            str(uuid.uuid4()),
            str(user_id),
            token_hash,
            _ts(utcnow()),
            _ts(expires_at),
            ip_address,
            user_agent,
        )

        def work(conn: sqlite3.Connection) -> RefreshSession:
            rows = conn.execute(
                "INSERT INTO refresh_sessions (id, user_id, token_hash, created_at, expires_at, "
                f"ip_address, user_agent) VALUES (?, ?, ?, ?, ?, ?, ?) "
                f"RETURNING {SESSION_COLUMNS}",
                params,
            ).fetchall()
            return _session(rows[0])

        return await self._run(work, *params)

    async def get_session(self, session_id: uuid.UUID) -> RefreshSession | None:
        def work(conn: sqlite3.Connection) -> RefreshSession | None:
            row = conn.execute(
                f"SELECT {SESSION_COLUMNS} FROM refresh_sessions WHERE id = ?",
                (str(session_id),),
            ).fetchone()
            return None if row is None else _session(row)

        return await self._run(work)

    async def rotate_session(
        self, session_id: uuid.UUID, *, presented_hash: str, new_hash: str, new_expires_at: datetime
    ) -> RotateOutcome:
        now = _ts(utcnow())
        sid = str(session_id)
        new_expires = _ts(new_expires_at)

        def work(conn: sqlite3.Connection) -> RotateOutcome:
            with _transaction(conn, write=True):
                cur = conn.execute(
                    "UPDATE refresh_sessions SET token_hash = ?, expires_at = ?, rotated_at = ? "
                    "WHERE id = ? AND token_hash = ? AND revoked_at IS NULL AND expires_at > ?",
                    (new_hash, new_expires, now, sid, presented_hash, now),
                )
                if cur.rowcount == 1:
                    return RotateOutcome.ROTATED
                row = conn.execute(
                    "SELECT revoked_at, expires_at FROM refresh_sessions WHERE id = ?", (sid,)
                ).fetchone()
                if row is None:
                    return RotateOutcome.UNKNOWN
                if row["revoked_at"] is not None or row["expires_at"] <= now:
                    return RotateOutcome.REVOKED
                conn.execute(
                    "UPDATE refresh_sessions SET revoked_at = ?, revoked_reason = ? WHERE id = ?",
                    (now, REASON_REUSE, sid),
                )
                return RotateOutcome.REUSED

        return await self._run(work, presented_hash, new_hash)

    async def revoke_session(self, session_id: uuid.UUID, *, reason: str) -> bool:
        now = _ts(utcnow())

        def work(conn: sqlite3.Connection) -> bool:
            cur = conn.execute(
                "UPDATE refresh_sessions SET revoked_at = ?, revoked_reason = ? "
                "WHERE id = ? AND revoked_at IS NULL",
                (now, reason, str(session_id)),
            )
            return cur.rowcount == 1

        return await self._run(work, reason)

    async def revoke_user_sessions(self, user_id: uuid.UUID, *, reason: str) -> int:
        now = _ts(utcnow())

        def work(conn: sqlite3.Connection) -> int:
            cur = conn.execute(
                "UPDATE refresh_sessions SET revoked_at = ?, revoked_reason = ? "
                "WHERE user_id = ? AND revoked_at IS NULL",
                (now, reason, str(user_id)),
            )
            return cur.rowcount

        return await self._run(work, reason)

    async def revoked_since(self, since: datetime) -> list[RefreshSession]:
        def work(conn: sqlite3.Connection) -> list[RefreshSession]:
            rows = conn.execute(
                f"SELECT {SESSION_COLUMNS} FROM refresh_sessions "
                "WHERE revoked_at >= ? ORDER BY revoked_at, id",
                (_ts(since),),
            ).fetchall()
            return [_session(r) for r in rows]

        return await self._run(work)

    # ------------------------------------------------------------ e-mail verification

    async def create_verification(
        self, *, user_id: uuid.UUID, token_hash: str, expires_at: datetime
    ) -> None:
        params = (token_hash, str(user_id), _ts(expires_at))

        def work(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO email_verifications (token_hash, user_id, expires_at) "
                "VALUES (?, ?, ?)",
                params,
            )

        await self._run(work, *params)

    async def consume_verification(self, token_hash: str) -> uuid.UUID | None:
        now = _ts(utcnow())

        def work(conn: sqlite3.Connection) -> uuid.UUID | None:
            with _transaction(conn, write=True):
                rows = conn.execute(
                    "UPDATE email_verifications SET used_at = ? "
                    "WHERE token_hash = ? AND used_at IS NULL AND expires_at > ? "
                    "RETURNING user_id",
                    (now, token_hash, now),
                ).fetchall()
                if not rows:
                    return None
                user_id: str = rows[0][0]
                cur = conn.execute(
                    "UPDATE users SET is_verified = 1, updated_at = ? "
                    "WHERE id = ? AND deleted_at IS NULL",
                    (now, user_id),
                )
                return uuid.UUID(user_id) if cur.rowcount == 1 else None

        return await self._run(work, token_hash)

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
        now = _ts(utcnow())
        params = (
            str(webhook_id),
            url,
            json.dumps(names),
            description,
            secret_ciphertext,
            now,
            now,
        )

        def work(conn: sqlite3.Connection) -> Webhook:
            rows = conn.execute(
                "INSERT INTO webhooks (id, url, events, description, secret_ciphertext, "
                "created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?) "
                f"RETURNING {WEBHOOK_COLUMNS}",
                params,
            ).fetchall()
            return _webhook(rows[0])

        return await self._run(work, url, description, secret_ciphertext, *names)

    async def get_webhook(self, webhook_id: uuid.UUID) -> Webhook | None:
        def work(conn: sqlite3.Connection) -> Webhook | None:
            row = conn.execute(
                f"SELECT {WEBHOOK_COLUMNS} FROM webhooks WHERE id = ?", (str(webhook_id),)
            ).fetchone()
            return None if row is None else _webhook(row)

        return await self._run(work)

    async def list_webhooks(self) -> list[Webhook]:
        def work(conn: sqlite3.Connection) -> list[Webhook]:
            rows = conn.execute(
                f"SELECT {WEBHOOK_COLUMNS} FROM webhooks ORDER BY created_at, id"
            ).fetchall()
            return [_webhook(r) for r in rows]

        return await self._run(work)

    async def delete_webhook(self, webhook_id: uuid.UUID) -> bool:
        def work(conn: sqlite3.Connection) -> bool:
            cur = conn.execute("DELETE FROM webhooks WHERE id = ?", (str(webhook_id),))
            return cur.rowcount == 1

        return await self._run(work)

    async def enqueue_webhook_deliveries(self, *, event: str, event_id: str, payload: str) -> int:
        now = _ts(utcnow())

        def work(conn: sqlite3.Connection) -> int:
            with _transaction(conn, write=True):
                webhook_ids = [
                    r[0]
                    for r in conn.execute(
                        "SELECT id FROM webhooks WHERE EXISTS (SELECT 1 FROM json_each("
                        "webhooks.events) WHERE json_each.value IN (?, ?)) ORDER BY id",
                        (event, WILDCARD_EVENT),
                    )
                ]
                queued = 0
                for webhook_id in webhook_ids:
                    cur = conn.execute(
                        "INSERT INTO webhook_deliveries (id, webhook_id, event, event_id, "
                        "payload, status, attempts, next_attempt_at, created_at, updated_at) "
                        "VALUES (?, ?, ?, ?, ?, 'pending', 0, ?, ?, ?) "
                        "ON CONFLICT (webhook_id, event_id) DO NOTHING",
                        (str(uuid.uuid4()), webhook_id, event, event_id, payload, now, now, now),
                    )
                    queued += cur.rowcount
                return queued

        return await self._run(work, event, event_id, payload)

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
        now_dt = utcnow()
        now, lease_end = _ts(now_dt), _ts(now_dt + timedelta(seconds=lease_s))
        not_in, not_in_params = _not_in("webhook_id", exclude)
        # Oldest due first, at most ``per_webhook`` of each endpoint. BEGIN IMMEDIATE
        # makes select-then-update atomic against other processes on the file.
        pick_sql = (
            "SELECT id FROM (SELECT id, next_attempt_at, row_number() OVER ("
            "PARTITION BY webhook_id ORDER BY next_attempt_at, id) AS rn "
            "FROM webhook_deliveries WHERE status = 'pending' AND next_attempt_at <= ?"
            f"{not_in}) WHERE rn <= ? ORDER BY next_attempt_at, id LIMIT ?"
        )
        pick_params = [now, *not_in_params, per_webhook, limit]
        columns = ", ".join(f"d.{c.strip()}" for c in DELIVERY_COLUMNS.split(","))
        webhook_columns = ", ".join(
            f"w.{c.strip()} AS w_{c.strip()}" for c in WEBHOOK_COLUMNS.split(",")
        )

        def work(conn: sqlite3.Connection) -> list[ClaimedDelivery]:
            with _transaction(conn, write=True):
                ids = [r[0] for r in conn.execute(pick_sql, pick_params)]
                if not ids:
                    return []
                marks = ", ".join("?" for _ in ids)
                conn.execute(
                    f"UPDATE webhook_deliveries SET next_attempt_at = ?, updated_at = ? "
                    f"WHERE id IN ({marks})",
                    (lease_end, now, *ids),
                )
                rows = conn.execute(
                    f"SELECT {columns}, {webhook_columns} FROM webhook_deliveries d "
                    f"JOIN webhooks w ON w.id = d.webhook_id WHERE d.id IN ({marks}) "
                    "ORDER BY d.created_at, d.id",
                    ids,
                ).fetchall()
            return [ClaimedDelivery(_delivery(r), _webhook(r, "w_")) for r in rows]

        return await self._run(work)

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
        params = (
            DeliveryStatus(status).value,
            None if next_attempt_at is None else _ts(next_attempt_at),
            status_code,
            error,
            _ts(utcnow()),
            str(delivery_id),
        )

        def work(conn: sqlite3.Connection) -> bool:
            cur = conn.execute(
                "UPDATE webhook_deliveries SET attempts = attempts + 1, status = ?, "
                "next_attempt_at = ?, last_status_code = ?, last_error = ?, updated_at = ? "
                "WHERE id = ? AND status = 'pending'",
                params,
            )
            return cur.rowcount == 1

        return await self._run(work, error)

    async def release_webhook_deliveries(self, delivery_ids: Collection[uuid.UUID]) -> int:
        if not delivery_ids:
            return 0
        now = _ts(utcnow())
        ids = [str(i) for i in delivery_ids]
        marks = ", ".join("?" for _ in ids)

        def work(conn: sqlite3.Connection) -> int:
            cur = conn.execute(
                f"UPDATE webhook_deliveries SET next_attempt_at = ?, updated_at = ? "
                f"WHERE id IN ({marks}) AND status = 'pending'",
                (now, now, *ids),
            )
            return cur.rowcount

        return await self._run(work)

    async def next_webhook_due_at(self, *, exclude: Collection[uuid.UUID] = ()) -> datetime | None:
        not_in, params = _not_in("webhook_id", exclude)

        def work(conn: sqlite3.Connection) -> datetime | None:
            row = conn.execute(
                "SELECT min(next_attempt_at) FROM webhook_deliveries "
                f"WHERE status = 'pending'{not_in}",
                params,
            ).fetchone()
            return _dt(row[0])

        return await self._run(work)

    async def list_webhook_deliveries(
        self,
        webhook_id: uuid.UUID,
        *,
        page: int = 1,
        limit: int = 20,
        status: DeliveryStatus | None = None,
    ) -> tuple[list[WebhookDelivery], int]:
        check_page(page, limit)
        where = "webhook_id = ?"
        params: list[object] = [str(webhook_id)]
        if status is not None:
            where += " AND status = ?"
            params.append(DeliveryStatus(status).value)
        page_sql = (
            f"SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries WHERE {where} "
            "ORDER BY created_at DESC, id DESC LIMIT ? OFFSET ?"
        )
        page_params = [*params, limit, (page - 1) * limit]

        def work(conn: sqlite3.Connection) -> tuple[list[WebhookDelivery], int]:
            with _transaction(conn, write=False):
                total = conn.execute(
                    f"SELECT count(*) FROM webhook_deliveries WHERE {where}", params
                ).fetchone()[0]
                rows = conn.execute(page_sql, page_params).fetchall()
            return [_delivery(r) for r in rows], int(total)

        return await self._run(work)

    async def prune_webhook_deliveries(self, *, finished_before: datetime) -> int:
        before = _ts(finished_before)

        def work(conn: sqlite3.Connection) -> int:
            cur = conn.execute(
                "DELETE FROM webhook_deliveries WHERE status <> 'pending' AND updated_at < ?",
                (before,),
            )
            return cur.rowcount

        return await self._run(work)
