"""TokenService: the JWT attacks of reliability.md §3 are refused (unit tests)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import jwt
import pytest

from api.auth.tokens import LEEWAY_S, TokenError, TokenService, VerifiedTokens
from storage.base import Role, User

SECRET = "s" * 64


def make_user(role: Role = Role.USER) -> User:
    now = datetime.now(UTC)
    return User(uuid.uuid4(), "a@example.com", "", "A", None, True, True, role, now, now, None)


@pytest.fixture
def tokens() -> TokenService:
    return TokenService(SECRET, access_ttl_s=3600, refresh_ttl_s=7 * 86400)


def claims(**overrides: Any) -> dict[str, Any]:
    now = time.time()
    base = {
        "sub": str(uuid.uuid4()),
        "sid": str(uuid.uuid4()),
        "type": "access",
        "role": "user",
        "iat": now,
        "exp": now + 60,
        "jti": "j1",
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def test_issue_and_decode_pair(tokens: TokenService) -> None:
    user = make_user(Role.ADMIN)
    pair = tokens.issue_pair(user, "sess-1", refresh_jti="rj")
    access = tokens.decode_access(pair.access_token)
    assert access.user_id == str(user.id)
    assert access.session_id == "sess-1"
    assert access.role == "admin" and access.is_admin
    assert access.expires_at - access.issued_at == 3600
    refresh = tokens.decode_refresh(pair.refresh_token)
    assert refresh.jti == "rj" == pair.refresh_jti
    assert refresh.expires_at - refresh.issued_at == 7 * 86400
    assert pair.expires_in == 3600


def test_types_are_not_interchangeable(tokens: TokenService) -> None:
    pair = tokens.issue_pair(make_user(), "s")
    with pytest.raises(TokenError, match="wrong_type"):
        tokens.decode_access(pair.refresh_token)
    with pytest.raises(TokenError, match="wrong_type"):
        tokens.decode_refresh(pair.access_token)


def _unsigned(payload: dict[str, Any], header: dict[str, Any]) -> str:
    def b64(data: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    return f"{b64(header)}.{b64(payload)}."


@pytest.mark.parametrize(
    "token",
    [
        "",
        "garbage",
        "a.b.c",
        "x" * 5000,
        _unsigned(claims(), {"alg": "none", "typ": "JWT"}),
        jwt.encode(claims(), "another-secret-of-at-least-32-bytes!!", algorithm="HS256"),
        jwt.encode(claims(), SECRET, algorithm="HS384"),
        jwt.encode(claims(), SECRET, algorithm="HS512"),
        jwt.encode(claims(exp=None), SECRET, algorithm="HS256"),
        jwt.encode(claims(iat=None), SECRET, algorithm="HS256"),
        jwt.encode(claims(sub=None), SECRET, algorithm="HS256"),
        jwt.encode(claims(sid=None), SECRET, algorithm="HS256"),
        jwt.encode(claims(jti=None), SECRET, algorithm="HS256"),
        jwt.encode(claims(type=None), SECRET, algorithm="HS256"),
        jwt.encode(claims(type="id"), SECRET, algorithm="HS256"),
        jwt.encode(claims(role="root"), SECRET, algorithm="HS256"),
        jwt.encode(claims(role=None), SECRET, algorithm="HS256"),
        jwt.encode(claims(sub=123), SECRET, algorithm="HS256"),
        jwt.encode(claims(exp=time.time() - 60), SECRET, algorithm="HS256"),
        jwt.encode(claims(nbf=time.time() + 600), SECRET, algorithm="HS256"),
        jwt.encode(claims(iat=time.time() + 600), SECRET, algorithm="HS256"),
        jwt.encode(claims(exp="tomorrow"), SECRET, algorithm="HS256"),
    ],
)
def test_bad_access_tokens_are_refused(tokens: TokenService, token: str) -> None:
    with pytest.raises(TokenError):
        tokens.decode_access(token)


def test_expired_reason(tokens: TokenService) -> None:
    token = jwt.encode(claims(exp=time.time() - 60), SECRET, algorithm="HS256")
    with pytest.raises(TokenError) as info:
        tokens.decode_access(token)
    assert info.value.reason == "expired"


def test_tampered_payload_is_refused(tokens: TokenService) -> None:
    pair = tokens.issue_pair(make_user(), "s")
    header, payload, signature = pair.access_token.split(".")
    data = json.loads(base64.urlsafe_b64decode(payload + "=="))
    data["role"] = "admin"
    forged = base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()
    with pytest.raises(TokenError):
        tokens.decode_access(f"{header}.{forged}.{signature}")


def _signed_with_header(payload: dict[str, Any], header: dict[str, Any], key: bytes) -> str:
    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    signature = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"


@pytest.mark.parametrize("alg", ["RS256", "ES256", "PS256", "none", "HS256 "])
def test_algorithm_is_taken_from_config_not_from_the_header(tokens: TokenService, alg: str) -> None:
    """HS/RS confusion: a correct HMAC under our key, but the header names another
    algorithm — refused, because only HS256 is accepted whatever the header says."""
    token = _signed_with_header(claims(), {"alg": alg, "typ": "JWT"}, SECRET.encode())
    with pytest.raises(TokenError):
        tokens.decode_access(token)
    control = _signed_with_header(claims(), {"alg": "HS256", "typ": "JWT"}, SECRET.encode())
    assert tokens.decode_access(control).role == "user"


# -- verified tokens are kept, until they expire ------------------------------------------
class Clock:
    """A wall clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def test_a_token_is_verified_once_and_its_claims_reused() -> None:
    tokens = TokenService(SECRET, access_ttl_s=3600, refresh_ttl_s=86400)
    pair = tokens.issue_pair(make_user(), "s")
    first = tokens.decode_access(pair.access_token)
    assert len(tokens.verified) == 1
    assert tokens.decode_access(pair.access_token) is first
    assert len(tokens.verified) == 1


