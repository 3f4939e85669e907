"""``/api/v1/auth`` over real HTTP on both storage backends: every route's success and
error paths, refresh rotation and reuse, and the bad inputs of reliability.md §3."""

from __future__ import annotations

import time
from typing import Any

import pytest
import trio

from tests.harness import PASSWORD, RunningNode, bearer, unique_email


def error_of(response: Any) -> dict[str, Any]:
    body = response.json()
    assert body["status"] == "error", body
    assert body["meta"]["request_id"] == response.headers["X-Request-ID"]
    return body["error"]


# -- register -----------------------------------------------------------------------------
async def test_register_creates_unverified_user_and_sends_verification(
    hub_node: RunningNode,
) -> None:
    email = unique_email()
    response = await hub_node.register(email, full_name="Ada Lovelace")
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["status"] == "success"
    data = body["data"]
    assert set(data) == {"user_id", "email", "full_name", "is_verified", "created_at"}
    assert data["email"] == email
    assert data["full_name"] == "Ada Lovelace"
    assert data["is_verified"] is False
    assert body["meta"]["request_id"] == response.headers["X-Request-ID"]
    for header in ("X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset"):
        assert header in response.headers

    await hub_node.wait_emails_sent(1)
    (message,) = hub_node.outbox_messages(email)
    text = message.get_payload(decode=True).decode()
    assert "http://hub.test/api/v1/auth/verify-email?token=" in text
    assert "Ada Lovelace" in text


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"email": "not-an-email"}, "email"),
        ({"email": "' OR 1=1--"}, "email"),
        ({"email": "a@b.c\x00"}, None),
        ({"password": "Sh0rt"}, "password"),  # 5 chars
        ({"password": "Abcdef1"}, "password"),  # 7 chars
        ({"password": "alllower1"}, "password"),
        ({"password": "ALLUPPER1"}, "password"),
        ({"password": "NoDigitsHere"}, "password"),
        ({"password": "é" * 40 + "Aa1"}, "password"),  # 83 bytes
        ({"password": 12345678}, "password"),
        ({"terms_accepted": False}, "terms_accepted"),
        ({"terms_accepted": "true"}, "terms_accepted"),
        ({"full_name": ""}, "full_name"),
        ({"full_name": "   "}, "full_name"),
        ({"full_name": "x" * 10_000}, "full_name"),
        ({"full_name": "Robert\x00Tables"}, None),
        ({"is_admin": True}, "is_admin"),
    ],
)
async def test_register_rejects_bad_input_with_400(
    hub_node: RunningNode, fields: dict[str, Any], field: str | None
) -> None:
    response = await hub_node.register(**fields)
    assert response.status_code == 400, response.text
    error = error_of(response)
    assert error["code"] == "VALIDATION_ERROR"
    if field is not None:
        assert error["field"] == field
    assert "Traceback" not in response.text


async def test_register_missing_fields_is_400(hub_node: RunningNode) -> None:
    response = await hub_node.client.post("/api/v1/auth/register", json={"email": unique_email()})
    assert response.status_code == 400
    error = error_of(response)
    assert {d["field"] for d in error["details"]} == {"password", "full_name", "terms_accepted"}


async def test_register_password_of_exactly_72_bytes_is_accepted(hub_node: RunningNode) -> None:
    password = "Aa1" + "x" * 69
    assert len(password.encode()) == 72
    email = unique_email()
    assert (await hub_node.register(email, password=password)).status_code == 201


async def test_register_stores_sql_injection_names_verbatim(hub_node: RunningNode) -> None:
    for name in ("'; DROP TABLE users;--", "' OR 1=1--", "Robert'); DELETE FROM users; --"):
        response = await hub_node.register(full_name=name)
        assert response.status_code == 201, response.text
        assert response.json()["data"]["full_name"] == name
        user = await hub_node.node.storage.get_user_by_email(response.json()["data"]["email"])
        assert user is not None and user.full_name == name
    # the table is intact
    assert (await hub_node.register()).status_code == 201


