"""The WebSocket protocol of SPEC §3 as pure functions: client frames in, server frames out.

Nothing here does I/O or keeps state beyond :class:`BadFrameCounter`, so every rule is
unit-tested without a socket: parsing and validating client frames, channel-name syntax
and permissions, and encoding server frames to UTF-8 JSON bytes (compact, as sent).
"""

from __future__ import annotations

import functools
import json
import re
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from json.encoder import c_make_encoder, encode_basestring
from typing import Any

from actors.close_codes import ErrorCode

#: Longest channel name.
MAX_CHANNEL_LENGTH = 128
#: Most entries in one frame's ``channels`` list or ``since`` object; the per-connection
#: subscription limit (``WS_MAX_CHANNELS``) is applied afterwards, channel by channel.
MAX_LIST_ENTRIES = 1024
#: Longest string ``id`` echoed back; integer ids must fit in 64 bits.
MAX_ID_LENGTH = 128
MAX_ID_INT = 2**63 - 1
#: Longest token accepted in a ``refresh`` frame.
MAX_TOKEN_LENGTH = 4096
#: Invalid frames tolerated per window before close 1008 ("over 10 bad frames in 10 s").
BAD_FRAME_LIMIT = 10
BAD_FRAME_WINDOW_S = 10.0
#: Channel names whose :func:`is_known_channel` answer is remembered (about 0.3 MB).
KNOWN_CHANNELS_CACHED = 2048

_CHANNEL_RE = re.compile(rf"[A-Za-z0-9_.:-]{{1,{MAX_CHANNEL_LENGTH}}}")
_DUMPS = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode

FrameId = str | int | None


class FrameError(Exception):
    """A client frame that breaks the protocol; answered with ``VALIDATION_ERROR``.

    Attributes:
        message: what was wrong, for the error frame.
        frame_id: the frame's ``id`` when it could be read, to echo back.
    """

    def __init__(self, message: str, frame_id: FrameId = None) -> None:
        super().__init__(message)
        self.message = message
        self.frame_id = frame_id


@dataclass(frozen=True, slots=True)
class Subscribe:
    id: FrameId
    channels: tuple[str, ...]
    since: dict[str, str]


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    id: FrameId
    channels: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Ping:
    id: FrameId


@dataclass(frozen=True, slots=True)
class Refresh:
    id: FrameId
    token: str


ClientFrame = Subscribe | Unsubscribe | Ping | Refresh


# -- client frames ---------------------------------------------------------------------
def parse_client_frame(text: str) -> ClientFrame:
    """Parse and validate one client text frame.

    Unknown fields are ignored (forward compatibility); duplicate channels in a list are
    collapsed, keeping the first position.

    Raises:
        FrameError: not JSON, not an object, unknown or missing ``type``, or a field of
            the wrong type. ``frame_id`` is set when the frame had a usable ``id``.
    """
    try:
        raw = json.loads(text)
    except (ValueError, RecursionError):
        raise FrameError("frame is not valid JSON") from None
    if not isinstance(raw, dict):
        raise FrameError("frame must be a JSON object")
    frame_id = _frame_id(raw.get("id"))
    kind = raw.get("type")
    if kind == "subscribe":
        channels = _channel_list(raw.get("channels"), frame_id)
        return Subscribe(frame_id, channels, _since(raw.get("since"), frame_id))
    if kind == "unsubscribe":
        return Unsubscribe(frame_id, _channel_list(raw.get("channels"), frame_id))
    if kind == "ping":
        return Ping(frame_id)
    if kind == "refresh":
        token = raw.get("token")
        if not isinstance(token, str) or not token or len(token) > MAX_TOKEN_LENGTH:
            raise FrameError("`token` must be a non-empty string", frame_id)
        return Refresh(frame_id, token)
    if kind is None:
        raise FrameError("missing `type`", frame_id)
    raise FrameError("unknown `type`", frame_id)


