"""A node near its open-file limit keeps every established connection and refuses new
work cleanly: WebSocket upgrades get HTTP 503 (envelope, ``Retry-After``) while fewer
than ``FD_RESERVE`` descriptors would be left, ``accept`` failing with ``EMFILE``
neither crashes nor stalls the node, and a client that resets its connection before the
node reads it cannot take the node down.

The descriptor tests run ``hub serve`` as a real process whose soft ``RLIMIT_NOFILE`` is
set small before it starts; every client is a real socket.
"""

from __future__ import annotations

import json
import resource
import socket
import struct
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from tests.harness import WAIT_S, Account, RunningNode, clean_env
from tests.ops.scrape import Scrape
from tests.realtime.conftest import publish
from tests.realtime.rawws import RawClient, raw_connect

#: The node's soft RLIMIT_NOFILE in these tests; its reserve is then the minimum, 64.
NOFILE = 256
RESERVE = 64
CHANNEL = "public.capacity"
PASSWORD = "Sup3r-secret-pw"
START_WITHIN_S = 30.0
CREATE_ADMIN = ("users", "create", "ops@example.com", "--password", PASSWORD)
CREATE_ADMIN += ("--full-name", "Ops", "--admin", "--verified")


# -- a node process with a small open-file limit -------------------------------------------


@dataclass
class LimitedNode:
    """``hub serve`` running with soft ``RLIMIT_NOFILE`` = :data:`NOFILE`."""

    proc: trio.Process
    port: int
    token: str
    logs: list[dict[str, Any]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def logged(self, prefix: str) -> int:
        """How many log lines start with ``prefix``."""
        return sum(1 for entry in self.logs if entry["message"].startswith(prefix))

    async def get(self, path: str) -> httpx.Response:
        """A request on a fresh connection (no keep-alive pool across calls)."""
        async with httpx.AsyncClient(base_url=self.url, timeout=WAIT_S) as client:
            return await client.get(path)

    async def publish(self, data: dict[str, Any]) -> None:
        async with httpx.AsyncClient(base_url=self.url, timeout=WAIT_S) as client:
            response = await client.post(
                "/api/v1/notifications",
                json={"channel": CHANNEL, "data": data},
                headers={"Authorization": f"Bearer {self.token}"},
            )
        assert response.status_code == 202, response.text

    async def scrape(self) -> Scrape:
        response = await self.get("/metrics")
        assert response.status_code == 200, response.text
        return Scrape(response.text)


#: Run in the child: lower the soft limit, then become ``hub serve`` (limits survive exec).
_LAUNCH = (
    "import os, resource, sys\n"
    "hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]\n"
    "resource.setrlimit(resource.RLIMIT_NOFILE, (int(sys.argv[1]), hard))\n"
    "os.execv(sys.executable, [sys.executable, '-m', 'hub', 'serve', '--port', '0'])\n"
)


async def _read_logs(
    stream: trio.abc.ReceiveStream, logs: list[dict[str, Any]], port_seen: trio.Event
) -> None:
    """Collect the node's JSON log lines until it exits (so its stderr never fills)."""
    buffer = b""
    while chunk := await stream.receive_some(65536):
        *lines, buffer = (buffer + chunk).split(b"\n")
        for line in lines:
            logs.append(json.loads(line))
            if logs[-1]["message"].startswith("serving on http://127.0.0.1:"):
                port_seen.set()


@pytest.fixture
async def limited(tmp_path: Path) -> AsyncIterator[LimitedNode]:
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] > 4 * NOFILE, "test runner's limit"
    env = clean_env(tmp_path)
    created = await trio.run_process(
        [sys.executable, "-m", "hub", *CREATE_ADMIN],
        env=env,
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert created.returncode == 0, created.stderr.decode()
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-c", _LAUNCH, str(NOFILE)], env=env, stderr=subprocess.PIPE
    )
    logs: list[dict[str, Any]] = []
    port_seen = trio.Event()
    try:
        async with trio.open_nursery() as nursery:
            assert proc.stderr is not None
            nursery.start_soon(_read_logs, proc.stderr, logs, port_seen)
            with trio.fail_after(START_WITHIN_S):
                await port_seen.wait()
            serving = next(e for e in logs if e["message"].startswith("serving on"))
            port = int(serving["message"].rsplit(":", 1)[1])
            async with httpx.AsyncClient(timeout=WAIT_S) as client:
                login = await client.post(
                    f"http://127.0.0.1:{port}/api/v1/auth/login",
                    json={"email": "ops@example.com", "password": PASSWORD},
                )
            assert login.status_code == 200, login.text
            yield LimitedNode(proc, port, login.json()["data"]["access_token"], logs)
            proc.terminate()
            with trio.fail_after(WAIT_S):
                assert await proc.wait() == 0, logs[-5:]
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


