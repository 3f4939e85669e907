"""Idle connections with heartbeats: memory per connection and broadcast-to-all time.

For each server (the hub and both peers), connections subscribed to :data:`CHANNEL` are
opened in steps (``levels``, e.g. 1,000 → 10,000 → 50,000) from several source addresses
(127.0.0.1 … 127.0.0.8 with ``IP_BIND_ADDRESS_NO_PORT``, past the ~28k ephemeral ports
of one address pair) by :class:`IdleWorker` processes pinned to the generator CPU, while
every connection keeps its server's heartbeat going:

- hub: the client sends ``{"type":"ping"}`` every ``HEARTBEAT_INTERVAL`` (the hub closes
  with 4008 after ``HEARTBEAT_TIMEOUT`` of silence);
- websockets: the server pings every interval, the client answers with a pong frame;
- socket.io: engine.io ``2`` every interval, the client answers ``3``.

At each level: the server's RSS (after a short settle); KB per connection is the slope
from the first level. Then ``broadcasts`` single messages to all: each subscriber's
arrival time is the kernel's receive timestamp of the frame (``SO_TIMESTAMPNS``), so how
fast the generator reads its sockets does not count; the broadcast time is the last
arrival minus the publisher's send time (``data.t``). At the largest level the
connections are then held for ``hold_s`` (longer than two heartbeat timeouts) and must
all still be open, having exchanged heartbeats, at the end.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import multiprocessing.connection
import select
import signal
import socket
import struct
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from benchmarks.fanout import summarize_profile
from benchmarks.loadgen import NOTIFICATION_PARSERS as PARSERS
from benchmarks.loadgen import (
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    RECV_BYTES,
    FrameDecoder,
    SubscriberWorker,
    Worker,
    WorkerConfig,
    _Sub,
    cleanup_on_exit,
    cpu_seconds,
    encode_frame,
    parse_hub_notification,
    percentile,
    pin_to_cpu,
    raise_nofile,
    rss_kb,
)
from benchmarks.runner import add_counts, cdf_points
from benchmarks.servers import open_server

if TYPE_CHECKING:
    from benchmarks.runner import Context

CHANNEL = "public.idle"
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
TIMESPEC = struct.Struct("qq")
#: Sockets opened per ``open`` call between two heartbeat passes.
OPEN_CHUNK = 500
#: How often a worker wakes up to send heartbeats and read.
TICK_S = 0.02
PING_FRAME = b'{"type":"ping"}'
BROADCAST_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class IdleParams:
    levels: tuple[int, ...]
    broadcasts: int
    heartbeat_s: float
    hold_s: float
    workers: int
    broadcast_from: int  # broadcast at levels from this size up
    settle_s: float  # before reading the server's RSS


#: Full sizes: the hub's default heartbeat (SPEC §1: 30 s, timeout 60 s), the peers'
#: pings at the same interval, the largest level held for longer than two timeouts.
IDLE_FULL = IdleParams((1000, 10_000, 50_000), 10, 30.0, 130.0, 4, 10_000, 2.0)
IDLE_QUICK = IdleParams((100, 400), 2, 0.5, 2.5, 1, 0, 0.5)


# --------------------------------------------------------------------------- worker


@dataclass
class IdleConfig(WorkerConfig):
    """``heartbeat``: ``"hub-ping"`` (send pings), ``"ws-pong"`` (answer WebSocket pings)
    or ``"eio-pong"`` (answer engine.io ``2``); ``interval_s``: the hub's ping period."""

    heartbeat: str = "hub-ping"
    interval_s: float = 30.0


@dataclass
class _Stats:
    pings_sent: int = 0
    pongs: int = 0
    server_pings: int = 0
    answered: int = 0
    notifications: int = 0
    arrivals: dict[int, list[float]] = field(default_factory=dict)