def _frame_id(value: Any) -> FrameId:
    """The ``id`` to echo: a short string or a 64-bit integer; anything else is dropped
    (the error about the frame is still sent, just without an ``id``)."""
    if isinstance(value, str) and len(value) <= MAX_ID_LENGTH:
        return value
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) <= MAX_ID_INT:
        return value
    if value is not None:
        raise FrameError(
            f"`id` must be a string of at most {MAX_ID_LENGTH} characters or an integer"
        )
    return None


def _channel_list(value: Any, frame_id: FrameId) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise FrameError("`channels` must be a non-empty list of strings", frame_id)
    if len(value) > MAX_LIST_ENTRIES:
        raise FrameError(f"`channels` lists at most {MAX_LIST_ENTRIES} entries", frame_id)
    if not all(isinstance(item, str) for item in value):
        raise FrameError("`channels` must be a non-empty list of strings", frame_id)
    return tuple(dict.fromkeys(value))


def _since(value: Any, frame_id: FrameId) -> dict[str, str]:
    if value is None:
        return {}
    if (
        not isinstance(value, dict)
        or len(value) > MAX_LIST_ENTRIES
        or not all(isinstance(offset, str) for offset in value.values())
    ):
        raise FrameError("`since` must be an object of channel → offset strings", frame_id)
    return value


class BadFrameCounter:
    """Counts invalid frames in a sliding window; tells when the limit is passed.

    The timestamps deque is only created at the first bad frame, so well-behaved
    connections pay nothing for it.
    """

    __slots__ = ("_times",)

    def __init__(self) -> None:
        self._times: deque[float] | None = None

    def hit(self, now: float) -> bool:
        """Record a bad frame at ``now``; True when more than :data:`BAD_FRAME_LIMIT`
        happened within :data:`BAD_FRAME_WINDOW_S`."""
        if self._times is None:
            self._times = deque(maxlen=BAD_FRAME_LIMIT + 1)
        times = self._times
        times.append(now)
        while times and times[0] <= now - BAD_FRAME_WINDOW_S:
            times.popleft()
        return len(times) > BAD_FRAME_LIMIT


# -- channels --------------------------------------------------------------------------
def is_valid_channel_name(name: str) -> bool:
    """At most 128 characters of ``[A-Za-z0-9_.:-]``."""
    return _CHANNEL_RE.fullmatch(name) is not None


@functools.lru_cache(maxsize=KNOWN_CHANNELS_CACHED)
def is_known_channel(name: str) -> bool:
    """True when the name belongs to a namespace someone may subscribe to: ``global``,
    ``public.*``, ``user.<id>``, ``admin``, ``admin.*``. Publishing elsewhere would reach
    nobody, so the REST API refuses it.

    Every publish asks this (RabbitMQ ingest, then the realtime core), mostly about the
    same few names: the answers for the last :data:`KNOWN_CHANNELS_CACHED` names are
    kept (a lookup is a fifth of a regex match)."""
    if not is_valid_channel_name(name):
        return False
    if name in ("global", "admin"):
        return True
    for prefix in ("public.", "user.", "admin."):
        if name.startswith(prefix) and len(name) > len(prefix):
            return True
    return False


def may_subscribe(name: str, user_id: str, is_admin: bool) -> bool:
    """The channel rules: ``global`` and ``public.*`` for anyone, ``user.<user_id>`` for
    that user only, ``admin`` and ``admin.*`` for admins only, nothing else."""
    if name == "global" or (name.startswith("public.") and len(name) > len("public.")):
        return True
    if name.startswith("user."):
        return name[len("user.") :] == user_id
    if name == "admin" or (name.startswith("admin.") and len(name) > len("admin.")):
        return is_admin
    return False


def check_subscription(name: str, user_id: str, is_admin: bool) -> ErrorCode | None:
    """``None`` when the user may subscribe, else the error code for that channel."""
    if not is_valid_channel_name(name):
        return ErrorCode.VALIDATION_ERROR
    if not may_subscribe(name, user_id, is_admin):
        return ErrorCode.FORBIDDEN
    return None


