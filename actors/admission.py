"""Admission of WebSocket upgrades: a full node says so before the handshake.

A node refuses a new upgrade with **HTTP 503** (the API's JSON error envelope, code
``SERVICE_UNAVAILABLE``, ``error.details.reason``, and ``Retry-After``) instead of
upgrading it when

- ``descriptors``: fewer than ``FD_RESERVE`` file descriptors would be left for the
  node's own needs (storage, Redis and RabbitMQ reconnects, webhooks, logs, the REST
  API) — see :class:`~hub.descriptors.DescriptorBudget`; or
- ``connections``: ``WS_MAX_CONNECTIONS`` upgrades are already admitted (handshaking or
  open), when that cap is set.

Established connections are never touched; the refusal costs one short write. Each
reason's refusals are counted (``hub_websocket_upgrades_refused_total``) and logged once
per burst (:class:`~hub.descriptors.BurstLog`), not once per refusal.
"""

from __future__ import annotations

import enum
import logging
from typing import Any

from api.app import sanitise_request_id
from api.envelope import raw_failure
from api.errors import ApiError
from hub.descriptors import BurstLog, DescriptorBudget, retry_after_s

log = logging.getLogger("hub.realtime.admission")

#: The header whose value a refusal echoes as its request id (lower case).
_REQUEST_ID_HEADER = b"x-request-id"


class Refusal(enum.StrEnum):
    """Why an upgrade was refused (the ``reason`` label and ``error.details.reason``)."""

    DESCRIPTORS = "descriptors"
    CONNECTIONS = "connections"


_MESSAGES = {
    Refusal.DESCRIPTORS: "This node is short of file descriptors for new connections; "
    "try again later (or another node)",
    Refusal.CONNECTIONS: "This node has reached its WebSocket connection limit; "
    "try again later (or another node)",
}


class Admission:
    """Decides whether a WebSocket upgrade may go ahead, and counts what it decided.

    Args:
        max_connections: upgrades admitted at once at most (handshaking or open);
            0 → no cap.
        descriptors: the node's descriptor budget; ``None`` → descriptors are not
            checked (a realtime core without a front door, in tests).
    """

    def __init__(
        self, *, max_connections: int, descriptors: DescriptorBudget | None = None
    ) -> None:
        self.max_connections = max_connections
        self.descriptors = descriptors
        #: Upgrades admitted and not yet over (handshaking or open).
        self.admitted = 0
        #: Upgrades refused with 503 since start, by reason.
        self.refused: dict[str, int] = {reason.value: 0 for reason in Refusal}
        self._bursts = {reason: BurstLog(log) for reason in Refusal}

    def admit(self) -> Refusal | None:
        """Admit one upgrade (counted until :meth:`release`), or say why not (counted
        and, at the start of a burst, logged). Synchronous: nothing can slip in between
        the check and the count."""
        refusal = self._refusal()
        if refusal is None:
            self.admitted += 1
            for reason, burst in self._bursts.items():
                burst.recovered("admitting WebSocket upgrades again (%s)", reason.value)
            return None
        self.refused[refusal.value] += 1
        self._log_refusal(refusal)
        return refusal

    def release(self) -> None:
        """An admitted upgrade is over (refused later, closed, or failed)."""
        self.admitted -= 1

    def _refusal(self) -> Refusal | None:
        budget = self.descriptors
        if budget is not None and not budget.has_room():
            return Refusal.DESCRIPTORS
        if self.max_connections and self.admitted >= self.max_connections:
            return Refusal.CONNECTIONS
        return None

    def _log_refusal(self, refusal: Refusal) -> None:
        budget = self.descriptors
        if refusal is Refusal.DESCRIPTORS and budget is not None:
            self._bursts[refusal].event(
                "refusing WebSocket upgrades with 503: %d descriptors in use of %d, "
                "keeping %d in reserve (FD_RESERVE); %d WebSockets admitted",
                budget.in_use,
                budget.limit,
                budget.reserve,
                self.admitted,
            )
        else:
            self._bursts[refusal].event(
                "refusing WebSocket upgrades with 503: %d admitted, the cap is %d "
                "(WS_MAX_CONNECTIONS)",
                self.admitted,
                self.max_connections,
            )

    @staticmethod
    def answer(refusal: Refusal, head: bytes) -> bytes:
        """The whole 503 response for a refused upgrade whose request head is ``head``
        (its ``X-Request-ID`` is echoed when usable)."""
        error = ApiError(
            503,
            _MESSAGES[refusal],
            details={"reason": refusal.value},
            retry_after=retry_after_s(),
        )
        return raw_failure(error, request_id=sanitise_request_id(_request_id(head)))

    def statistics(self) -> dict[str, Any]:
        """Numbers for ``/metrics`` and tests."""
        return {
            "admitted": self.admitted,
            "max_connections": self.max_connections,
            "refused": dict(self.refused),
        }


def _request_id(head: bytes) -> str | None:
    """The ``X-Request-ID`` header of a request head, if it has one."""
    end = head.find(b"\r\n\r\n")
    for line in head[: end if end >= 0 else len(head)].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == _REQUEST_ID_HEADER:
            return value.strip().decode("latin-1")
    return None
