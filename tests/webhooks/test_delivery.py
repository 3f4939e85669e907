"""Webhook delivery end to end: a real node POSTs to a real receiver on 127.0.0.1.

The receiver checks every signature with the snippet from the docs. Retries are fast
here (``WEBHOOK_RETRY_BASE_S=0.05``: 0.05, 0.1, 0.2, 0.4 s).
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
import trio

from actors.webhook_dispatcher import MAX_ATTEMPTS, MAX_IN_FLIGHT_PER_ENDPOINT
from storage.base import DeliveryStatus, WebhookDelivery
from tests.harness import WAIT_S, RunningNode
from tests.webhooks.helpers import publish, register, wait_deliveries
from tests.webhooks.receiver import open_receiver


@pytest.fixture
def node_overrides() -> dict[str, Any]:
    return {
        "webhook_allow_private": True,
        "webhook_retry_base_s": 0.05,
        "webhook_timeout_s": 5.0,
    }


def finished(count: int = 1) -> Any:
    def check(deliveries: list[WebhookDelivery]) -> bool:
        done = [d for d in deliveries if d.status is not DeliveryStatus.PENDING]
        return len(done) >= count

    return check


async def test_retries_after_500_and_every_signature_verifies(hub_node: RunningNode) -> None:
    admin = await hub_node.create_account(admin=True)
    async with open_receiver(fail_first=2) as receiver:
        webhook_id = await register(hub_node, admin, receiver, ["payment.succeeded"])
        before = int(time.time())
        message_id = await publish(
            hub_node, admin, "payment.succeeded", {"title": "Paid", "amount": 4200, "who": "Zoë"}
        )
        [delivery] = await wait_deliveries(hub_node, webhook_id, finished())

    assert delivery.status is DeliveryStatus.SUCCEEDED
    assert (delivery.attempts, delivery.last_status_code) == (3, 200)
    assert delivery.last_error is None and delivery.next_attempt_at is None
    assert delivery.event_id == message_id

    assert len(receiver.received) == 3
    assert all(r.verified for r in receiver.received)
    assert len({r.body for r in receiver.received}) == 1  # the same bytes every time
    assert [r.headers["x-webhook-attempt"] for r in receiver.received] == ["1", "2", "3"]
    stamps = [int(r.headers["x-webhook-timestamp"]) for r in receiver.received]
    assert stamps == sorted(stamps) and before <= stamps[0] <= int(time.time())
    first = receiver.received[0]
    assert first.method == "POST"
    assert first.headers["content-type"] == "application/json"
    assert first.headers["x-webhook-id"] == message_id
    assert first.headers["x-webhook-event"] == "payment.succeeded"
    body = json.loads(first.payload)
    assert list(body) == ["id", "event", "timestamp", "data"]
    assert body["id"] == message_id and body["event"] == "payment.succeeded"
    assert body["data"]["title"] == "Paid" and body["data"]["who"] == "Zoë"
    assert body["timestamp"] == body["data"]["timestamp"]

    log = await hub_node.client.get(
        f"/api/v1/webhooks/{webhook_id}/deliveries", headers=admin.headers
    )
    [row] = log.json()["data"]
    assert row["status"] == "succeeded" and row["attempts"] == 3
    assert row["last_status_code"] == 200 and row["last_error"] is None
    assert row["event"] == "payment.succeeded" and row["event_id"] == message_id


async def test_gives_up_after_five_attempts(hub_node: RunningNode) -> None:
    admin = await hub_node.create_account(admin=True)
    async with open_receiver(status=500) as receiver:
        webhook_id = await register(hub_node, admin, receiver, ["subscription.expired"])
        await publish(hub_node, admin, "subscription.expired", {"plan": "pro"})
        [delivery] = await wait_deliveries(hub_node, webhook_id, finished())
    assert delivery.status is DeliveryStatus.FAILED
    assert delivery.attempts == MAX_ATTEMPTS
    assert (delivery.last_status_code, delivery.last_error) == (500, "unexpected status 500")
    assert len(receiver.received) == MAX_ATTEMPTS
    assert all(r.verified for r in receiver.received)
    log = await hub_node.client.get(
        f"/api/v1/webhooks/{webhook_id}/deliveries",
        params={"status": "failed"},
        headers=admin.headers,
    )
    assert log.json()["pagination"]["total_items"] == 1


async def test_a_redirect_to_a_private_address_is_not_followed(hub_node: RunningNode) -> None:
    admin = await hub_node.create_account(admin=True)
    metadata = "http://169.254.169.254/latest/meta-data/"
    async with open_receiver(redirect_to=metadata) as receiver:
        webhook_id = await register(hub_node, admin, receiver, ["payment.succeeded"])
        await publish(hub_node, admin, "payment.succeeded", {"n": 1})
        [delivery] = await wait_deliveries(hub_node, webhook_id, finished())
    assert delivery.status is DeliveryStatus.FAILED
    assert delivery.last_status_code == 302
    assert delivery.last_error is not None
    assert "redirect refused" in delivery.last_error and metadata in delivery.last_error
    assert len(receiver.received) == MAX_ATTEMPTS  # every attempt went to the endpoint only


async def test_user_events_reach_their_subscribers(hub_node: RunningNode) -> None:
    admin = await hub_node.create_account(admin=True)
    async with open_receiver() as receiver:
        users = await register(hub_node, admin, receiver, ["user.created", "user.deleted"])
        everything = await register(hub_node, admin, receiver, ["*"])
        payments = await register(hub_node, admin, receiver, ["payment.succeeded"])

        response = await hub_node.register(email="new-person@example.com")
        assert response.status_code == 201
        new_user_id = response.json()["data"]["user_id"]
        created = {w: await wait_deliveries(hub_node, w, finished()) for w in (users, everything)}
        leaving = await hub_node.create_account()
        gone = await hub_node.client.delete("/api/v1/users/me", headers=leaving.headers)
        assert gone.status_code == 200
        deleted = {w: await wait_deliveries(hub_node, w, finished(2)) for w in (users, everything)}

    assert await hub_node.node.storage.list_webhook_deliveries(payments) == ([], 0)
    for webhook_id in (users, everything):
        [first] = created[webhook_id]
        assert first.event == "user.created" and first.status is DeliveryStatus.SUCCEEDED
        body = json.loads(first.payload)
        assert body["event"] == "user.created" and body["id"] == first.event_id
        assert body["data"]["user_id"] == new_user_id
        assert body["data"]["email"] == "new-person@example.com"
        latest = deleted[webhook_id][0]
        assert latest.event == "user.deleted" and latest.status is DeliveryStatus.SUCCEEDED
        assert json.loads(latest.payload)["data"]["user_id"] == leaving.user_id
    assert len(receiver.received) == 4
    assert all(r.verified for r in receiver.received)


async def test_each_event_is_queued_once_and_only_for_subscribers(hub_node: RunningNode) -> None:
    admin = await hub_node.create_account(admin=True)
    async with open_receiver() as receiver:
        orders = await register(hub_node, admin, receiver, ["order.placed"])
        # queuing happens inside the publish: the log is complete when it returns
        await publish(hub_node, admin, "order.placed", {"n": 1}, id="order-1")
        await publish(hub_node, admin, "order.placed", {"n": 1}, id="order-1")  # redelivery
        await publish(hub_node, admin, "order.cancelled", {"n": 2})
        await publish(hub_node, admin, None, {"n": 3})
        _, total = await hub_node.node.storage.list_webhook_deliveries(orders)
        assert total == 1
        [delivery] = await wait_deliveries(hub_node, orders, finished())
    assert delivery.event_id == "order-1" and delivery.status is DeliveryStatus.SUCCEEDED
    assert len(receiver.received) == 1


async def test_at_most_a_few_requests_in_flight_per_endpoint(hub_node: RunningNode) -> None:
    admin = await hub_node.create_account(admin=True)
    count = 3 * MAX_IN_FLIGHT_PER_ENDPOINT
    gate = trio.Event()
    async with open_receiver(gate=gate) as receiver:
        webhook_id = await register(hub_node, admin, receiver, ["bulk.event"])
        for n in range(count):
            await publish(hub_node, admin, "bulk.event", {"n": n})
        with trio.fail_after(WAIT_S):
            await receiver.wait_until(lambda r: r.in_flight == MAX_IN_FLIGHT_PER_ENDPOINT)
        gate.set()
        deliveries = await wait_deliveries(hub_node, webhook_id, finished(count))
    assert all(d.status is DeliveryStatus.SUCCEEDED and d.attempts == 1 for d in deliveries)
    assert len(receiver.received) == count
    assert receiver.max_in_flight == MAX_IN_FLIGHT_PER_ENDPOINT


async def test_deleting_an_endpoint_stops_its_deliveries(hub_node: RunningNode) -> None:
    admin = await hub_node.create_account(admin=True)
    async with open_receiver(status=503) as receiver:
        webhook_id = await register(hub_node, admin, receiver, ["doomed.event"])
        await publish(hub_node, admin, "doomed.event", {})
        await wait_deliveries(hub_node, webhook_id, lambda ds: bool(ds) and ds[0].attempts >= 1)
        response = await hub_node.client.delete(
            f"/api/v1/webhooks/{webhook_id}", headers=admin.headers
        )
        assert response.status_code == 200
        # the log went with it: an attempt in flight records into nothing, none is due
        assert await hub_node.node.storage.list_webhook_deliveries(webhook_id) == ([], 0)
    assert 1 <= len(receiver.received) <= MAX_ATTEMPTS
