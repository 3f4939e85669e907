"""The per-user workload: U users, each connected once and subscribed to its own
``user.<id>`` channel plus ``global``.

- :func:`seed_users` creates the users in the hub's storage (one bcrypt hash for all, so
  10,000 users take seconds) and :func:`access_tokens` signs an access token for each with
  the node's JWT secret, as a login would (the WebSocket path checks tokens in memory).
- :class:`UsersPool`: counting workers and one validating sample worker, where socket
  ``i`` is user ``i`` (its own token and channels): :class:`PerUserWorker` is loadgen's
  worker with a spec per socket.
- :class:`BatchPublisher`: loadgen's publisher, posting either ``{"channels": [100 user
  channels]}`` (round robin over all users: each request is 100 private deliveries) or
  ``{"channel": "global"}`` (each request reaches every user).

Against the peers the same sockets subscribe to the same channel names (no tokens).
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing.connection
import os
import signal
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from benchmarks.loadgen import (
    HANDSHAKE,
    NodeProcess,
    Publisher,
    PublisherConfig,
    SubscriberSpec,
    SubscriberWorker,
    Worker,
    WorkerConfig,
    _Sub,
    pin_to_cpu,
    raise_nofile,
    upgrade_request,
)

GLOBAL = "global"
SEED_PASSWORD = "Bench-passw0rd"


# --------------------------------------------------------------------------- users


def seed_users(node: NodeProcess, count: int, *, prefix: str = "bench-u") -> list[str]:
    """Create ``count`` verified users in ``node``'s storage (node not started, or
    started: storage handles both); their ids, in order."""
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.users", "seed", str(count), prefix],
        env=node.env(),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"seeding users failed: {result.stderr.strip()[-2000:]}")
    ids: list[str] = json.loads(result.stdout)
    return ids


async def _seed(count: int, prefix: str) -> list[str]:
    from contextlib import AsyncExitStack

    import trio

    from api.auth.passwords import hash_password
    from hub.settings import load_settings
    from storage import open_storage

    settings = load_settings()
    password_hash = await trio.to_thread.run_sync(
        hash_password, SEED_PASSWORD, settings.bcrypt_rounds
    )
    ids: list[str] = []
    async with AsyncExitStack() as stack:
        aio = None
        if settings.uses_postgres:
            from bridge.aio import open_asyncio_thread

            aio = await stack.enter_async_context(open_asyncio_thread(name="bench-aio"))
        storage = await stack.enter_async_context(open_storage(settings, aio))
        await storage.migrate()
        for i in range(count):
            user = await storage.create_user(
                email=f"{prefix}{i}@example.com",
                password_hash=password_hash,
                full_name=f"Bench {i}",
                is_verified=True,
            )
            ids.append(str(user.id))
    return ids


@dataclass(frozen=True)
class _Claimant:
    id: uuid.UUID
    role: str = "user"


def access_tokens(node: NodeProcess, user_ids: Sequence[str]) -> list[str]:
    """An access token for each user, signed with the node's secret (one session each)."""
    from api.auth.tokens import TokenService

    service = TokenService(node.env()["JWT_SECRET_KEY"], 3600, 7 * 86400)
    return [
        service.issue_pair(_Claimant(uuid.UUID(user_id)), str(uuid.uuid4())).access_token  # type: ignore[arg-type]
        for user_id in user_ids
    ]


# --------------------------------------------------------------------------- subscribers


@dataclass
class PerUserConfig(WorkerConfig):
    """A worker whose socket ``j`` (in the order opened) uses ``specs[j]``."""

    specs: tuple[SubscriberSpec, ...] = ()


class PerUserWorker(SubscriberWorker):
    """loadgen's worker with one spec (token, channels) per socket."""

    def __init__(self, config: PerUserConfig) -> None:
        super().__init__(config)
        self._specs = config.specs
        self._next = 0
        self._spec_of: dict[int, SubscriberSpec] = {}

    def _new_socket(self) -> Any:
        sock = super()._new_socket()
        self._spec_of[sock.fileno()] = self._specs[self._next % len(self._specs)]
        self._next += 1
        return sock

    def _upgrade_for(self, sub: _Sub) -> bytes:
        spec = self._spec_of[sub.fd]
        return upgrade_request(spec.host, spec.port, spec.path, sub.key, spec.headers)

    def _advance(self, sub: _Sub, data: bytes) -> bool:
        if sub.state == HANDSHAKE:  # the subscribe frames go out in this step
            self.cfg.spec = self._spec_of[sub.fd]
        return super()._advance(sub, data)


def _per_user_main(ctrl: multiprocessing.connection.Connection, config: PerUserConfig) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise_nofile()
    pin_to_cpu(config.cpu)
    if config.nice:
        with contextlib.suppress(OSError):
            os.nice(config.nice)
    PerUserWorker(config).serve(ctrl)


