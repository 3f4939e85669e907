"""Request and response models of ``/api/v1/users``."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import Field, StringConstraints, field_validator

from api.validation import ApiModel, QueryModel

AVATAR_MAX = 512
NAME_MAX = 255
LIMIT_MAX = 100
PAGE_MAX = 1_000_000

FullName = Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=1, max_length=NAME_MAX)
]


class UserOut(ApiModel):
    user_id: str
    email: str
    full_name: str
    avatar_url: str | None
    is_verified: bool
    is_active: bool
    created_at: str
    updated_at: str


class AdminUserOut(UserOut):
    role: Literal["user", "admin"]


class UpdateMeIn(ApiModel):
    """Only these fields may change; anything else (``email``, ``is_verified``…) is a 400.
    ``avatar_url: null`` removes the avatar."""

    full_name: FullName | None = None
    avatar_url: str | None = Field(None, max_length=AVATAR_MAX)

    @field_validator("avatar_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is None:
            return value
        lowered = value.lower()
        if not lowered.startswith(("http://", "https://")) or len(value) <= len("https://"):
            raise ValueError("avatar_url must be an http(s) URL")
        if any(c.isspace() or ord(c) < 32 for c in value):
            raise ValueError("avatar_url must not contain spaces or control characters")
        return value

    @field_validator("full_name")
    @classmethod
    def _not_null(cls, value: str | None) -> str | None:
        if value is None:
            raise ValueError("full_name cannot be null")
        return value


class ListUsersQuery(QueryModel):
    """``created_after`` must be an ISO 8601 date-time (a bare number is refused)."""

    page: int = Field(1, ge=1, le=PAGE_MAX)
    limit: int = Field(20, ge=1, le=LIMIT_MAX)
    sort: Literal["created_at", "updated_at", "email", "full_name"] = "created_at"
    order: Literal["asc", "desc"] = "desc"
    is_active: bool | None = None
    created_after: datetime | None = Field(None, description="ISO 8601 date-time.")
    search: str | None = Field(None, max_length=255)

    @field_validator("created_after", mode="before")
    @classmethod
    def _iso_only(cls, value: object) -> object:
        if isinstance(value, str):
            try:
                float(value)
            except ValueError:
                return value
            raise ValueError("created_after must be an ISO 8601 date-time")
        return value
