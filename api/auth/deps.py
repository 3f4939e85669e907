"""The bearer-token check for routes: ``claims = await require_claims()``.

Example::

    @bp.get("/me")
    async def me() -> Response:
        claims = await require_claims()            # 401 unless a valid access token
        ...

    @bp.get("/users")
    async def list_users() -> Response:
        claims = await require_claims(admin=True)  # and 403 unless an admin
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from quart import current_app, g, request

from api.auth.tokens import AccessClaims, TokenError
from api.errors import forbidden, unauthorized
from hub.logs import user_id_var

if TYPE_CHECKING:
    from api.app import HubApp

_MESSAGES = {
    "missing": "Authentication required",
    "expired": "Token has expired",
    "revoked": "Token has been revoked",
}


def bearer_token() -> str | None:
    """The token of an ``Authorization: Bearer …`` header, or ``None``."""
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def current_claims() -> AccessClaims:
    """Decode (once per request) and check the request's access token.

    Raises:
        TokenError: no token, or a bad, expired or revoked one.
    """
    cached = g.get("claims")
    if cached is not None:
        return cast(AccessClaims, cached)
    token = bearer_token()
    if token is None:
        raise TokenError("missing")
    app = cast("HubApp", current_app)
    claims = app.node.services.authenticate(token)
    g.claims = claims
    user_id_var.set(claims.user_id)
    return claims


async def require_claims(*, admin: bool = False) -> AccessClaims:
    """The caller's access-token claims.

    Raises:
        ApiError: 401 when the token is missing, invalid, expired or revoked; 403 when
            ``admin`` is asked and the caller is not an admin.
    """
    try:
        claims = current_claims()
    except TokenError as error:
        raise unauthorized(_MESSAGES.get(error.reason, "Invalid token")) from None
    if admin and not claims.is_admin:
        raise forbidden("Administrator role required")
    return claims
