"""HubClient against a scripted fake hub over real loopback sockets.

Rules (as in trio-websocket's own tests): localhost only, dynamic ports, no sleeps for
synchronisation — tests wait on the fake hub's event stream — and every test is bounded
by ``fail_after``.
"""

from __future__ import annotations

import base64
import json
import random
import time

import pytest
import trio

from hub.client import (
    HubAuthError,
    HubClient,
    HubClosedError,
    HubUnavailableError,
    Notification,
    RecoveryFailed,
    compare_offsets,
    full_jitter_delay,
    open_hub_client,
    parse_offset,
    token_expiry,
)
from tests.client.fakehub import open_fake_hub

TIMEOUT_S = 10


def resubscribe(frame: dict[str, object]) -> bool:
    return "since" in frame


FAST = {"backoff_base_s": 0.01, "backoff_cap_s": 0.05, "rng": random.Random(7)}


def make_jwt(exp: float, sub: str = "u1") -> str:
    def part(obj: dict[str, object]) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'HS256'})}.{part({'sub': sub, 'exp': int(exp)})}.sig"


async def take(client: HubClient, count: int) -> list[Notification]:
    notes: list[Notification] = []
    async for note in client:
        notes.append(note)
        if len(notes) == count:
            break
    return notes


# ----------------------------------------------------------------------------- pure parts


def test_offsets_compare_within_epoch_and_reset_on_new_epoch() -> None:
    assert parse_offset("e1:41") == ("e1", 41)
    assert parse_offset("node:a:7") == ("node:a", 7)
    assert parse_offset("garbage") is None
    assert compare_offsets("e1:2", None) == 1
    assert compare_offsets("e1:10", "e1:9") == 1  # numeric, not lexicographic
    assert compare_offsets("e1:9", "e1:9") == 0
    assert compare_offsets("e1:3", "e1:9") == -1
    assert compare_offsets("e2:1", "e1:9") == 1  # epoch change: a reset
    assert compare_offsets("x", "y") == 1  # unknown shapes are never dropped
    assert compare_offsets("x", "x") == 0


def test_full_jitter_stays_within_the_exponential_envelope() -> None:
    rng = random.Random(1)
    for attempt in range(12):
        ceiling = min(30.0, 0.5 * 2**attempt)
        delays = [full_jitter_delay(attempt, 0.5, 30.0, rng) for _ in range(200)]
        assert all(0.0 <= d <= ceiling for d in delays)
        assert max(delays) > ceiling * 0.8  # full jitter spreads over the whole range
    assert full_jitter_delay(10_000, 0.5, 30.0, rng) <= 30.0


def test_token_expiry_reads_exp_without_verifying() -> None:
    assert token_expiry(make_jwt(1_900_000_000)) == 1_900_000_000
    assert token_expiry("not-a-jwt") is None
    assert token_expiry("a.!!!.c") is None


def test_client_needs_a_token_or_a_provider() -> None:
    with pytest.raises(ValueError, match="token"):
        HubClient("ws://127.0.0.1:1")
    with pytest.raises(ValueError, match="ws://"):
        HubClient("ftp://127.0.0.1:1", token="t")


# ----------------------------------------------------------------------------- protocol


async def test_receives_in_order_and_pings_at_the_welcome_interval() -> None:
    with trio.fail_after(TIMEOUT_S):
        async with (
            open_fake_hub(heartbeat_interval=0.05) as hub,
            open_hub_client(hub.url, token="t1", channels=["global"], **FAST) as client,
        ):
            assert client.connected
            assert hub.tokens_seen == ["t1"]
            for i in range(5):
                await hub.publish("global", {"n": i})
            notes = await take(client, 5)
            assert [n.data["n"] for n in notes] == list(range(5))
            assert [n.offset for n in notes] == [f"e1:{i}" for i in range(1, 6)]
            assert client.last_offsets == {"global": "e1:5"}
            await hub.wait_for("ping")
            await hub.wait_for("ping")


async def test_token_can_go_in_the_query_string() -> None:
    with trio.fail_after(TIMEOUT_S):
        async with (
            open_fake_hub() as hub,
            open_hub_client(hub.url, token="q1", token_in_query=True, **FAST),
        ):
            assert hub.tokens_seen == ["q1"]


async def test_duplicates_are_dropped() -> None:
    with trio.fail_after(TIMEOUT_S):
        async with (
            open_fake_hub() as hub,
            open_hub_client(hub.url, token="t", channels=["global"], **FAST) as client,
        ):
            await hub.publish("global", {"n": 1})
            await hub.send_raw(
                {"type": "notification", "channel": "global", "offset": "e1:1", "data": {}}
            )
            await hub.publish("global", {"n": 2})
            notes = await take(client, 2)
            assert [n.offset for n in notes] == ["e1:1", "e1:2"]
            assert client.statistics().duplicates_dropped == 1


