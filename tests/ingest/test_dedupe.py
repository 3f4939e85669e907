"""The in-memory dedupe window, on a fake clock."""

from __future__ import annotations

import pytest

from bridge.dedupe import GENERATIONS, PURGE_CHUNK, MemoryDedupe


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_an_id_is_seen_for_at_least_the_ttl_and_forgotten_soon_after() -> None:
    clock = FakeClock()
    dedupe = MemoryDedupe(600, clock=clock)
    assert not await dedupe.seen("a")
    await dedupe.remember("a")
    for _ in range(600):
        clock.now += 1
        if clock.now - 1000 < 600:
            assert await dedupe.seen("a")
    clock.now = 1000 + 600 + 600 / GENERATIONS + 0.001
    assert not await dedupe.seen("a")


async def test_ids_remembered_later_stay_longer() -> None:
    clock = FakeClock()
    dedupe = MemoryDedupe(10, clock=clock)
    dedupe.add("early")
    clock.now += 9
    dedupe.add("late")
    clock.now += 2.5  # 11.5 s after "early", 2.5 s after "late"
    assert not dedupe.contains("early")
    assert dedupe.contains("late")


async def test_a_long_idle_gap_forgets_everything() -> None:
    clock = FakeClock()
    dedupe = MemoryDedupe(10, clock=clock)
    dedupe.add("x")
    clock.now += 10_000
    assert not dedupe.contains("x")
    assert dedupe.statistics().keys == 0


async def test_max_keys_drops_the_oldest_generation_early() -> None:
    clock = FakeClock()
    dedupe = MemoryDedupe(100, max_keys=1000, clock=clock)
    for i in range(900):
        dedupe.add(f"old-{i}")
    clock.now += 100 / GENERATIONS  # next generation
    for i in range(200):
        dedupe.add(f"new-{i}")
    stats = dedupe.statistics()
    assert stats.keys <= 1000 and stats.evicted_early == 900
    assert not dedupe.contains("old-0")
    assert dedupe.contains("new-199")


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="positive"):
        MemoryDedupe(0)


async def test_expired_ids_are_forgotten_a_chunk_per_call() -> None:
    # So that forgetting a large generation never holds the trio loop.
    clock = FakeClock()
    dedupe = MemoryDedupe(10, clock=clock)
    for i in range(5 * PURGE_CHUNK):
        dedupe.add(f"id-{i}")
    clock.now += 10 + 2 * 10 / GENERATIONS
    assert dedupe.statistics().keys == 4 * PURGE_CHUNK  # one chunk per call
    seen = [dedupe.contains(f"id-{i}") for i in range(4)]  # three more chunks
    assert dedupe.statistics().keys == 0
    assert seen == [True, True, True, False]  # what waited for its chunk still counted


async def test_an_early_drop_is_purged_in_chunks_too() -> None:
    clock = FakeClock()
    dedupe = MemoryDedupe(100, max_keys=1000, clock=clock)
    for i in range(900):
        dedupe.add(f"old-{i}")
    clock.now += 100 / GENERATIONS
    for i in range(101):
        dedupe.add(f"new-{i}")  # the 101st goes over the bound: the old generation goes
    stats = dedupe.statistics()  # which purges one chunk
    assert stats.evicted_early == 900
    assert stats.keys == 1001 - PURGE_CHUNK
    for _ in range(3):
        dedupe.contains("x")
    assert dedupe.statistics().keys == 101
