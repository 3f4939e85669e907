"""The webhook part of the storage contract, run against SQLite and PostgreSQL.

Same fixtures as ``test_contract.py``: every test gets a migrated storage of one backend.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta

import pytest
import trio

from storage import (
    WILDCARD_EVENT,
    Conflict,
    DeliveryStatus,
    Storage,
    Webhook,
)
from tests.storage.conftest import StorageFactory

SEALED = "v1.sealed-secret"
LEASE_S = 60.0


async def make_webhook(
    storage: Storage, events: list[str], *, url: str = "https://hooks.example.com/in"
) -> Webhook:
    return await storage.create_webhook(
        webhook_id=uuid.uuid4(),
        url=url,
        events=events,
        description="test endpoint",
        secret_ciphertext=SEALED,
    )


def payload(event_id: str, event: str = "payment.succeeded") -> str:
    return json.dumps({"id": event_id, "event": event, "timestamp": "t", "data": {}})


async def claim_all(storage: Storage, **kwargs: object) -> list[uuid.UUID]:
    params: dict[str, object] = {"limit": 100, "per_webhook": 100, "lease_s": LEASE_S}
    params.update(kwargs)
    claimed = await storage.claim_webhook_deliveries(**params)  # type: ignore[arg-type]
    return [c.delivery.id for c in claimed]


# ------------------------------------------------------------------------- endpoints


async def test_create_get_list_delete(storage: Storage) -> None:
    first = await make_webhook(storage, ["user.created", "user.deleted"])
    second = await make_webhook(storage, [WILDCARD_EVENT], url="http://other.example.com/x")
    assert first.events == ("user.created", "user.deleted")
    assert first.description == "test endpoint"
    assert first.secret_ciphertext == SEALED
    assert first.created_at.tzinfo is not None
    assert await storage.get_webhook(first.id) == first
    assert [w.id for w in await storage.list_webhooks()] == [first.id, second.id]

    assert await storage.delete_webhook(first.id) is True
    assert await storage.delete_webhook(first.id) is False
    assert await storage.get_webhook(first.id) is None
    assert [w.id for w in await storage.list_webhooks()] == [second.id]


async def test_create_refuses_duplicate_id_empty_events_and_nul(storage: Storage) -> None:
    webhook = await make_webhook(storage, ["a"])
    with pytest.raises(Conflict):
        await storage.create_webhook(
            webhook_id=webhook.id,
            url="https://x.example.com",
            events=["a"],
            description=None,
            secret_ciphertext=SEALED,
        )
    with pytest.raises(ValueError, match="event"):
        await make_webhook(storage, [])
    with pytest.raises(ValueError, match="NUL"):
        await make_webhook(storage, ["a"], url="https://x.example.com/\x00")
    with pytest.raises(ValueError, match="rejected by the database"):
        await make_webhook(storage, ["a"], url="https://x.example.com/" + "a" * 2100)


# -------------------------------------------------------------------------- enqueue


async def test_enqueue_matches_events_and_wildcard(storage: Storage) -> None:
    payments = await make_webhook(storage, ["payment.succeeded"])
    users = await make_webhook(storage, ["user.created"])
    everything = await make_webhook(storage, [WILDCARD_EVENT])

    queued = await storage.enqueue_webhook_deliveries(
        event="payment.succeeded", event_id="evt-1", payload=payload("evt-1")
    )
    assert queued == 2
    for webhook, expected in ((payments, 1), (users, 0), (everything, 1)):
        deliveries, total = await storage.list_webhook_deliveries(webhook.id)
        assert total == expected
        for delivery in deliveries:
            assert delivery.event == "payment.succeeded"
            assert delivery.event_id == "evt-1"
            assert delivery.payload == payload("evt-1")
            assert delivery.status is DeliveryStatus.PENDING
            assert delivery.attempts == 0
            assert delivery.next_attempt_at is not None
            assert delivery.last_status_code is None and delivery.last_error is None

    assert (
        await storage.enqueue_webhook_deliveries(event="nobody.listens", event_id="e", payload="{}")
        == 1  # only the wildcard endpoint
    )


async def test_enqueue_same_event_id_once_per_endpoint(storage: Storage) -> None:
    await make_webhook(storage, ["payment.succeeded"])
    body = payload("evt-dup")
    assert (
        await storage.enqueue_webhook_deliveries(
            event="payment.succeeded", event_id="evt-dup", payload=body
        )
        == 1
    )
    assert (
        await storage.enqueue_webhook_deliveries(
            event="payment.succeeded", event_id="evt-dup", payload=body
        )
        == 0
    )
    # a new endpoint registered later gets the repeated event
    late = await make_webhook(storage, ["payment.succeeded"])
    assert (
        await storage.enqueue_webhook_deliveries(
            event="payment.succeeded", event_id="evt-dup", payload=body
        )
        == 1
    )
    assert (await storage.list_webhook_deliveries(late.id))[1] == 1


async def test_payload_is_kept_byte_for_byte(storage: Storage) -> None:
    webhook = await make_webhook(storage, ["e"])
    raw = '{"id":"x","data":{"name":"Zoë ✓ \\u0000","n":1.50,"s":"\' OR 1=1--"}}'
    await storage.enqueue_webhook_deliveries(event="e", event_id="x", payload=raw)
    [delivery], _ = await storage.list_webhook_deliveries(webhook.id)
    assert delivery.payload == raw


# ------------------------------------------------------------------- claim and record


async def test_claim_leases_so_a_second_claim_gets_nothing(storage: Storage) -> None:
    webhook = await make_webhook(storage, ["e"])
    for n in range(3):
        await storage.enqueue_webhook_deliveries(event="e", event_id=f"e{n}", payload="{}")
    claimed = await storage.claim_webhook_deliveries(limit=10, per_webhook=10, lease_s=LEASE_S)
    assert len(claimed) == 3
    assert {c.webhook.id for c in claimed} == {webhook.id}
    assert claimed[0].webhook.url == webhook.url
    assert claimed[0].webhook.secret_ciphertext == SEALED
    lease_end = claimed[0].delivery.next_attempt_at
    assert lease_end is not None
    assert lease_end > datetime.now(UTC) + timedelta(seconds=LEASE_S - 5)
    assert await claim_all(storage) == []
    # the lease is the next due time: the dispatcher sleeps until then
    due = await storage.next_webhook_due_at()
    assert due is not None and due > datetime.now(UTC) + timedelta(seconds=LEASE_S - 5)


async def test_expired_lease_is_claimed_again(storage: Storage) -> None:
    await make_webhook(storage, ["e"])
    await storage.enqueue_webhook_deliveries(event="e", event_id="e1", payload="{}")
    first = await claim_all(storage, lease_s=0.0)
    assert len(first) == 1
    assert await claim_all(storage) == first  # a dead dispatcher's lease ran out


async def test_claim_caps_per_endpoint_and_total_and_skips_excluded(storage: Storage) -> None:
    busy = await make_webhook(storage, ["e"])
    quiet = await make_webhook(storage, ["f"])
    for n in range(6):
        await storage.enqueue_webhook_deliveries(event="e", event_id=f"e{n}", payload="{}")
    for n in range(2):
        await storage.enqueue_webhook_deliveries(event="f", event_id=f"f{n}", payload="{}")

    claimed = await storage.claim_webhook_deliveries(limit=10, per_webhook=2, lease_s=LEASE_S)
    by_endpoint = [c.webhook.id for c in claimed]
    assert by_endpoint.count(busy.id) == 2
    assert by_endpoint.count(quiet.id) == 2

    assert await claim_all(storage, exclude=[busy.id]) == []
    assert len(await claim_all(storage, limit=3, per_webhook=10)) == 3
    assert len(await claim_all(storage)) == 1
    assert await claim_all(storage, limit=0) == []


async def test_next_due_ignores_excluded_endpoints(storage: Storage) -> None:
    assert await storage.next_webhook_due_at() is None
    webhook = await make_webhook(storage, ["e"])
    await storage.enqueue_webhook_deliveries(event="e", event_id="e1", payload="{}")
    due = await storage.next_webhook_due_at()
    assert due is not None and due <= datetime.now(UTC)
    assert await storage.next_webhook_due_at(exclude=[webhook.id]) is None


async def test_record_attempts_retry_then_succeed(storage: Storage) -> None:
    webhook = await make_webhook(storage, ["e"])
    await storage.enqueue_webhook_deliveries(event="e", event_id="e1", payload="{}")
    [delivery_id] = await claim_all(storage)
    retry_at = datetime.now(UTC) + timedelta(seconds=30)

    assert await storage.record_webhook_attempt(
        delivery_id,
        status=DeliveryStatus.PENDING,
        status_code=500,
        error="unexpected status 500",
        next_attempt_at=retry_at,
    )
    [pending], _ = await storage.list_webhook_deliveries(webhook.id)
    assert (pending.status, pending.attempts) == (DeliveryStatus.PENDING, 1)
    assert (pending.last_status_code, pending.last_error) == (500, "unexpected status 500")
    assert pending.next_attempt_at is not None
    assert abs((pending.next_attempt_at - retry_at).total_seconds()) < 0.01
    assert await claim_all(storage) == []  # not due yet

    assert await storage.record_webhook_attempt(
        delivery_id,
        status=DeliveryStatus.SUCCEEDED,
        status_code=204,
        error=None,
        next_attempt_at=None,
    )
    [done], _ = await storage.list_webhook_deliveries(webhook.id)
    assert (done.status, done.attempts, done.last_status_code) == (DeliveryStatus.SUCCEEDED, 2, 204)
    assert done.last_error is None and done.next_attempt_at is None
    # finished: never claimed, never recorded again
    assert await claim_all(storage, lease_s=0.0) == []
    assert not await storage.record_webhook_attempt(
        delivery_id, status=DeliveryStatus.FAILED, status_code=None, error="x", next_attempt_at=None
    )
    assert await storage.next_webhook_due_at() is None


async def test_record_checks_outcome_and_unknown_delivery(storage: Storage) -> None:
    with pytest.raises(ValueError, match="next_attempt_at"):
        await storage.record_webhook_attempt(
            uuid.uuid4(),
            status=DeliveryStatus.PENDING,
            status_code=None,
            error="x",
            next_attempt_at=None,
        )
    with pytest.raises(ValueError, match="next_attempt_at"):
        await storage.record_webhook_attempt(
            uuid.uuid4(),
            status=DeliveryStatus.FAILED,
            status_code=None,
            error="x",
            next_attempt_at=datetime.now(UTC),
        )
    assert not await storage.record_webhook_attempt(
        uuid.uuid4(),
        status=DeliveryStatus.FAILED,
        status_code=None,
        error="x",
        next_attempt_at=None,
    )


async def test_release_makes_claimed_deliveries_due_again(storage: Storage) -> None:
    await make_webhook(storage, ["e"])
    for n in range(2):
        await storage.enqueue_webhook_deliveries(event="e", event_id=f"e{n}", payload="{}")
    claimed = await claim_all(storage)
    assert await claim_all(storage) == []
    assert await storage.release_webhook_deliveries(claimed) == 2
    assert await storage.release_webhook_deliveries([]) == 0
    assert sorted(await claim_all(storage)) == sorted(claimed)


async def test_concurrent_claims_never_share_a_delivery(storage_factory: StorageFactory) -> None:
    first = await storage_factory.open()
    await first.migrate()
    second = await storage_factory.open()
    for n in range(3):
        webhook = await make_webhook(first, [f"e{n}"])
        assert webhook.events == (f"e{n}",)
        for m in range(20):
            await first.enqueue_webhook_deliveries(event=f"e{n}", event_id=str(m), payload="{}")
    got: list[list[uuid.UUID]] = [[], []]

    async def claimer(index: int, storage: Storage) -> None:
        while True:
            batch = await claim_all(storage, limit=5, per_webhook=2)
            if not batch:
                return
            got[index].extend(batch)

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(claimer, 0, first)
            nursery.start_soon(claimer, 1, second)
    everything = got[0] + got[1]
    assert len(everything) == 60
    assert len(set(everything)) == 60


# --------------------------------------------------------------------- listing, pruning


async def test_list_deliveries_pages_newest_first_with_status_filter(storage: Storage) -> None:
    webhook = await make_webhook(storage, ["e"])
    other = await make_webhook(storage, ["f"])
    for n in range(5):
        await storage.enqueue_webhook_deliveries(event="e", event_id=f"e{n}", payload="{}")
    await storage.enqueue_webhook_deliveries(event="f", event_id="f0", payload="{}")

    first_page, total = await storage.list_webhook_deliveries(webhook.id, page=1, limit=2)
    assert total == 5
    assert [d.event_id for d in first_page] == ["e4", "e3"]
    last_page, _ = await storage.list_webhook_deliveries(webhook.id, page=3, limit=2)
    assert [d.event_id for d in last_page] == ["e0"]
    assert (await storage.list_webhook_deliveries(webhook.id, page=4, limit=2))[0] == []

    [oldest_id] = [d.id for d in last_page]
    claimed = await storage.claim_webhook_deliveries(limit=1, per_webhook=1, lease_s=LEASE_S)
    assert [c.delivery.id for c in claimed] == [oldest_id]  # oldest due first
    await storage.record_webhook_attempt(
        oldest_id, status=DeliveryStatus.FAILED, status_code=None, error="x", next_attempt_at=None
    )
    failed, failed_total = await storage.list_webhook_deliveries(
        webhook.id, status=DeliveryStatus.FAILED
    )
    assert failed_total == 1 and [d.id for d in failed] == [oldest_id]
    assert (await storage.list_webhook_deliveries(webhook.id, status=DeliveryStatus.PENDING))[
        1
    ] == 4
    assert (await storage.list_webhook_deliveries(other.id))[1] == 1
    with pytest.raises(ValueError, match="page"):
        await storage.list_webhook_deliveries(webhook.id, page=0)
    with pytest.raises(ValueError, match="limit"):
        await storage.list_webhook_deliveries(webhook.id, limit=0)


async def test_delete_webhook_takes_its_deliveries(storage: Storage) -> None:
    webhook = await make_webhook(storage, ["e"])
    await storage.enqueue_webhook_deliveries(event="e", event_id="e1", payload="{}")
    [claimed] = await claim_all(storage)
    assert await storage.delete_webhook(webhook.id)
    assert await storage.list_webhook_deliveries(webhook.id) == ([], 0)
    assert await storage.next_webhook_due_at() is None
    # the dispatcher that held it records into nothing
    assert not await storage.record_webhook_attempt(
        claimed, status=DeliveryStatus.SUCCEEDED, status_code=200, error=None, next_attempt_at=None
    )


async def test_prune_removes_only_old_finished_deliveries(storage: Storage) -> None:
    webhook = await make_webhook(storage, ["e"])
    for n in range(3):
        await storage.enqueue_webhook_deliveries(event="e", event_id=f"e{n}", payload="{}")
    ids = await claim_all(storage, limit=2)
    await storage.record_webhook_attempt(
        ids[0], status=DeliveryStatus.SUCCEEDED, status_code=200, error=None, next_attempt_at=None
    )
    await storage.record_webhook_attempt(
        ids[1], status=DeliveryStatus.FAILED, status_code=500, error="x", next_attempt_at=None
    )
    past = datetime.now(UTC) - timedelta(days=1)
    assert await storage.prune_webhook_deliveries(finished_before=past) == 0
    future = datetime.now(UTC) + timedelta(seconds=1)
    assert await storage.prune_webhook_deliveries(finished_before=future) == 2
    remaining, total = await storage.list_webhook_deliveries(webhook.id)
    assert total == 1 and remaining[0].status is DeliveryStatus.PENDING
