"""Fixtures of the RabbitMQ ingest tests: one fresh vhost per test session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.ingest.rabbit import HOST, PORT, Vhost
from tests.services import require_service


@pytest.fixture(scope="session")
def rabbit_vhost() -> Iterator[Vhost]:
    """A vhost of its own for this test run, deleted (with everything in it) at the end."""
    require_service("RabbitMQ", HOST, PORT)
    vhost = Vhost()
    vhost.create()
    try:
        yield vhost
    finally:
        vhost.delete()


@pytest.fixture
def vhost(rabbit_vhost: Vhost) -> Iterator[Vhost]:
    """The session vhost, without the hub's queues and exchanges before and after each
    test."""
    _purge(rabbit_vhost)
    yield rabbit_vhost
    _purge(rabbit_vhost)


def _purge(vhost: Vhost) -> None:
    import pika
    import pika.exceptions

    connection = pika.BlockingConnection(pika.URLParameters(vhost.url))
    try:
        channel = connection.channel()
        for queue in (
            "hub.notifications",
            "hub.notifications.dead",
            "email_queue",
            "email_queue.dead",
        ):
            try:
                channel.queue_delete(queue)
            except pika.exceptions.ChannelClosedByBroker:
                channel = connection.channel()
        for exchange in ("hub.notifications", "hub.dlx"):
            channel.exchange_delete(exchange)
    finally:
        connection.close()
