"""``POST /api/v1/notifications`` (SPEC §2): who may publish, what is accepted, and what
subscribers then get."""

from __future__ import annotations

from typing import Any

import pytest

from tests.harness import Account, RunningNode
from tests.realtime.conftest import connect, publish


async def post(running: RunningNode, account: Account | None, body: Any) -> Any:
    headers = account.headers if account is not None else {}
    return await running.client.post("/api/v1/notifications", json=body, headers=headers)


async def test_publish_reaches_subscribers_with_id_and_timestamp(
    hub_node: RunningNode, admin: Account, user: Account
) -> None:
    own = f"user.{user.user_id}"
    async with connect(hub_node, user.access_token) as client:
        await client.subscribe("global", own)
        response = await post(
            hub_node,
            admin,
            {"channels": ["global", own], "data": {"title": "T", "body": "B"}, "event": "promo"},
        )
        assert response.status_code == 202
        assert response.headers["X-RateLimit-Limit"]
        answer = response.json()["data"]
        assert set(answer["offsets"]) == {"global", own}
        frames = [await client.recv(), await client.recv()]
    by_channel = {f["channel"]: f for f in frames}
    for channel in ("global", own):
        frame = by_channel[channel]
        assert frame["type"] == "notification"
        assert frame["offset"] == answer["offsets"][channel]
        assert frame["event"] == "promo"
        assert frame["data"]["title"] == "T" and frame["data"]["body"] == "B"
        assert frame["data"]["id"] == answer["id"]
        assert frame["data"]["timestamp"].endswith("Z")


async def test_given_id_and_timestamp_are_kept_and_repeats_deliver_once(
    hub_node: RunningNode, admin: Account, user: Account
) -> None:
    body = {
        "channel": "public.once",
        "id": "msg-1",
        "data": {"id": "own-id", "timestamp": "2020-01-01T00:00:00Z"},
    }
    async with connect(hub_node, user.access_token) as client:
        await client.subscribe("public.once")
        first = await publish(hub_node, admin, **body)
        again = await publish(hub_node, admin, **body)
        assert first == again == {"id": "msg-1", "offsets": first["offsets"]}
        frame = await client.recv()
        assert frame["data"] == {"id": "own-id", "timestamp": "2020-01-01T00:00:00Z"}
        assert await client.request({"type": "ping"}, "pong") == {"type": "pong"}  # once only


async def test_only_admins_publish(hub_node: RunningNode, user: Account) -> None:
    body = {"channel": "global", "data": {}}
    assert (await post(hub_node, None, body)).status_code == 401
    response = await post(hub_node, user, body)
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "FORBIDDEN"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"data": {}}, None),
        ({"channel": "global", "channels": ["global"], "data": {}}, None),
        ({"channel": "nope", "data": {}}, "channel"),
        ({"channel": "public.bad name", "data": {}}, "channel"),
        ({"channels": [], "data": {}}, "channels"),
        ({"channels": ["global", "x"], "data": {}}, "channels.1"),
        ({"channels": [f"public.{i}" for i in range(101)], "data": {}}, "channels"),
        ({"channel": "global"}, "data"),
        ({"channel": "global", "data": []}, "data"),
        ({"channel": "global", "data": {}, "extra": 1}, "extra"),
        ({"channel": "global", "data": {}, "id": ""}, "id"),
        ({"channel": "global", "data": {}, "event": 5}, "event"),
    ],
)
async def test_bad_bodies_are_400(
    hub_node: RunningNode, admin: Account, body: dict[str, Any], field: str | None
) -> None:
    response = await post(hub_node, admin, body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "VALIDATION_ERROR"
    if field is not None:
        assert error["field"] == field


async def test_route_is_in_openapi(hub_node: RunningNode) -> None:
    document = (await hub_node.client.get("/openapi.json")).json()
    operation = document["paths"]["/api/v1/notifications"]["post"]
    assert "202" in operation["responses"]
