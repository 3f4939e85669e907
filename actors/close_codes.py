"""The one table of WebSocket close codes and in-band error codes (SPEC §3).

Everything the server can close a connection with, and every ``code`` an error frame can
carry, is listed here with the advice a client should follow. ``docs/protocol.md``
shows the same table; a test keeps the two in step.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class CloseCode(enum.IntEnum):
    """Close codes the server sends. 1xxx are RFC 6455 codes, 4xxx are the hub's own."""

    NORMAL = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    UNSUPPORTED_DATA = 1003
    INVALID_PAYLOAD = 1007
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    UNAUTHORIZED = 4001
    FORBIDDEN_ORIGIN = 4003
    HEARTBEAT_TIMEOUT = 4008
    SLOW_CONSUMER = 4009
    TOKEN_EXPIRED = 4010
    INSUFFICIENT_STATE = 4011


@dataclass(frozen=True, slots=True)
class CloseInfo:
    """What a close code means: the ``reason`` text sent in the close frame, whether a
    client should reconnect on its own, and what else it should do."""

    reason: str
    reconnect: bool
    advice: str


CLOSE_INFO: dict[CloseCode, CloseInfo] = {
    CloseCode.NORMAL: CloseInfo(
        "normal closure", False, "The client asked to close; nothing to do."
    ),
    CloseCode.GOING_AWAY: CloseInfo(
        "server shutting down",
        True,
        "Reconnect with backoff and jitter (to any node); resubscribe with `since`.",
    ),
    CloseCode.PROTOCOL_ERROR: CloseInfo(
        "protocol error",
        False,
        "Client bug: a frame broke RFC 6455 (unmasked, bad opcode, bad fragmentation). Fix the "
        "client library before reconnecting.",
    ),
    CloseCode.UNSUPPORTED_DATA: CloseInfo(
        "binary frames are not accepted",
        False,
        "Client bug: send JSON text frames only. Fix before reconnecting.",
    ),
    CloseCode.INVALID_PAYLOAD: CloseInfo(
        "invalid UTF-8 in a text frame",
        False,
        "Client bug: text frames must be valid UTF-8. Fix before reconnecting.",
    ),
    CloseCode.POLICY_VIOLATION: CloseInfo(
        "too many invalid frames",
        False,
        "Client bug: more than 10 invalid frames in 10 s. Fix before reconnecting.",
    ),
    CloseCode.MESSAGE_TOO_BIG: CloseInfo(
        "frame too large",
        False,
        "Client bug: a message was over 64 KiB. Fix before reconnecting.",
    ),
    CloseCode.INTERNAL_ERROR: CloseInfo(
        "internal error",
        True,
        "Server fault on this connection only. Reconnect with backoff; resubscribe with `since`.",
    ),
    CloseCode.UNAUTHORIZED: CloseInfo(
        "unauthorized",
        False,
        "Token missing, invalid, expired or revoked (logout, account deleted). Get a new "
        "access token (refresh or log in) before reconnecting; never retry the same token.",
    ),
    CloseCode.FORBIDDEN_ORIGIN: CloseInfo(
        "origin not allowed",
        False,
        "The page's Origin is not in ALLOWED_ORIGINS. Retrying will not help.",
    ),
    CloseCode.HEARTBEAT_TIMEOUT: CloseInfo(
        "heartbeat timeout",
        True,
        "Nothing was received for HEARTBEAT_TIMEOUT s. Send a ping every `heartbeat_interval` "
        "s; reconnect and resubscribe with `since`.",
    ),
    CloseCode.SLOW_CONSUMER: CloseInfo(
        "slow consumer",
        True,
        "The client read too slowly and its send queue overflowed. Reconnect and resubscribe "
        "with `since` to get what was missed.",
    ),
    CloseCode.TOKEN_EXPIRED: CloseInfo(
        "token expired",
        True,
        "The access token expired without an in-band `refresh`. Refresh the token, then "
        "reconnect and resubscribe with `since`.",
    ),
    CloseCode.INSUFFICIENT_STATE: CloseInfo(
        "insufficient state",
        True,
        "The node may have missed messages on a channel you subscribe to (Redis restarted or "
        "was unreachable). Reconnect to any node and resubscribe with `since`; refetch any "
        "channel that answers `recovered:false`.",
    ),
}


class ErrorCode(enum.StrEnum):
    """``code`` of an in-band error frame; the connection stays open after each."""

    VALIDATION_ERROR = "VALIDATION_ERROR"
    FORBIDDEN = "FORBIDDEN"
    LIMIT_EXCEEDED = "LIMIT_EXCEEDED"
    UNAUTHORIZED = "UNAUTHORIZED"


ERROR_INFO: dict[ErrorCode, str] = {
    ErrorCode.VALIDATION_ERROR: "The frame (or the one channel named in `channel`) is malformed: "
    "not JSON, not an object, unknown `type`, wrong field types or a bad channel name. Fix the "
    "frame; repeated errors (over 10 in 10 s) close the connection with 1008.",
    ErrorCode.FORBIDDEN: "The user may not subscribe to `channel`. Do not retry.",
    ErrorCode.LIMIT_EXCEEDED: "Subscribing to `channel` would exceed the per-connection channel "
    "limit (100). Unsubscribe from something first.",
    ErrorCode.UNAUTHORIZED: "The token sent with `refresh` is invalid, expired, revoked or "
    "belongs to another user. The connection keeps its old token until that expires (4010).",
}


def close_codes_table() -> str:
    """The Markdown table of close codes shown in ``docs/protocol.md``."""
    rows = [
        "| code | reason sent | reconnect? | what the client should do |",
        "|---|---|---|---|",
    ]
    for code, info in CLOSE_INFO.items():
        reconnect = "yes" if info.reconnect else "**no**"
        rows.append(f"| {code.value} | {info.reason} | {reconnect} | {info.advice} |")
    return "\n".join(rows)


def error_codes_table() -> str:
    """The Markdown table of error-frame codes shown in ``docs/protocol.md``."""
    rows = ["| code | meaning and what to do |", "|---|---|"]
    rows += [f"| `{code.value}` | {text} |" for code, text in ERROR_INFO.items()]
    return "\n".join(rows)