# -- clients -----------------------------------------------------------------------------


async def _upgrade(port: int, token: str, extra_headers: str = "") -> tuple[RawClient, bytes]:
    """Send an upgrade; the client (frames after the answer's head in its buffer) and
    the head of the answer."""
    with trio.fail_after(WAIT_S):
        client = await raw_connect(port, token, extra_headers=extra_headers)
    return client, client.head


async def _subscribed(node: LimitedNode) -> RawClient | None:
    """A WebSocket subscribed to :data:`CHANNEL`, or ``None`` when the node answered 503
    (after checking that answer)."""
    client, head = await _upgrade(node.port, node.token)
    if client.status_line.startswith(b"HTTP/1.1 503"):
        await _check_refusal(client, head, "descriptors")
        return None
    assert client.status_line.startswith(b"HTTP/1.1 101"), client.status_line
    await client.json_until("welcome")
    await client.send_json({"type": "subscribe", "channels": [CHANNEL]})
    await client.json_until("subscribed")
    return client


async def _check_refusal(client: RawClient, head: bytes, reason: str) -> dict[str, Any]:
    """A 503 refusal before the upgrade: envelope, ``Retry-After``, then the node closes.
    Returns the envelope."""
    assert client.status_line == b"HTTP/1.1 503 Service Unavailable", client.status_line
    with trio.fail_after(WAIT_S):
        while await client._fill():
            pass  # Connection: close — the body ends where the node closes
    await client.aclose()
    headers = dict(line.decode().split(": ", 1) for line in head.split(b"\r\n")[1:])
    headers = {name.lower(): value for name, value in headers.items()}
    assert int(headers["retry-after"]) >= 1
    assert headers["content-type"] == "application/json"
    assert headers["connection"] == "close"
    envelope: dict[str, Any] = json.loads(bytes(client.buffer))
    assert envelope["status"] == "error"
    assert envelope["error"]["code"] == "SERVICE_UNAVAILABLE"
    assert envelope["error"]["details"] == {"reason": reason}
    assert envelope["error"]["retry_after"] == int(headers["retry-after"])
    assert envelope["meta"]["request_id"] == headers["x-request-id"]
    return envelope


async def _notified(clients: list[RawClient], n: int) -> None:
    """Every client receives the notification ``data.n == n``."""
    with trio.fail_after(WAIT_S):
        for client in clients:
            note = await client.json_until("notification")
            assert note["channel"] == CHANNEL
            assert note["data"]["n"] == n


async def _close(client: RawClient) -> None:
    """Close handshake: send 1000, read until the node's close frame and its EOF."""
    await client.send(b"\x88\x82" + b"\x00" * 4 + struct.pack("!H", 1000))
    with trio.fail_after(WAIT_S):
        assert await client.close_code() == 1000
        while await client._fill():
            pass
    await client.aclose()


# -- tests -------------------------------------------------------------------------------


async def test_upgrades_past_the_reserve_get_503_and_established_connections_stay_healthy(
    limited: LimitedNode,
) -> None:
    established: list[RawClient] = []
    with trio.fail_after(60):
        for _ in range(NOFILE):  # more than can fit: the node must refuse before
            client = await _subscribed(limited)
            if client is None:
                break
            established.append(client)
        else:
            pytest.fail(f"no 503 after {NOFILE} upgrades with RLIMIT_NOFILE={NOFILE}")
    # Refused where fewer than the reserve would be left, not earlier.
    assert NOFILE - RESERVE - 40 < len(established) < NOFILE - RESERVE

    for _ in range(20):  # still full: refused again, every time
        assert await _subscribed(limited) is None

    # The node's own needs still work: liveness, the REST API, fan-out to everyone.
    health = await limited.get("/health")
    assert health.status_code == 200, health.text
    await limited.publish({"n": 1})
    await _notified(established, 1)

    # Room again once connections close.
    for client in established[:10]:
        await _close(client)
    established = established[10:]
    for _ in range(5):
        client = await _subscribed(limited)
        assert client is not None, "not admitted after connections closed"
        established.append(client)
    await limited.publish({"n": 2})
    await _notified(established, 2)

    metrics = await limited.scrape()
    assert metrics.value("hub_websocket_upgrades_refused_total", reason="descriptors") == 21
    assert metrics.value("hub_websocket_connections") == len(established)
    assert limited.logged("refusing WebSocket upgrades with 503") == 1  # once per burst
    for client in established:
        await client.aclose()


