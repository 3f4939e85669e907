"""The SSRF guard (``bridge.ssrf``) and the guarded sender (``bridge.webhook_http``).

Only loopback is ever connected to; public addresses are classified, never contacted,
and every host name used resolves locally (numeric forms, ``localhost``).
"""

from __future__ import annotations

import ipaddress
import json
import socket
from functools import partial

import pytest
import trio

from bridge.ssrf import UrlRefused, address_problem, check_webhook_url, parse_webhook_url
from bridge.webhook_http import open_webhook_sender
from bridge.webhook_signing import build_body, signed_headers
from tests.webhooks.receiver import open_receiver

WAIT_S = 10.0
SECRET = "whsec_test"

# (URL, what the refusal must say)
REFUSED = [
    ("http://127.0.0.1/hook", "loopback"),
    ("http://[::1]:8080/hook", "loopback"),
    ("http://0x7f000001/hook", "127.0.0.1, which is a loopback"),
    ("http://2130706433/hook", "127.0.0.1, which is a loopback"),
    ("http://127.1/hook", "loopback"),
    ("http://0177.0.0.1/hook", "0177.0.0.1"),  # httpx already refuses octal forms
    ("https://localhost:8443/hook", "loopback"),
    ("http://169.254.169.254/latest/meta-data/", "link-local"),
    ("http://10.1.2.3/", "private"),
    ("http://172.16.0.1/", "private"),
    ("http://192.168.1.1/", "private"),
    ("http://100.64.0.1/", "CGNAT"),
    ("http://0.0.0.0/", "unspecified"),
    ("http://0/", "unspecified"),
    ("http://224.0.0.1/", "multicast"),
    ("http://255.255.255.255/", "reserved"),
    ("http://[fc00::1]/", "unique-local"),
    ("http://[fd12:3456::1]/", "unique-local"),
    ("http://[fe80::1]/", "link-local"),
    ("http://[::ffff:127.0.0.1]/", "IPv4-mapped"),
    ("http://[::ffff:169.254.169.254]/", "IPv4-mapped"),
    ("http://[::ffff:8.8.8.8]/", "IPv4-mapped"),
    ("http://[64:ff9b::7f00:1]/", "NAT64"),
    ("http://[2002:7f00:1::1]/", "6to4"),
    ("http://[ff02::1]/", "multicast"),
    ("http://[::]/", "unspecified"),
]

MALFORMED = [
    "ftp://example.com/hook",
    "javascript:alert(1)",
    "file:///etc/passwd",
    "gopher://127.0.0.1:25/",
    "http:///no-host",
    "http://user:password@example.com/",
    "http://exa mple.com/",
    "http://example.com/\nHost: evil",
    "http://[::1/",
    "http://ex%41mple.com/",
    "http://" + "a" * 2100 + ".com/",
    "example.com/hook",
]


@pytest.mark.parametrize(("url", "reason"), REFUSED)
async def test_private_targets_are_refused(url: str, reason: str) -> None:
    with pytest.raises(UrlRefused) as caught:
        await check_webhook_url(url, allow_private=False)
    assert reason in caught.value.reason


@pytest.mark.parametrize("url", MALFORMED)
async def test_malformed_urls_are_refused_even_when_private_is_allowed(url: str) -> None:
    with pytest.raises(UrlRefused):
        await check_webhook_url(url, allow_private=True)


async def test_allow_private_lifts_the_address_rule() -> None:
    target = await check_webhook_url("http://0x7f000001:9/x", allow_private=True)
    assert (target.host, target.port, target.host_header) == ("0x7f000001", 9, "0x7f000001:9")


