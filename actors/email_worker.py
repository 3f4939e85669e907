"""The e-mail worker: takes jobs from an :class:`bridge.email_queue.EmailQueue` and
sends them with a :class:`bridge.mailer.Mailer` (SPEC §4).

:data:`CONCURRENCY` jobs are sent at once. A failed job is retried with exponential
backoff (``BACKOFF_BASE_S * 2**(attempts-1)``) up to :data:`MAX_ATTEMPTS` attempts in
all, then dead-lettered. A job that cannot be rendered (unknown template) is
dead-lettered at once. The worker knows nothing about the queue behind the interface.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import trio

from bridge.email_queue import BadJob, EmailJob, EmailQueue
from bridge.email_templates import render
from bridge.mailer import Mailer, MailerError

log = logging.getLogger("hub.actors.email_worker")

CONCURRENCY = 5
MAX_ATTEMPTS = 3
BACKOFF_BASE_S = 2.0
SEND_TIMEOUT_S = 30.0


@dataclass(frozen=True, slots=True)
class EmailWorkerStatistics:
    sent: int
    retried: int
    dead: int
    in_flight: int


class EmailWorker:
    """Sends queued e-mails.

    Args:
        queue: where jobs come from.
        mailer: how they are sent.
        sender: the ``From`` header.
        concurrency, max_attempts, backoff_base_s: see the module docstring.

    Backpressure:
        At most ``concurrency`` jobs are taken from the queue at a time; the rest wait
        in the queue.

    Cancellation:
        Cancelling :meth:`run` abandons the jobs being sent; they stay in the queue and
        are delivered again (at least once).
    """

    def __init__(
        self,
        queue: EmailQueue,
        mailer: Mailer,
        *,
        sender: str,
        concurrency: int = CONCURRENCY,
        max_attempts: int = MAX_ATTEMPTS,
        backoff_base_s: float = BACKOFF_BASE_S,
    ) -> None:
        self.queue = queue
        self.mailer = mailer
        self.sender = sender
        self.concurrency = concurrency
        self.max_attempts = max_attempts
        self.backoff_base_s = backoff_base_s
        self._sent = self._retried = self._dead = self._in_flight = 0
        self._changed = trio.Event()

    def statistics(self) -> EmailWorkerStatistics:
        return EmailWorkerStatistics(self._sent, self._retried, self._dead, self._in_flight)

    async def wait_until(self, predicate: Callable[[EmailWorkerStatistics], bool]) -> None:
        """Return once ``predicate(self.statistics())`` holds (tests and shutdown)."""
        while not predicate(self.statistics()):
            await self._changed.wait()

    def _bump(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run ``concurrency`` senders until cancelled."""
        async with trio.open_nursery() as nursery:
            for _ in range(self.concurrency):
                nursery.start_soon(self._sender_loop)
            task_status.started()

    async def _sender_loop(self) -> None:
        while True:
            job = await self.queue.get()
            self._in_flight += 1
            try:
                await self._handle(job)
            finally:
                self._in_flight -= 1
                self._bump()

    async def _handle(self, job: EmailJob) -> None:
        try:
            message = render(job, sender=self.sender)
        except BadJob as error:
            self._dead += 1
            log.error("e-mail job %s cannot be rendered: %s", job.job_id, error)
            await self.queue.dead(job, str(error))
            return
        try:
            with trio.fail_after(SEND_TIMEOUT_S):
                await self.mailer.send(message)
        except (MailerError, trio.TooSlowError) as error:
            reason = str(error) or "send timed out"
            job = job.retried()
            if job.attempts >= self.max_attempts:
                self._dead += 1
                log.error(
                    "e-mail job %s failed %d times, giving up: %s",
                    job.job_id,
                    job.attempts,
                    reason,
                    extra={"template": job.template},
                )
                await self.queue.dead(job, reason)
                return
            delay = self.backoff_base_s * 2 ** (job.attempts - 1)
            self._retried += 1
            log.warning(
                "e-mail job %s failed (attempt %d), retrying in %.1fs: %s",
                job.job_id,
                job.attempts,
                delay,
                reason,
            )
            await self.queue.retry(job, delay)
            return
        self._sent += 1
        await self.queue.ack(job)
        log.info("e-mail job %s sent", job.job_id, extra={"template": job.template})
