"""Cluster benchmark: one node, then two nodes sharing one Redis, in the same run.

Usage::

    .venv/bin/python -m benchmarks.cluster               # N = 1000 subscribers
    .venv/bin/python -m benchmarks.cluster --quick       # smoke: N = 200, short windows
    .venv/bin/python -m benchmarks.cluster --n 2000 --duration 10

A private ``redis-server`` is started on a free port (nothing touches the machine's
shared Redis). Each configuration runs ``hub serve`` processes with ``REDIS_URL`` set:

* **1 node** — node A (pinned to ``--cpu-a``) holds all N subscribers; the publisher
  posts to A. Every delivery still goes publish → Redis script → pub/sub → A.
* **2 nodes** — N/2 subscribers on A and N/2 on node B (pinned to ``--cpu-b``); the
  publisher posts to A, so B's deliveries are *cross-node*.

Per configuration, as in :mod:`benchmarks.fanout` (load generator :mod:`benchmarks.loadgen`):
**max** — closed-loop REST publishing (``--inflight`` requests in flight): delivered
messages/s (total and cross-node); **50%** — open loop at half that publish rate:
p50/p99 publish→receive latency measured by validating sample subscribers on each node
(publisher's scheduled send time → frame read; on B that is the cross-node latency).
Then every subscriber must have received every message (no gap, duplicate, bad frame).

This machine has 2 vCPUs shared by the nodes, Redis and the load generator, so the
2-node figures show the cost and correctness of the cross-node path, not scaling.

Prints a table and writes ``benchmarks/results/cluster.json`` (or ``--out``); exit
status 1 when a counting check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks.fanout import (
    ADMIN_EMAIL,
    CHANNEL,
    PASSWORD,
    USER_EMAIL,
    pad_for_frame,
    settle,
    totals,
    wait_quiet,
    window_rate,
)
from benchmarks.loadgen import (
    NODE_START_TIMEOUT_S,
    NodeProcess,
    PublisherConfig,
    SubscriberPool,
    Worker,
    _child_setup,
    cleanup_on_exit,
    cpu_busy_seconds,
    cpu_seconds,
    free_port,
    hub_subscriber_spec,
    machine_info,
    percentile,
    raise_nofile,
    start_publisher,
)

DEFAULT_OUT = Path(__file__).parent / "results" / "cluster.json"
#: Seconds to wait for the private redis-server to answer PING.
REDIS_START_TIMEOUT_S = 10.0
REDIS_POLL_S = 0.05


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cluster", description=__doc__)
    parser.add_argument("--n", type=int, default=None, help="subscribers in all (1000)")
    parser.add_argument("--duration", type=float, default=None, help="window seconds (6)")
    parser.add_argument("--warmup", type=float, default=None, help="warm-up seconds (1.5)")
    parser.add_argument("--sample", type=int, default=None, help="validating subs per node (20)")
    parser.add_argument("--inflight", type=int, default=8, help="closed-loop requests in flight")
    parser.add_argument("--frame-bytes", type=int, default=200, help="notification frame size")
    parser.add_argument("--cpu-a", type=int, default=0, help="CPU of node A")
    parser.add_argument("--cpu-b", type=int, default=1, help="CPU of node B")
    parser.add_argument("--gen-cpu", type=int, default=1, help="CPU of the load generator")
    parser.add_argument("--sources", type=int, default=8, help="source addresses 127.0.0.1..n")
    parser.add_argument("--out", type=Path, default=None, help=f"JSON file ({DEFAULT_OUT})")
    parser.add_argument("--quick", action="store_true", help="small and short (a smoke test)")
    args = parser.parse_args(argv)
    quick = args.quick
    args.n = args.n if args.n is not None else (200 if quick else 1000)
    args.duration = args.duration if args.duration is not None else (2.0 if quick else 6.0)
    args.warmup = args.warmup if args.warmup is not None else (0.5 if quick else 1.5)
    args.sample = args.sample if args.sample is not None else (5 if quick else 20)
    args.quiet_timeout = 5.0 if quick else 120.0
    if args.out is None:
        args.out = DEFAULT_OUT.with_name("cluster-quick.json") if quick else DEFAULT_OUT
    return args


# --------------------------------------------------------------------------- processes


class RedisProcess:
    """A private ``redis-server`` without persistence, in a temporary directory."""

    def __init__(self) -> None:
        self.port = free_port()
        self.directory = Path(tempfile.mkdtemp(prefix="hub-bench-redis-"))
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed")
        self.process = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
                "--dir",
                str(self.directory),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + REDIS_START_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(64).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            time.sleep(REDIS_POLL_S)  # readiness polling of a child process (not a test)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)
        self.process = None
        shutil.rmtree(self.directory, ignore_errors=True)


class ClusterNode(NodeProcess):
    """``hub serve`` as :class:`NodeProcess` starts it, but started only once ``/ready``
    answers 200 (its Redis broker is connected)."""

    def start(self) -> None:
        import urllib.error
        import urllib.request

        self.log_path = self.data_dir / "node.log"
        command = [sys.executable, "-m", "hub", "serve", "--port", str(self.port)]
        if self.cpu is not None and shutil.which("taskset"):
            command = ["taskset", "-c", str(self.cpu), *command]
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                command,
                env=self.env(),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_child_setup,
            )
        deadline = time.monotonic() + NODE_START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"node exited: {self.log_tail()}")
            try:
                with urllib.request.urlopen(self.base_url + "/ready", timeout=1) as response:
                    if response.status == 200:
                        return
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(REDIS_POLL_S)  # readiness polling of a child process (not a test)
        raise RuntimeError(f"node did not become ready: {self.log_tail()}")


# --------------------------------------------------------------------------- phases


def read_cpu(pids: dict[str, int]) -> dict[str, Any]:
    return {
        "t": time.monotonic(),
        "busy": cpu_busy_seconds()["cpu"],
        **{name: cpu_seconds(pid) for name, pid in pids.items()},
    }


def run_phase(
    name: str,
    pools: dict[str, SubscriberPool],
    publisher: Worker,
    pids: dict[str, int],
    *,
    rate: float | None,
    inflight: int,
    warmup: float,
    duration: float,
) -> dict[str, Any]:
    """One publishing run (warm-up, then a measured window) with a pool per node."""
    publisher.send("run", rate, warmup + duration, inflight)
    time.sleep(warmup)
    before = {node: pool.snapshot() for node, pool in pools.items()}
    cpu_a = read_cpu(pids)
    for pool in pools.values():
        pool.set_phase(name)
    time.sleep(duration)
    for pool in pools.values():
        pool.set_phase(None)
    after = {node: pool.snapshot() for node, pool in pools.items()}
    cpu_b = read_cpu(pids)
    result = publisher.reply(timeout=warmup + duration + 60)
    dt = cpu_b["t"] - cpu_a["t"]
    published = sum(1 for t in result["done_at"] if cpu_a["t"] <= t <= cpu_b["t"])
    per_node = {node: round(window_rate(before[node], after[node])) for node in pools}
    latency: dict[str, dict[str, float | None]] = {}
    for node, pool in pools.items():
        values = pool.latencies().get(name, [])
        latency[node] = {
            "samples": len(values),
            "p50_ms": _ms(percentile(values, 50)),
            "p99_ms": _ms(percentile(values, 99)),
            "max_ms": _ms(max(values) if values else None),
        }
    return {
        "mode": "closed loop" if rate is None else "open loop",
        "target_rate": rate,
        "window_s": round(dt, 3),
        "published_per_s": round(published / dt, 1),
        "published_total": result["ok"],
        "publish_statuses": result["statuses"],
        "publish_request_ms_p99": _ms(percentile(result["request_ms"], 99)),
        "delivered_per_s": sum(per_node.values()),
        "delivered_per_s_by_node": per_node,
        "cross_node_delivered_per_s": sum(v for k, v in per_node.items() if k != "A"),
        "latency_by_node": latency,
        "cpu_pct": {name: round(100 * (cpu_b[name] - cpu_a[name]) / dt, 1) for name in pids},
        "machine_busy_pct": round(100 * (cpu_b["busy"] - cpu_a["busy"]) / dt, 1),
    }


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def run_configuration(
    args: argparse.Namespace, redis: RedisProcess, node_count: int
) -> dict[str, Any]:
    """Start ``node_count`` nodes on ``redis``, spread N subscribers, run both phases."""
    env = {"REDIS_URL": redis.url}
    cpus = [args.cpu_a, args.cpu_b]
    nodes = [
        ClusterNode(port=free_port(), cpu=cpus[i], env_overrides=env) for i in range(node_count)
    ]
    names = ["A", "B"][:node_count]
    with cleanup_on_exit(*[node.cleanup for node in nodes]):
        first = nodes[0]
        first.create_user(ADMIN_EMAIL, PASSWORD, admin=True)
        first.create_user(USER_EMAIL, PASSWORD)
        for node in nodes:
            node.start()
        tokens = {
            "admin": first.login(ADMIN_EMAIL, PASSWORD),
            "user": first.login(USER_EMAIL, PASSWORD),
        }
        sources = tuple(f"127.0.0.{i}" for i in range(1, args.sources + 1))
        pools = {
            name: SubscriberPool(
                hub_subscriber_spec("127.0.0.1", node.port, tokens["user"], CHANNEL),
                count_procs=1,
                cpu=args.gen_cpu,
                read_interval_s=0.2,
                source_addresses=sources,
            )
            for name, node in zip(names, nodes, strict=True)
        }
        publisher = start_publisher(
            PublisherConfig(
                "127.0.0.1",
                first.port,
                tokens["admin"],
                CHANNEL,
                pad=0,
                connections=max(args.inflight, 16),
                cpu=args.gen_cpu,
            )
        )
        stoppers = [pool.stop for pool in pools.values()] + [publisher.stop]
        with cleanup_on_exit(*stoppers):
            status, body = publisher.call("one", {"probe": True})
            if status != 202:
                raise RuntimeError(f"publish failed: {status} {body[:200]!r}")
            epoch = json.loads(body)["data"]["offsets"][CHANNEL].rpartition(":")[0]
            publisher.call("pad", pad_for_frame(args.frame_bytes, f"{epoch}:1000"))
            share = args.n // node_count
            opened: dict[str, Any] = {}
            for name, pool in pools.items():
                sample = min(args.sample, share)
                opened[name] = pool.open(share - sample, sample)
            subscribers = sum(o["ok"] for o in opened.values())
            failed = sum(o["failed"] for o in opened.values())
            print(
                f"  {node_count} node(s): {subscribers} subscribers open"
                + (f", {failed} failed" if failed else ""),
                flush=True,
            )
            pids = {name: node.pid for name, node in zip(names, nodes, strict=True)}
            pids["redis"] = redis.process.pid if redis.process else 0
            pids["publisher"] = publisher.pid
            base = {name: totals(pool.snapshot())["text_frames"] for name, pool in pools.items()}

            phases: dict[str, Any] = {}
            wait_quiet(args.quiet_timeout)
            phases["max"] = run_phase(
                "max",
                pools,
                publisher,
                pids,
                rate=None,
                inflight=args.inflight,
                warmup=args.warmup,
                duration=args.duration,
            )
            half_rate = max(1.0, phases["max"]["published_per_s"] / 2)
            wait_quiet(args.quiet_timeout)
            phases["half"] = run_phase(
                "half",
                pools,
                publisher,
                pids,
                rate=half_rate,
                inflight=args.inflight,
                warmup=args.warmup,
                duration=args.duration,
            )
            published = sum(p["published_total"] for p in phases.values())
            checks: dict[str, Any] = {"connections_failed": failed}
            ok = failed == 0
            for name, pool in pools.items():
                expected = base[name] + published * opened[name]["ok"]
                final = totals(settle(pool, expected))
                missing = max(0, expected - final["text_frames"])
                extra = max(0, final["text_frames"] - expected)
                checks[name] = {
                    "missing_deliveries": missing,
                    "extra_deliveries": extra,
                    "connections_lost": final["dead"],
                    "bad_frames": final["bad_frames"],
                    "sample_checked": final["checked"],
                    "sample_gaps": final["gaps"],
                    "sample_duplicates": final["duplicates"],
                    "sample_epoch_resets": final["resets"],
                }
                ok = ok and missing == extra == final["dead"] == final["bad_frames"] == 0
                ok = ok and final["gaps"] == final["duplicates"] == final["resets"] == 0
                ok = ok and final["checked"] > 0
            m, h = phases["max"], phases["half"]
            print(
                f"  {node_count} node(s): max {m['delivered_per_s']:,} deliveries/s "
                f"({m['cross_node_delivered_per_s']:,} cross-node), {m['published_per_s']} msgs/s;"
                f" 50%: p99 "
                + ", ".join(f"{k} {v['p99_ms']} ms" for k, v in h["latency_by_node"].items()),
                flush=True,
            )
            return {
                "nodes": node_count,
                "subscribers": subscribers,
                "subscribers_by_node": {name: o["ok"] for name, o in opened.items()},
                "phases": phases,
                "checks": checks,
                "checks_ok": ok,
            }


# --------------------------------------------------------------------------- RESP client

#: Messages of the RESP micro-benchmarks, and their payload size.
RESP_RX_MESSAGES = 200_000
RESP_TX_MESSAGES = 50_000
RESP_PAYLOAD_BYTES = 100
RESP_CONCURRENCY = 16
RESP_LATENCY_SAMPLES = 2000
RESP_EXTERNAL_BATCH = 1000


def external_publisher(port: int, channel: bytes, count: int, epoch: str | None) -> None:
    """Body of a separate process: PUBLISH ``count`` messages, pipelined in batches
    (plain blocking socket; replies read per batch). With ``epoch``, each message is in
    the Redis broker's format (``b"<epoch>:<seq>\\n" + payload``, seq from 1)."""
    import hiredis

    payload = b"x" * RESP_PAYLOAD_BYTES
    reader = hiredis.Reader()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        command = hiredis.pack_command((b"PUBLISH", channel, payload))
        for start in range(0, count, RESP_EXTERNAL_BATCH):
            batch = min(RESP_EXTERNAL_BATCH, count - start)
            if epoch is None:
                sock.sendall(command * batch)
            else:
                sock.sendall(
                    b"".join(
                        hiredis.pack_command(
                            (b"PUBLISH", channel, f"{epoch}:{start + i + 1}\n".encode() + payload)
                        )
                        for i in range(batch)
                    )
                )
            replies = 0
            while replies < batch:
                reader.feed(sock.recv(65536))
                while reader.gets() is not False:
                    replies += 1


