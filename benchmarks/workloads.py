"""The suite's fan-out, per-user, ingest and cluster workloads (see :mod:`benchmarks.runner`).

Each function takes a :class:`benchmarks.runner.Context` and returns a JSON-able dict
with ``runs`` (one entry per server and size), ``counting`` (gaps, duplicates, bad
frames, missing/extra deliveries, failed/lost connections: all must be 0) and
``checks_ok``. They reuse the existing benchmarks rather than re-implement them:

- ``fanout``: :func:`benchmarks.fanout.run_fanout` for each server and N;
- ``users``: the same phases (:func:`benchmarks.fanout.run_clean_phase`) over
  :mod:`benchmarks.users`' per-user pool and batch publisher;
- ``ingest``: :func:`benchmarks.ingest.main` (hub and its python-socketio
  ``AsyncAioPikaManager`` peer);
- ``cluster``: :func:`benchmarks.cluster.run_configuration` for the hub, and the same
  phases (:func:`benchmarks.cluster.run_phase`) for python-socketio with
  ``AsyncRedisManager``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from benchmarks import cluster as cluster_bench
from benchmarks import fanout as fanout_bench
from benchmarks.loadgen import (
    NodeProcess,
    SubscriberPool,
    cleanup_on_exit,
    free_port,
    start_publisher,
)
from benchmarks.loadgen import PublisherConfig as _PublisherConfig
from benchmarks.runner import add_counts, cdf_points, counting_of
from benchmarks.servers import open_server
from benchmarks.users import (
    BatchPublisherConfig,
    UsersPool,
    access_tokens,
    batches_of,
    seed_users,
    start_batch_publisher,
    user_specs,
)

if TYPE_CHECKING:
    from benchmarks.runner import Context

#: Source addresses 127.0.0.1 … 127.0.0.SOURCES for the subscribers.
SOURCES = 8
ZERO_COUNTS: dict[str, int] = add_counts({}, {})


def _quiet_wait(ctx: Context, full_default: float) -> float:
    """How long a measured window may wait for the machine to be quiet (0 when quick)."""
    if ctx.quiet_wait_s is not None:
        return ctx.quiet_wait_s
    return 0.0 if ctx.quick else full_default


# --------------------------------------------------------------------------- fan-out


@dataclass(frozen=True)
class FanoutParams:
    ns: tuple[int, ...]
    duration_s: float
    warmup_s: float
    sample: int
    retries: int
    profile_n: int = 5000


FANOUT_FULL = FanoutParams((1000, 5000, 10_000), 10.0, 2.0, 40, 2)
FANOUT_QUICK = FanoutParams((200,), 0.8, 0.2, 10, 0)


class LatencyCollector:
    """Keeps every measured window's latencies (via :data:`fanout.LATENCY_SINK`)."""

    def __init__(self) -> None:
        self.windows: dict[str, list[list[float]]] = {}

    def __call__(self, name: str, latencies: list[float]) -> None:
        self.windows.setdefault(name, []).append(list(latencies))

    def cdf_for(self, name: str, phase: dict[str, Any]) -> list[float]:
        """The CDF of the attempt that :func:`fanout.run_clean_phase` kept."""
        attempts = self.windows.get(name, [])
        if not attempts:
            return []
        kept = phase.get("foreign_cpu_pct_attempts", [phase.get("foreign_cpu_pct")])
        index = (
            kept.index(phase.get("foreign_cpu_pct")) if phase.get("foreign_cpu_pct") in kept else -1
        )
        return cdf_points(attempts[index])

    def reset(self) -> None:
        self.windows.clear()


def _fanout_args(ctx: Context, params: FanoutParams, n: int, server: str) -> argparse.Namespace:
    args = fanout_bench.parse_args(["--quick"] if ctx.quick else [])
    args.duration, args.warmup = params.duration_s, params.warmup_s
    args.sample, args.retries = params.sample, params.retries
    args.quiet_timeout = _quiet_wait(ctx, fanout_bench.QUIET_TIMEOUT_S)
    args.node_cpu, args.gen_cpu, args.sources = ctx.node_cpu, ctx.gen_cpu, SOURCES
    args.profile = ctx.profile and server == "hub" and n == params.profile_n
    args.out = ctx.profile_dir / "fanout.json"  # profiles land beside it
    return args


