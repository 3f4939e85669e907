"""Password policy and bcrypt off the trio loop (unit tests)."""

from __future__ import annotations

import pytest

from api.auth.passwords import (
    PasswordHasher,
    PasswordPolicyError,
    check_password_policy,
    hash_password,
    verify_password,
)


@pytest.mark.parametrize(
    "password",
    ["Abcdef1", "abcdefg1", "ABCDEFG1", "Abcdefgh", "é" * 40 + "Aa1", "Abcdefg1\x00", ""],
)
def test_policy_refuses(password: str) -> None:
    with pytest.raises(PasswordPolicyError):
        check_password_policy(password)


@pytest.mark.parametrize("password", ["Abcdefg1", "Aa1" + "x" * 69, "Ünïcødé-Passw0rd"])
def test_policy_accepts(password: str) -> None:
    check_password_policy(password)


def test_hash_and_verify() -> None:
    hashed = hash_password("Abcdefg1", 4)
    assert hashed.startswith("$2b$04$")
    assert verify_password("Abcdefg1", hashed)
    assert not verify_password("Abcdefg2", hashed)


@pytest.mark.parametrize("password", ["é" * 40, "x" * 10_000, "a\x00b", "\udcff"])
def test_verify_never_raises(password: str) -> None:
    hashed = hash_password("Abcdefg1", 4)
    assert verify_password(password, hashed) is False
    assert verify_password("Abcdefg1", "not-a-hash") is False


def test_hash_refuses_over_72_bytes() -> None:
    with pytest.raises(PasswordPolicyError):
        hash_password("x" * 73, 4)


async def test_hasher_runs_in_threads() -> None:
    hasher = PasswordHasher(4, threads=2)
    hashed = await hasher.hash("Abcdefg1")
    assert await hasher.verify("Abcdefg1", hashed)
    assert not await hasher.verify("nope", hashed)
    assert await hasher.verify_dummy("dummy-password-for-timing") is False
