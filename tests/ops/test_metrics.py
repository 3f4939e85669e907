"""``GET /metrics``: Prometheus text from a real node, moving with real traffic.

Each test drives a served node over real sockets (REST with httpx, WebSocket with
trio-websocket), then scrapes ``/metrics`` and parses it with prometheus_client's own
parser. Waits are on conditions (the hub's ``wait_empty``, a close frame, the loop
monitor's sample count), never on sleeps.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
import trio
from trio_websocket import ConnectionClosed, open_websocket_url

from hub.metrics_catalog import METRICS, STANDARD_PREFIXES, metrics_reference
from tests.harness import WAIT_S, RunningNode, make_settings, run_node
from tests.ops.scrape import recv_json, scrape, subscriber, ws_url

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def node_overrides() -> dict[str, Any]:
    """One request per minute on the ``auth`` group: the second one is a 429."""
    return {"rate_limit_auth": "1/minute"}


async def _publish(running: RunningNode, headers: dict[str, str], **body: Any) -> None:
    response = await running.client.post("/api/v1/notifications", json=body, headers=headers)
    assert response.status_code == 202, response.text


async def _close_code(ws: Any) -> int:
    """Read until the server closes; the code it closed with."""
    with trio.fail_after(WAIT_S):
        try:
            while True:
                await ws.get_message()
        except ConnectionClosed as closed:
            return int(closed.reason.code)


async def test_metrics_move_with_traffic(hub_node: RunningNode) -> None:
    running = hub_node
    node_id = running.settings.hub_node_id
    admin = await running.create_account(admin=True)
    user = await running.create_account()
    before = await scrape(running)
    assert before.value("hub_websocket_connections", node=node_id) == 0
    assert before.value("hub_messages_published_total") == 0

    async with (
        subscriber(running, admin.access_token, "global", "admin") as first,
        subscriber(running, user.access_token, "global") as second,
    ):
        during = await scrape(running)
        assert during.value("hub_websocket_connections", node=node_id) == 2
        assert during.value("hub_subscriptions") == 3
        assert during.value("hub_channels_active") == 2

        for i in range(3):
            await _publish(running, admin.headers, channel="global", data={"title": f"n{i}"})
        for _ in range(2):  # the same id twice: published once, one duplicate
            await _publish(running, admin.headers, channel="admin", data={}, id="dup-1")
        for ws, expected in ((first, 4), (second, 3)):
            for _ in range(expected):
                await recv_json(ws, "notification")

        # A client breaking the protocol is closed with 1008 after ten bad frames.
        async with open_websocket_url(ws_url(running, user.access_token)) as bad:
            await recv_json(bad, "welcome")
            for _ in range(11):
                await bad.send_message("not json")
            assert await _close_code(bad) == 1008
    with trio.fail_after(WAIT_S):
        await running.node.realtime.hub.wait_empty()

    first_try = await running.client.post(
        "/api/v1/auth/resend-verification", json={"email": "nobody@example.com"}
    )
    limited = await running.client.post(
        "/api/v1/auth/resend-verification", json={"email": "nobody@example.com"}
    )
    assert (first_try.status_code, limited.status_code) == (202, 429)
    raw_path = f"/api/v1/no-such-thing/{uuid.uuid4().hex}"
    assert (await running.client.get(raw_path)).status_code == 404
    with trio.fail_after(WAIT_S):
        await running.node.metrics.wait_loop_lag_samples(1)

    after = await scrape(running)
    assert after.value("hub_websocket_connections", node=node_id) == 0
    assert after.value("hub_websocket_connections_opened_total") == 3
    assert after.value("hub_websocket_disconnects_total", code="1000") == 2
    policy = {"code": "1008", "reason": "too many invalid frames"}
    assert after.value("hub_websocket_disconnects_total", **policy) == 1
    assert after.value("hub_subscriptions") == 0
    assert after.value("hub_messages_published_total") == 4
    assert after.value("hub_messages_fanout_total") == 4
    assert after.value("hub_messages_delivered_total") == 3 * 2 + 1
    assert after.value("hub_messages_dropped_total", reason="duplicate") == 1
    # every publication that reached a channel with local subscribers was timed
    assert after.value("hub_fanout_duration_seconds_count") == 4
    assert after.value("hub_fanout_duration_seconds_sum") > 0

    publish = {"method": "POST", "route": "/api/v1/notifications", "status": "202"}
    assert after.value("hub_http_request_duration_seconds_count", **publish) == 5
    assert after.value("hub_http_request_duration_seconds_sum", **publish) > 0
    assert after.value("hub_http_request_duration_seconds_bucket", le="+Inf", **publish) == 5
    assert after.value("hub_http_request_duration_seconds_count", route="unmatched") == 1
    assert raw_path not in after.text, "raw paths must never become label values"
    assert after.value("hub_rate_limit_rejections_total", group="auth") == 1
    assert after.value("hub_http_request_duration_seconds_count", status="429", method="POST") == 1
    assert after.value("hub_event_loop_lag_seconds_count") >= 1
    assert after.value("hub_node_info", node=node_id) == 1
    for outcome in ("sent", "retried", "dead"):
        assert after.value("hub_email_jobs_total", outcome=outcome) is not None
    assert after.value("process_resident_memory_bytes") > 0


async def test_heartbeat_disconnects_are_counted_by_close_code(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data", heartbeat_interval=0.2, heartbeat_timeout=0.5)
    async with run_node(settings) as running:
        user = await running.create_account()
        async with open_websocket_url(ws_url(running, user.access_token)) as silent:
            await recv_json(silent, "welcome")
            assert await _close_code(silent) == 4008
        with trio.fail_after(WAIT_S):
            await running.node.realtime.hub.wait_empty()
        after = await scrape(running)
        assert (
            after.value("hub_websocket_disconnects_total", code="4008", reason="heartbeat timeout")
            == 1
        )


async def test_every_family_is_documented_and_named_by_convention(hub_node: RunningNode) -> None:
    admin = await hub_node.create_account(admin=True)
    await _publish(hub_node, admin.headers, channel="global", data={})
    result = await scrape(hub_node)
    exposed = {
        name
        for name, family in result.families.items()
        if not name.startswith(STANDARD_PREFIXES)
        and family.samples  # a family without samples is not exposed
    }
    for name, family in result.families.items():
        if name.startswith(STANDARD_PREFIXES):
            continue
        # the parser strips `_total` from counter families
        documented = f"{name}_total" if family.type == "counter" else name
        assert documented in METRICS, f"{documented} is exposed but not in hub.metrics_catalog"
        spec = METRICS[documented]
        assert spec.kind == family.type, documented
        assert name.startswith("hub_")
        if spec.kind == "histogram":
            assert name.endswith("_seconds"), f"{name}: histograms here measure seconds"
        for sample in family.samples:
            extra = set(sample.labels) - set(spec.labels) - {"le"}
            assert not extra, f"{sample.name} has undocumented labels {extra}"
    assert {"hub_websocket_connections", "hub_http_request_duration_seconds"} <= exposed


async def test_openmetrics_is_served_when_asked(hub_node: RunningNode) -> None:
    response = await hub_node.client.get(
        "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}
    )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    assert response.text.rstrip().endswith("# EOF")
    plain = await hub_node.client.get("/metrics")
    assert plain.headers["content-type"].startswith("text/plain; version=0.0.4")


async def test_each_node_has_its_own_registry(tmp_path: Path) -> None:
    async with (
        run_node(make_settings(tmp_path / "a")) as a,
        run_node(make_settings(tmp_path / "b")) as b,
    ):
        user = await a.create_account()
        async with subscriber(a, user.access_token, "global"):
            scraped_a, scraped_b = await scrape(a), await scrape(b)
        node_a, node_b = a.settings.hub_node_id, b.settings.hub_node_id
        assert scraped_a.value("hub_websocket_connections", node=node_a) == 1
        assert scraped_b.value("hub_websocket_connections", node=node_b) == 0
        assert scraped_b.value("hub_node_info", node=node_a) is None


def test_operations_metrics_table_is_generated_from_the_catalog() -> None:
    text = (ROOT / "docs" / "operations.md").read_text()
    table = text.split("<!-- metrics:begin -->\n", 1)[1].split("\n<!-- metrics:end -->", 1)[0]
    assert table == metrics_reference(), (
        "docs/operations.md is stale: regenerate the table with "
        "hub.metrics_catalog.metrics_reference()"
    )


def test_route_templates_replace_converters() -> None:
    from hub.metrics import route_label

    assert route_label("/api/v1/webhooks/<webhook_id>/deliveries") == (
        "/api/v1/webhooks/{webhook_id}/deliveries"
    )
    assert route_label("/x/<uuid:id>") == "/x/{id}"
    assert route_label(None) == "unmatched"


def test_rate_window_averages_over_its_samples() -> None:
    from hub.metrics import RateWindow

    window = RateWindow(window_s=10.0)
    assert window.sample(100.0, (0.0,)) == (0.0,)
    assert window.sample(102.0, (20.0,)) == (10.0,)
    assert window.sample(104.0, (60.0,)) == (15.0,)
    # Samples older than the window fall out: the rate is over the last ~10 s only.
    assert window.sample(120.0, (60.0,)) == pytest.approx((0.0,))


async def test_loop_lag_monitor_sees_a_pause_nearly_whole(hub_node: RunningNode) -> None:
    """A pause of the loop (synchronous work, a long collector pass) shows in
    ``hub_event_loop_lag_seconds`` nearly whole, wherever in the monitor's sleep it
    starts: an 80 ms pause reads over 50 ms (with a 0.1 s sleep, one that starts just
    after a sample read as nothing)."""
    import time

    metrics = hub_node.node.metrics
    pause_s = 0.08
    with trio.fail_after(WAIT_S):
        await metrics.wait_loop_lag_samples(metrics.loop_lag_samples + 1)
        samples = metrics.loop_lag_samples
        busy_until = time.perf_counter() + pause_s
        while time.perf_counter() < busy_until:  # synchronous work: the loop is blocked
            pass
        await metrics.wait_loop_lag_samples(samples + 1)
    assert metrics.last_loop_lag_s > 0.05
