"""The storage contract (``storage.base.Storage``), run against SQLite and PostgreSQL.

Every test gets a migrated storage of one backend (see ``conftest.py``); the same
assertions must hold for both.
"""

from __future__ import annotations

import hashlib
import socket
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import trio

from bridge.aio import AsyncioThread
from hub.settings import load_settings
from storage import (
    Conflict,
    RotateOutcome,
    Storage,
    StorageUnavailable,
    User,
    UserQuery,
    open_storage,
)
from storage.base import Role
from storage.migrations import load_migrations
from storage.postgres import PostgresStorage
from tests.storage.conftest import PG_DSN, StorageFactory, drop_schema

INJECTION = "'; DROP TABLE users;--"
#: Every migration version, in order (what a fresh database gets).
ALL_VERSIONS = [m.version for m in load_migrations("sqlite")]
HASH = "$2b$12$" + "x" * 53


def token_hash(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def soon(days: float = 7) -> datetime:
    return datetime.now(UTC) + timedelta(days=days)


async def make_user(storage: Storage, email: str, full_name: str = "Some One") -> User:
    return await storage.create_user(email=email, password_hash=HASH, full_name=full_name)


# ---------------------------------------------------------------------------- lifecycle


async def test_is_a_storage(storage: Storage, backend: str) -> None:
    assert isinstance(storage, Storage)
    assert storage.backend == backend
    await storage.ping()


async def test_migrate_applies_once(storage_factory: StorageFactory) -> None:
    storage = await storage_factory.open()
    assert await storage.migrate() == ALL_VERSIONS
    assert await storage.migrate() == []
    await make_user(storage, "one@example.com")


async def test_concurrent_migrate_applies_once(storage_factory: StorageFactory) -> None:
    first, second = await storage_factory.open(), await storage_factory.open()
    results: list[list[str]] = []

    async def migrate(storage: Storage) -> None:
        results.append(await storage.migrate())

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(migrate, first)
            nursery.start_soon(migrate, second)
    assert sorted(results) == [[], ALL_VERSIONS]
    user = await make_user(first, "both@example.com")
    assert await second.get_user(user.id) == user


async def test_aclose_is_idempotent(storage_factory: StorageFactory) -> None:
    storage = await storage_factory.open()
    await storage.aclose()
    await storage.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await storage.ping()


# -------------------------------------------------------------------------------- users


async def test_create_and_get_user(storage: Storage) -> None:
    before = datetime.now(UTC)
    user = await storage.create_user(
        email="Alice@Example.com",
        password_hash=HASH,
        full_name="Alice Liddell",
        role=Role.ADMIN,
        is_verified=True,
    )
    assert isinstance(user.id, uuid.UUID)
    assert (user.email, user.full_name, user.password_hash) == (
        "Alice@Example.com",
        "Alice Liddell",
        HASH,
    )
    assert user.role is Role.ADMIN and user.is_admin
    assert user.is_verified and user.is_active
    assert user.avatar_url is None and user.deleted_at is None
    assert user.created_at.tzinfo is not None and user.created_at.utcoffset() == timedelta(0)
    assert before <= user.created_at == user.updated_at <= datetime.now(UTC)
    assert await storage.get_user(user.id) == user
    assert await storage.get_user_by_email("alice@example.COM") == user

    plain = await make_user(storage, "bob@example.com")
    assert plain.role is Role.USER and not plain.is_admin and not plain.is_verified


async def test_unknown_user_is_none(storage: Storage) -> None:
    assert await storage.get_user(uuid.uuid4()) is None
    assert await storage.get_user(uuid.uuid4(), include_deleted=True) is None
    assert await storage.get_user_by_email("nobody@example.com") is None


async def test_email_is_unique_whatever_its_case(storage: Storage) -> None:
    await make_user(storage, "Carol@Example.com")
    with pytest.raises(Conflict):
        await make_user(storage, "carol@example.COM")
    with pytest.raises(Conflict):
        await make_user(storage, "Carol@Example.com")
    _, total = await storage.list_users(UserQuery())
    assert total == 1


async def test_soft_delete_frees_the_email_and_revokes_sessions(storage: Storage) -> None:
    user = await make_user(storage, "Dan@example.com")
    sessions = [
        await storage.create_session(
            user_id=user.id, token_hash=token_hash(f"t{i}"), expires_at=soon()
        )
        for i in range(2)
    ]
    assert await storage.soft_delete_user(user.id) is True
    assert await storage.soft_delete_user(user.id) is False
    assert await storage.soft_delete_user(uuid.uuid4()) is False

    assert await storage.get_user(user.id) is None
    assert await storage.get_user_by_email("dan@example.com") is None
    deleted = await storage.get_user(user.id, include_deleted=True)
    assert deleted is not None and deleted.deleted_at is not None
    assert await storage.update_user(user.id, full_name="Ghost") is None
    assert await storage.list_users(UserQuery()) == ([], 0)
    for session in sessions:
        got = await storage.get_session(session.id)
        assert got is not None and got.revoked_at == deleted.deleted_at
        assert got.revoked_reason == "user_deleted"

    again = await make_user(storage, "DAN@example.com")
    assert again.id != user.id
    assert await storage.get_user_by_email("dan@example.com") == again
    with pytest.raises(Conflict):
        await make_user(storage, "dan@EXAMPLE.com")


async def test_update_user(storage: Storage) -> None:
    user = await make_user(storage, "erin@example.com", "Erin")
    updated = await storage.update_user(
        user.id, full_name="Erin B", avatar_url="https://cdn.example.com/e.png"
    )
    assert updated is not None
    assert (updated.full_name, updated.avatar_url) == ("Erin B", "https://cdn.example.com/e.png")
    assert updated.updated_at >= user.updated_at and updated.created_at == user.created_at

    flags = await storage.update_user(user.id, is_verified=True, is_active=False)
    assert flags is not None and flags.is_verified and not flags.is_active
    assert flags.avatar_url == "https://cdn.example.com/e.png"

    cleared = await storage.update_user(user.id, clear_avatar=True)
    assert cleared is not None and cleared.avatar_url is None and cleared.full_name == "Erin B"
    assert await storage.get_user(user.id) == cleared

    assert await storage.update_user(uuid.uuid4(), full_name="x") is None
    with pytest.raises(ValueError, match="not both"):
        await storage.update_user(user.id, avatar_url="https://x.example/a.png", clear_avatar=True)


@pytest.mark.parametrize(
    "name",
    [
        INJECTION,
        "' OR 1=1--",
        'Robert"); DROP TABLE refresh_sessions;--',
        "\\'; SELECT pg_sleep(10);--",
        "Zoë 🚀 ünïcödé",
    ],
)
async def test_strings_round_trip_verbatim(storage: Storage, name: str) -> None:
    user = await make_user(storage, "o'brien@example.com", name)
    assert (await storage.get_user(user.id)) == user
    assert user.full_name == name
    assert (await storage.get_user_by_email("O'Brien@example.com")) == user
    users, total = await storage.list_users(UserQuery(search=name))
    assert (users, total) == ([user], 1)
    await storage.ping()


async def test_nul_byte_is_a_value_error(storage: Storage) -> None:
    user = await make_user(storage, "nul@example.com")
    with pytest.raises(ValueError, match="NUL"):
        await make_user(storage, "nul2@example.com", "bad\x00name")
    with pytest.raises(ValueError, match="NUL"):
        await make_user(storage, "n\x00l@example.com")
    with pytest.raises(ValueError, match="NUL"):
        await storage.update_user(user.id, full_name="a\x00b")
    with pytest.raises(ValueError, match="NUL"):
        await storage.list_users(UserQuery(search="\x00"))
    with pytest.raises(ValueError, match="NUL"):
        await storage.create_session(
            user_id=user.id, token_hash="h", expires_at=soon(), user_agent="\x00"
        )
    assert await storage.get_user(user.id) == user
    assert (await storage.list_users(UserQuery()))[1] == 1


async def test_too_long_values_are_value_errors(storage: Storage) -> None:
    user = await make_user(storage, "long@example.com", "x" * 255)
    with pytest.raises(ValueError, match="rejected by the database"):
        await make_user(storage, "long2@example.com", "x" * 256)
    with pytest.raises(ValueError, match="rejected by the database"):
        await make_user(storage, "l" * 250 + "@example.com")
    with pytest.raises(ValueError, match="rejected by the database"):
        await storage.update_user(user.id, avatar_url="https://x.example/" + "a" * 500)
    assert await storage.get_user(user.id) == user


# ------------------------------------------------------------------------------ listing


async def test_list_users_pages(storage: Storage) -> None:
    created = [
        await make_user(storage, f"user{i:02d}@example.com", f"User {i:02d}") for i in range(25)
    ]
    seen: list[User] = []
    for page, size in ((1, 10), (2, 10), (3, 5)):
        users, total = await storage.list_users(UserQuery(page=page, limit=10, order="asc"))
        assert total == 25 and len(users) == size
        seen += users
    assert seen == sorted(created, key=lambda u: (u.created_at, u.id))
    assert await storage.list_users(UserQuery(page=4, limit=10)) == ([], 25)
    newest, _ = await storage.list_users(UserQuery(limit=1))
    assert newest == [max(created, key=lambda u: (u.created_at, u.id))]


@pytest.mark.parametrize("sort", ["created_at", "updated_at", "email", "full_name"])
@pytest.mark.parametrize("order", ["asc", "desc"])
async def test_list_users_sorts(storage: Storage, sort: str, order: str) -> None:
    names = ["bob", "Alice", "carol", "Dave", "eve", "_under", "Zed"]
    users = [await make_user(storage, f"{n}@example.com", n) for n in names]
    # Touch some users so updated_at order differs from created_at order.
    for user in users[::2]:
        await storage.update_user(user.id, is_verified=True)
    current = [u for u in [await storage.get_user(u.id) for u in users] if u is not None]

    def key(u: User) -> tuple[object, str]:
        value = getattr(u, sort)
        return (value.lower() if isinstance(value, str) else value, str(u.id))

    expected = sorted(current, key=key, reverse=order == "desc")
    got, total = await storage.list_users(UserQuery(sort=sort, order=order, limit=100))
    assert total == len(names)
    assert [u.full_name for u in got] == [u.full_name for u in expected]


@pytest.mark.parametrize(
    "query",
    [
        UserQuery(sort="password_hash"),
        UserQuery(sort="email; DROP TABLE users;--"),
        UserQuery(sort="created_at desc, (SELECT 1)"),
        UserQuery(order="sideways"),
        UserQuery(order="asc; DROP TABLE users"),
        UserQuery(page=0),
        UserQuery(limit=0),
    ],
)
async def test_list_users_rejects_bad_queries(storage: Storage, query: UserQuery) -> None:
    await make_user(storage, "keep@example.com")
    with pytest.raises(ValueError, match="must be"):
        await storage.list_users(query)
    assert (await storage.list_users(UserQuery()))[1] == 1


async def test_list_users_filters(storage: Storage) -> None:
    first = await make_user(storage, "first@example.com", "First")
    second = await make_user(storage, "second@example.com", "Second")
    third = await make_user(storage, "third@example.com", "Third")
    await storage.update_user(second.id, is_active=False)

    active, total = await storage.list_users(UserQuery(is_active=True, order="asc"))
    assert ([u.id for u in active], total) == ([first.id, third.id], 2)
    inactive, total = await storage.list_users(UserQuery(is_active=False))
    assert ([u.id for u in inactive], total) == ([second.id], 1)

    since, total = await storage.list_users(UserQuery(created_after=second.created_at, order="asc"))
    assert ([u.id for u in since], total) == ([second.id, third.id], 2)
    naive = second.created_at.replace(tzinfo=None)  # naive datetimes are taken as UTC
    assert (await storage.list_users(UserQuery(created_after=naive)))[1] == 2
    combined, total = await storage.list_users(
        UserQuery(created_after=second.created_at, is_active=True)
    )
    assert ([u.id for u in combined], total) == ([third.id], 1)


async def test_list_users_search(storage: Storage) -> None:
    people = {
        "percent": await make_user(storage, "pct@example.com", "100% sure"),
        "plain": await make_user(storage, "plain@example.com", "100 percent"),
        "underscore": await make_user(storage, "a_b@example.com", "Under Score"),
        "axb": await make_user(storage, "axb@example.com", "Ay Ex Bee"),
        "backslash": await make_user(storage, "bs@example.com", "back\\slash"),
        "mixed": await make_user(storage, "MiXeD.Case@Example.org", "Grace HOPPER"),
        "injection": await make_user(storage, "inj@example.com", INJECTION),
    }

    async def search(text: str) -> set[str]:
        users, total = await storage.list_users(UserQuery(search=text, limit=100))
        assert total == len(users)
        found = {u.id for u in users}
        return {name for name, user in people.items() if user.id in found}

    assert await search("%") == {"percent"}
    assert await search("_") == {"underscore"}
    assert await search("a_b") == {"underscore"}
    assert await search("\\") == {"backslash"}
    assert await search("hopper") == {"mixed"}
    assert await search("mixed.case@EXAMPLE") == {"mixed"}
    assert await search("grace h") == {"mixed"}
    assert await search("100") == {"percent", "plain"}
    assert await search("DROP TABLE") == {"injection"}
    assert await search("' OR '1'='1") == set()
    assert await search("nothing-like-this") == set()
    assert len(await search("")) == len(people)  # empty search: no filter


# ---------------------------------------------------------------------- refresh sessions


async def test_create_and_get_session(storage: Storage) -> None:
    user = await make_user(storage, "sess@example.com")
    expires = soon()
    session = await storage.create_session(
        user_id=user.id,
        token_hash=token_hash("jti-1"),
        expires_at=expires,
        ip_address="2001:db8::1",
        user_agent="pytest/" + INJECTION,
    )
    assert session.user_id == user.id and session.token_hash == token_hash("jti-1")
    assert session.expires_at == expires
    assert session.rotated_at is None and session.revoked_at is None
    assert session.revoked_reason is None
    assert (session.ip_address, session.user_agent) == ("2001:db8::1", "pytest/" + INJECTION)
    assert await storage.get_session(session.id) == session
    assert await storage.get_session(uuid.uuid4()) is None
    with pytest.raises(ValueError, match="rejected by the database"):
        await storage.create_session(user_id=uuid.uuid4(), token_hash="h", expires_at=soon())


async def test_rotate_then_reuse_revokes_the_family(storage: Storage) -> None:
    user = await make_user(storage, "rot@example.com")
    session = await storage.create_session(
        user_id=user.id, token_hash=token_hash("a"), expires_at=soon(1)
    )
    new_expiry = soon(7)
    outcome = await storage.rotate_session(
        session.id,
        presented_hash=token_hash("a"),
        new_hash=token_hash("b"),
        new_expires_at=new_expiry,
    )
    assert outcome is RotateOutcome.ROTATED
    rotated = await storage.get_session(session.id)
    assert rotated is not None
    assert rotated.token_hash == token_hash("b") and rotated.expires_at == new_expiry
    assert rotated.rotated_at is not None and rotated.revoked_at is None

    # The old token again: reuse; the whole family dies, the current token too.
    outcome = await storage.rotate_session(
        session.id, presented_hash=token_hash("a"), new_hash=token_hash("c"), new_expires_at=soon()
    )
    assert outcome is RotateOutcome.REUSED
    revoked = await storage.get_session(session.id)
    assert revoked is not None and revoked.revoked_at is not None
    assert revoked.revoked_reason == "reuse" and revoked.token_hash == token_hash("b")
    outcome = await storage.rotate_session(
        session.id, presented_hash=token_hash("b"), new_hash=token_hash("d"), new_expires_at=soon()
    )
    assert outcome is RotateOutcome.REVOKED


async def test_rotate_unknown_expired_and_revoked(storage: Storage) -> None:
    user = await make_user(storage, "exp@example.com")
    outcome = await storage.rotate_session(
        uuid.uuid4(), presented_hash="x", new_hash="y", new_expires_at=soon()
    )
    assert outcome is RotateOutcome.UNKNOWN

    expired = await storage.create_session(
        user_id=user.id, token_hash=token_hash("old"), expires_at=soon(-1)
    )
    outcome = await storage.rotate_session(
        expired.id, presented_hash=token_hash("old"), new_hash="n", new_expires_at=soon()
    )
    assert outcome is RotateOutcome.REVOKED
    assert await storage.get_session(expired.id) == expired  # unchanged

    live = await storage.create_session(
        user_id=user.id, token_hash=token_hash("l"), expires_at=soon()
    )
    assert await storage.revoke_session(live.id, reason="logout") is True
    outcome = await storage.rotate_session(
        live.id, presented_hash=token_hash("l"), new_hash="n", new_expires_at=soon()
    )
    assert outcome is RotateOutcome.REVOKED
    after = await storage.get_session(live.id)
    assert after is not None and after.revoked_reason == "logout"


async def test_parallel_rotations_exactly_one_wins(storage: Storage) -> None:
    user = await make_user(storage, "race@example.com")

    async def rotate(
        session_id: uuid.UUID, presented: str, new: str, outcomes: list[RotateOutcome]
    ) -> None:
        outcome = await storage.rotate_session(
            session_id,
            presented_hash=token_hash(presented),
            new_hash=token_hash(new),
            new_expires_at=soon(),
        )
        outcomes.append(outcome)

    for round_ in range(10):
        current = f"r{round_}"
        session = await storage.create_session(
            user_id=user.id, token_hash=token_hash(current), expires_at=soon()
        )
        outcomes: list[RotateOutcome] = []
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(rotate, session.id, current, f"left{round_}", outcomes)
                nursery.start_soon(rotate, session.id, current, f"right{round_}", outcomes)
        assert sorted(o.value for o in outcomes) == ["reused", "rotated"]
        final = await storage.get_session(session.id)
        assert final is not None and final.revoked_reason == "reuse"
        assert final.token_hash in {token_hash(f"left{round_}"), token_hash(f"right{round_}")}


async def test_revoke_and_revoked_since(storage: Storage) -> None:
    alice = await make_user(storage, "alice@example.com")
    bob = await make_user(storage, "bob@example.com")
    a1, a2, a3 = [
        await storage.create_session(
            user_id=alice.id, token_hash=token_hash(f"a{i}"), expires_at=soon()
        )
        for i in range(3)
    ]
    b1 = await storage.create_session(
        user_id=bob.id, token_hash=token_hash("b1"), expires_at=soon()
    )

    start = datetime.now(UTC)
    assert await storage.revoked_since(start) == []
    assert await storage.revoke_session(a1.id, reason="logout") is True
    assert await storage.revoke_session(a1.id, reason="again") is False
    assert await storage.revoke_session(uuid.uuid4(), reason="logout") is False
    first = await storage.get_session(a1.id)
    assert first is not None and first.revoked_reason == "logout" and first.revoked_at is not None

    assert await storage.revoke_user_sessions(alice.id, reason="password_changed") == 2
    assert await storage.revoke_user_sessions(alice.id, reason="password_changed") == 0
    assert await storage.revoke_user_sessions(uuid.uuid4(), reason="x") == 0

    since = await storage.revoked_since(start)
    assert since[0].id == a1.id
    assert {s.id for s in since} == {a1.id, a2.id, a3.id}
    assert all(s.revoked_at is not None and s.revoked_at >= start for s in since)
    assert {s.revoked_reason for s in since[1:]} == {"password_changed"}
    assert await storage.revoked_since(first.revoked_at) == since  # inclusive bound
    latest = max(s.revoked_at for s in since if s.revoked_at is not None)
    assert await storage.revoked_since(latest + timedelta(microseconds=1)) == []
    untouched = await storage.get_session(b1.id)
    assert untouched == b1


# ------------------------------------------------------------------- e-mail verification


async def test_verification_is_consumed_once(storage: Storage) -> None:
    user = await make_user(storage, "verify@example.com")
    await storage.create_verification(
        user_id=user.id, token_hash=token_hash("v"), expires_at=soon(1)
    )
    with pytest.raises(Conflict):
        await storage.create_verification(
            user_id=user.id, token_hash=token_hash("v"), expires_at=soon(1)
        )
    assert await storage.consume_verification(token_hash("v")) == user.id
    verified = await storage.get_user(user.id)
    assert verified is not None and verified.is_verified
    assert verified.updated_at >= user.updated_at
    assert await storage.consume_verification(token_hash("v")) is None
    assert await storage.consume_verification(token_hash("unknown")) is None


async def test_verification_expired_or_deleted_user(storage: Storage) -> None:
    user = await make_user(storage, "late@example.com")
    await storage.create_verification(
        user_id=user.id, token_hash=token_hash("late"), expires_at=soon(-1)
    )
    assert await storage.consume_verification(token_hash("late")) is None
    fresh = await storage.get_user(user.id)
    assert fresh is not None and not fresh.is_verified

    await storage.create_verification(
        user_id=user.id, token_hash=token_hash("gone"), expires_at=soon()
    )
    await storage.soft_delete_user(user.id)
    assert await storage.consume_verification(token_hash("gone")) is None


async def test_parallel_consumption_succeeds_once(storage: Storage) -> None:
    user = await make_user(storage, "twice@example.com")
    await storage.create_verification(
        user_id=user.id, token_hash=token_hash("t"), expires_at=soon()
    )
    results: list[uuid.UUID | None] = []

    async def consume() -> None:
        results.append(await storage.consume_verification(token_hash("t")))

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            for _ in range(4):
                nursery.start_soon(consume)
    assert results.count(user.id) == 1 and results.count(None) == 3


# ----------------------------------------------------------------------- open_storage


async def test_open_storage_sqlite_from_settings(tmp_path: Path) -> None:
    settings = load_settings(hub_data_dir=tmp_path, database_url=None)
    async with open_storage(settings) as storage:
        assert storage.backend == "sqlite"
        assert await storage.migrate() == ALL_VERSIONS
        await make_user(storage, "file@example.com")
    assert settings.sqlite_path.is_file()
    with pytest.raises(trio.ClosedResourceError):
        await storage.ping()


@pytest.mark.postgres
async def test_open_storage_postgres_from_settings(postgres_dsn: str, aio: AsyncioThread) -> None:
    settings = load_settings(database_url=postgres_dsn, jwt_secret_key="k" * 32, db_pool_size=3)
    schema = f"test_open_{uuid.uuid4().hex[:12]}"
    with pytest.raises(ValueError, match="bridge"):
        async with open_storage(settings):
            pass
    try:
        async with open_storage(settings, aio, schema=schema) as storage:
            assert storage.backend == "postgresql"
            assert await storage.migrate() == ALL_VERSIONS
            await make_user(storage, "pg@example.com")
    finally:
        await aio.run(drop_schema, PG_DSN, schema)


async def test_unreachable_postgres_fails_fast(aio: AsyncioThread) -> None:
    """No server at all: opening works (lazy pool), every call is StorageUnavailable."""
    with socket.socket() as probe:  # a port that nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    storage = await PostgresStorage.open(f"postgresql://postgres@127.0.0.1:{port}/x", aio)
    try:
        for call in (storage.ping, storage.migrate, lambda: storage.get_user(uuid.uuid4())):
            start = trio.current_time()
            with trio.fail_after(5), pytest.raises(StorageUnavailable):
                await call()
            assert trio.current_time() - start < 5
    finally:
        await storage.aclose()
