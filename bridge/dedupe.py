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
    """In-process :class:`Dedupe`: one dict of id hashes plus :data:`GENERATIONS` + 1
    lists saying when each was added.

    Each id is kept as its 64-bit ``hash()`` (about 70 bytes per id instead of the
    string), so two different ids collide with probability about n²/2⁶⁵ (n = ids held:
    ~1e-7 at two million). A lookup is one dict probe. Expired generations are purged
    a few hundred ids per call (:data:`PURGE_CHUNK`), so the trio loop never stalls.

    Args:
        ttl_s: the window.
        max_keys: memory bound; when more ids are held, the oldest generation is dropped
            before its time (``statistics().evicted_early`` counts the ids, and a warning
            is logged), which shortens the window under extreme rates.
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
        self._index: dict[int, object] = {}  # hash -> the generation that added it last
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
        if now - self._started >= self._span * (GENERATIONS + 1):
            self._index, self._current = {}, []
            self._old.clear()
            self._purging.clear()
            self._generation = object()
            self._started = now
            return
        while now - self._started >= self._span:
            self._old.append((self._generation, self._current))
            self._generation, self._current = object(), []
            self._started += self._span
            if len(self._old) > GENERATIONS:
                self._purging.append(self._old.popleft())

    def _purge(self, budget: int = 0) -> None:
        """Forget ids of expired generations, at most ``budget`` (0: all of them)."""
        index = self._index
        while self._purging:
            generation, hashes = self._purging[0]
            while hashes:
                digest = hashes.pop()
                if index.get(digest) is generation:
                    del index[digest]
                if budget:
                    budget -= 1
                    if not budget:
                        return
            self._purging.popleft()

    def _enforce_bound(self) -> None:
        while len(self._index) > self.max_keys and (self._old or self._purging):
            if self._old:
                generation, hashes = self._old.popleft()
                self._evicted_early += len(hashes)
                self._purging.append((generation, hashes))
            self._purge()
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
        return hash(key) in self._index

    def add(self, key: str) -> None:
        """Synchronous :meth:`remember`."""
        self._rotate()
        if self._purging:
            self._purge(PURGE_CHUNK)
        digest = hash(key)
        self._index[digest] = self._generation
        self._current.append(digest)
        if len(self._index) > self.max_keys:
            self._enforce_bound()

    async def seen(self, key: str) -> bool:
        return self.contains(key)

    async def remember(self, key: str) -> None:
        self.add(key)

    def statistics(self) -> DedupeStatistics:
        self._rotate()
        self._purge()
        return DedupeStatistics(len(self._index), self._evicted_early)