class IdleWorker(SubscriberWorker):
    """Holds sockets, keeps their heartbeat, timestamps notifications in the kernel."""

    def __init__(self, config: IdleConfig) -> None:
        super().__init__(config)
        self.heartbeat = config.heartbeat
        self.interval_s = config.interval_s
        self.stats = _Stats()
        self.order: list[int] = []  # fds in the order opened: who pings next
        self.cursor = 0
        self.started = time.monotonic()
        self.ping_credit = 0.0
        self.last_tick = time.monotonic()
        self.parse = PARSERS.get(config.spec.validator, parse_hub_notification)

    # -- opening -----------------------------------------------------------------------
    def _ready(self, sub: _Sub) -> None:
        with contextlib.suppress(OSError):
            sub.sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        sub.state = 3  # READY
        leftover, sub.inbuf = sub.inbuf, b""
        sub.decoder = FrameDecoder()
        sub.counter = None
        self.subs[sub.fd] = sub
        self.order.append(sub.fd)
        self.epoll.register(sub.fd, select.EPOLLIN)
        if leftover:
            self._frames(sub, leftover, time.time_ns())

    def open_chunked(self, count: int) -> dict[str, Any]:
        """:meth:`open` in chunks, keeping the heartbeats of open sockets between them."""
        ok = failed = 0
        seconds = 0.0
        errors: Counter[str] = Counter()
        while count > 0:
            result = self.open(min(OPEN_CHUNK, count))
            count -= OPEN_CHUNK
            ok, failed = ok + result["ok"], failed + result["failed"]
            seconds += result["seconds"]
            errors.update(result["errors"])
            self.service(0.0)
        return {"ok": ok, "failed": failed, "seconds": seconds, "errors": dict(errors)}

    # -- reading -----------------------------------------------------------------------
    def _frames(self, sub: _Sub, data: bytes, ts_ns: int) -> None:
        assert sub.decoder is not None
        for opcode, payload in sub.decoder.feed(data):
            if opcode == OP_TEXT:
                if payload == b"2" and self.heartbeat == "eio-pong":
                    self.stats.server_pings += 1
                    self.stats.answered += self._send(sub, encode_frame(b"3"))
                    continue
                if payload.startswith(b'{"type":"pong"'):
                    self.stats.pongs += 1
                    continue
                try:
                    note = self.parse(payload)
                except (ValueError, UnicodeDecodeError):
                    self.sample_bad += 1
                    continue
                if note is None:
                    continue
                self.stats.notifications += 1
                self.checker.check(f"{sub.fd}/{note.channel}", note.epoch, note.seq)
                if note.t_ns is not None:
                    arrivals = self.stats.arrivals.setdefault(note.t_ns, [])
                    arrivals.append((ts_ns - note.t_ns) / 1e6)
            elif opcode == OP_PING:
                self.stats.server_pings += 1
                if self.heartbeat == "ws-pong":
                    self.stats.answered += self._send(sub, encode_frame(payload, OP_PONG))
            elif opcode == OP_CLOSE:
                self.close_codes[int.from_bytes(payload[:2], "big") if payload else 0] += 1
                self._kill(sub)
                return
        if sub.decoder.bad:
            self.sample_bad += 1
            self._kill(sub)

    def _send(self, sub: _Sub, frame: bytes) -> bool:
        """Write one small frame; False when it could not go out (a full buffer on an
        idle connection: the next heartbeat retries; an error: the socket is dropped)."""
        try:
            sub.sock.send(frame)
            return True
        except BlockingIOError:
            return False
        except OSError:
            self._kill(sub)
            return False

    def drain_timestamped(self, timeout: float) -> None:
        while True:
            events = self.epoll.poll(timeout, 4096)
            timeout = 0.0
            for fd, _ in events:
                sub = self.subs.get(fd)
                if sub is None:
                    continue
                try:
                    data, ancillary, _, _ = sub.sock.recvmsg(RECV_BYTES, socket.CMSG_SPACE(16))
                except BlockingIOError:
                    continue
                except OSError:
                    self._kill(sub)
                    continue
                if not data:
                    self._kill(sub)
                    continue
                ts_ns = 0
                for level, kind, value in ancillary:
                    if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                        seconds, nanos = TIMESPEC.unpack(value[: TIMESPEC.size])
                        ts_ns = seconds * 1_000_000_000 + nanos
                self._frames(sub, data, ts_ns or time.time_ns())
            if len(events) < 4096:
                return

    def send_pings(self) -> None:
        """Client pings (hub): every socket once per ``interval_s``, spread evenly."""
        now = time.monotonic()
        elapsed, self.last_tick = now - self.last_tick, now
        if self.heartbeat != "hub-ping" or not self.order:
            return
        self.ping_credit += elapsed * len(self.order) / self.interval_s
        while self.ping_credit >= 1 and self.order:
            self.ping_credit -= 1
            self.cursor %= len(self.order)
            sub = self.subs.get(self.order[self.cursor])
            if sub is None:
                self.order.pop(self.cursor)
                continue
            self.cursor += 1
            self.stats.pings_sent += 1
            self._send(sub, encode_frame(PING_FRAME))

    def service(self, timeout: float) -> None:
        self.send_pings()
        self.drain_timestamped(timeout)

    # -- commands ----------------------------------------------------------------------
    def wait_broadcast(self, t_ns: int, timeout: float) -> dict[str, Any]:
        """Read until every open socket has the broadcast sent at ``t_ns`` (or timeout);
        its per-socket latencies, and how many sockets were open."""
        deadline = time.monotonic() + timeout
        while (
            len(self.stats.arrivals.get(t_ns, ())) < len(self.subs) and time.monotonic() < deadline
        ):
            self.service(TICK_S)
        latencies = self.stats.arrivals.pop(t_ns, [])
        return {"count": len(latencies), "open": len(self.subs), "latencies_ms": latencies}

    def idle_snapshot(self) -> dict[str, Any]:
        snap = self.snapshot()
        snap.update(
            pings_sent=self.stats.pings_sent,
            pongs=self.stats.pongs,
            server_pings=self.stats.server_pings,
            answered=self.stats.answered,
            notifications=self.stats.notifications,
        )
        return snap

    def serve(self, ctrl: multiprocessing.connection.Connection) -> None:
        while True:
            if not ctrl.poll(0):
                self.service(TICK_S)
                continue
            command, *args = ctrl.recv()
            if command == "open":
                ctrl.send(self.open_chunked(int(args[0])))
            elif command == "snap":
                self.service(0.0)
                ctrl.send(self.idle_snapshot())
            elif command == "wait":
                ctrl.send(self.wait_broadcast(*args))
            elif command in ("close", "exit"):
                self.close_all()
                ctrl.send(True)
                if command == "exit":
                    return


