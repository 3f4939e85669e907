"""Recently seen message ids, so a redelivered message reaches clients once (SPEC §4).

:class:`Dedupe` is the interface; :class:`MemoryDedupe` is the single-node
implementation (a Redis one, shared by every node, comes with the cluster issue).

The ingest actor asks :meth:`Dedupe.seen` *before* publishing and calls
:meth:`Dedupe.remember` only *after* the publish returned, so a crash in between never
turns a message into a "duplicate" that nobody received. Two copies of one id processed
at the same moment by two nodes can both get through (the Redis implementation narrows
that window; the single-node consumer handles its messages one at a time).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

__all__ = [
    "DEFAULT_MAX_KEYS",
    "DEFAULT_TTL_S",
    "GENERATIONS",
    "PURGE_CHUNK",
    "SHARDS",
    "Dedupe",
    "DedupeStatistics",
    "MemoryDedupe",
]

log = logging.getLogger("hub.bridge.dedupe")

#: SPEC §4: "a repeated ``id`` within 10 minutes is delivered to clients once".
DEFAULT_TTL_S = 600.0
#: Ids kept at most; beyond it the oldest are forgotten early (and counted).
DEFAULT_MAX_KEYS = 2_000_000
#: The window is split in this many generations; an id is kept between ``ttl`` and
#: ``ttl * (1 + 1/GENERATIONS)`` seconds.
GENERATIONS = 10
#: Expired ids forgotten per call at most (the rest on the next calls).
PURGE_CHUNK = 256
#: The ids are spread over this many dicts by hash: one dict of two million ids stalled
#: the trio loop for 22, 46 and 72 ms at its resizes (350k, 700k, 1.4M ids) on the
#: benchmark VM; a 64th of it resizes in about a millisecond.
SHARDS = 64
#: Seconds between two "forgetting ids early" warnings.
WARN_EVERY_S = 60.0


class Dedupe(Protocol):
    """A set of ids that forgets each id some time after it was remembered."""

    async def seen(self, key: str) -> bool:
        """True when ``key`` was remembered within the window."""
        ...

    async def remember(self, key: str) -> None:
        """Remember ``key`` for the window, starting now."""
        ...


@dataclass(frozen=True, slots=True)
class DedupeStatistics:
    """``keys``: ids held; ``evicted_early``: ids forgotten before the TTL because of
    ``max_keys``."""

    keys: int
    evicted_early: int


class MemoryDedupe:
    """In-process :class:`Dedupe`: id hashes in :data:`SHARDS` dicts (by hash) plus
    :data:`GENERATIONS` + 1 lists saying when each was added.

    Each id is kept as its 64-bit ``hash()`` (about 70 bytes per id instead of the
    string), so two different ids collide with probability about n²/2⁶⁵ (n = ids held:
    ~1e-7 at two million). A lookup is one dict probe. Expired generations, and those
    dropped early for ``max_keys``, are purged a few hundred ids per call
    (:data:`PURGE_CHUNK`), and no dict grows beyond a 64th of the ids, so the trio loop
    never stalls on this (at most 2 ms per call, against 210 ms with one dict and
    all-at-once purges, filling two million ids on the benchmark VM).

    Args:
        ttl_s: the window.
        max_keys: memory bound; when more ids are held, the oldest generation is dropped
            before its time (``statistics().evicted_early`` counts the ids, and a warning
            is logged), which shortens the window under extreme rates. The drop is
            purged in chunks too, so the bound is briefly exceeded by what is being
            purged.
        clock: monotonic seconds (tests pass a fake one).

    Cancellation:
        The methods are checkpoint-free and do not block; they cannot be cancelled midway.
    """

    def __init__(
        self,
        ttl_s: float = DEFAULT_TTL_S,
        *,
        max_keys: int = DEFAULT_MAX_KEYS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if ttl_s <= 0 or max_keys < 1:
            raise ValueError("ttl_s and max_keys must be positive")
        self.ttl_s = ttl_s
        self.max_keys = max_keys
        self._clock = clock
        self._span = ttl_s / GENERATIONS
        # hash -> the generation that added it last, spread over SHARDS dicts
        self._shards: list[dict[int, object]] = [{} for _ in range(SHARDS)]
        self._held = 0
        self._generation = object()
        self._current: list[int] = []
        self._started = clock()
        self._old: deque[tuple[object, list[int]]] = deque()  # oldest first
        self._purging: deque[tuple[object, list[int]]] = deque()
        self._evicted_early = 0
        self._warned_at = float("-inf")

    def _rotate(self) -> None:
        now = self._clock()
        if now - self._started < self._span:
            return
        if now - self._started >= self._span * (GENERATIONS + 1):  # idle: all expired
            self._purging.extend(self._old)
            self._purging.append((self._generation, self._current))
            self._old.clear()
            self._generation, self._current = object(), []
            self._started = now
            return
        while now - self._started >= self._span:
            self._old.append((self._generation, self._current))
            self._generation, self._current = object(), []
            self._started += self._span
            if len(self._old) > GENERATIONS:
                self._purging.append(self._old.popleft())

    def _purge(self, budget: int) -> None:
        """Forget ids of purged generations, at most ``budget``."""
        shards = self._shards
        while self._purging:
            generation, hashes = self._purging[0]
            while hashes:
                digest = hashes.pop()
                shard = shards[digest % SHARDS]
                if shard.get(digest) is generation:
                    del shard[digest]
                    self._held -= 1
                budget -= 1
                if not budget:
                    return
            self._purging.popleft()

    def _enforce_bound(self) -> None:
        pending = sum(len(hashes) for _, hashes in self._purging)
        while self._held - pending > self.max_keys and self._old:
            generation, hashes = self._old.popleft()
            self._evicted_early += len(hashes)
            self._purging.append((generation, hashes))
            pending += len(hashes)
            now = self._clock()
            if now - self._warned_at >= WARN_EVERY_S:
                self._warned_at = now
                log.warning(
                    "dedupe holds over %d ids; forgetting the oldest before %.0fs "
                    "(raise AMQP_DEDUPE_MAX_KEYS)",
                    self.max_keys,
                    self.ttl_s,
                )

    def contains(self, key: str) -> bool:
        """Synchronous :meth:`seen`."""
        self._rotate()
        if self._purging:
            self._purge(PURGE_CHUNK)
        digest = hash(key)
        return digest in self._shards[digest % SHARDS]

    def add(self, key: str) -> None:
        """Synchronous :meth:`remember`."""
        self._rotate()
        if self._purging:
            self._purge(PURGE_CHUNK)
        digest = hash(key)
        shard = self._shards[digest % SHARDS]
        if digest not in shard:
            self._held += 1
        shard[digest] = self._generation
        self._current.append(digest)
        if self._held > self.max_keys:
            self._enforce_bound()

    async def seen(self, key: str) -> bool:
        return self.contains(key)

    async def remember(self, key: str) -> None:
        self.add(key)

    def statistics(self) -> DedupeStatistics:
        """``keys`` counts what is still being purged too."""
        self._rotate()
        if self._purging:
            self._purge(PURGE_CHUNK)
        return DedupeStatistics(self._held, self._evicted_early)
