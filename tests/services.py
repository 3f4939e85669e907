"""Test helpers shared by every suite that needs a real server (PostgreSQL, Redis, RabbitMQ).

The rule: in CI (``CI=true``) a missing service is a failure, never a skip, so a green
run always means the integration tests ran; on a developer machine the test is
skipped with a reason that says which service was missing.
"""

from __future__ import annotations

import os
import socket

import pytest

__all__ = ["CONNECT_TIMEOUT_S", "in_ci", "require_service"]

#: Seconds ``require_service`` waits for the TCP connection.
CONNECT_TIMEOUT_S = 1.0


def in_ci() -> bool:
    """True when the environment variable ``CI`` is ``true`` (any case)."""
    return os.environ.get("CI", "").strip().lower() == "true"


def require_service(name: str, host: str, port: int, *, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Make sure ``host:port`` accepts TCP connections, or end the test.

    Call it from a (sync) fixture or at the top of a test; it blocks for at most
    ``timeout`` seconds.

    Args:
        name: What the service is, for the message (``"PostgreSQL"``).
        host: Address to connect to.
        port: TCP port.
        timeout: Seconds to wait for the connection.

    Raises:
        pytest.fail.Exception: The service is unreachable and ``CI=true``.
        pytest.skip.Exception: The service is unreachable outside CI.
    """
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return
    except OSError as exc:
        reason = f"{name} is not reachable at {host}:{port} ({exc})"
    if in_ci():
        pytest.fail(f"{reason}; CI=true, so this is a failure, not a skip", pytrace=False)
    pytest.skip(f"{reason}; start it to run this test (in CI it would fail)")
