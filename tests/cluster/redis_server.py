"""A private ``redis-server`` for tests that break Redis (kill, restart, flush).

Never touches the machine's shared Redis at 127.0.0.1:6379: each :class:`RedisServer`
runs its own process on a free port, without persistence, in a temporary directory.
Readiness is the server's own "Ready to accept connections" line, not a poll.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
from pathlib import Path

import trio

#: Seconds to wait for the server to say it is ready.
START_TIMEOUT_S = 10.0
READY_LINE = b"Ready to accept connections"


def free_port() -> int:
    """A TCP port nobody listens on right now (127.0.0.1)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def redis_server_binary() -> str | None:
    return shutil.which("redis-server")


class RedisServer:
    """One ``redis-server`` process that a test can kill and start again on the same port.

    Resource handling:
        :meth:`stop` kills the process; the owning fixture calls it at the end.
    """

    def __init__(self, directory: Path, port: int | None = None) -> None:
        self.directory = directory
        self.port = port or free_port()
        self.process: trio.Process | None = None
        self.log: list[bytes] = []

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self, nursery: trio.Nursery) -> None:
        """Start the server and return once it accepts connections."""
        binary = redis_server_binary()
        assert binary is not None, "redis-server is not installed"
        self.directory.mkdir(parents=True, exist_ok=True)
        process = await trio.lowlevel.open_process(
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
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        self.process = process
        ready = trio.Event()
        nursery.start_soon(self._read_log, process, ready)
        with trio.fail_after(START_TIMEOUT_S):
            await ready.wait()

    async def _read_log(self, process: trio.Process, ready: trio.Event) -> None:
        assert process.stdout is not None
        buffer = b""
        async for chunk in process.stdout:
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            self.log.extend(lines)
            if any(READY_LINE in line for line in lines):
                ready.set()

    async def kill(self) -> None:
        """SIGKILL the server (everything in memory is lost) and wait for it to exit."""
        process = self.process
        if process is None:
            return
        self.process = None
        process.kill()
        await process.wait()

    async def restart(self, nursery: trio.Nursery) -> None:
        """Kill, then start an empty server on the same port."""
        await self.kill()
        await self.start(nursery)