async def test_register_duplicate_email_is_409_case_insensitive(hub_node: RunningNode) -> None:
    email = unique_email()
    assert (await hub_node.register(email)).status_code == 201
    response = await hub_node.register(email.upper())
    assert response.status_code == 409
    error = error_of(response)
    assert error["code"] == "CONFLICT"
    assert error["field"] == "email"


# -- verify-email / resend ----------------------------------------------------------------
async def test_verify_email_by_post_then_login(hub_node: RunningNode) -> None:
    email = unique_email()
    await hub_node.register(email)
    login = {"email": email, "password": PASSWORD}
    refused = await hub_node.client.post("/api/v1/auth/login", json=login)
    assert refused.status_code == 403
    assert error_of(refused)["code"] == "FORBIDDEN"

    await hub_node.wait_emails_sent(1)
    token = hub_node.verification_token(email)
    response = await hub_node.client.post("/api/v1/auth/verify-email", json={"token": token})
    assert response.status_code == 200, response.text
    assert (await hub_node.client.post("/api/v1/auth/login", json=login)).status_code == 200

    again = await hub_node.client.post("/api/v1/auth/verify-email", json={"token": token})
    assert again.status_code == 400
    assert error_of(again)["field"] == "token"


async def test_verify_email_by_link(hub_node: RunningNode) -> None:
    email = unique_email()
    await hub_node.register(email)
    await hub_node.wait_emails_sent(1)
    token = hub_node.verification_token(email)
    response = await hub_node.client.get("/api/v1/auth/verify-email", params={"token": token})
    assert response.status_code == 200, response.text
    assert response.json()["data"]["is_verified"] is True
    user = await hub_node.node.storage.get_user_by_email(email)
    assert user is not None and user.is_verified


@pytest.mark.parametrize("body", [{"token": "garbage"}, {"token": ""}, {}, {"token": 5}])
async def test_verify_email_bad_token_is_400(hub_node: RunningNode, body: dict[str, Any]) -> None:
    response = await hub_node.client.post("/api/v1/auth/verify-email", json=body)
    assert response.status_code == 400
    assert error_of(response)["field"] == "token"


async def test_resend_verification_is_202_whether_or_not_the_account_exists(
    hub_node: RunningNode,
) -> None:
    email = unique_email()
    await hub_node.register(email)
    unknown = await hub_node.client.post(
        "/api/v1/auth/resend-verification", json={"email": unique_email()}
    )
    known = await hub_node.client.post("/api/v1/auth/resend-verification", json={"email": email})
    assert unknown.status_code == known.status_code == 202
    assert unknown.json()["message"] == known.json()["message"]
    await hub_node.wait_emails_sent(2)
    assert len(hub_node.outbox_messages(email)) == 2
    # the newest link works
    token = hub_node.verification_token(email)
    ok = await hub_node.client.post("/api/v1/auth/verify-email", json={"token": token})
    assert ok.status_code == 200


async def test_resend_verification_validates_its_body(hub_node: RunningNode) -> None:
    response = await hub_node.client.post("/api/v1/auth/resend-verification", json={"e": 1})
    assert response.status_code == 400


# -- login --------------------------------------------------------------------------------
async def test_login_returns_a_token_pair(hub_node: RunningNode) -> None:
    account = await hub_node.create_account(login=False)
    response = await hub_node.login(account)
    data = response.json()["data"]
    assert set(data) == {"access_token", "refresh_token", "token_type", "expires_in"}
    assert data["token_type"] == "Bearer"
    assert data["expires_in"] == 3600
    claims = hub_node.node.services.authenticate(data["access_token"])
    assert claims.user_id == account.user_id
    assert claims.role == "user"


