"""A deliberately minimal WebSocket client on raw trio sockets, for what real client
libraries refuse to do: invalid UTF-8, oversized frames, a receive buffer that is never
read, frames sent before the handshake answer arrives."""

from __future__ import annotations

import base64
import json
import secrets
import socket
import struct
from dataclasses import dataclass, field
from typing import Any

import trio

OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9


def client_frame(opcode: int, payload: bytes, *, fin: bool = True) -> bytes:
    """A masked client frame."""
    mask = secrets.token_bytes(4)
    size = len(payload)
    first = (0x80 if fin else 0) | opcode
    if size < 126:
        header = struct.pack("!BB", first, 0x80 | size)
    elif size <= 0xFFFF:
        header = struct.pack("!BBH", first, 0x80 | 126, size)
    else:
        header = struct.pack("!BBQ", first, 0x80 | 127, size)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return header + mask + masked


def upgrade_request(port: int, token: str | None, extra: str = "") -> bytes:
    key = base64.b64encode(secrets.token_bytes(16)).decode()
    target = "/ws/notifications" + (f"?token={token}" if token else "")
    return (
        f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        f"{extra}\r\n"
    ).encode()


@dataclass
class ServerFrame:
    opcode: int
    payload: bytes

    def json(self) -> dict[str, Any]:
        value: dict[str, Any] = json.loads(self.payload)
        return value

    @property
    def close_code(self) -> int:
        assert self.opcode == OP_CLOSE
        code: int = struct.unpack("!H", self.payload[:2])[0]
        return code


@dataclass
class RawClient:
    sock: trio.socket.SocketType
    buffer: bytearray = field(default_factory=bytearray)
    status_line: bytes = b""
    #: The head of the server's answer to the upgrade (status line and headers).
    head: bytes = b""

    async def send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            sent = await self.sock.send(view)
            view = view[sent:]

    async def send_text(self, text: str | bytes) -> None:
        await self.send(client_frame(OP_TEXT, text.encode() if isinstance(text, str) else text))

    async def send_json(self, frame: dict[str, Any]) -> None:
        await self.send_text(json.dumps(frame))

    async def _fill(self) -> bool:
        chunk = await self.sock.recv(65536)
        self.buffer += chunk
        return bool(chunk)

    async def frame(self) -> ServerFrame:
        """The next server frame. Raises ``EOFError`` when the socket ends first."""
        while True:
            frame = pop_frame(self.buffer)
            if frame is not None:
                return frame
            if not await self._fill():
                raise EOFError("connection closed without a frame")

    async def json_until(self, kind: str) -> dict[str, Any]:
        while True:
            frame = await self.frame()
            assert frame.opcode == OP_TEXT, frame
            value = frame.json()
            if value["type"] == kind:
                return value

    async def close_code(self) -> int:
        """Read frames until the close frame; its code."""
        while True:
            frame = await self.frame()
            if frame.opcode == OP_CLOSE:
                return frame.close_code

    async def aclose(self) -> None:
        self.sock.close()
        await trio.lowlevel.checkpoint()


def pop_frame(buf: bytearray) -> ServerFrame | None:
    """Remove and return the first complete server frame in ``buf``, if there is one."""
    if len(buf) < 2:
        return None
    size = buf[1] & 0x7F
    start = 2
    if size == 126:
        if len(buf) < 4:
            return None
        size = struct.unpack("!H", buf[2:4])[0]
        start = 4
    elif size == 127:
        if len(buf) < 10:
            return None
        size = struct.unpack("!Q", buf[2:10])[0]
        start = 10
    assert not buf[1] & 0x80, "server frames are never masked"
    if len(buf) < start + size:
        return None
    assert buf[0] & 0x80, "server frames are never fragmented"
    frame = ServerFrame(buf[0] & 0x0F, bytes(buf[start : start + size]))
    del buf[: start + size]
    return frame


async def raw_connect(
    port: int,
    token: str | None,
    *,
    rcvbuf: int | None = None,
    extra_headers: str = "",
    early: bytes = b"",
) -> RawClient:
    """Connect and upgrade; ``early`` bytes are sent in the same write as the request."""
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    await sock.connect(("127.0.0.1", port))
    client = RawClient(sock)
    await client.send(upgrade_request(port, token, extra_headers) + early)
    while b"\r\n\r\n" not in client.buffer:
        if not await client._fill():
            raise EOFError("no handshake answer")
    head, _, rest = bytes(client.buffer).partition(b"\r\n\r\n")
    client.head = head
    client.status_line = head.split(b"\r\n", 1)[0]
    client.buffer = bytearray(rest)
    return client