def fanout(ctx: Context) -> dict[str, Any]:
    """One channel, N subscribers, max and 50% load, on each server."""
    params = FANOUT_QUICK if ctx.quick else FANOUT_FULL
    ctx.progress.total(len(ctx.servers) * len(params.ns))
    collector = LatencyCollector()
    fanout_bench.LATENCY_SINK = collector
    runs: list[dict[str, Any]] = []
    counts = dict(ZERO_COUNTS)
    ok = True
    for name in ctx.servers:
        with open_server(name, cpu=ctx.node_cpu) as server:
            for n in params.ns:
                ctx.progress.status(f"{name} N={n:,}")
                collector.reset()
                args = _fanout_args(ctx, params, n, name)
                result = fanout_bench.run_fanout(
                    args,
                    server,  # type: ignore[arg-type]  # has port and pid
                    server.tokens,
                    n,
                    spec=server.spec([fanout_bench.CHANNEL]),
                    publish_port=server.publish_port,
                    frame_overhead=server.frame_overhead,
                )
                result["latency_cdf_ms"] = {
                    phase: collector.cdf_for(phase, result["phases"][phase])
                    for phase in ("max", "half", "fixed")
                    if phase in result["phases"]
                }
                if result.get("profile"):
                    profile = result["profile"]
                    if profile.get("collapsed_stacks"):
                        profile["collapsed_stacks"] = f"profiles/{profile['collapsed_stacks']}"
                runs.append({"server": name, **result})
                counts = add_counts(counts, counting_of(result["checks"]))
                ok = ok and result["checks_ok"]
                m = result["phases"]["max"]
                ctx.progress.step(f"{name} N={n:,}: {m['delivered_per_s']:,} deliveries/s")
    fanout_bench.LATENCY_SINK = None
    return {
        "parameters": {
            **params.__dict__,
            "frame_bytes": 200,
            "channel": fanout_bench.CHANNEL,
            "fixed_deliveries_per_s": fanout_bench.FIXED_DELIVERIES_PER_S,
        },
        "runs": runs,
        "counting": counts,
        "checks_ok": ok,
    }


# --------------------------------------------------------------------------- users


@dataclass(frozen=True)
class UsersParams:
    users: int
    batch: int
    duration_s: float
    warmup_s: float
    sample: int
    retries: int
    inflight: int = 8


USERS_FULL = UsersParams(10_000, 100, 10.0, 2.0, 40, 2)
USERS_QUICK = UsersParams(200, 20, 0.6, 0.2, 10, 0)


def users(ctx: Context) -> dict[str, Any]:
    """U users, each on ``user.<id>`` + ``global``: private batches and global messages."""
    params = USERS_QUICK if ctx.quick else USERS_FULL
    if params.users % params.batch:
        raise ValueError("users must be a multiple of the batch size")
    ctx.progress.total(len(ctx.servers) * 4)
    runs: list[dict[str, Any]] = []
    counts = dict(ZERO_COUNTS)
    ok = True
    user_ids: list[str] | None = None
    for name in ctx.servers:
        node = None
        tokens: list[str] | None = None
        if name == "hub":
            node = NodeProcess(port=free_port(), cpu=ctx.node_cpu)
            ctx.progress.status(f"hub: creating {params.users:,} users")
            started = time.monotonic()
            user_ids = seed_users(node, params.users)
            tokens = access_tokens(node, user_ids)
            seeded_s = time.monotonic() - started
        ids = user_ids or [f"00000000-0000-4000-8000-{i:012d}" for i in range(params.users)]
        with (
            cleanup_on_exit(*([node.cleanup] if node else [])),
            open_server(name, cpu=ctx.node_cpu, node=node) as server,
        ):
            ctx.progress.step(f"{name}: server up")
            result = run_users(ctx, params, server, ids, tokens)
            if name == "hub":
                result["seed_seconds"] = round(seeded_s, 1)
            runs.append({"server": name, **result})
            counts = add_counts(counts, counting_of(result["checks"]))
            ok = ok and result["checks_ok"]
    return {
        "parameters": params.__dict__,
        "runs": runs,
        "counting": counts,
        "checks_ok": ok,
    }


