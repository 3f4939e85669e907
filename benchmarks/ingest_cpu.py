"""CPU cost of the ingest path per message: RabbitMQ → ingest actor → ``Realtime.publish``.

Unlike :mod:`benchmarks.ingest` this measures CPU time, not wall-clock rates, so it is
usable on a busy machine. The node side runs in this process (one trio loop:
``IngestLink``, ``IngestActor``, ``MemoryDedupe``, ``Realtime`` on a real ``Hub`` and
``MemoryBroker``, no WebSocket subscribers, so fan-out costs nothing); a producer process
(:class:`benchmarks.ingest.Producer`) publishes the benchmark's messages.

Usage::

    .venv/bin/python -m benchmarks.ingest_cpu drain --count 60000 --warm 110000 --cpu 0
    .venv/bin/python -m benchmarks.ingest_cpu paced --rate 5000 --duration 8 --warm 110000 --cpu 0

``drain``: the queue is filled first (``--warm`` + ``--count`` messages, no consumer),
then the node drains it; CPU is measured over the last ``--count`` messages (the first
``--warm`` ones bring the 100k-entry id windows and the histories to their steady state).
``paced``: after draining ``--warm`` messages, the producer publishes open loop at
``--rate`` for ``--duration`` seconds while the node consumes; CPU is measured after the
first second. This is the shape of the benchmark's "50%" phase, with its small delivery
batches. Both print the latency from the message's scheduled send time (``data.t``) to
``handle_publication`` (before fan-out; every 8th message), the garbage collector's
pauses, context switches, deliveries per socket read and per batch the actor took.
``--cpu 0`` pins the node like the benchmark does (the producer is not pinned);
``--null`` replaces the realtime core by a no-op (what is left: AMQP and the actor);
``--gc-freeze`` calls ``gc.freeze()`` before measuring.

Process CPU is ``time.process_time()`` (all threads); per-thread figures come from
``/proc/self/task``. Compare trees by running them interleaved: on a shared machine the
absolute figures move with the load. Needs RabbitMQ on 127.0.0.1:5672 (a throw-away
vhost is created and deleted).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import multiprocessing
import os
import re
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from actors.channel import FanoutBatch
from actors.hub import Hub
from actors.ingest import IngestActor, IngestStatistics
from actors.realtime import Realtime
from benchmarks.ingest import Producer, ProducerConfig
from benchmarks.loadgen import percentile
from bridge.amqp_ingest import IngestLink, declare_ingest_topology
from bridge.amqp_wire import open_amqp_connection
from bridge.broker import Publication
from bridge.broker_memory import open_memory_broker
from bridge.dedupe import MemoryDedupe
from hub.settings import Settings

CHANNELS = 1000
PAD = 120  # ~200-byte messages, like the benchmark's default --frame-bytes
CLK_TCK = os.sysconf("SC_CLK_TCK")
_T = re.compile(rb'"t":(\d+)')


class GcPauses:
    """Durations of the garbage collector's passes, by generation (``gc.callbacks``)."""

    def __init__(self) -> None:
        self.pauses_ms: dict[int, list[float]] = {0: [], 1: [], 2: []}
        self._started = 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            elapsed = (time.perf_counter() - self._started) * 1e3
            self.pauses_ms[info["generation"]].append(elapsed)

    def clear(self) -> None:
        for pauses in self.pauses_ms.values():
            pauses.clear()

    def summary(self) -> dict[str, str]:
        return {
            f"gen{gen}": f"n={len(p)} max={max(p, default=0):.1f}ms sum={sum(p):.1f}ms"
            for gen, p in self.pauses_ms.items()
        }


