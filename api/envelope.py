"""The JSON envelope of SPEC §2 for every response under ``/api/v1`` (and the others)."""

from __future__ import annotations

import json
import time
from datetime import datetime
from http import HTTPStatus
from typing import Any

from quart import Response, g

from api.errors import ApiError


def utc_now_iso() -> str:
    """Now, UTC, to the millisecond: ``2025-01-31T12:00:00.123Z``.

    Every published notification gets one, so it is cached: the text is rebuilt once
    per millisecond (the ``datetime`` way costs ten times a cache hit). The cache is one
    tuple, swapped whole, so threads never see a half-updated entry.
    """
    global _last_iso
    now_ms = time.time_ns() // 1_000_000
    cached = _last_iso
    if cached[0] == now_ms:
        return cached[1]
    seconds, ms = divmod(now_ms, 1000)
    if cached[0] // 1000 == seconds:
        text = f"{cached[1][:19]}.{ms:03d}Z"
    else:
        text = f"{time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(seconds))}.{ms:03d}Z"
    _last_iso = (now_ms, text)
    return text


_last_iso: tuple[int, str] = (-1, "")


def meta() -> dict[str, Any]:
    return {"timestamp": utc_now_iso(), "request_id": getattr(g, "request_id", None)}


def _default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat().replace("+00:00", "Z")
    return str(value)


#: One encoder for every envelope (``json.dumps`` with options builds one per call).
_ENCODER = json.JSONEncoder(default=_default, separators=(",", ":"), ensure_ascii=False)


def _dump(payload: dict[str, Any]) -> str:
    """``payload`` as compact JSON (datetimes as ``…Z``, anything else unknown as text)."""
    return _ENCODER.encode(payload)


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
    return Response(
        _dump(payload),
        status=error.status,
        headers=_error_headers(error),
        content_type="application/json",
    )


def raw_failure(error: ApiError, *, request_id: str | None = None) -> bytes:
    """The envelope of ``error`` as a whole ``Connection: close`` HTTP/1.1 response, for
    answers written straight to a socket outside the app (the front door, WebSocket
    upgrades refused before the handshake)."""
    payload = {
        "status": "error",
        "error": error.body(),
        "meta": {"timestamp": utc_now_iso(), "request_id": request_id},
    }
    body = _dump(payload).encode()
    headers = _error_headers(error)
    if request_id is not None:
        headers["X-Request-ID"] = request_id
    lines = [f"HTTP/1.1 {error.status} {HTTPStatus(error.status).phrase}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    lines += [
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        "Connection: close",
        "",
        "",
    ]
    return "\r\n".join(lines).encode("latin-1") + body


def _error_headers(error: ApiError) -> dict[str, str]:
    headers = dict(error.headers)
    if error.retry_after is not None:
        headers.setdefault("Retry-After", str(error.retry_after))
    return headers