async def test_login_unknown_email_and_wrong_password_get_the_same_401(
    hub_node: RunningNode,
) -> None:
    account = await hub_node.create_account(login=False)
    wrong = await hub_node.client.post(
        "/api/v1/auth/login", json={"email": account.email, "password": "Wr0ng-password"}
    )
    unknown = await hub_node.client.post(
        "/api/v1/auth/login", json={"email": unique_email(), "password": "Wr0ng-password"}
    )
    malformed = await hub_node.client.post(
        "/api/v1/auth/login", json={"email": "' OR 1=1--", "password": "x"}
    )
    assert wrong.status_code == unknown.status_code == malformed.status_code == 401
    assert error_of(wrong) == error_of(unknown) == error_of(malformed)


@pytest.mark.parametrize("password", ["é" * 40, "A1a" + "x" * 5000, "Pass\x00word1"])
async def test_login_with_impossible_password_is_401_not_500(
    hub_node: RunningNode, password: str
) -> None:
    account = await hub_node.create_account(login=False)
    response = await hub_node.client.post(
        "/api/v1/auth/login", json={"email": account.email, "password": password}
    )
    if "\x00" in password:
        assert response.status_code == 400  # NUL is refused for every string field
    else:
        assert response.status_code == 401


async def test_login_unverified_is_403_after_the_password_check(hub_node: RunningNode) -> None:
    account = await hub_node.create_account(verified=False, login=False)
    wrong = await hub_node.client.post(
        "/api/v1/auth/login", json={"email": account.email, "password": "Wr0ng-password"}
    )
    assert wrong.status_code == 401  # no hint that the account exists
    right = await hub_node.client.post(
        "/api/v1/auth/login", json={"email": account.email, "password": account.password}
    )
    assert right.status_code == 403


async def test_login_inactive_is_403(hub_node: RunningNode) -> None:
    account = await hub_node.create_account(login=False)
    await hub_node.node.storage.update_user(account.user.id, is_active=False)
    response = await hub_node.client.post(
        "/api/v1/auth/login", json={"email": account.email, "password": account.password}
    )
    assert response.status_code == 403


@pytest.mark.parametrize("body", [{}, {"email": "a@example.com"}, {"email": 1, "password": 2}])
async def test_login_bad_body_is_400(hub_node: RunningNode, body: dict[str, Any]) -> None:
    response = await hub_node.client.post("/api/v1/auth/login", json=body)
    assert response.status_code == 400


# -- refresh ------------------------------------------------------------------------------
async def refresh(node: RunningNode, token: str) -> Any:
    return await node.client.post("/api/v1/auth/refresh", json={"refresh_token": token})


async def test_refresh_rotates_and_reuse_revokes_the_family(hub_node: RunningNode) -> None:
    account = await hub_node.create_account()
    r1, a1 = account.refresh_token, account.access_token

    first = await refresh(hub_node, r1)
    assert first.status_code == 200, first.text
    r2, a2 = first.json()["data"]["refresh_token"], first.json()["data"]["access_token"]
    assert r2 != r1
    assert (await hub_node.client.get("/api/v1/users/me", headers=bearer(a2))).status_code == 200

    reuse = await refresh(hub_node, r1)
    assert reuse.status_code == 401
    assert error_of(reuse)["code"] == "UNAUTHORIZED"
    # the whole family is dead: the new refresh token and every access token
    assert (await refresh(hub_node, r2)).status_code == 401
    for access in (a1, a2):
        me = await hub_node.client.get("/api/v1/users/me", headers=bearer(access))
        assert me.status_code == 401
    # a new login still works
    await hub_node.login(account)


async def test_two_parallel_refreshes_of_one_token_exactly_one_wins(
    hub_node: RunningNode,
) -> None:
    account = await hub_node.create_account()
    statuses: list[int] = []

    async def one() -> None:
        statuses.append((await refresh(hub_node, account.refresh_token)).status_code)

    async with trio.open_nursery() as nursery:
        for _ in range(2):
            nursery.start_soon(one)
    assert sorted(statuses) == [200, 401]