def run_users(
    ctx: Context, params: UsersParams, server: Any, ids: list[str], tokens: list[str] | None
) -> dict[str, Any]:
    sources = tuple(f"127.0.0.{i}" for i in range(1, SOURCES + 1))
    pool = UsersPool(
        user_specs(server.spec, ids, tokens),
        sample=params.sample,
        count_procs=1,
        cpu=ctx.gen_cpu,
        read_interval_s=0.2,
        source_addresses=sources,
    )
    publisher = start_batch_publisher(
        BatchPublisherConfig(
            "127.0.0.1",
            server.publish_port,
            server.tokens["admin"],
            "global",
            pad=0,
            connections=16,
            cpu=ctx.gen_cpu,
            batches=batches_of(ids, params.batch),
        )
    )
    collector = LatencyCollector()
    fanout_bench.LATENCY_SINK = collector
    with cleanup_on_exit(pool.stop, publisher.stop):
        opened = pool.open()
        ctx.progress.step(f"{server.name}: {opened['ok']:,} users connected")
        probe = fanout_bench.Probe(server.pid, [w.pid for w in pool.workers], publisher.pid)
        base = fanout_bench.totals(pool.snapshot())["text_frames"]
        expected_so_far = base
        per_request = {"private": params.batch, "global": opened["ok"]}
        phases: dict[str, dict[str, Any]] = {}
        cdfs: dict[str, Any] = {}
        for kind in ("private", "global"):
            publisher.call("mode", kind)
            phases[kind] = {}
            for phase, rate_of in (("max", None), ("half", "half")):
                start_expected = expected_so_far

                def expected(published: int, start: int = start_expected, k: str = kind) -> int:
                    return start + published * per_request[k]

                rate = None
                if rate_of == "half":
                    rate = max(1.0, phases[kind]["max"]["published_per_s"] / 2)
                window = f"{kind}-{phase}"
                result = fanout_bench.run_clean_phase(
                    window,
                    pool,  # type: ignore[arg-type]  # same interface
                    publisher,
                    probe,
                    retries=params.retries,
                    quiet_timeout_s=_quiet_wait(ctx, fanout_bench.QUIET_TIMEOUT_S),
                    expected=expected,
                    rate=rate,
                    inflight=params.inflight,
                    warmup=params.warmup_s,
                    duration=params.duration_s,
                )
                phases[kind][phase] = result
                expected_so_far += result["published_all_attempts"] * per_request[kind]
                cdfs[window] = collector.cdf_for(window, result)
            m, h = phases[kind]["max"], phases[kind]["half"]
            ctx.progress.step(
                f"{server.name} {kind}: {m['delivered_per_s']:,} deliveries/s, "
                f"p99 {h['latency_ms_p99']} ms @50%"
            )
        final_snaps = fanout_bench.settle(pool, expected_so_far)  # type: ignore[arg-type]
        final = fanout_bench.totals(final_snaps)
        fanout_bench.LATENCY_SINK = None
        sizes: dict[str, int] = {}
        for snap in final_snaps:
            for size, count in snap["frame_sizes"].items():
                sizes[str(size)] = sizes.get(str(size), 0) + count
        received = final["text_frames"]
        checks = {
            "connections_failed": opened["failed"],
            "connections_lost": final["dead"],
            "close_codes": final["close_codes"],
            "expected_deliveries": expected_so_far - base,
            "received_deliveries": received - base,
            "missing_deliveries": max(0, expected_so_far - received),
            "extra_deliveries": max(0, received - expected_so_far),
            "bad_frames": final["bad_frames"],
            "sample_checked": final["checked"],
            "sample_gaps": final["gaps"],
            "sample_duplicates": final["duplicates"],
            "sample_epoch_resets": final["resets"],
        }
        counts = counting_of(checks)
        return {
            "users": opened["ok"],
            "open_seconds": round(opened["seconds"], 2),
            "frame_bytes_observed": sizes,
            "phases": phases,
            "latency_cdf_ms": cdfs,
            "checks": checks,
            "checks_ok": all(v == 0 for v in counts.values())
            and final["checked"] > 0
            and final["resets"] == 0,
        }


