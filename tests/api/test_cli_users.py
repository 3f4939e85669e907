"""``hub users create`` (a real subprocess) with the accounts' password rules, and the
created account working against a node on the same data directory."""

from __future__ import annotations

import re
import sys
import uuid
from pathlib import Path

import trio

from tests.harness import PASSWORD, clean_env, make_settings, run_node, unique_email

HUB = Path(sys.executable).with_name("hub")


async def hub_cli(tmp_path: Path, *args: str) -> trio.CompletedProcess[bytes]:
    return await trio.run_process(
        [str(HUB), *args],
        env=clean_env(tmp_path),
        cwd=tmp_path,
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )


async def test_users_create_admin_then_log_in(tmp_path: Path) -> None:
    email = unique_email("cli")
    result = await hub_cli(
        tmp_path,
        "users",
        "create",
        email,
        "--password",
        PASSWORD,
        "--full-name",
        "CLI Admin",
        "--admin",
        "--verified",
    )
    assert result.returncode == 0, result.stderr.decode()
    user_id = result.stdout.decode().strip()
    uuid.UUID(user_id)

    settings = make_settings(tmp_path / "data")
    async with run_node(settings) as hub:
        login = await hub.client.post(
            "/api/v1/auth/login", json={"email": email, "password": PASSWORD}
        )
        assert login.status_code == 200, login.text
        token = login.json()["data"]["access_token"]
        claims = hub.node.services.authenticate(token)
        assert claims.user_id == user_id and claims.is_admin
        listing = await hub.client.get(
            "/api/v1/users", headers={"Authorization": f"Bearer {token}"}
        )
        assert listing.status_code == 200
        assert [u["email"] for u in listing.json()["data"]] == [email]


async def test_users_create_unverified_user_cannot_log_in_until_verified(tmp_path: Path) -> None:
    email = unique_email("cli")
    result = await hub_cli(
        tmp_path, "users", "create", email, "--password", PASSWORD, "--full-name", "U"
    )
    assert result.returncode == 0
    async with run_node(make_settings(tmp_path / "data")) as hub:
        login = await hub.client.post(
            "/api/v1/auth/login", json={"email": email, "password": PASSWORD}
        )
        assert login.status_code == 403


async def test_users_create_refuses_a_weak_password_and_a_duplicate(tmp_path: Path) -> None:
    weak = await hub_cli(
        tmp_path, "users", "create", unique_email(), "--password", "short", "--full-name", "W"
    )
    assert weak.returncode == 2
    assert re.match(r"hub: --password: Password must be at least 8", weak.stderr.decode())
    assert b"Traceback" not in weak.stderr

    too_long = await hub_cli(
        tmp_path,
        "users",
        "create",
        unique_email(),
        "--password",
        "Aa1" + "é" * 40,
        "--full-name",
        "L",
    )
    assert too_long.returncode == 2

    email = unique_email()
    first = await hub_cli(
        tmp_path, "users", "create", email, "--password", PASSWORD, "--full-name", "D"
    )
    assert first.returncode == 0
    again = await hub_cli(
        tmp_path, "users", "create", email.upper(), "--password", PASSWORD, "--full-name", "D"
    )
    assert again.returncode == 2
    assert b"already exists" in again.stderr
