"""Access and refresh tokens: HS256 JWTs with the algorithm pinned (SPEC §2).

Every token carries ``sub`` (user id), ``sid`` (refresh-session id), ``type``
(``"access"`` or ``"refresh"``), ``iat``, ``exp`` and ``jti``; an access token also
carries ``role`` so the WebSocket can apply channel rules without the database. The two
types are not interchangeable: :meth:`TokenService.decode_access` refuses a refresh
token and the other way round.

Decoding never trusts the token's header: the algorithm list is fixed to ``HS256``
(``alg: none`` and HS/RS confusion are refused by PyJWT) and every claim above is
required, because PyJWT only checks ``exp`` when it is present.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import jwt

if TYPE_CHECKING:
    from storage.base import User

ALGORITHM = "HS256"
REQUIRED_CLAIMS = ["exp", "iat", "sub", "type", "sid", "jti"]
ROLES = ("user", "admin")
#: Seconds of clock difference between nodes tolerated on ``exp``/``iat``.
LEEWAY_S = 5


class TokenError(Exception):
    """The token is missing, malformed, badly signed, expired, of the wrong type or
    revoked. ``reason`` is a short machine word; never show the token itself."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class AccessClaims:
    """What a valid access token says. Times are epoch seconds."""

    user_id: str
    session_id: str
    role: str
    issued_at: float
    expires_at: float
    jti: str

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


@dataclass(frozen=True, slots=True)
class RefreshClaims:
    """What a valid refresh token says. Times are epoch seconds."""

    user_id: str
    session_id: str
    issued_at: float
    expires_at: float
    jti: str


@dataclass(frozen=True, slots=True)
class TokenPair:
    """A login or refresh answer. ``refresh_jti`` is what the refresh session stores
    (hashed); ``refresh_expires_at`` is its expiry (epoch seconds)."""

    access_token: str
    refresh_token: str
    expires_in: int
    refresh_jti: str
    refresh_expires_at: float
    token_type: str = "Bearer"


def new_jti() -> str:
    """A fresh unguessable token id."""
    return secrets.token_urlsafe(24)


class TokenService:
    """Issues and checks the hub's JWTs.

    Args:
        secret: the HS256 key (at least 32 bytes; settings enforce it).
        access_ttl_s: access-token lifetime in seconds (SPEC: 3600).
        refresh_ttl_s: refresh-token lifetime in seconds (SPEC: 7 days).
    """

    def __init__(self, secret: str, access_ttl_s: int, refresh_ttl_s: int) -> None:
        if not secret:
            raise ValueError("the token secret must not be empty")
        self._secret = secret
        self.access_ttl_s = access_ttl_s
        self.refresh_ttl_s = refresh_ttl_s

    def issue_pair(
        self,
        user: User,
        session_id: str,
        *,
        refresh_jti: str | None = None,
        now: float | None = None,
    ) -> TokenPair:
        """Sign a new access and refresh token for ``user`` in session ``session_id``.

        Args:
            user: the account (its ``id`` and ``role`` go into the tokens).
            session_id: the refresh-session (family) id, the ``sid`` claim.
            refresh_jti: the refresh token's ``jti`` when the caller already stored its
                hash (login and refresh do); a new one otherwise.
            now: issue time in epoch seconds (tests); the current time otherwise.
        """
        issued = round(time.time() if now is None else now, 3)
        role = getattr(user.role, "value", user.role)
        access = self._encode(
            {
                "sub": str(user.id),
                "sid": str(session_id),
                "type": "access",
                "role": role,
                "iat": issued,
                "exp": issued + self.access_ttl_s,
                "jti": new_jti(),
            }
        )
        jti = refresh_jti or new_jti()
        refresh_exp = issued + self.refresh_ttl_s
        refresh = self._encode(
            {
                "sub": str(user.id),
                "sid": str(session_id),
                "type": "refresh",
                "iat": issued,
                "exp": refresh_exp,
                "jti": jti,
            }
        )
        return TokenPair(access, refresh, self.access_ttl_s, jti, refresh_exp)

    def decode_access(self, token: str) -> AccessClaims:
        """Check an access token's signature, claims and type.

        Raises:
            TokenError: anything wrong with it (reason ``expired``, ``invalid`` or
                ``wrong_type``).
        """
        payload = self._decode(token, "access")
        role = payload.get("role")
        if role not in ROLES:
            raise TokenError("invalid")
        return AccessClaims(
            user_id=payload["sub"],
            session_id=payload["sid"],
            role=role,
            issued_at=float(payload["iat"]),
            expires_at=float(payload["exp"]),
            jti=payload["jti"],
        )

    def decode_refresh(self, token: str) -> RefreshClaims:
        """Check a refresh token's signature, claims and type.

        Raises:
            TokenError: anything wrong with it.
        """
        payload = self._decode(token, "refresh")
        return RefreshClaims(
            user_id=payload["sub"],
            session_id=payload["sid"],
            issued_at=float(payload["iat"]),
            expires_at=float(payload["exp"]),
            jti=payload["jti"],
        )

    def _encode(self, payload: dict[str, Any]) -> str:
        return jwt.encode(payload, self._secret, algorithm=ALGORITHM, headers={"typ": "JWT"})

    def _decode(self, token: str, expected_type: str) -> dict[str, Any]:
        if not isinstance(token, str) or not token or len(token) > 4096:
            raise TokenError("invalid")
        try:
            payload: dict[str, Any] = jwt.decode(
                token,
                self._secret,
                algorithms=[ALGORITHM],
                options={"require": REQUIRED_CLAIMS},
                leeway=LEEWAY_S,
            )
        except jwt.ExpiredSignatureError:
            raise TokenError("expired") from None
        except (jwt.InvalidTokenError, ValueError, TypeError):
            raise TokenError("invalid") from None
        if payload.get("type") != expected_type:
            raise TokenError("wrong_type")
        for claim in ("sub", "sid", "jti"):
            if not isinstance(payload.get(claim), str) or not payload[claim]:
                raise TokenError("invalid")
        for claim in ("iat", "exp"):
            if isinstance(payload[claim], bool) or not isinstance(payload[claim], int | float):
                raise TokenError("invalid")
        return payload