@pytest.mark.parametrize("code", [1001, 1011, 4008, 4009])
async def test_reconnects_and_recovers_without_gaps_or_duplicates(code: int) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with (
            open_fake_hub() as hub,
            open_hub_client(hub.url, token="t", channels=["global", "public.a"], **FAST) as client,
        ):
            await hub.publish("global", {"n": 1})
            await hub.publish("public.a", {"n": 1})
            assert len(await take(client, 2)) == 2
            await hub.close_all(code)
            # Published while the client is away: must come back through `since`.
            await hub.publish("global", {"n": 2})
            await hub.publish("global", {"n": 3})
            subscribe = await hub.wait_for("subscribe", resubscribe)
            assert subscribe["since"] == {"global": "e1:1", "public.a": "e1:1"}
            await hub.publish("global", {"n": 4})
            notes = await take(client, 3)
            assert [n.offset for n in notes] == ["e1:2", "e1:3", "e1:4"]
            stats = client.statistics()
            assert stats.reconnects == 1
            assert stats.last_close_code == code
            assert stats.duplicates_dropped == 1  # the fake hub replays `since` inclusive


async def test_recovered_false_is_reported_and_the_new_epoch_accepted() -> None:
    failures: list[RecoveryFailed] = []

    async def refetch(event: RecoveryFailed) -> None:
        failures.append(event)
        await trio.lowlevel.checkpoint()

    with trio.fail_after(TIMEOUT_S):
        async with (
            open_fake_hub() as hub,
            open_hub_client(
                hub.url, token="t", channels=["global"], on_recovery_failed=refetch, **FAST
            ) as client,
        ):
            for i in range(3):
                await hub.publish("global", {"n": i})
            assert len(await take(client, 3)) == 3
            hub.lose_history("e2")
            await hub.close_all(1001)
            await hub.wait_for("subscribe", resubscribe)
            await hub.publish("global", {"n": "after"})
            (note,) = await take(client, 1)
            assert note.offset == "e2:1"  # lower seq, new epoch: accepted, not a duplicate
            assert failures == [RecoveryFailed("global", "e1:3")]
            assert client.statistics().recovery_failures == 1


async def test_reconnects_after_the_node_went_away_and_came_back() -> None:
    with trio.fail_after(TIMEOUT_S):
        async with (
            open_fake_hub() as hub,
            open_hub_client(hub.url, token="t", channels=["global"], **FAST) as client,
        ):
            await hub.publish("global", {"n": 1})
            await take(client, 1)
            await hub.stop()  # connection dropped without a close frame; refused for a while
            await hub.publish("global", {"n": 2})
            await hub.start()
            subscribe = await hub.wait_for("subscribe", resubscribe)
            assert subscribe["since"] == {"global": "e1:1"}
            (note,) = await take(client, 1)
            assert note.offset == "e1:2"
            assert client.statistics().last_close_code == 1006


async def test_gives_up_after_max_attempts_when_nothing_listens() -> None:
    with trio.fail_after(TIMEOUT_S):
        sock = trio.socket.socket()
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        sock.close()  # nothing listens on this port now
        with pytest.raises(HubUnavailableError, match="gave up after 3"):
            async with open_hub_client(
                f"ws://127.0.0.1:{port}", token="t", max_reconnect_attempts=3, **FAST
            ):
                pass  # pragma: no cover


async def test_terminal_close_stops_iteration_with_the_code() -> None:
    with trio.fail_after(TIMEOUT_S):
        async with (
            open_fake_hub() as hub,
            open_hub_client(hub.url, token="t", channels=["global"], **FAST) as client,
        ):
            await hub.publish("global", {"n": 1})
            await hub.close_all(4003, "origin not allowed")
            notes: list[Notification] = []

            async def drain() -> None:
                async for note in client:
                    notes.append(note)

            with pytest.raises(HubClosedError) as caught:
                await drain()
            assert caught.value.code == 4003
            assert [n.offset for n in notes] == ["e1:1"]  # buffered ones first
            assert hub.tokens_seen == ["t"]  # never reconnected


async def test_4001_without_provider_fails_at_open() -> None:
    with trio.fail_after(TIMEOUT_S):
        async with open_fake_hub(rejected_tokens={"bad"}) as hub:
            with pytest.raises(HubAuthError) as caught:
                async with open_hub_client(hub.url, token="bad", **FAST):
                    pass  # pragma: no cover
            assert caught.value.code == 4001


