"""SPEC §3 over real sockets with third-party clients: frames, channel rules, every error
frame and every close code."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
import trio
from trio_websocket import ConnectionClosed, HandshakeError, open_websocket_url

from actors.close_codes import CloseCode
from tests.harness import Account, RunningNode
from tests.realtime import rawws
from tests.realtime.conftest import connect, publish, ws_url

pytestmark = pytest.mark.usefixtures("hub_node")


def port_of(running: RunningNode) -> int:
    return int(running.url.rsplit(":", 1)[1])


def short_token(running: RunningNode, account: Account, lifetime_s: float) -> str:
    """An access token of ``account`` that expires in ``lifetime_s`` seconds."""
    services = running.node.services
    claims = services.tokens.decode_access(account.access_token)
    issued = time.time() - services.tokens.access_ttl_s + lifetime_s
    return str(services.tokens.issue_pair(account.user, claims.session_id, now=issued).access_token)


# -- handshake and welcome -------------------------------------------------------------
async def test_welcome_frame(hub_node: RunningNode, user: Account) -> None:
    async with connect(hub_node, user.access_token, welcome=False) as client:
        welcome = await client.recv()
    assert welcome["type"] == "welcome"
    assert welcome["user_id"] == user.user_id
    assert welcome["heartbeat_interval"] == hub_node.settings.heartbeat_interval
    assert isinstance(welcome["connection_id"], str) and welcome["connection_id"]


async def test_token_in_authorization_header(hub_node: RunningNode, user: Account) -> None:
    async with connect(hub_node, user.access_token, via_header=True) as client:
        assert (await client.request({"type": "ping"}, "pong")) == {"type": "pong"}


@pytest.mark.parametrize("token", [None, "garbage", "a.b.c"])
async def test_missing_or_invalid_token_is_4001(hub_node: RunningNode, token: str | None) -> None:
    async with connect(hub_node, token, welcome=False) as client:
        assert await client.close_code() == CloseCode.UNAUTHORIZED


async def test_expired_and_refresh_tokens_are_4001(hub_node: RunningNode, user: Account) -> None:
    expired = short_token(hub_node, user, -60)
    for token in (expired, user.refresh_token):
        async with connect(hub_node, token, welcome=False) as client:
            assert await client.close_code() == CloseCode.UNAUTHORIZED


async def test_revoked_token_is_4001(hub_node: RunningNode, user: Account) -> None:
    response = await hub_node.client.post("/api/v1/auth/logout", headers=user.headers)
    assert response.status_code == 200
    async with connect(hub_node, user.access_token, welcome=False) as client:
        assert await client.close_code() == CloseCode.UNAUTHORIZED


@pytest.fixture
def node_overrides(request: pytest.FixtureRequest) -> dict[str, Any]:
    return dict(getattr(request, "param", {}))


@pytest.mark.parametrize(
    "node_overrides", [{"allowed_origins": ["https://app.example.com"]}], indirect=True
)
async def test_origin_not_allowed_is_4003(hub_node: RunningNode, user: Account) -> None:
    evil = [(b"Origin", b"https://evil.example.com")]
    async with connect(hub_node, user.access_token, headers=evil, welcome=False) as client:
        assert await client.close_code() == CloseCode.FORBIDDEN_ORIGIN
    good = [(b"Origin", b"https://APP.example.com/")]
    async with connect(hub_node, user.access_token, headers=good) as client:
        assert (await client.request({"type": "ping"}, "pong"))["type"] == "pong"
    # Origin is checked before the token: a bad origin never learns if a token is valid.
    async with connect(hub_node, "garbage", headers=evil, welcome=False) as client:
        assert await client.close_code() == CloseCode.FORBIDDEN_ORIGIN


UPGRADE = b"GET /ws/notifications HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (UPGRADE + b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\r\n", b"400"),
        (
            UPGRADE + b"Connection: Upgrade\r\nSec-WebSocket-Key: a2V5a2V5a2V5a2V5a2V5a2V5\r\n"
            b"Sec-WebSocket-Version: 8\r\n\r\n",
            b"426",
        ),
        (UPGRADE + b"X-Pad: " + b"x" * 20000 + b"\r\n\r\n", b"400"),  # head over 16 KiB
    ],
)
async def test_malformed_upgrade_is_an_http_error(
    hub_node: RunningNode, request_bytes: bytes, status: bytes
) -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", port_of(hub_node))
    await stream.send_all(request_bytes)
    answer = b""
    with trio.fail_after(5):
        while b"\r\n\r\n" not in answer:
            answer += await stream.receive_some()
    assert answer.startswith(b"HTTP/1.1 " + status), answer[:100]
    if status == b"426":
        assert b"Sec-WebSocket-Version: 13" in answer
    await stream.aclose()


async def test_frames_sent_with_the_upgrade_are_not_lost(
    hub_node: RunningNode, user: Account
) -> None:
    early = rawws.client_frame(rawws.OP_TEXT, b'{"type":"ping","id":"early"}')
    client = await rawws.raw_connect(port_of(hub_node), user.access_token, early=early)
    with trio.fail_after(5):
        assert (await client.json_until("pong")) == {"type": "pong", "id": "early"}
    await client.aclose()


# -- requests and replies --------------------------------------------------------------
async def test_subscribe_unsubscribe_ping_echo_ids(hub_node: RunningNode, user: Account) -> None:
    async with connect(hub_node, user.access_token) as client:
        reply = await client.subscribe("global", "public.news", id="s1")
        assert reply["id"] == "s1" and reply["channels"] == ["global", "public.news"]
        assert "recovered" not in reply
        assert set(reply["offsets"]) == {"global", "public.news"}
        pong = await client.request({"type": "ping", "id": 42}, "pong")
        assert pong == {"type": "pong", "id": 42}
        reply = await client.request(
            {"type": "unsubscribe", "channels": ["public.news", "public.never"], "id": "u"},
            "unsubscribed",
        )
        assert reply == {
            "type": "unsubscribed",
            "channels": ["public.news", "public.never"],
            "id": "u",
        }


async def test_channel_rules(hub_node: RunningNode, user: Account, admin: Account) -> None:
    other = await hub_node.create_account(login=False)
    async with connect(hub_node, user.access_token) as client:
        own = f"user.{user.user_id}"
        await client.send(
            {
                "type": "subscribe",
                "id": 1,
                "channels": [
                    "global",
                    "admin",
                    f"user.{other.user_id}",
                    own,
                    "private.x",
                    "bad name!",
                    "public.ok",
                ],
            }
        )
        reply, before = await client.recv_until(lambda f: f["type"] == "subscribed")
        assert reply["channels"] == ["global", own, "public.ok"]
        errors = {f["channel"]: f["code"] for f in before}
        assert errors == {
            "admin": "FORBIDDEN",
            f"user.{other.user_id}": "FORBIDDEN",
            "private.x": "FORBIDDEN",
            "bad name!": "VALIDATION_ERROR",
        }
        assert all(f["type"] == "error" and f["id"] == 1 for f in before)
    async with connect(hub_node, admin.access_token) as client:
        reply = await client.subscribe("admin", "admin.alerts", f"user.{user.user_id}")
        assert reply["channels"] == ["admin", "admin.alerts"]


async def test_duplicate_subscribe_is_idempotent(
    hub_node: RunningNode, user: Account, admin: Account
) -> None:
    async with connect(hub_node, user.access_token) as client:
        await client.subscribe("public.dup")
        again = await client.subscribe("public.dup", "public.dup")
        assert again["channels"] == ["public.dup"]
        await publish(hub_node, admin, channel="public.dup", data={"n": 1})
        first = await client.recv()
        assert first["type"] == "notification"
        pong = await client.request({"type": "ping"}, "pong")  # nothing else in between
        assert pong == {"type": "pong"}


@pytest.mark.parametrize("node_overrides", [{"ws_max_channels": 3}], indirect=True)
async def test_channel_limit(hub_node: RunningNode, user: Account) -> None:
    async with connect(hub_node, user.access_token) as client:
        await client.subscribe("public.1", "public.2")
        await client.send({"type": "subscribe", "channels": ["public.3", "public.4", "public.2"]})
        reply, before = await client.recv_until(lambda f: f["type"] == "subscribed")
        assert reply["channels"] == ["public.3", "public.2"]
        assert [(f["code"], f["channel"]) for f in before] == [("LIMIT_EXCEEDED", "public.4")]
        await client.request({"type": "unsubscribe", "channels": ["public.1"]}, "unsubscribed")
        assert (await client.subscribe("public.4"))["channels"] == ["public.4"]


async def test_bad_frames_get_validation_errors_and_the_connection_stays(
    hub_node: RunningNode, user: Account
) -> None:
    bad = [
        ("not json", None),
        ("[1]", None),
        ("{}", None),
        ('{"type":"dance","id":"d"}', "d"),
        ('{"type":"subscribe","channels":"global","id":9}', 9),
    ]
    async with connect(hub_node, user.access_token) as client:
        for text, frame_id in bad:
            await client.ws.send_message(text)
            frame = await client.recv()
            assert frame["type"] == "error" and frame["code"] == "VALIDATION_ERROR", frame
            assert frame.get("id") == frame_id
        assert await client.request({"type": "ping"}, "pong") == {"type": "pong"}


async def test_too_many_bad_frames_is_1008(hub_node: RunningNode, user: Account) -> None:
    async with connect(hub_node, user.access_token) as client:
        for _ in range(11):
            await client.ws.send_message("nope")
        assert await client.close_code() == CloseCode.POLICY_VIOLATION


async def test_binary_frame_is_1003(hub_node: RunningNode, user: Account) -> None:
    async with connect(hub_node, user.access_token) as client:
        await client.ws.send_message(b"\x00\x01")
        assert await client.close_code() == CloseCode.UNSUPPORTED_DATA


async def test_invalid_utf8_is_1007(hub_node: RunningNode, user: Account) -> None:
    client = await rawws.raw_connect(port_of(hub_node), user.access_token)
    await client.json_until("welcome")
    await client.send(rawws.client_frame(rawws.OP_TEXT, b'{"type":"\xff\xfe"}'))
    with trio.fail_after(5):
        assert await client.close_code() == CloseCode.INVALID_PAYLOAD
    await client.aclose()


async def test_unmasked_client_frame_is_1002(hub_node: RunningNode, user: Account) -> None:
    client = await rawws.raw_connect(port_of(hub_node), user.access_token)
    await client.json_until("welcome")
    await client.send(bytes((0x81, 4)) + b"ping")  # clients must mask every frame
    with trio.fail_after(5):
        assert await client.close_code() == CloseCode.PROTOCOL_ERROR
    await client.aclose()


async def test_oversized_message_is_1009(hub_node: RunningNode, user: Account) -> None:
    limit = hub_node.settings.ws_max_frame_bytes
    async with connect(hub_node, user.access_token) as client:
        await client.send({"type": "ping", "pad": "x" * (limit - 100)})  # just under: fine
        assert (await client.recv())["type"] == "pong"
        await client.send({"type": "ping", "pad": "x" * limit})
        assert await client.close_code() == CloseCode.MESSAGE_TOO_BIG


async def test_oversized_fragmented_message_is_1009_without_buffering_it(
    hub_node: RunningNode, user: Account
) -> None:
    client = await rawws.raw_connect(port_of(hub_node), user.access_token)
    await client.json_until("welcome")
    chunk = b"x" * 16384
    with trio.fail_after(10):
        await client.send(rawws.client_frame(rawws.OP_TEXT, chunk, fin=False))
        try:
            for _ in range(64):  # 1 MiB announced in pieces; the server stops early
                await client.send(rawws.client_frame(0x0, chunk, fin=False))
        except OSError:
            pass  # the server may already have closed
        assert await client.close_code() == CloseCode.MESSAGE_TOO_BIG
    await client.aclose()


# -- heartbeat and token lifetime ------------------------------------------------------
HEARTBEAT = {"heartbeat_interval": 0.4, "heartbeat_timeout": 0.8}


@pytest.mark.parametrize("node_overrides", [HEARTBEAT], indirect=True)
async def test_silence_is_4008_and_pings_keep_alive(hub_node: RunningNode, user: Account) -> None:
    async with connect(hub_node, user.access_token) as client:
        started = trio.current_time()
        assert await client.close_code(timeout=5) == CloseCode.HEARTBEAT_TIMEOUT
        assert trio.current_time() - started < 0.8 + 1.0
    async with connect(hub_node, user.access_token) as client:
        end = trio.current_time() + 2.0  # 2.5 timeouts
        while trio.current_time() < end:
            await client.ws.ping()  # a WebSocket ping counts as well as ours
            await trio.sleep(0.3)
        assert await client.request({"type": "ping"}, "pong") == {"type": "pong"}


async def test_token_expiry_is_4010(hub_node: RunningNode, user: Account) -> None:
    token = short_token(hub_node, user, 1.0)
    async with connect(hub_node, token) as client:
        assert await client.close_code(timeout=5) == CloseCode.TOKEN_EXPIRED


async def test_refresh_in_band_extends_the_connection(hub_node: RunningNode, user: Account) -> None:
    token = short_token(hub_node, user, 1.5)
    other = await hub_node.create_account()
    async with connect(hub_node, token) as client:
        # another user's token, or garbage, is refused and the connection stays
        for bad in (other.access_token, "garbage"):
            await client.send({"type": "refresh", "token": bad, "id": "r0"})
            error = await client.recv()
            assert error["code"] == "UNAUTHORIZED" and error["id"] == "r0"
        refreshed = await client.request(
            {"type": "refresh", "token": user.access_token, "id": "r1"}, "refreshed"
        )
        assert refreshed == {"type": "refreshed", "id": "r1"}
        await trio.sleep(2.0)  # past the first token's expiry
        assert await client.request({"type": "ping"}, "pong") == {"type": "pong"}


# -- revocation ------------------------------------------------------------------------
async def test_logout_closes_that_sessions_sockets_within_a_second(
    hub_node: RunningNode, user: Account
) -> None:
    other = await hub_node.create_account()
    async with (
        connect(hub_node, user.access_token) as mine,
        connect(hub_node, other.access_token) as theirs,
    ):
        response = await hub_node.client.post("/api/v1/auth/logout", headers=user.headers)
        assert response.status_code == 200
        assert await mine.close_code(timeout=1.0) == CloseCode.UNAUTHORIZED
        assert await theirs.request({"type": "ping"}, "pong") == {"type": "pong"}


async def test_account_deletion_closes_every_socket_of_the_user(
    hub_node: RunningNode, user: Account
) -> None:
    second = Account(user.user, user.email, user.password)
    await hub_node.login(second)  # a second session of the same user
    async with (
        connect(hub_node, user.access_token) as one,
        connect(hub_node, second.access_token) as two,
    ):
        response = await hub_node.client.delete("/api/v1/users/me", headers=user.headers)
        assert response.status_code == 200
        with trio.fail_after(1.0):
            assert await one.close_code() == CloseCode.UNAUTHORIZED
            assert await two.close_code() == CloseCode.UNAUTHORIZED


# -- the websockets library (sync client in a thread) ----------------------------------
async def test_websockets_sync_client(hub_node: RunningNode, user: Account, admin: Account) -> None:
    from websockets.sync.client import connect as sync_connect

    url = ws_url(hub_node, user.access_token)
    ready = trio.Event()
    token = trio.lowlevel.current_trio_token()

    def run() -> list[dict[str, Any]]:
        with sync_connect(url, open_timeout=10, close_timeout=5) as ws:
            frames = [json.loads(ws.recv(10))]
            ws.send(json.dumps({"type": "subscribe", "channels": ["public.sync"], "id": 1}))
            frames.append(json.loads(ws.recv(10)))
            trio.from_thread.run_sync(ready.set, trio_token=token)
            frames.append(json.loads(ws.recv(10)))
            return frames

    async with trio.open_nursery() as nursery:
        result: list[list[dict[str, Any]]] = []

        async def client() -> None:
            result.append(await trio.to_thread.run_sync(run))

        nursery.start_soon(client)
        with trio.fail_after(10):
            await ready.wait()
        await publish(hub_node, admin, channel="public.sync", data={"title": "t"})
    welcome, subscribed, note = result[0]
    assert welcome["type"] == "welcome" and subscribed["type"] == "subscribed"
    assert note["type"] == "notification" and note["data"]["title"] == "t"


async def test_websockets_sync_client_sees_4001(hub_node: RunningNode) -> None:
    from websockets.exceptions import ConnectionClosedError
    from websockets.sync.client import connect as sync_connect

    def run() -> int | None:
        with sync_connect(ws_url(hub_node, "garbage"), open_timeout=10) as ws:
            try:
                ws.recv(10)
            except ConnectionClosedError as closed:
                return closed.rcvd.code if closed.rcvd else None
        return None

    assert await trio.to_thread.run_sync(run) == CloseCode.UNAUTHORIZED


async def test_plain_http_get_of_the_path_is_not_an_upgrade(hub_node: RunningNode) -> None:
    response = await hub_node.client.get("/ws/notifications")
    assert response.status_code == 404
    with pytest.raises((HandshakeError, ConnectionClosed)):
        async with open_websocket_url(ws_url(hub_node).replace("/ws/", "/wss/")):
            pass


@pytest.mark.parametrize("node_overrides", [{"ws_allow_deflate": True}], indirect=True)
async def test_permessage_deflate_when_allowed(hub_node: RunningNode, user: Account) -> None:
    from websockets.exceptions import ConnectionClosedError
    from websockets.sync.client import connect as sync_connect

    limit = hub_node.settings.ws_max_frame_bytes

    def run() -> tuple[str, dict[str, Any], int | None]:
        with sync_connect(ws_url(hub_node, user.access_token), open_timeout=10) as ws:
            negotiated = ws.response.headers.get("Sec-WebSocket-Extensions", "")
            ws.recv(10)  # welcome
            ws.send(json.dumps({"type": "ping", "id": "z", "pad": " " * 1000}))  # compressed
            pong = json.loads(ws.recv(10))
            ws.send(json.dumps({"type": "ping", "pad": "x" * limit}))  # tiny once compressed
            try:
                ws.recv(10)
            except ConnectionClosedError as closed:
                return negotiated, pong, closed.rcvd.code if closed.rcvd else None
        return negotiated, pong, None

    negotiated, pong, code = await trio.to_thread.run_sync(run)
    assert negotiated.startswith("permessage-deflate")
    assert pong == {"type": "pong", "id": "z"}
    assert code == CloseCode.MESSAGE_TOO_BIG


async def test_permessage_deflate_is_off_by_default(hub_node: RunningNode, user: Account) -> None:
    from websockets.sync.client import connect as sync_connect

    def run() -> str | None:
        with sync_connect(ws_url(hub_node, user.access_token), open_timeout=10) as ws:
            return ws.response.headers.get("Sec-WebSocket-Extensions")

    assert await trio.to_thread.run_sync(run) is None
