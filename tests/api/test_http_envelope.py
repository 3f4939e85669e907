"""The envelope, request ids and the generic errors (404, 405, 413, malformed JSON)."""

from __future__ import annotations

from typing import Any

import h11
import pytest
import trio
import trio.testing

from tests.harness import RunningNode

RATE_HEADERS = ("X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset")


def assert_error(response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"status", "error", "meta"}
    assert body["status"] == "error"
    assert body["error"]["code"] == code
    assert set(body["meta"]) == {"timestamp", "request_id"}
    assert "Traceback" not in response.text
    return body["error"]


@pytest.mark.parametrize("path", ["/api/v1/nope", "/api/v1/users/me/extra", "/nothing", "/api"])
async def test_unknown_route_is_404_enveloped(hub_node: RunningNode, path: str) -> None:
    response = await hub_node.client.get(path)
    assert_error(response, 404, "NOT_FOUND")
    if path.startswith("/api/v1"):
        for header in RATE_HEADERS:
            assert header in response.headers


async def test_wrong_method_is_405_with_allow(hub_node: RunningNode) -> None:
    response = await hub_node.client.delete("/api/v1/auth/login")
    assert_error(response, 405, "METHOD_NOT_ALLOWED")
    assert "POST" in response.headers["Allow"]
    for header in RATE_HEADERS:
        assert header in response.headers


async def test_body_over_one_mib_is_413(hub_node: RunningNode) -> None:
    response = await hub_node.client.post(
        "/api/v1/auth/register",
        content=b'{"email": "' + b"a" * (1024 * 1024 + 10) + b'"}',
        headers={"Content-Type": "application/json"},
    )
    assert_error(response, 413, "PAYLOAD_TOO_LARGE")
    # the node keeps serving (also on a fresh connection)
    assert (await hub_node.client.get("/health")).status_code == 200


@pytest.mark.parametrize(
    "content",
    [
        b"{bad",
        b'{"email": "a@b.c",',
        b"[]",
        b'"string"',
        b"null",
        b"",
        b"   ",
        b"\xff\xfe\x00garbage",
        b'{"email": NaN}',
        b"[" * 100_000,
    ],
)
async def test_malformed_json_is_400(hub_node: RunningNode, content: bytes) -> None:
    response = await hub_node.client.post(
        "/api/v1/auth/login", content=content, headers={"Content-Type": "application/json"}
    )
    error = assert_error(response, 400, "VALIDATION_ERROR")
    assert "field" not in error


async def test_request_id_is_echoed_sanitised_or_generated(hub_node: RunningNode) -> None:
    echoed = await hub_node.client.get("/api/v1/nope", headers={"X-Request-ID": "abc-123"})
    assert echoed.headers["X-Request-ID"] == "abc-123"
    assert echoed.json()["meta"]["request_id"] == "abc-123"

    dirty = await hub_node.client.get(
        "/health", headers={"X-Request-ID": "<script>x</script>" + "y" * 200}
    )
    rid = dirty.headers["X-Request-ID"]
    assert "<" not in rid and len(rid) <= 64

    generated = await hub_node.client.get("/health")
    assert generated.headers["X-Request-ID"].startswith("req-")


async def test_success_envelope_shape(hub_node: RunningNode) -> None:
    account = await hub_node.create_account()
    response = await hub_node.client.get("/api/v1/users/me", headers=account.headers)
    body = response.json()
    assert body["status"] == "success"
    assert set(body["meta"]) == {"timestamp", "request_id"}
    assert body["meta"]["timestamp"].endswith("Z")


async def test_keep_alive_survives_a_body_the_route_ignores(hub_node: RunningNode) -> None:
    """Headers first, body later, on a route that never reads the body (405): the answer
    and the next request on the same connection still work (a hypercorn/quart-trio race
    used to leave the connection hanging)."""
    host, port = hub_node.url.removeprefix("http://").rsplit(":", 1)
    stream = await trio.open_tcp_stream(host, int(port))
    connection = h11.Connection(h11.CLIENT)
    body = b'{"email": "a@example.com"}'
    async with stream:
        for _ in range(3):
            head = h11.Request(
                method="PATCH",
                target="/api/v1/auth/login",
                headers=[("Host", host), ("Content-Length", str(len(body)))],
            )
            await stream.send_all(connection.send(head))
            await trio.testing.wait_all_tasks_blocked()
            await stream.send_all(connection.send(h11.Data(data=body)))
            await stream.send_all(connection.send(h11.EndOfMessage()))
            status = None
            with trio.fail_after(5):
                while True:
                    event = connection.next_event()
                    if event is h11.NEED_DATA:
                        connection.receive_data(await stream.receive_some(65536))
                    elif isinstance(event, h11.Response):
                        status = event.status_code
                    elif isinstance(event, h11.EndOfMessage):
                        break
            assert status == 405
            connection.start_next_cycle()
