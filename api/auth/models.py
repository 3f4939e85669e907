"""Request and response models of ``/api/v1/auth`` (they validate and document)."""

from __future__ import annotations

from typing import Annotated

from pydantic import EmailStr, Field, StrictBool, StringConstraints, field_validator

from api.auth.passwords import MAX_BYTES, check_password_policy
from api.validation import ApiModel, QueryModel

EMAIL_MAX = 255
NAME_MAX = 255
TOKEN_MAX = 4096

FullName = Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=1, max_length=NAME_MAX)
]


class RegisterIn(ApiModel):
    email: EmailStr = Field(max_length=EMAIL_MAX)
    password: str = Field(
        min_length=8,
        max_length=MAX_BYTES,
        description="8+ characters with upper, lower and digit; at most 72 bytes UTF-8.",
    )
    full_name: FullName
    terms_accepted: StrictBool

    @field_validator("password")
    @classmethod
    def _policy(cls, value: str) -> str:
        check_password_policy(value)
        return value

    @field_validator("terms_accepted")
    @classmethod
    def _terms(cls, value: bool) -> bool:
        if value is not True:
            raise ValueError("The terms must be accepted")
        return value


class RegisteredOut(ApiModel):
    user_id: str
    email: str
    full_name: str
    is_verified: bool
    created_at: str


class VerifyEmailIn(ApiModel):
    token: str = Field(min_length=1, max_length=TOKEN_MAX)


class VerifyEmailQuery(QueryModel):
    token: str = Field(min_length=1, max_length=TOKEN_MAX)


class ResendIn(ApiModel):
    email: str = Field(min_length=1, max_length=EMAIL_MAX)


class LoginIn(ApiModel):
    """Any strings are accepted: a wrong or impossible e-mail or password is a 401."""

    email: str
    password: str


class RefreshIn(ApiModel):
    refresh_token: str = Field(min_length=1, max_length=TOKEN_MAX)


class TokensOut(ApiModel):
    access_token: str
    refresh_token: str
    token_type: str
    expires_in: int