def measure_resp(redis: RedisProcess) -> dict[str, Any]:
    """Figures of :mod:`bridge.resp` and :mod:`bridge.broker_redis` on this machine."""
    import multiprocessing

    import trio

    from bridge.broker import Publication
    from bridge.broker_redis import RedisBroker, RedisKeys
    from bridge.resp import RedisAddress, RedisClient, RedisSubscriber

    address = RedisAddress.from_url(redis.url)
    results: dict[str, Any] = {}

    async def receive() -> None:
        got = 0
        first = last = 0.0
        done = trio.Event()

        def on_messages(batch: list[tuple[bytes, bytes]]) -> None:
            nonlocal got, first, last
            if not got:
                first = time.perf_counter()
            got += len(batch)
            last = time.perf_counter()
            if got >= RESP_RX_MESSAGES:
                done.set()

        subscriber = RedisSubscriber(address, on_messages=on_messages)
        async with trio.open_nursery() as nursery:
            await nursery.start(subscriber.run)
            await subscriber.wait_connected()
            await subscriber.subscribe([b"bench:rx"])
            process = multiprocessing.get_context("fork").Process(
                target=external_publisher, args=(redis.port, b"bench:rx", RESP_RX_MESSAGES, None)
            )
            cpu0 = time.process_time()
            process.start()
            with trio.fail_after(120):
                await done.wait()
            cpu = time.process_time() - cpu0
            process.join(10)
            stats = subscriber.statistics()
            results["pubsub_receive"] = {
                "messages": got,
                "per_s": round(got / (last - first)),
                "mean_batch": round(stats.messages / max(1, stats.batches), 1),
                "receiver_cpu_us_per_message": round(1e6 * cpu / got, 2),
                "publisher": "separate process, pipelined PUBLISH in batches of 1000",
            }
            nursery.cancel_scope.cancel()

    async def publish() -> None:
        client = RedisClient(address)
        async with trio.open_nursery() as nursery:
            await nursery.start(client.run)
            await client.wait_connected()
            payload = b"x" * RESP_PAYLOAD_BYTES

            async def worker(count: int) -> None:
                for _ in range(count):
                    await client.execute(b"PUBLISH", b"bench:tx", payload)

            before = client.statistics()
            started = time.perf_counter()
            async with trio.open_nursery() as workers:
                for _ in range(RESP_CONCURRENCY):
                    workers.start_soon(worker, RESP_TX_MESSAGES // RESP_CONCURRENCY)
            elapsed = time.perf_counter() - started
            after = client.statistics()
            commands = after.commands - before.commands
            results["command_publish"] = {
                "calls": commands,
                "concurrent_callers": RESP_CONCURRENCY,
                "per_s": round(commands / elapsed),
                "mean_pipeline_depth": round(commands / max(1, after.writes - before.writes), 1),
            }
            latencies = []
            for _ in range(RESP_LATENCY_SAMPLES):
                t0 = time.perf_counter()
                await client.execute(b"PUBLISH", b"bench:tx", payload)
                latencies.append((time.perf_counter() - t0) * 1e6)
            results["command_publish"]["sequential_us_p50"] = round(percentile(latencies, 50) or 0)
            results["command_publish"]["sequential_us_p99"] = round(percentile(latencies, 99) or 0)
            nursery.cancel_scope.cancel()

    async def broker_roundtrip() -> None:
        handed: dict[str, float] = {}
        waiters: dict[str, trio.Event] = {}
        done = trio.Event()
        per_worker = RESP_TX_MESSAGES // 2 // RESP_CONCURRENCY
        total = per_worker * RESP_CONCURRENCY

        class Handler:
            count = 0

            def handle_publication(self, channel: str, publication: Publication) -> None:
                handed[publication.offset] = time.perf_counter()
                waiter = waiters.pop(publication.offset, None)
                if waiter is not None:
                    waiter.set()
                Handler.count += 1
                if Handler.count == total + RESP_LATENCY_SAMPLES:
                    done.set()

        broker = RedisBroker(
            Handler(),
            address=address,
            keys=RedisKeys("bench:"),
            history_size=100,
            history_ttl_s=60,
            node_id="bench",
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(broker.run)
            await broker.wait_connected()
            await broker.subscribe("public.bench")
            payload = b'"data":{"p":"' + b"x" * RESP_PAYLOAD_BYTES + b'"}'

            async def worker(count: int) -> None:
                for _ in range(count):
                    await broker.publish("public.bench", payload)

            started = time.perf_counter()
            async with trio.open_nursery() as workers:
                for _ in range(RESP_CONCURRENCY):
                    workers.start_soon(worker, per_worker)
            elapsed = time.perf_counter() - started
            latencies = []
            for _ in range(RESP_LATENCY_SAMPLES):
                t0 = time.perf_counter()
                offset = await broker.publish("public.bench", payload)
                if offset not in handed:
                    arrived = waiters[offset] = trio.Event()
                    await arrived.wait()
                latencies.append((handed[offset] - t0) * 1e6)
            with trio.fail_after(30):
                await done.wait()
            results["broker_publish"] = {
                "publishes": total,
                "concurrent_callers": RESP_CONCURRENCY,
                "per_s": round(total / elapsed),
                "publish_to_handler_us_p50": round(percentile(latencies, 50) or 0),
                "publish_to_handler_us_p99": round(percentile(latencies, 99) or 0),
                "what": "Lua script (XADD + PUBLISH) and back through pub/sub to the handler",
            }
            nursery.cancel_scope.cancel()

    async def broker_receive() -> None:
        done = trio.Event()
        first = last = 0.0

        class Counter:
            count = 0

            def handle_publication(self, channel: str, publication: Publication) -> None:
                nonlocal first, last
                if not Counter.count:
                    first = time.perf_counter()
                Counter.count += 1
                last = time.perf_counter()
                if Counter.count == RESP_RX_MESSAGES:
                    done.set()

        broker = RedisBroker(
            Counter(),
            address=address,
            keys=RedisKeys("bench:"),
            history_size=100,
            history_ttl_s=60,
            node_id="bench-rx",
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(broker.run)
            await broker.wait_connected()
            await broker.subscribe("public.rx")
            epoch = (await broker.history("public.rx", None)).position.rpartition(":")[0]
            process = multiprocessing.get_context("fork").Process(
                target=external_publisher,
                args=(redis.port, b"bench:ch:public.rx", RESP_RX_MESSAGES, epoch),
            )
            cpu0 = time.process_time()
            process.start()
            with trio.fail_after(120):
                await done.wait()
            cpu = time.process_time() - cpu0
            process.join(10)
            stats = broker.statistics()
            results["broker_receive"] = {
                "messages": Counter.count,
                "per_s": round(Counter.count / (last - first)),
                "receiver_cpu_us_per_message": round(1e6 * cpu / Counter.count, 2),
                "gaps": stats["gaps"],
                "what": "pub/sub → offset check → handle_publication (the hub's entry point)",
            }
            nursery.cancel_scope.cancel()

    trio.run(receive)
    trio.run(broker_receive)
    trio.run(publish)
    trio.run(broker_roundtrip)
    return results


# --------------------------------------------------------------------------- report


def print_table(report: dict[str, Any]) -> None:
    rows = [
        (
            "nodes",
            "subs",
            "deliveries/s (max)",
            "cross-node/s",
            "msgs/s",
            "p50/p99 ms @50% (A)",
            "p50/p99 ms @50% (B, cross)",
            "missing",
            "gaps+dups",
        )
    ]
    for run in report["runs"]:
        m, h = run["phases"]["max"], run["phases"]["half"]
        lat = h["latency_by_node"]
        b = lat.get("B")
        node_checks = [v for k, v in run["checks"].items() if isinstance(v, dict)]
        rows.append(
            (
                str(run["nodes"]),
                f"{run['subscribers']:,}",
                f"{m['delivered_per_s']:,}",
                f"{m['cross_node_delivered_per_s']:,}",
                f"{m['published_per_s']:.0f}",
                f"{lat['A']['p50_ms']} / {lat['A']['p99_ms']}",
                f"{b['p50_ms']} / {b['p99_ms']}" if b else "-",
                str(sum(c["missing_deliveries"] for c in node_checks)),
                str(sum(c["sample_gaps"] + c["sample_duplicates"] for c in node_checks)),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for index, row in enumerate(rows):
        print("  ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=True)))
        if index == 0:
            print("  ".join("-" * width for width in widths))


def print_resp(resp: dict[str, Any]) -> None:
    rx, tx, br = resp["pubsub_receive"], resp["command_publish"], resp["broker_publish"]
    brx = resp["broker_receive"]
    print(
        f"\nRESP client: pub/sub receive {rx['per_s']:,} msgs/s (mean batch "
        f"{rx['mean_batch']}, {rx['receiver_cpu_us_per_message']} µs CPU/msg); "
        f"through the broker to the hub {brx['per_s']:,} msgs/s "
        f"({brx['receiver_cpu_us_per_message']} µs CPU/msg); "
        f"PUBLISH {tx['per_s']:,}/s with {tx['concurrent_callers']} callers (pipeline depth "
        f"{tx['mean_pipeline_depth']}), one caller p50/p99 {tx['sequential_us_p50']}/"
        f"{tx['sequential_us_p99']} µs; broker publish (script + pub/sub back) "
        f"{br['per_s']:,}/s, publish→handler p50/p99 {br['publish_to_handler_us_p50']}/"
        f"{br['publish_to_handler_us_p99']} µs"
    )


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")  # unwinds through every cleanup


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    raise_nofile()
    started = datetime.now(UTC)
    report: dict[str, Any] = {
        "benchmark": "cluster",
        "date": started.isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable), "-m", "benchmarks.cluster", *argv]),
        "machine": machine_info(),
        "parameters": {
            "n": args.n,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "sample_per_node": args.sample,
            "inflight": args.inflight,
            "frame_bytes": args.frame_bytes,
            "cpu_a": args.cpu_a,
            "cpu_b": args.cpu_b,
            "gen_cpu": args.gen_cpu,
            "channel": CHANNEL,
            "quick": args.quick,
        },
        "runs": [],
    }
    redis = RedisProcess()
    with cleanup_on_exit(redis.stop):
        redis.start()
        print("RESP client on this machine …", flush=True)
        wait_quiet(args.quiet_timeout)
        report["resp"] = measure_resp(redis)
        for node_count in (1, 2):
            print(f"{node_count} node(s), N={args.n} …", flush=True)
            report["runs"].append(run_configuration(args, redis, node_count))
    report["seconds"] = round((datetime.now(UTC) - started).total_seconds(), 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print()
    print_table(report)
    print_resp(report["resp"])
    print(f"\nwrote {args.out}")
    return 0 if all(run["checks_ok"] for run in report["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
