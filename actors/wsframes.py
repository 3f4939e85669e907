"""Server-side WebSocket frames, encoded once and written as they are (RFC 6455 §5.2).

A server frame is never masked, so the same bytes can go to every subscriber of a
channel: the fan-out encodes a notification once and hands the same ``bytes`` object to
each socket. Only unfragmented frames (FIN set) are produced; RSV bits are always 0,
which stays legal even when permessage-deflate was negotiated.
"""

from __future__ import annotations

import struct

OPCODE_TEXT = 0x1
OPCODE_CLOSE = 0x8
OPCODE_PING = 0x9
OPCODE_PONG = 0xA
FIN = 0x80

#: Largest payload that fits the 7-bit length field.
MAX_SHORT_PAYLOAD = 125
#: Largest payload that fits the 16-bit extended length field.
MAX_MEDIUM_PAYLOAD = 0xFFFF
#: Control frames carry at most 125 bytes; the close code takes 2 of them.
MAX_CLOSE_REASON_BYTES = MAX_SHORT_PAYLOAD - 2

_MEDIUM = struct.Struct("!BBH")
_LONG = struct.Struct("!BBQ")


def encode_frame(opcode: int, payload: bytes) -> bytes:
    """Header plus ``payload`` for one final, unmasked frame."""
    size = len(payload)
    first = FIN | opcode
    if size <= MAX_SHORT_PAYLOAD:
        return bytes((first, size)) + payload
    if size <= MAX_MEDIUM_PAYLOAD:
        return _MEDIUM.pack(first, 126, size) + payload
    return _LONG.pack(first, 127, size) + payload


def text_frame(payload: bytes) -> bytes:
    """A text frame; ``payload`` must already be UTF-8."""
    return encode_frame(OPCODE_TEXT, payload)


def pong_frame(payload: bytes) -> bytes:
    """The answer to a WebSocket ping (same payload, at most 125 bytes)."""
    return encode_frame(OPCODE_PONG, payload[:MAX_SHORT_PAYLOAD])


def close_frame(code: int, reason: str = "") -> bytes:
    """A close frame with ``code`` and a reason cut to fit a control frame."""
    raw = reason.encode("utf-8")[:MAX_CLOSE_REASON_BYTES]
    while raw:
        try:
            raw.decode("utf-8")
            break
        except UnicodeDecodeError:  # cut inside a character: drop its partial bytes
            raw = raw[:-1]
    return encode_frame(OPCODE_CLOSE, struct.pack("!H", code) + raw)