class UsersPool:
    """``count_procs`` counting workers and one sample worker; socket ``i`` is
    ``specs[i]``. Same interface as :class:`benchmarks.loadgen.SubscriberPool`."""

    def __init__(
        self,
        specs: Sequence[SubscriberSpec],
        *,
        sample: int,
        count_procs: int,
        cpu: int | None,
        read_interval_s: float,
        source_addresses: tuple[str, ...],
    ) -> None:
        self.sample_count = min(sample, len(specs))
        rest = list(specs[self.sample_count :])
        shares = [len(rest) // count_procs] * count_procs
        for i in range(len(rest) - sum(shares)):
            shares[i] += 1
        self.shares = shares
        base = specs[0]
        self.sample = Worker(
            _per_user_main,
            PerUserConfig(
                base,
                "sample",
                cpu,
                source_addresses=source_addresses,
                nice=-10,
                specs=tuple(specs[: self.sample_count]),
            ),
            "sample",
        )
        self.counters = []
        start = 0
        for i, share in enumerate(shares):
            config = PerUserConfig(
                base,
                "count",
                cpu,
                read_interval_s,
                source_addresses=source_addresses,
                specs=tuple(rest[start : start + share]),
            )
            self.counters.append(Worker(_per_user_main, config, f"count-{i}"))
            start += share

    @property
    def workers(self) -> list[Worker]:
        return [*self.counters, self.sample]

    def open(self) -> dict[str, Any]:
        results = [self.sample.call("open", self.sample_count, timeout=300)]
        for worker, share in zip(self.counters, self.shares, strict=True):
            if share:
                results.append(worker.call("open", share, timeout=300))
        errors: Counter[str] = Counter()
        for result in results:
            errors.update(result["errors"])
        return {
            "ok": sum(r["ok"] for r in results),
            "failed": sum(r["failed"] for r in results),
            "seconds": sum(r["seconds"] for r in results),
            "errors": dict(errors),
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

    def stop(self) -> None:
        for worker in self.workers:
            worker.stop()


def user_specs(
    spec_for: Any, user_ids: Sequence[str], tokens: Sequence[str] | None
) -> list[SubscriberSpec]:
    """One spec per user: ``spec_for(channels, token)`` with ``user.<id>`` and global."""
    return [
        spec_for([f"user.{user_id}", GLOBAL], tokens[i] if tokens else None)
        for i, user_id in enumerate(user_ids)
    ]


# --------------------------------------------------------------------------- publisher


@dataclass(frozen=True)
class BatchPublisherConfig(PublisherConfig):
    """``batches``: the channel lists posted round robin in ``"private"`` mode."""

    batches: tuple[tuple[str, ...], ...] = ()


class BatchPublisher(Publisher):
    """loadgen's publisher; ``("mode", "private" | "global")`` picks the body."""

    def __init__(self, config: BatchPublisherConfig) -> None:
        super().__init__(config)
        self.batches = config.batches
        self.mode = "global"
        self.next_batch = 0

    def _body(self, t_ns: int) -> bytes:
        self.seq += 1
        data = {"t": t_ns, "p": self.pad}
        if self.mode == "private":
            channels = self.batches[self.next_batch % len(self.batches)]
            self.next_batch += 1
            return json.dumps({"channels": list(channels), "data": data}).encode()
        return json.dumps({"channel": GLOBAL, "data": data}).encode()

    def serve(self, ctrl: multiprocessing.connection.Connection) -> None:
        while True:
            command, *args = ctrl.recv()
            if command == "mode":
                self.mode = args[0]
                ctrl.send(True)
            elif command == "run":
                ctrl.send(self.run(*args))
            elif command == "one":
                ctrl.send(self.one(args[0]))
            elif command == "pad":
                self.pad = "x" * int(args[0])
                ctrl.send(True)
            elif command == "exit":
                ctrl.send(True)
                return


def _batch_publisher_main(
    ctrl: multiprocessing.connection.Connection, config: BatchPublisherConfig
) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    pin_to_cpu(config.cpu)
    BatchPublisher(config).serve(ctrl)


def start_batch_publisher(config: BatchPublisherConfig) -> Worker:
    return Worker(_batch_publisher_main, config, "publisher")


def batches_of(user_ids: Sequence[str], size: int) -> tuple[tuple[str, ...], ...]:
    """``user.<id>`` channels in groups of ``size`` (every user in exactly one group)."""
    names = [f"user.{user_id}" for user_id in user_ids]
    return tuple(tuple(names[i : i + size]) for i in range(0, len(names), size))


def spec_with_token(spec: SubscriberSpec, token: str) -> SubscriberSpec:
    return replace(spec, headers=(("Authorization", f"Bearer {token}"),))


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "seed":
        import trio

        prefix = sys.argv[3] if len(sys.argv) > 3 else "bench-u"
        print(json.dumps(trio.run(_seed, int(sys.argv[2]), prefix)))
    else:
        print("usage: python -m benchmarks.users seed COUNT [PREFIX]", file=sys.stderr)
        sys.exit(2)