async def test_access_and_refresh_tokens_are_not_interchangeable(hub_node: RunningNode) -> None:
    account = await hub_node.create_account()
    as_refresh = await refresh(hub_node, account.access_token)
    assert as_refresh.status_code == 401
    as_access = await hub_node.client.get("/api/v1/users/me", headers=bearer(account.refresh_token))
    assert as_access.status_code == 401


@pytest.mark.parametrize("token", ["garbage", "a.b.c", "x" * 5000])
async def test_refresh_with_garbage_is_401(hub_node: RunningNode, token: str) -> None:
    response = await refresh(hub_node, token)
    assert response.status_code in (400, 401)
    assert response.status_code == (400 if len(token) > 4096 else 401)


async def test_refresh_after_account_deleted_is_401(hub_node: RunningNode) -> None:
    account = await hub_node.create_account()
    deleted = await hub_node.client.delete("/api/v1/users/me", headers=account.headers)
    assert deleted.status_code == 200
    assert (await refresh(hub_node, account.refresh_token)).status_code == 401


# -- logout -------------------------------------------------------------------------------
async def test_logout_ends_the_session_at_once(hub_node: RunningNode) -> None:
    account = await hub_node.create_account()
    other = await hub_node.create_account(email=None)
    response = await hub_node.client.post("/api/v1/auth/logout", headers=account.headers)
    assert response.status_code == 200, response.text
    me = await hub_node.client.get("/api/v1/users/me", headers=account.headers)
    assert me.status_code == 401
    assert error_of(me)["message"] == "Token has been revoked"
    assert (await refresh(hub_node, account.refresh_token)).status_code == 401
    # another session is untouched
    assert (await hub_node.client.get("/api/v1/users/me", headers=other.headers)).status_code == 200
    # a second logout with the dead token is a 401
    again = await hub_node.client.post("/api/v1/auth/logout", headers=account.headers)
    assert again.status_code == 401


async def test_logout_of_one_session_leaves_the_users_other_sessions(
    hub_node: RunningNode,
) -> None:
    account = await hub_node.create_account()
    first_access = account.access_token
    await hub_node.login(account)  # a second session
    await hub_node.client.post("/api/v1/auth/logout", headers=bearer(first_access))
    assert (
        await hub_node.client.get("/api/v1/users/me", headers=account.headers)
    ).status_code == 200


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer"},
        {"Authorization": "Basic abc"},
        {"Authorization": "Bearer x"},
    ],
)
async def test_logout_without_a_valid_token_is_401(
    hub_node: RunningNode, headers: dict[str, str]
) -> None:
    response = await hub_node.client.post("/api/v1/auth/logout", headers=headers)
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == "Bearer"


async def test_revocation_beats_the_verified_token_cache(hub_node: RunningNode) -> None:
    """Claims are verified once per token and kept, but revocation is checked on every
    request: logout (one session) and account deletion (the user) refuse at once."""
    tokens = hub_node.node.services.tokens
    logout_account = await hub_node.create_account()
    delete_account = await hub_node.create_account()
    for account in (logout_account, delete_account):
        me = await hub_node.client.get("/api/v1/users/me", headers=account.headers)
        assert me.status_code == 200
        assert tokens.verified.get(account.access_token, time.time()) is not None

    await hub_node.client.post("/api/v1/auth/logout", headers=logout_account.headers)
    me = await hub_node.client.get("/api/v1/users/me", headers=logout_account.headers)
    assert me.status_code == 401
    assert error_of(me)["message"] == "Token has been revoked"

    await hub_node.client.delete("/api/v1/users/me", headers=delete_account.headers)
    me = await hub_node.client.get("/api/v1/users/me", headers=delete_account.headers)
    assert me.status_code == 401
    assert error_of(me)["message"] == "Token has been revoked"
