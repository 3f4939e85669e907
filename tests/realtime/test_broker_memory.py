"""Unit tests of the in-process broker: offsets, history for ``since``, TTL, dedupe."""

from __future__ import annotations

import pytest
import trio

from bridge.broker import DEDUPE_WINDOW_S, Publication, parse_offset
from bridge.broker_memory import MemoryBroker, open_memory_broker


class Recorder:
    """A handler that keeps what it was given."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, Publication]] = []

    def handle_publication(self, channel: str, publication: Publication) -> None:
        self.seen.append((channel, publication))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(size: int = 3, ttl: float = 60.0) -> tuple[MemoryBroker, Recorder, Clock]:
    recorder, clock = Recorder(), Clock()
    broker = MemoryBroker(recorder, history_size=size, history_ttl_s=ttl, clock=clock)
    return broker, recorder, clock


def seqs(publications: list[Publication]) -> list[int]:
    return [parse_offset(p.offset)[1] for p in publications]  # type: ignore[index]


async def test_offsets_count_per_channel_and_reach_the_handler() -> None:
    broker, recorder, _ = make()
    a1 = await broker.publish("public.a", b"1")
    a2 = await broker.publish("public.a", b"2")
    b1 = await broker.publish("public.b", b"3")
    assert parse_offset(a1)[1] == 1 and parse_offset(a2)[1] == 2  # type: ignore[index]
    assert parse_offset(b1)[1] == 1  # type: ignore[index]
    assert parse_offset(a1)[0] != parse_offset(b1)[0]  # type: ignore[index]
    assert [(c, p.payload) for c, p in recorder.seen] == [
        ("public.a", b"1"),
        ("public.a", b"2"),
        ("public.b", b"3"),
    ]


async def test_history_since() -> None:
    broker, _, _ = make(size=3)
    offsets = [await broker.publish("c", str(i).encode()) for i in range(1, 6)]  # keeps 3,4,5
    epoch = parse_offset(offsets[0])[0]  # type: ignore[index]

    result = await broker.history("c", offsets[2])  # after 3 → 4, 5
    assert result.recovered and seqs(result.publications) == [4, 5]
    assert result.position == offsets[-1]

    result = await broker.history("c", offsets[1])  # after 2 → 3,4,5 all kept
    assert result.recovered and seqs(result.publications) == [3, 4, 5]

    assert not (await broker.history("c", offsets[0])).recovered  # 2 was dropped
    assert (await broker.history("c", offsets[-1])).publications == []
    assert (await broker.history("c", offsets[-1])).recovered
    for foreign in (f"{epoch}:99", "other:3", "garbage", f"{epoch}:-1", ""):
        result = await broker.history("c", foreign)
        assert not result.recovered and result.publications == []
    fresh = await broker.history("c", None)
    assert fresh.recovered and fresh.publications == [] and fresh.position == offsets[-1]


async def test_position_of_an_unpublished_channel_stays_valid() -> None:
    broker, _, _ = make()
    position = (await broker.history("quiet", None)).position
    assert parse_offset(position)[1] == 0  # type: ignore[index]
    first = await broker.publish("quiet", b"x")
    result = await broker.history("quiet", position)
    assert result.recovered and [p.offset for p in result.publications] == [first]


async def test_ttl_drops_old_entries() -> None:
    broker, _, clock = make(size=10, ttl=60)
    old = await broker.publish("c", b"old")
    clock.now += 30
    mid = await broker.publish("c", b"mid")
    clock.now += 31  # "old" is now 61 s old
    assert not (await broker.history("c", parse_offset(old)[0] + ":0")).recovered  # type: ignore[index]
    result = await broker.history("c", old)
    assert result.recovered and [p.offset for p in result.publications] == [mid]
    clock.now += 60
    assert not (await broker.history("c", old)).recovered


async def test_idle_streams_are_forgotten_unless_subscribed() -> None:
    broker, _, clock = make(size=10, ttl=60)
    await broker.publish("gone", b"x")
    await broker.publish("kept", b"x")
    await broker.subscribe("kept")
    clock.now += 61
    broker.prune()
    assert broker.statistics()["streams"] == 1
    offset = await broker.publish("gone", b"y")
    assert parse_offset(offset)[1] == 1  # type: ignore[index]  # a new epoch starts over


async def test_history_size_zero_keeps_offsets_only() -> None:
    broker, _, _ = make(size=0)
    first = await broker.publish("c", b"1")
    second = await broker.publish("c", b"2")
    assert not (await broker.history("c", first)).recovered
    assert (await broker.history("c", second)).recovered


async def test_repeated_message_id_is_published_once() -> None:
    broker, recorder, clock = make()
    first = await broker.publish("c", b"1", message_id="m1")
    again = await broker.publish("c", b"1", message_id="m1")
    other_channel = await broker.publish("d", b"1", message_id="m1")
    assert again == first and other_channel != first
    assert len(recorder.seen) == 2
    clock.now += DEDUPE_WINDOW_S + 1
    broker.prune()
    assert await broker.publish("c", b"1", message_id="m1") != first
    assert broker.statistics()["duplicates"] == 1


async def test_publish_is_atomic_under_cancellation() -> None:
    broker, recorder, _ = make()
    with trio.CancelScope() as scope:
        scope.cancel()
        await broker.publish("c", b"never")
    assert recorder.seen == []


@pytest.mark.parametrize("ttl", [0.5])
async def test_open_memory_broker_runs_its_pruner(ttl: float, autojump_clock: object) -> None:
    recorder = Recorder()
    async with open_memory_broker(recorder, history_size=5, history_ttl_s=ttl) as broker:
        await broker.publish("c", b"x")
        await trio.sleep(ttl * 3)
        assert broker.statistics()["streams"] == 0


class Dropping:
    """A handler that keeps nothing (as the hub: a publication goes out and is freed)."""

    def handle_publication(self, channel: str, publication: Publication) -> None:
        pass


def test_history_and_dedupe_keep_no_object_the_garbage_collector_tracks() -> None:
    """What the broker keeps per publication (history, remembered ids) must not be a
    tracked object: made at the publish rate while as many old ones are freed, such
    objects pile up in the collector's youngest generation until a pass that stops the
    loop for tens of milliseconds (80-100 ms at 10,000 messages/s on a node)."""
    import gc

    clock = Clock()
    broker = MemoryBroker(Dropping(), history_size=100, history_ttl_s=60.0, clock=clock)
    channels = [f"public.c{i}" for i in range(100)]
    for i in range(1_000):  # every stream exists and the history is full
        broker.publish_nowait(channels[i % 100], b"{}", message_id=f"warm-{i}")
    gc.collect()
    gc.disable()
    try:
        before = len(gc.get_objects(0))
        offsets = [
            broker.publish_nowait(channels[i % 100], b"{}", message_id=f"m-{i}")
            for i in range(20_000)
        ]
        grown = len(gc.get_objects(0)) - before - 1  # the list of offsets
    finally:
        gc.enable()
    # 20,000 history entries and remembered ids held (10,000 and 20,000): none tracked.
    assert grown < 200, f"{grown} tracked objects kept for 20,000 publications"
    assert broker.statistics()["dedupe_entries"] == 21_000
    # Still a working window and history: a repeat gets its original's offset.
    assert broker.publish_nowait(channels[7], b"{}", message_id="m-7") == offsets[7]
    assert broker.statistics()["duplicates"] == 1
    history = broker.history_nowait(channels[7], offsets[-293])  # then 2 more on it
    assert history.recovered
    assert [p.offset for p in history.publications] == offsets[-193::100]
