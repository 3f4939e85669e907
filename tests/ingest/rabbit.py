"""RabbitMQ helpers for the ingest tests: a throw-away vhost, publishing, peeking.

The vhost is created and deleted with ``rabbitmqctl`` (the management plugin is not
enabled on this machine); when ``rabbitmqctl`` is missing and the management HTTP API
answers on :data:`MANAGEMENT_URL`, that is used instead. Only the test's own vhost is
ever touched.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import httpx
import pika
from pika.adapters.blocking_connection import BlockingChannel, BlockingConnection

from bridge.amqp_ingest import DEAD_LETTER_QUEUE, EXCHANGE

HOST = "127.0.0.1"
PORT = 5672
USER = os.environ.get("TEST_AMQP_USER", "guest")
PASSWORD = os.environ.get("TEST_AMQP_PASSWORD", "guest")
MANAGEMENT_URL = os.environ.get("TEST_AMQP_MANAGEMENT_URL", "http://127.0.0.1:15672")
CTL_TIMEOUT_S = 30.0


class AdminUnavailable(RuntimeError):
    """Neither ``rabbitmqctl`` nor the management API can be used."""


def _ctl(*args: str) -> str:
    result = subprocess.run(
        ["rabbitmqctl", "-q", *args],
        capture_output=True,
        text=True,
        timeout=CTL_TIMEOUT_S,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"rabbitmqctl {' '.join(args)}: {result.stderr.strip()}")
    return result.stdout


def _api() -> httpx.Client:
    return httpx.Client(base_url=MANAGEMENT_URL, auth=(USER, PASSWORD), timeout=10.0)


def _use_ctl() -> bool:
    if shutil.which("rabbitmqctl"):
        return True
    try:
        with _api() as api:
            api.get("/api/overview").raise_for_status()
    except httpx.HTTPError as exc:
        raise AdminUnavailable(f"no rabbitmqctl and no management API ({exc})") from None
    return False


@dataclass
class Vhost:
    """A fresh vhost for one test session; ``url`` is an AMQP URL into it."""

    name: str = field(default_factory=lambda: f"hub-test-{uuid.uuid4().hex[:10]}")
    use_ctl: bool = field(default_factory=_use_ctl)

    @property
    def url(self) -> str:
        return f"amqp://{USER}:{PASSWORD}@{HOST}:{PORT}/{quote(self.name, safe='')}"

    def create(self) -> None:
        if self.use_ctl:
            _ctl("add_vhost", self.name)
            _ctl("set_permissions", "-p", self.name, USER, ".*", ".*", ".*")
        else:
            with _api() as api:
                vhost = quote(self.name, safe="")
                api.put(f"/api/vhosts/{vhost}").raise_for_status()
                api.put(
                    f"/api/permissions/{vhost}/{USER}",
                    json={"configure": ".*", "write": ".*", "read": ".*"},
                ).raise_for_status()

    def set_access(self, allowed: bool) -> None:
        """Give (or take away) the test user's permissions on this vhost; without them
        every connection attempt is refused, as if the broker were away."""
        if allowed:
            self.set_permissions(".*", ".*", ".*")
        elif self.use_ctl:
            _ctl("clear_permissions", "-p", self.name, USER)
        else:
            with _api() as api:
                api.delete(f"/api/permissions/{quote(self.name, safe='')}/{USER}")

    def set_permissions(self, configure: str, write: str, read: str) -> None:
        """The test user's permission patterns on this vhost (``"^$"``: nothing)."""
        if self.use_ctl:
            _ctl("set_permissions", "-p", self.name, USER, configure, write, read)
            return
        with _api() as api:
            api.put(
                f"/api/permissions/{quote(self.name, safe='')}/{USER}",
                json={"configure": configure, "write": write, "read": read},
            ).raise_for_status()

    def delete(self) -> None:
        if self.use_ctl:
            _ctl("delete_vhost", self.name)
        else:
            with _api() as api:
                api.delete(f"/api/vhosts/{quote(self.name, safe='')}")

    def connection_names(self) -> list[str]:
        """Client-provided names of this vhost's connections."""
        if self.use_ctl:
            rows = _ctl("list_connections", "--no-table-headers", "vhost", "client_properties")
            names = []
            for line in rows.splitlines():
                vhost, _, props = line.partition("\t")
                if vhost == self.name and "connection_name" in props:
                    names.append(props)
            return names
        with _api() as api:
            vhost = quote(self.name, safe="")
            conns = api.get(f"/api/vhosts/{vhost}/connections").json()
            return [c.get("client_properties", {}).get("connection_name", "") for c in conns]

    def queue_messages(self) -> dict[str, int]:
        """Messages ready in each queue of this vhost."""
        if self.use_ctl:
            rows = _ctl("list_queues", "-p", self.name, "--no-table-headers", "name", "messages")
            return {
                name: int(count)
                for name, _, count in (line.partition("\t") for line in rows.splitlines())
                if count.strip().isdigit()
            }
        with _api() as api:
            queues = api.get(f"/api/queues/{quote(self.name, safe='')}").json()
            return {q["name"]: int(q.get("messages_ready", 0)) for q in queues}

    def close_connections(self, name_contains: str = "") -> int:
        """Force-close this vhost's connections (only those whose client-provided name
        contains ``name_contains``); returns how many were closed."""
        if self.use_ctl:
            rows = _ctl(
                "list_connections", "--no-table-headers", "pid", "vhost", "client_properties"
            )
            closed = 0
            for line in rows.splitlines():
                parts = line.split("\t")
                if len(parts) >= 3 and parts[1] == self.name and name_contains in parts[2]:
                    _ctl("close_connection", parts[0], "test: forced close")
                    closed += 1
            return closed
        with _api() as api:
            vhost = quote(self.name, safe="")
            closed = 0
            for conn in api.get(f"/api/vhosts/{vhost}/connections").json():
                props = conn.get("client_properties", {})
                if name_contains in str(props.get("connection_name", "")):
                    api.delete(f"/api/connections/{quote(conn['name'], safe='')}")
                    closed += 1
            return closed


