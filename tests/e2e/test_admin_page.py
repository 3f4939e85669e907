"""The admin page in a real browser: headless Chromium against a real node.

A person's path through ``/admin``: sign in through the form, watch a notification
published over REST arrive live (the page's own WebSocket), publish from the form and
see it arrive, see the channels table, the charts and a webhook delivery; a non-admin is
turned away. A screenshot is saved under the test's tmp dir (and, with
``HUB_ADMIN_SCREENSHOT=<path>``, also there: how ``docs/admin.png`` was made).
"""

from __future__ import annotations

import os
import uuid
from functools import partial
from pathlib import Path

import trio

from tests.e2e.browser import AdminPage, require_browser, start_browser
from tests.e2e.receiver import WebhookReceiver
from tests.harness import PASSWORD, WAIT_S, RunningNode

#: Seconds the whole browser session may take.
SESSION_TIMEOUT_S = 60


async def test_admin_page_end_to_end(hub_node: RunningNode, tmp_path: Path) -> None:
    require_browser()
    running = hub_node
    admin = await running.create_account(admin=True, full_name="Ada Admin")
    user = await running.create_account(full_name="Uma User")
    tag = uuid.uuid4().hex[:6]

    async with trio.open_nursery() as nursery:
        receiver = WebhookReceiver()
        await nursery.start(receiver.run)
        created = await running.client.post(
            "/api/v1/webhooks",
            json={"url": receiver.url, "events": ["order.shipped"], "description": "e2e"},
            headers=admin.headers,
        )
        assert created.status_code == 201, created.text

        driver = await trio.to_thread.run_sync(start_browser, tmp_path / "chromium-profile")
        try:
            with trio.fail_after(SESSION_TIMEOUT_S):
                page = AdminPage(driver, running.url)
                run = trio.to_thread.run_sync

                await run(page.open)
                await run(page.login, admin.email, PASSWORD)
                await run(page.wait_dashboard)
                await run(page.wait_live)

                # A notification published by someone else over REST shows up live.
                rest_title = f"Deploy finished {tag}"
                published = await running.client.post(
                    "/api/v1/notifications",
                    json={
                        "channel": "global",
                        "data": {"title": rest_title, "body": "Published over REST"},
                    },
                    headers=admin.headers,
                )
                assert published.status_code == 202, published.text
                await run(page.wait_feed_contains, rest_title)

                # Publishing from the form goes through the same path and comes back live.
                form_title = f"Order shipped {tag}"
                await run(
                    partial(
                        page.publish,
                        "admin",
                        form_title,
                        "Published from the admin page",
                        event="order.shipped",
                    )
                )
                status, text = await run(page.wait_publish_result)
                assert status == "ok", text
                assert "admin @ " in text
                await run(page.wait_feed_contains, form_title)
                assert (await run(page.feed_titles))[:2] == [form_title, rest_title]

                # Its event reached the webhook; the page lists the delivery.
                deliveries = await run(page.wait_webhook_delivery, "order.shipped")
                assert receiver.url in deliveries
                assert len(receiver.requests) == 1

                await run(page.wait_channel_subscribers, "admin", 1)
                await run(page.wait_channel_subscribers, "global", 1)
                await run(page.wait_chart_samples, 3)
                assert await run(page.stat, "connections") == "1"
                assert running.settings.hub_node_id in await run(page.stat, "nodes")
                assert await run(page.severe_console_messages) == []

                shot = tmp_path / "admin.png"
                assert await run(driver.save_screenshot, str(shot))
                assert shot.stat().st_size > 10_000
                extra = os.environ.get("HUB_ADMIN_SCREENSHOT")
                if extra:
                    await run(driver.save_screenshot, extra)

                # Only admins get past the form (and their session is not left behind).
                await run(page.logout)
                await run(page.login, user.email, PASSWORD)
                assert "not an administrator" in await run(page.wait_login_error)
        finally:
            with trio.move_on_after(WAIT_S) as cleanup:
                cleanup.shield = True
                await trio.to_thread.run_sync(driver.quit)
        nursery.cancel_scope.cancel()

    with trio.fail_after(WAIT_S):
        await running.node.realtime.hub.wait_empty()  # the page's WebSocket closed
