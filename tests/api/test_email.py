"""E-mail: the SPEC §4 job format, the durable local queue, the worker's retries and
concurrency over real SMTP (a sink on a real socket), and the outbox."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import trio

from actors.email_worker import EmailWorker
from bridge.email_queue import BadJob, EmailJob
from bridge.email_queue_local import open_local_email_queue
from bridge.mailer import OutboxMailer, SmtpMailer
from tests.harness import WAIT_S, extract_token, make_settings, run_node, unique_email
from tests.smtp_sink import open_smtp_sink


def job(to: str = "someone@example.com") -> EmailJob:
    return EmailJob.new(
        to=to,
        subject="Confirm",
        template="verify_email",
        variables={"full_name": "A", "verify_url": "http://x/verify?token=t", "valid_hours": "24"},
    )


def test_job_format_is_spec_section_4() -> None:
    body = job().to_json()
    assert set(body) == {"job_id", "type", "data", "attempts", "created_at"}
    assert body["type"] == "send_email"
    assert set(body["data"]) == {"to", "subject", "template", "variables"}
    assert body["attempts"] == 0
    assert EmailJob.from_json(json.loads(json.dumps(body))).to_json() == body


@pytest.mark.parametrize(
    "body",
    [{}, {"type": "other"}, {"type": "send_email", "job_id": "1", "data": "x"}, None, []],
)
def test_bad_jobs_are_refused(body: Any) -> None:
    with pytest.raises(BadJob):
        EmailJob.from_json(body)


async def test_local_queue_survives_a_restart(tmp_path: Path) -> None:
    first, second = job("a@example.com"), job("b@example.com")
    async with open_local_email_queue(tmp_path) as queue:
        await queue.put(first)
        await queue.put(second)
        taken = await queue.get()
        assert taken == first
        await queue.ack(taken)
        taken = await queue.get()  # in flight when the "crash" happens
    async with open_local_email_queue(tmp_path) as queue:
        assert queue.statistics() == {"stored": 1, "scheduled": 1}
        with trio.fail_after(WAIT_S):
            again = await queue.get()
        assert again == second


async def test_local_queue_retry_waits_and_dead_sets_aside(tmp_path: Path) -> None:
    async with open_local_email_queue(tmp_path) as queue:
        original = job()
        await queue.put(original)
        taken = await queue.get()
        await queue.retry(taken.retried(), 0.05)
        with trio.fail_after(WAIT_S):
            retried = await queue.get()
        assert retried.attempts == 1
        await queue.dead(retried, "gave up")
        assert queue.statistics()["stored"] == 0
    dead = json.loads((tmp_path / "dead" / f"{original.job_id}.json").read_text())
    assert dead["reason"] == "gave up"
    assert dead["job"]["attempts"] == 1
    assert list((tmp_path / "pending").glob("*.json")) == []


async def test_register_sends_the_verification_email_over_smtp(tmp_path: Path) -> None:
    async with open_smtp_sink() as sink:
        settings = make_settings(tmp_path, smtp_host="127.0.0.1", smtp_port=sink.port)
        async with run_node(settings) as hub:
            email = unique_email()
            assert (await hub.register(email)).status_code == 201
            with trio.fail_after(WAIT_S):
                await sink.wait_for(lambda s: len(s.messages) == 1)
            (message,) = sink.messages
            assert message["To"] == email
            assert message["Subject"] == "Confirm your e-mail address"
            token = extract_token(message.get_payload(decode=True).decode())
            verify = await hub.client.get("/api/v1/auth/verify-email", params={"token": token})
            assert verify.status_code == 200
            assert not (settings.hub_data_dir / "outbox").exists()


async def test_worker_retries_with_backoff_then_delivers(tmp_path: Path) -> None:
    async with open_smtp_sink(fail_next=2) as sink, open_local_email_queue(tmp_path) as queue:
        worker = EmailWorker(
            queue, SmtpMailer("127.0.0.1", sink.port), sender="hub@test", backoff_base_s=0.01
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(worker.run)
            await queue.put(job())
            with trio.fail_after(WAIT_S):
                await worker.wait_until(lambda s: s.sent == 1)
            nursery.cancel_scope.cancel()
        assert worker.statistics().retried == 2
        assert len(sink.messages) == 1


async def test_worker_gives_up_after_three_attempts(tmp_path: Path) -> None:
    async with open_smtp_sink(fail_next=100) as sink, open_local_email_queue(tmp_path) as queue:
        worker = EmailWorker(
            queue, SmtpMailer("127.0.0.1", sink.port), sender="hub@test", backoff_base_s=0.01
        )
        failing = job()
        async with trio.open_nursery() as nursery:
            await nursery.start(worker.run)
            await queue.put(failing)
            with trio.fail_after(WAIT_S):
                await worker.wait_until(lambda s: s.dead == 1)
            nursery.cancel_scope.cancel()
    dead = json.loads((tmp_path / "dead" / f"{failing.job_id}.json").read_text())
    assert dead["job"]["attempts"] == 3
    assert "smtp" in dead["reason"]
    assert sink.messages == []


async def test_worker_sends_five_at_a_time(tmp_path: Path) -> None:
    async with open_smtp_sink(hold=True) as sink, open_local_email_queue(tmp_path) as queue:
        worker = EmailWorker(queue, SmtpMailer("127.0.0.1", sink.port), sender="hub@test")
        async with trio.open_nursery() as nursery:
            await nursery.start(worker.run)
            for _ in range(8):
                await queue.put(job())
            with trio.fail_after(WAIT_S):
                await sink.wait_for(lambda s: s.in_data == 5)
            assert worker.statistics().in_flight == 5
            sink.release()
            with trio.fail_after(WAIT_S):
                await worker.wait_until(lambda s: s.sent == 8)
            nursery.cancel_scope.cancel()
    assert sink.max_in_data == 5


async def test_unknown_template_is_dead_at_once(tmp_path: Path) -> None:
    async with open_local_email_queue(tmp_path) as queue:
        worker = EmailWorker(queue, OutboxMailer(tmp_path / "outbox"), sender="hub@test")
        async with trio.open_nursery() as nursery:
            await nursery.start(worker.run)
            await queue.put(EmailJob.new(to="a@b.c", subject="s", template="nope", variables={}))
            with trio.fail_after(WAIT_S):
                await worker.wait_until(lambda s: s.dead == 1)
            nursery.cancel_scope.cancel()


async def test_outbox_writes_a_file_and_logs_without_the_address(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    address = "private.person@example.org"
    async with open_local_email_queue(tmp_path / "queue") as queue:
        worker = EmailWorker(queue, OutboxMailer(tmp_path / "outbox"), sender="hub@test")
        with caplog.at_level(logging.DEBUG):
            async with trio.open_nursery() as nursery:
                await nursery.start(worker.run)
                await queue.put(job(address))
                with trio.fail_after(WAIT_S):
                    await worker.wait_until(lambda s: s.sent == 1)
                nursery.cancel_scope.cancel()
    (path,) = (tmp_path / "outbox").glob("*.eml")
    assert address in path.read_text()
    assert any("outbox" in r.getMessage() for r in caplog.records)
    for record in caplog.records:
        assert address not in record.getMessage()
        assert address not in str(record.__dict__)


@pytest.mark.rabbitmq
async def test_with_amqp_url_jobs_go_through_rabbitmq(tmp_path: Path) -> None:
    """SPEC §4: with ``AMQP_URL`` the register e-mail is a job on ``email_queue`` and the
    same worker sends it."""
    from tests.ingest.rabbit import HOST, PORT, Vhost
    from tests.services import require_service

    require_service("RabbitMQ", HOST, PORT)
    vhost = Vhost()
    vhost.create()
    try:
        async with open_smtp_sink() as sink:
            settings = make_settings(
                tmp_path, amqp_url=vhost.url, smtp_host="127.0.0.1", smtp_port=sink.port
            )
            async with run_node(settings) as hub:
                from bridge.email_queue_amqp import AmqpEmailQueue

                assert isinstance(hub.node.services.email, AmqpEmailQueue)
                email = unique_email()
                assert (await hub.register(email)).status_code == 201
                with trio.fail_after(WAIT_S):
                    await sink.wait_for(lambda s: len(s.messages) == 1)
                assert sink.messages[0]["To"] == email
                assert not (tmp_path / "email_queue").exists()
    finally:
        vhost.delete()
