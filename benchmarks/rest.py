"""REST: ``GET /api/v1/users/me`` with the Redis user cache, and the event-loop lag that
WebSocket clients see while a burst of logins (bcrypt, cost 12) runs.

A private ``redis-server`` (:class:`benchmarks.cluster.RedisProcess`) backs the node
(``REDIS_URL``: user cache and shared rate limits, limits raised so nothing is refused).

1. **users/me, max**: :class:`GetLoad` (loadgen's publisher, sending ``GET /users/me``
   with the tokens of several users in turn) keeps ``inflight`` requests in flight over
   keep-alive connections for a window: requests/s and latency. Redis ``keyspace_hits``
   before and after show the cache answered.
2. **users/me, 50%**: open loop at half that rate: p50/p99/max latency.
3. **login burst**: :class:`LagProber` connections send ``{"type":"ping"}`` every
   ``probe_interval_s`` and time the ``pong`` (a trio checkpoint on the node's loop: any
   stall of the loop shows as a late pong). After a baseline, ``logins`` users log in at
   once (one thread each in another process); the lag is each round trip during the
   burst minus the median round trip of the baseline.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import http.client
import json
import multiprocessing.connection
import select
import signal
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import h11

from benchmarks.cluster import RedisProcess
from benchmarks.idle import finish_profile, record_profile
from benchmarks.loadgen import (
    OP_TEXT,
    FrameDecoder,
    NodeProcess,
    Publisher,
    PublisherConfig,
    Worker,
    _HttpConn,
    accept_for,
    cleanup_on_exit,
    cpu_seconds,
    encode_frame,
    free_port,
    make_key,
    parse_upgrade_response,
    percentile,
    pin_to_cpu,
    upgrade_request,
)
from benchmarks.runner import add_counts, cdf_points
from benchmarks.users import SEED_PASSWORD, access_tokens, seed_users

if TYPE_CHECKING:
    from benchmarks.runner import Context

ME_PATH = "/api/v1/users/me"
LOGIN_PATH = "/api/v1/auth/login"


@dataclass(frozen=True)
class RestParams:
    token_users: int
    connections: int
    inflight: int
    duration_s: float
    warmup_s: float
    logins: int
    probes: int
    probe_interval_s: float
    baseline_s: float
    bcrypt_rounds: int = 12


REST_FULL = RestParams(20, 32, 16, 10.0, 2.0, 50, 2, 0.01, 3.0)
REST_QUICK = RestParams(4, 8, 8, 1.0, 0.3, 8, 2, 0.01, 0.5)


# --------------------------------------------------------------------------- GET load


@dataclass(frozen=True)
class GetLoadConfig(PublisherConfig):
    tokens: tuple[str, ...] = ()
    target: str = ME_PATH


class GetLoad(Publisher):
    """loadgen's publisher, sending ``GET target`` with ``tokens`` in turn."""

    def __init__(self, config: GetLoadConfig) -> None:
        super().__init__(config)
        self.tokens = config.tokens
        self.target = config.target
        self.turn = 0

    def _send(self, conn: _HttpConn, scheduled_ns: int) -> None:
        token = self.tokens[self.turn % len(self.tokens)]
        self.turn += 1
        request = h11.Request(
            method="GET",
            target=self.target,
            headers=[("Host", f"{conn.host}:{conn.port}"), ("Authorization", f"Bearer {token}")],
        )
        out = conn.h11.send(request) + conn.h11.send(h11.EndOfMessage())
        conn.scheduled_ns = scheduled_ns
        conn.sent_ns = time.time_ns()
        conn.busy = True
        conn.sock.setblocking(True)
        conn.sock.sendall(out)
        conn.sock.setblocking(False)


def _get_load_main(ctrl: multiprocessing.connection.Connection, config: GetLoadConfig) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    pin_to_cpu(config.cpu)
    GetLoad(config).serve(ctrl)