def thread_cpu() -> dict[str, float]:
    """CPU seconds of this process's threads, user and system: the main (trio) thread
    and all others."""
    result = {"trio_user": 0.0, "trio_sys": 0.0, "threads_user": 0.0, "threads_sys": 0.0}
    for task in Path("/proc/self/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:
            continue
        fields = stat.rpartition(")")[2].split()
        name = "trio" if int(task.name) == os.getpid() else "threads"
        result[f"{name}_user"] += int(fields[11]) / CLK_TCK
        result[f"{name}_sys"] += int(fields[12]) / CLK_TCK
        with contextlib.suppress(OSError):
            for line in (task / "status").read_text().splitlines():
                if line.endswith("ctxt_switches:") or "ctxt_switches:" in line:
                    result["switches"] = result.get("switches", 0.0) + int(line.split()[1])
    return result


class TimingHub(Hub):
    """A hub that samples the send→publish latency of every 8th publication."""

    def __init__(self) -> None:
        super().__init__()
        self.latencies_ms: list[float] = []
        self._n = 0

    def handle_publication(self, channel: str, publication: Publication) -> None:
        self._n += 1
        if not self._n & 7:
            match = _T.search(publication.payload)
            if match:
                self.latencies_ms.append((time.time_ns() - int(match[1])) / 1e6)
        super().handle_publication(channel, publication)


class NullPublisher:
    """``--null``: publishes nothing (what is left is the AMQP side and the actor)."""

    batch = FanoutBatch()

    async def publish(self, channels: list[str], data: dict[str, Any], **_: Any) -> None:
        await trio.lowlevel.checkpoint()

    def fanout_batch(self) -> FanoutBatch:
        return self.batch


def _producer(url: str, mode: str, amount: float, duration: float, tag: str) -> None:
    os.sched_setaffinity(0, range(os.cpu_count() or 1))  # not the node's CPU only
    producer = Producer(ProducerConfig(url, 0, tag, CHANNELS, PAD, None))
    if mode == "fill":
        producer.fill(int(amount))
    else:
        producer.run(amount, duration)
    producer.connection.close()


def run_producer(url: str, mode: str, amount: float, duration: float = 0.0) -> Any:
    process = multiprocessing.get_context("spawn").Process(
        target=_producer, args=(url, mode, amount, duration, uuid.uuid4().hex[:8]), daemon=True
    )
    process.start()
    return process


async def declare(url: str) -> None:
    async with open_amqp_connection(url, name="cpu-bench/declare") as conn:
        await declare_ingest_topology(conn, await conn.open_channel())


async def wait_for(
    actor: IngestActor, predicate: Callable[[IngestStatistics], bool], poll_s: float = 0.1
) -> None:
    """Poll (rather than ``actor.wait_until``, which would wake this task per batch)."""
    with trio.fail_after(300):
        while not predicate(actor.statistics()):  # noqa: ASYNC110
            await trio.sleep(poll_s)


async def node(url: str, args: argparse.Namespace) -> dict[str, Any]:
    settings = Settings(_env_file=None, amqp_url=url)  # type: ignore[call-arg]
    hub = TimingHub()
    pauses = GcPauses()
    async with open_memory_broker(
        hub, history_size=settings.history_size, history_ttl_s=settings.history_ttl
    ) as broker:
        hub.broker = broker
        realtime = Realtime(settings, hub, broker, lambda token: None)  # type: ignore[arg-type,return-value]
        link = IngestLink(
            url, name="cpu-bench/ingest", prefetch=settings.amqp_prefetch, node_id="cpu-bench"
        )
        actor = IngestActor(
            NullPublisher() if args.null else realtime,
            MemoryDedupe(settings.amqp_dedupe_ttl_s),
            link,
            ack_batch=min(settings.amqp_ack_batch, max(1, settings.amqp_prefetch // 2)),
            ack_interval_s=settings.amqp_ack_interval_ms / 1000,
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(link.run)
            await nursery.start(actor.run)
            await wait_for(actor, lambda s: s.published >= args.warm)
            if args.gc_freeze:  # what a node could do once it has started
                # Before the producer starts: the collection stalls the loop, and
                # messages it held up would count in the measured latency.
                gc.collect()
                gc.freeze()
            if args.mode == "paced":
                producer = run_producer(url, "run", args.rate, args.duration)
                await wait_for(actor, lambda s: s.published > args.warm)
                await trio.sleep(1.0)
            hub.latencies_ms.clear()
            pauses.clear()
            cpu0, threads0, wall0 = time.process_time(), thread_cpu(), time.monotonic()
            first = actor.statistics().published
            batches0, reads0 = link.batches, link.reads
            if args.mode == "drain":
                await wait_for(actor, lambda s: s.published >= args.warm + args.count)
            else:
                await trio.to_thread.run_sync(producer.join, abandon_on_cancel=True)
                await trio.sleep(0.5)  # the last deliveries
            cpu1, threads1, wall1 = time.process_time(), thread_cpu(), time.monotonic()
            stats = actor.statistics()
            batches = link.batches - batches0
            reads = link.reads - reads0
            await actor.stop()
            nursery.cancel_scope.cancel()
    count = stats.published - first
    latencies = hub.latencies_ms
    return {
        "messages": count,
        "cpu_us_per_msg": (cpu1 - cpu0) / count * 1e6,
        "threads_us_per_msg": {
            name: round((threads1[name] - threads0.get(name, 0.0)) / count * 1e6, 1)
            for name in threads1
            if name != "switches"
        },
        "switches_per_msg": round(
            (threads1.get("switches", 0.0) - threads0.get("switches", 0.0)) / count, 3
        ),
        "batches": batches,
        "deliveries_per_read": round(count / max(1, reads), 1),
        "deliveries_per_batch": round(count / max(1, batches), 1),
        "wall_s": round(wall1 - wall0, 2),
        "rate": round(count / (wall1 - wall0)),
        "latency_ms": {
            "p50": percentile(latencies, 50),
            "p99": percentile(latencies, 99),
            "max": max(latencies, default=None),
            "samples": len(latencies),
        },
        "gc": pauses.summary(),
        "stats": stats,
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="benchmarks.ingest_cpu", description=__doc__)
    parser.add_argument("mode", choices=["drain", "paced"])
    parser.add_argument("--count", type=int, default=100_000)
    parser.add_argument("--warm", type=int, default=120_000)
    parser.add_argument("--rate", type=float, default=6500.0)
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--null", action="store_true", help="publish nothing")
    parser.add_argument(
        "--gc-freeze", action="store_true", help="gc.freeze() before measuring (GC pauses)"
    )
    parser.add_argument("--cpu", type=int, default=None, help="pin the node to this CPU")
    args = parser.parse_args()
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    from tests.ingest.rabbit import Vhost  # the tests' vhost helper, as benchmarks.ingest

    vhost = Vhost()
    vhost.create()
    try:
        trio.run(declare, vhost.url)
        backlog = args.warm + (args.count if args.mode == "drain" else 0)
        if backlog:
            filler = run_producer(vhost.url, "fill", backlog)
            filler.join()
        result = trio.run(node, vhost.url, args)
    finally:
        vhost.delete()
    for key, value in result.items():
        print(f"{key}: {value}")


if __name__ == "__main__":
    main()
