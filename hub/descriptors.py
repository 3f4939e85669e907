"""The node's file descriptors: how many are open, how many it may have, what to keep free.

Every connection is a file descriptor, and so is everything else the node needs: the
SQLite file and its journal, PostgreSQL, Redis and RabbitMQ connections (and their
reconnects), webhook and SMTP clients, the REST API's own connections. A node that runs
out of them cannot even answer; so the front door counts the sockets it accepts and the
realtime core refuses new WebSocket upgrades (HTTP 503) while fewer than a *reserve* of
descriptors would be left (:meth:`DescriptorBudget.has_room`).

Counting is cheap: the descriptors open when the node starts serving are counted once
(:meth:`DescriptorBudget.rebase`, one listing of ``/proc/self/fd``), then the front door
adds and removes its accepted sockets. Descriptors the node opens for itself later
(outbound connections, files) are not counted; they are what the reserve is for.
"""

from __future__ import annotations

import logging
import os
import random
import resource
from typing import Any

import trio

#: Smallest reserve: descriptors kept free for the node's own needs.
MIN_RESERVE = 64
#: Share of the limit kept in reserve when that is more than :data:`MIN_RESERVE`.
RESERVE_PERCENT = 2
#: Where the open descriptors of this process are listed (Linux; ``/dev/fd`` elsewhere).
FD_DIRS = ("/proc/self/fd", "/dev/fd")
#: A quiet spell this long ends a burst of refusals (see :class:`BurstLog`).
BURST_QUIET_S = 30.0
#: ``Retry-After`` of a refusal for want of descriptors or connections: at least this…
RETRY_AFTER_MIN_S = 5
#: …plus a random share of this, so refused clients do not all come back at once.
RETRY_AFTER_SPREAD_S = 10


def open_files_limit() -> int:
    """The soft ``RLIMIT_NOFILE`` of this process (what ``accept`` runs into)."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1 << 20  # Linux never has more than fs.nr_open descriptors per process
    return int(soft)


def default_reserve(limit: int) -> int:
    """``max(64, 2 % of limit)``: the reserve when ``FD_RESERVE`` is 0."""
    return max(MIN_RESERVE, limit * RESERVE_PERCENT // 100)


def retry_after_s() -> int:
    """Seconds a client refused for capacity is told to wait (``Retry-After``): 5–14."""
    return RETRY_AFTER_MIN_S + random.randrange(RETRY_AFTER_SPREAD_S)


def count_open_descriptors() -> int | None:
    """Descriptors open in this process right now, or ``None`` when it cannot be read.

    Lists a directory with one entry per descriptor: about 3 µs per open descriptor, so
    call it rarely (at start), never per connection.
    """
    for path in FD_DIRS:
        try:
            # The listing's own descriptor is in the listing, and gone once it returns.
            return len(os.listdir(path)) - 1
        except OSError:
            continue
    return None


class DescriptorBudget:
    """Open descriptors of the node, estimated cheaply, against ``RLIMIT_NOFILE``.

    The estimate is the descriptors counted at :meth:`rebase` plus the sockets the front
    door has accepted and not yet closed (:meth:`socket_opened`, :meth:`socket_closed`).

    Args:
        limit: the soft ``RLIMIT_NOFILE`` (:func:`open_files_limit`).
        reserve: descriptors kept free for the node's own needs; 0 → :func:`default_reserve`.
    """

    def __init__(self, limit: int, reserve: int = 0) -> None:
        self.limit = limit
        self.reserve = reserve or default_reserve(limit)
        self.baseline = 0
        self.sockets = 0
        #: Failed ``accept`` calls by errno name (``EMFILE``, ``ENFILE``…), since start.
        self.accept_errors: dict[str, int] = {}
        #: Connections answered 503 right at ``accept`` because the process had no
        #: descriptor left (the front door's spare descriptor), since start.
        self.shed = 0

    @classmethod
    def for_process(cls, reserve: int = 0) -> DescriptorBudget:
        """A budget for this process's current limit, with the open descriptors counted."""
        budget = cls(open_files_limit(), reserve)
        budget.rebase()
        return budget

    def rebase(self) -> None:
        """Count the descriptors open now that are not accepted sockets (one directory
        listing). Call it when the node's own descriptors are open: after the listeners."""
        counted = count_open_descriptors()
        if counted is not None:
            self.baseline = max(0, counted - self.sockets)

    def socket_opened(self) -> None:
        """The front door accepted a connection."""
        self.sockets += 1

    def socket_closed(self) -> None:
        """A connection the front door accepted is closed (its descriptor is free)."""
        self.sockets -= 1

    @property
    def in_use(self) -> int:
        """Estimated open descriptors: the baseline plus the accepted sockets."""
        return self.baseline + self.sockets

    @property
    def free(self) -> int:
        """Estimated descriptors that can still be opened before ``EMFILE``."""
        return self.limit - self.in_use

    def has_room(self) -> bool:
        """True while a new long-lived connection leaves at least the reserve free.

        The connection asking is already accepted (counted in :attr:`in_use`)."""
        return self.free >= self.reserve

    def accept_failed(self, errno_name: str) -> None:
        self.accept_errors[errno_name] = self.accept_errors.get(errno_name, 0) + 1

    def statistics(self) -> dict[str, Any]:
        """Numbers for ``/metrics`` and tests."""
        return {
            "limit": self.limit,
            "reserve": self.reserve,
            "in_use": self.in_use,
            "sockets": self.sockets,
            "accept_errors": dict(self.accept_errors),
            "shed": self.shed,
        }


class BurstLog:
    """Logs the first event of a burst, not every event: a burst ends after
    :data:`BURST_QUIET_S` without events, and the next event starts a new one (logged
    with how many events the burst before it had).

    Args:
        logger: where the lines go.
        quiet_s: the quiet spell that ends a burst.
    """

    def __init__(self, logger: logging.Logger, quiet_s: float = BURST_QUIET_S) -> None:
        self._log = logger
        self._quiet_s = quiet_s
        self._last: float | None = None
        self._count = 0

    @property
    def in_burst(self) -> bool:
        return self._last is not None and trio.current_time() - self._last < self._quiet_s

    def event(self, message: str, *args: object) -> None:
        """Count one event; log ``message % args`` (WARNING) when it starts a burst."""
        now = trio.current_time()
        if self._last is None or now - self._last >= self._quiet_s:
            previous = self._count
            self._count = 0
            suffix = f" (the previous burst had {previous})" if previous else ""
            self._log.warning(
                message + "; further ones are counted, not logged, until %.0fs pass "
                "without one" + suffix,
                *args,
                self._quiet_s,
            )
        self._count += 1
        self._last = now

    def recovered(self, message: str, *args: object) -> None:
        """Log ``message % args`` (INFO) once, with the burst's count, when a burst
        is over (no event for the quiet spell); nothing otherwise."""
        if self._last is None or self._count == 0 or self.in_burst:
            return
        self._log.info(message + " (%d in the burst)", *args, self._count)
        self._count = 0
