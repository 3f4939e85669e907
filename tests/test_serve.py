"""``hub serve`` as users run it: a real process on embedded defaults, stopped by SIGTERM.

SPEC §1: WebSockets are closed with 1001, in-flight requests finish, exit 0 within 10 s.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import trio
from trio_websocket import ConnectionClosed, open_websocket_url

STOP_WITHIN_S = 10.0
START_WITHIN_S = 30.0
PASSWORD = "Sup3r-secret-pw"


def _env(data_dir: Path) -> dict[str, str]:
    keep = {k: v for k, v in os.environ.items() if not k.isupper() or k in {"PATH", "HOME"}}
    return keep | {
        "HUB_DATA_DIR": str(data_dir),
        "BCRYPT_ROUNDS": "4",
        "LOG_LEVEL": "INFO",
        "PATH": os.environ.get("PATH", ""),
    }


async def _read_port(stderr: trio.abc.ReceiveStream, seen: list[str]) -> int:
    buffer = b""
    while True:
        chunk = await stderr.receive_some(4096)
        if not chunk:
            raise AssertionError("hub serve exited before serving:\n" + "\n".join(seen))
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            seen.append(line.decode())
            entry = json.loads(line)
            if entry["message"].startswith("serving on http://127.0.0.1:"):
                return int(entry["message"].rsplit(":", 1)[1])


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[trio.Process, int, list[str]]]:
    env = _env(tmp_path / "data")
    created = await trio.run_process(
        [
            sys.executable,
            "-m",
            "hub",
            "users",
            "create",
            "ops@example.com",
            "--password",
            PASSWORD,
            "--full-name",
            "Ops",
            "--admin",
            "--verified",
        ],
        env=env,
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert created.returncode == 0, created.stderr.decode()
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "hub", "serve", "--port", "0"],
        env=env,
        stderr=subprocess.PIPE,
    )
    seen: list[str] = []
    try:
        with trio.fail_after(START_WITHIN_S):
            port = await _read_port(proc.stderr, seen)
        yield proc, port, seen
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


async def test_sigterm_closes_websockets_with_1001_finishes_requests_and_exits_0(
    served: tuple[trio.Process, int, list[str]],
) -> None:
    proc, port, _ = served
    base = f"http://127.0.0.1:{port}"
    async with httpx.AsyncClient(base_url=base) as client:
        login = await client.post(
            "/api/v1/auth/login", json={"email": "ops@example.com", "password": PASSWORD}
        )
    assert login.status_code == 200, login.text
    token = login.json()["data"]["access_token"]

    async with open_websocket_url(f"ws://127.0.0.1:{port}/ws/notifications?token={token}") as ws:
        assert json.loads(await ws.get_message())["type"] == "welcome"
        await ws.send_message(json.dumps({"type": "subscribe", "channels": ["global"]}))
        assert json.loads(await ws.get_message())["type"] == "subscribed"

        # An HTTP request in flight: the server has answered "100 Continue", so the
        # request is inside the app when the signal arrives; its body comes after.
        body = json.dumps({"email": "ops@example.com", "password": PASSWORD}).encode()
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(
            b"POST /api/v1/auth/login HTTP/1.1\r\nHost: hub\r\nContent-Type: application/json\r\n"
            b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body)
        )
        with trio.fail_after(10):
            assert (await stream.receive_some(1024)).startswith(b"HTTP/1.1 100")

        started = trio.current_time()
        proc.send_signal(signal.SIGTERM)

        with trio.fail_after(STOP_WITHIN_S):
            code = None
            try:
                while True:
                    await ws.get_message()
            except ConnectionClosed as closed:
                code = closed.reason.code
            assert code == 1001

            await stream.send_all(body)
            answer = b""
            while b"\r\n\r\n" not in answer:
                chunk = await stream.receive_some(4096)
                assert chunk, f"connection closed before the answer: {answer!r}"
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 200"), answer[:200]

            assert await proc.wait() == 0
        assert trio.current_time() - started < STOP_WITHIN_S
        await stream.aclose()


async def test_idle_keep_alive_connection_neither_lingers_nor_delays_shutdown(
    served: tuple[trio.Process, int, list[str]],
) -> None:
    proc, port, _ = served
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(b"GET /health HTTP/1.1\r\nHost: hub\r\n\r\n")
    answer = b""
    with trio.fail_after(10):
        while not answer.endswith(b"}}"):
            answer += await stream.receive_some(4096)
    assert answer.startswith(b"HTTP/1.1 200")

    # The connection is idle and kept alive; SIGTERM must not wait for it.
    started = trio.current_time()
    proc.send_signal(signal.SIGTERM)
    with trio.fail_after(STOP_WITHIN_S):
        assert await stream.receive_some(4096) == b""  # the node closed it
        assert await proc.wait() == 0
    assert trio.current_time() - started < 5.0, "an idle connection held the shutdown"
    await stream.aclose()
