"""The peer of the ingest benchmark: python-socketio's ``AsyncAioPikaManager`` on uvicorn.

This is how a python-socketio deployment takes messages from RabbitMQ: producers emit
through a write-only ``AsyncAioPikaManager`` (one JSON message per emit on the fanout
exchange :data:`EXCHANGE`), and the server's manager consumes its own queue bound to
that exchange and emits to the room. Clients join room ``public.ingest.<k>`` with the
connect ``auth`` payload ``{"channel": …}``.

Run the server with ``python -m benchmarks.ingest_peer PORT AMQP_URL`` (the benchmark
does). Needs ``python-socketio``, ``uvicorn`` and ``aio-pika`` (benchmark-only: not in the
project's dependencies).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.loadgen import (
    SOCKETIO_NOTIFICATION_MARKER,
    SubscriberSpec,
    pin_to_cpu,
    raise_nofile,
)

EXCHANGE = "hub-bench-socketio"
EVENT = "notification"
START_TIMEOUT_S = 30.0
#: Emits in flight at once per producer (each awaits RabbitMQ's publisher confirm).
PRODUCER_CONCURRENCY = 64


def available() -> bool:
    """True when python-socketio, uvicorn and aio-pika are installed."""
    try:
        import aio_pika  # noqa: F401
        import socketio  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        return False
    return True


# --------------------------------------------------------------------------- server


def serve(port: int, url: str) -> None:
    """The peer server (blocks)."""
    import socketio
    import uvicorn

    manager = socketio.AsyncAioPikaManager(url, channel=EXCHANGE)
    # No engine.io pings during a run: counting subscribers never answer them.
    sio = socketio.AsyncServer(
        async_mode="asgi", client_manager=manager, ping_interval=3600, ping_timeout=3600
    )

    @sio.event
    async def connect(sid: str, environ: dict[str, Any], auth: Any) -> None:
        channel = auth.get("channel") if isinstance(auth, dict) else None
        if channel:
            await sio.enter_room(sid, channel)

    app = socketio.ASGIApp(sio)
    # Nor WebSocket keepalive pings (uvicorn closes with 1011 after 20 + 20 s unanswered).
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=port,
        log_level="warning",
        access_log=False,
        ws_ping_interval=None,
        ws_ping_timeout=None,
    )


@dataclass
class PeerProcess:
    """The peer server in its own process group, pinned with ``taskset``."""

    port: int
    url: str
    cpu: int | None = 0
    process: subprocess.Popen[bytes] | None = None
    log_path: Path = field(default_factory=lambda: Path(f"/tmp/hub-bench-peer-{os.getpid()}.log"))

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self) -> None:
        command = [sys.executable, "-m", "benchmarks.ingest_peer", str(self.port), self.url]
        if self.cpu is not None and shutil.which("taskset"):
            command = ["taskset", "-c", str(self.cpu), *command]
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=raise_nofile,
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        probe = f"http://127.0.0.1:{self.port}/socket.io/?EIO=4&transport=polling"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"peer exited: {self.log_path.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(probe, timeout=1) as response:
                    if response.status == 200:
                        return
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(0.05)  # readiness polling of a child process (not a test)
        raise RuntimeError("peer did not start")

    def stop(self) -> None:
        process = self.process
        if process is None:
            return
        if process.poll() is not None:
            print(f"  the peer had exited ({process.returncode}); its log: {self.log_path}")
            self.process = None
            return
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(5)
        self.process = None
        with contextlib.suppress(OSError):
            self.log_path.unlink()

    def __enter__(self) -> PeerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------- clients


def peer_spec(port: int) -> SubscriberSpec:
    """Engine.IO v4 straight over WebSocket; the namespace connect carries the room."""
    return SubscriberSpec(
        host="127.0.0.1",
        port=port,
        path="/socket.io/?EIO=4&transport=websocket",
        messages=(connect_message("public.ingest.0"),),
        ready_marker=b'40{"sid"',
        validator="socketio",
        count_marker=SOCKETIO_NOTIFICATION_MARKER,
    )


def connect_message(channel: str) -> bytes:
    return b"40" + json.dumps({"channel": channel}).encode()


def parse_notification(payload: bytes) -> dict[str, Any] | None:
    """The data of a ``42["notification",{…}]`` frame; ``None`` for other packets.

    Raises:
        ValueError: a malformed event packet.
    """
    if not payload.startswith(b"42"):
        return None
    event = json.loads(payload[2:])
    if not isinstance(event, list) or len(event) != 2 or event[0] != EVENT:
        raise ValueError("not a notification event")
    data = event[1]
    if not isinstance(data, dict):
        raise ValueError("notification data is not an object")
    return data


# --------------------------------------------------------------------------- producers


@dataclass(frozen=True)
class PeerProducerConfig:
    url: str
    index: int
    channels: int
    pad: int
    cpu: int | None


class PeerProducer:
    """Emits through a write-only ``AsyncAioPikaManager`` (aio-pika, confirmed)."""

    def __init__(self, config: PeerProducerConfig) -> None:
        self.cfg = config
        self.pad = "x" * config.pad
        self.names = [f"public.ingest.{i}" for i in range(config.channels)]
        self.seq = [0] * config.channels
        self.n = 0
        self.per_channel = [0] * config.channels

    def _next(self, t_ns: int) -> tuple[str, dict[str, Any]]:
        k = self.n % self.cfg.channels
        self.n += 1
        self.seq[k] += 1
        self.per_channel[k] += 1
        data = {"t": t_ns, "p": self.pad, "w": self.cfg.index, "k": k, "s": self.seq[k]}
        return self.names[k], data

    async def _emit_all(self, count: int | None, rate: float | None, duration: float) -> int:
        import socketio

        manager = socketio.AsyncAioPikaManager(self.cfg.url, channel=EXCHANGE, write_only=True)
        semaphore = asyncio.Semaphore(PRODUCER_CONCURRENCY)
        sent = 0
        start, start_ns = time.monotonic(), time.time_ns()
        tasks: set[asyncio.Task[None]] = set()

        async def emit(room: str, data: dict[str, Any]) -> None:
            try:
                await manager.emit(EVENT, data, room=room, namespace="/")
            finally:
                semaphore.release()

        while True:
            if count is not None and sent >= count:
                break
            now = time.monotonic()
            if count is None and now - start >= duration:
                break
            if rate is not None:
                due = start + sent / rate
                if due > now:
                    await asyncio.sleep(due - now)
                t_ns = start_ns + int(sent / rate * 1e9)
            else:
                t_ns = time.time_ns()
            await semaphore.acquire()
            room, data = self._next(t_ns)
            if sent == 0:
                # The manager opens its publisher connection on the first emit without
                # guarding concurrent first emits (one would publish on ``None``).
                await emit(room, data)
                sent += 1
                continue
            task = asyncio.ensure_future(emit(room, data))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            sent += 1
        if tasks:
            await asyncio.gather(*tasks)
        with contextlib.suppress(Exception):
            if manager.publisher_connection is not None:
                await manager.publisher_connection.close()
        return sent

    def run(self, count: int | None, rate: float | None, duration: float) -> dict[str, Any]:
        self.per_channel = [0] * self.cfg.channels
        sent = asyncio.run(self._emit_all(count, rate, duration))
        return {"sent": sent, "backlog_max": 0, "per_channel": list(self.per_channel)}


def producer_main(ctrl: Any, config: PeerProducerConfig) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    pin_to_cpu(config.cpu)
    producer = PeerProducer(config)
    while True:
        command, *args = ctrl.recv()
        if command == "fill":
            ctrl.send(producer.run(args[0], None, 0.0))
        elif command == "run":
            ctrl.send(producer.run(None, args[0], args[1]))
        elif command == "exit":
            ctrl.send(True)
            return


if __name__ == "__main__":
    serve(int(sys.argv[1]), sys.argv[2])
