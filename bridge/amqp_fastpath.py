"""A fast path for one consumer's deliveries through pika's frame reader (link thread).

pika turns every frame it reads into objects and routes each through its callback
manager, its content assembler and its channel before a delivery reaches the consumer;
and it trims its receive buffer by copying the rest after every frame. For the ingest
consumer that is most of the link thread's CPU per message.

:class:`DeliveryReader` takes over the connection's ``_on_data_available`` (the one
entry point pika's transport calls with received bytes). It walks the bytes by offset
and, for a ``Basic.Deliver`` to its consumer whose content frames follow it contiguously
(as RabbitMQ writes them), parses the method, the content header and the body frames
itself and calls its sink with the delivery. Every other frame, and any delivery it does
not take (another channel or consumer, a consumer pika has cancelled, content split by
other frames), goes through pika's own ``_process_frame`` in arrival order, so pika's
state (heartbeats, channel and connection closes, the broker's ``Basic.Cancel``) is kept
exactly as pika keeps it. The counters pika's heartbeat checker reads
(``bytes_received``, ``frames_received``) are kept up to date.

It relies on pika 1.x internals (``Connection._on_data_available``, ``_process_frame``,
``_frame_buffer``, ``Channel._cancelled``); pyproject pins pika below 2, and the ingest
tests (redelivery, a cut connection, a broker cancel, oversize bodies split over several
frames, a body above :data:`MAX_BODY_BYTES`) exercise both paths.

Threading: the link thread only, like everything on a pika connection. Re-entry (pika
calling it again from inside a frame it processes) is queued, not nested.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

from pika import frame as pika_frame
from pika import spec

__all__ = ["MAX_BODY_BYTES", "DeliveryReader", "DeliverySink"]

#: ``sink(delivery_tag, redelivered, exchange, routing_key, properties, body)``
DeliverySink = Callable[[int, bool, Any, Any, spec.BasicProperties, bytes], None]

#: Larger bodies go through pika: the reader takes a delivery only once all of it has
#: arrived, so it holds the whole body (and re-joins it per received chunk), while pika
#: consumes one body frame at a time.
MAX_BODY_BYTES = 128 * 1024

_FRAME_HEADER = struct.Struct(">BHI")
_HEADER_SIZE = 7
_DELIVER = b"\x00\x3c\x00\x3c"  # class 60 (basic), method 60 (deliver)
_CONTENT_HEADER = struct.Struct(">HHQH")  # class, weight, body size, first flag word
_TAG = struct.Struct(">Q")
_FRAME_END = spec.FRAME_END
_METHOD = spec.FRAME_METHOD
_HEADER = spec.FRAME_HEADER
_BODY = spec.FRAME_BODY


def _short_string(buf: bytes, at: int) -> tuple[Any, int]:
    """A shortstr at ``at``, decoded as pika does (UTF-8, else the raw bytes)."""
    end = at + 1 + buf[at]
    raw = buf[at + 1 : end]
    try:
        return raw.decode("utf-8"), end
    except UnicodeDecodeError:
        return raw, end


class DeliveryReader:
    """Parses the deliveries to one consumer on one channel of a pika connection.

    Args:
        connection: the pika connection object (``BlockingConnection._impl``).
        channel: its channel object the consumer is on (``BlockingChannel._impl``).
        consumer_tag: the consumer whose deliveries this reader takes.
        sink: called with each delivery it takes, in the link thread.

    Install it before ``basic_consume`` (it takes over whatever pika has buffered):
    then every delivery of the consumer goes through it.
    """

    __slots__ = (
        "_channel",
        "_channel_number",
        "_connection",
        "_pending",
        "_queued",
        "_reading",
        "_sink",
        "_tag",
        "_tag_bytes",
        "fast",
        "slow",
    )

    def __init__(
        self, connection: Any, channel: Any, consumer_tag: str, sink: DeliverySink
    ) -> None:
        self._connection = connection
        self._channel = channel
        self._channel_number: int = channel.channel_number
        self._tag = consumer_tag
        self._tag_bytes = bytes((len(consumer_tag.encode()),)) + consumer_tag.encode()
        self._sink = sink
        self._pending: bytes = connection._frame_buffer or b""
        connection._frame_buffer = b""
        self._queued: list[bytes] = []
        self._reading = False
        #: Deliveries this reader parsed, and frames it handed to pika.
        self.fast = 0
        self.slow = 0
        connection._on_data_available = self.data_received

    def data_received(self, data: bytes) -> None:
        """pika's transport hands received bytes here (instead of to pika's reader)."""
        if self._reading:  # called from inside a frame being processed
            self._queued.append(data)
            return
        self._reading = True
        try:
            while True:
                buf = self._pending + data if self._pending else data
                self._pending = b""
                used = self._read(buf)
                if used < len(buf):
                    self._pending = buf[used:]
                if not self._queued:
                    return
                data = b"".join(self._queued)
                self._queued.clear()
        finally:
            self._reading = False

    def _read(self, buf: bytes) -> int:
        """Process every complete frame in ``buf``; returns the bytes used."""
        connection = self._connection
        unpack = _FRAME_HEADER.unpack_from
        size = len(buf)
        pos = 0
        try:
            while size - pos >= _HEADER_SIZE:
                kind, number, length = unpack(buf, pos)
                end = pos + _HEADER_SIZE + length + 1
                if end > size:
                    break
                if (
                    kind == _METHOD
                    and number == self._channel_number
                    and buf[pos + 7 : pos + 11] == _DELIVER
                ):
                    taken = self._deliver(buf, pos, end)
                    if taken < 0:
                        break  # its content has not fully arrived yet
                    if taken:
                        connection.bytes_received += taken - pos
                        pos = taken
                        continue
                # pika's own path (raises InvalidFrameError on a bad frame end)
                used, value = pika_frame.decode_frame(buf[pos:end])
                if not value:  # pragma: no cover - the length was checked above
                    break
                connection.bytes_received += used
                pos += used
                self.slow += 1
                connection._process_frame(value)
        except BaseException:
            self._pending = b""  # the connection is being torn down
            raise
        return pos

    def _frame_end(self, buf: bytes, at: int, kind: int) -> int:
        """Where the frame of ``kind`` on this channel that starts at ``at`` ends: ``-1``
        when it has not all arrived yet, ``0`` when another frame (or a bad one) is
        there."""
        if len(buf) - at < _HEADER_SIZE:
            return -1
        found, channel, length = _FRAME_HEADER.unpack_from(buf, at)
        if found != kind or channel != self._channel_number:
            return 0
        end = at + _HEADER_SIZE + length + 1
        if end > len(buf):
            return -1
        return end if buf[end - 1] == _FRAME_END else 0

    def _deliver(self, buf: bytes, pos: int, end: int) -> int:
        """Take the delivery whose method frame is ``buf[pos:end]`` with its content.

        Returns where the next frame starts, ``0`` to leave it to pika, or ``-1`` when
        its content is not all in ``buf`` yet.
        """
        if buf[end - 1] != _FRAME_END:
            return 0
        tag_bytes = self._tag_bytes
        at = pos + _HEADER_SIZE + len(_DELIVER)  # the consumer tag
        if buf[at : at + len(tag_bytes)] != tag_bytes or self._tag in self._channel._cancelled:
            return 0
        at += len(tag_bytes)
        delivery_tag = _TAG.unpack_from(buf, at)[0]
        redelivered = bool(buf[at + 8] & 1)
        exchange, at = _short_string(buf, at + 9)
        routing_key, _ = _short_string(buf, at)

        # The content header frame.
        head = end
        head_end = self._frame_end(buf, head, _HEADER)
        if head_end <= 0:
            return head_end
        if head_end - head - _HEADER_SIZE - 1 < _CONTENT_HEADER.size:
            return 0
        payload = head + _HEADER_SIZE
        _class, _weight, body_size, flags = _CONTENT_HEADER.unpack_from(buf, payload)
        if body_size > MAX_BODY_BYTES:
            return 0  # pika assembles it frame by frame instead of buffering it whole
        properties = spec.BasicProperties()
        if flags:  # pika decodes from the flags on (after class, weight and body size)
            properties.decode(buf[payload + 12 : head_end - 1])
        frames = 2  # the method and the content header
        # The body frames.
        at = head_end
        if body_size == 0:
            body = b""
        else:
            parts: list[bytes] = []
            have = 0
            while have < body_size:
                part_end = self._frame_end(buf, at, _BODY)
                if part_end <= 0:
                    return part_end
                parts.append(buf[at + _HEADER_SIZE : part_end - 1])
                have += part_end - at - _HEADER_SIZE - 1
                frames += 1
                at = part_end
            if have != body_size:
                return 0  # pika raises the protocol error
            body = parts[0] if len(parts) == 1 else b"".join(parts)
        self._connection.frames_received += frames
        self.fast += 1
        self._sink(delivery_tag, redelivered, exchange, routing_key, properties, body)
        return at
