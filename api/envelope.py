"""The JSON envelope of SPEC §2 for every response under ``/api/v1`` (and the others)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from quart import Response, g

from api.errors import ApiError


def utc_now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def meta() -> dict[str, Any]:
    return {"timestamp": utc_now_iso(), "request_id": getattr(g, "request_id", None)}


def _dump(payload: dict[str, Any]) -> str:
    return json.dumps(payload, default=_default, separators=(",", ":"), ensure_ascii=False)


def _default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat().replace("+00:00", "Z")
    return str(value)


def success(
    data: Any = None,
    *,
    status: int = 200,
    message: str | None = None,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> Response:
    """``{"status":"success","data":…,"message"?,…extra,"meta":{…}}``."""
    payload: dict[str, Any] = {"status": "success", "data": data}
    if message is not None:
        payload["message"] = message
    payload.update(extra)
    payload["meta"] = meta()
    return Response(_dump(payload), status=status, headers=headers, content_type="application/json")


def failure(error: ApiError) -> Response:
    """``{"status":"error","error":{…},"meta":{…}}`` with the error's status and headers."""
    payload = {"status": "error", "error": error.body(), "meta": meta()}
    headers = dict(error.headers)
    if error.retry_after is not None:
        headers.setdefault("Retry-After", str(error.retry_after))
    return Response(
        _dump(payload), status=error.status, headers=headers, content_type="application/json"
    )
