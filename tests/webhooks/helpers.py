"""Helpers of the webhook suites: register an endpoint, publish, wait for the log."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import trio

from storage.base import WebhookDelivery
from tests.harness import WAIT_S, Account, RunningNode
from tests.webhooks.receiver import Receiver

DeliveriesCheck = Callable[[list[WebhookDelivery]], bool]


async def register(
    node: RunningNode, admin: Account, receiver: Receiver, events: list[str]
) -> uuid.UUID:
    """Register an endpoint at a fresh path of ``receiver``; the receiver learns its
    secret (from the 201, the only time it is shown)."""
    path = f"/hooks/{uuid.uuid4().hex[:8]}"
    response = await node.client.post(
        "/api/v1/webhooks",
        json={"url": receiver.url_for(path), "events": events},
        headers=admin.headers,
    )
    assert response.status_code == 201, response.text
    data = response.json()["data"]
    receiver.secrets[path] = data["secret"]
    return uuid.UUID(data["id"])


async def publish(
    node: RunningNode, admin: Account, event: str | None, data: dict[str, Any], **extra: Any
) -> str:
    """``POST /notifications`` on ``global``; returns the message id."""
    body: dict[str, Any] = {"channel": "global", "data": data, **extra}
    if event is not None:
        body["event"] = event
    response = await node.client.post("/api/v1/notifications", json=body, headers=admin.headers)
    assert response.status_code == 202, response.text
    return str(response.json()["data"]["id"])


async def wait_deliveries(
    node: RunningNode, webhook_id: uuid.UUID, check: DeliveriesCheck
) -> list[WebhookDelivery]:
    """The endpoint's delivery log (newest first) once ``check`` holds for it; re-read
    after each outcome the dispatcher records."""
    dispatcher = node.node.webhooks
    with trio.fail_after(WAIT_S):
        while True:
            seen = dispatcher.statistics().recorded
            deliveries, _ = await node.node.storage.list_webhook_deliveries(webhook_id, limit=100)
            if check(deliveries):
                return deliveries
            await dispatcher.wait_until(lambda stats, seen=seen: stats.recorded > seen)
