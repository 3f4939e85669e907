"""The front door: a WebSocket upgrade is served on the lean path whether it is the
first request of a connection or follows HTTP requests on a kept-alive one (as proxies
with upstream keep-alive send it)."""

from __future__ import annotations

import trio

from tests.harness import WAIT_S, Account, RunningNode
from tests.realtime.conftest import publish
from tests.realtime.rawws import RawClient, upgrade_request


async def _http_get(client: RawClient, path: str) -> bytes:
    await client.send(f"GET {path} HTTP/1.1\r\nHost: hub\r\n\r\n".encode())
    while b"\r\n\r\n" not in client.buffer:
        assert await client._fill(), "closed before the answer"
    head, _, rest = bytes(client.buffer).partition(b"\r\n\r\n")
    length = int(
        next(
            line.split(b":", 1)[1]
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
    )
    while len(rest) < length:
        assert await client._fill(), "closed inside the body"
        rest = bytes(client.buffer).partition(b"\r\n\r\n")[2]
    client.buffer = bytearray(rest[length:])
    return head


async def test_upgrade_after_keep_alive_requests_reaches_the_websocket_path(
    hub_node: RunningNode, user: Account, admin: Account
) -> None:
    port = int(hub_node.url.rsplit(":", 1)[1])
    sock = trio.socket.socket()
    await sock.connect(("127.0.0.1", port))
    client = RawClient(sock)
    with trio.fail_after(WAIT_S):
        for _ in range(2):
            assert (await _http_get(client, "/health")).startswith(b"HTTP/1.1 200")

        await client.send(upgrade_request(port, user.access_token))
        while b"\r\n\r\n" not in client.buffer:
            assert await client._fill(), "no handshake answer"
        head, _, rest = bytes(client.buffer).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head
        client.buffer = bytearray(rest)

        assert (await client.json_until("welcome"))["user_id"] == user.user_id
        await client.send_json({"type": "subscribe", "channels": ["global"], "id": 1})
        assert (await client.json_until("subscribed"))["channels"] == ["global"]
        await publish(hub_node, admin, channel="global", data={"title": "hello"})
        note = await client.json_until("notification")
        assert note["data"]["title"] == "hello"
    await client.aclose()
    assert hub_node.node.realtime.stats()["connections"] <= 1
