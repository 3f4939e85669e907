"""The SSRF guard on a real node with ``WEBHOOK_ALLOW_PRIVATE=false`` (the default):
refused at registration (400 ``field:"url"``) and again at send time."""

from __future__ import annotations

import uuid

import pytest

from storage.base import DeliveryStatus
from tests.harness import RunningNode
from tests.webhooks.helpers import publish, wait_deliveries
from tests.webhooks.receiver import open_receiver


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8000/hook",
        "http://[::1]/hook",
        "http://0x7f000001/hook",
        "http://2130706433/hook",
        "http://169.254.169.254/latest/meta-data/",
        "http://localhost/hook",
        "http://10.0.0.5/hook",
        "http://100.64.1.1/hook",
        "http://[::ffff:127.0.0.1]/hook",
        "http://[fd00::1]/hook",
    ],
)
async def test_registration_refuses_private_targets(hub_node: RunningNode, url: str) -> None:
    admin = await hub_node.create_account(admin=True)
    response = await hub_node.client.post(
        "/api/v1/webhooks", json={"url": url, "events": ["*"]}, headers=admin.headers
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "VALIDATION_ERROR" and error["field"] == "url"
    assert error["message"].startswith("url: ")
    assert await hub_node.node.storage.list_webhooks() == []


async def test_send_time_check_refuses_a_url_that_turned_private(hub_node: RunningNode) -> None:
    """An endpoint whose address became private after registration (DNS rebinding),
    simulated by storing a loopback URL directly: no request reaches it."""
    admin = await hub_node.create_account(admin=True)
    async with open_receiver() as receiver:
        webhook_id = uuid.uuid4()
        box = hub_node.node.webhooks.secretbox
        await hub_node.node.storage.create_webhook(
            webhook_id=webhook_id,
            url=receiver.url_for("/hook"),
            events=["payment.succeeded"],
            description=None,
            secret_ciphertext=box.seal("whsec_x", associated=webhook_id.bytes),
        )
        hub_node.node.webhooks.subscriptions_changed()
        await publish(hub_node, admin, "payment.succeeded", {"n": 1})
        [delivery] = await wait_deliveries(hub_node, webhook_id, lambda ds: ds[0].attempts >= 1)
        await hub_node.node.storage.delete_webhook(webhook_id)
    assert delivery.status is DeliveryStatus.PENDING  # retried later (default base: 30 s)
    assert delivery.last_status_code is None
    assert delivery.last_error == "refused: 127.0.0.1 is a loopback address"
    assert receiver.received == []
