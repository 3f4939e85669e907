"""Ingest benchmark: RabbitMQ → hub → WebSocket subscribers on several channels.

Usage::

    .venv/bin/python -m benchmarks.ingest              # 1,000 subscribers; 1000, 100 channels
    .venv/bin/python -m benchmarks.ingest --quick      # smoke: 100 subscribers, short windows
    .venv/bin/python -m benchmarks.ingest --channels 100 --duration 15 --servers hub

A node (``hub serve`` with ``AMQP_URL`` on a throw-away vhost) runs pinned to
``--node-cpu``; the generator (counting subscriber processes, one sample process and
``--producers`` publisher processes; :mod:`benchmarks.loadgen`) runs pinned to
``--gen-cpu``. RabbitMQ itself is not pinned unless ``--rabbit-cpu`` says where to keep
it for the run (``--rabbit-cpu 1``: beside the generator but ahead of it, nice
:data:`RABBIT_NICE`, leaving the node's core to the node, as when RabbitMQ runs on a
machine of its own). ``--setting NAME=VALUE`` passes a
setting to the node (e.g. ``AMQP_ACK_INTERVAL_MS=20``). Subscriber ``i`` subscribes to channel
``public.ingest.<i mod C>`` and message ``k`` goes to channel ``k mod C``, so each message
reaches ``N / C`` subscribers. For each channel count C:

0. (once per node) ``--warm`` messages go through the node with nobody subscribed, so
   that size-bound structures (the realtime core's 100k-entry id window) are in the
   steady state they stay in, as on a node that has been running for a while;
1. open N subscribed connections;
2. **max**: with the node kept from reading (the vhost's read permission is withdrawn
   and its connection closed), the producers fill ``hub.notifications`` with
   ``--prefill`` messages; then the node may read again and drains the backlog with no
   producer running. Ingested messages/s = frames delivered per second ÷ (N / C) over a
   ``--duration`` window after ``--warmup``; ``backlog_ran_out`` says when the window
   outlasted the backlog (the rate is then a lower bound);
3. **50%**: producers publish live, open loop at half the max rate, for ``--warmup``
   and then a ``--live-duration`` window (default ``--duration``); p50/p99/max latency
   from the producer's *scheduled* send time (``data.t``) to the frame read by a sample
   subscriber (so a producer running late counts as latency);
4. check: every subscriber got every message of its channel, the sample saw no gap,
   duplicate or bad frame.

Each phase also reports the node's ``frames_per_write`` (frames delivered per socket
write, from its ``/metrics`` counters: how much fan-out coalesced), and the live phase
its p99 per second of the window (``latency_ms_p99_per_second``: one slow second is an
episode, eight slow seconds a node at capacity), ``window_started_at``, and
``node_loop_stalls_over_50ms``: the node's loop-lag samples over 50 ms (its monitor
measures how late a 20 ms sleep wakes, so a stall that starts during the sleep reads
up to 20 ms short; the in-node histogram below is the closer witness).
The hub's latency is also split at the node's ``data.timestamp`` (stamped as it
publishes the message, to the millisecond): ``before_node_ms_p99`` (producer, RabbitMQ,
the node's read and parse) and ``after_node_ms_p99`` (fan-out, the sockets, the sample
subscriber), overall and per second, so an episode shows on which side it happened.
The node's own delay histogram (``hub_amqp_ingest_delay_seconds``: from the socket read
that brought a message to its fan-out) splits the first part further:
``in_node_ms_p99_at_most`` (the bucket bound 99% of the messages stayed under, warm-up
included) and ``in_node_over_50ms_pct``; what ``before_node`` has beyond it was spent in
the producer, the network and RabbitMQ.

Then the same against the peer (``--servers hub`` to skip it): python-socketio's
``AsyncAioPikaManager`` on uvicorn (:mod:`benchmarks.ingest_peer`). Its queue belongs to
the server and cannot be prefilled, so its max is measured while the producers publish
``--peer-prefill`` messages as fast as they can.

Prints a table and writes ``benchmarks/results/ingest.json`` (or ``--out``). Exit status 1
when a counting check fails; timing targets are reported, not enforced. The machine has
two vCPUs: RabbitMQ, the generator and anything else running share them with the node
(``foreign_cpu_pct`` in the JSON: over ~25% makes a run suspect).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import struct
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import pika
import pika.exceptions
from pika import frame as pika_frame
from pika import spec
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.ingest_peer import (
    PeerProcess,
    PeerProducerConfig,
    connect_message,
    parse_notification,
    peer_spec,
)
from benchmarks.ingest_peer import available as peer_available
from benchmarks.ingest_peer import producer_main as peer_producer_main
from benchmarks.loadgen import (
    HANDSHAKE,
    OP_CLOSE,
    OP_TEXT,
    NodeProcess,
    SubscriberSpec,
    SubscriberWorker,
    Worker,
    WorkerConfig,
    cleanup_on_exit,
    cpu_busy_seconds,
    cpu_seconds,
    free_port,
    hub_subscriber_spec,
    machine_info,
    percentile,
    pin_to_cpu,
    raise_nofile,
    rss_kb,
    settle_pool,
    totals,
    window_rate,
)
from bridge.amqp_ingest import EXCHANGE, QUEUE

CHANNEL_PREFIX = "public.ingest."
USER_EMAIL = "bench-user@example.com"
PASSWORD = "Bench-passw0rd"
DEFAULT_OUT = Path(__file__).parent / "results" / "ingest.json"
SETTLE_TIMEOUT_S = 120.0
SETTLE_POLL_S = 0.25
#: Most messages a producer writes at once.
FLUSH_EVERY = 64
#: In open loop, a producer writes at most this often (what is due meanwhile goes out
#: together; the delay counts as latency, since ``data.t`` is the scheduled time).
TICK_S = 0.001
#: Producer commands may run this long beyond their publishing time.
PRODUCER_SLACK_S = 60.0
#: Scheduling priority of RabbitMQ's threads while ``--rabbit-cpu`` keeps them beside
#: the load generator (:func:`rabbit_pinned`).
RABBIT_NICE = -10

TARGETS = {"ingested_per_s": 10_000, "p99_ms_at_half_load": 50.0}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="benchmarks.ingest", description=__doc__.split("\n")[0])
    parser.add_argument("--subscribers", type=int, default=1000)
    parser.add_argument(
        "--channels",
        type=int,
        nargs="+",
        default=[1000, 100],
        help="channel counts to run (each message reaches subscribers/channels clients)",
    )
    parser.add_argument("--duration", type=float, default=8.0, help="measured window, s")
    parser.add_argument(
        "--warmup", type=float, default=2.0, help="s before the drain window is measured"
    )
    parser.add_argument(
        "--live-duration",
        type=float,
        default=None,
        help="measured window of the 50%% phase, s (default: --duration)",
    )
    parser.add_argument("--sample", type=int, default=40, help="fully checked subscribers")
    parser.add_argument("--producers", type=int, default=2, help="publisher processes")
    parser.add_argument("--prefill", type=int, default=200_000, help="backlog the max phase drains")
    parser.add_argument("--frame-bytes", type=int, default=200)
    parser.add_argument("--count-procs", type=int, default=2)
    parser.add_argument("--read-interval-ms", type=float, default=50.0)
    parser.add_argument("--node-cpu", type=int, default=0)
    parser.add_argument("--gen-cpu", type=int, default=1)
    parser.add_argument("--prefetch", type=int, default=None, help="AMQP_PREFETCH of the node")
    parser.add_argument(
        "--rabbit-cpu",
        type=int,
        default=None,
        help="keep the local RabbitMQ's threads on this CPU for the run, ahead of the "
        f"generator there (nice {RABBIT_NICE}; default: leave RabbitMQ as it is)",
    )
    parser.add_argument(
        "--setting",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a setting of the node (repeatable), e.g. AMQP_ACK_INTERVAL_MS=20",
    )
    parser.add_argument(
        "--servers",
        nargs="+",
        choices=["hub", "socketio"],
        default=["hub", "socketio"],
        help="socketio: the python-socketio AsyncAioPikaManager peer (when installed)",
    )
    parser.add_argument(
        "--warm",
        type=int,
        default=150_000,
        help="messages the node ingests (no subscribers) before the first measurement",
    )
    parser.add_argument(
        "--peer-prefill", type=int, default=30_000, help="messages the peer's max phase sends"
    )
    parser.add_argument(
        "--rate", type=float, default=None, help="open-loop rate instead of half the max"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--quick", action="store_true", help="CI smoke run")
    args = parser.parse_args(argv)
    if args.quick:
        args.subscribers, args.channels, args.sample = 100, [10], 10
        args.duration, args.warmup, args.count_procs = 2.0, 0.5, 1
        args.prefill, args.peer_prefill, args.warm = 20_000, 5_000, 0
        if args.out == DEFAULT_OUT:
            args.out = DEFAULT_OUT.with_name("ingest-quick.json")
    for channels in args.channels:
        if args.subscribers % channels:
            parser.error(f"--subscribers must be a multiple of every --channels ({channels})")
    return args


# --------------------------------------------------------------------------- subscribers


@dataclass
class RotatingConfig(WorkerConfig):
    """A subscriber worker whose sockets spread over ``channels``: socket ``j`` of this
    worker subscribes to ``channels[(first + j) % len(channels)]``."""

    channels: tuple[str, ...] = ()
    first: int = 0


class RotatingSubscriberWorker(SubscriberWorker):
    """loadgen's worker, with one channel per socket instead of one for all."""

    def __init__(self, config: RotatingConfig) -> None:
        super().__init__(config)
        self._channels = config.channels
        first_message = connect_message if config.spec.validator == "socketio" else _subscribe
        self._specs = {
            channel: replace(config.spec, messages=(first_message(channel),))
            for channel in config.channels
        }
        self._next = config.first
        self._channel_of: dict[int, str] = {}

    def _new_socket(self) -> Any:
        sock = super()._new_socket()
        self._channel_of[sock.fileno()] = self._channels[self._next % len(self._channels)]
        self._next += 1
        return sock

    def _advance(self, sub: Any, data: bytes) -> bool:
        if sub.state == HANDSHAKE:  # the subscribe frames go out in this step
            self.cfg.spec = self._specs[self._channel_of[sub.fd]]
        return super()._advance(sub, data)

    def _consume(self, sub: Any, data: bytes, now_ns: int) -> None:
        if sub.counter is not None or self.cfg.spec.validator != "socketio":
            super()._consume(sub, data, now_ns)
            return
        # A sample socket of the socket.io peer: latency from data.t, continuity of
        # each producer's per-room sequence number data.s.
        assert sub.decoder is not None
        for opcode, payload in sub.decoder.feed(data):
            if opcode == OP_CLOSE:
                self.close_codes[int.from_bytes(payload[:2], "big") if payload else 0] += 1
                self._kill(sub)
                return
            if opcode != OP_TEXT:
                continue
            self.sample_frames += 1
            try:
                note = parse_notification(payload)
            except (ValueError, UnicodeDecodeError):
                self.sample_bad += 1
                continue
            if note is None:
                continue
            self.checker.check(f"{sub.fd}/{note['w']}/{note['k']}", "sio", int(note["s"]))
            if self.phase is not None:
                self.latencies[self.phase].append((now_ns - int(note["t"])) / 1e6)


