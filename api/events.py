"""The hub's own events (``user.created``, ``user.deleted``) for whoever listens.

The webhook dispatcher subscribes here; the accounts routes emit. Listeners are plain
synchronous callables ``(event, data) -> None`` that must not block (hand the event to
a bounded mailbox with ``send_nowait``); an exception in one is logged and ignored.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger("hub.api.events")

EventListener = Callable[[str, dict[str, Any]], None]


class HubEvents:
    def __init__(self) -> None:
        self._listeners: list[EventListener] = []

    def subscribe(self, listener: EventListener) -> Callable[[], None]:
        """Call ``listener(event, data)`` for every event; returns an unsubscribe function."""
        self._listeners.append(listener)

        def unsubscribe() -> None:
            if listener in self._listeners:
                self._listeners.remove(listener)

        return unsubscribe

    def emit(self, event: str, data: dict[str, Any]) -> None:
        for listener in list(self._listeners):
            try:
                listener(event, data)
            except Exception:
                log.exception("event listener failed for %s", event)
