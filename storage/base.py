"""The storage contract: one async interface, two backends (SQLite, PostgreSQL).

Every method is a trio coroutine. Implementations never block the trio loop: SQLite
work runs in a worker thread, PostgreSQL (asyncpg) runs on the asyncio loop owned by
``bridge.aio``.

Cancellation:
    Cancelling a call abandons its result; a write that already reached the database
    either committed or rolled back as a whole (each method is one transaction).

Errors:
    Backends translate their driver errors into the small hierarchy below, so that no
    ``sqlite3`` or ``asyncpg`` exception reaches ``api/`` or ``actors/``.
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol, runtime_checkable


class StorageError(Exception):
    """Base class of every storage error."""


class StorageUnavailable(StorageError):
    """The database cannot be reached right now (the API answers 503)."""


class Conflict(StorageError):
    """A uniqueness rule was broken (an e-mail already registered)."""


class Role(enum.StrEnum):
    USER = "user"
    ADMIN = "admin"


@dataclass(frozen=True, slots=True)
class User:
    id: uuid.UUID
    email: str
    password_hash: str
    full_name: str
    avatar_url: str | None
    is_verified: bool
    is_active: bool
    role: Role
    created_at: datetime
    updated_at: datetime
    deleted_at: datetime | None

    @property
    def is_admin(self) -> bool:
        return self.role is Role.ADMIN


@dataclass(frozen=True, slots=True)
class RefreshSession:
    """A refresh-token family. ``id`` is the ``sid`` claim of every token it issues.

    ``token_hash`` is the SHA-256 hex digest of the ``jti`` of the one refresh token
    that is currently valid; rotation replaces it, and presenting any other token of
    the family is reuse.
    """

    id: uuid.UUID
    user_id: uuid.UUID
    token_hash: str
    created_at: datetime
    expires_at: datetime
    rotated_at: datetime | None
    revoked_at: datetime | None
    revoked_reason: str | None
    ip_address: str | None
    user_agent: str | None


class RotateOutcome(enum.Enum):
    ROTATED = "rotated"  # the presented token was current; it is replaced
    REUSED = "reused"  # the presented token was not current: the family is now revoked
    REVOKED = "revoked"  # the family was already revoked or expired
    UNKNOWN = "unknown"  # no such family


SORT_FIELDS = ("created_at", "updated_at", "email", "full_name")


@dataclass(frozen=True, slots=True)
class UserQuery:
    """Admin listing: 1-based ``page``; ``search`` matches e-mail or name, case-insensitive."""

    page: int = 1
    limit: int = 20
    sort: str = "created_at"
    order: str = "desc"
    is_active: bool | None = None
    created_after: datetime | None = None
    search: str | None = None


#: In a webhook's ``events``: subscribe to every event.
WILDCARD_EVENT = "*"


class DeliveryStatus(enum.StrEnum):
    PENDING = "pending"  # waiting for its next attempt (or being sent under a lease)
    SUCCEEDED = "succeeded"  # a 2xx answer
    FAILED = "failed"  # every attempt failed (or it can never be sent)


@dataclass(frozen=True, slots=True)
class Webhook:
    """A webhook endpoint. ``secret_ciphertext`` is the signing secret sealed by
    :class:`bridge.secretbox.SecretBox` (associated data: ``id.bytes``)."""

    id: uuid.UUID
    url: str
    events: tuple[str, ...]
    description: str | None
    secret_ciphertext: str
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class WebhookDelivery:
    """One event for one endpoint, with the outcome of its attempts so far.

    ``payload`` is the exact request body (signed and sent unchanged on every attempt).
    ``next_attempt_at`` is when the next attempt is due; while a dispatcher holds the
    delivery it is the end of that dispatcher's lease; ``None`` once finished.
    """

    id: uuid.UUID
    webhook_id: uuid.UUID
    event: str
    event_id: str
    payload: str
    status: DeliveryStatus
    attempts: int
    next_attempt_at: datetime | None
    last_status_code: int | None
    last_error: str | None
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class ClaimedDelivery:
    """A delivery a dispatcher now holds, with the endpoint it goes to."""

    delivery: WebhookDelivery
    webhook: Webhook


@runtime_checkable
class Storage(Protocol):
    """What the hub needs from its database. Soft-deleted users are invisible to every
    lookup except ``get_user(..., include_deleted=True)``."""

    backend: str  # "sqlite" or "postgresql"

    async def migrate(self) -> list[str]:
        """Apply pending migrations; return the versions applied. Safe when several
        nodes call it at once (PostgreSQL takes an advisory lock)."""

    async def ping(self) -> None:
        """Raise :class:`StorageUnavailable` unless a trivial query succeeds."""

    async def aclose(self) -> None:
        """Close connections. Idempotent."""

    # users
    async def create_user(
        self,
        *,
        email: str,
        password_hash: str,
        full_name: str,
        role: Role = Role.USER,
        is_verified: bool = False,
    ) -> User:
        """Raise :class:`Conflict` when a non-deleted user has this e-mail (any case)."""

    async def get_user(
        self, user_id: uuid.UUID, *, include_deleted: bool = False
    ) -> User | None: ...

    async def get_user_by_email(self, email: str) -> User | None:
        """Case-insensitive; non-deleted users only."""

    async def update_user(
        self,
        user_id: uuid.UUID,
        *,
        full_name: str | None = None,
        avatar_url: str | None = None,
        clear_avatar: bool = False,
        is_verified: bool | None = None,
        is_active: bool | None = None,
    ) -> User | None:
        """Change the given fields and ``updated_at``; ``None`` when no such live user."""

    async def soft_delete_user(self, user_id: uuid.UUID) -> bool:
        """Set ``deleted_at`` and revoke every session of the user. False if already gone."""

    async def list_users(self, query: UserQuery) -> tuple[list[User], int]:
        """One page of live users and the total count matching the filters."""

    # refresh sessions
    async def create_session(
        self,
        *,
        user_id: uuid.UUID,
        token_hash: str,
        expires_at: datetime,
        ip_address: str | None = None,
        user_agent: str | None = None,
    ) -> RefreshSession: ...

    async def get_session(self, session_id: uuid.UUID) -> RefreshSession | None: ...

    async def rotate_session(
        self, session_id: uuid.UUID, *, presented_hash: str, new_hash: str, new_expires_at: datetime
    ) -> RotateOutcome:
        """Atomic compare-and-swap of the current token hash: of two parallel calls
        with the same ``presented_hash`` exactly one gets ``ROTATED``; the other gets
        ``REUSED`` and the family is revoked (reason ``"reuse"``)."""

    async def revoke_session(self, session_id: uuid.UUID, *, reason: str) -> bool: ...

    async def revoke_user_sessions(self, user_id: uuid.UUID, *, reason: str) -> int: ...

    async def revoked_since(self, since: datetime) -> list[RefreshSession]:
        """Sessions revoked at or after ``since`` (to warm the revocation cache at start)."""

    # e-mail verification
    async def create_verification(
        self, *, user_id: uuid.UUID, token_hash: str, expires_at: datetime
    ) -> None: ...

    async def consume_verification(self, token_hash: str) -> uuid.UUID | None:
        """Mark the user verified and the token used, in one transaction; return the
        user id, or ``None`` when the token is unknown, used or expired."""

    # webhooks
    async def create_webhook(
        self,
        *,
        webhook_id: uuid.UUID,
        url: str,
        events: Sequence[str],
        description: str | None,
        secret_ciphertext: str,
    ) -> Webhook:
        """Store a new endpoint. The caller picks the id (it seals the secret with it).

        Raises:
            Conflict: ``webhook_id`` exists.
            ValueError: ``events`` is empty, or a value is too long or contains NUL.
        """

    async def get_webhook(self, webhook_id: uuid.UUID) -> Webhook | None: ...

    async def list_webhooks(self) -> list[Webhook]:
        """Every endpoint, oldest first."""

    async def delete_webhook(self, webhook_id: uuid.UUID) -> bool:
        """Hard delete: the endpoint and all its deliveries. False if there was none."""

    async def enqueue_webhook_deliveries(self, *, event: str, event_id: str, payload: str) -> int:
        """Queue ``payload`` for every endpoint subscribed to ``event`` (or to
        :data:`WILDCARD_EVENT`), due now, in one transaction.

        An endpoint that already has a delivery with this ``event_id`` gets no second one
        (a redelivered message is queued once). Returns how many deliveries were queued.
        """

    async def claim_webhook_deliveries(
        self,
        *,
        limit: int,
        per_webhook: int,
        lease_s: float,
        exclude: Collection[uuid.UUID] = (),
    ) -> list[ClaimedDelivery]:
        """Take up to ``limit`` due pending deliveries, at most ``per_webhook`` of any one
        endpoint and none of the endpoints in ``exclude``, oldest due first.

        Each claimed delivery's ``next_attempt_at`` moves to now + ``lease_s``, so no
        other dispatcher takes it meanwhile; a dispatcher that dies holding it only
        delays it until the lease ends. PostgreSQL claims with ``FOR UPDATE SKIP
        LOCKED``: concurrent claimers on several nodes never get the same delivery.
        """

    async def record_webhook_attempt(
        self,
        delivery_id: uuid.UUID,
        *,
        status: DeliveryStatus,
        status_code: int | None,
        error: str | None,
        next_attempt_at: datetime | None,
    ) -> bool:
        """Count one attempt of a pending delivery and set its outcome.

        ``status`` PENDING needs ``next_attempt_at`` (the retry); SUCCEEDED and FAILED
        need ``None``. False when the delivery is gone or no longer pending.

        Raises:
            ValueError: ``next_attempt_at`` does not fit ``status``.
        """

    async def release_webhook_deliveries(self, delivery_ids: Collection[uuid.UUID]) -> int:
        """End the lease of pending deliveries this dispatcher will not send (it is
        stopping): they are due again at once. Returns how many were released."""

    async def next_webhook_due_at(self, *, exclude: Collection[uuid.UUID] = ()) -> datetime | None:
        """When the earliest pending delivery (of endpoints not in ``exclude``) is due."""

    async def list_webhook_deliveries(
        self,
        webhook_id: uuid.UUID,
        *,
        page: int = 1,
        limit: int = 20,
        status: DeliveryStatus | None = None,
    ) -> tuple[list[WebhookDelivery], int]:
        """One page (1-based) of an endpoint's deliveries, newest first, and the total.

        Raises:
            ValueError: ``page`` or ``limit`` below 1.
        """

    async def prune_webhook_deliveries(self, *, finished_before: datetime) -> int:
        """Delete succeeded and failed deliveries last updated before ``finished_before``."""
