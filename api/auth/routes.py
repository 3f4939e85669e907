"""``/api/v1/auth``: register, verify-email, resend-verification, login, refresh, logout.

Login answers an unknown e-mail and a wrong password with the same 401 body after the
same bcrypt work (a check against a dummy hash). Refresh rotates the refresh token with
storage's compare-and-swap; presenting a rotated token revokes the whole family (its
access tokens too, through the revocation list, and its WebSockets).
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, cast

from quart import Blueprint, current_app, request

from api.auth.deps import require_claims
from api.auth.models import (
    LoginIn,
    RefreshIn,
    RegisteredOut,
    RegisterIn,
    ResendIn,
    TokensOut,
    VerifyEmailIn,
    VerifyEmailQuery,
)
from api.auth.tokens import TokenError, TokenPair, new_jti
from api.envelope import success
from api.errors import (
    conflict,
    forbidden,
    service_unavailable,
    unauthorized,
    validation_error,
)
from api.v1 import rate_group, request_ip
from api.validation import endpoint
from bridge.email_queue import QueueUnavailable
from storage.base import Conflict, RotateOutcome

if TYPE_CHECKING:
    from quart import Response

    from api.app import HubApp
    from api.services import ApiServices
    from storage.base import User

log = logging.getLogger("hub.api.auth")

VERIFICATION_TTL_S = 24 * 3600
INVALID_CREDENTIALS = "Invalid email or password"
USER_AGENT_MAX = 256
EMAIL_MAX = 255


def services() -> ApiServices:
    return cast("HubApp", current_app).node.services


def token_hash(token: str) -> str:
    """SHA-256 hex digest: what storage keeps instead of a token or ``jti``."""
    return hashlib.sha256(token.encode()).hexdigest()


def iso(value: datetime) -> str:
    return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def tokens_body(pair: TokenPair) -> dict[str, object]:
    return {
        "access_token": pair.access_token,
        "refresh_token": pair.refresh_token,
        "token_type": pair.token_type,
        "expires_in": pair.expires_in,
    }


async def send_verification(svc: ApiServices, user: User) -> None:
    """Create a verification token for ``user`` and queue the e-mail with its link."""
    token = secrets.token_urlsafe(32)
    await svc.storage.create_verification(
        user_id=user.id,
        token_hash=token_hash(token),
        expires_at=datetime.now(UTC) + timedelta(seconds=VERIFICATION_TTL_S),
    )
    link = f"{svc.settings.public_url.rstrip('/')}/api/v1/auth/verify-email?token={token}"
    await svc.send_email(
        to=user.email,
        subject="Confirm your e-mail address",
        template="verify_email",
        variables={
            "full_name": user.full_name,
            "verify_url": link,
            "valid_hours": str(VERIFICATION_TTL_S // 3600),
        },
    )


async def start_session(svc: ApiServices, user: User) -> TokenPair:
    """Open a refresh-token family for ``user`` and sign its first token pair."""
    jti = new_jti()
    expires = datetime.now(UTC) + timedelta(seconds=svc.tokens.refresh_ttl_s)
    user_agent = (request.headers.get("User-Agent") or "")[:USER_AGENT_MAX] or None
    session = await svc.storage.create_session(
        user_id=user.id,
        token_hash=token_hash(jti),
        expires_at=expires,
        ip_address=request_ip(),
        user_agent=user_agent,
    )
    pair = svc.tokens.issue_pair(user, str(session.id), refresh_jti=jti)
    await svc.sessions.put(
        str(user.id),
        str(session.id),
        expires_at=pair.refresh_expires_at,
        ip_address=request_ip(),
        user_agent=user_agent,
    )
    return pair


async def revoke_family(svc: ApiServices, session_id: str) -> None:
    """Kill the access tokens (and WebSockets) of a refresh family at once: on this node,
    then on the others through the broker's control channel (their storage poll is the
    safety net)."""
    until = time.time() + svc.tokens.access_ttl_s
    svc.revocations.revoke_session(session_id, until)
    await cast("HubApp", current_app).node.realtime.announce_revocation(
        "session", session_id, until
    )


def create_auth_blueprint() -> Blueprint:
    bp = Blueprint("auth", __name__, url_prefix="/auth")

    @bp.post("/register")
    @rate_group("register")
    @endpoint(
        body=RegisterIn,
        response=RegisteredOut,
        status=201,
        errors=(409,),
        summary="Create an account and send the verification e-mail",
        tags=("auth",),
    )
    async def register(*, body: RegisterIn) -> Response:
        svc = services()
        password_hash = await svc.passwords.hash(body.password)
        try:
            user = await svc.storage.create_user(
                email=str(body.email), password_hash=password_hash, full_name=body.full_name
            )
        except Conflict:
            raise conflict("An account with this email already exists", field="email") from None
        log.info("user registered", extra={"new_user_id": str(user.id)})
        message = "Registration successful, check your e-mail to verify the address"
        try:
            await send_verification(svc, user)
        except QueueUnavailable as error:
            # The account exists; only the e-mail is late. Answering 5xx would make the
            # client retry into a 409, so say what happened instead.
            log.error("verification e-mail not queued: %s", error)
            message = (
                "Registration successful, but the verification e-mail could not be sent "
                "yet; request a new one with /auth/resend-verification shortly"
            )
        svc.events.emit(
            "user.created",
            {"user_id": str(user.id), "email": user.email, "created_at": iso(user.created_at)},
        )
        return success(
            {
                "user_id": str(user.id),
                "email": user.email,
                "full_name": user.full_name,
                "is_verified": user.is_verified,
                "created_at": iso(user.created_at),
            },
            status=201,
            message=message,
        )

    async def verify(token: str) -> Response:
        svc = services()
        user_id = await svc.storage.consume_verification(token_hash(token))
        if user_id is None:
            raise validation_error("Invalid or expired verification token", field="token")
        await svc.users.invalidate(user_id)
        return success({"user_id": str(user_id), "is_verified": True}, message="E-mail verified")

    @bp.post("/verify-email")
    @rate_group("auth")
    @endpoint(body=VerifyEmailIn, summary="Verify an e-mail address", tags=("auth",))
    async def verify_email(*, body: VerifyEmailIn) -> Response:
        return await verify(body.token)

    @bp.get("/verify-email")
    @rate_group("auth")
    @endpoint(
        query=VerifyEmailQuery,
        summary="Verify an e-mail address (the link in the e-mail)",
        tags=("auth",),
    )
    async def verify_email_link(*, query: VerifyEmailQuery) -> Response:
        return await verify(query.token)

    @bp.post("/resend-verification")
    @rate_group("auth")
    @endpoint(
        body=ResendIn,
        status=202,
        summary="Send the verification e-mail again (202 whether or not the e-mail exists)",
        tags=("auth",),
    )
    async def resend_verification(*, body: ResendIn) -> Response:
        svc = services()
        user = await svc.storage.get_user_by_email(body.email.strip())
        if user is not None and not user.is_verified and user.is_active:
            try:
                await send_verification(svc, user)
            except QueueUnavailable:
                raise service_unavailable("The e-mail queue is unavailable, try again") from None
        return success(
            None,
            status=202,
            message="If the account exists and is not verified, an e-mail has been sent",
        )

    @bp.post("/login")
    @rate_group("login")
    @endpoint(
        body=LoginIn,
        response=TokensOut,
        errors=(401, 403),
        summary="Log in: an access and a refresh token",
        tags=("auth",),
    )
    async def login(*, body: LoginIn) -> Response:
        svc = services()
        email = body.email.strip()
        user = await svc.storage.get_user_by_email(email) if len(email) <= EMAIL_MAX else None
        if user is None:
            await svc.passwords.verify_dummy(body.password)
            raise unauthorized(INVALID_CREDENTIALS)
        if not await svc.passwords.verify(body.password, user.password_hash):
            raise unauthorized(INVALID_CREDENTIALS)
        if not user.is_active:
            raise forbidden("This account is deactivated")
        if svc.settings.auth_require_verified and not user.is_verified:
            raise forbidden("Verify your e-mail address before logging in")
        pair = await start_session(svc, user)
        log.info("user logged in", extra={"login_user_id": str(user.id)})
        return success(tokens_body(pair))

    @bp.post("/refresh")
    @rate_group("auth")
    @endpoint(
        body=RefreshIn,
        response=TokensOut,
        errors=(401,),
        summary="Exchange a refresh token for a new pair (the old one stops working)",
        tags=("auth",),
    )
    async def refresh(*, body: RefreshIn) -> Response:
        svc = services()
        try:
            claims = svc.tokens.decode_refresh(body.refresh_token)
            session_id = uuid.UUID(claims.session_id)
            user_id = uuid.UUID(claims.user_id)
        except (TokenError, ValueError):
            raise unauthorized("Invalid or expired refresh token") from None
        user = await svc.users.get(user_id)
        if user is None or not user.is_active:
            await svc.storage.revoke_session(session_id, reason="user_gone")
            await revoke_family(svc, claims.session_id)
            raise unauthorized("Invalid or expired refresh token")
        new = new_jti()
        expires = datetime.now(UTC) + timedelta(seconds=svc.tokens.refresh_ttl_s)
        outcome = await svc.storage.rotate_session(
            session_id,
            presented_hash=token_hash(claims.jti),
            new_hash=token_hash(new),
            new_expires_at=expires,
        )
        if outcome is RotateOutcome.REUSED:
            log.warning(
                "refresh token reuse, session revoked", extra={"session_id": claims.session_id}
            )
            await revoke_family(svc, claims.session_id)
            await svc.sessions.remove(claims.user_id, claims.session_id)
            raise unauthorized("Refresh token was already used; the session is revoked")
        if outcome is not RotateOutcome.ROTATED:
            raise unauthorized("Invalid or expired refresh token")
        pair = svc.tokens.issue_pair(user, claims.session_id, refresh_jti=new)
        await svc.sessions.put(
            claims.user_id,
            claims.session_id,
            expires_at=pair.refresh_expires_at,
            ip_address=request_ip(),
            rotated=True,
        )
        return success(tokens_body(pair))

    @bp.post("/logout")
    @rate_group("auth")
    @endpoint(auth="bearer", summary="End this session (REST and WebSocket)", tags=("auth",))
    async def logout() -> Response:
        claims = await require_claims()
        svc = services()
        await svc.storage.revoke_session(uuid.UUID(claims.session_id), reason="logout")
        await revoke_family(svc, claims.session_id)
        await svc.sessions.remove(claims.user_id, claims.session_id)
        return success(None, message="Logged out")

    return bp
