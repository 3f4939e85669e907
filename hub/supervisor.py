"""Restart-on-crash supervision for long-running node services and actors.

``await nursery.start(supervise, "email-worker", worker.run)`` runs ``worker.run`` under
the nursery; when it raises, the error is logged with its traceback and the service is
started again after an exponential backoff (capped, with jitter). A service that returns
normally is not restarted.

Cancellation:
    Cancelling the nursery cancels the service and the backoff sleep alike; ``Cancelled``
    is never treated as a crash.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable
from typing import Any

import trio

log = logging.getLogger("hub.supervisor")

BACKOFF_INITIAL_S = 0.1
BACKOFF_MAX_S = 10.0
HEALTHY_AFTER_S = 30.0


class SupervisorStats:
    """Restart counts by service name (read by metrics)."""

    restarts: dict[str, int] = {}


async def supervise(
    name: str,
    service: Callable[..., Awaitable[Any]],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run ``service(task_status=…)`` and restart it with backoff when it crashes.

    ``service`` must accept ``task_status`` (trio's ``start`` convention); the first time it
    reports started, so does this supervisor. Restarts do not report again.
    """
    backoff = BACKOFF_INITIAL_S
    first = True
    while True:
        started_at = trio.current_time()
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(service)
                if first:
                    task_status.started()
                    first = False
            return
        except Exception as error:  # a crash: log and restart
            if first:
                raise
            if trio.current_time() - started_at > HEALTHY_AFTER_S:
                backoff = BACKOFF_INITIAL_S
            SupervisorStats.restarts[name] = SupervisorStats.restarts.get(name, 0) + 1
            delay = backoff * (0.5 + random.random())
            log.error(
                "service %s crashed; restarting in %.2fs",
                name,
                delay,
                exc_info=error,
                extra={"service": name},
            )
            await trio.sleep(delay)
            backoff = min(backoff * 2, BACKOFF_MAX_S)
