"""The e-mail job queue interface and the job format (SPEC §4).

A job is ``{"job_id","type":"send_email","data":{"to","subject","template","variables"},
"attempts","created_at"}``. The e-mail worker (``actors.email_worker``) only talks to
:class:`EmailQueue`, so the in-process durable queue (``bridge.email_queue_local``) and
a RabbitMQ-backed one (queue ``email_queue``, dead letters in ``email_queue.dead``) are
interchangeable.

Delivery is at least once: a job taken with :meth:`EmailQueue.get` and neither acked,
retried nor dead-lettered (the node crashed) is delivered again after a restart.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Protocol

JOB_TYPE = "send_email"


class QueueUnavailable(Exception):
    """The queue cannot take a job right now (its broker is unreachable)."""


class BadJob(ValueError):
    """A stored or received job does not have the SPEC §4 shape."""


@dataclass(frozen=True, slots=True)
class EmailJob:
    """One e-mail to send. ``variables`` fill the template named ``template``."""

    job_id: str
    to: str
    subject: str
    template: str
    variables: dict[str, str] = field(default_factory=dict)
    attempts: int = 0
    created_at: str = ""

    @classmethod
    def new(cls, *, to: str, subject: str, template: str, variables: dict[str, str]) -> EmailJob:
        created = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        return cls(str(uuid.uuid4()), to, subject, template, dict(variables), 0, created)

    def retried(self) -> EmailJob:
        """The same job with one more attempt counted."""
        return replace(self, attempts=self.attempts + 1)

    def to_json(self) -> dict[str, Any]:
        """The SPEC §4 message body."""
        return {
            "job_id": self.job_id,
            "type": JOB_TYPE,
            "data": {
                "to": self.to,
                "subject": self.subject,
                "template": self.template,
                "variables": dict(self.variables),
            },
            "attempts": self.attempts,
            "created_at": self.created_at,
        }

    @classmethod
    def from_json(cls, body: Any) -> EmailJob:
        """Parse a SPEC §4 body.

        Raises:
            BadJob: it is not one.
        """
        try:
            if body["type"] != JOB_TYPE:
                raise BadJob(f"unknown job type {body['type']!r}")
            data = body["data"]
            variables = data.get("variables") or {}
            if not isinstance(variables, dict):
                raise BadJob("variables must be an object")
            job = cls(
                job_id=str(body["job_id"]),
                to=str(data["to"]),
                subject=str(data["subject"]),
                template=str(data["template"]),
                variables={str(k): str(v) for k, v in variables.items()},
                attempts=int(body.get("attempts", 0)),
                created_at=str(body.get("created_at", "")),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            if isinstance(error, BadJob):
                raise
            raise BadJob(f"malformed e-mail job: {type(error).__name__}") from None
        return job


class EmailQueue(Protocol):
    """Where e-mail jobs wait for the worker.

    Backpressure:
        ``put`` may wait while the queue is full; ``get`` waits for a job.
    """

    async def put(self, job: EmailJob) -> None:
        """Store ``job`` durably; it is delivered by a later :meth:`get`."""
        ...

    async def get(self) -> EmailJob:
        """Wait for the next job due; it stays stored until acked, retried or dead."""
        ...

    async def ack(self, job: EmailJob) -> None:
        """The job was sent: forget it."""
        ...

    async def retry(self, job: EmailJob, delay_s: float) -> None:
        """Deliver ``job`` (already counted with :meth:`EmailJob.retried`) again after
        ``delay_s`` seconds."""
        ...

    async def dead(self, job: EmailJob, reason: str) -> None:
        """Give up on ``job``: keep it aside with ``reason`` for an operator."""
        ...
