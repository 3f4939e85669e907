"""A small key-value client for Redis, for rate limits, session records and the user cache.

These are rare, small commands, so redis-py's *synchronous* client runs in trio worker
threads (``trio.to_thread.run_sync``) rather than bringing asyncio into the API path.
Connection and socket timeouts are short, and after a failure the client stays
*open-circuit* for :data:`RETRY_AFTER_FAILURE_S` seconds, answering
:class:`KVUnavailable` at once — so a Redis outage costs callers one timeout, not one per
request. Callers degrade (the rate limiter fails open, the cache is bypassed).

Every key is prefixed with ``prefix`` (a constructor argument, so tests can isolate
themselves on a shared Redis).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import redis
import trio

log = logging.getLogger("hub.bridge.redis_kv")

T = TypeVar("T")

SOCKET_TIMEOUT_S = 0.5
#: Seconds during which calls fail fast after a connection failure.
RETRY_AFTER_FAILURE_S = 2.0
#: Worker threads talking to Redis at once.
KV_THREADS = 8

# INCR the counter; start the window on the first hit. Returns {count, ms left}.
_RATE_SCRIPT = """
local count = redis.call('INCR', KEYS[1])
local ttl = redis.call('PTTL', KEYS[1])
if count == 1 or ttl < 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
  ttl = tonumber(ARGV[1])
end
return {count, ttl}
"""


class KVUnavailable(Exception):
    """Redis could not be reached or answered with an error."""


class RedisKV:
    """Prefixed Redis commands run off the trio loop.

    Args:
        url: ``redis://…``.
        prefix: prepended to every key (e.g. ``"test-1a2b:"``); empty in production.

    Backpressure:
        At most :data:`KV_THREADS` commands run at once; further callers wait.

    Cancellation:
        A cancelled caller stops waiting at once; the command finishes in its thread
        and the answer is dropped.
    """

    def __init__(self, url: str, *, prefix: str = "") -> None:
        self.prefix = prefix
        self._client = redis.Redis.from_url(
            url,
            socket_timeout=SOCKET_TIMEOUT_S,
            socket_connect_timeout=SOCKET_TIMEOUT_S,
            health_check_interval=30,
            decode_responses=True,
        )
        self._rate_script = self._client.register_script(_RATE_SCRIPT)
        self._limiter = trio.CapacityLimiter(KV_THREADS)
        self._down_until = 0.0

    def key(self, *parts: str) -> str:
        """``prefix`` + the parts joined with ``:``."""
        return self.prefix + ":".join(parts)

    async def _run(self, fn: Callable[[], T]) -> T:
        if time.monotonic() < self._down_until:
            raise KVUnavailable("redis is unavailable (recent failure)")

        def call() -> T:
            try:
                return fn()
            except redis.RedisError as error:
                raise KVUnavailable(f"{type(error).__name__}: {error}") from None

        try:
            return await trio.to_thread.run_sync(
                call, limiter=self._limiter, abandon_on_cancel=True
            )
        except KVUnavailable:
            self._down_until = time.monotonic() + RETRY_AFTER_FAILURE_S
            raise

    async def ping(self) -> None:
        """Raise :class:`KVUnavailable` unless Redis answers (ignores the open circuit)."""
        self._down_until = 0.0
        await self._run(self._client.ping)

    async def incr_window(self, key: str, period_ms: int) -> tuple[int, int]:
        """Atomically count a hit in a fixed window; returns ``(count, ms left)``."""
        result: Any = await self._run(lambda: self._rate_script(keys=[key], args=[period_ms]))
        return int(result[0]), int(result[1])

    async def get(self, key: str) -> str | None:
        value: Any = await self._run(lambda: self._client.get(key))
        return None if value is None else str(value)

    async def set(self, key: str, value: str, *, ttl_s: int) -> None:
        await self._run(lambda: self._client.set(key, value, ex=ttl_s))

    async def delete(self, *keys: str) -> int:
        if not keys:
            return 0
        result: Any = await self._run(lambda: self._client.delete(*keys))
        return int(result)

    async def hset_ttl(self, key: str, mapping: Mapping[str, str], *, ttl_s: int) -> None:
        """Replace the hash at ``key`` with ``mapping`` and expire it in ``ttl_s``."""

        def run() -> None:
            pipe = self._client.pipeline(transaction=True)
            pipe.delete(key)
            pipe.hset(key, mapping=dict(mapping))
            pipe.expire(key, ttl_s)
            pipe.execute()

        await self._run(run)

    async def hgetall(self, key: str) -> dict[str, str]:
        value: Any = await self._run(lambda: self._client.hgetall(key))
        return dict(value)

    async def scan_keys(self, pattern: str) -> list[str]:
        """Every key matching ``pattern`` (``SCAN``; for small sets such as one user's
        sessions)."""
        return await self._run(lambda: [str(k) for k in self._client.scan_iter(pattern, 200)])

    async def aclose(self) -> None:
        """Close the connection pool. Idempotent."""
        await trio.to_thread.run_sync(self._client.close)
