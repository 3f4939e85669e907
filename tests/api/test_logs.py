"""Logs never carry passwords, tokens or e-mail addresses (item 4).

Unit tests of :func:`hub.logs.redact` and the JSON formatter, then a real ``hub serve``
process: register, verify, login, refresh, ``?token=`` in a URL (REST and WebSocket),
logout, delete — every line it writes to stderr is JSON and none contains a secret.
"""

from __future__ import annotations

import json
import logging
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import trio
from trio_websocket import open_websocket_url

from hub.logs import JsonFormatter, redact, request_id_var, user_id_var
from tests.harness import PASSWORD, WAIT_S, clean_env, extract_token
from tests.smtp_sink import SmtpSink, open_smtp_sink

HUB = Path(sys.executable).with_name("hub")
JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjMifQ.c2lnbmF0dXJlLXZhbHVl"


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        (f"GET /ws/notifications?token={JWT} 101", JWT),
        ("GET /x?access_token=abc.def&x=1", "abc.def"),
        ('{"password": "Hunter2!x"}', "Hunter2!x"),
        ('{"refresh_token":"r-tok-123"}', "r-tok-123"),
        ("Authorization: Bearer abc.def.ghi", "abc.def.ghi"),
        (f"token was {JWT}", JWT),
        ("redis://user:s3cret@redis:6379/0", "s3cret"),
        ("postgresql://postgres:pgpass@db/hub", "pgpass"),
        ("sent to jane.doe+tag@example.co.uk", "jane.doe+tag@example.co.uk"),
        ("password=plain-text-pw", "plain-text-pw"),
    ],
)
def test_redact_removes_secrets(text: str, secret: str) -> None:
    assert secret not in redact(text)


def test_json_formatter_redacts_arguments_extra_and_exceptions() -> None:
    formatter = JsonFormatter("node-x")
    try:
        raise ValueError(f"bad token {JWT} for bob@example.com")
    except ValueError:
        record = logging.LogRecord(
            "hub.test",
            logging.ERROR,
            __file__,
            1,
            "login %s with %s",
            ("bob@example.com", JWT),
            sys.exc_info(),
        )
    record.header = f"Bearer {JWT}"
    rid, uid = request_id_var.set("req-1"), user_id_var.set("user-1")
    try:
        line = formatter.format(record)
    finally:
        request_id_var.reset(rid)
        user_id_var.reset(uid)
    entry = json.loads(line)
    assert entry["context"] == {
        "node_id": "node-x",
        "request_id": "req-1",
        "user_id": "user-1",
        "header": "Bearer [REDACTED]",
    }
    assert JWT not in line and "bob@example.com" not in line
    assert "ValueError" in entry["exception"]


async def test_a_running_node_logs_no_secrets(tmp_path: Path) -> None:
    async with open_smtp_sink() as sink:
        await _exercise_node_and_check_logs(tmp_path, sink)


async def _exercise_node_and_check_logs(tmp_path: Path, sink: SmtpSink) -> None:
    lines: list[str] = []
    serving = trio.Event()
    port_holder: list[int] = []

    env = clean_env(tmp_path) | {"SMTP_HOST": "127.0.0.1", "SMTP_PORT": str(sink.port)}
    process = await trio.lowlevel.open_process(
        [str(HUB), "serve", "--host", "127.0.0.1", "--port", "0"],
        env=env,
        cwd=tmp_path,
        stderr=subprocess.PIPE,
    )
    assert process.stderr is not None

    async def read_stderr() -> None:
        buffer = b""
        async for chunk in process.stderr:  # type: ignore[union-attr]
            buffer += chunk
            *complete, buffer = buffer.split(b"\n")
            for raw in complete:
                line = raw.decode()
                lines.append(line)
                match = re.search(r"serving on http://127\.0\.0\.1:(\d+)", line)
                if match and not serving.is_set():
                    port_holder.append(int(match.group(1)))
                    serving.set()
        if buffer:
            lines.append(buffer.decode())

    email = "log.secret.person@example.com"
    secrets: list[str] = [PASSWORD, email, "log.secret.person"]
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_stderr)
            with trio.fail_after(WAIT_S):
                await serving.wait()
            url = f"http://127.0.0.1:{port_holder[0]}"
            async with httpx.AsyncClient(base_url=url, timeout=WAIT_S) as client:
                register = await client.post(
                    "/api/v1/auth/register",
                    json={
                        "email": email,
                        "password": PASSWORD,
                        "full_name": "Log Test",
                        "terms_accepted": True,
                    },
                )
                assert register.status_code == 201
                with trio.fail_after(WAIT_S):
                    await sink.wait_for(lambda s: len(s.messages) == 1)
                (message,) = sink.messages
                verify_token = extract_token(message.get_payload(decode=True).decode())
                secrets.append(verify_token)
                verified = await client.get(
                    "/api/v1/auth/verify-email", params={"token": verify_token}
                )
                assert verified.status_code == 200
                bad = await client.post(
                    "/api/v1/auth/login", json={"email": email, "password": "Wr0ng-Pass"}
                )
                assert bad.status_code == 401
                secrets.append("Wr0ng-Pass")
                login = await client.post(
                    "/api/v1/auth/login", json={"email": email, "password": PASSWORD}
                )
                tokens = login.json()["data"]
                secrets += [tokens["access_token"], tokens["refresh_token"]]
                access = tokens["access_token"]
                me = await client.get("/api/v1/users/me", params={"token": access})
                assert me.status_code == 401  # REST only takes the header, but logs the URL
                ws_url = url.replace("http://", "ws://") + f"/ws/notifications?token={access}"
                async with open_websocket_url(ws_url) as ws:
                    welcome = json.loads(await ws.get_message())
                    assert welcome["type"] == "welcome"
                bad_ws = url.replace("http://", "ws://") + f"/ws/notifications?token={JWT}"
                try:
                    async with open_websocket_url(bad_ws) as ws:
                        await ws.get_message()
                except Exception:
                    pass
                secrets.append(JWT)
                refreshed = await client.post(
                    "/api/v1/auth/refresh", json={"refresh_token": tokens["refresh_token"]}
                )
                new = refreshed.json()["data"]
                secrets += [new["access_token"], new["refresh_token"]]
                reuse = await client.post(
                    "/api/v1/auth/refresh", json={"refresh_token": tokens["refresh_token"]}
                )
                assert reuse.status_code == 401
                login = await client.post(
                    "/api/v1/auth/login", json={"email": email, "password": PASSWORD}
                )
                final = login.json()["data"]["access_token"]
                secrets.append(final)
                headers = {"Authorization": f"Bearer {final}"}
                assert (await client.delete("/api/v1/users/me", headers=headers)).status_code == 200
            process.send_signal(signal.SIGTERM)
            with trio.fail_after(WAIT_S):
                await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
    assert process.returncode == 0
    assert len(lines) > 10
    text = "\n".join(lines)
    for line in lines:
        if line.strip():
            json.loads(line)  # every line is one JSON object
    for secret in secrets:
        assert secret not in text, f"a secret leaked into the logs: {secret[:12]}…"
    assert "[REDACTED]" in text  # the ?token= URL was logged, redacted
