"""The quart-trio application: envelope, request ids, error mapping, health, readiness and
metrics.

``create_app(node)`` builds a fresh app bound to one running :class:`hub.node.Node`; there
is no module-level app and no global state. Blueprints reach the node through
``current_app.node``.
"""

from __future__ import annotations

import logging
import re
import secrets
import time
from typing import TYPE_CHECKING, Any

from quart import Response, g, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from api.envelope import failure, success
from api.errors import ApiError
from hub.logs import request_id_var
from storage.base import StorageUnavailable

if TYPE_CHECKING:
    from hub.node import Node

log = logging.getLogger("hub.api")

MAX_BODY_BYTES = 1024 * 1024
_REQUEST_ID_RE = re.compile(r"[^A-Za-z0-9._:-]")
REQUEST_ID_MAX = 64


class HubApp(QuartTrio):
    """QuartTrio with a typed handle on the node it serves."""

    node: Node


def sanitise_request_id(raw: str | None) -> str:
    """Keep a client's ``X-Request-ID`` if it is usable, else make one."""
    if raw:
        cleaned = _REQUEST_ID_RE.sub("", raw)[:REQUEST_ID_MAX]
        if cleaned:
            return cleaned
    return f"req-{secrets.token_hex(8)}"


def create_app(node: Node) -> HubApp:
    app = HubApp("hub")
    app.node = node
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    app.config["JSON_SORT_KEYS"] = False
    app.config["PROVIDE_AUTOMATIC_OPTIONS"] = True

    @app.before_request
    async def _request_id() -> None:
        g.request_id = sanitise_request_id(request.headers.get("X-Request-ID"))
        g.started = time.perf_counter()
        request_id_var.set(g.request_id)
        # Read the whole body (at most MAX_BODY_BYTES, else 413) before answering, even
        # when the route ignores it (404, 405, GET with a body): if hypercorn finishes a
        # response while the client is still sending the body, quart-trio cancels the
        # connection close half-way and the next keep-alive request hangs forever.
        await request.get_data(cache=True)

    @app.after_request
    async def _echo_request_id(response: Response) -> Response:
        request_id = getattr(g, "request_id", None)
        if request_id:
            response.headers["X-Request-ID"] = request_id
        started = getattr(g, "started", None)
        duration = time.perf_counter() - started if started is not None else None
        rule = request.url_rule.rule if request.url_rule is not None else None
        if duration is not None:
            node.metrics.observe_request(request.method, rule, response.status_code, duration)
        decision = g.get("rate_decision")
        if decision is not None and not decision.allowed:
            node.metrics.observe_rate_limited(g.get("rate_group", "unknown"))
        log.info(
            "%s %s %s",
            request.method,
            request.full_path.rstrip("?"),
            response.status_code,
            extra={"duration_ms": round(duration * 1000, 2) if duration is not None else None},
        )
        return response

    @app.errorhandler(ApiError)
    async def _api_error(error: ApiError) -> Response:
        return failure(error)

    @app.errorhandler(StorageUnavailable)
    async def _storage_down(error: StorageUnavailable) -> Response:
        log.warning("storage unavailable: %s", error)
        return failure(
            ApiError(503, "Storage is unavailable, try again shortly", headers={"Retry-After": "5"})
        )

    @app.errorhandler(HTTPException)
    async def _http_error(error: HTTPException) -> Response:
        status = error.code or 500
        messages = {
            400: "Malformed request body",
            404: "Resource not found",
            405: "Method not allowed",
            413: f"Request body is larger than {MAX_BODY_BYTES} bytes",
        }
        api_error = ApiError(status, messages.get(status, error.description or error.name))
        response = failure(api_error)
        if status == 413:
            # The rest of the body is never read: end the connection after the answer,
            # or the next request on it would wait behind the unread bytes.
            response.headers["Connection"] = "close"
        if status == 405 and getattr(error, "valid_methods", None):
            response.headers["Allow"] = ", ".join(error.valid_methods or [])
        return response

    @app.errorhandler(Exception)
    async def _unexpected(error: Exception) -> Response:
        log.exception("unhandled error in %s %s", request.method, request.path)
        return failure(ApiError(500, "Internal server error"))

    @app.get("/health")
    async def health() -> Any:
        return success({"status": "ok", "node_id": node.settings.hub_node_id})

    @app.get("/ready")
    async def ready() -> Any:
        checks = await node.check_ready()
        down = sorted(name for name, ok in checks.items() if not ok)
        if down:
            return failure(
                ApiError(
                    503,
                    f"Not ready: {', '.join(down)} unavailable",
                    details={"checks": checks, "down": down},
                )
            )
        return success({"status": "ready", "checks": checks})

    @app.get("/metrics")
    async def metrics() -> Any:
        body, content_type = node.metrics.exposition(request.headers.get("Accept"))
        return Response(body, status=200, content_type=content_type)

    from api.routes import register_routes

    register_routes(app)
    return app