async def test_out_of_descriptors_accept_answers_503_and_recovers(limited: LimitedNode) -> None:
    ws = [client for _ in range(3) if (client := await _subscribed(limited)) is not None]
    assert len(ws) == 3
    # A connection opened now, whose publish request is sent once the node is out.
    publisher = trio.socket.socket()
    await publisher.connect(("127.0.0.1", limited.port))

    # Use up every descriptor with requests that never finish their head.
    fillers: list[socket.socket] = []
    for _ in range(NOFILE):
        filler = socket.create_connection(("127.0.0.1", limited.port))
        filler.sendall(b"GET /health HTTP/1.1\r\n")
        fillers.append(filler)
    try:
        # A new connection is answered at once, 503 with the envelope: not left waiting.
        probe = trio.socket.socket()
        await probe.connect(("127.0.0.1", limited.port))
        await probe.send(b"GET /health HTTP/1.1\r\nHost: hub\r\n\r\n")
        answer = b""
        with trio.fail_after(WAIT_S):
            while chunk := await probe.recv(65536):
                answer += chunk
        probe.close()
        head, _, envelope = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503"), head
        assert b"\r\nRetry-After: " in head
        error = json.loads(envelope)["error"]
        assert error["code"] == "SERVICE_UNAVAILABLE"
        assert error["details"] == {"reason": "descriptors"}

        # Established connections are untouched: a publish still reaches them.
        body = json.dumps({"channel": CHANNEL, "data": {"n": 1}}).encode()
        request = (
            f"POST /api/v1/notifications HTTP/1.1\r\nHost: hub\r\n"
            f"Authorization: Bearer {limited.token}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        await publisher.send(request.encode() + body)
        with trio.fail_after(WAIT_S):
            assert (await publisher.recv(65536)).startswith(b"HTTP/1.1 202")
        await _notified(ws, 1)
    finally:
        for filler in fillers:
            filler.close()
        publisher.close()

    # Descriptors free again: new connections are served.
    health = await limited.get("/health")
    assert health.status_code == 200, health.text
    metrics = await limited.scrape()
    assert (metrics.value("hub_accept_errors_total", error="EMFILE") or 0) >= 1
    assert (metrics.value("hub_connections_shed_total") or 0) >= 1
    assert limited.logged("accept failed with EMFILE") == 1  # once per burst
    await limited.publish({"n": 2})
    await _notified(ws, 2)
    for client in ws:
        await client.aclose()


# -- in process: the cap on connections, a reset before the head is read ------------------


@pytest.fixture
def node_overrides() -> dict[str, Any]:
    return {"ws_max_connections": 3}


async def test_ws_max_connections_caps_upgrades_with_503(
    hub_node: RunningNode, user: Account, admin: Account
) -> None:
    port = int(hub_node.url.rsplit(":", 1)[1])
    with trio.fail_after(WAIT_S):
        clients = [(await _upgrade(port, user.access_token))[0] for _ in range(3)]
        for client in clients:
            assert client.status_line.startswith(b"HTTP/1.1 101"), client.status_line
            await client.json_until("welcome")
        refused, head = await _upgrade(port, user.access_token, "X-Request-ID: cap-test-1\r\n")
        envelope = await _check_refusal(refused, head, "connections")
        assert envelope["meta"]["request_id"] == "cap-test-1"

        await _close(clients.pop())
        again, _ = await _upgrade(port, user.access_token)
        assert again.status_line.startswith(b"HTTP/1.1 101"), again.status_line
        clients.append(again)
    stats = hub_node.node.realtime.admission.statistics()
    assert stats["refused"]["connections"] == 1
    assert stats["admitted"] == 3
    for client in clients:
        await client.aclose()


async def test_a_request_reset_before_the_node_reads_it_does_not_take_the_node_down(
    hub_node: RunningNode, user: Account, admin: Account
) -> None:
    port = int(hub_node.url.rsplit(":", 1)[1])
    ws, _ = await _upgrade(port, user.access_token)
    with trio.fail_after(WAIT_S):
        await ws.json_until("welcome")
        await ws.send_json({"type": "subscribe", "channels": ["global"]})
        await ws.json_until("subscribed")

    # Without yielding to the node (same trio loop): connect, send a whole request, then
    # reset. The node accepts it later and reads the request of a connection that is gone.
    reset = socket.create_connection(("127.0.0.1", port))
    reset.sendall(b"GET /health HTTP/1.1\r\nHost: hub\r\n\r\n")
    reset.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    reset.close()

    async with httpx.AsyncClient(base_url=hub_node.url, timeout=WAIT_S) as fresh:
        health = await fresh.get("/health")  # a new connection, accepted after the reset one
    assert health.status_code == 200
    await publish(hub_node, admin, channel="global", data={"after": "reset"})
    with trio.fail_after(WAIT_S):
        note = await ws.json_until("notification")
    assert note["data"]["after"] == "reset"
    await ws.aclose()
