"""Baseline for the ingest benchmark: producer → RabbitMQ → the hub's AMQP client, no hub.

Usage::

    .venv/bin/python -m benchmarks.ingest_broker --rabbit-cpu 1              # 4 × 16 s at 10,000/s
    .venv/bin/python -m benchmarks.ingest_broker --rate 5000 --windows 2 --duration 8

The same producers as :mod:`benchmarks.ingest` (open loop, ``data.t`` = scheduled send
time) publish to ``hub.notifications`` on a throw-away vhost; in the node's place, on
``--node-cpu``, a consumer made of the node's own RabbitMQ client
(:class:`bridge.amqp_ingest.IngestLink`: same topology, prefetch and batched acks)
takes each message, reads ``data.t`` and acks — no validation, fan-out or WebSocket.
What it measures is the part of the ingest benchmark's latency that the hub cannot
remove: when this path has a slow second, so has the hub's.

Prints p50/p99/max and the p99 of each second for ``--windows`` windows of
``--duration`` seconds (each after ``--warmup``), and writes them as JSON
(``benchmarks/results/ingest-broker.json`` or ``--out``). Exit status 1 when a window
received another number of messages than its producers sent.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from array import array
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import trio

from benchmarks.ingest import (
    CHANNEL_PREFIX,
    PRODUCER_SLACK_S,
    ProducerConfig,
    _producer_main,
    ms,
    per_second_p99,
    rabbit_pinned,
)
from benchmarks.loadgen import (
    Worker,
    cleanup_on_exit,
    cpu_busy_seconds,
    machine_info,
    percentile,
    pin_to_cpu,
)
from bridge.amqp_ingest import IngestLink

DEFAULT_OUT = Path(__file__).parent / "results" / "ingest-broker.json"
#: Deliveries the consumer takes at once (as the ingest actor does).
BATCH = 256
#: The consumer keeps consuming this long after the producers' last message is due.
CONSUME_SLACK_S = 3.0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ingest_broker", description=__doc__)
    parser.add_argument("--rate", type=float, default=10_000, help="messages/s, open loop")
    parser.add_argument("--duration", type=float, default=16.0, help="measured window, s")
    parser.add_argument("--warmup", type=float, default=3.0, help="s before each window")
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--channels", type=int, default=1000, help="channel names in bodies")
    parser.add_argument("--producers", type=int, default=2)
    parser.add_argument("--frame-bytes", type=int, default=200)
    parser.add_argument("--prefetch", type=int, default=1000)
    parser.add_argument("--node-cpu", type=int, default=0, help="the consumer's CPU")
    parser.add_argument("--gen-cpu", type=int, default=1, help="the producers' CPU")
    parser.add_argument("--rabbit-cpu", type=int, default=None)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    return parser.parse_args(argv)


# -- the consumer (a child process on the node's CPU) -------------------------------------
def _link(url: str, prefetch: int) -> IngestLink:
    """The node's RabbitMQ link, as the node makes it (topology, prefetch, acks)."""
    return IngestLink(url, name="bench/broker", prefetch=prefetch, node_id="bench")


async def _consume(url: str, prefetch: int, seconds: float) -> array[float]:
    """Consume for ``seconds``; per message, its ``data.t`` (ns) and latency (ms)."""
    link = _link(url, prefetch)
    samples: array[float] = array("d")
    loads = json.loads
    async with trio.open_nursery() as nursery:
        await nursery.start(link.run)
        with trio.move_on_after(seconds):
            while (batch := await link.next_batch(BATCH)) is not None:
                now_ns = time.time_ns()
                for delivery in batch:
                    t_ns = loads(delivery.body)["data"]["t"]
                    samples.extend((t_ns, (now_ns - t_ns) / 1e6))
                last = batch[-1]
                link.ack_upto(last.generation, last.tag)
        await link.stop()
        nursery.cancel_scope.cancel()
    return samples


async def _declare(url: str, prefetch: int) -> None:
    link = _link(url, prefetch)
    async with trio.open_nursery() as nursery:
        await nursery.start(link.run)
        with trio.fail_after(30):
            await link.wait_connected()  # the topology is declared before it connects
        await link.stop()
        nursery.cancel_scope.cancel()


