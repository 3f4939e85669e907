"""A private, throw-away PostgreSQL cluster for tests that stop and start the server.

The machine's shared server is never touched: ``initdb`` makes a new cluster in a
temporary folder, and ``pg_ctl`` runs it on a free loopback port with its socket in
that folder. PostgreSQL refuses to run as root, so as root the tools run as the
``postgres`` user through ``runuser``; as any other user they run directly.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import tempfile
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import trio

__all__ = ["PrivateCluster", "find_pg_bin", "open_private_cluster"]

#: Seconds ``pg_ctl`` may take to start or stop the server.
PG_CTL_TIMEOUT_S = 30


def find_pg_bin() -> Path | None:
    """The newest ``/usr/lib/postgresql/<version>/bin`` that has initdb and pg_ctl."""
    candidates = []
    for initdb in glob.glob("/usr/lib/postgresql/*/bin/initdb"):
        folder = Path(initdb).parent
        version = folder.parent.name
        if (folder / "pg_ctl").exists() and version.replace(".", "").isdigit():
            candidates.append((float(version), folder))
    return max(candidates)[1] if candidates else None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class PrivateCluster:
    """A cluster in ``root``; :meth:`start` / :meth:`stop` drive its server."""

    def __init__(self, bin_dir: Path, root: Path, port: int, run_as: str | None) -> None:
        self.bin_dir = bin_dir
        self.root = root
        self.data = root / "data"
        self.port = port
        self.run_as = run_as

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    async def _run(self, tool: str, *args: str) -> None:
        command: Sequence[str] = [str(self.bin_dir / tool), *args]
        if self.run_as is not None:
            command = ["runuser", "-u", self.run_as, "--", *command]
        result = await trio.run_process(
            command, capture_stdout=True, capture_stderr=True, check=False
        )
        if result.returncode != 0:
            log = self.root / "server.log"
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise RuntimeError(
                f"{' '.join(command)} exited {result.returncode}:\n"
                f"{result.stdout.decode(errors='replace')}{result.stderr.decode(errors='replace')}"
                f"\n--- server.log ---\n{tail}"
            )

    async def init(self) -> None:
        await self._run(
            "initdb",
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--locale=C.UTF-8",
            "--no-sync",
            "--no-instructions",
        )

    async def start(self) -> None:
        """Start the server and return once it accepts connections (``pg_ctl -w``)."""
        options = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 "
            "-c fsync=off -c max_connections=30 -c shared_buffers=16MB"
        )
        await self._run(
            "pg_ctl",
            "-D",
            str(self.data),
            "-l",
            str(self.root / "server.log"),
            "-o",
            options,
            "-w",
            "-t",
            str(PG_CTL_TIMEOUT_S),
            "start",
        )

    async def stop(self, mode: str = "fast") -> None:
        """Stop the server and return once it is down. ``mode``: smart, fast or immediate."""
        await self._run(
            "pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", str(PG_CTL_TIMEOUT_S), "stop"
        )

    async def stop_quietly(self) -> None:
        """Stop if running; never raises (teardown)."""
        pid_file = self.data / "postmaster.pid"
        if pid_file.exists():
            try:
                await self.stop("immediate")
            except RuntimeError:
                pass


@asynccontextmanager
async def open_private_cluster() -> AsyncIterator[PrivateCluster]:
    """Create and start a private cluster; stop it and delete its files on exit.

    Raises:
        RuntimeError: No PostgreSQL server binaries, or running as root without a
            ``postgres`` user to run them as. Callers turn this into fail/skip.
    """
    bin_dir = find_pg_bin()
    if bin_dir is None:
        raise RuntimeError("no /usr/lib/postgresql/*/bin/initdb (install postgresql)")
    run_as: str | None = None
    owner: tuple[int, int] | None = None
    if os.geteuid() == 0:
        try:
            account = pwd.getpwnam("postgres")
        except KeyError:
            raise RuntimeError("running as root and there is no 'postgres' user") from None
        if shutil.which("runuser") is None:
            raise RuntimeError("running as root and runuser is missing")
        run_as, owner = "postgres", (account.pw_uid, account.pw_gid)
    root = Path(tempfile.mkdtemp(prefix="hub-test-pg-"))
    try:
        if owner is not None:
            os.chown(root, *owner)
        cluster = PrivateCluster(bin_dir, root, _free_port(), run_as)
        await cluster.init()
        await cluster.start()
        try:
            yield cluster
        finally:
            with trio.CancelScope(shield=True, deadline=trio.current_time() + PG_CTL_TIMEOUT_S):
                await cluster.stop_quietly()
    finally:
        shutil.rmtree(root, ignore_errors=True)
