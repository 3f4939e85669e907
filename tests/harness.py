"""A real node on 127.0.0.1 (port 0) with an ``httpx.AsyncClient`` bound to it.

Nothing is faked: the node is the one ``hub serve`` runs (``open_node`` + ``serve_node``),
on SQLite in a temporary directory or on PostgreSQL in a schema of its own, and the
client talks to it over a real socket.

Settings are built from explicit values only (no ``.env``, and every setting that would
change behaviour is given), so variables such as ``DATABASE_URL`` in the developer's
environment never leak into a test.
"""

from __future__ import annotations

import os
import re
import secrets
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from email import message_from_bytes
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import trio

from api.auth.passwords import hash_password
from hub.settings import Settings, load_settings
from storage.base import Role, User

PG_HOST, PG_PORT = "127.0.0.1", 5432
PG_URL = f"postgresql://postgres@{PG_HOST}:{PG_PORT}/test"
REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
REDIS_URL = f"redis://{REDIS_HOST}:{REDIS_PORT}/0"
JWT_SECRET = "test-secret-key-0123456789abcdefghijklmnop"
PASSWORD = "Corr3ct-Horse"
#: Seconds any single wait in a test may take before it fails.
WAIT_S = 10.0
HIGH_RATE = "100000/minute"


def make_settings(data_dir: Path, *, backend: str = "sqlite", **overrides: Any) -> Settings:
    """Settings for a test node; ``overrides`` win."""
    values: dict[str, Any] = {
        "_env_file": None,
        "hub_data_dir": data_dir,
        "database_url": PG_URL if backend == "postgres" else None,
        "redis_url": None,
        "amqp_url": None,
        "smtp_host": None,
        "jwt_secret_key": JWT_SECRET,
        "bcrypt_rounds": 4,
        "log_level": "INFO",
        "log_format": "json",
        "hub_node_id": f"test-{secrets.token_hex(2)}",
        "public_url": "http://hub.test",
        "allowed_origins": [],
        "trusted_proxies": [],
        "auth_require_verified": True,
        "rate_limit_register": HIGH_RATE,
        "rate_limit_login": HIGH_RATE,
        "rate_limit_auth": HIGH_RATE,
        "rate_limit_public": HIGH_RATE,
        "rate_limit_admin": HIGH_RATE,
        "db_pool_size": 4,
        "shutdown_timeout_s": 3.0,
    }
    values.update(overrides)
    return load_settings(None, **values)


def clean_env(tmp_path: Path) -> dict[str, str]:
    """Environment for a ``hub`` subprocess: no inherited hub setting, data in
    ``tmp_path/data``, the test JWT key, cheap bcrypt, DEBUG JSON logs."""
    env = {k: v for k, v in os.environ.items() if k.lower() not in Settings.model_fields}
    env.update(
        {
            "HUB_DATA_DIR": str(tmp_path / "data"),
            "JWT_SECRET_KEY": JWT_SECRET,
            "BCRYPT_ROUNDS": "4",
            "LOG_LEVEL": "DEBUG",
            "LOG_FORMAT": "json",
            "PUBLIC_URL": "http://hub.test",
        }
    )
    return env


def unique_email(tag: str = "user") -> str:
    return f"{tag}-{uuid.uuid4().hex[:12]}@example.com"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@dataclass
class Account:
    """A user the test created, with its credentials and (after login) tokens."""

    user: User
    email: str
    password: str
    access_token: str = ""
    refresh_token: str = ""

    @property
    def user_id(self) -> str:
        return str(self.user.id)

    @property
    def headers(self) -> dict[str, str]:
        return bearer(self.access_token)


@dataclass
class RunningNode:
    """A served node and a client for it."""

    node: Any  # hub.node.Node
    url: str
    client: httpx.AsyncClient
    shutdown: trio.Event

    @property
    def settings(self) -> Settings:
        return self.node.settings

    async def create_account(
        self,
        *,
        admin: bool = False,
        verified: bool = True,
        email: str | None = None,
        password: str = PASSWORD,
        full_name: str = "Test User",
        login: bool = True,
    ) -> Account:
        """A user created in storage directly (as ``hub users create`` does), logged in
        over HTTP unless ``login`` is false."""
        email = email or unique_email("admin" if admin else "user")
        password_hash = await trio.to_thread.run_sync(
            hash_password, password, self.settings.bcrypt_rounds
        )
        user = await self.node.storage.create_user(
            email=email,
            password_hash=password_hash,
            full_name=full_name,
            role=Role.ADMIN if admin else Role.USER,
            is_verified=verified,
        )
        account = Account(user, email, password)
        if login:
            await self.login(account)
        return account

    async def login(self, account: Account) -> httpx.Response:
        response = await self.client.post(
            "/api/v1/auth/login", json={"email": account.email, "password": account.password}
        )
        assert response.status_code == 200, response.text
        data = response.json()["data"]
        account.access_token = data["access_token"]
        account.refresh_token = data["refresh_token"]
        return response

    async def register(self, email: str | None = None, **fields: Any) -> httpx.Response:
        body = {
            "email": email or unique_email(),
            "password": PASSWORD,
            "full_name": "New User",
            "terms_accepted": True,
        }
        body.update(fields)
        return await self.client.post("/api/v1/auth/register", json=body)

    async def wait_emails_sent(self, count: int) -> None:
        """Wait until the e-mail worker has sent ``count`` e-mails in all."""
        worker = self.node.services.email_worker
        with trio.fail_after(WAIT_S):
            await worker.wait_until(lambda stats: stats.sent >= count)

    def outbox_messages(self, to: str) -> list[Any]:
        """Messages in the outbox addressed to ``to`` (parsed ``email.message.Message``)."""
        outbox = self.settings.hub_data_dir / "outbox"
        found = []
        for path in sorted(outbox.glob("*.eml")) if outbox.exists() else []:
            message = message_from_bytes(path.read_bytes())
            if message["To"] == to:
                found.append(message)
        return found

    def verification_token(self, to: str) -> str:
        """The token in the latest verification e-mail sent to ``to`` (outbox)."""
        messages = self.outbox_messages(to)
        assert messages, f"no e-mail for {to} in the outbox"
        return extract_token(messages[-1].get_payload(decode=True).decode())


def extract_token(body: str) -> str:
    match = re.search(r"/api/v1/auth/verify-email\?token=([A-Za-z0-9_-]+)", body)
    assert match, body
    return match.group(1)


@asynccontextmanager
async def run_node(
    settings: Settings, *, schema: str | None = None, redis_prefix: str = ""
) -> AsyncIterator[RunningNode]:
    """Start a node, serve it on 127.0.0.1 with a free port, yield it with a client;
    stop it gracefully on exit."""
    from hub.node import open_node, serve_node

    async with (
        open_node(settings, storage_schema=schema, redis_prefix=redis_prefix) as node,
        trio.open_nursery() as nursery,
    ):
        shutdown = trio.Event()
        bound = await nursery.start(
            partial(serve_node, node, host="127.0.0.1", port=0, shutdown=shutdown)
        )
        host, port = bound[0][:2]
        url = f"http://{host}:{port}"
        async with httpx.AsyncClient(base_url=url, timeout=WAIT_S) as client:
            yield RunningNode(node, url, client, shutdown)
        shutdown.set()
