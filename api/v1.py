"""The ``/api/v1`` parent blueprint: rate limits and ``X-RateLimit-*`` headers.

Register child blueprints on the blueprint returned by :func:`create_v1_blueprint`
*before* it is registered on the app; every request under ``/api/v1`` (unknown routes,
405s and errors included) is counted and answered with ``X-RateLimit-Limit``,
``X-RateLimit-Remaining`` and ``X-RateLimit-Reset``; over the limit it is a 429 with
``Retry-After`` and ``error.retry_after``.

A view chooses its limit group with :func:`rate_group` (default ``"public"``):

* ``register``, ``login``, ``auth`` — counted per client IP;
* ``public``, ``admin`` — counted per user (from the bearer token), per IP without one.

The client IP believes ``X-Forwarded-For`` only from ``TRUSTED_PROXIES``
(:mod:`api.client_ip`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar, cast

from quart import Blueprint, current_app, g, request

from api.auth.deps import current_claims
from api.auth.tokens import TokenError
from api.client_ip import client_ip, parse_networks
from api.errors import ApiError

if TYPE_CHECKING:
    from quart import Response

    from api.app import HubApp
    from api.ratelimit import RateDecision
    from hub.settings import RateLimit

PREFIX = "/api/v1"
GROUPS = ("register", "login", "auth", "public", "admin")
PER_IP_GROUPS = ("register", "login", "auth")
DEFAULT_GROUP = "public"
RATE_GROUP_ATTR = "__hub_rate_group__"

F = TypeVar("F", bound=Callable[..., Any])


def rate_group(name: str) -> Callable[[F], F]:
    """Count the decorated view in limit group ``name`` (one of :data:`GROUPS`)."""
    if name not in GROUPS:
        raise ValueError(f"unknown rate-limit group {name!r}")

    def mark(view: F) -> F:
        setattr(view, RATE_GROUP_ATTR, name)
        return view

    return mark


def request_ip() -> str:
    """The client IP of the current request (cached on ``g``)."""
    cached = g.get("client_ip")
    if cached is not None:
        return cast(str, cached)
    app = cast("HubApp", current_app)
    networks = app.config.get("HUB_TRUSTED_NETWORKS")
    if networks is None:
        networks = parse_networks(app.node.settings.trusted_proxies)
        app.config["HUB_TRUSTED_NETWORKS"] = networks
    forwarded = ",".join(request.headers.getlist("X-Forwarded-For"))
    ip = client_ip(request.remote_addr, forwarded, networks)
    g.client_ip = ip
    return ip


def rate_limit(app: HubApp, group: str) -> RateLimit:
    """The limit of ``group`` from the node's settings, parsed once per app."""
    limits: dict[str, RateLimit] | None = app.config.get("HUB_RATE_LIMITS")
    if limits is None:
        settings = app.node.services.settings
        limits = {name: settings.rate(name) for name in GROUPS}
        app.config["HUB_RATE_LIMITS"] = limits
    return limits[group]


def _group_of_request() -> str:
    rule = request.url_rule
    if rule is None:
        return DEFAULT_GROUP
    view = current_app.view_functions.get(rule.endpoint)
    return cast(str, getattr(view, RATE_GROUP_ATTR, DEFAULT_GROUP))


def _identifier(group: str) -> str:
    if group not in PER_IP_GROUPS:
        try:
            return "user:" + current_claims().user_id
        except TokenError:
            pass
    return "ip:" + request_ip()


async def _limit() -> None:
    if not request.path.startswith(PREFIX):
        return
    app = cast("HubApp", current_app)
    group = _group_of_request()
    g.rate_group = group  # read by the metrics (429s by group)
    decision = await app.node.services.rate_limiter.hit(
        group, _identifier(group), rate_limit(app, group)
    )
    g.rate_decision = decision
    if not decision.allowed:
        raise ApiError(
            429,
            f"Rate limit exceeded, retry in {decision.retry_after} s",
            retry_after=decision.retry_after,
        )


async def _headers(response: Response) -> Response:
    decision: RateDecision | None = g.get("rate_decision")
    if decision is not None:
        response.headers.update(decision.headers())
    return response


def create_v1_blueprint() -> Blueprint:
    """A fresh ``/api/v1`` blueprint with the rate-limit hooks attached."""
    blueprint = Blueprint("v1", __name__, url_prefix=PREFIX)
    blueprint.before_app_request(_limit)
    blueprint.after_app_request(_headers)
    return blueprint
