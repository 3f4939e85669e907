"""Rough fan-out and idle-memory check of the realtime core (not a test, not the benchmark).

Starts ``hub serve`` pinned to CPU 0 in a temporary directory, then from this process
(pinned to CPU 1) opens N raw WebSocket subscribers of ``global`` and either

* ``fanout``: publishes 200-byte notifications over REST (8 in flight) for a few
  seconds and reports delivered messages/s and sampled delivery latency, or
* ``idle``: keeps opening connections and reports the server's RSS per connection
  (slope between the first and the last step).

Usage::

    .venv/bin/python tests/realtime/perf_fanout.py fanout --subscribers 1000
    .venv/bin/python tests/realtime/perf_fanout.py idle --subscribers 10000

The benchmark proper is ``benchmarks/fanout.py``; this script is the realtime
engineer's quick check that the "(b+)" design keeps its numbers.
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import os
import select
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from tests.realtime.rawws import OP_TEXT, client_frame, pop_frame, upgrade_request  # noqa: E402

HUB = str(ROOT / ".venv" / "bin" / "hub")
PASSWORD = "Perf-Passw0rd"
SAMPLED = 20
PUBLISHERS = 8
PAYLOAD_PAD = 120  # → frames of about 200 bytes


def env_for(data_dir: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        HUB_DATA_DIR=data_dir,
        JWT_SECRET_KEY="perf-secret-key-0123456789abcdefghijkl",
        LOG_LEVEL="WARNING",
        RATE_LIMIT_ADMIN="100000000/minute",
        RATE_LIMIT_LOGIN="100000/minute",
        HEARTBEAT_INTERVAL="300",
        HEARTBEAT_TIMEOUT="600",
        BCRYPT_ROUNDS="4",
    )
    for key in ("DATABASE_URL", "REDIS_URL", "AMQP_URL"):
        env.pop(key, None)
    return env


def start_server(port: int, data_dir: str) -> subprocess.Popen[bytes]:
    env = env_for(data_dir)
    subprocess.run(
        [
            HUB,
            "users",
            "create",
            "perf@example.com",
            "--password",
            PASSWORD,
            "--full-name",
            "Perf",
            "--admin",
            "--verified",
        ],
        env=env,
        check=True,
        capture_output=True,
    )
    proc = subprocess.Popen(
        ["taskset", "-c", "0", HUB, "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
    )
    for _ in range(100):
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("server did not start")


def login(port: int) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", port)
    body = json.dumps({"email": "perf@example.com", "password": PASSWORD})
    conn.request("POST", "/api/v1/auth/login", body, {"Content-Type": "application/json"})
    response = conn.getresponse()
    return str(json.loads(response.read())["data"]["access_token"])


def open_subscriber(port: int, token: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(upgrade_request(port, token))
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(4096)
    buffer = bytearray(data.split(b"\r\n\r\n", 1)[1])
    sock.sendall(client_frame(OP_TEXT, b'{"type":"subscribe","channels":["global"]}'))
    while True:
        frame = pop_frame(buffer)
        if frame is None:
            buffer += sock.recv(4096)
        elif b'"subscribed"' in frame.payload:
            return sock


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def run_idle(port: int, token: str, pid: int, total: int) -> None:
    socks = []
    steps = [0, *range(1000, total + 1, max(1000, total // 10))]
    points = []
    for target in steps:
        while len(socks) < target:
            socks.append(open_subscriber(port, token))
        time.sleep(1.0)
        points.append((target, rss_kb(pid)))
        print(f"{target:6d} connections: server RSS {points[-1][1] / 1024:.1f} MB", flush=True)
    (n0, r0), (n1, r1) = points[1], points[-1]
    print(f"RSS per idle connection ({n0}→{n1}): {(r1 - r0) / (n1 - n0):.1f} KB")
    for sock in socks:
        sock.close()


def publish_loop(port: int, token: str, counter: Any, stopping: Any) -> None:
    """Publisher process: :data:`PUBLISHERS` threads, one request in flight each."""

    def one() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port)
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
        while not stopping.is_set():
            body = json.dumps(
                {"channel": "global", "data": {"ts": time.time(), "pad": "x" * PAYLOAD_PAD}}
            )
            conn.request("POST", "/api/v1/notifications", body, headers)
            response = conn.getresponse()
            response.read()
            assert response.status == 202, response.status
            with counter.get_lock():
                counter.value += 1

    threads = [threading.Thread(target=one) for _ in range(PUBLISHERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def run_fanout(port: int, token: str, pid: int, subscribers: int, seconds: float) -> None:
    socks = [open_subscriber(port, token) for _ in range(subscribers)]
    for sock in socks:
        sock.setblocking(False)
    sampled = {sock.fileno(): bytearray() for sock in socks[:SAMPLED]}
    received = {"bytes": 0, "sample_bytes": 0, "sample_frames": 0}
    latencies: list[float] = []
    stop = threading.Event()

    def reader() -> None:
        poller = select.epoll()
        by_fd = {sock.fileno(): sock for sock in socks}
        for fd in by_fd:
            poller.register(fd, select.EPOLLIN)
        while not stop.is_set():
            for fd, _ in poller.poll(0.2):
                try:
                    chunk = by_fd[fd].recv(1 << 16)
                except BlockingIOError:
                    continue
                received["bytes"] += len(chunk)
                buffer = sampled.get(fd)
                if buffer is not None:
                    received["sample_bytes"] += len(chunk)
                    buffer += chunk
                    now = time.time()
                    while (frame := pop_frame(buffer)) is not None:
                        received["sample_frames"] += 1
                        message = frame.json()
                        if message.get("type") == "notification":
                            latencies.append(now - message["data"]["ts"])

    threads = [threading.Thread(target=reader)]
    for thread in threads:
        thread.start()
    counter = multiprocessing.Value("q", 0)
    stopping = multiprocessing.Event()
    publishers = multiprocessing.Process(target=publish_loop, args=(port, token, counter, stopping))
    publishers.start()
    time.sleep(2.0)  # warm-up
    start_bytes, start_pub, start_t = received["bytes"], counter.value, time.time()
    server_cpu, client_cpu = cpu_s(pid), cpu_s(os.getpid())
    publisher_cpu = cpu_s(publishers.pid)
    latencies.clear()
    time.sleep(seconds)
    bytes_in, pubs = received["bytes"] - start_bytes, counter.value - start_pub
    elapsed = time.time() - start_t
    server_cpu = cpu_s(pid) - server_cpu
    client_cpu = cpu_s(os.getpid()) - client_cpu + cpu_s(publishers.pid) - publisher_cpu
    stopping.set()
    publishers.join()
    stop.set()
    for thread in threads:
        thread.join()
    frame_size = received["sample_bytes"] / max(1, received["sample_frames"])
    delivered = bytes_in / frame_size / elapsed
    latencies.sort()
    p50 = statistics.median(latencies) * 1000 if latencies else float("nan")
    p99 = latencies[int(len(latencies) * 0.99)] * 1000 if latencies else float("nan")
    print(
        f"N={subscribers}: published {pubs / elapsed:.0f}/s, delivered {delivered:,.0f} msgs/s "
        f"(frame ≈{frame_size:.0f} B), latency p50 {p50:.1f} ms p99 {p99:.1f} ms; "
        f"CPU server {server_cpu / elapsed:.0%} client {client_cpu / elapsed:.0%}"
    )
    for sock in socks:
        sock.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("mode", choices=["fanout", "idle"])
    parser.add_argument("--subscribers", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--port", type=int, default=18765)
    args = parser.parse_args()
    os.sched_setaffinity(0, {1})
    with tempfile.TemporaryDirectory() as data_dir:
        proc = start_server(args.port, data_dir)
        try:
            token = login(args.port)
            if args.mode == "idle":
                run_idle(args.port, token, proc.pid, args.subscribers)
            else:
                run_fanout(args.port, token, proc.pid, args.subscribers, args.seconds)
        finally:
            proc.terminate()
            proc.wait(15)


if __name__ == "__main__":
    sys.exit(main())