def _idle_main(ctrl: multiprocessing.connection.Connection, config: IdleConfig) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise_nofile()
    pin_to_cpu(config.cpu)
    IdleWorker(config).serve(ctrl)


# --------------------------------------------------------------------------- the run


HEARTBEATS = {"hub": "hub-ping", "websockets": "ws-pong", "socketio": "eio-pong"}


class Publish:
    """Publishes one message at a time to the publish route, each on a fresh connection
    (opened before the send time is taken: a keep-alive connection would time out while
    tens of thousands of connections open)."""

    def __init__(self, port: int, token: str) -> None:
        self.port = port
        self.token = token

    def broadcast(self) -> int:
        """Publish one message to :data:`CHANNEL`; its ``data.t`` (send time, ns)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.connect()
            t_ns = time.time_ns()
            body = json.dumps({"channel": CHANNEL, "data": {"t": t_ns, "p": ""}})
            headers = {"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"}
            conn.request("POST", "/api/v1/notifications", body=body, headers=headers)
            response = conn.getresponse()
            response.read()
        finally:
            conn.close()
        if response.status != 202:
            raise RuntimeError(f"publish answered {response.status}")
        return t_ns

    def close(self) -> None:
        """Nothing to release (kept for :func:`cleanup_on_exit`)."""


def broadcast_round(workers: list[Worker], publish: Publish, rounds: int) -> list[dict[str, Any]]:
    """``rounds`` broadcasts, one after the other, each awaited on every open socket."""
    results = []
    for _ in range(rounds):
        t_ns = publish.broadcast()
        for worker in workers:
            worker.send("wait", t_ns, BROADCAST_TIMEOUT_S)
        replies = [worker.reply(BROADCAST_TIMEOUT_S + 30) for worker in workers]
        latencies = [value for reply in replies for value in reply["latencies_ms"]]
        results.append(
            {
                "received": len(latencies),
                "expected": sum(reply["open"] for reply in replies),
                "all_ms": max(latencies) if latencies else None,
                "latencies_ms": latencies,
            }
        )
        time.sleep(0.3)  # a gap between broadcasts (heartbeats continue meanwhile)
    return results


def record_profile(pid: int, seconds: float, path: Any, cpu: int | None) -> Any:
    """Start ``py-spy record`` (raw collapsed stacks) on ``pid``; returns the Popen or
    ``None`` when py-spy is not installed."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(py_spy).exists():
        return None
    command = [
        py_spy, "record", "--pid", str(pid), "--rate", "200", "--nonblocking",
        "--duration", str(max(1, int(seconds))), "--format", "raw", "--output", str(path),
    ]  # fmt: skip
    if cpu is not None and shutil.which("taskset"):
        command = ["taskset", "-c", str(cpu), *command]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def finish_profile(spy: Any, path: Any) -> dict[str, Any] | None:
    if spy is None:
        return {"error": "py-spy not installed"}
    try:
        spy.wait(timeout=60)
    except Exception:
        spy.kill()
        spy.wait(5)
    if not path.exists():
        return {"error": (spy.stderr.read() if spy.stderr else b"").decode()[-300:]}
    return {"collapsed_stacks": f"profiles/{path.name}", **summarize_profile(path)}


