"""RabbitMQ numbers at ``/metrics``: a real broker, a vhost of the test's own, a producer
publishing a valid message, a repeat of it and one that is not JSON (counters, the
in-node delay histogram, the links' state)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.harness import WAIT_S, RunningNode, make_settings, run_node
from tests.ops.scrape import scrape, wait_ready_status
from tests.services import require_service

pytestmark = pytest.mark.rabbitmq


@asynccontextmanager
async def ingesting(running: RunningNode) -> AsyncIterator[Any]:
    """The node's RabbitMQ ingest (``node.ingest``); entered here, and set on the node,
    while ``hub/node.py`` does not run it itself yet."""
    actor = getattr(running.node, "ingest", None)
    if actor is not None:
        yield actor
        return
    from actors.ingest import open_ingest

    async with open_ingest(running.node) as actor:
        running.node.ingest = actor
        try:
            yield actor
        finally:
            del running.node.ingest


async def test_ingest_counters_and_links_are_scraped(tmp_path: Path) -> None:
    from tests.ingest.rabbit import HOST, PORT, Producer, Vhost

    require_service("RabbitMQ", HOST, PORT)
    vhost = Vhost()
    await trio.to_thread.run_sync(vhost.create)
    try:
        settings = make_settings(tmp_path / "data", amqp_url=vhost.url)
        async with run_node(settings) as running, ingesting(running) as ingest:
            await wait_ready_status(running, 200)  # the queue is declared and bound

            def produce() -> None:
                producer = Producer(vhost.url)
                try:
                    message = {"channel": "global", "data": {"title": "hi"}, "id": "m-1"}
                    producer.publish(message)
                    producer.publish(message)  # a repeat: published once
                    producer.publish(b"{not json")  # dead-lettered
                finally:
                    producer.close()

            await trio.to_thread.run_sync(produce)
            with trio.fail_after(WAIT_S):
                await ingest.wait_until(lambda s: s.published + s.duplicates + s.dead_lettered >= 3)

            result = await scrape(running)
            assert result.value("hub_amqp_messages_consumed_total") == 3
            assert result.value("hub_amqp_messages_duplicate_total") == 1
            assert result.value("hub_amqp_messages_dead_lettered_total") == 1
            assert result.value("hub_amqp_messages_redelivered_total") == 0
            assert result.value("hub_messages_published_total") == 1
            # Every handled delivery's time in the node, duplicate and dead letter too.
            delay = "hub_amqp_ingest_delay_seconds"
            assert result.value(f"{delay}_count") == 3
            assert result.value(f"{delay}_bucket", le="+Inf") == 3
            assert 0 < result.value(f"{delay}_sum") < 3 * WAIT_S
            buckets = [
                result.value(f"{delay}_bucket", le=labels["le"])
                for labels in result.labels_of(f"{delay}_bucket")
            ]
            assert buckets == sorted(buckets)  # cumulative
            links = {labels["link"] for labels in result.labels_of("hub_amqp_connected")}
            assert links == {"email", "ingest"}
            assert result.value("hub_amqp_connected", link="ingest") == 1
            assert result.value("hub_amqp_connected", link="email") == 1
            assert result.value("hub_amqp_reconnects_total", link="email") == 0
    finally:
        await trio.to_thread.run_sync(vhost.delete)
