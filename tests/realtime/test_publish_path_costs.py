"""What keeps the publish path cheap without changing what it produces: the in-process
broker's scheduling and memory shape, the notification body encoder, the cached clock.
"""

from __future__ import annotations

import gc
import json
import math
import time
from datetime import UTC, datetime
from typing import Any

import pytest
import trio

from actors.protocol import message_body
from api.envelope import utc_now_iso
from bridge.broker import Publication
from bridge.broker_memory import PUBLISH_YIELD_INTERVAL_S, MemoryBroker

#: Long enough for many yield intervals, short enough for a unit test.
RUN_S = 40 * PUBLISH_YIELD_INTERVAL_S


class Counter:
    """A handler that only counts (keeps no publication alive)."""

    def __init__(self) -> None:
        self.count = 0

    def handle_publication(self, channel: str, publication: Publication) -> None:
        self.count += 1


async def test_back_to_back_publishes_let_other_tasks_run_but_not_after_each_one() -> None:
    broker = MemoryBroker(Counter(), history_size=10, history_ttl_s=60)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ticker)
        await trio.lowlevel.checkpoint()
        ticks = published = 0
        started = time.perf_counter()
        while time.perf_counter() - started < RUN_S:
            await broker.publish("public.a", b'"data":{}')
            published += 1
        nursery.cancel_scope.cancel()
    assert ticks >= 2  # the other task ran during the run, more than once
    assert ticks < published / 2  # but the publisher did not yield after every publish


async def test_publish_is_always_a_cancellation_point() -> None:
    counter = Counter()
    broker = MemoryBroker(counter, history_size=10, history_ttl_s=60)
    for _ in range(3):  # whether or not it would have yielded
        with trio.CancelScope() as scope:
            scope.cancel()
            await broker.publish("public.a", b'"data":{}')
        assert scope.cancelled_caught
    assert counter.count == 0


def test_a_full_history_adds_nothing_for_the_garbage_collector_to_track() -> None:
    broker = MemoryBroker(Counter(), history_size=1000, history_ttl_s=3600, clock=lambda: 0.0)
    channels = [f"public.gc{i}" for i in range(10)]
    for name in channels:  # the streams themselves
        broker.publish_nowait(name, b'"data":{}', message_id=f"first-{name}")
    gc.collect()
    before = len(gc.get_objects())
    for i in range(10_000):  # fills every history (10 × 1000) and the id window
        broker.publish_nowait(channels[i % 10], b'"data":{}', message_id=f"m{i}")
    gc.collect()
    # A publication object per entry would be 10,000 more tracked objects (20,000 with
    # a named tuple around each).
    assert len(gc.get_objects()) - before < 500


def test_history_still_answers_with_publications() -> None:
    broker = MemoryBroker(Counter(), history_size=5, history_ttl_s=3600, clock=lambda: 0.0)
    first = broker.publish_nowait("public.h", b'"data":{"n":0}')
    for n in range(1, 4):
        broker.publish_nowait("public.h", f'"data":{{"n":{n}}}'.encode())
    result = broker.history_nowait("public.h", first)
    assert result.recovered
    assert [p.payload for p in result.publications] == [
        f'"data":{{"n":{n}}}'.encode() for n in range(1, 4)
    ]
    assert all(isinstance(p, Publication) for p in result.publications)


@pytest.mark.parametrize(
    "data",
    [
        {},
        {"a": 1, "b": [1, 2.5, None, True, {"c": 'é ☃ \n " \\'}], "d": -0.0, "e": 10**30},
        {"nested": {"deep": [[[{"x": "y"}]]]}, "unicode": "\u2028\ud7ff"},
    ],
)
def test_the_body_is_the_compact_strict_json_of_the_data(data: dict[str, Any]) -> None:
    expected = json.dumps(data, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    assert message_body(data) == b'"data":' + expected.encode()
    assert message_body(data, "a.b") == b'"data":' + expected.encode() + b',"event":"a.b"'


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_the_body_refuses_non_finite_numbers(bad: float) -> None:
    with pytest.raises(ValueError, match="JSON compliant"):
        message_body({"x": [bad]})


def test_the_body_refuses_cycles_and_objects_that_are_not_json() -> None:
    looped: dict[str, Any] = {"a": []}
    looped["a"].append(looped)
    with pytest.raises(ValueError, match="cycle"):
        message_body(looped)
    with pytest.raises(TypeError, match="not JSON serializable"):
        message_body({"when": datetime.now(UTC)})
    # A failure leaves nothing behind: the same objects encode afterwards.
    inner = {"k": 1}
    assert message_body({"a": inner, "b": inner}) == b'"data":{"a":{"k":1},"b":{"k":1}}'


def _reference_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def test_the_cached_clock_reads_like_datetime() -> None:
    for _ in range(2000):  # crosses millisecond (and maybe second) boundaries
        before = _reference_now()
        now = utc_now_iso()
        after = _reference_now()
        assert before <= now <= after
        assert len(now) == len("2025-01-31T12:00:00.123Z") and now.endswith("Z")
