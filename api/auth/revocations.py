"""Revoked sessions and users, checked in memory on every request (no database hit).

Logout revokes one session (its ``sid``); a soft delete or deactivation revokes a user
(every token issued before that moment). An entry is only needed while an access token
it kills could still be valid, so it is dropped after the access-token lifetime: refresh
tokens of a revoked session are refused by storage itself (``rotate_session``).

At start the list is warmed from ``storage.revoked_since(now - access_ttl)``, and
:meth:`RevocationList.sync` pulls revocations written by other nodes (the node runs it
every :data:`SYNC_INTERVAL_S` seconds), so a logout on one node takes effect on all of
them within a couple of seconds even without a shared cache.

Listeners (the realtime core) are told about every new revocation synchronously, so
they can close the WebSockets of that session or user at once.

:class:`Revocations` is the interface; a Redis-shared implementation can replace
:class:`RevocationList` without touching its callers.
"""

from __future__ import annotations

import heapq
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Literal, Protocol

import trio

if TYPE_CHECKING:
    from api.auth.tokens import AccessClaims
    from storage.base import Storage

log = logging.getLogger("hub.api.revocations")

RevocationKind = Literal["session", "user"]
RevocationListener = Callable[[RevocationKind, str], None]

#: Seconds between two pulls of revocations made by other nodes.
SYNC_INTERVAL_S = 2.0
#: Seconds of overlap between two pulls (clock differences between nodes).
SYNC_OVERLAP_S = 30.0
#: ``revoked_reason`` under which storage revokes every session of a deleted user.
USER_REVOKE_REASONS = ("user_deleted", "user_deactivated")


class Revocations(Protocol):
    """What the API and the realtime core need from a revocation list."""

    def revoke_session(self, session_id: str, until_ts: float) -> None: ...

    def revoke_user(self, user_id: str, at_ts: float) -> None: ...

    def is_revoked(self, claims: AccessClaims) -> bool: ...

    def subscribe(self, callback: RevocationListener) -> Callable[[], None]: ...


class RevocationList:
    """The in-memory :class:`Revocations` of one node.

    Args:
        access_ttl_s: access-token lifetime; entries are kept this long.
        clock: wall-clock seconds (tests may pass their own).
    """

    def __init__(self, access_ttl_s: float, *, clock: Callable[[], float] = time.time) -> None:
        self.access_ttl_s = access_ttl_s
        self._clock = clock
        self._sessions: dict[str, float] = {}  # session id -> keep until
        self._users: dict[str, tuple[float, float]] = {}  # user id -> (revoked at, keep until)
        self._expiry: list[tuple[float, RevocationKind, str]] = []
        self._listeners: list[RevocationListener] = []
        self._synced_until: datetime | None = None

    # -- the interface -----------------------------------------------------------------
    def revoke_session(self, session_id: str, until_ts: float) -> None:
        """Kill every token of ``session_id`` until ``until_ts`` (epoch seconds)."""
        self._prune()
        if until_ts <= self._clock():
            return
        known = self._sessions.get(session_id)
        if known is not None and known >= until_ts:
            return
        self._sessions[session_id] = until_ts
        heapq.heappush(self._expiry, (until_ts, "session", session_id))
        if known is None:
            self._notify("session", session_id)

    def revoke_user(self, user_id: str, at_ts: float) -> None:
        """Kill every token of ``user_id`` issued at or before ``at_ts``."""
        self._prune()
        until = at_ts + self.access_ttl_s
        if until <= self._clock():
            return
        known = self._users.get(user_id)
        if known is not None and known[0] >= at_ts:
            return
        self._users[user_id] = (at_ts, until)
        heapq.heappush(self._expiry, (until, "user", user_id))
        self._notify("user", user_id)

    def is_revoked(self, claims: AccessClaims) -> bool:
        """True when the token's session or user was revoked. Pure lookup, no I/O."""
        until = self._sessions.get(claims.session_id)
        if until is not None and until > self._clock():
            return True
        user = self._users.get(claims.user_id)
        return user is not None and claims.issued_at <= user[0]

    def subscribe(self, callback: RevocationListener) -> Callable[[], None]:
        """Call ``callback(kind, id)`` on every new revocation; returns an unsubscribe
        function. Callbacks run synchronously inside ``revoke_*`` and must not block;
        an exception in one is logged and does not stop the others."""
        self._listeners.append(callback)

        def unsubscribe() -> None:
            if callback in self._listeners:
                self._listeners.remove(callback)

        return unsubscribe

    # -- keeping in step with storage --------------------------------------------------
    async def warm(self, storage: Storage) -> int:
        """Load the revocations of the last access-token lifetime; returns how many."""
        since = datetime.fromtimestamp(self._clock() - self.access_ttl_s, UTC)
        return await self._pull(storage, since)

    async def sync(self, storage: Storage) -> int:
        """Load revocations made since the last pull (by any node); returns how many."""
        if self._synced_until is None:
            return await self.warm(storage)
        return await self._pull(storage, self._synced_until - timedelta(seconds=SYNC_OVERLAP_S))

    async def run_sync(
        self,
        storage: Storage,
        *,
        interval_s: float = SYNC_INTERVAL_S,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Pull revocations every ``interval_s`` until cancelled. A failed pull (storage
        down) is logged and retried at the next tick; it never raises.

        Cancellation:
            Cancel the surrounding scope to stop; a pull in progress is abandoned.
        """
        task_status.started()
        while True:
            await trio.sleep(interval_s)
            try:
                await self.sync(storage)
            except Exception as error:
                log.warning("revocation sync failed: %s", error)

    async def _pull(self, storage: Storage, since: datetime) -> int:
        started = datetime.fromtimestamp(self._clock(), UTC)
        sessions = await storage.revoked_since(since)
        for session in sessions:
            revoked_at = session.revoked_at or started
            at_ts = revoked_at.timestamp()
            self.revoke_session(str(session.id), at_ts + self.access_ttl_s)
            if session.revoked_reason in USER_REVOKE_REASONS:
                self.revoke_user(str(session.user_id), at_ts)
        self._synced_until = started
        return len(sessions)

    # -- internals ---------------------------------------------------------------------
    def _notify(self, kind: RevocationKind, ident: str) -> None:
        for listener in list(self._listeners):
            try:
                listener(kind, ident)
            except Exception:
                log.exception("revocation listener failed")

    def _prune(self) -> None:
        now = self._clock()
        while self._expiry and self._expiry[0][0] <= now:
            until, kind, ident = heapq.heappop(self._expiry)
            if kind == "session":
                if self._sessions.get(ident) == until:
                    del self._sessions[ident]
            elif (entry := self._users.get(ident)) is not None and entry[1] == until:
                del self._users[ident]

    def statistics(self) -> dict[str, int]:
        """Entry counts (metrics, tests)."""
        return {"sessions": len(self._sessions), "users": len(self._users)}
