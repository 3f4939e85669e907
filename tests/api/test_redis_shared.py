"""With ``REDIS_URL``: rate-limit counters shared by nodes, session records and the user
cache in Redis, and a Redis outage that degrades instead of failing (real Redis)."""

from __future__ import annotations

import logging
import socket
from pathlib import Path

import pytest
import redis
import trio

from api.ratelimit_redis import RedisRateLimiter
from bridge.redis_kv import KVUnavailable, RedisKV
from hub.settings import RateLimit
from tests.harness import PG_HOST, PG_PORT, REDIS_URL, make_settings, run_node, unique_email
from tests.services import require_service

pytestmark = pytest.mark.redis


@pytest.fixture
def raw_redis() -> redis.Redis:
    return redis.Redis.from_url(REDIS_URL, decode_responses=True)


def dead_redis_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"redis://127.0.0.1:{port}/0"


async def test_counter_is_atomic_under_concurrency(
    redis_prefix: str, raw_redis: redis.Redis
) -> None:
    kv = RedisKV(REDIS_URL, prefix=redis_prefix)
    limiter = RedisRateLimiter(kv)
    allowed: list[bool] = []

    async def hit() -> None:
        decision = await limiter.hit("login", "ip:198.51.100.1", RateLimit(10, 60))
        allowed.append(decision.allowed)

    async with trio.open_nursery() as nursery:
        for _ in range(40):
            nursery.start_soon(hit)
    assert allowed.count(True) == 10
    key = f"{redis_prefix}ratelimit:login:ip:198.51.100.1"
    assert raw_redis.get(key) == "40"
    assert 0 < raw_redis.ttl(key) <= 60
    await kv.aclose()


async def test_limiter_fails_open_when_redis_is_down(caplog: pytest.LogCaptureFixture) -> None:
    kv = RedisKV(dead_redis_url(), prefix="unused:")
    limiter = RedisRateLimiter(kv)
    with caplog.at_level(logging.WARNING, logger="hub.api.ratelimit"):
        for _ in range(3):
            decision = await limiter.hit("login", "ip:1", RateLimit(1, 60))
            assert decision.allowed
    assert limiter.failed_open == 3
    assert any("failing open" in r.getMessage() for r in caplog.records)
    with pytest.raises(KVUnavailable):
        await kv.ping()
    await kv.aclose()


async def test_two_nodes_share_the_limits(tmp_path: Path, redis_prefix: str) -> None:
    overrides = {"redis_url": REDIS_URL, "rate_limit_login": "3/minute"}
    body = {"email": unique_email(), "password": "Wr0ng-password"}
    async with (
        run_node(make_settings(tmp_path / "a", **overrides), redis_prefix=redis_prefix) as a,
        run_node(make_settings(tmp_path / "b", **overrides), redis_prefix=redis_prefix) as b,
    ):
        statuses = [
            (await node.client.post("/api/v1/auth/login", json=body)).status_code
            for node in (a, b, a, b)
        ]
        assert statuses == [401, 401, 401, 429]
        assert (await a.client.post("/api/v1/auth/login", json=body)).status_code == 429


async def test_sessions_and_user_cache_live_in_redis(
    tmp_path: Path, redis_prefix: str, raw_redis: redis.Redis
) -> None:
    settings = make_settings(tmp_path, redis_url=REDIS_URL)
    async with run_node(settings, redis_prefix=redis_prefix) as hub:
        account = await hub.create_account()
        claims = hub.node.services.authenticate(account.access_token)
        session_key = f"{redis_prefix}session:user:{account.user_id}:{claims.session_id}"
        record = raw_redis.hgetall(session_key)
        assert record["user_id"] == account.user_id
        assert 0 < raw_redis.ttl(session_key) <= settings.refresh_token_ttl_s

        cache_key = f"{redis_prefix}cache:user:{account.user_id}"
        me = await hub.client.get("/api/v1/users/me", headers=account.headers)
        assert me.status_code == 200
        assert account.email in raw_redis.get(cache_key)
        assert "password" not in raw_redis.get(cache_key)

        update = await hub.client.put(
            "/api/v1/users/me", headers=account.headers, json={"full_name": "Changed"}
        )
        assert update.status_code == 200
        assert raw_redis.get(cache_key) is None  # invalidated
        me = await hub.client.get("/api/v1/users/me", headers=account.headers)
        assert me.json()["data"]["full_name"] == "Changed"

        await hub.client.post("/api/v1/auth/logout", headers=account.headers)
        assert raw_redis.exists(session_key) == 0

        await hub.login(account)
        await hub.client.delete("/api/v1/users/me", headers=account.headers)
        assert raw_redis.get(cache_key) is None
        assert list(raw_redis.scan_iter(f"{redis_prefix}session:user:{account.user_id}:*")) == []


async def test_node_keeps_serving_when_redis_is_down(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, redis_url=dead_redis_url(), auth_require_verified=False)
    async with run_node(settings, redis_prefix="unused:") as hub:
        email = unique_email()
        assert (await hub.register(email)).status_code == 201
        account = await hub.create_account()
        me = await hub.client.get("/api/v1/users/me", headers=account.headers)
        assert me.status_code == 200
        assert me.headers["X-RateLimit-Limit"] == "100000"
        ready = await hub.client.get("/ready")
        assert ready.status_code == 503
        assert "redis" in ready.json()["error"]["details"]["down"]


async def test_logout_on_one_node_reaches_the_other(
    tmp_path: Path, pg_schema: str, redis_prefix: str
) -> None:
    """Two nodes on one PostgreSQL: a logout on A is refused by B after B's next
    revocation sync (which the node runs every couple of seconds)."""
    require_service("PostgreSQL", PG_HOST, PG_PORT)
    overrides = {"redis_url": REDIS_URL}
    settings_a = make_settings(tmp_path / "a", backend="postgres", **overrides)
    settings_b = make_settings(tmp_path / "b", backend="postgres", **overrides)
    async with (
        run_node(settings_a, schema=pg_schema, redis_prefix=redis_prefix) as a,
        run_node(settings_b, schema=pg_schema, redis_prefix=redis_prefix) as b,
    ):
        account = await a.create_account()
        assert (await b.client.get("/api/v1/users/me", headers=account.headers)).status_code == 200
        heard = trio.Event()
        b.node.services.revocations.subscribe(lambda kind, ident: heard.set())
        await a.client.post("/api/v1/auth/logout", headers=account.headers)
        await b.node.services.revocations.sync(b.node.storage)
        assert heard.is_set()
        me = await b.client.get("/api/v1/users/me", headers=account.headers)
        assert me.status_code == 401
