"""``GET /api/v1/admin/stats`` and the files of the admin page ``/admin``."""

from __future__ import annotations

import re

from tests.harness import RunningNode
from tests.ops.scrape import recv_json, subscriber


async def test_admin_stats_show_connections_channels_and_rates(hub_node: RunningNode) -> None:
    running = hub_node
    admin = await running.create_account(admin=True)
    user = await running.create_account()
    async with (
        subscriber(running, user.access_token, "global", f"user.{user.user_id}"),
        subscriber(running, admin.access_token, "global") as watcher,
    ):
        first = await running.client.get("/api/v1/admin/stats", headers=admin.headers)
        assert first.status_code == 200, first.text
        data = first.json()["data"]
        assert data["node_id"] == running.settings.hub_node_id
        assert data["connections"] == 2
        assert data["subscriptions"] == 3
        assert data["channels_active"] == 2
        assert data["channels"] == [
            {"name": "global", "subscribers": 2},
            {"name": f"user.{user.user_id}", "subscribers": 1},
        ]
        for i in range(5):
            published = await running.client.post(
                "/api/v1/notifications",
                json={"channel": "global", "data": {"title": str(i)}},
                headers=admin.headers,
            )
            assert published.status_code == 202
            await recv_json(watcher, "notification")
        second = await running.client.get("/api/v1/admin/stats", headers=admin.headers)
        data = second.json()["data"]
        assert data["messages_total"] == 5
        assert data["delivered_total"] == 10
        assert data["messages_per_second"] > 0
        assert data["deliveries_per_second"] >= data["messages_per_second"]
        assert second.headers["X-RateLimit-Limit"], "an /api/v1 route: rate-limited as admin"


async def test_admin_stats_are_for_admins_only(hub_node: RunningNode) -> None:
    user = await hub_node.create_account()
    anonymous = await hub_node.client.get("/api/v1/admin/stats")
    assert anonymous.status_code == 401
    forbidden = await hub_node.client.get("/api/v1/admin/stats", headers=user.headers)
    assert forbidden.status_code == 403
    assert forbidden.json()["error"]["code"] == "FORBIDDEN"


async def test_admin_page_is_static_with_a_strict_csp(hub_node: RunningNode) -> None:
    page = await hub_node.client.get("/admin")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert "frame-ancestors 'none'" in csp
    assert page.headers["x-content-type-options"] == "nosniff"
    assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", page.text), "no inline scripts"
    assert not re.search(r"\son\w+=", page.text), "no inline event handlers"
    assert "https://" not in page.text, "nothing from a CDN"
    assert (await hub_node.client.get("/admin/")).status_code == 200
    for name, kind in (("admin.js", "text/javascript"), ("admin.css", "text/css")):
        asset = await hub_node.client.get(f"/admin/{name}")
        assert asset.status_code == 200
        assert asset.headers["content-type"].startswith(kind)
        assert f"/admin/{name}" in page.text
    missing = await hub_node.client.get("/admin/../app.py")
    assert missing.status_code == 404
    assert (await hub_node.client.get("/admin/secrets.txt")).status_code == 404


async def test_openapi_lists_admin_stats_but_not_pages_or_metrics(hub_node: RunningNode) -> None:
    paths = (await hub_node.client.get("/openapi.json")).json()["paths"]
    assert "get" in paths["/api/v1/admin/stats"]
    assert not {"/metrics", "/admin", "/admin/", "/admin/{name}"} & set(paths)
