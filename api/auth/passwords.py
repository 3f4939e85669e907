"""Password policy and bcrypt hashing, kept off the trio loop.

bcrypt only looks at the first 72 bytes of a password and bcrypt >= 5 raises
``ValueError`` beyond that, so the policy refuses longer passwords at registration and
:func:`verify_password` answers ``False`` for them (a 401 at login, never a 500).

:class:`PasswordHasher` runs bcrypt in worker threads (bcrypt releases the GIL), at most
:data:`HASH_THREADS` at once, so a burst of logins queues for a thread instead of
stalling other requests. ``verify_dummy`` spends the same time as a real check, so an
unknown e-mail and a wrong password cannot be told apart by timing.
"""

from __future__ import annotations

import os

import bcrypt
import trio

MIN_LENGTH = 8
MAX_BYTES = 72
#: Worker threads hashing at once (one core is left to the trio loop); the rest of a
#: burst waits for a thread (backpressure).
HASH_THREADS = max(1, min(8, (os.cpu_count() or 2) - 1))
_DUMMY_PASSWORD = b"dummy-password-for-timing"


class PasswordPolicyError(ValueError):
    """The password breaks the policy; the message says which rule."""


def check_password_policy(password: str) -> None:
    """At least 8 characters with an upper-case letter, a lower-case letter and a digit,
    at most 72 UTF-8 bytes, no NUL character.

    Raises:
        PasswordPolicyError: the first rule broken.
    """
    if len(password) < MIN_LENGTH:
        raise PasswordPolicyError(f"Password must be at least {MIN_LENGTH} characters")
    if len(password.encode("utf-8", "surrogatepass")) > MAX_BYTES:
        raise PasswordPolicyError(f"Password must be at most {MAX_BYTES} bytes in UTF-8")
    if "\x00" in password:
        raise PasswordPolicyError("Password must not contain NUL characters")
    if not any(c.isupper() for c in password):
        raise PasswordPolicyError("Password must contain an upper-case letter")
    if not any(c.islower() for c in password):
        raise PasswordPolicyError("Password must contain a lower-case letter")
    if not any(c.isdigit() for c in password):
        raise PasswordPolicyError("Password must contain a digit")


def hash_password(password: str, rounds: int) -> str:
    """bcrypt hash of ``password`` with cost ``rounds`` (blocking; call it in a thread).

    Raises:
        PasswordPolicyError: over 72 bytes or containing NUL.
    """
    raw = password.encode("utf-8")
    if len(raw) > MAX_BYTES or b"\x00" in raw:
        raise PasswordPolicyError(f"Password must be at most {MAX_BYTES} bytes without NUL")
    return bcrypt.hashpw(raw, bcrypt.gensalt(rounds)).decode("ascii")


def verify_password(password: str, password_hash: str) -> bool:
    """True when ``password`` matches; ``False`` (never an exception) for a password over
    72 bytes, one that cannot be encoded, or a malformed hash (blocking)."""
    try:
        raw = password.encode("utf-8")
        if len(raw) > MAX_BYTES or b"\x00" in raw:
            bcrypt.checkpw(_DUMMY_PASSWORD, password_hash.encode("ascii"))
            return False
        return bcrypt.checkpw(raw, password_hash.encode("ascii"))
    except (ValueError, UnicodeError, TypeError):
        return False


class PasswordHasher:
    """bcrypt off the trio loop.

    Args:
        rounds: bcrypt cost (SPEC: 12; tests lower it through settings).
        threads: how many hashes may run at once.

    Backpressure:
        Calls beyond ``threads`` wait for a free thread in FIFO order.

    Cancellation:
        A cancelled caller stops waiting at once; a hash already running in its thread
        finishes there and its result is dropped.
    """

    def __init__(self, rounds: int, *, threads: int = HASH_THREADS) -> None:
        self.rounds = rounds
        self._limiter = trio.CapacityLimiter(threads)
        self._dummy_hash = hash_password(_DUMMY_PASSWORD.decode(), rounds)

    async def hash(self, password: str) -> str:
        """The bcrypt hash of ``password``. Raises :class:`PasswordPolicyError` when it
        cannot be hashed (over 72 bytes, NUL)."""
        return await trio.to_thread.run_sync(
            hash_password, password, self.rounds, limiter=self._limiter, abandon_on_cancel=True
        )

    async def verify(self, password: str, password_hash: str) -> bool:
        """Whether ``password`` matches ``password_hash``; never raises for bad input."""
        return await trio.to_thread.run_sync(
            verify_password, password, password_hash, limiter=self._limiter, abandon_on_cancel=True
        )

    async def verify_dummy(self, password: str) -> bool:
        """Spend the time of a real check against a hash no password matches; ``False``."""
        await self.verify(password, self._dummy_hash)
        return False
