"""JSON logs with request context, and redaction of secrets and e-mail addresses.

Every record is one JSON object: ``timestamp``, ``level``, ``logger``, ``message`` and
``context`` (``node_id``, ``request_id``, ``user_id`` when known, plus any ``extra``).
Redaction runs on the final text, so secrets passed as arguments, inside exception
messages or inside ``?token=`` query strings never reach the output.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "request_id", default=None
)
user_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("user_id", default=None)

_REDACTIONS: list[tuple[re.Pattern[str], str]] = [
    # query-string and form style secrets: token=…, access_token=…, password=…
    (
        re.compile(
            r"(?i)\b((?:access_|refresh_)?token|password|secret|ticket|api_key)=([^&\s\"']+)"
        ),
        r"\1=[REDACTED]",
    ),
    # JSON style secrets: "password": "…"
    (
        re.compile(
            r"(?i)(\"(?:access_token|refresh_token|token|password|secret|jwt_secret_key)\"\s*:\s*)"
            r"\"(?:[^\"\\]|\\.)*\""
        ),
        r'\1"[REDACTED]"',
    ),
    (re.compile(r"(?i)\bBearer\s+[A-Za-z0-9._~+/=-]+"), "Bearer [REDACTED]"),
    # bare JWTs
    (re.compile(r"\beyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]+"), "[REDACTED-JWT]"),
    # credentials in URLs: scheme://user:pass@host
    (re.compile(r"(\b[a-z][a-z0-9+.-]*://[^:/\s@]+):[^@\s/]+@"), r"\1:[REDACTED]@"),
    # e-mail addresses
    (re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}"), "[EMAIL]"),
]

_STANDARD_ATTRS = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}


def redact(text: str) -> str:
    """Remove tokens, passwords, URL credentials and e-mail addresses from ``text``."""
    for pattern, replacement in _REDACTIONS:
        text = pattern.sub(replacement, text)
    return text


class JsonFormatter(logging.Formatter):
    def __init__(self, node_id: str) -> None:
        super().__init__()
        self.node_id = node_id

    def format(self, record: logging.LogRecord) -> str:
        context: dict[str, Any] = {"node_id": self.node_id}
        if (rid := request_id_var.get()) is not None:
            context["request_id"] = rid
        if (uid := user_id_var.get()) is not None:
            context["user_id"] = uid
        for key, value in record.__dict__.items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                context[key] = value
        entry: dict[str, Any] = {
            "timestamp": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "context": context,
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return redact(json.dumps(entry, default=str, ensure_ascii=False))


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


def configure_logging(level: str, node_id: str, fmt: str = "json") -> None:
    """Send every logger's records, redacted, to stderr as JSON (or text)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(node_id) if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    for noisy in ("hypercorn.access", "asyncio"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))
    # pika logs every failed reconnect as several ERROR lines with tracebacks; the AMQP
    # link logs one warning per attempt itself.
    logging.getLogger("pika").setLevel(logging.CRITICAL)
