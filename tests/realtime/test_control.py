"""Node-wide control messages: the in-process broker's control channel, and revocations
announced by other nodes (``{"type":"revoke",…}``) applied by the realtime core."""

from __future__ import annotations

import json
import time
from typing import Any

from actors.close_codes import CloseCode
from bridge.broker import Publication
from bridge.broker_memory import MemoryBroker
from tests.harness import RunningNode
from tests.realtime.conftest import connect


class NullHandler:
    def handle_publication(self, channel: str, publication: Publication) -> None:
        pass

    def handle_gap(self, channel: str) -> None:
        pass


async def test_memory_broker_control_messages_reach_every_callback() -> None:
    broker = MemoryBroker(NullHandler(), history_size=1, history_ttl_s=60)
    await broker.ping()
    seen: list[tuple[str, bytes]] = []

    def broken(payload: bytes) -> None:
        raise RuntimeError("listener bug")

    broker.subscribe_control(lambda payload: seen.append(("first", payload)))
    broker.subscribe_control(broken)
    broker.subscribe_control(lambda payload: seen.append(("last", payload)))
    await broker.publish_control(b"one")
    await broker.publish_control(b"two")
    assert seen == [("first", b"one"), ("last", b"one"), ("first", b"two"), ("last", b"two")]


def announcement(**fields: Any) -> bytes:
    message = {"type": "revoke", "kind": "session", "ts": time.time() + 600, "node": "other"}
    message.update(fields)
    return json.dumps(message).encode()


async def test_revocations_announced_by_other_nodes_are_applied(hub_node: RunningNode) -> None:
    node = hub_node.node
    broker = node.realtime._broker
    services = node.services
    account = await hub_node.create_account()
    session_id = services.authenticate(account.access_token).session_id

    async with connect(hub_node, account.access_token) as client:
        # Ignored: from this node itself (already applied here), other message types,
        # malformed ones. None of them may break the control listener either.
        for payload in (
            announcement(id=session_id, node=node.settings.hub_node_id),
            announcement(id=session_id, type="something-else"),
            announcement(id=session_id, kind="team"),
            announcement(id=session_id, ts="soon"),
            announcement(id=""),
            b"not json",
            b"[1, 2]",
        ):
            await broker.publish_control(payload)
        assert await client.request({"type": "ping"}, "pong") == {"type": "pong"}

        await broker.publish_control(announcement(id=session_id))
        assert await client.close_code() == CloseCode.UNAUTHORIZED
    me = await hub_node.client.get("/api/v1/users/me", headers=account.headers)
    assert me.status_code == 401

    await hub_node.login(account)  # a new session: a user revocation kills it too
    await broker.publish_control(announcement(kind="user", id=account.user_id, ts=time.time()))
    me = await hub_node.client.get("/api/v1/users/me", headers=account.headers)
    assert me.status_code == 401