# --------------------------------------------------------------------------- ingest


def ingest(ctx: Context) -> dict[str, Any]:
    """:mod:`benchmarks.ingest` (RabbitMQ → WebSocket) for the hub and python-socketio."""
    from benchmarks import ingest as ingest_bench

    out = ctx.out_dir / "ingest-suite.json"
    servers = [s for s in ctx.servers if s in ("hub", "socketio")]
    if ctx.quick:
        argv = [
            "--subscribers", "100", "--channels", "10", "--sample", "10",
            "--duration", "0.5", "--warmup", "0.1", "--count-procs", "1",
            "--prefill", "20000", "--peer-prefill", "1500", "--warm", "0",
        ]  # fmt: skip
        layouts = 1
    else:
        # RabbitMQ on the generator's CPU, ahead of the generator, as on a machine of its
        # own: unpinned, its schedulers also run on the node's core and the node's figures
        # show them; at the generator's priority, its 1,000 clients starve it at times.
        argv = ["--rabbit-cpu", "1"]
        layouts = 2
    argv += ["--servers", *servers, "--out", str(out)]
    ctx.progress.total(2 * layouts * len(servers))
    with ctx.progress.steps_on_lines(r" (max|50%): "):
        status = ingest_bench.main(argv)
    report: dict[str, Any] = json.loads(out.read_text())
    out.unlink(missing_ok=True)
    counts = dict(ZERO_COUNTS)
    for run in report["runs"]:
        counts = add_counts(counts, counting_of(run["checks"]))
    report["counting"] = counts
    report["checks_ok"] = status == 0 and all(run["checks_ok"] for run in report["runs"])
    report["skipped"] = {
        "websockets": "the websockets library has no broker integration; the RabbitMQ peer "
        "is python-socketio's AsyncAioPikaManager"
    }
    return report


# --------------------------------------------------------------------------- cluster


def cluster(ctx: Context) -> dict[str, Any]:
    """One node vs two on Redis: the hub (:mod:`benchmarks.cluster`) and python-socketio
    with ``AsyncRedisManager``."""
    args = cluster_bench.parse_args(["--quick"] if ctx.quick else [])
    if ctx.quick:
        args.duration, args.warmup = 0.8, 0.2
    args.quiet_timeout = _quiet_wait(ctx, 120.0)
    args.cpu_a, args.cpu_b, args.gen_cpu = ctx.node_cpu, ctx.gen_cpu, ctx.gen_cpu
    servers = [s for s in ctx.servers if s in ("hub", "socketio")]
    ctx.progress.total(2 * len(servers))
    runs: list[dict[str, Any]] = []
    counts = dict(ZERO_COUNTS)
    ok = True
    for name in servers:
        redis = cluster_bench.RedisProcess()
        with cleanup_on_exit(redis.stop):
            redis.start()
            for node_count in (1, 2):
                ctx.progress.status(f"{name}: {node_count} node(s)")
                if name == "hub":
                    result = cluster_bench.run_configuration(args, redis, node_count)
                else:
                    result = run_socketio_configuration(args, redis, node_count)
                runs.append({"server": name, **result})
                for value in result["checks"].values():
                    if isinstance(value, dict):
                        counts = add_counts(counts, counting_of(value))
                counts["connections_failed"] += int(result["checks"].get("connections_failed", 0))
                ok = ok and result["checks_ok"]
                m = result["phases"]["max"]
                ctx.progress.step(
                    f"{name} {node_count} node(s): {m['delivered_per_s']:,} deliveries/s"
                )
    return {
        "parameters": {
            "n": args.n,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "sample_per_node": args.sample,
            "inflight": args.inflight,
            "cpu_a": args.cpu_a,
            "cpu_b": args.cpu_b,
            "gen_cpu": args.gen_cpu,
        },
        "runs": runs,
        "counting": counts,
        "checks_ok": ok,
        "skipped": {"websockets": "the websockets library has no multi-server layer"},
    }