def get_phase(load: Worker, node_pid: int, rate: float | None, p: RestParams) -> dict[str, Any]:
    cpu0 = cpu_seconds(node_pid)
    result = load.call("run", rate, p.warmup_s + p.duration_s, p.inflight, timeout=120)
    cpu1 = cpu_seconds(node_pid)
    window_start = result["start"] + p.warmup_s
    done = [t for t in result["done_at"] if t >= window_start]
    latencies = result["request_ms"][len(result["done_at"]) - len(done) :]
    span = max(1e-9, result["end"] - window_start)
    ok = result["statuses"].get("200", 0)
    return {
        "mode": "closed loop" if rate is None else "open loop",
        "target_rate": rate,
        "inflight": p.inflight if rate is None else None,
        "requests_per_s": round(len(done) / span, 1),
        "statuses": result["statuses"],
        "errors": sum(v for k, v in result["statuses"].items() if k != "200"),
        "ok": ok,
        "latency_ms_p50": _r(percentile(latencies, 50)),
        "latency_ms_p99": _r(percentile(latencies, 99)),
        "latency_ms_max": _r(max(latencies) if latencies else None),
        "latency_cdf_ms": cdf_points(latencies),
        "node_cpu_pct": round(100 * (cpu1 - cpu0) / (result["end"] - result["start"]), 1),
        "open_loop_backlog_max": result["backlog_max"] if rate is not None else None,
    }


# --------------------------------------------------------------------------- lag probe


@dataclass(frozen=True)
class ProbeConfig:
    host: str
    port: int
    token: str
    connections: int
    interval_s: float
    cpu: int | None


class LagProber:
    """WebSocket connections that ping the hub on a fixed period and time the pongs."""

    def __init__(self, config: ProbeConfig) -> None:
        self.cfg = config
        self.socks: list[socket.socket] = []
        self.decoders: dict[int, FrameDecoder] = {}
        self.pending: dict[int, dict[int, float]] = {}
        self.samples: list[tuple[float, float]] = []  # (sent at, round trip ms), monotonic
        self.lost = 0
        self.seq = 0
        for _ in range(config.connections):
            self._connect()
        self.epoll = select.epoll()
        for sock in self.socks:
            self.epoll.register(sock.fileno(), select.EPOLLIN)

    def _connect(self) -> None:
        sock = socket.create_connection((self.cfg.host, self.cfg.port), timeout=10)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        key = make_key()
        headers = [("Authorization", f"Bearer {self.cfg.token}")]
        sock.sendall(
            upgrade_request(self.cfg.host, self.cfg.port, "/ws/notifications", key, headers)
        )
        buf = b""
        while (parsed := parse_upgrade_response(buf)) is None:
            chunk = sock.recv(65536)
            if not chunk:
                raise RuntimeError("probe connection closed during the upgrade")
            buf += chunk
        status, head, end = parsed
        if status != 101 or head.get("sec-websocket-accept", "").encode() != accept_for(key):
            raise RuntimeError(f"probe upgrade answered {status}")
        sock.setblocking(False)
        decoder = FrameDecoder()
        decoder.feed(buf[end:])
        self.decoders[sock.fileno()] = decoder
        self.pending[sock.fileno()] = {}
        self.socks.append(sock)

    def _read(self, timeout: float) -> None:
        for fd, _ in self.epoll.poll(timeout):
            sock = next(s for s in self.socks if s.fileno() == fd)
            try:
                data = sock.recv(65536)
            except BlockingIOError:
                continue
            now = time.monotonic()
            for opcode, payload in self.decoders[fd].feed(data):
                if opcode != OP_TEXT or not payload.startswith(b'{"type":"pong"'):
                    continue
                frame_id = json.loads(payload).get("id")
                sent = self.pending[fd].pop(frame_id, None)
                if sent is not None:
                    self.samples.append((sent, (now - sent) * 1000))

    def run(
        self, seconds: float, ctrl: multiprocessing.connection.Connection | None = None
    ) -> list[tuple[float, float]]:
        """Ping for ``seconds``, or until a ``("stop",)`` arrives on ``ctrl``; the
        ``(sent at, round trip ms)`` samples of that time."""
        self.samples = []
        end = time.monotonic() + seconds
        next_at = time.monotonic()
        turn = 0
        while (now := time.monotonic()) < end:
            if ctrl is not None and ctrl.poll():
                ctrl.recv()  # ("stop",)
                break
            if now >= next_at:
                sock = self.socks[turn % len(self.socks)]
                turn += 1
                self.seq += 1
                frame = json.dumps({"type": "ping", "id": self.seq}).encode()
                self.pending[sock.fileno()][self.seq] = time.monotonic()
                with contextlib.suppress(BlockingIOError):
                    sock.send(encode_frame(frame))
                next_at += self.cfg.interval_s / len(self.socks)
            self._read(max(0.0, min(next_at - time.monotonic(), 0.005)))
        drain_until = time.monotonic() + 2.0
        while any(self.pending.values()) and time.monotonic() < drain_until:
            self._read(0.01)
        self.lost += sum(len(p) for p in self.pending.values())
        for pending in self.pending.values():
            pending.clear()
        return self.samples

    def serve(self, ctrl: multiprocessing.connection.Connection) -> None:
        while True:
            command, *args = ctrl.recv()
            if command == "run":
                ctrl.send({"samples": self.run(float(args[0]), ctrl), "lost": self.lost})
            elif command == "exit":
                for sock in self.socks:
                    sock.close()
                ctrl.send(True)
                return


