"""Rules both backends apply the same way: time, text checks, listing validation."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime

from storage.base import SORT_FIELDS, DeliveryStatus, UserQuery

#: ``revoked_reason`` of a family revoked because an old token of it was presented.
REASON_REUSE = "reuse"
#: ``revoked_reason`` of the sessions ended by ``soft_delete_user``.
REASON_USER_DELETED = "user_deleted"

#: The ``ValueError`` message for a NUL character in text, the same from both backends.
NUL_MESSAGE = "text must not contain NUL characters"
ORDERS = ("asc", "desc")
LIKE_ESCAPE = "\\"


def utcnow() -> datetime:
    """The current time, timezone-aware UTC (microsecond precision, as both databases keep)."""
    return datetime.now(UTC)


def as_utc(value: datetime) -> datetime:
    """``value`` in UTC; a naive datetime is taken to be UTC already."""
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def reject_nul(values: Iterable[object]) -> None:
    """Raise ``ValueError`` if a string contains NUL (PostgreSQL text cannot hold it).

    Raises:
        ValueError: A string argument contains ``"\\x00"``.
    """
    for value in values:
        if isinstance(value, str) and "\x00" in value:
            raise ValueError(NUL_MESSAGE)


def like_pattern(search: str) -> str:
    """A LIKE pattern (escape character ``\\``) matching ``search`` literally as a
    substring, lower-cased: ``%``, ``_`` and ``\\`` in the input match themselves."""
    escaped = (
        search.lower()
        .replace(LIKE_ESCAPE, LIKE_ESCAPE * 2)
        .replace("%", LIKE_ESCAPE + "%")
        .replace("_", LIKE_ESCAPE + "_")
    )
    return f"%{escaped}%"


def check_query(query: UserQuery) -> None:
    """Validate the parts of a listing that end up in SQL text or arithmetic.

    ``sort`` and ``order`` are checked against fixed whitelists, so the SQL built from
    them never contains caller input.

    Raises:
        ValueError: ``page`` or ``limit`` below 1, ``sort`` not in ``SORT_FIELDS`` or
            ``order`` not ``asc``/``desc``.
    """
    if query.page < 1:
        raise ValueError("page must be >= 1")
    if query.limit < 1:
        raise ValueError("limit must be >= 1")
    if query.sort not in SORT_FIELDS:
        raise ValueError(f"sort must be one of {', '.join(SORT_FIELDS)}")
    if query.order not in ORDERS:
        raise ValueError("order must be asc or desc")


def check_page(page: int, limit: int) -> None:
    """Validate a 1-based page and its size.

    Raises:
        ValueError: ``page`` or ``limit`` below 1.
    """
    if page < 1:
        raise ValueError("page must be >= 1")
    if limit < 1:
        raise ValueError("limit must be >= 1")


def check_events(events: Iterable[str]) -> list[str]:
    """The event names of a webhook as a list, refusing an empty one.

    Raises:
        ValueError: no event.
    """
    names = list(events)
    if not names:
        raise ValueError("a webhook needs at least one event")
    return names


def check_outcome(status: DeliveryStatus, next_attempt_at: datetime | None) -> None:
    """A pending delivery needs its next attempt time; a finished one must have none.

    Raises:
        ValueError: the two do not fit.
    """
    if (status is DeliveryStatus.PENDING) != (next_attempt_at is not None):
        raise ValueError("next_attempt_at is required for pending, and only for pending")


# Column lists and ORDER BY directions both backends select with (same schema).
ORDER_SQL = {"asc": "ASC", "desc": "DESC"}

USER_COLUMNS = (
    "id, email, password_hash, full_name, avatar_url, is_verified, is_active, role, "
    "created_at, updated_at, deleted_at"
)
SESSION_COLUMNS = (
    "id, user_id, token_hash, created_at, expires_at, rotated_at, revoked_at, "
    "revoked_reason, ip_address, user_agent"
)
WEBHOOK_COLUMNS = "id, url, events, description, secret_ciphertext, created_at, updated_at"
DELIVERY_COLUMNS = (
    "id, webhook_id, event, event_id, payload, status, attempts, next_attempt_at, "
    "last_status_code, last_error, created_at, updated_at"
)
