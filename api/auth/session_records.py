"""Refresh sessions mirrored in Redis under ``session:user:<user_id>:<session_id>``.

A hash (``created_at``, ``expires_at``, ``ip_address``, ``user_agent``, ``rotated_at``)
that expires with the refresh token, so every node (and an operator with ``redis-cli``)
can see a user's live sessions cheaply. Storage stays the source of truth for rotation
and revocation; the mirror is written best-effort and a Redis failure is only logged.
"""

from __future__ import annotations

import logging
import time

from bridge.redis_kv import KVUnavailable, RedisKV

log = logging.getLogger("hub.api.sessions")


class SessionRecords:
    """Writes the mirror; does nothing when ``kv`` is ``None``."""

    def __init__(self, kv: RedisKV | None) -> None:
        self._kv = kv

    def _key(self, user_id: str, session_id: str) -> str:
        assert self._kv is not None
        return self._kv.key("session", "user", user_id, session_id)

    async def put(
        self,
        user_id: str,
        session_id: str,
        *,
        expires_at: float,
        ip_address: str | None = None,
        user_agent: str | None = None,
        rotated: bool = False,
    ) -> None:
        if self._kv is None:
            return
        now = time.time()
        record = {
            "user_id": user_id,
            "session_id": session_id,
            "expires_at": str(int(expires_at)),
            "updated_at": str(int(now)),
            "ip_address": ip_address or "",
            "user_agent": (user_agent or "")[:256],
            "rotated": "1" if rotated else "0",
        }
        try:
            await self._kv.hset_ttl(
                self._key(user_id, session_id), record, ttl_s=max(1, int(expires_at - now))
            )
        except KVUnavailable as error:
            log.warning("could not record a session in redis: %s", error)

    async def get(self, user_id: str, session_id: str) -> dict[str, str] | None:
        if self._kv is None:
            return None
        try:
            return await self._kv.hgetall(self._key(user_id, session_id)) or None
        except KVUnavailable:
            return None

    async def remove(self, user_id: str, session_id: str) -> None:
        if self._kv is None:
            return
        try:
            await self._kv.delete(self._key(user_id, session_id))
        except KVUnavailable as error:
            log.warning("could not remove a session from redis: %s", error)

    async def remove_user(self, user_id: str) -> None:
        if self._kv is None:
            return
        try:
            keys = await self._kv.scan_keys(self._key(user_id, "*"))
            await self._kv.delete(*keys)
        except KVUnavailable as error:
            log.warning("could not remove sessions from redis: %s", error)
