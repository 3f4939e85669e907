"""Fixtures of the operations tests (metrics, readiness, admin API, deployment files).

Metrics and the admin API read the realtime core, not storage, so they run on SQLite
only; the readiness tests that need PostgreSQL start their own nodes.
"""

from __future__ import annotations

import pytest


@pytest.fixture
def backend() -> str:
    """SQLite only (overrides the two-backend fixture of ``tests/conftest.py``)."""
    return "sqlite"
