"""Registers every blueprint of the REST API on the app."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from api.app import HubApp


def register_routes(app: HubApp) -> None:
    """Attach the ``/api/v1`` blueprints (filled in by the accounts and realtime work)."""
