"""``/api/v1/webhooks`` over real HTTP on both storage backends.

``WEBHOOK_ALLOW_PRIVATE=true`` here, so endpoints on 127.0.0.1 may be registered; the
refusals with the guard on are in ``test_ssrf_node.py``. No event is ever delivered in
this module (the endpoints subscribe to events nobody emits, and nothing listens on
their ports).
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from tests.harness import Account, RunningNode

PATH = "/api/v1/webhooks"
URL = "http://127.0.0.1:9/hooks/in"


@pytest.fixture
def node_overrides() -> dict[str, Any]:
    return {"webhook_allow_private": True}


def error_of(response: Any) -> dict[str, Any]:
    body = response.json()
    assert body["status"] == "error", body
    return dict(body["error"])


async def create(node: RunningNode, admin: Account, **fields: Any) -> tuple[int, dict[str, Any]]:
    body = {"url": URL, "events": ["never.emitted"], **fields}
    response = await node.client.post(PATH, json=body, headers=admin.headers)
    return response.status_code, response.json()


async def test_create_shows_the_secret_once(hub_node: RunningNode) -> None:
    admin = await hub_node.create_account(admin=True)
    status, body = await create(
        hub_node,
        admin,
        events=["never.emitted", "other.event", "never.emitted"],
        description="billing",
    )
    assert status == 201, body
    data = body["data"]
    assert set(data) == {"id", "url", "events", "description", "created_at", "updated_at", "secret"}
    assert data["url"] == URL
    assert data["events"] == ["never.emitted", "other.event"]  # duplicates dropped
    assert data["description"] == "billing"
    secret = data["secret"]
    assert secret.startswith("whsec_") and len(secret) >= 40
    assert "secret" in body["message"]

    shown = await hub_node.client.get(f"{PATH}/{data['id']}", headers=admin.headers)
    assert shown.status_code == 200
    assert "secret" not in shown.json()["data"]
    assert shown.json()["data"] == {k: v for k, v in data.items() if k != "secret"}
    listed = await hub_node.client.get(PATH, headers=admin.headers)
    assert data["id"] in [w["id"] for w in listed.json()["data"]]  # the schema is per module
    assert secret not in listed.text and secret not in shown.text

    # at rest: sealed, never the secret itself, and it opens to the secret
    stored = await hub_node.node.storage.get_webhook(uuid.UUID(data["id"]))
    assert secret not in stored.secret_ciphertext
    box = hub_node.node.webhooks.secretbox
    assert box.open(stored.secret_ciphertext, associated=stored.id.bytes) == secret


async def test_delete_is_a_hard_delete(hub_node: RunningNode) -> None:
    admin = await hub_node.create_account(admin=True)
    _, body = await create(hub_node, admin)
    webhook_id = body["data"]["id"]
    response = await hub_node.client.delete(f"{PATH}/{webhook_id}", headers=admin.headers)
    assert response.status_code == 200
    assert response.json()["message"] == "Webhook deleted"
    for method, path in (
        ("GET", f"{PATH}/{webhook_id}"),
        ("DELETE", f"{PATH}/{webhook_id}"),
        ("GET", f"{PATH}/{webhook_id}/deliveries"),
        ("GET", f"{PATH}/not-a-uuid"),
        ("GET", f"{PATH}/{uuid.uuid4()}/deliveries"),
    ):
        gone = await hub_node.client.request(method, path, headers=admin.headers)
        assert gone.status_code == 404, (method, path)
        assert error_of(gone)["code"] == "NOT_FOUND"
    assert await hub_node.node.storage.get_webhook(uuid.UUID(webhook_id)) is None


async def test_deliveries_page_shape(hub_node: RunningNode) -> None:
    admin = await hub_node.create_account(admin=True)
    _, body = await create(hub_node, admin)
    webhook_id = body["data"]["id"]
    response = await hub_node.client.get(
        f"{PATH}/{webhook_id}/deliveries", params={"page": 1, "limit": 5}, headers=admin.headers
    )
    assert response.status_code == 200
    payload = response.json()
    assert payload["data"] == []
    assert payload["pagination"] == {
        "page": 1,
        "limit": 5,
        "total_items": 0,
        "total_pages": 0,
        "has_next": False,
        "has_prev": False,
    }
    for params in ({"limit": 101}, {"limit": 0}, {"page": 0}, {"status": "lost"}):
        bad = await hub_node.client.get(
            f"{PATH}/{webhook_id}/deliveries", params=params, headers=admin.headers
        )
        assert bad.status_code == 400, params
        assert error_of(bad)["field"] == next(iter(params))


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"events": []}, "events"),
        ({"events": ["bad event"]}, "events.0"),
        ({"events": ["x" * 129]}, "events.0"),
        ({"events": "user.created"}, "events"),
        ({"url": ""}, "url"),
        ({"url": "ftp://127.0.0.1/"}, "url"),
        ({"url": "http://user:pw@127.0.0.1/"}, "url"),
        ({"description": "d" * 256}, "description"),
        ({"secret": "mine"}, "secret"),
    ],
)
async def test_validation(hub_node: RunningNode, fields: dict[str, Any], field: str) -> None:
    admin = await hub_node.create_account(admin=True)
    status, body = await create(hub_node, admin, **fields)
    assert status == 400, body
    assert body["error"]["code"] == "VALIDATION_ERROR"
    assert body["error"]["field"] == field


async def test_admin_only(hub_node: RunningNode) -> None:
    user = await hub_node.create_account()
    before = len(await hub_node.node.storage.list_webhooks())
    webhook_id = uuid.uuid4()
    routes = [
        ("POST", PATH),
        ("GET", PATH),
        ("GET", f"{PATH}/{webhook_id}"),
        ("DELETE", f"{PATH}/{webhook_id}"),
        ("GET", f"{PATH}/{webhook_id}/deliveries"),
    ]
    for method, path in routes:
        json_body = {"url": URL, "events": ["e"]} if method == "POST" else None
        anonymous = await hub_node.client.request(method, path, json=json_body)
        assert anonymous.status_code == 401, (method, path)
        forbidden = await hub_node.client.request(
            method, path, json=json_body, headers=user.headers
        )
        assert forbidden.status_code == 403, (method, path)
        assert "X-RateLimit-Limit" in forbidden.headers
    assert len(await hub_node.node.storage.list_webhooks()) == before


async def test_openapi_documents_the_webhook_routes(hub_node: RunningNode) -> None:
    document = (await hub_node.client.get("/openapi.json")).json()
    paths = document["paths"]
    listed = {(path, method) for path, ops in paths.items() for method in ops}
    assert {
        ("/api/v1/webhooks", "post"),
        ("/api/v1/webhooks", "get"),
        ("/api/v1/webhooks/{webhook_id}", "get"),
        ("/api/v1/webhooks/{webhook_id}", "delete"),
        ("/api/v1/webhooks/{webhook_id}/deliveries", "get"),
    } <= listed
    schemas = document["components"]["schemas"]
    assert set(schemas["WebhookIn"]["required"]) == {"url", "events"}
    assert "secret" in schemas["WebhookCreatedOut"]["properties"]
    assert "secret" not in schemas["WebhookOut"]["properties"]
    deliveries = paths["/api/v1/webhooks/{webhook_id}/deliveries"]["get"]
    assert {"page", "limit", "status"} <= {p["name"] for p in deliveries["parameters"]}
    assert "201" in paths["/api/v1/webhooks"]["post"]["responses"]
