"""An in-process durable :class:`bridge.email_queue.EmailQueue`: one JSON file per job.

Used when RabbitMQ is not configured. Jobs live under ``<directory>/pending/`` until
acked, so they survive a restart (a job that was being sent when the node stopped is
sent again: at least once). Dead jobs move to ``<directory>/dead/``. Files are written
to a temporary name and renamed, so a crash never leaves half a job.
"""

from __future__ import annotations

import heapq
import json
import logging
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from bridge.email_queue import BadJob, EmailJob

log = logging.getLogger("hub.bridge.email_queue")

#: Jobs stored and not yet acked; ``put`` waits beyond it.
MAX_PENDING = 10_000


def _write_atomic(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        json.dump(payload, handle, ensure_ascii=False)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _load_dir(pending: Path) -> tuple[list[tuple[float, EmailJob]], int]:
    jobs: list[tuple[float, EmailJob]] = []
    bad = 0
    for path in sorted(pending.glob("*.json")):
        try:
            stored = json.loads(path.read_text(encoding="utf-8"))
            job = EmailJob.from_json(stored["job"])
            jobs.append((float(stored.get("not_before", 0.0)), job))
        except (OSError, ValueError, KeyError, TypeError, BadJob):
            bad += 1
            path.rename(path.with_suffix(".bad"))
    return jobs, bad


class LocalEmailQueue:
    """Files on disk plus an in-memory schedule. Create with :func:`open_local_email_queue`.

    Backpressure:
        ``put`` waits while :data:`MAX_PENDING` jobs are stored and not acked.

    Cancellation:
        ``get`` can be cancelled while waiting without losing a job. A job returned by
        ``get`` belongs to the caller until it calls ``ack``, ``retry`` or ``dead``.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._pending_dir = directory / "pending"
        self._dead_dir = directory / "dead"
        self._schedule: list[tuple[float, int, EmailJob]] = []  # (not before, seq, job)
        self._seq = 0
        self._stored = 0
        self._changed = trio.Event()

    def _path(self, job: EmailJob) -> Path:
        return self._pending_dir / f"{job.job_id}.json"

    def _schedule_job(self, job: EmailJob, not_before: float) -> None:
        self._seq += 1
        heapq.heappush(self._schedule, (not_before, self._seq, job))
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def _load(self) -> int:
        await trio.to_thread.run_sync(lambda: self._pending_dir.mkdir(parents=True, exist_ok=True))
        await trio.to_thread.run_sync(lambda: self._dead_dir.mkdir(parents=True, exist_ok=True))
        jobs, bad = await trio.to_thread.run_sync(_load_dir, self._pending_dir)
        if bad:
            log.warning("set aside %d unreadable e-mail job files", bad)
        for not_before, job in jobs:
            self._stored += 1
            self._schedule_job(job, not_before)
        return len(jobs)

    async def put(self, job: EmailJob) -> None:
        if "/" in job.job_id or job.job_id.startswith("."):
            raise BadJob("job_id must be a plain name")
        while self._stored >= MAX_PENDING:
            await self._changed.wait()
        self._stored += 1
        try:
            await trio.to_thread.run_sync(
                _write_atomic, self._path(job), {"job": job.to_json(), "not_before": 0.0}
            )
        except BaseException:
            self._stored -= 1
            raise
        self._schedule_job(job, 0.0)

    async def get(self) -> EmailJob:
        while True:
            now = time.time()
            if self._schedule and self._schedule[0][0] <= now:
                return heapq.heappop(self._schedule)[2]
            changed = self._changed
            if self._schedule:
                with trio.move_on_after(self._schedule[0][0] - now):
                    await changed.wait()
            else:
                await changed.wait()

    async def ack(self, job: EmailJob) -> None:
        await trio.to_thread.run_sync(lambda: self._path(job).unlink(missing_ok=True))
        self._stored -= 1
        self._wake()

    async def retry(self, job: EmailJob, delay_s: float) -> None:
        not_before = time.time() + delay_s
        await trio.to_thread.run_sync(
            _write_atomic, self._path(job), {"job": job.to_json(), "not_before": not_before}
        )
        self._schedule_job(job, not_before)

    async def dead(self, job: EmailJob, reason: str) -> None:
        def move() -> None:
            _write_atomic(
                self._dead_dir / f"{job.job_id}.json", {"job": job.to_json(), "reason": reason}
            )
            self._path(job).unlink(missing_ok=True)

        await trio.to_thread.run_sync(move)
        self._stored -= 1
        self._wake()

    def statistics(self) -> dict[str, int]:
        """``stored``: jobs not yet acked or dead; ``scheduled``: waiting for a worker."""
        return {"stored": self._stored, "scheduled": len(self._schedule)}


@asynccontextmanager
async def open_local_email_queue(directory: Path) -> AsyncIterator[LocalEmailQueue]:
    """Open the queue in ``directory``, reloading the jobs a previous run left.

    Resource handling:
        Nothing to close: every change is on disk when its method returns.
    """
    queue = LocalEmailQueue(directory)
    reloaded = await queue._load()
    if reloaded:
        log.info("reloaded %d pending e-mail jobs", reloaded)
    yield queue
