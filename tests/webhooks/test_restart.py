"""Deliveries are durable: a node that stops (mid-request or between attempts) leaves
them in storage, and the next node on the same database finishes them."""

from __future__ import annotations

from pathlib import Path

import trio

from hub.settings import Settings
from storage.base import DeliveryStatus
from tests.harness import WAIT_S, make_settings, run_node
from tests.webhooks.helpers import publish, register, wait_deliveries
from tests.webhooks.receiver import open_receiver

RETRY_BASE_S = 0.2


def settings_for(tmp_path: Path, backend: str) -> Settings:
    return make_settings(
        tmp_path / "data",
        backend=backend,
        webhook_allow_private=True,
        webhook_retry_base_s=RETRY_BASE_S,
        webhook_timeout_s=WAIT_S,
    )


async def test_a_request_cut_by_shutdown_is_sent_again_after_restart(
    backend: str, storage_schema: str | None, tmp_path: Path
) -> None:
    settings = settings_for(tmp_path, backend)
    gate = trio.Event()
    async with open_receiver(gate=gate) as receiver:
        async with run_node(settings, schema=storage_schema) as first:
            admin = await first.create_account(admin=True)
            webhook_id = await register(first, admin, receiver, ["payment.succeeded"])
            await publish(first, admin, "payment.succeeded", {"amount": 1})
            with trio.fail_after(WAIT_S):
                await receiver.wait_until(lambda r: r.in_flight == 1)
        # the node stopped while the receiver held the request: nothing was recorded,
        # and the delivery was released for the next node
        gate.set()
        async with run_node(settings, schema=storage_schema) as second:
            [delivery] = await wait_deliveries(
                second, webhook_id, lambda ds: ds[0].status is not DeliveryStatus.PENDING
            )
    assert delivery.status is DeliveryStatus.SUCCEEDED
    assert delivery.attempts == 1
    assert len(receiver.received) == 2
    assert all(r.verified for r in receiver.received)  # the secret opens on the new node
    assert receiver.received[0].body == receiver.received[1].body


async def test_a_pending_retry_survives_a_restart(
    backend: str, storage_schema: str | None, tmp_path: Path
) -> None:
    settings = settings_for(tmp_path, backend)
    async with open_receiver(status=500) as receiver:
        async with run_node(settings, schema=storage_schema) as first:
            admin = await first.create_account(admin=True)
            webhook_id = await register(first, admin, receiver, ["subscription.expired"])
            await publish(first, admin, "subscription.expired", {"plan": "pro"})
            await wait_deliveries(first, webhook_id, lambda ds: ds[0].attempts >= 1)
        receiver.status = 200  # only a node started after this can be answered 200
        async with run_node(settings, schema=storage_schema) as second:
            [delivery] = await wait_deliveries(
                second, webhook_id, lambda ds: ds[0].status is not DeliveryStatus.PENDING
            )
    assert delivery.status is DeliveryStatus.SUCCEEDED
    assert delivery.last_status_code == 200
    assert delivery.attempts == len(receiver.received) >= 2
    assert all(r.verified for r in receiver.received)