def _subscribe(channel: str) -> bytes:
    return json.dumps({"type": "subscribe", "channels": [channel]}).encode()


def _rotating_main(ctrl: Any, config: RotatingConfig) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise_nofile()
    pin_to_cpu(config.cpu)
    if config.nice:
        with contextlib.suppress(OSError):
            os.nice(config.nice)
    RotatingSubscriberWorker(config).serve(ctrl)


class RotatingPool:
    """Counting workers plus one sample worker; N sockets spread evenly over channels."""

    def __init__(self, spec: SubscriberSpec, args: argparse.Namespace, channels: int) -> None:
        names = tuple(f"{CHANNEL_PREFIX}{i}" for i in range(channels))
        counting = args.subscribers - args.sample
        shares = [counting // args.count_procs] * args.count_procs
        for i in range(counting - sum(shares)):
            shares[i] += 1
        self.shares = shares
        self.sample_count = args.sample
        self.sample = Worker(
            _rotating_main,
            RotatingConfig(spec, "sample", args.gen_cpu, nice=-10, channels=names, first=0),
            "sample",
        )
        self.counters = []
        first = args.sample
        for i, share in enumerate(shares):
            config = RotatingConfig(
                spec,
                "count",
                args.gen_cpu,
                args.read_interval_ms / 1000,
                channels=names,
                first=first,
            )
            self.counters.append(Worker(_rotating_main, config, f"count-{i}"))
            first += share
        self.subscribers_per_channel = [args.subscribers // channels] * channels

    @property
    def workers(self) -> list[Worker]:
        return [*self.counters, self.sample]

    def open(self) -> dict[str, Any]:
        results = [self.sample.call("open", self.sample_count, timeout=200)]
        for worker, share in zip(self.counters, self.shares, strict=True):
            results.append(worker.call("open", share, timeout=200))
        errors: dict[str, int] = {}
        for result in results:
            for key, value in result["errors"].items():
                errors[key] = errors.get(key, 0) + value
        return {
            "ok": sum(r["ok"] for r in results),
            "failed": sum(r["failed"] for r in results),
            "seconds": max(r["seconds"] for r in results),
            "errors": errors,
        }

    def snapshot(self) -> list[dict[str, Any]]:
        for worker in self.workers:
            worker.send("snap")
        return [worker.reply() for worker in self.workers]

    def set_phase(self, name: str | None) -> None:
        self.sample.call("phase", name)

    def latencies(self) -> dict[str, list[float]]:
        result: dict[str, list[float]] = self.sample.call("latencies")
        return result

    def before_node(self) -> dict[str, list[float]]:
        """Per latency sample (same order), the part before the node published it."""
        result: dict[str, list[float]] = self.sample.call("before_node")
        return result

    def stop(self) -> None:
        for worker in self.workers:
            worker.stop()


# --------------------------------------------------------------------------- producers


@dataclass(frozen=True)
class ProducerConfig:
    url: str
    index: int
    tag: str  # unique per run: ids repeated within 10 minutes would be dropped as duplicates
    channels: int
    pad: int
    cpu: int | None


class Producer:
    """Publishes to ``hub.notifications`` as fast as it can, or open loop at a rate.

    A load generator that shares the machine with the node must cost little, or it
    takes the node's CPU and the benchmark measures the producers. pika marshals every
    publish through its frame objects and the ``BlockingChannel`` flushes after each
    one; this producer keeps pika for the connection (handshake, heartbeats, flow) and
    writes the frames of a publish itself: the ``Basic.Publish`` method frame is the
    same for every message, and the content header differs only in the body size. The
    frames of every message due at once go out in one write (at most one write per
    :data:`TICK_S` in open loop, at most :data:`FLUSH_EVERY` messages per write).
    """

    def __init__(self, config: ProducerConfig) -> None:
        self.cfg = config
        self.connection = pika.BlockingConnection(pika.URLParameters(config.url))
        self.channel = self.connection.channel()
        self.seq = 0
        self.pad = "x" * config.pad
        self.names = [f"{CHANNEL_PREFIX}{i}" for i in range(config.channels)]
        self.per_channel = [0] * config.channels
        number = self.channel.channel_number
        body_limit = self.connection._impl._body_max_length
        if body_limit < config.pad + 1024:  # one body frame per message
            raise ValueError(f"frame_max too small for {config.pad}-byte messages")
        self._method = publish_method_frame(number, EXCHANGE, "bench")
        self._header = _FRAME_HEAD.pack(spec.FRAME_HEADER, number, _CONTENT_HEADER_SIZE)
        self._body_head = partial(_FRAME_HEAD.pack, spec.FRAME_BODY, number)
        self._emit = self.connection._impl._output_marshaled_frames

    def _body(self, t_ns: int) -> bytes:
        k = self.seq % self.cfg.channels
        self.per_channel[k] += 1
        self.seq += 1
        message = {
            "channel": self.names[k],
            "data": {"t": t_ns, "p": self.pad},
            "id": f"{self.cfg.tag}-p{self.cfg.index}-{self.seq}",
        }
        return json.dumps(message, separators=(",", ":")).encode()

    def _publish(self, times_ns: Sequence[int]) -> None:
        """Write one publish per entry of ``times_ns`` (its ``data.t``) in one write."""
        parts: list[bytes] = []
        method, header, body_head = self._method, self._header, self._body_head
        for t_ns in times_ns:
            body = self._body(t_ns)
            size = len(body)
            parts += (
                method,
                header,
                _CONTENT_HEADER.pack(60, 0, size, 0),
                _FRAME_END,
                body_head(size),
                body,
                _FRAME_END,
            )
        self._emit([b"".join(parts)])

    def fill(self, count: int) -> dict[str, Any]:
        """Publish ``count`` messages as fast as possible (``data.t`` = send time)."""
        self.per_channel = [0] * self.cfg.channels
        sent = 0
        while sent < count:
            batch = min(FLUSH_EVERY, count - sent)
            now = time.time_ns()
            self._publish([now] * batch)
            sent += batch
            self.connection.process_data_events(0)
        self.channel.basic_qos()  # one round trip: everything before it reached RabbitMQ
        return {"sent": sent, "backlog_max": 0, "per_channel": list(self.per_channel)}

    def run(self, rate: float, duration_s: float) -> dict[str, Any]:
        """Open loop at ``rate`` messages/s for ``duration_s``; ``data.t`` is each
        message's scheduled send time, so running late (a tick included) counts as
        latency."""
        self.per_channel = [0] * self.cfg.channels
        flush = self.connection.process_data_events
        sent = backlog_max = 0
        start = time.monotonic()
        start_ns = time.time_ns()
        end = start + duration_s
        interval = 1.0 / rate
        last_write = start - TICK_S
        while (now := time.monotonic()) < end:
            due = int((now - start) / interval) + 1
            if due <= sent or now - last_write < TICK_S:
                next_due = start + interval * (sent + 1)
                wait = max(next_due, last_write + TICK_S) - now
                flush(min(max(wait, 0.0), 0.01))  # paces, reads what RabbitMQ sends
                continue
            backlog_max = max(backlog_max, due - sent)
            upto = min(due, sent + FLUSH_EVERY)
            self._publish([start_ns + int(i * interval * 1e9) for i in range(sent, upto)])
            sent = upto
            last_write = now
            flush(0)
        self.channel.basic_qos()
        return {"sent": sent, "backlog_max": backlog_max, "per_channel": list(self.per_channel)}


_FRAME_HEAD = struct.Struct(">BHI")
_CONTENT_HEADER = struct.Struct(">HHQH")  # class (basic), weight, body size, no properties
_CONTENT_HEADER_SIZE = _CONTENT_HEADER.size
_FRAME_END = bytes((spec.FRAME_END,))


def publish_method_frame(channel: int, exchange: str, routing_key: str) -> bytes:
    """The ``Basic.Publish`` method frame (not mandatory, not immediate), marshalled by
    pika once."""
    method = spec.Basic.Publish(exchange=exchange, routing_key=routing_key)
    return pika_frame.Method(channel, method).marshal()


def _producer_main(ctrl: Any, config: ProducerConfig) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    pin_to_cpu(config.cpu)
    producer = Producer(config)
    while True:
        command, *args = ctrl.recv()
        if command == "run":
            ctrl.send(producer.run(args[0], args[1]))
        elif command == "fill":
            ctrl.send(producer.fill(args[0]))
        elif command == "exit":
            with contextlib.suppress(pika.exceptions.AMQPError):
                producer.connection.close()
            ctrl.send(True)
            return


#: The node's counters read at both ends of a window (``None`` for the peer).
NODE_COUNTERS = (
    "hub_messages_delivered_total",
    "hub_fanout_writes_total",
    "hub_event_loop_lag_seconds_count",
    "loop_lag_within_50ms",
)
#: The loop-lag bucket whose complement counts the node's own stalls.
STALL_BUCKET = "0.05"
#: The node's in-node delay histogram (socket read → batch handed to fan-out); its
#: buckets are read as ``<name>_bucket:<le>`` when the node has one.
INGEST_DELAY = "hub_amqp_ingest_delay_seconds"


def node_counters(metrics_url: str | None) -> dict[str, float] | None:
    """:data:`NODE_COUNTERS` from the node's ``/metrics`` (``None`` when unreadable);
    ``loop_lag_within_50ms`` is the loop-lag histogram's ``le="0.05"`` bucket."""
    if metrics_url is None:
        return None
    try:
        with urllib.request.urlopen(metrics_url, timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return None
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name = sample.name
            if name == "hub_event_loop_lag_seconds_bucket":
                if sample.labels.get("le") != STALL_BUCKET:
                    continue
                name = "loop_lag_within_50ms"
            elif name == f"{INGEST_DELAY}_bucket":
                found[f"{name}:{sample.labels['le']}"] = sample.value
                continue
            if name in NODE_COUNTERS:
                found[name] = found.get(name, 0.0) + sample.value
    return found if all(name in found for name in NODE_COUNTERS) else None


def in_node_delay(a: dict[str, float], b: dict[str, float]) -> dict[str, Any]:
    """From the node's delay histogram between two reads: the bucket bound under which
    99% of the messages stayed in the node (``in_node_ms_p99_at_most``), and the share
    that stayed over 50 ms. Empty when the node exposes no such histogram."""
    prefix = f"{INGEST_DELAY}_bucket:"
    grew = {
        key.removeprefix(prefix): b[key] - a.get(key, 0.0) for key in b if key.startswith(prefix)
    }
    total = grew.pop("+Inf", 0.0)
    if not total:
        return {}
    cumulative = sorted((float(le), count) for le, count in grew.items())
    p99 = next((le for le, count in cumulative if count >= 0.99 * total), None)
    within_50ms = dict(cumulative).get(0.05)
    return {
        "in_node_ms_p99_at_most": None if p99 is None else round(p99 * 1000, 1),
        "in_node_over_50ms_pct": (
            None if within_50ms is None else round(100 * (1 - within_50ms / total), 3)
        ),
    }


def per_second_p99(latencies: list[float], seconds: float) -> list[float | None]:
    """p99 of each of ``round(seconds)`` equal slices of ``latencies`` in receive order
    (one slice per second of the window at a steady rate): shows whether a tail is an
    episode or spread over the window."""
    parts = max(1, round(seconds))
    n = len(latencies)
    return [
        ms(percentile(latencies[i * n // parts : (i + 1) * n // parts], 99)) for i in range(parts)
    ]


def queue_depth(url: str) -> int:
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        return int(connection.channel().queue_declare(QUEUE, passive=True).method.message_count)
    finally:
        connection.close()


# --------------------------------------------------------------------------- phases


def rabbit_pid() -> int | None:
    result = subprocess.run(["pgrep", "-o", "beam.smp"], capture_output=True, text=True)
    return int(result.stdout.split()[0]) if result.returncode == 0 and result.stdout else None


@contextlib.contextmanager
def rabbit_pinned(cpu: int | None, nice: int = RABBIT_NICE) -> Iterator[dict[str, Any]]:
    """Keep every thread of the local RabbitMQ on ``cpu`` for the block, ahead of the
    load generator that shares that CPU (scheduling priority ``nice``), then give each
    thread its former CPUs and priority back. ``cpu=None``: leave RabbitMQ as it is.

    With the node on another CPU, the node's core is its own, as when RabbitMQ runs on
    a machine of its own; the priority keeps the generator's 1,000 clients from
    starving the broker, which they would not share a machine with either (measured
    at 10,000 messages/s: without it, one or two seconds with 45-70 ms spent before
    the node's socket read in 4 of 10 live windows; with it, in 1 of 13). Yields what
    was applied (recorded in the results): ``{"cpu": …, "nice": …}``, ``nice`` ``None``
    when not permitted.
    """
    pid = rabbit_pid() if cpu is not None else None
    if pid is None:
        yield {"cpu": None, "nice": None}
        return
    saved: dict[int, tuple[set[int], int]] = {}
    applied: int | None = nice
    for entry in os.listdir(f"/proc/{pid}/task"):
        tid = int(entry)
        try:
            saved[tid] = (os.sched_getaffinity(tid), os.getpriority(os.PRIO_PROCESS, tid))
            os.sched_setaffinity(tid, {cpu})
        except OSError:  # the thread ended, or no permission
            continue
        try:
            os.setpriority(os.PRIO_PROCESS, tid, nice)
        except OSError:  # raising a priority needs CAP_SYS_NICE
            applied = None
    if applied is None:
        print(f"RabbitMQ kept on CPU {cpu} without priority: setpriority not permitted")
    try:
        yield {"cpu": cpu, "nice": applied}
    finally:
        for tid, (cpus, former) in saved.items():
            with contextlib.suppress(OSError):
                os.sched_setaffinity(tid, cpus)
                os.setpriority(os.PRIO_PROCESS, tid, former)


class Probe:
    """CPU time of the node, the generator, the producers and RabbitMQ; the node's
    ``/metrics`` address (``None`` for the peer)."""

    def __init__(
        self,
        node_pid: int,
        gen_pids: list[int],
        producer_pids: list[int],
        metrics_url: str | None = None,
    ) -> None:
        self.node_pid, self.gen_pids, self.producer_pids = node_pid, gen_pids, producer_pids
        self.metrics_url = metrics_url
        self.rabbit = rabbit_pid()

    def read(self) -> dict[str, Any]:
        return {
            "t": time.monotonic(),
            "busy": cpu_busy_seconds(),
            "node_cpu": cpu_seconds(self.node_pid),
            "gen_cpu": sum(cpu_seconds(pid) for pid in self.gen_pids),
            "pub_cpu": sum(cpu_seconds(pid) for pid in self.producer_pids),
            "rabbit_cpu": cpu_seconds(self.rabbit) if self.rabbit else 0.0,
            "node_rss_kb": rss_kb(self.node_pid),
        }


def settle(pool: RotatingPool, expected: int) -> list[dict[str, Any]]:
    """Snapshot until ``expected`` frames arrived or nothing moved for 5 s."""
    return settle_pool(
        pool, expected, timeout_s=SETTLE_TIMEOUT_S, still_s=5.0, poll_s=SETTLE_POLL_S
    )


def ms(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def _window(
    pool: RotatingPool,
    probe: Probe,
    depth: Callable[[], int],
    name: str | None,
    duration: float,
    node_before: dict[str, float] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Snapshots, probes, queue depth and the node's counters at both ends of a
    ``duration`` window. A phase that measures latency passes ``node_before``, read
    before its warm-up: a ``/metrics`` scrape holds the node's loop for tens of ms,
    which must not fall into the measured window (the one at its end comes after)."""
    a = {"depth": depth(), "snaps": pool.snapshot(), "probe": probe.read()}
    a["node"] = node_before if name is not None else node_counters(probe.metrics_url)
    if name is not None:
        pool.set_phase(name)
    time.sleep(duration)
    if name is not None:
        pool.set_phase(None)
    b = {"depth": depth(), "snaps": pool.snapshot(), "probe": probe.read()}
    b["node"] = node_counters(probe.metrics_url)
    return a, b


def _measure(a: dict[str, Any], b: dict[str, Any], fanout: int) -> dict[str, Any]:
    pa, pb = a["probe"], b["probe"]
    dt = pb["t"] - pa["t"]
    busy = pb["busy"]["cpu"] - pa["busy"]["cpu"]
    ours = sum(pb[k] - pa[k] for k in ("node_cpu", "gen_cpu", "pub_cpu", "rabbit_cpu"))
    delivered = window_rate(a["snaps"], b["snaps"])

    def pct(key: str) -> float:
        return round(100 * (pb[key] - pa[key]) / dt, 1)

    frames_per_write = stalls = None
    delay: dict[str, Any] = {}
    if a.get("node") and b.get("node"):

        def grew(key: str) -> float:
            return b["node"][key] - a["node"][key]

        writes = grew("hub_fanout_writes_total")
        frames_per_write = (
            round(grew("hub_messages_delivered_total") / writes, 2) if writes else None
        )
        stalls = round(grew("hub_event_loop_lag_seconds_count") - grew("loop_lag_within_50ms"))
        delay = in_node_delay(a["node"], b["node"])
    return {
        "window_s": round(dt, 3),
        "delivered_per_s": round(delivered),
        "ingested_per_s": round(delivered / fanout),
        "queue_depth_window": [a["depth"], b["depth"]],
        "node_cpu_pct": pct("node_cpu"),
        "gen_cpu_pct": pct("gen_cpu"),
        "pub_cpu_pct": pct("pub_cpu"),
        "rabbit_cpu_pct": pct("rabbit_cpu"),
        "node_rss_kb": pb["node_rss_kb"],
        # Frames handed to subscribers per socket write (the node's coalescing; in the
        # live phase, over the warm-up and the window).
        "frames_per_write": frames_per_write,
        # The node's loop-lag samples over 50 ms, counted the same way (a stall shows
        # only from when the monitor's sleep should have ended: up to 20 ms short).
        "node_loop_stalls_over_50ms": stalls,
        # Each message's time in the node, from the socket read that brought it to its
        # fan-out (hub_amqp_ingest_delay_seconds; live phase: warm-up included): what
        # of the latency the node's own queueing and work can be.
        **delay,
        # Everything else that ran meanwhile (other processes on a shared machine):
        # over ~25% makes a run suspect.
        "foreign_cpu_pct": round(100 * (busy - ours) / dt, 1),
        "cpu_busy_pct": {
            cpu: round(100 * (pb["busy"][cpu] - pa["busy"][cpu]) / dt, 1) for cpu in pb["busy"]
        },
    }


def live_duration(args: argparse.Namespace) -> float:
    return args.duration if args.live_duration is None else args.live_duration


def run_drain(
    pool: RotatingPool,
    producers: list[Worker],
    probe: Probe,
    vhost: Any,
    fanout: int,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Max: fill the queue while the node may not read it, then let it drain the backlog
    with nothing else running, and measure the sustained rate inside the drain."""
    vhost.set_permissions(".*", ".*", "^$")  # may publish, may not consume
    vhost.close_connections("/ingest")
    each = args.prefill // len(producers)
    for producer in producers:
        producer.send("fill", each)
    results = [p.reply(timeout=PRODUCER_SLACK_S + args.prefill / 1000) for p in producers]
    filled = queue_depth(vhost.url)
    base = sum(s["text_frames"] for s in pool.snapshot())
    vhost.set_permissions(".*", ".*", ".*")
    released = time.monotonic()
    while sum(s["text_frames"] for s in pool.snapshot()) == base:  # the node reconnects
        if time.monotonic() - released > 30:
            raise RuntimeError("the node did not resume consuming")
        time.sleep(0.05)
    resumed_s = time.monotonic() - released
    time.sleep(args.warmup)
    a, b = _window(pool, probe, partial(queue_depth, vhost.url), None, args.duration)
    result = {
        "mode": "drain of a prefilled backlog (producers idle)",
        "prefilled": filled,
        "resumed_after_s": round(resumed_s, 2),
        "backlog_ran_out": b["depth"] == 0,  # then the rate is a lower bound
        **_measure(a, b, fanout),
        "published_total": sum(r["sent"] for r in results),
        "per_channel": [sum(c) for c in zip(*(r["per_channel"] for r in results), strict=True)],
    }
    return result


def run_saturate(
    pool: RotatingPool,
    producers: list[Worker],
    probe: Probe,
    depth: Callable[[], int],
    fanout: int,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Max for the peer (whose queue is its own and cannot be prefilled): the producers
    publish ``--peer-prefill`` messages as fast as they can while it consumes."""
    base = sum(s["text_frames"] for s in pool.snapshot())
    each = args.peer_prefill // len(producers)
    for producer in producers:
        producer.send("fill", each)
    started = time.monotonic()
    while sum(s["text_frames"] for s in pool.snapshot()) == base:
        if time.monotonic() - started > 30:
            raise RuntimeError("the peer delivers nothing")
        time.sleep(0.05)
    time.sleep(args.warmup)
    a, b = _window(pool, probe, depth, None, args.duration)
    results = [p.reply(timeout=PRODUCER_SLACK_S + args.peer_prefill / 100) for p in producers]
    return {
        "mode": "producers publishing as fast as they can",
        "prefilled": sum(r["sent"] for r in results),
        "backlog_ran_out": b["depth"] == 0,
        **_measure(a, b, fanout),
        "published_total": sum(r["sent"] for r in results),
        "per_channel": [sum(c) for c in zip(*(r["per_channel"] for r in results), strict=True)],
    }


def run_open_loop(
    pool: RotatingPool,
    producers: list[Worker],
    probe: Probe,
    depth: Callable[[], int],
    fanout: int,
    rate: float,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Producers publish live at ``rate``; latency from the sample subscribers."""
    node_before = node_counters(probe.metrics_url)  # frames per write: warm-up included
    for producer in producers:
        producer.send("run", rate / len(producers), args.warmup + live_duration(args))
    time.sleep(args.warmup)
    started_at = time.time()
    a, b = _window(pool, probe, depth, "half", live_duration(args), node_before)
    results = [
        p.reply(timeout=args.warmup + live_duration(args) + PRODUCER_SLACK_S) for p in producers
    ]
    latencies = pool.latencies().get("half", [])
    before = pool.before_node().get("half", [])
    split: dict[str, Any] = {}
    if before and len(before) == len(latencies):
        after = [total - part for total, part in zip(latencies, before, strict=True)]
        split = {
            "before_node_ms_p99": ms(percentile(before, 99)),
            "after_node_ms_p99": ms(percentile(after, 99)),
            "before_node_ms_p99_per_second": per_second_p99(before, live_duration(args)),
            "after_node_ms_p99_per_second": per_second_p99(after, live_duration(args)),
        }
    return {
        "mode": "open loop",
        "target_rate": round(rate, 1),
        "window_started_at": round(started_at, 3),  # Unix time, to line up node logs
        **_measure(a, b, fanout),
        "published_total": sum(r["sent"] for r in results),
        "per_channel": [sum(c) for c in zip(*(r["per_channel"] for r in results), strict=True)],
        "producer_backlog_max": max(r["backlog_max"] for r in results),
        "latency_samples": len(latencies),
        "latency_ms_p50": ms(percentile(latencies, 50)),
        "latency_ms_p99": ms(percentile(latencies, 99)),
        "latency_ms_max": ms(max(latencies) if latencies else None),
        "latency_ms_p99_per_second": per_second_p99(latencies, live_duration(args)),
        **split,
    }


@dataclass
class Target:
    """What a layout runs against: the hub node or the socket.io peer."""

    name: str  # "hub" or "socketio"
    pid: int
    spec: SubscriberSpec
    vhost: Any
    metrics_url: str | None = None

    def producer(self, index: int, channels: int, pad: int, cpu: int | None) -> Worker:
        if self.name == "hub":
            tag = f"{os.getpid()}.{time.time_ns()}"
            config = ProducerConfig(self.vhost.url, index, tag, channels, pad, cpu)
            return Worker(_producer_main, config, f"pub-{index}")
        peer = PeerProducerConfig(self.vhost.url, index, channels, pad, cpu)
        return Worker(peer_producer_main, peer, f"peer-pub-{index}")

    def depth(self) -> int:
        """Messages waiting for this target in RabbitMQ."""
        if self.name == "hub":
            return queue_depth(self.vhost.url)
        queues = self.vhost.queue_messages()
        return sum(n for name, n in queues.items() if name.startswith("amq.gen-"))


def run_layout(args: argparse.Namespace, target: Target, channels: int) -> dict[str, Any]:
    fanout = args.subscribers // channels
    pool = RotatingPool(target.spec, args, channels)
    pad = max(0, args.frame_bytes - 150 - len(CHANNEL_PREFIX))  # ~frame_bytes on the wire
    producers = [target.producer(i, channels, pad, args.gen_cpu) for i in range(args.producers)]
    with cleanup_on_exit(pool.stop, *(p.stop for p in producers)):
        opened = pool.open()
        print(
            f"  {target.name} C={channels} (each message → {fanout} subscribers): "
            f"{opened['ok']} connections "
            f"open in {opened['seconds']:.1f}s"
            + (f", {opened['failed']} failed {opened['errors']}" if opened["failed"] else ""),
            flush=True,
        )
        probe = Probe(
            target.pid,
            [w.pid for w in pool.workers],
            [p.pid for p in producers],
            target.metrics_url,
        )
        base = totals(pool.snapshot())
        per_channel = [0] * channels
        phases: dict[str, Any] = {}
        if target.name == "hub":
            m = run_drain(pool, producers, probe, target.vhost, fanout, args)
        else:
            m = run_saturate(pool, producers, probe, target.depth, fanout, args)
        phases["max"] = m
        print(
            f"  {target.name} C={channels} max: {m['ingested_per_s']:,} msgs/s ingested "
            f"({m['delivered_per_s']:,} deliveries/s), {m['prefilled']:,} published, "
            f"server CPU {m['node_cpu_pct']}%, RabbitMQ CPU {m['rabbit_cpu_pct']}%, "
            f"others {m['foreign_cpu_pct']}%"
            + (f", {m['frames_per_write']} frames/write" if m["frames_per_write"] else ""),
            flush=True,
        )
        per_channel = [a + b for a, b in zip(per_channel, m["per_channel"], strict=True)]

        def expected() -> int:
            return base["text_frames"] + sum(
                n * s for n, s in zip(per_channel, pool.subscribers_per_channel, strict=True)
            )

        drain_start = time.monotonic()
        settle(pool, expected())
        drain_s = time.monotonic() - drain_start
        half_rate = args.rate or max(1.0, m["ingested_per_s"] / 2)
        phases["half"] = h = run_open_loop(
            pool, producers, probe, target.depth, fanout, half_rate, args
        )
        print(
            f"  {target.name} C={channels} 50%: {h['ingested_per_s']:,} msgs/s, "
            f"p50 {h['latency_ms_p50']} ms, p99 {h['latency_ms_p99']} ms "
            f"(per second: {', '.join(str(v) for v in h['latency_ms_p99_per_second'])})"
            + (
                f"; p99 before/after the node {h['before_node_ms_p99']} / "
                f"{h['after_node_ms_p99']} ms"
                if "before_node_ms_p99" in h
                else ""
            )
            + (
                f"; in the node: 99% ≤ {h['in_node_ms_p99_at_most']} ms, "
                f"{h['in_node_over_50ms_pct']}% > 50 ms"
                if "in_node_ms_p99_at_most" in h
                else ""
            )
            + (f", {h['frames_per_write']} frames/write" if h["frames_per_write"] else "")
            + (
                f", node loop stalls > 50 ms: {h['node_loop_stalls_over_50ms']}"
                if h["node_loop_stalls_over_50ms"] is not None
                else ""
            ),
            flush=True,
        )
        per_channel = [a + b for a, b in zip(per_channel, h["per_channel"], strict=True)]
        final = totals(settle(pool, expected()))
        received = final["text_frames"] - base["text_frames"]
        wanted = expected() - base["text_frames"]
        checks = {
            "connections_failed": opened["failed"],
            "connections_lost": final["dead"],
            "close_codes": final["close_codes"],
            "expected_deliveries": wanted,
            "received_deliveries": received,
            "missing_deliveries": max(0, wanted - received),
            "extra_deliveries": max(0, received - wanted),
            "bad_frames": final["bad_frames"],
            "sample_checked": final["checked"],
            "sample_gaps": final["gaps"],
            "sample_duplicates": final["duplicates"],
            "sample_epoch_resets": final["resets"],
        }
        ok = (
            checks["connections_failed"] == 0
            and checks["connections_lost"] == 0
            and checks["missing_deliveries"] == 0
            and checks["extra_deliveries"] == 0
            and checks["bad_frames"] == 0
            and checks["sample_gaps"] == 0
            and checks["sample_duplicates"] == 0
            and checks["sample_checked"] > 0
        )
        return {
            "server": target.name,
            "channels": channels,
            "subscribers": args.subscribers,
            "subscribers_per_message": fanout,
            "open_seconds": round(opened["seconds"], 2),
            "backlog_drain_s": round(drain_s, 1),
            "phases": phases,
            "checks": checks,
            "checks_ok": ok,
        }


# --------------------------------------------------------------------------- report


def print_table(report: dict[str, Any]) -> None:
    rows = [
        (
            "server",
            "subscribers × channels",
            "per msg",
            "ingested msgs/s (max)",
            "deliveries/s",
            "server CPU",
            "RabbitMQ CPU",
            "p50 / p99 ms @50%",
            "gaps+dups",
            "missing",
        )
    ]
    for run in report["runs"]:
        m, h, c = run["phases"]["max"], run["phases"]["half"], run["checks"]
        rows.append(
            (
                run["server"],
                f"{run['subscribers']:,} × {run['channels']:,}",
                str(run["subscribers_per_message"]),
                f"{m['ingested_per_s']:,}",
                f"{m['delivered_per_s']:,}",
                f"{m['node_cpu_pct']:.0f}%",
                f"{m['rabbit_cpu_pct']:.0f}%",
                f"{h['latency_ms_p50']} / {h['latency_ms_p99']}",
                str(c["sample_gaps"] + c["sample_duplicates"]),
                str(c["missing_deliveries"]),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for index, row in enumerate(rows):
        print("  ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=True)))
        if index == 0:
            print("  ".join("-" * width for width in widths))
    print(
        "\ntargets:",
        ", ".join(
            f"{name} {'OK' if met else 'MISSED'}" for name, met in report["targets_met"].items()
        ),
    )


def targets_met(report: dict[str, Any]) -> dict[str, bool]:
    met: dict[str, bool] = {}
    for run in report["runs"]:
        if run["server"] != "hub":
            met[f"counting_{run['server']}_c{run['channels']}"] = run["checks_ok"]
            continue
        c = run["channels"]
        rate = run["phases"]["max"]["ingested_per_s"]
        met[f"ingested_per_s_c{c}"] = rate >= TARGETS["ingested_per_s"]
        p99 = run["phases"]["half"]["latency_ms_p99"]
        met[f"p99_at_half_load_c{c}"] = p99 is not None and p99 <= TARGETS["p99_ms_at_half_load"]
        met[f"counting_c{c}"] = run["checks_ok"]
    return met


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run_hub(
    args: argparse.Namespace, vhost: Any, overrides: dict[str, str], report: dict[str, Any]
) -> None:
    with NodeProcess(port=free_port(), cpu=args.node_cpu, env_overrides=overrides) as node:
        node.create_user(USER_EMAIL, PASSWORD)
        node.start()
        token = node.login(USER_EMAIL, PASSWORD)
        deadline = time.monotonic() + 30
        while True:  # the node declares the queue when its consumer connects
            try:
                queue_depth(vhost.url)
                break
            except pika.exceptions.ChannelClosedByBroker:
                if time.monotonic() > deadline:
                    raise RuntimeError("the node never declared hub.notifications") from None
                time.sleep(0.1)  # waiting for a child process, not a test
        if args.warm:
            # Size-bound structures (the broker's 100k-entry id window, history) reach their
            # steady state only after that many messages: measure that state, not a fresh node.
            print(f"hub: warming up with {args.warm:,} messages …", flush=True)
            tag = f"warm.{os.getpid()}"
            producer = Producer(ProducerConfig(vhost.url, 0, tag, 1, 100, None))
            producer.fill(args.warm)
            producer.connection.close()
            deadline = time.monotonic() + SETTLE_TIMEOUT_S
            while queue_depth(vhost.url) and time.monotonic() < deadline:
                time.sleep(SETTLE_POLL_S)
        report["node_rss_kb_at_start"] = rss_kb(node.pid)
        spec = hub_subscriber_spec("127.0.0.1", node.port, token, f"{CHANNEL_PREFIX}0")
        hub = Target("hub", node.pid, spec, vhost, f"{node.base_url}/metrics")
        for channels in args.channels:
            print(f"hub: {args.subscribers} subscribers on {channels} channels …")
            report["runs"].append(run_layout(args, hub, channels))


def main(argv: Sequence[str] | None = None) -> int:
    from tests.ingest.rabbit import Vhost  # the tests' vhost helper (rabbitmqctl or HTTP API)

    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    raise_nofile()
    started = datetime.now(UTC)
    report: dict[str, Any] = {
        "benchmark": "ingest",
        "date": started.isoformat(timespec="seconds"),
        "command": " ".join(
            [
                os.path.basename(sys.executable),
                "-m",
                "benchmarks.ingest",
                *(argv if argv is not None else sys.argv[1:]),
            ]
        ),
        "machine": machine_info(),
        "parameters": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "targets": TARGETS,
        "runs": [],
    }
    vhost = Vhost(name=f"hub-bench-{os.getpid()}")
    vhost.create()
    overrides = {"AMQP_URL": vhost.url, "LOG_LEVEL": "WARNING", "AMQP_RECONNECT_MAX_S": "0.5"}
    if args.prefetch:
        overrides["AMQP_PREFETCH"] = str(args.prefetch)
    for setting in args.setting:
        name, sep, value = setting.partition("=")
        if not sep or not name:
            raise SystemExit(f"--setting {setting!r}: expected NAME=VALUE")
        overrides[name] = value
    try:
        with rabbit_pinned(args.rabbit_cpu) as rabbit:
            report["rabbitmq"] = rabbit
            if "hub" in args.servers:
                run_hub(args, vhost, overrides, report)
            if "socketio" in args.servers and not peer_available():
                print("socketio peer skipped: pip install -e '.[bench]'")
            elif "socketio" in args.servers:
                port = free_port()
                with PeerProcess(port, vhost.url, cpu=args.node_cpu) as peer:
                    peer.start()
                    target = Target("socketio", peer.pid, peer_spec(port), vhost)
                    for channels in args.channels:
                        print(
                            f"socketio peer: {args.subscribers} subscribers on "
                            f"{channels} channels …"
                        )
                        report["runs"].append(run_layout(args, target, channels))
    finally:
        vhost.delete()
    report["targets_met"] = targets_met(report)
    report["seconds"] = round((datetime.now(UTC) - started).total_seconds(), 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print()
    print_table(report)
    print(f"\nwrote {args.out}")
    return 0 if all(run["checks_ok"] for run in report["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
