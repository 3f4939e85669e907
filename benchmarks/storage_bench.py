"""Storage throughput: queries/s of a trivial query and of ``get_user`` by id.

Measured sequentially and at concurrency 20, in one run, for:

(a) ``PostgresStorage`` from trio, through ``bridge.aio`` (asyncpg on a uvloop thread);
(a2) raw ``asyncpg`` pool calls through ``bridge.aio`` (the bridge without the Storage layer);
(b) plain asyncpg on plain asyncio + uvloop, in a separate process that imports
    neither trio nor the bridge (the ceiling);
(c) ``SQLiteStorage`` from trio (a file in a temporary folder).

Usage::

    .venv/bin/python benchmarks/storage_bench.py [--n 5000] [--dsn postgresql://...]

Prints a table and writes ``benchmarks/results/storage.json``. PostgreSQL work happens in
a throw-away schema that is dropped at the end. Every loop is bounded by ``--n``.

Only the standard library is imported at module level, so that ``--plain-asyncpg``
(the child process of (b)) runs without trio or the bridge loaded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/test"
CONCURRENCY = 20
WARMUP = 200
RESULTS = Path(__file__).resolve().parent / "results" / "storage.json"
USER_SQL = (
    "SELECT id, email, password_hash, full_name, avatar_url, is_verified, is_active, role, "
    "created_at, updated_at, deleted_at FROM users WHERE id = $1 AND deleted_at IS NULL"
)

Row = dict[str, Any]


def _row(system: str, op: str, concurrency: int, n: int, seconds: float) -> Row:
    return {
        "system": system,
        "op": op,
        "concurrency": concurrency,
        "queries": n,
        "seconds": round(seconds, 4),
        "qps": round(n / seconds, 1),
        "us_per_query": round(seconds / n * 1e6, 1),
    }


# ------------------------------------------------------------------- (b) plain asyncio


def plain_asyncpg(dsn: str, schema: str, user_id: str, n: int) -> list[Row]:
    """Runs in the child process: asyncpg + uvloop, no trio anywhere."""
    import asyncio

    import asyncpg
    import uvloop

    assert "trio" not in sys.modules and "bridge" not in sys.modules

    async def measure(op: str, call: Callable[[], Awaitable[object]], concurrency: int) -> Row:
        for _ in range(WARMUP):
            await call()

        async def worker(count: int) -> None:
            for _ in range(count):
                await call()

        start = time.perf_counter()
        if concurrency == 1:
            await worker(n)
        else:
            await asyncio.gather(*(worker(n // concurrency) for _ in range(concurrency)))
        return _row(
            "b) asyncpg, plain asyncio+uvloop", op, concurrency, n, time.perf_counter() - start
        )

    async def main() -> list[Row]:
        pool = await asyncpg.create_pool(
            dsn, min_size=CONCURRENCY, max_size=CONCURRENCY, server_settings={"search_path": schema}
        )
        uid = uuid.UUID(user_id)
        try:
            rows = []
            for concurrency in (1, CONCURRENCY):
                rows.append(
                    await measure("SELECT 1", lambda: pool.fetchval("SELECT 1"), concurrency)
                )
                rows.append(
                    await measure("get_user", lambda: pool.fetchrow(USER_SQL, uid), concurrency)
                )
            return rows
        finally:
            await pool.close()

    return uvloop.run(main())


# ---------------------------------------------------------------------------- trio side


def run_trio_benchmarks(dsn: str, n: int, with_postgres: bool) -> tuple[list[Row], str | None]:
    import trio

    from bridge.aio import open_asyncio_thread
    from storage.postgres import PostgresStorage
    from storage.sqlite import SQLiteStorage

    rows: list[Row] = []

    async def measure(
        system: str, op: str, call: Callable[[], Awaitable[object]], concurrency: int
    ) -> None:
        for _ in range(WARMUP):
            await call()

        async def worker(count: int) -> None:
            for _ in range(count):
                await call()

        start = time.perf_counter()
        if concurrency == 1:
            await worker(n)
        else:
            async with trio.open_nursery() as nursery:
                for _ in range(concurrency):
                    nursery.start_soon(worker, n // concurrency)
        rows.append(_row(system, op, concurrency, n, time.perf_counter() - start))

    async def postgres(aio: Any, schema: str) -> str:
        storage = await PostgresStorage.open(dsn, aio, schema=schema, pool_size=CONCURRENCY)
        try:
            await storage.migrate()
            user = await storage.create_user(
                email="bench@example.com", password_hash="x" * 60, full_name="Bench Mark"
            )
            name = "a) PostgresStorage via bridge.aio"
            for concurrency in (1, CONCURRENCY):
                await measure(name, "SELECT 1", storage.ping, concurrency)
                await measure(name, "get_user", lambda: storage.get_user(user.id), concurrency)

            pool = storage._pool  # the same pool, without the Storage layer
            name = "a2) raw asyncpg via bridge.aio"
            for concurrency in (1, CONCURRENCY):
                await measure(
                    name, "SELECT 1", lambda: aio.run(pool.fetchval, "SELECT 1"), concurrency
                )
                await measure(
                    name, "get_user", lambda: aio.run(pool.fetchrow, USER_SQL, user.id), concurrency
                )
            return str(user.id)
        finally:
            await storage.aclose()

    async def drop(schema: str) -> None:
        import asyncpg

        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await conn.close()

    async def sqlite(folder: Path) -> None:
        storage = await SQLiteStorage.open(folder / "bench.db")
        try:
            await storage.migrate()
            user = await storage.create_user(
                email="bench@example.com", password_hash="x" * 60, full_name="Bench Mark"
            )
            name = "c) SQLiteStorage (worker thread)"
            for concurrency in (1, CONCURRENCY):
                await measure(name, "SELECT 1", storage.ping, concurrency)
                await measure(name, "get_user", lambda: storage.get_user(user.id), concurrency)
        finally:
            await storage.aclose()

    schema = f"bench_{uuid.uuid4().hex[:12]}"
    user_id: str | None = None

    async def main() -> None:
        nonlocal user_id
        if with_postgres:
            async with open_asyncio_thread(name="bench-aio") as aio:
                try:
                    user_id = await postgres(aio, schema)
                    # (b) runs while the schema still exists, in its own process.
                    rows.extend(
                        await trio.to_thread.run_sync(run_plain_child, dsn, schema, user_id, n)
                    )
                finally:
                    await aio.run(drop, schema)
        with tempfile.TemporaryDirectory(prefix="hub-bench-") as folder:
            await sqlite(Path(folder))

    trio.run(main)
    return rows, user_id


def run_plain_child(dsn: str, schema: str, user_id: str, n: int) -> list[Row]:
    """Start this script as ``--plain-asyncpg`` in a fresh interpreter; return its rows."""
    output = subprocess.run(
        [
            sys.executable,
            str(Path(__file__).resolve()),
            "--plain-asyncpg",
            "--dsn",
            dsn,
            "--schema",
            schema,
            "--user-id",
            user_id,
            "--n",
            str(n),
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    )
    rows: list[Row] = json.loads(output.stdout)
    return rows


# ------------------------------------------------------------------------------- report


def environment() -> dict[str, Any]:
    import sqlite3
    from importlib.metadata import version

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
        "asyncpg": version("asyncpg"),
        "uvloop": version("uvloop"),
        "trio": version("trio"),
        "sqlite": sqlite3.sqlite_version,
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def print_table(rows: list[Row]) -> None:
    header = f"{'system':36} {'op':9} {'conc':>4} {'queries':>8} {'q/s':>9} {'µs/query':>9}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['system']:36} {r['op']:9} {r['concurrency']:>4} {r['queries']:>8} "
            f"{r['qps']:>9,.0f} {r['us_per_query']:>9,.1f}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=5000, help="queries per measurement")
    parser.add_argument("--dsn", default=DEFAULT_DSN)
    parser.add_argument("--no-postgres", action="store_true", help="SQLite only")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--plain-asyncpg", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--schema", help=argparse.SUPPRESS)
    parser.add_argument("--user-id", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.n < CONCURRENCY or args.n % CONCURRENCY:
        parser.error(f"--n must be a positive multiple of {CONCURRENCY}")

    if args.plain_asyncpg:
        print(json.dumps(plain_asyncpg(args.dsn, args.schema, args.user_id, args.n)))
        return 0

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    rows, _ = run_trio_benchmarks(args.dsn, args.n, not args.no_postgres)
    rows.sort(key=lambda r: (r["op"], r["concurrency"], r["system"]))
    print_table(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"environment": environment(), "results": rows}, indent=2) + "\n"
    )
    print(f"\nwritten to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
