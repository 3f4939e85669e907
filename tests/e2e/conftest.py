"""Fixtures of the end-to-end browser tests: a real node on SQLite that may send webhooks
to a receiver on 127.0.0.1."""

from __future__ import annotations

from typing import Any

import pytest


@pytest.fixture
def backend() -> str:
    """SQLite only: the page talks to the realtime core and the REST API, not to storage."""
    return "sqlite"


@pytest.fixture
def node_overrides() -> dict[str, Any]:
    """Webhooks may target the local receiver."""
    return {"webhook_allow_private": True}
