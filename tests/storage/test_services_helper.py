"""``tests.services.require_service``: fail under CI=true, skip elsewhere, pass when up."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from tests.services import require_service


@pytest.fixture
def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


@pytest.fixture
def open_port() -> Iterator[int]:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        yield server.getsockname()[1]


def test_reachable_service_passes(open_port: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    require_service("Thing", "127.0.0.1", open_port)


@pytest.mark.parametrize("value", ["true", "TRUE", "True"])
def test_unreachable_in_ci_fails(
    closed_port: int, monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("CI", value)
    with pytest.raises(pytest.fail.Exception, match=r"Thing is not reachable .* CI=true"):
        require_service("Thing", "127.0.0.1", closed_port)


@pytest.mark.parametrize("value", [None, "", "false", "1"])
def test_unreachable_outside_ci_skips(
    closed_port: int, monkeypatch: pytest.MonkeyPatch, value: str | None
) -> None:
    if value is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", value)
    with pytest.raises(pytest.skip.Exception, match="Thing is not reachable"):
        require_service("Thing", "127.0.0.1", closed_port)
