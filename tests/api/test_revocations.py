"""RevocationList: in-memory checks, expiry, listeners, warming from real storage."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

from api.auth.revocations import RevocationList
from api.auth.tokens import AccessClaims
from storage import open_storage
from tests.harness import make_settings

TTL = 3600.0


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def token(user: str = "u1", session: str = "s1", issued_at: float = 1_000_000.0) -> AccessClaims:
    return AccessClaims(user, session, "user", issued_at, issued_at + TTL, "j")


def test_session_revocation_until_expiry() -> None:
    clock = Clock()
    revocations = RevocationList(TTL, clock=clock)
    assert not revocations.is_revoked(token())
    revocations.revoke_session("s1", clock.now + TTL)
    assert revocations.is_revoked(token())
    assert not revocations.is_revoked(token(session="s2"))
    clock.now += TTL + 1
    assert not revocations.is_revoked(token())
    revocations.revoke_session("other", clock.now + 10)  # triggers pruning
    assert revocations.statistics() == {"sessions": 1, "users": 0}


def test_user_revocation_kills_only_tokens_issued_before() -> None:
    clock = Clock()
    revocations = RevocationList(TTL, clock=clock)
    revocations.revoke_user("u1", clock.now)
    assert revocations.is_revoked(token(issued_at=clock.now - 5))
    assert revocations.is_revoked(token(issued_at=clock.now))
    assert not revocations.is_revoked(token(issued_at=clock.now + 1))
    assert not revocations.is_revoked(token(user="u2", issued_at=clock.now - 5))


def test_listeners_hear_each_new_revocation_once() -> None:
    clock = Clock()
    revocations = RevocationList(TTL, clock=clock)
    heard: list[tuple[str, str]] = []

    def broken(kind: str, ident: str) -> None:
        raise RuntimeError("listener bug")

    revocations.subscribe(broken)
    unsubscribe = revocations.subscribe(lambda kind, ident: heard.append((kind, ident)))
    revocations.revoke_session("s1", clock.now + 10)
    revocations.revoke_session("s1", clock.now + 5)  # already known
    revocations.revoke_user("u1", clock.now)
    assert heard == [("session", "s1"), ("user", "u1")]
    unsubscribe()
    revocations.revoke_session("s2", clock.now + 10)
    assert heard == [("session", "s1"), ("user", "u1")]


def test_past_revocations_are_ignored() -> None:
    clock = Clock()
    revocations = RevocationList(TTL, clock=clock)
    revocations.revoke_session("s1", clock.now - 1)
    revocations.revoke_user("u1", clock.now - TTL - 1)
    assert revocations.statistics() == {"sessions": 0, "users": 0}


async def test_warm_and_sync_from_storage(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    async with open_storage(settings) as storage:
        await storage.migrate()
        users = [
            await storage.create_user(email=f"u{i}@example.com", password_hash="x", full_name="U")
            for i in range(3)
        ]
        expires = datetime.now(UTC) + timedelta(days=1)
        sessions = [
            await storage.create_session(
                user_id=u.id, token_hash=uuid.uuid4().hex, expires_at=expires
            )
            for u in users
        ]
        await storage.revoke_session(sessions[0].id, reason="logout")
        await storage.soft_delete_user(users[1].id)

        revocations = RevocationList(TTL)
        heard: list[tuple[str, str]] = []
        revocations.subscribe(lambda kind, ident: heard.append((kind, ident)))
        assert await revocations.warm(storage) == 2
        now = time.time()
        assert revocations.is_revoked(token(str(users[0].id), str(sessions[0].id), now))
        # the deleted user: every token issued before the delete, whatever its session
        assert revocations.is_revoked(token(str(users[1].id), "any-session", now - 10))
        assert not revocations.is_revoked(token(str(users[2].id), str(sessions[2].id), now))
        assert ("user", str(users[1].id)) in heard

        # another node revokes: the next sync picks it up
        await storage.revoke_session(sessions[2].id, reason="logout")
        await revocations.sync(storage)
        assert revocations.is_revoked(token(str(users[2].id), str(sessions[2].id), now))
        assert heard.count(("session", str(sessions[2].id))) == 1