@pytest.mark.parametrize(
    "address", ["93.184.216.34", "8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "2a00:1450::1"]
)
def test_public_addresses_pass(address: str) -> None:
    assert address_problem(ipaddress.ip_address(address)) is None


def test_host_header_and_default_ports() -> None:
    assert parse_webhook_url("https://Example.COM/x").host_header == "example.com"
    assert parse_webhook_url("https://example.com:443/x").port == 443
    assert parse_webhook_url("http://example.com:8080/x").host_header == "example.com:8080"
    assert parse_webhook_url("http://[2606:4700::1]:81/").host_header == "[2606:4700::1]:81"


# ------------------------------------------------------------------- the sender


def signed(body: str) -> dict[str, str]:
    return signed_headers(
        secret=SECRET, body=body, event="e", event_id="evt", attempt=1, sent_at=1_700_000_000
    )


async def test_sender_refuses_loopback_at_send_time() -> None:
    """What registration checked is checked again: a URL that now points to a private
    address (DNS rebinding) is refused before any connection is made."""
    async with (
        open_receiver(secrets={"/hook": SECRET}) as receiver,
        open_webhook_sender(allow_private=False, timeout_s=WAIT_S) as sender,
    ):
        body = build_body(event_id="evt", event="e", timestamp="t", data={})
        for url in (receiver.url_for("/hook"), receiver.url.replace("127.0.0.1", "localhost")):
            result = await sender.post(url, body=body, headers=signed(body))
            assert not result.ok
            assert result.status_code is None
            assert result.error is not None and "refused" in result.error
        assert receiver.received == []


async def test_sender_connects_to_the_checked_address_keeping_the_host_name() -> None:
    async with (
        open_receiver(secrets={"/hook": SECRET}) as receiver,
        open_webhook_sender(allow_private=True, timeout_s=WAIT_S) as sender,
    ):
        url = receiver.url.replace("127.0.0.1", "localhost") + "/hook?x=1"
        body = build_body(event_id="evt", event="e", timestamp="t", data={"name": "Zoë"})
        result = await sender.post(url, body=body, headers=signed(body))
        assert result.ok and result.status_code == 200 and result.error is None
        [got] = receiver.received
        assert got.verified
        assert got.target == "/hook?x=1"
        assert got.headers["host"] == "localhost:" + receiver.url.rsplit(":", 1)[1]
        assert got.payload == body
        assert json.loads(got.payload)["data"] == {"name": "Zoë"}


async def test_sender_reaches_ipv6_loopback_when_allowed() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    async with trio.open_nursery() as nursery:
        try:
            listeners = await nursery.start(partial(trio.serve_tcp, _answer_204, 0, host="::1"))
        except OSError:
            pytest.skip("::1 is not available here")
        port = listeners[0].socket.getsockname()[1]
        async with open_webhook_sender(allow_private=True, timeout_s=WAIT_S) as sender:
            result = await sender.post(f"http://[::1]:{port}/", body="{}", headers=signed("{}"))
        assert result.ok and result.status_code == 204
        nursery.cancel_scope.cancel()


async def _answer_204(stream: trio.SocketStream) -> None:
    async with stream:
        data = b""
        while b"\r\n\r\n" not in data or not data.endswith(b"{}"):
            chunk = await stream.receive_some(4096)
            if not chunk:
                return
            data += chunk
        await stream.send_all(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n")


async def test_sender_follows_no_redirect() -> None:
    async with (
        open_receiver(
            secrets={"/hook": SECRET}, redirect_to="http://169.254.169.254/latest/meta-data/"
        ) as receiver,
        open_webhook_sender(allow_private=True, timeout_s=WAIT_S) as sender,
    ):
        result = await sender.post(receiver.url_for("/hook"), body="{}", headers=signed("{}"))
        assert not result.ok
        assert result.status_code == 302
        assert result.error is not None
        assert "redirect refused" in result.error and "169.254.169.254" in result.error
        assert len(receiver.received) == 1


async def test_sender_times_out_the_whole_attempt() -> None:
    async with (
        open_receiver(secrets={"/hook": SECRET}, gate=trio.Event()) as receiver,
        open_webhook_sender(allow_private=True, timeout_s=0.3) as sender,
    ):
        with trio.fail_after(WAIT_S):
            result = await sender.post(receiver.url_for("/hook"), body="{}", headers=signed("{}"))
        assert not result.ok and result.status_code is None
        assert result.error is not None and "timeout" in result.error
        assert len(receiver.received) == 1


async def test_sender_reports_a_refused_connection() -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    async with open_webhook_sender(allow_private=True, timeout_s=WAIT_S) as sender:
        result = await sender.post(f"http://127.0.0.1:{port}/", body="{}", headers=signed("{}"))
    assert not result.ok and result.error is not None
    assert "connection to 127.0.0.1 failed" in result.error