class Producer:
    """A blocking pika publisher, as a producer would write it. With ``confirm=False``
    (bulk tests) nothing is lost either as long as the broker keeps running: the
    connection is closed cleanly after the last publish."""

    def __init__(self, url: str, *, confirm: bool = True) -> None:
        self.connection: BlockingConnection = pika.BlockingConnection(pika.URLParameters(url))
        self.channel: BlockingChannel = self.connection.channel()
        self.channel.exchange_declare(EXCHANGE, exchange_type="topic", durable=True)
        if confirm:
            self.channel.confirm_delivery()

    def publish(
        self,
        message: dict[str, Any] | bytes,
        *,
        routing_key: str = "test",
        message_id: str | None = None,
    ) -> None:
        body = message if isinstance(message, bytes) else json.dumps(message).encode()
        self.channel.basic_publish(
            EXCHANGE,
            routing_key,
            body,
            pika.BasicProperties(
                content_type="application/json", delivery_mode=2, message_id=message_id
            ),
        )

    def close(self) -> None:
        if self.connection.is_open:
            self.connection.close()


def drain_queue(url: str, queue: str = DEAD_LETTER_QUEUE) -> list[tuple[dict[str, Any], bytes]]:
    """Take every message waiting in ``queue``: (headers, body) pairs."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        out = []
        while True:
            method, props, body = channel.basic_get(queue, auto_ack=True)
            if method is None:
                return out
            out.append((dict(props.headers or {}), body))
    finally:
        connection.close()


def queue_depth(url: str, queue: str) -> tuple[int, int]:
    """(ready messages, consumers) of ``queue``."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        frame = connection.channel().queue_declare(queue, passive=True)
        return frame.method.message_count, frame.method.consumer_count
    finally:
        connection.close()


def publish_paced(
    url: str,
    messages: list[dict[str, Any] | bytes],
    rate: float,
    stop: threading.Event | None = None,
) -> int:
    """Publish ``messages`` at about ``rate`` per second (so that a test can act in the
    middle of the stream); returns how many were published before ``stop`` was set."""
    producer = Producer(url, confirm=False)
    start = time.monotonic()
    try:
        for i, message in enumerate(messages):
            if stop is not None and stop.is_set():
                return i
            producer.publish(message)
            ahead = start + (i + 1) / rate - time.monotonic()
            if ahead > 0:
                producer.connection.sleep(ahead)  # pacing the producer, not synchronising
        return len(messages)
    finally:
        producer.close()
