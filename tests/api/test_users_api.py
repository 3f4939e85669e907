"""``/api/v1/users`` over real HTTP on both storage backends."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from tests.harness import RunningNode, bearer, unique_email


def error_of(response: Any) -> dict[str, Any]:
    body = response.json()
    assert body["status"] == "error", body
    return body["error"]


async def test_get_me(hub_node: RunningNode) -> None:
    account = await hub_node.create_account(full_name="Grace Hopper")
    response = await hub_node.client.get("/api/v1/users/me", headers=account.headers)
    assert response.status_code == 200
    data = response.json()["data"]
    assert set(data) == {
        "user_id",
        "email",
        "full_name",
        "avatar_url",
        "is_verified",
        "is_active",
        "created_at",
        "updated_at",
    }
    assert data["user_id"] == account.user_id
    assert data["email"] == account.email
    assert data["full_name"] == "Grace Hopper"
    assert data["avatar_url"] is None
    assert data["is_verified"] is True and data["is_active"] is True


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer not.a.token"},
        {"Authorization": "Token abc"},
        {"Authorization": "Bearer eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0."},
    ],
)
async def test_get_me_without_valid_token_is_401(
    hub_node: RunningNode, headers: dict[str, str]
) -> None:
    response = await hub_node.client.get("/api/v1/users/me", headers=headers)
    assert response.status_code == 401
    assert error_of(response)["code"] == "UNAUTHORIZED"


async def test_update_me(hub_node: RunningNode) -> None:
    account = await hub_node.create_account()
    response = await hub_node.client.put(
        "/api/v1/users/me",
        headers=account.headers,
        json={"full_name": "  New Name  ", "avatar_url": "https://img.example.com/a.png"},
    )
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    assert data["full_name"] == "New Name"
    assert data["avatar_url"] == "https://img.example.com/a.png"
    assert data["updated_at"] >= data["created_at"]

    only_name = await hub_node.client.put(
        "/api/v1/users/me", headers=account.headers, json={"full_name": "Other"}
    )
    assert only_name.json()["data"]["avatar_url"] == "https://img.example.com/a.png"

    cleared = await hub_node.client.put(
        "/api/v1/users/me", headers=account.headers, json={"avatar_url": None}
    )
    assert cleared.status_code == 200
    assert cleared.json()["data"]["avatar_url"] is None
    me = await hub_node.client.get("/api/v1/users/me", headers=account.headers)
    assert me.json()["data"]["full_name"] == "Other"
    assert me.json()["data"]["avatar_url"] is None


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"email": "x@example.com"}, "email"),
        ({"is_verified": True}, "is_verified"),
        ({"role": "admin"}, "role"),
        ({"full_name": ""}, "full_name"),
        ({"full_name": None}, "full_name"),
        ({"full_name": "x" * 256}, "full_name"),
        ({"full_name": "x" * 10_000}, "full_name"),
        ({"full_name": "nul\x00"}, None),
        ({"full_name": 5}, "full_name"),
        ({"avatar_url": "javascript:alert(1)"}, "avatar_url"),
        ({"avatar_url": "ftp://example.com/a.png"}, "avatar_url"),
        ({"avatar_url": "https://example.com/" + "a" * 500}, "avatar_url"),
        ({"avatar_url": "https://exa mple.com/"}, "avatar_url"),
    ],
)
async def test_update_me_rejects_bad_fields(
    hub_node: RunningNode, body: dict[str, Any], field: str | None
) -> None:
    account = await hub_node.create_account()
    response = await hub_node.client.put("/api/v1/users/me", headers=account.headers, json=body)
    assert response.status_code == 400, response.text
    error = error_of(response)
    assert error["code"] == "VALIDATION_ERROR"
    if field is not None:
        assert error["field"] == field


async def test_update_me_stores_sql_injection_verbatim(hub_node: RunningNode) -> None:
    account = await hub_node.create_account()
    name = "'; DROP TABLE users;--"
    response = await hub_node.client.put(
        "/api/v1/users/me", headers=account.headers, json={"full_name": name}
    )
    assert response.json()["data"]["full_name"] == name
    me = await hub_node.client.get("/api/v1/users/me", headers=account.headers)
    assert me.json()["data"]["full_name"] == name


async def test_update_me_requires_a_token(hub_node: RunningNode) -> None:
    response = await hub_node.client.put("/api/v1/users/me", json={"full_name": "x"})
    assert response.status_code == 401
    # the token is checked before the body: no hint about the body's rules
    invalid = await hub_node.client.put("/api/v1/users/me", json={"email": 5})
    assert invalid.status_code == 401
    admin_only = await hub_node.client.get("/api/v1/users", params={"limit": "abc"})
    assert admin_only.status_code == 401


async def test_delete_me_soft_deletes_and_kills_every_session(hub_node: RunningNode) -> None:
    account = await hub_node.create_account()
    first = account.access_token
    await hub_node.login(account)  # a second session
    response = await hub_node.client.delete("/api/v1/users/me", headers=account.headers)
    assert response.status_code == 200
    assert response.json()["message"] == "Account deleted successfully"

    for token in (first, account.access_token):
        me = await hub_node.client.get("/api/v1/users/me", headers=bearer(token))
        assert me.status_code == 401
    login = await hub_node.client.post(
        "/api/v1/auth/login", json={"email": account.email, "password": account.password}
    )
    assert login.status_code == 401
    stored = await hub_node.node.storage.get_user(account.user.id, include_deleted=True)
    assert stored is not None and stored.deleted_at is not None

    # the address is free again
    again = await hub_node.register(account.email)
    assert again.status_code == 201
    assert again.json()["data"]["user_id"] != account.user_id


async def test_delete_me_twice_is_401(hub_node: RunningNode) -> None:
    account = await hub_node.create_account()
    assert (
        await hub_node.client.delete("/api/v1/users/me", headers=account.headers)
    ).status_code == 200
    assert (
        await hub_node.client.delete("/api/v1/users/me", headers=account.headers)
    ).status_code == 401


# -- admin listing ------------------------------------------------------------------------
async def test_list_users_needs_an_admin(hub_node: RunningNode) -> None:
    user = await hub_node.create_account()
    assert (await hub_node.client.get("/api/v1/users")).status_code == 401
    forbidden = await hub_node.client.get("/api/v1/users", headers=user.headers)
    assert forbidden.status_code == 403
    assert error_of(forbidden)["code"] == "FORBIDDEN"


async def test_list_users_pages_filters_and_sorts(hub_node: RunningNode) -> None:
    admin = await hub_node.create_account(admin=True)
    tag = unique_email("tag").split("@")[0]
    emails = [f"{tag}-{i}@example.com" for i in range(5)]
    created = [
        await hub_node.create_account(email=email, full_name=f"Name {4 - i}", login=False)
        for i, email in enumerate(emails)
    ]
    await hub_node.node.storage.update_user(created[0].user.id, is_active=False)

    page1 = await hub_node.client.get(
        "/api/v1/users",
        headers=admin.headers,
        params={"search": tag, "limit": 2, "page": 1, "sort": "email", "order": "asc"},
    )
    assert page1.status_code == 200, page1.text
    body = page1.json()
    assert [u["email"] for u in body["data"]] == emails[:2]
    assert body["pagination"] == {
        "page": 1,
        "limit": 2,
        "total_items": 5,
        "total_pages": 3,
        "has_next": True,
        "has_prev": False,
    }
    assert set(body["data"][0]) >= {"user_id", "email", "full_name", "is_active", "role"}
    assert "password_hash" not in page1.text

    page3 = await hub_node.client.get(
        "/api/v1/users",
        headers=admin.headers,
        params={"search": tag, "limit": 2, "page": 3, "sort": "email", "order": "asc"},
    )
    assert [u["email"] for u in page3.json()["data"]] == emails[4:]
    assert page3.json()["pagination"]["has_next"] is False
    assert page3.json()["pagination"]["has_prev"] is True

    by_name = await hub_node.client.get(
        "/api/v1/users",
        headers=admin.headers,
        params={"search": tag, "sort": "full_name", "order": "desc"},
    )
    names = [u["full_name"] for u in by_name.json()["data"]]
    assert names == sorted(names, reverse=True)

    active = await hub_node.client.get(
        "/api/v1/users", headers=admin.headers, params={"search": tag, "is_active": "false"}
    )
    assert [u["email"] for u in active.json()["data"]] == [emails[0]]

    future = datetime(2100, 1, 1, tzinfo=UTC).isoformat()
    none = await hub_node.client.get(
        "/api/v1/users", headers=admin.headers, params={"search": tag, "created_after": future}
    )
    assert none.json()["data"] == []
    assert none.json()["pagination"]["total_items"] == 0


async def test_list_users_search_is_literal(hub_node: RunningNode) -> None:
    admin = await hub_node.create_account(admin=True)
    for search in ("%", "_", "' OR 1=1--", "\\"):
        response = await hub_node.client.get(
            "/api/v1/users", headers=admin.headers, params={"search": search}
        )
        assert response.status_code == 200
        for user in response.json()["data"]:
            assert search.lower() in (user["email"] + user["full_name"]).lower()


@pytest.mark.parametrize(
    "params",
    [
        {"limit": "0"},
        {"limit": "-1"},
        {"limit": str(10**9)},
        {"limit": "abc"},
        {"limit": "101"},
        {"page": "0"},
        {"page": "-1"},
        {"page": "abc"},
        {"page": str(10**30)},
        {"sort": "password_hash"},
        {"sort": "email; DROP TABLE users"},
        {"order": "sideways"},
        {"is_active": "maybe"},
        {"created_after": "yesterday"},
        {"search": "x" * 300},
        {"search": "nul\x00"},
    ],
)
async def test_list_users_bad_query_is_400(hub_node: RunningNode, params: dict[str, str]) -> None:
    admin = await hub_node.create_account(admin=True)
    response = await hub_node.client.get("/api/v1/users", headers=admin.headers, params=params)
    assert response.status_code == 400, response.text
    assert error_of(response)["field"] == next(iter(params))
