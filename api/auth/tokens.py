"""Access and refresh tokens: HS256 JWTs with the algorithm pinned (SPEC §2).

Every token carries ``sub`` (user id), ``sid`` (refresh-session id), ``type``
(``"access"`` or ``"refresh"``), ``iat``, ``exp`` and ``jti``; an access token also
carries ``role`` so the WebSocket can apply channel rules without the database. The two
types are not interchangeable: :meth:`TokenService.decode_access` refuses a refresh
token and the other way round.

Decoding never trusts the token's header: the algorithm list is fixed to ``HS256``
(``alg: none`` and HS/RS confusion are refused by PyJWT) and every claim above is
required, because PyJWT only checks ``exp`` when it is present.

Every request carries its access token, so :meth:`TokenService.decode_access` verifies
each distinct token once and keeps its claims (:class:`VerifiedTokens`, bounded, an
entry dropped once its token expires). Only the signature and claim checks are saved:
revocation is checked by the caller on every request (``ApiServices.authenticate``).
The secret is checked once, when the service is built (:class:`PreparedHS256`), not
by PyJWT on every encode and decode.
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import jwt
from jwt.algorithms import HMACAlgorithm

if TYPE_CHECKING:
    from storage.base import User

ALGORITHM = "HS256"
REQUIRED_CLAIMS = ["exp", "iat", "sub", "type", "sid", "jti"]
ROLES = ("user", "admin")
#: Seconds of clock difference between nodes tolerated on ``exp``/``iat``.
LEEWAY_S = 5
#: Most verified access tokens whose claims are kept (a few hundred bytes each).
VERIFIED_TOKENS_MAX = 4096


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


class PreparedHS256(HMACAlgorithm):
    """HS256 whose one secret is checked once, when it is built.

    PyJWT's :meth:`HMACAlgorithm.prepare_key` (refuses PEM, SSH, DER and JWK-shaped
    secrets) and :meth:`HMACAlgorithm.check_key_length` depend on the key only, yet run
    on every encode and decode. For ``secret`` itself (the very object) this class
    answers with their results computed here; any other key gets the full checks.
    """

    def __init__(self, secret: str) -> None:
        super().__init__(HMACAlgorithm.SHA256)
        self._secret = secret
        self._prepared = super().prepare_key(secret)
        self._length_warning = super().check_key_length(self._prepared)

    def prepare_key(self, key: str | bytes) -> bytes:
        """The checked bytes of ``key`` (computed once for the secret)."""
        if key is self._secret:
            return self._prepared
        return super().prepare_key(key)

    def check_key_length(self, key: bytes) -> str | None:
        """PyJWT's short-key warning, or ``None`` (computed once for the secret)."""
        if key is self._prepared:
            return self._length_warning
        return super().check_key_length(key)


def hs256_codec(secret: str) -> jwt.PyJWT:
    """A PyJWT instance that knows HS256 only, with ``secret`` prepared once, and
    requires every claim of :data:`REQUIRED_CLAIMS`.

    PyJWT has no public way to give :class:`jwt.PyJWT` its algorithms, so this replaces
    those of the instance's own :class:`jwt.PyJWS` (public ``register_algorithm``).
    """
    codec = jwt.PyJWT(options={"require": REQUIRED_CLAIMS})
    jws: jwt.PyJWS = codec._jws
    for name in jws.get_algorithms():
        jws.unregister_algorithm(name)
    jws.register_algorithm(ALGORITHM, PreparedHS256(secret))
    return codec


class VerifiedTokens:
    """Access tokens whose signature and claims were checked, with their claims: a
    least-recently-used map of at most ``max_entries``, keyed by the token text.

    An entry is only good while its token is (``exp`` plus :data:`LEEWAY_S`, as PyJWT
    decides); :meth:`get` drops a stale one. Not a revocation cache: callers still check
    revocation on every use. Used from the trio loop; every step is one atomic call on
    the ``OrderedDict``, so a thread racing it can at worst miss an entry.
    """

    def __init__(self, max_entries: int = VERIFIED_TOKENS_MAX) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[str, AccessClaims] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, token: str, now: float) -> AccessClaims | None:
        """The claims of ``token`` if it was verified and has not expired at ``now``.

        Raises:
            TokenError: ``expired`` when the entry exists but its token has expired
                (the entry is dropped).
        """
        claims = self._entries.get(token)
        if claims is None:
            return None
        if now >= claims.expires_at + LEEWAY_S:
            self._entries.pop(token, None)
            raise TokenError("expired")
        try:
            self._entries.move_to_end(token)
        except KeyError:  # dropped meanwhile by another thread: still verified
            pass
        return claims

    def put(self, token: str, claims: AccessClaims) -> None:
        """Remember ``claims`` as the verified claims of ``token``."""
        self._entries[token] = claims
        while len(self._entries) > self.max_entries:
            try:
                self._entries.popitem(last=False)
            except KeyError:
                break


class TokenService:
    """Issues and checks the hub's JWTs.

    Args:
        secret: the HS256 key (at least 32 bytes; settings enforce it).
        access_ttl_s: access-token lifetime in seconds (SPEC: 3600).
        refresh_ttl_s: refresh-token lifetime in seconds (SPEC: 7 days).
        clock: wall-clock seconds, for the expiry of verified tokens kept in memory
            (tests may pass their own).
    """

    def __init__(
        self,
        secret: str,
        access_ttl_s: int,
        refresh_ttl_s: int,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not secret:
            raise ValueError("the token secret must not be empty")
        self._secret = secret
        self._codec = hs256_codec(secret)
        self._clock = clock
        self.verified = VerifiedTokens()
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
        """Check an access token's signature, claims and type (once per distinct token:
        the claims are kept until it expires). Revocation is the caller's business.

        Raises:
            TokenError: anything wrong with it (reason ``expired``, ``invalid`` or
                ``wrong_type``).
        """
        if isinstance(token, str):
            known = self.verified.get(token, self._clock())
            if known is not None:
                return known
        claims = self._verify_access(token)
        self.verified.put(token, claims)
        return claims

    def _verify_access(self, token: str) -> AccessClaims:
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
        return self._codec.encode(
            payload, self._secret, algorithm=ALGORITHM, headers={"typ": "JWT"}
        )

    def _decode(self, token: str, expected_type: str) -> dict[str, Any]:
        if not isinstance(token, str) or not token or len(token) > 4096:
            raise TokenError("invalid")
        try:
            payload: dict[str, Any] = self._codec.decode(
                token, self._secret, algorithms=[ALGORITHM], leeway=LEEWAY_S
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
