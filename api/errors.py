"""API errors: one exception type that carries everything the error envelope needs.

Raise :class:`ApiError` (or a helper below) anywhere in a request; the app's error
handler turns it into the SPEC §2 envelope. Codes and statuses live here and nowhere else.
"""

from __future__ import annotations

from typing import Any

CODES: dict[int, str] = {
    400: "VALIDATION_ERROR",
    401: "UNAUTHORIZED",
    403: "FORBIDDEN",
    404: "NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
    409: "CONFLICT",
    413: "PAYLOAD_TOO_LARGE",
    429: "RATE_LIMIT_EXCEEDED",
    500: "INTERNAL_ERROR",
    503: "SERVICE_UNAVAILABLE",
}


class ApiError(Exception):
    """An error answer: HTTP ``status``, machine ``code`` and a human ``message``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        field: str | None = None,
        details: Any = None,
        retry_after: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code or CODES.get(status, "INTERNAL_ERROR")
        self.message = message
        self.field = field
        self.details = details
        self.retry_after = retry_after
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.field is not None:
            error["field"] = self.field
        if self.details is not None:
            error["details"] = self.details
        if self.retry_after is not None:
            error["retry_after"] = self.retry_after
        return error


def validation_error(message: str, *, field: str | None = None, details: Any = None) -> ApiError:
    return ApiError(400, message, field=field, details=details)


def unauthorized(message: str = "Authentication required") -> ApiError:
    return ApiError(401, message, headers={"WWW-Authenticate": "Bearer"})


def forbidden(message: str = "Permission denied") -> ApiError:
    return ApiError(403, message)


def not_found(message: str = "Resource not found") -> ApiError:
    return ApiError(404, message)


def conflict(message: str, *, field: str | None = None) -> ApiError:
    return ApiError(409, message, field=field)


def service_unavailable(
    message: str = "Service temporarily unavailable", *, retry_after_s: int = 5
) -> ApiError:
    return ApiError(503, message, headers={"Retry-After": str(retry_after_s)})