# -- server frames ---------------------------------------------------------------------
def encode(payload: dict[str, Any]) -> bytes:
    """Compact UTF-8 JSON of a server frame."""
    return _DUMPS(payload).encode()


def _with_id(payload: dict[str, Any], frame_id: FrameId) -> dict[str, Any]:
    if frame_id is not None:
        payload["id"] = frame_id
    return payload


def welcome(connection_id: str, user_id: str, heartbeat_interval: float) -> bytes:
    interval: float | int = int(heartbeat_interval)
    if interval != heartbeat_interval:
        interval = heartbeat_interval
    return encode(
        {
            "type": "welcome",
            "connection_id": connection_id,
            "user_id": user_id,
            "heartbeat_interval": interval,
        }
    )


def subscribed(
    frame_id: FrameId,
    channels: list[str],
    recovered: dict[str, bool] | None,
    offsets: dict[str, str] | None = None,
) -> bytes:
    """``recovered`` is sent when the request had ``since``; ``offsets`` gives each newly
    subscribed channel's current position (what to pass as ``since`` after a reconnect
    when no notification arrived meanwhile)."""
    payload: dict[str, Any] = {"type": "subscribed", "channels": channels}
    if recovered is not None:
        payload["recovered"] = recovered
    if offsets:
        payload["offsets"] = offsets
    return encode(_with_id(payload, frame_id))


def unsubscribed(frame_id: FrameId, channels: list[str]) -> bytes:
    return encode(_with_id({"type": "unsubscribed", "channels": channels}, frame_id))


def pong(frame_id: FrameId) -> bytes:
    return encode(_with_id({"type": "pong"}, frame_id))


def refreshed(frame_id: FrameId) -> bytes:
    return encode(_with_id({"type": "refreshed"}, frame_id))


def error(
    code: ErrorCode,
    message: str,
    frame_id: FrameId = None,
    *,
    channel: str | None = None,
) -> bytes:
    payload: dict[str, Any] = {"type": "error", "code": code.value, "message": message}
    if channel is not None:
        payload["channel"] = channel
    return encode(_with_id(payload, frame_id))


_NOTIFICATION_HEAD = b'{"type":"notification","channel":'
_STRICT = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _strict_encoder() -> Callable[[dict[str, Any]], str]:
    """``_STRICT.encode`` for a dict, built once: ``JSONEncoder.encode`` builds a new C
    encoder for every call (two thirds of its cost for a small object). Without the
    circular-reference check, which needs per-call state; a cycle ends in
    ``RecursionError`` instead (turned into ``ValueError`` by :func:`message_body`)."""
    if c_make_encoder is None:  # no C accelerator: the plain encoder
        return lambda data: _STRICT.encode(data)
    encode = c_make_encoder(
        None, _STRICT.default, encode_basestring, None, ":", ",", False, False, False
    )
    return lambda data: "".join(encode(data, 0))


_STRICT_DUMPS = _strict_encoder()


def message_body(data: dict[str, Any], event: str | None = None) -> bytes:
    """The channel-independent part of a notification, ``"data":{…}[,"event":"…"]``.

    It is what brokers carry and history keeps, encoded once per message.

    Raises:
        ValueError: ``data`` cannot be encoded as strict JSON (NaN, infinities, a
            reference cycle or nesting deeper than the recursion limit).
        TypeError: ``data`` holds something that is not JSON.
    """
    try:
        body = b'"data":' + _STRICT_DUMPS(data).encode()
    except RecursionError:
        raise ValueError("data holds a reference cycle or is nested too deeply") from None
    if event is not None:
        body += b',"event":' + _DUMPS(event).encode()
    return body


def notification(channel: str, offset: str, body: bytes) -> bytes:
    """``{"type":"notification","channel","offset","data"[,"event"]}`` around the
    already-encoded ``body`` from :func:`message_body`."""
    return b"".join(
        (
            _NOTIFICATION_HEAD,
            encode_basestring(channel).encode(),
            b',"offset":',
            encode_basestring(offset).encode(),
            b",",
            body,
            b"}",
        )
    )
