"""``GET /api/v1/admin/stats``: this node's live numbers for the admin page (admins only).

The numbers come from the same places as ``/metrics`` (the realtime core's statistics,
read when asked); messages per second are averaged over the last ten seconds of polls
(:class:`hub.metrics.RateWindow`), so the endpoint costs nothing between requests.
Behind a load balancer each answer is one node's view: ``node_id`` says which.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

import trio
from pydantic import Field
from quart import Blueprint, current_app

from api.auth.deps import require_claims
from api.envelope import success
from api.v1 import rate_group
from api.validation import ApiModel, endpoint
from hub.metrics_collect import channel_subscribers

if TYPE_CHECKING:
    from quart import Response

    from api.app import HubApp

#: Most channels listed (those with the most subscribers first).
MAX_CHANNELS_LISTED = 50


class ChannelOut(ApiModel):
    name: str
    subscribers: int = Field(description="Local subscribers of the channel on this node.")


class AdminStatsOut(ApiModel):
    node_id: str
    connections: int = Field(description="Open WebSocket connections on this node.")
    subscriptions: int = Field(description="Connection × channel subscriptions on this node.")
    channels_active: int = Field(description="Channels with local subscribers.")
    channels: list[ChannelOut] = Field(
        description=f"The {MAX_CHANNELS_LISTED} channels with the most local subscribers."
    )
    messages_per_second: float = Field(
        description="Messages reaching this node's fan-out per second (last 10 s)."
    )
    deliveries_per_second: float = Field(
        description="Notification frames sent to local subscribers per second (last 10 s)."
    )
    messages_total: int = Field(description="Messages that reached this node's fan-out.")
    delivered_total: int = Field(description="Notification frames sent to local subscribers.")
    event_loop_lag_seconds: float = Field(description="Latest event-loop lag measured.")


def node_stats(app: HubApp) -> dict[str, Any]:
    """The body of ``GET /api/v1/admin/stats`` for ``app``'s node."""
    node = app.node
    realtime = getattr(node, "realtime", None)
    stats_fn = getattr(realtime, "stats", None)
    stats: dict[str, Any] = stats_fn() if stats_fn is not None else {}
    counts = channel_subscribers(realtime)
    published = int(stats.get("publications", 0))
    delivered = int(stats.get("delivered", 0))
    per_second, deliveries_per_second = node.metrics.rates.sample(
        trio.current_time(), (published, delivered)
    )
    top = sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:MAX_CHANNELS_LISTED]
    return {
        "node_id": node.node_id,
        "connections": int(stats.get("connections", 0)),
        "subscriptions": int(stats.get("subscriptions", sum(counts.values()))),
        "channels_active": int(stats.get("channels", len(counts))),
        "channels": [{"name": name, "subscribers": n} for name, n in top],
        "messages_per_second": round(per_second, 3),
        "deliveries_per_second": round(deliveries_per_second, 3),
        "messages_total": published,
        "delivered_total": delivered,
        "event_loop_lag_seconds": round(node.metrics.last_loop_lag_s, 6),
    }


def create_admin_blueprint() -> Blueprint:
    """The ``/admin`` child of ``/api/v1``."""
    bp = Blueprint("admin", __name__, url_prefix="/admin")

    @bp.get("/stats")
    @rate_group("admin")
    @endpoint(
        response=AdminStatsOut,
        auth="admin",
        summary="This node's live statistics",
        description="Connections, channels with subscriber counts and message rates of the "
        "node that answers (see `node_id`); what the admin page at `/admin` shows.",
        tags=("admin",),
    )
    async def stats() -> Response:
        await require_claims(admin=True)
        return success(node_stats(cast("HubApp", current_app)))

    return bp
