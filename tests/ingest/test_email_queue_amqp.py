"""The e-mail queue on RabbitMQ, with the real e-mail worker and mailers."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pika
import trio

from actors.email_worker import EmailWorker
from bridge.email_queue import EmailJob
from bridge.email_queue_amqp import DEAD_QUEUE, QUEUE, AmqpEmailQueue, open_amqp_email_queue
from bridge.mailer import OutboxMailer, SmtpMailer
from tests.ingest.rabbit import Vhost, drain_queue, queue_depth

WAIT_S = 15.0


def verify_job(to: str = "someone@example.com") -> EmailJob:
    return EmailJob.new(
        to=to,
        subject="Verify",
        template="verify_email",
        variables={"full_name": "Someone", "verify_url": "http://hub.test/v", "valid_hours": "24"},
    )


@asynccontextmanager
async def email_queue(url: str) -> AsyncIterator[AmqpEmailQueue]:
    async with open_amqp_email_queue(url, node_id="test-node") as queue:
        with trio.fail_after(WAIT_S):
            await queue.link.wait_connected()
        yield queue


def closed_port() -> int:
    """A local TCP port nobody listens on (SMTP there is refused at once)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_put_get_ack_round_trip(vhost: Vhost) -> None:
    async with email_queue(vhost.url) as queue:
        job = verify_job()
        await queue.put(job)
        with trio.fail_after(WAIT_S):
            got = await queue.get()
        assert got == job
        await queue.ack(got)
    assert queue_depth(vhost.url, QUEUE) == (0, 0)


async def test_retry_comes_back_after_the_delay_and_dead_parks_the_job(vhost: Vhost) -> None:
    async with email_queue(vhost.url) as queue:
        await queue.put(verify_job())
        with trio.fail_after(WAIT_S):
            job = await queue.get()
        start = trio.current_time()
        await queue.retry(job.retried(), 0.3)
        with trio.fail_after(WAIT_S):
            again = await queue.get()
        assert trio.current_time() - start >= 0.3
        assert again.job_id == job.job_id and again.attempts == 1
        await queue.dead(again, "gave up")
    dead = drain_queue(vhost.url, DEAD_QUEUE)
    assert [headers["x-hub-reason"] for headers, _ in dead] == ["gave up"]
    assert queue_depth(vhost.url, QUEUE) == (0, 0)


async def test_a_malformed_job_is_parked_at_once(vhost: Vhost) -> None:
    async with email_queue(vhost.url) as queue:
        connection = pika.BlockingConnection(pika.URLParameters(vhost.url))
        connection.channel().basic_publish("", QUEUE, b'{"type": "nonsense"}')
        connection.close()
        await queue.put(verify_job("after@example.com"))
        with trio.fail_after(WAIT_S):
            job = await queue.get()
        assert job.to == "after@example.com"
        await queue.ack(job)
    dead = drain_queue(vhost.url, DEAD_QUEUE)
    assert len(dead) == 1 and dead[0][0]["x-hub-reason"].startswith("malformed")


async def test_the_worker_sends_through_the_queue(vhost: Vhost, tmp_path: Path) -> None:
    async with email_queue(vhost.url) as queue, trio.open_nursery() as nursery:
        worker = EmailWorker(queue, OutboxMailer(tmp_path / "outbox"), sender="hub@test")
        await nursery.start(worker.run)
        for i in range(10):
            await queue.put(verify_job(f"user{i}@example.com"))
        with trio.fail_after(WAIT_S):
            await worker.wait_until(lambda s: s.sent == 10)
        nursery.cancel_scope.cancel()
    assert len(list((tmp_path / "outbox").glob("*.eml"))) == 10
    assert queue_depth(vhost.url, QUEUE) == (0, 0)


async def test_the_worker_retries_three_times_then_parks_the_job(vhost: Vhost) -> None:
    async with email_queue(vhost.url) as queue, trio.open_nursery() as nursery:
        mailer = SmtpMailer("127.0.0.1", closed_port())
        worker = EmailWorker(queue, mailer, sender="hub@test", backoff_base_s=0.1)
        await nursery.start(worker.run)
        await queue.put(verify_job())
        with trio.fail_after(WAIT_S):
            await worker.wait_until(lambda s: s.dead == 1)
        assert worker.statistics().retried == 2
        nursery.cancel_scope.cancel()
    dead = drain_queue(vhost.url, DEAD_QUEUE)
    assert len(dead) == 1
    assert "smtp" in dead[0][0]["x-hub-reason"]
    assert b'"attempts": 3' in dead[0][1]


async def test_a_job_taken_when_the_connection_drops_is_delivered_again(vhost: Vhost) -> None:
    async with email_queue(vhost.url) as queue:
        await queue.put(verify_job())
        with trio.fail_after(WAIT_S):
            job = await queue.get()
        generation = queue.link.generation
        assert await trio.to_thread.run_sync(vhost.close_connections, "test-node/email") == 1
        with trio.fail_after(WAIT_S):
            await queue.link.wait_connected(generation_above=generation)
            again = await queue.get()
        assert again.job_id == job.job_id
        await queue.ack(job)  # the stale handle first: ignored, the connection is new
        await queue.ack(again)
    assert queue_depth(vhost.url, QUEUE) == (0, 0)
