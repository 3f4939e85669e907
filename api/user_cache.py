"""Users cached in Redis under ``cache:user:<id>`` (``REDIS_URL`` set), read-through.

The cached copy leaves out the password hash. It is invalidated on every update and
delete, and also expires after :data:`CACHE_TTL_S`, which bounds staleness if an
invalidation is lost during a Redis outage (authorisation never depends on the cache:
revocations and storage decide). Without Redis, or when Redis fails, reads go to storage.
"""

from __future__ import annotations

import json
import logging
import uuid
from datetime import datetime
from typing import TYPE_CHECKING

from bridge.redis_kv import KVUnavailable, RedisKV
from storage.base import Role, User

if TYPE_CHECKING:
    from storage.base import Storage

log = logging.getLogger("hub.api.user_cache")

CACHE_TTL_S = 60


def _dump(user: User) -> str:
    return json.dumps(
        {
            "id": str(user.id),
            "email": user.email,
            "full_name": user.full_name,
            "avatar_url": user.avatar_url,
            "is_verified": user.is_verified,
            "is_active": user.is_active,
            "role": user.role.value,
            "created_at": user.created_at.isoformat(),
            "updated_at": user.updated_at.isoformat(),
        }
    )


def _load(text: str) -> User:
    data = json.loads(text)
    return User(
        id=uuid.UUID(data["id"]),
        email=data["email"],
        password_hash="",
        full_name=data["full_name"],
        avatar_url=data["avatar_url"],
        is_verified=data["is_verified"],
        is_active=data["is_active"],
        role=Role(data["role"]),
        created_at=datetime.fromisoformat(data["created_at"]),
        updated_at=datetime.fromisoformat(data["updated_at"]),
        deleted_at=None,
    )


class UserCache:
    """Read-through user cache; a no-op pass-through when ``kv`` is ``None``.

    Args:
        storage: the source of truth.
        kv: the Redis client, or ``None``.
    """

    def __init__(self, storage: Storage, kv: RedisKV | None) -> None:
        self._storage = storage
        self._kv = kv

    def _key(self, user_id: uuid.UUID | str) -> str:
        assert self._kv is not None
        return self._kv.key("cache", "user", str(user_id))

    async def get(self, user_id: uuid.UUID) -> User | None:
        """The live user (password hash blank when served from the cache), or ``None``."""
        if self._kv is not None:
            try:
                cached = await self._kv.get(self._key(user_id))
                if cached is not None:
                    return _load(cached)
            except KVUnavailable:
                pass
            except (ValueError, KeyError, TypeError):
                log.warning("dropping an unreadable cache entry")
        user = await self._storage.get_user(user_id)
        if user is not None:
            await self.put(user)
        return user

    async def put(self, user: User) -> None:
        if self._kv is None or user.deleted_at is not None:
            return
        try:
            await self._kv.set(self._key(user.id), _dump(user), ttl_s=CACHE_TTL_S)
        except KVUnavailable:
            pass

    async def invalidate(self, user_id: uuid.UUID | str) -> None:
        if self._kv is None:
            return
        try:
            await self._kv.delete(self._key(user_id))
        except KVUnavailable as error:
            log.warning("could not invalidate a cached user: %s", error)
