"""The peers the hub is measured against, speaking enough of the hub's protocol that the
same load generator (:mod:`benchmarks.loadgen`) drives all three servers.

Both peers:

- publish on ``POST /api/v1/notifications`` with the hub's body (``{"channel"|"channels",
  "data", "id"?}``, any bearer token) and answer ``202`` with the hub's envelope
  ``{"status":"success","data":{"id","offsets":{channel: "<epoch>:<seq>"}}}``;
- add ``id`` (a uuid4) and ``timestamp`` (ISO 8601, ms) to ``data`` like the hub does,
  keep one ``<epoch>:<seq>`` counter per channel, and send each subscriber the hub's
  frame ``{"type":"notification","channel","offset","data":{…}}`` (compact JSON);
- answer ``GET /health`` with 200.

:mod:`benchmarks.peers.websockets_server` is the ``websockets`` library on asyncio +
uvloop: WebSocket at ``/ws/notifications`` (welcome, ``subscribe`` → ``subscribed``,
``ping`` → ``pong``) and ``websockets.broadcast()`` per channel; publishing is on a second
port (the library serves only ``GET``), a tiny h11 keep-alive server in the same loop.

:mod:`benchmarks.peers.socketio_server` is python-socketio on uvicorn: engine.io v4 over
WebSocket at ``/socket.io/``; a client sends the namespace connect ``40`` and the event
``42["subscribe",{"type":"subscribe","channels":[…]}]``, gets
``42["subscribed",{"type":"subscribed","channels":[…]}]``, and notifications arrive as
``42["notification",{…the hub's frame…}]``, emitted to the channel's room; publishing is
an ASGI route of the same uvicorn server. With ``--redis-url`` it uses
``AsyncRedisManager`` (the cluster workload).

:class:`PeerProcess` runs either in its own process group, pinned with ``taskset``.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks.loadgen import _child_setup

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
PUBLISH_PATH = "/api/v1/notifications"
#: Bytes socket.io adds around the hub's frame: ``42["notification",`` and ``]``.
SOCKETIO_FRAME_OVERHEAD = len(b'42["notification",') + len(b"]")


class Channels:
    """Per-channel offsets and the hub-shaped frames of the peers."""

    def __init__(self) -> None:
        self.epoch = secrets.token_hex(4)  # 8 hex digits, as the hub's
        self.seq: dict[str, int] = {}

    def next_offset(self, channel: str) -> str:
        seq = self.seq.get(channel, 0) + 1
        self.seq[channel] = seq
        return f"{self.epoch}:{seq}"

    @staticmethod
    def message_data(data: dict[str, Any], message_id: str | None) -> dict[str, Any]:
        """``data`` with ``id`` and ``timestamp`` filled in when missing (as the hub does)."""
        body = dict(data)
        body.setdefault("id", message_id or str(uuid.uuid4()))
        now = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        body.setdefault("timestamp", now)
        return body


def parse_publish(body: bytes) -> tuple[list[str], dict[str, Any], str | None]:
    """``(channels, data, id)`` of a publish body.

    Raises:
        ValueError: not the hub's publish shape.
    """
    message = json.loads(body)
    if not isinstance(message, dict) or not isinstance(message.get("data"), dict):
        raise ValueError("body must be an object with data")
    channels = message.get("channels") or [message.get("channel")]
    if not all(isinstance(c, str) and c for c in channels):
        raise ValueError("channel or channels required")
    return list(dict.fromkeys(channels)), message["data"], message.get("id")


def accepted(message_id: str, offsets: dict[str, str]) -> bytes:
    """The hub's 202 envelope."""
    return json.dumps(
        {"status": "success", "data": {"id": message_id, "offsets": offsets}},
        separators=(",", ":"),
    ).encode()


def install_uvloop() -> str:
    """Use uvloop for asyncio when installed (both peers run on it); the loop's name."""
    try:
        import uvloop
    except ImportError:
        return "asyncio"
    uvloop.install()
    return "uvloop"


@dataclass
class PeerProcess:
    """A peer server in its own process group, pinned with ``taskset``.

    Args:
        kind: ``"websockets"`` or ``"socketio"``.
        port: the WebSocket port (socket.io also publishes there).
        cpu: the CPU to pin to, or ``None``.
        heartbeat_s: the peer's own keepalive (WebSocket pings for websockets, engine.io
            pings for socket.io) every ``heartbeat_s`` with the same timeout; ``None``
            turns it off (the counting subscribers of the fan-out runs never answer).
        redis_url: socket.io only: ``AsyncRedisManager`` on this Redis.
    """

    kind: str
    port: int
    cpu: int | None = 0
    heartbeat_s: float | None = None
    redis_url: str | None = None
    publish_port: int = 0
    process: subprocess.Popen[bytes] | None = None
    log_path: Path = field(
        default_factory=lambda: Path(tempfile.mkstemp(prefix="hub-bench-peer-", suffix=".log")[1])
    )

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def command(self) -> list[str]:
        module = f"benchmarks.peers.{self.kind}_server"
        command = [sys.executable, "-m", module, "--port", str(self.port)]
        if self.kind == "websockets":
            command += ["--publish-port", str(self.publish_port)]
        if self.heartbeat_s is not None:
            command += ["--heartbeat", str(self.heartbeat_s)]
        if self.redis_url:
            command += ["--redis-url", self.redis_url]
        if self.cpu is not None and shutil.which("taskset"):
            command = ["taskset", "-c", str(self.cpu), *command]
        return command

    def start(self) -> None:
        """Start the server and wait (bounded) until ``GET /health`` answers 200."""
        from benchmarks.loadgen import free_port

        if self.kind == "socketio":
            self.publish_port = self.port
        elif not self.publish_port:
            self.publish_port = free_port()
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                self.command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_child_setup,  # more fds; SIGTERM when we die
            )
        url = f"http://127.0.0.1:{self.publish_port}/health"
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.kind} peer exited: {self.log_tail()}")
            try:
                with urllib.request.urlopen(url, timeout=1) as response:
                    if response.status == 200:
                        return
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(0.05)  # readiness polling of a child process (not a test)
        raise RuntimeError(f"{self.kind} peer did not start: {self.log_tail()}")

    def log_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def stop(self) -> None:
        """SIGTERM the process group, SIGKILL after :data:`STOP_TIMEOUT_S`. Idempotent."""
        process = self.process
        if process is not None and process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(STOP_TIMEOUT_S)
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