async def test_4001_with_provider_reconnects_with_a_new_token() -> None:
    issued = iter(["second", "third"])

    async def provider() -> str:
        await trio.lowlevel.checkpoint()
        return next(issued)

    with trio.fail_after(TIMEOUT_S):
        async with (
            open_fake_hub() as hub,
            open_hub_client(
                hub.url, token="first", token_provider=provider, channels=["global"], **FAST
            ) as client,
        ):
            await hub.publish("global", {"n": 1})
            await take(client, 1)
            hub.rejected_tokens.add("first")
            await hub.close_all(4001, "revoked")
            await hub.publish("global", {"n": 2})
            subscribe = await hub.wait_for("subscribe", resubscribe)
            assert subscribe["since"] == {"global": "e1:1"}
            (note,) = await take(client, 1)
            assert note.data == {"n": 2}
            assert hub.tokens_seen == ["first", "second"]


async def test_4010_with_a_provider_returning_the_same_token_is_terminal() -> None:
    async def provider() -> str:
        await trio.lowlevel.checkpoint()
        return "same"

    with trio.fail_after(TIMEOUT_S):
        async with (
            open_fake_hub() as hub,
            open_hub_client(hub.url, token_provider=provider, channels=["global"], **FAST) as c,
        ):
            await hub.close_all(4010, "token expired")
            with pytest.raises(HubAuthError) as caught:
                await take(c, 1)
            assert caught.value.code == 4010


async def test_refreshes_in_band_before_the_token_expires() -> None:
    soon = make_jwt(time.time() + 3600)
    later = make_jwt(time.time() + 7200)
    calls = 0

    async def provider() -> str:
        nonlocal calls
        calls += 1
        await trio.lowlevel.checkpoint()
        return soon if calls == 1 else later

    with trio.fail_after(TIMEOUT_S):
        async with (
            open_fake_hub() as hub,
            open_hub_client(
                hub.url,
                token_provider=provider,
                channels=["global"],
                token_refresh_margin_s=3599.5,  # "expires in half a second"
                **FAST,
            ) as client,
        ):
            assert await hub.wait_for("refresh") == later
            await hub.publish("global", {"n": 1})
            await take(client, 1)  # delivered after `refreshed` on the same connection
            stats = client.statistics()
            assert stats.token_refreshes == 1
            assert stats.reconnects == 0
            assert hub.tokens_seen == [soon]


async def test_subscribe_unsubscribe_and_forbidden_channels() -> None:
    with trio.fail_after(TIMEOUT_S):
        async with (
            open_fake_hub(forbidden={"admin"}) as hub,
            open_hub_client(hub.url, token="t", **FAST) as client,
        ):
            result = await client.subscribe(["global", "admin", "public.x"])
            assert set(result.subscribed) == {"global", "public.x"}
            assert result.forbidden == ("admin",)
            assert set(client.channels) == {"global", "public.x"}
            await hub.publish("public.x", {"n": 1})
            await take(client, 1)
            await client.unsubscribe(["public.x"])
            assert client.channels == ("global",)
            assert "public.x" not in client.last_offsets
            await hub.publish("public.x", {"n": 2})  # the server no longer sends it
            await hub.publish("global", {"n": 3})
            (note,) = await take(client, 1)
            assert note.channel == "global"


async def test_subscribe_while_disconnected_waits_for_the_next_connection() -> None:
    with trio.fail_after(TIMEOUT_S):
        async with (
            open_fake_hub() as hub,
            open_hub_client(hub.url, token="t", channels=["global"], **FAST) as client,
        ):
            async with trio.open_nursery() as nursery:
                await hub.close_all(1011)
                results = []

                async def sub() -> None:
                    results.append(await client.subscribe(["public.late"]))

                nursery.start_soon(sub)
            assert results[0].subscribed == ("public.late",)
            assert set(client.channels) == {"global", "public.late"}


async def test_ids_are_optional_in_replies() -> None:
    with trio.fail_after(TIMEOUT_S):
        async with (
            open_fake_hub(echo_ids=False) as hub,
            open_hub_client(hub.url, token="t", channels=["global"], **FAST) as client,
        ):
            assert client.connected
            await client.unsubscribe(["global"])
            assert hub.frames[-1]["type"] == "unsubscribe"


async def test_aclose_is_idempotent_and_ends_iteration() -> None:
    with trio.fail_after(TIMEOUT_S):
        async with (
            open_fake_hub() as hub,
            open_hub_client(hub.url, token="t", channels=["global"], **FAST) as client,
        ):
            await client.aclose()
            await client.aclose()
            assert [n async for n in client] == []
            assert await hub.wait_for("closed") == 1000


async def test_errors_raised_in_the_block_propagate_unwrapped() -> None:
    with trio.fail_after(TIMEOUT_S):
        async with open_fake_hub() as hub:
            with pytest.raises(KeyError, match="mine"):
                async with open_hub_client(hub.url, token="t", **FAST):
                    raise KeyError("mine")