def run_socketio_configuration(
    args: argparse.Namespace, redis: Any, node_count: int
) -> dict[str, Any]:
    """:func:`benchmarks.cluster.run_configuration` for python-socketio servers sharing
    ``redis`` through ``AsyncRedisManager``: subscribers split evenly, publishing to A."""
    from contextlib import ExitStack

    cpus = [args.cpu_a, args.cpu_b]
    names = ["A", "B"][:node_count]
    with ExitStack() as stack:
        servers = [
            stack.enter_context(open_server("socketio", cpu=cpus[i], redis_url=redis.url))
            for i in range(node_count)
        ]
        sources = tuple(f"127.0.0.{i}" for i in range(1, args.sources + 1))
        pools = {
            name: SubscriberPool(
                server.spec([fanout_bench.CHANNEL]),
                count_procs=1,
                cpu=args.gen_cpu,
                read_interval_s=0.2,
                source_addresses=sources,
            )
            for name, server in zip(names, servers, strict=True)
        }
        first = servers[0]
        publisher = start_publisher(
            _PublisherConfig(
                "127.0.0.1",
                first.publish_port,
                "peer",
                fanout_bench.CHANNEL,
                pad=0,
                connections=max(args.inflight, 16),
                cpu=args.gen_cpu,
            )
        )
        stack.enter_context(
            cleanup_on_exit(*[pool.stop for pool in pools.values()], publisher.stop)
        )
        status, body = publisher.call("one", {"probe": True})
        if status != 202:
            raise RuntimeError(f"publish failed: {status} {body[:200]!r}")
        share = args.n // node_count
        opened: dict[str, Any] = {}
        for name, pool in pools.items():
            sample = min(args.sample, share)
            opened[name] = pool.open(share - sample, sample)
        subscribers = sum(o["ok"] for o in opened.values())
        failed = sum(o["failed"] for o in opened.values())
        print(f"  socketio {node_count} node(s): {subscribers} subscribers open", flush=True)
        pids = {name: server.pid for name, server in zip(names, servers, strict=True)}
        pids["redis"] = redis.process.pid if redis.process else 0
        pids["publisher"] = publisher.pid
        base = {
            name: fanout_bench.totals(pool.snapshot())["text_frames"]
            for name, pool in pools.items()
        }
        phases: dict[str, Any] = {}
        fanout_bench.wait_quiet(args.quiet_timeout)
        phases["max"] = cluster_bench.run_phase(
            "max", pools, publisher, pids, rate=None, inflight=args.inflight,
            warmup=args.warmup, duration=args.duration,
        )  # fmt: skip
        half_rate = max(0.5, phases["max"]["published_per_s"] / 2)
        fanout_bench.wait_quiet(args.quiet_timeout)
        phases["half"] = cluster_bench.run_phase(
            "half", pools, publisher, pids, rate=half_rate, inflight=args.inflight,
            warmup=args.warmup, duration=args.duration,
        )  # fmt: skip
        published = sum(p["published_total"] for p in phases.values())
        checks: dict[str, Any] = {"connections_failed": failed}
        ok = failed == 0
        for name, pool in pools.items():
            expected = base[name] + published * opened[name]["ok"]
            final = fanout_bench.totals(fanout_bench.settle(pool, expected))
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
        return {
            "nodes": node_count,
            "subscribers": subscribers,
            "subscribers_by_node": {name: o["ok"] for name, o in opened.items()},
            "phases": phases,
            "checks": checks,
            "checks_ok": ok,
        }


#: For tests and tools: the workload functions of this module by name.
FUNCTIONS: dict[str, Callable[[Context], dict[str, Any]]] = {
    "fanout": fanout,
    "users": users,
    "ingest": ingest,
    "cluster": cluster,
}
