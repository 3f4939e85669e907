"""Rate-limit counters in Redis, shared by every node (``REDIS_URL`` set).

Key ``ratelimit:<group>:<identifier>`` (after the client's prefix), counted with one Lua
script (``INCR``, and ``PEXPIRE`` on the window's first hit) so concurrent requests on
any node never lose a count or leave a key without expiry.

When Redis cannot be reached the limiter *fails open*: the request passes with the full
limit in its headers and a warning is logged (at most every
:data:`WARN_EVERY_S` seconds), because refusing all traffic during a cache outage would
be worse than briefly not limiting it.
"""

from __future__ import annotations

import logging
import time

from api.ratelimit import RateDecision, decide
from bridge.redis_kv import KVUnavailable, RedisKV
from hub.settings import RateLimit

log = logging.getLogger("hub.api.ratelimit")

WARN_EVERY_S = 10.0


class RedisRateLimiter:
    """:class:`api.ratelimit.RateLimiter` on a :class:`bridge.redis_kv.RedisKV`."""

    def __init__(self, kv: RedisKV) -> None:
        self._kv = kv
        self._warned_at = float("-inf")
        self.failed_open = 0

    async def hit(self, group: str, identifier: str, limit: RateLimit) -> RateDecision:
        key = self._kv.key("ratelimit", group, identifier)
        now = time.time()
        try:
            count, left_ms = await self._kv.incr_window(key, limit.period_s * 1000)
        except KVUnavailable as error:
            self.failed_open += 1
            if time.monotonic() - self._warned_at > WARN_EVERY_S:
                self._warned_at = time.monotonic()
                log.warning("rate limiter failing open, redis unavailable: %s", error)
            return decide(limit, 0, limit.period_s, now)
        return decide(limit, count, left_ms / 1000, now)