def _consumer_main(ctrl: Any, config: tuple[str, int, int]) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    url, prefetch, cpu = config
    pin_to_cpu(cpu)
    while True:
        command, *args = ctrl.recv()
        if command == "declare":
            trio.run(_declare, url, prefetch)
            ctrl.send(True)
        elif command == "consume":
            ctrl.send(trio.run(_consume, url, prefetch, args[0]).tobytes())
        elif command == "exit":
            ctrl.send(True)
            return


# -- one window ---------------------------------------------------------------------------
def run_window(
    args: argparse.Namespace, consumer: Worker, producers: list[Worker]
) -> dict[str, Any]:
    total_s = args.warmup + args.duration
    busy_before = cpu_busy_seconds()
    consumer.send("consume", total_s + CONSUME_SLACK_S)
    started_ns = time.time_ns()
    for producer in producers:
        producer.send("run", args.rate / len(producers), total_s)
    sent = sum(p.reply(timeout=total_s + PRODUCER_SLACK_S)["sent"] for p in producers)
    samples = array("d")
    samples.frombytes(consumer.reply(timeout=total_s + PRODUCER_SLACK_S))
    busy_after = cpu_busy_seconds()
    window_from = started_ns + args.warmup * 1e9
    latencies = [samples[i + 1] for i in range(0, len(samples), 2) if samples[i] >= window_from]
    return {
        "sent": sent,
        "received": len(samples) // 2,
        "latency_samples": len(latencies),
        "latency_ms_p50": ms(percentile(latencies, 50)),
        "latency_ms_p99": ms(percentile(latencies, 99)),
        "latency_ms_max": ms(max(latencies) if latencies else None),
        "latency_ms_p99_per_second": per_second_p99(latencies, args.duration),
        "cpu_busy_pct": {
            cpu: round(100 * (busy_after[cpu] - busy_before[cpu]) / total_s, 1)
            for cpu in busy_after
        },
    }


def main(argv: Sequence[str] | None = None) -> int:
    from tests.ingest.rabbit import Vhost  # the tests' vhost helper (rabbitmqctl or HTTP API)

    args = parse_args(argv)
    report: dict[str, Any] = {
        "benchmark": "ingest-broker",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(
            ["python", "-m", "benchmarks.ingest_broker", *(argv if argv else sys.argv[1:])]
        ),
        "machine": machine_info(),
        "parameters": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "windows": [],
    }
    vhost = Vhost(name=f"hub-bench-broker-{os.getpid()}")
    vhost.create()
    pad = max(0, args.frame_bytes - 150 - len(CHANNEL_PREFIX))
    try:
        with rabbit_pinned(args.rabbit_cpu) as rabbit:
            report["rabbitmq"] = rabbit
            consumer = Worker(_consumer_main, (vhost.url, args.prefetch, args.node_cpu), "consumer")
            tag = f"broker.{os.getpid()}.{time.time_ns()}"
            producers = [
                Worker(
                    _producer_main,
                    ProducerConfig(vhost.url, i, tag, args.channels, pad, args.gen_cpu),
                    f"pub-{i}",
                )
                for i in range(args.producers)
            ]
            with cleanup_on_exit(consumer.stop, *(p.stop for p in producers)):
                consumer.call("declare")  # the queue exists before anything is published
                for index in range(args.windows):
                    window = run_window(args, consumer, producers)
                    report["windows"].append(window)
                    print(
                        f"broker window {index + 1}: {window['received']:,} received, "
                        f"p50 {window['latency_ms_p50']} ms, p99 {window['latency_ms_p99']} ms, "
                        f"max {window['latency_ms_max']} ms (per second: "
                        f"{', '.join(str(v) for v in window['latency_ms_p99_per_second'])}), "
                        f"CPU {window['cpu_busy_pct']}",
                        flush=True,
                    )
    finally:
        vhost.delete()
    # Every published message was consumed once (the consumer acks what it read).
    report["checks_ok"] = all(w["received"] == w["sent"] for w in report["windows"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}" + ("" if report["checks_ok"] else "; COUNT CHECK FAILED"))
    return 0 if report["checks_ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
