"""What a webhook request carries: the body, its signature and the headers (SPEC §5).

The body is ``{"id","event","timestamp","data"}`` as compact ASCII JSON (non-ASCII is
``\\u``-escaped, so the bytes on the wire are exactly ``body.encode()`` in any
encoding a receiver assumes). ``X-Webhook-Signature`` is the hex HMAC-SHA256 of those
bytes keyed with the endpoint's secret, which a receiver checks with::

    hmac.compare_digest(signature, hmac.new(secret.encode(), payload.encode(),
                                            hashlib.sha256).hexdigest())
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

__all__ = [
    "HEADER_ATTEMPT",
    "HEADER_EVENT",
    "HEADER_ID",
    "HEADER_SIGNATURE",
    "HEADER_TIMESTAMP",
    "SECRET_PREFIX",
    "USER_AGENT",
    "build_body",
    "header_value",
    "new_secret",
    "sign",
    "signed_headers",
]

#: Every secret starts with this, so it is recognisable in a config file or a leak scan.
SECRET_PREFIX = "whsec_"
#: Random bytes in a secret (base64url-encoded after the prefix).
SECRET_BYTES = 32
USER_AGENT = "notification-hub-webhooks/1"

HEADER_ID = "X-Webhook-Id"
HEADER_EVENT = "X-Webhook-Event"
HEADER_TIMESTAMP = "X-Webhook-Timestamp"
HEADER_SIGNATURE = "X-Webhook-Signature"
HEADER_ATTEMPT = "X-Webhook-Attempt"
#: Characters kept as they are in header values (visible ASCII and space, except ``%``).
_HEADER_SAFE = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) not in "%")


def new_secret() -> str:
    """A fresh signing secret: ``whsec_`` + 43 base64url characters (256 bits)."""
    return SECRET_PREFIX + secrets.token_urlsafe(SECRET_BYTES)


def build_body(*, event_id: str, event: str, timestamp: str, data: Mapping[str, Any]) -> str:
    """The request body of one event: the same text is signed and sent on every attempt.

    Raises:
        TypeError, ValueError: ``data`` is not JSON-serialisable.
    """
    return json.dumps(
        {"id": event_id, "event": event, "timestamp": timestamp, "data": dict(data)},
        separators=(",", ":"),
        ensure_ascii=True,
        allow_nan=False,
    )


def sign(secret: str, body: str) -> str:
    """Hex HMAC-SHA256 of ``body`` (UTF-8) keyed with ``secret`` (UTF-8)."""
    return hmac.new(secret.encode(), body.encode(), hashlib.sha256).hexdigest()


def header_value(text: str) -> str:
    """``text`` as a header value: anything but visible ASCII is percent-encoded (UTF-8),
    so an event name from a producer can never break or inject a header."""
    return quote(text, safe=_HEADER_SAFE)


def signed_headers(
    *, secret: str, body: str, event: str, event_id: str, attempt: int, sent_at: int
) -> dict[str, str]:
    """The headers of one attempt. ``X-Webhook-Timestamp`` is ``sent_at`` (Unix seconds)
    and changes on every retry; the body, its signature and ``X-Webhook-Id`` (the
    event id, for de-duplication) do not. The id and event are percent-encoded when
    they hold anything but visible ASCII (the body has them verbatim)."""
    return {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        HEADER_ID: header_value(event_id),
        HEADER_EVENT: header_value(event),
        HEADER_TIMESTAMP: str(sent_at),
        HEADER_SIGNATURE: sign(secret, body),
        HEADER_ATTEMPT: str(attempt),
    }
