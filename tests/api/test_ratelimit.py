"""Rate limits (SPEC §2): headers on every /api/v1 answer, 429 with Retry-After, per-IP
and per-user groups, X-Forwarded-For believed only from trusted proxies."""

from __future__ import annotations

from typing import Any

import pytest

from api.client_ip import client_ip, parse_networks
from api.ratelimit import MemoryRateLimiter
from hub.settings import RateLimit
from tests.harness import RunningNode, unique_email


@pytest.fixture
def node_overrides() -> dict[str, Any]:
    return {
        "rate_limit_login": "3/minute",
        "rate_limit_register": "2/minute",
        "rate_limit_public": "4/minute",
        "rate_limit_auth": "5/minute",
    }


class Clock:
    now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_memory_limiter_fixed_window() -> None:
    clock = Clock()
    limiter = MemoryRateLimiter(clock=clock)
    limit = RateLimit(2, 60)
    first = await limiter.hit("login", "ip:1", limit)
    assert (first.allowed, first.remaining, first.reset_at) == (True, 1, 1060)
    assert (await limiter.hit("login", "ip:1", limit)).remaining == 0
    third = await limiter.hit("login", "ip:1", limit)
    assert not third.allowed and third.retry_after == 60
    assert (await limiter.hit("login", "ip:2", limit)).allowed
    assert (await limiter.hit("register", "ip:1", limit)).allowed
    clock.now += 45
    assert (await limiter.hit("login", "ip:1", limit)).retry_after == 15
    clock.now += 15
    assert (await limiter.hit("login", "ip:1", limit)).allowed


@pytest.mark.parametrize(
    ("peer", "header", "trusted", "expected"),
    [
        ("1.2.3.4", "9.9.9.9", [], "1.2.3.4"),
        ("1.2.3.4", "9.9.9.9", ["10.0.0.0/8"], "1.2.3.4"),
        ("10.0.0.5", "9.9.9.9", ["10.0.0.0/8"], "9.9.9.9"),
        ("10.0.0.5", "6.6.6.6, 9.9.9.9", ["10.0.0.0/8"], "9.9.9.9"),
        ("10.0.0.5", "6.6.6.6, 9.9.9.9, 10.0.0.7", ["10.0.0.0/8"], "9.9.9.9"),
        ("10.0.0.5", "10.0.0.9, 10.0.0.7", ["10.0.0.0/8"], "10.0.0.9"),
        ("10.0.0.5", "junk, 9.9.9.9", ["10.0.0.0/8"], "9.9.9.9"),
        ("10.0.0.5", "9.9.9.9, junk", ["10.0.0.0/8"], "10.0.0.5"),
        ("10.0.0.5", "", ["10.0.0.0/8"], "10.0.0.5"),
        ("::ffff:10.0.0.5", "2001:db8::1", ["10.0.0.0/8"], "2001:db8::1"),
    ],
)
def test_client_ip(peer: str, header: str, trusted: list[str], expected: str) -> None:
    assert client_ip(peer, header, parse_networks(trusted)) == expected


async def test_every_v1_answer_carries_rate_headers(hub_node: RunningNode) -> None:
    for method, path in [
        ("GET", "/api/v1/users/me"),
        ("GET", "/api/v1/x"),
        ("PUT", "/api/v1/auth/login"),
    ]:
        response = await hub_node.client.request(method, path)
        assert response.headers["X-RateLimit-Limit"].isdigit(), (method, path)
        assert response.headers["X-RateLimit-Remaining"].isdigit()
        assert int(response.headers["X-RateLimit-Reset"]) > 1_700_000_000
    health = await hub_node.client.get("/health")
    assert "X-RateLimit-Limit" not in health.headers


async def test_login_limit_per_ip_and_429(hub_node: RunningNode) -> None:
    body = {"email": unique_email(), "password": "Wr0ng-password"}
    remaining = []
    for _ in range(3):
        response = await hub_node.client.post("/api/v1/auth/login", json=body)
        assert response.status_code == 401
        assert response.headers["X-RateLimit-Limit"] == "3"
        remaining.append(int(response.headers["X-RateLimit-Remaining"]))
    assert remaining == [2, 1, 0]
    limited = await hub_node.client.post("/api/v1/auth/login", json=body)
    assert limited.status_code == 429
    error = limited.json()["error"]
    assert error["code"] == "RATE_LIMIT_EXCEEDED"
    assert 1 <= error["retry_after"] <= 60
    assert limited.headers["Retry-After"] == str(error["retry_after"])
    assert limited.headers["X-RateLimit-Remaining"] == "0"
    # another group is not affected
    assert (await hub_node.register()).status_code == 201


async def test_spoofed_forwarded_for_is_not_believed(hub_node: RunningNode) -> None:
    statuses = []
    for i in range(4):
        response = await hub_node.client.post(
            "/api/v1/auth/login",
            json={"email": unique_email(), "password": "x"},
            headers={"X-Forwarded-For": f"203.0.113.{i}"},
        )
        statuses.append(response.status_code)
    assert statuses == [401, 401, 401, 429]


@pytest.mark.parametrize(
    "node_overrides", [{"rate_limit_login": "3/minute", "trusted_proxies": ["127.0.0.1/32"]}]
)
async def test_forwarded_for_is_believed_from_a_trusted_proxy(hub_node: RunningNode) -> None:
    hub_node.client.headers["X-Forwarded-For"] = "203.0.113.7"
    for _ in range(3):
        await hub_node.client.post("/api/v1/auth/login", json={"email": "a@x.io", "password": "x"})
    limited = await hub_node.client.post(
        "/api/v1/auth/login", json={"email": "a@x.io", "password": "x"}
    )
    assert limited.status_code == 429
    other_client = await hub_node.client.post(
        "/api/v1/auth/login",
        json={"email": "a@x.io", "password": "x"},
        headers={"X-Forwarded-For": "203.0.113.8"},
    )
    assert other_client.status_code == 401


async def test_public_limit_is_per_user(hub_node: RunningNode) -> None:
    alice = await hub_node.create_account()
    bob = await hub_node.create_account()
    for _ in range(4):
        assert (
            await hub_node.client.get("/api/v1/users/me", headers=alice.headers)
        ).status_code == 200
    assert (await hub_node.client.get("/api/v1/users/me", headers=alice.headers)).status_code == 429
    assert (await hub_node.client.get("/api/v1/users/me", headers=bob.headers)).status_code == 200
