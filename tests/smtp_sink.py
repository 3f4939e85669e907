"""A tiny SMTP server on trio sockets that keeps what it receives (for tests).

It speaks just enough SMTP for ``smtplib``: EHLO/HELO, MAIL, RCPT, DATA, RSET, NOOP,
QUIT. ``fail_next`` makes the next N ``DATA`` commands fail with 451 (a temporary error,
so the sender retries); ``hold`` makes every DATA wait until :meth:`SmtpSink.release`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from email import message_from_bytes
from email.message import Message
from functools import partial

import trio

MAX_LINE = 1024 * 1024


@dataclass
class SmtpSink:
    port: int = 0
    messages: list[Message] = field(default_factory=list)
    fail_next: int = 0
    hold: bool = False
    in_data: int = 0
    max_in_data: int = 0
    _changed: trio.Event = field(default_factory=trio.Event)
    _released: trio.Event = field(default_factory=trio.Event)

    def release(self) -> None:
        self._released.set()

    def _bump(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for(self, predicate: object) -> None:
        while not predicate(self):  # type: ignore[operator]
            await self._changed.wait()

    async def _handle(self, stream: trio.SocketStream) -> None:
        buffer = b""

        async def send(line: str) -> None:
            await stream.send_all(line.encode() + b"\r\n")

        async def read_line() -> bytes | None:
            nonlocal buffer
            while b"\r\n" not in buffer:
                chunk = await stream.receive_some(65536)
                if not chunk or len(buffer) > MAX_LINE:
                    return None
                buffer += chunk
            line, buffer = buffer.split(b"\r\n", 1)
            return line

        async with stream:
            await send("220 sink ready")
            while (line := await read_line()) is not None:
                command = line[:4].upper()
                if command in (b"EHLO", b"HELO"):
                    await send("250 sink")
                elif command in (b"MAIL", b"RCPT", b"RSET", b"NOOP"):
                    await send("250 OK")
                elif command == b"QUIT":
                    await send("221 bye")
                    return
                elif command == b"DATA":
                    await send("354 go on")
                    data = []
                    while (part := await read_line()) is not None and part != b".":
                        data.append(part[1:] if part.startswith(b"..") else part)
                    self.in_data += 1
                    self.max_in_data = max(self.max_in_data, self.in_data)
                    self._bump()
                    try:
                        if self.hold:
                            await self._released.wait()
                    finally:
                        self.in_data -= 1
                    if self.fail_next > 0:
                        self.fail_next -= 1
                        await send("451 try again later")
                    else:
                        self.messages.append(message_from_bytes(b"\r\n".join(data)))
                        await send("250 queued")
                    self._bump()
                else:
                    await send("502 not implemented")


@asynccontextmanager
async def open_smtp_sink(**options: object) -> AsyncIterator[SmtpSink]:
    """Serve a sink on 127.0.0.1 (free port) for the duration of the block."""
    sink = SmtpSink(**options)  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, sink._handle, 0, host="127.0.0.1"))
        sink.port = listeners[0].socket.getsockname()[1]
        yield sink
        sink.release()
        nursery.cancel_scope.cancel()