def _prober_main(ctrl: multiprocessing.connection.Connection, config: ProbeConfig) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    pin_to_cpu(config.cpu)
    LagProber(config).serve(ctrl)


def _burst_main(ctrl: multiprocessing.connection.Connection, config: Any) -> None:
    """``("burst", emails)``: every e-mail logs in at once, one thread each."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    pin_to_cpu(config["cpu"])
    while True:
        command, *args = ctrl.recv()
        if command == "exit":
            ctrl.send(True)
            return
        emails: list[str] = args[0]
        barrier = threading.Barrier(len(emails))

        def login(email: str, barrier: threading.Barrier = barrier) -> tuple[int, float, float]:
            conn = http.client.HTTPConnection("127.0.0.1", config["port"], timeout=120)
            conn.connect()
            body = json.dumps({"email": email, "password": SEED_PASSWORD})
            barrier.wait(30)
            started = time.monotonic()
            conn.request("POST", LOGIN_PATH, body, {"Content-Type": "application/json"})
            response = conn.getresponse()
            response.read()
            conn.close()
            return response.status, started, time.monotonic()

        with concurrent.futures.ThreadPoolExecutor(len(emails)) as pool:
            results = list(pool.map(login, emails))
        ctrl.send(results)


# --------------------------------------------------------------------------- the run


def _r(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def redis_hits(url: str) -> int:
    import redis

    client = redis.Redis.from_url(url)
    try:
        return int(client.info("stats")["keyspace_hits"])
    finally:
        client.close()


def login_burst(
    ctx: Context, p: RestParams, node: NodeProcess, token: str, emails: Sequence[str]
) -> dict[str, Any]:
    """Baseline pings, then the burst with pings going on; the lag figures."""
    prober = Worker(
        _prober_main,
        ProbeConfig("127.0.0.1", node.port, token, p.probes, p.probe_interval_s, ctx.gen_cpu),
        "lag-prober",
    )
    burster = Worker(_burst_main, {"port": node.port, "cpu": ctx.gen_cpu}, "login-burst")
    with cleanup_on_exit(prober.stop, burster.stop):
        baseline = prober.call("run", p.baseline_s, timeout=p.baseline_s + 30)["samples"]
        base_rtts = [rtt for _, rtt in baseline]
        base_median = percentile(base_rtts, 50) or 0.0
        burst_budget = 5 + p.logins * 1.5
        prober.send("run", burst_budget)
        burster.send("burst", list(emails))
        results = burster.reply(timeout=burst_budget + 60)
        prober.send("stop")
        probe = prober.reply(timeout=burst_budget + 60)
        first = min(started for _, started, _ in results)
        last = max(ended for _, _, ended in results)
        during = [rtt for sent, rtt in probe["samples"] if first <= sent <= last]
        lags = [max(0.0, rtt - base_median) for rtt in during]
        statuses: dict[str, int] = {}
        for status, _, _ in results:
            statuses[str(status)] = statuses.get(str(status), 0) + 1
        login_ms = [(ended - started) * 1000 for _, started, ended in results]
        return {
            "logins": len(emails),
            "bcrypt_rounds": p.bcrypt_rounds,
            "statuses": statuses,
            "burst_s": round(last - first, 2),
            "login_ms_p50": _r(percentile(login_ms, 50)),
            "login_ms_max": _r(max(login_ms)),
            "probe_connections": p.probes,
            "probe_interval_ms": p.probe_interval_s * 1000,
            "baseline_rtt_ms_p50": _r(base_median),
            "baseline_rtt_ms_p99": _r(percentile(base_rtts, 99)),
            "samples_during_burst": len(during),
            "rtt_ms_p50": _r(percentile(during, 50)),
            "rtt_ms_p99": _r(percentile(during, 99)),
            "rtt_ms_max": _r(max(during) if during else None),
            "lag_ms_p50": _r(percentile(lags, 50)),
            "lag_ms_p99": _r(percentile(lags, 99)),
            "lag_ms_max": _r(max(lags) if lags else None),
            "rtt_cdf_ms": cdf_points(during),
            "baseline_rtt_cdf_ms": cdf_points(base_rtts),
            "pings_lost": probe["lost"],
        }


def rest(ctx: Context) -> dict[str, Any]:
    """The REST workload on the hub (see the module docstring)."""
    p = REST_QUICK if ctx.quick else REST_FULL
    steps = 4 + (1 if ctx.profile else 0)
    ctx.progress.total(steps)
    redis = RedisProcess()
    with cleanup_on_exit(redis.stop):
        redis.start()
        env = {
            "REDIS_URL": redis.url,
            "BCRYPT_ROUNDS": str(p.bcrypt_rounds),
            "RATE_LIMIT_PUBLIC": "100000000/minute",
            "RATE_LIMIT_LOGIN": "100000000/minute",
        }
        node = NodeProcess(port=free_port(), cpu=ctx.node_cpu, env_overrides=env)
        with node:
            total_users = p.token_users + p.logins * (2 if ctx.profile else 1)
            ids = seed_users(node, total_users)
            node.start()
            tokens = access_tokens(node, ids[: p.token_users])
            ctx.progress.step(f"hub up, {total_users} users (bcrypt cost {p.bcrypt_rounds})")
            load = Worker(
                _get_load_main,
                GetLoadConfig(
                    "127.0.0.1",
                    node.port,
                    tokens[0],
                    "",
                    pad=0,
                    connections=p.connections,
                    cpu=ctx.gen_cpu,
                    tokens=tuple(tokens),
                ),
                "get-load",
            )
            with cleanup_on_exit(load.stop):
                status, body = _get_once(node.port, tokens[0])
                if status != 200:
                    raise RuntimeError(f"GET /users/me answered {status}: {body[:200]!r}")
                hits0 = redis_hits(redis.url)
                maximum = get_phase(load, node.pid, None, p)
                hits1 = redis_hits(redis.url)
                maximum["redis_keyspace_hits"] = hits1 - hits0
                ctx.progress.step(
                    f"users/me max: {maximum['requests_per_s']:,} req/s, "
                    f"p99 {maximum['latency_ms_p99']} ms"
                )
                half = get_phase(load, node.pid, max(1.0, maximum["requests_per_s"] / 2), p)
                ctx.progress.step(f"users/me 50%: p99 {half['latency_ms_p99']} ms")
            emails = [f"bench-u{i}@example.com" for i in range(p.token_users, total_users)]
            burst = login_burst(ctx, p, node, tokens[0], emails[: p.logins])
            ctx.progress.step(f"login burst: lag p99 {burst['lag_ms_p99']} ms")
            profile = None
            if ctx.profile:
                path = ctx.profile_dir / "profile-rest-login-burst.txt"
                spy = record_profile(node.pid, 5 + p.logins * 0.4, path, ctx.gen_cpu)
                extra = login_burst(ctx, p, node, tokens[0], emails[p.logins : 2 * p.logins])
                profile = finish_profile(spy, path)
                if profile is not None:
                    profile["lag_ms_p99_while_profiled"] = extra["lag_ms_p99"]
                ctx.progress.step("profiled a second burst")
    errors = maximum["errors"] + half["errors"]
    bad_logins = sum(v for k, v in burst["statuses"].items() if k != "200")
    counts = add_counts({}, {"missing": burst["pings_lost"]})  # pongs are frames too
    run = {
        "server": "hub",
        "users_me": {"max": maximum, "half": half},
        "login_burst": burst,
        "profile": profile,
        "checks": {
            "request_errors": errors,
            "failed_logins": bad_logins,
            "pings_lost": burst["pings_lost"],
            "cache_hits_seen": maximum["redis_keyspace_hits"] > 0,
        },
    }
    ok = errors == 0 and bad_logins == 0 and maximum["redis_keyspace_hits"] > 0
    return {
        "parameters": p.__dict__,
        "runs": [run],
        "counting": counts,
        "checks_ok": ok and burst["pings_lost"] == 0,
        "skipped": {
            "websockets": "no REST layer",
            "socketio": "no REST layer (python-socketio is WebSocket only)",
        },
    }


def _get_once(port: int, token: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", ME_PATH, headers={"Authorization": f"Bearer {token}"})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()