def test_a_cached_token_is_refused_once_expired() -> None:
    clock = Clock()
    tokens = TokenService(SECRET, access_ttl_s=3600, refresh_ttl_s=86400, clock=clock)
    pair = tokens.issue_pair(make_user(), "s", now=clock.now)
    claims = tokens.decode_access(pair.access_token)
    clock.now = claims.expires_at + LEEWAY_S - 0.5  # within PyJWT's leeway: still good
    assert tokens.decode_access(pair.access_token) is claims
    clock.now = claims.expires_at + LEEWAY_S
    with pytest.raises(TokenError) as info:
        tokens.decode_access(pair.access_token)
    assert info.value.reason == "expired"
    assert len(tokens.verified) == 0


def test_bad_tokens_are_not_kept(tokens: TokenService) -> None:
    forged = jwt.encode(claims(), "another-secret-of-at-least-32-bytes!!", algorithm="HS256")
    for _ in range(2):
        with pytest.raises(TokenError):
            tokens.decode_access(forged)
    refresh = tokens.issue_pair(make_user(), "s").refresh_token
    with pytest.raises(TokenError, match="wrong_type"):
        tokens.decode_access(refresh)
    assert len(tokens.verified) == 0


def test_verified_tokens_keep_the_most_recently_used() -> None:
    kept = VerifiedTokens(max_entries=2)
    tokens = TokenService(SECRET, access_ttl_s=3600, refresh_ttl_s=86400)
    a, b, c = (tokens.issue_pair(make_user(), "s").access_token for _ in range(3))
    now = time.time()
    for token in (a, b):
        kept.put(token, tokens.decode_access(token))
    assert kept.get(a, now) is not None  # a is now the most recent
    kept.put(c, tokens.decode_access(c))
    assert len(kept) == 2
    assert kept.get(b, now) is None
    assert kept.get(a, now) is not None and kept.get(c, now) is not None


def test_an_asymmetric_key_is_refused_as_secret_at_once() -> None:
    pem = "-----BEGIN PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQYI\n-----END PUBLIC KEY-----"
    with pytest.raises(jwt.InvalidKeyError):
        TokenService(pem, access_ttl_s=3600, refresh_ttl_s=86400)


def test_the_prepared_key_signs_like_pyjwt(tokens: TokenService) -> None:
    pair = tokens.issue_pair(make_user(), "s")
    decoded = jwt.decode(pair.access_token, SECRET, algorithms=["HS256"])
    assert decoded["type"] == "access"
    assert tokens.decode_access(jwt.encode(claims(), SECRET, algorithm="HS256")).role == "user"