def open_files_limit(pid: int) -> int:
    """The soft ``RLIMIT_NOFILE`` of process ``pid`` (from ``/proc/<pid>/limits``)."""
    with open(f"/proc/{pid}/limits") as f:
        for line in f:
            if line.startswith("Max open files"):
                return int(line.split()[3])
    return 1 << 20


#: File descriptors a server needs beyond its connections (listeners, logs, storage…).
FD_MARGIN = 200


def run_server(ctx: Context, params: IdleParams, name: str) -> dict[str, Any]:
    """Every level, broadcasts and the hold on one server.

    Levels above what the server process's ``RLIMIT_NOFILE`` allows are not attempted
    (raising the hard limit needs ``CAP_SYS_RESOURCE``); the result says so.
    """
    hb = params.heartbeat_s
    env = {
        "HEARTBEAT_INTERVAL": str(hb),
        "HEARTBEAT_TIMEOUT": str(2 * hb),
        # The hub refuses upgrades (503) that would leave fewer descriptors free than
        # its reserve; the top level here stops FD_MARGIN short of the limit.
        "FD_RESERVE": str(FD_MARGIN // 2),
    }
    sources = tuple(f"127.0.0.{i}" for i in range(1, 9))
    with open_server(name, cpu=ctx.node_cpu, env=env, heartbeat_s=hb) as server:
        spec = server.spec([CHANNEL])
        workers = [
            Worker(
                _idle_main,
                IdleConfig(
                    spec,
                    "sample",
                    ctx.gen_cpu,
                    source_addresses=sources,
                    heartbeat=HEARTBEATS[name],
                    interval_s=hb,
                ),
                f"idle-{i}",
            )
            for i in range(params.workers)
        ]
        publish = Publish(server.publish_port, server.tokens["admin"])
        fd_limit = open_files_limit(server.pid)
        wanted = params.levels
        levels_run = tuple(lv for lv in wanted if lv <= fd_limit - FD_MARGIN)
        if len(levels_run) < len(wanted):
            levels_run = (*levels_run, fd_limit - FD_MARGIN)
        with cleanup_on_exit(*(w.stop for w in workers), publish.close):
            time.sleep(params.settle_s)  # let the server settle before reading its RSS
            rss0 = rss_kb(server.pid)
            levels: list[dict[str, Any]] = []
            opened_total = failed_total = 0
            counts = [0] * len(workers)
            errors: Counter[str] = Counter()
            for level in levels_run:
                need = level - opened_total
                shares = [need // len(workers)] * len(workers)
                for i in range(need - sum(shares)):
                    shares[i] += 1
                started = time.monotonic()
                cpu0 = cpu_seconds(server.pid), sum(cpu_seconds(w.pid) for w in workers)
                for worker, share in zip(workers, shares, strict=True):
                    worker.send("open", share)
                results = [w.reply(timeout=900) for w in workers]
                open_s = time.monotonic() - started
                cpu1 = cpu_seconds(server.pid), sum(cpu_seconds(w.pid) for w in workers)
                for i, result in enumerate(results):
                    counts[i] += result["ok"]
                    errors.update(result["errors"])
                opened_total += need
                failed_total += sum(r["failed"] for r in results)
                time.sleep(params.settle_s)
                rss = rss_kb(server.pid)
                entry: dict[str, Any] = {
                    "connections": sum(counts),
                    "open_seconds": round(open_s, 2),
                    "server_cpu_pct_while_opening": round(100 * (cpu1[0] - cpu0[0]) / open_s, 1),
                    "generator_cpu_pct_while_opening": round(100 * (cpu1[1] - cpu0[1]) / open_s, 1),
                    "rss_kb": rss,
                }
                if levels:
                    first = levels[0]
                    added = entry["connections"] - first["connections"]
                    entry["kb_per_connection_from_first"] = (
                        round((rss - first["rss_kb"]) / added, 2) if added else None
                    )
                if level >= params.broadcast_from:
                    rounds = broadcast_round(workers, publish, params.broadcasts)
                    entry["broadcast"] = summarize_broadcasts(rounds)
                levels.append(entry)
                ctx.progress.step(
                    f"{name}: {entry['connections']:,} open, RSS {rss / 1024:.0f} MB"
                    + (
                        f", broadcast p99 {entry['broadcast']['all_s_p99']} s"
                        if "broadcast" in entry
                        else ""
                    )
                )
            # Hold the largest level through several heartbeat timeouts.
            top_reached = time.monotonic()
            cpu_a, t_a = cpu_seconds(server.pid), time.monotonic()
            profile = None
            if ctx.profile and name == "hub" and params.broadcasts:
                path = ctx.profile_dir / f"profile-idle-broadcast-{levels[-1]['connections']}.txt"
                spy = record_profile(server.pid, 8, path, ctx.gen_cpu)
                extra = broadcast_round(workers, publish, params.broadcasts)
                profile = finish_profile(spy, path)
                if profile is not None:
                    profile["broadcasts"] = len(extra)
                cpu_a, t_a = cpu_seconds(server.pid), time.monotonic()
            remaining = params.hold_s - (time.monotonic() - top_reached)
            if remaining > 0:
                time.sleep(remaining)  # holding idle connections is the measurement
            cpu_pct = round(100 * (cpu_seconds(server.pid) - cpu_a) / (time.monotonic() - t_a), 1)
            for worker in workers:
                worker.send("snap")
            snaps = [worker.reply() for worker in workers]
            rss_end = rss_kb(server.pid)
            held_s = time.monotonic() - top_reached
    lost = sum(s["dead"] for s in snaps)
    still_open = sum(s["open"] for s in snaps)
    close_codes: Counter[str] = Counter()
    for snap in snaps:
        close_codes.update({str(k): v for k, v in snap["close_codes"].items()})
    first, top = levels[0], levels[-1]
    added = top["connections"] - first["connections"]
    broadcasts = [lv["broadcast"] for lv in levels if "broadcast" in lv]
    top_broadcast = top.get("broadcast", {})
    missing = sum(b["missing"] for b in broadcasts)
    checks = {
        "connections_failed": failed_total,
        "connections_lost": lost,
        "close_codes": dict(close_codes),
        "missing_deliveries": missing,
        "extra_deliveries": 0,
        "bad_frames": sum(s["bad_frames"] for s in snaps),
        "sample_checked": sum(s["checked"] for s in snaps),
        "sample_gaps": sum(s["gaps"] for s in snaps),
        "sample_duplicates": sum(s["duplicates"] for s in snaps),
        "sample_epoch_resets": sum(s["resets"] for s in snaps),
    }
    heartbeats = {
        "interval_s": hb,
        "timeout_s": 2 * hb if name == "hub" else hb,
        "how": {
            "hub": "client {type:ping} every interval; server closes with 4008 after "
            "HEARTBEAT_TIMEOUT of silence",
            "websockets": "server WebSocket ping every interval, closes when no pong "
            "within ping_timeout",
            "socketio": "engine.io ping '2' every ping_interval, closes when no '3' "
            "within ping_timeout",
        }[name],
        "client_pings_sent": sum(s["pings_sent"] for s in snaps),
        "pongs_received": sum(s["pongs"] for s in snaps),
        "server_pings_received": sum(s["server_pings"] for s in snaps),
        "server_pings_answered": sum(s["answered"] for s in snaps),
        "held_s": round(held_s, 1),
        "server_cpu_pct_while_idle": cpu_pct,
    }
    counted = [v for k, v in checks.items() if k not in ("close_codes", "sample_checked")]
    return {
        "server": name,
        "open_files_limit": fd_limit,
        "levels_wanted": list(wanted),
        "levels_capped": list(levels_run) != list(wanted),
        "levels": levels,
        "largest_level": f"{top['connections']:,} connections",
        "rss_kb_at_0": rss0,
        "rss_kb_after_hold": rss_end,
        "kb_per_connection": round((top["rss_kb"] - first["rss_kb"]) / added, 2) if added else None,
        "connections_held": still_open if lost == 0 and failed_total == 0 else 0,
        "broadcast_p99_s": top_broadcast.get("all_s_p99"),
        "heartbeats": heartbeats,
        "open_errors": dict(errors.most_common(5)),
        "profile": profile,
        "checks": checks,
        "checks_ok": all(v == 0 for v in counted) and checks["sample_checked"] > 0,
    }


def summarize_broadcasts(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Per broadcast: when the last subscriber had it; over all: per-connection latency."""
    all_ms = [r["all_ms"] for r in rounds if r["all_ms"] is not None]
    every = [value for r in rounds for value in r["latencies_ms"]]
    return {
        "broadcasts": len(rounds),
        "missing": sum(max(0, r["expected"] - r["received"]) for r in rounds),
        "all_s": [round(v / 1000, 4) for v in all_ms],
        "all_s_p50": _s(percentile(all_ms, 50)),
        "all_s_p99": _s(percentile(all_ms, 99)),
        "per_connection_ms_p50": _r(percentile(every, 50)),
        "per_connection_ms_p99": _r(percentile(every, 99)),
        "per_connection_cdf_ms": cdf_points(every),
    }


def _s(value: float | None) -> float | None:
    return None if value is None else round(value / 1000, 4)


def _r(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def idle(ctx: Context) -> dict[str, Any]:
    """The idle workload on every server (see the module docstring)."""
    params = IDLE_QUICK if ctx.quick else IDLE_FULL
    ctx.progress.total(len(ctx.servers) * len(params.levels))
    runs = []
    counts = add_counts({}, {})
    ok = True
    from benchmarks.runner import counting_of

    for name in ctx.servers:
        ctx.progress.status(f"{name}: opening")
        try:
            run = run_server(ctx, params, name)
        except (RuntimeError, OSError, TimeoutError) as error:  # one server failing
            ok = False  # must not lose the others' figures
            runs.append({"server": name, "error": f"{type(error).__name__}: {error}"})
            continue
        runs.append(run)
        counts = add_counts(counts, counting_of(run["checks"]))
        ok = ok and run["checks_ok"]
    return {
        "parameters": {**params.__dict__, "channel": CHANNEL, "sources": 8},
        "runs": runs,
        "counting": counts,
        "checks_ok": ok,
    }
