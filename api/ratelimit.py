"""Fixed-window rate limits per group and identifier (SPEC §2), in memory.

A *group* names a limit of the settings (``register``, ``login``, ``auth``, ``public``,
``admin``); the *identifier* is a client IP or a user id. Each ``(group, identifier)``
has one counter per window of ``period_s`` seconds: the first hit starts the window, the
counter is reset when it ends — the same semantics as the Redis version
(``INCR`` + ``EXPIRE`` on ``ratelimit:<group>:<identifier>``).

:class:`RateLimiter` is the interface; :class:`MemoryRateLimiter` serves one node and
``api.ratelimit_redis.RedisRateLimiter`` shares counters between nodes.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from hub.settings import RateLimit

#: Hits between two sweeps of expired windows in the memory limiter.
SWEEP_EVERY = 1024


@dataclass(frozen=True, slots=True)
class RateDecision:
    """The answer for one request, and the values of the ``X-RateLimit-*`` headers."""

    allowed: bool
    limit: int
    remaining: int
    reset_at: int  # epoch seconds when the window ends
    retry_after: int  # seconds to wait when not allowed (0 otherwise)

    def headers(self) -> dict[str, str]:
        return {
            "X-RateLimit-Limit": str(self.limit),
            "X-RateLimit-Remaining": str(self.remaining),
            "X-RateLimit-Reset": str(self.reset_at),
        }


def decide(limit: RateLimit, count: int, window_left_s: float, now: float) -> RateDecision:
    """The decision after the ``count``-th hit of a window with ``window_left_s`` left."""
    left = max(window_left_s, 0.0)
    allowed = count <= limit.count
    return RateDecision(
        allowed=allowed,
        limit=limit.count,
        remaining=max(limit.count - count, 0),
        reset_at=math.ceil(now + left),
        retry_after=0 if allowed else max(1, math.ceil(left)),
    )


class RateLimiter(Protocol):
    async def hit(self, group: str, identifier: str, limit: RateLimit) -> RateDecision:
        """Count one request of ``identifier`` in ``group`` and say whether it may pass.
        Never raises for a backend outage: an implementation that cannot count lets
        the request through (fails open) and logs a warning."""
        ...


class MemoryRateLimiter:
    """Counters of this node only (no ``REDIS_URL``).

    Args:
        clock: wall-clock seconds (tests may pass their own).

    Backpressure:
        None needed: ``hit`` is O(1) and never waits. Memory is bounded by the number of
        identifiers seen in one window; expired windows are swept every
        :data:`SWEEP_EVERY` hits.
    """

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._windows: dict[tuple[str, str], tuple[float, int]] = {}  # key -> (ends, count)
        self._hits = 0

    async def hit(self, group: str, identifier: str, limit: RateLimit) -> RateDecision:
        return self.hit_nowait(group, identifier, limit)

    def hit_nowait(self, group: str, identifier: str, limit: RateLimit) -> RateDecision:
        """Synchronous twin of :meth:`hit`."""
        now = self._clock()
        self._hits += 1
        if self._hits % SWEEP_EVERY == 0:
            self._sweep(now)
        key = (group, identifier)
        ends, count = self._windows.get(key, (0.0, 0))
        if ends <= now:
            ends, count = now + limit.period_s, 0
        count += 1
        self._windows[key] = (ends, count)
        return decide(limit, count, ends - now, now)

    def _sweep(self, now: float) -> None:
        for key in [k for k, (ends, _) in self._windows.items() if ends <= now]:
            del self._windows[key]
