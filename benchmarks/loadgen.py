"""Load generation for WebSocket fan-out benchmarks: raw sockets, no framework.

The generator must never be the bottleneck, so it is built from the cheapest parts:

- **Subscribers** are non-blocking sockets driven by ``select.epoll`` in worker processes
  (pinned to their own CPU). The HTTP upgrade is written by hand. Two kinds of worker:

  - *counting* workers read each socket in large batches (every ``read_interval_s``) and
    count notifications without decoding JSON: by default with ``bytes.count`` of a
    per-server byte marker that every notification frame holds once
    (:class:`MarkerCounter`, :attr:`SubscriberSpec.count_marker`), or, when the spec
    has no marker or the worker asks for ``counter="strict"``, by walking every 2-10
    byte WebSocket frame header (:class:`FrameCounter`).
  - a *sample* worker holds a few sockets that it reads as soon as data arrives, decodes
    every frame, checks the JSON and the per-channel offset continuity
    (:class:`SequenceChecker`: seq +1 each time, no gap, no duplicate) and measures the
    latency from the publisher's timestamp in ``data.t`` (``time.time_ns()``).

- **Publisher**: one process with ``K`` keep-alive HTTP/1.1 connections (h11) posting to
  the REST publish route, either closed-loop (at most ``K`` requests in flight: the
  maximum rate) or open-loop at a fixed rate, where ``data.t`` is the *scheduled* send
  time so that queueing on the generator side counts as latency (no coordinated omission).

- :class:`NodeProcess` starts ``hub serve`` pinned to a CPU with ``taskset`` in its own
  process group, creates users with ``hub users create`` and reads its RSS and CPU time
  from ``/proc``.

Workers are controlled over ``multiprocessing`` pipes with small command tuples, so the
same pieces serve other workloads (idle connections, other servers: the handshake path,
the messages sent after the upgrade and the "ready" marker are parameters).

Everything talks to 127.0.0.x only, and every wait is bounded.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import hashlib
import json
import math
import multiprocessing
import multiprocessing.connection
import os
import resource
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import h11

# --------------------------------------------------------------------------- constants

OP_CONTINUATION, OP_TEXT, OP_BINARY = 0x0, 0x1, 0x2
OP_CLOSE, OP_PING, OP_PONG = 0x8, 0x9, 0xA
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
#: IP_BIND_ADDRESS_NO_PORT (Linux ≥ 4.2): bind a source address, pick the port at connect,
#: so 127.0.0.x sources do not each reserve a port for every destination.
IP_BIND_ADDRESS_NO_PORT = 24
RECV_BYTES = 256 * 1024
#: Most epoll events taken per ``poll`` while draining.
MAX_EVENTS = 4096
#: The longest close frame a server can send: 2-byte header + 125 bytes of payload.
MAX_CLOSE_FRAME = 127
#: Close codes an endpoint may send (RFC 6455 §7.4: 1004-1006 and 1015 never go on the
#: wire; 3000-4999 are for libraries and applications).
SENDABLE_CLOSE_CODES = (frozenset(range(1000, 1015)) - {1004, 1005, 1006}) | frozenset(
    range(3000, 5000)
)
#: The start of every hub notification frame (``actors.protocol.notification``); the
#: websockets peer writes the same compact JSON with ``type`` first.
HUB_NOTIFICATION_MARKER = b'{"type":"notification",'
#: The start of every socket.io ``notification`` event (python-socketio, namespace ``/``).
SOCKETIO_NOTIFICATION_MARKER = b'42["notification",'
#: Upgrades in flight at once while opening connections.
OPEN_CONCURRENCY = 256
OPEN_TIMEOUT_S = 120.0
COMMAND_TIMEOUT_S = 60.0
NODE_START_TIMEOUT_S = 30.0
NODE_STOP_TIMEOUT_S = 15.0
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024
WANTED_NOFILE = 65536


# --------------------------------------------------------------------------- process setup


def raise_nofile(wanted: int = WANTED_NOFILE) -> int:
    """Raise ``RLIMIT_NOFILE`` as far as allowed (root may lift the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for target_hard in (max(hard, wanted), hard):
        target = min(wanted, target_hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, target_hard))
            return target
        except (ValueError, OSError):
            continue
    return soft


def _child_setup() -> None:
    """In the node's process before exec: more file descriptors, and SIGTERM when the
    benchmark process dies, however it dies (Linux ``PR_SET_PDEATHSIG``)."""
    raise_nofile()
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def pin_to_cpu(cpu: int | None) -> None:
    if cpu is not None and hasattr(os, "sched_setaffinity"):
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, {cpu})


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` (from ``/proc/<pid>/stat``)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def cpu_busy_seconds() -> dict[str, float]:
    """Busy (non-idle, non-iowait) seconds per CPU since boot, from ``/proc/stat``."""
    busy: dict[str, float] = {}
    with open("/proc/stat") as f:
        for line in f:
            if not line.startswith("cpu"):
                break
            name, *values = line.split()
            ticks = [int(v) for v in values[:8]]
            busy[name] = (sum(ticks) - ticks[3] - ticks[4]) / CLK_TCK
    return busy


def rss_kb(pid: int) -> int:
    """Resident set size of ``pid`` in KiB (from ``/proc/<pid>/statm``)."""
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * PAGE_KB


def machine_info() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    versions: dict[str, str] = {}
    from importlib import metadata

    for name in ("trio", "wsproto", "hypercorn", "quart-trio", "h11", "notification-hub"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    return {
        "cpu_model": model,
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "kernel": os.uname().release,
        "packages": versions,
        "loadavg_at_start": os.getloadavg(),
    }


# --------------------------------------------------------------------------- handshake


def make_key() -> bytes:
    return base64.b64encode(os.urandom(16))


def accept_for(key: bytes) -> bytes:
    return base64.b64encode(hashlib.sha1(key + WS_GUID).digest())


def upgrade_request(
    host: str, port: int, path: str, key: bytes, headers: Sequence[tuple[str, str]] = ()
) -> bytes:
    """The bytes of a WebSocket upgrade request (RFC 6455 §4.1)."""
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: {host}:{port}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key.decode()}",
        "Sec-WebSocket-Version: 13",
        *(f"{name}: {value}" for name, value in headers),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def parse_upgrade_response(buf: bytes) -> tuple[int, dict[str, str], int] | None:
    """``(status, headers, end_of_head)`` once the response head is complete, else None.

    Header names are lower-cased; bytes from ``end_of_head`` on are WebSocket frames.
    """
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    lines = buf[:end].decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        raise ValueError(f"not an HTTP response: {lines[0]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(parts[1]), headers, end + 4


# --------------------------------------------------------------------------- frames


def encode_frame(payload: bytes, opcode: int = OP_TEXT, *, mask: bytes | None = None) -> bytes:
    """One final frame. Client frames must be masked: pass a 4-byte ``mask`` (random if
    ``None``); pass ``mask=b""`` for an unmasked (server-style) frame."""
    if mask is None:
        mask = os.urandom(4)
    length = len(payload)
    masked = 0x80 if mask else 0
    if length < 126:
        head = bytes((0x80 | opcode, masked | length))
    elif length < 1 << 16:
        head = bytes((0x80 | opcode, masked | 126)) + length.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, masked | 127)) + length.to_bytes(8, "big")
    if not mask:
        return head + payload
    return head + mask + apply_mask(payload, mask)


def apply_mask(data: bytes, mask: bytes) -> bytes:
    if not data:
        return data
    repeated = (mask * (len(data) // 4 + 1))[: len(data)]
    return (int.from_bytes(data, "little") ^ int.from_bytes(repeated, "little")).to_bytes(
        len(data), "little"
    )


class FrameCounter:
    """Counts complete server frames by reading only their headers.

    Attributes:
        text: complete text frames (FIN, no RSV, unmasked, opcode 1).
        other: ping/pong frames.
        bad: frames whose header breaks the rules for a server frame (masked, RSV bits,
            fragmented, binary, non-minimal length); counting stops at the first one
            because the frame boundaries can no longer be trusted.
        close_code: the code of a close frame, once one arrived (0 if it had none).
        bytes: bytes fed.
    """

    __slots__ = ("_buf", "bad", "bytes", "close_code", "other", "text")

    def __init__(self) -> None:
        self._buf = b""
        self.text = 0
        self.other = 0
        self.bad = 0
        self.bytes = 0
        self.close_code: int | None = None

    @property
    def broken(self) -> bool:
        return self.bad > 0 or self.close_code is not None

    def feed(self, data: bytes) -> int:
        """Account for ``data``; returns how many complete text frames it finished."""
        self.bytes += len(data)
        if self.bad or self.close_code is not None:
            return 0
        buf = self._buf + data if self._buf else data
        n = len(buf)
        pos = 0
        text = 0
        while n - pos >= 2:
            b0 = buf[pos]
            length = buf[pos + 1]
            if length < 126:
                start = pos + 2
            elif length == 126:
                if n - pos < 4:
                    break
                length = (buf[pos + 2] << 8) | buf[pos + 3]
                start = pos + 4
                if length < 126:
                    self.bad += 1
                    break
            elif length == 127:
                if n - pos < 10:
                    break
                length = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                start = pos + 10
                if length < 1 << 16:
                    self.bad += 1
                    break
            else:  # mask bit set: servers never mask
                self.bad += 1
                break
            end = start + length
            if end > n:
                break
            if b0 == 0x81:
                text += 1
            elif b0 in (0x89, 0x8A):
                self.other += 1
            elif b0 == 0x88:
                self.close_code = (
                    int.from_bytes(buf[start : start + 2], "big") if length >= 2 else 0
                )
                pos = end
                break
            else:
                self.bad += 1
                break
            pos = end
        self._buf = buf[pos:] if pos < n and not self.broken else b""
        self.text += text
        return text


def trailing_close_code(tail: bytes) -> int | None:
    """The code of the close frame that ``tail`` ends with, or ``None``.

    ``tail`` is the end of a server's byte stream; frame boundaries are unknown, so every
    ``0x88`` byte in the last :data:`MAX_CLOSE_FRAME` bytes is tried as the start of a
    close frame that ends exactly where ``tail`` ends. A candidate counts only with a
    length byte that matches, a code an endpoint may send (:data:`SENDABLE_CLOSE_CODES`)
    and a UTF-8 reason. Inside a stream of JSON text frames (each under 8 MiB) this
    matches nothing but a close frame: the code's first byte (0x03-0x13) is a control
    character, which JSON never holds raw, and no frame header puts a byte of at most 125
    between a 0x88 and such a byte. Ping and pong payloads are arbitrary bytes: a false
    match there needs a read to end right after 4 particular bytes of one. A close frame
    without a code is not recognised.
    """
    end = len(tail)
    lowest = max(0, end - MAX_CLOSE_FRAME)
    start = tail.rfind(b"\x88", lowest)
    while start >= 0:
        length = end - start - 2
        if 2 <= length <= 125 and tail[start + 1] == length:
            code = _close_code(tail[start + 2 :])
            if code is not None:
                return code
        start = tail.rfind(b"\x88", lowest, start)
    return None


def _close_code(payload: bytes) -> int | None:
    """The code of a close frame's ``payload`` (2+ bytes) if plausible, else ``None``."""
    code = int.from_bytes(payload[:2], "big")
    if code not in SENDABLE_CLOSE_CODES:
        return None
    try:
        payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        return None
    return code


def has_border(marker: bytes) -> bool:
    """True when a proper prefix of ``marker`` is also its suffix (two occurrences could
    overlap, and counts per read would then not add up to the count of the stream)."""
    return any(marker[:k] == marker[-k:] for k in range(1, len(marker)))


class MarkerCounter:
    """Counts notification frames by a byte marker, at C speed, without frame headers.

    Every notification frame the server sends holds ``marker`` exactly once and no other
    frame (welcome, subscribed, pong, error, ping, close) holds it, so the notifications
    in a stream are ``stream.count(marker)``. Each read is counted with ``bytes.count``;
    the last ``len(marker) - 1`` bytes of the stream are kept so that a marker split
    between two reads is counted once, when its last byte arrives. ``marker`` must not
    overlap itself (:func:`has_border`): then the per-read counts add up exactly.

    A close frame is found at the end of a read (:func:`trailing_close_code`): the server
    sends nothing after it. A close frame without a code (which neither the hub nor the
    peers send) is not recognised: the socket dies at the end of stream, with no code.

    Same attributes as :class:`FrameCounter`; ``other`` and ``bad`` stay 0 (frames are
    not parsed: a stream that breaks RFC 6455 is not detected; use the strict
    :class:`FrameCounter` for that).
    """

    __slots__ = (
        "_keep",
        "_limit",
        "_marker",
        "_tail",
        "bad",
        "bytes",
        "close_code",
        "other",
        "text",
    )

    def __init__(self, marker: bytes) -> None:
        if len(marker) < 2 or has_border(marker):
            raise ValueError(f"marker {marker!r}: needs 2+ bytes and no self-overlap")
        self._marker = bytes(marker)
        self._keep = len(marker) - 1
        self._limit = max(MAX_CLOSE_FRAME, self._keep)
        self._tail = b""
        self.text = 0
        self.other = 0
        self.bad = 0
        self.bytes = 0
        self.close_code: int | None = None

    @property
    def broken(self) -> bool:
        return self.close_code is not None

    def feed(self, data: bytes | bytearray, end: int | None = None) -> int:
        """Account for ``data[:end]`` (all of ``data`` when ``end`` is None; a reused
        ``recv_into`` buffer needs no copy); returns how many markers it completed."""
        if end is None:
            end = len(data)
        self.bytes += end
        if self.close_code is not None:
            return 0
        marker, keep, tail = self._marker, self._keep, self._tail
        found = data.count(marker, 0, end)
        if tail:
            found += (tail[-keep:] + data[: min(keep, end)]).count(marker)
        limit = self._limit
        self._tail = tail = (tail + data[max(0, end - limit) : end])[-limit:]
        if b"\x88" in tail:
            self.close_code = trailing_close_code(tail)
        self.text += found
        return found


class FrameDecoder:
    """Splits a byte stream into complete frames ``(opcode, payload)`` (server side:
    unmasked); same header rules as :class:`FrameCounter`."""

    __slots__ = ("_buf", "bad")

    def __init__(self) -> None:
        self._buf = b""
        self.bad = 0

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        buf = self._buf + data if self._buf else data
        frames: list[tuple[int, bytes]] = []
        n = len(buf)
        pos = 0
        while n - pos >= 2 and not self.bad:
            b0, length = buf[pos], buf[pos + 1]
            if length & 0x80 or b0 & 0x70 or not b0 & 0x80:
                self.bad += 1  # masked, RSV bits, or fragmented
                break
            if length < 126:
                start = pos + 2
            elif length == 126:
                if n - pos < 4:
                    break
                length, start = int.from_bytes(buf[pos + 2 : pos + 4], "big"), pos + 4
            else:
                if n - pos < 10:
                    break
                length, start = int.from_bytes(buf[pos + 2 : pos + 10], "big"), pos + 10
            end = start + length
            if end > n:
                break
            frames.append((b0 & 0x0F, buf[start:end]))
            pos = end
        self._buf = buf[pos:] if pos < n else b""
        return frames


def parse_offset(offset: str) -> tuple[str, int]:
    """``"<epoch>:<seq>"`` → ``(epoch, seq)``; raises ValueError on another shape."""
    epoch, sep, seq = offset.rpartition(":")
    if not sep or not seq.isdigit():
        raise ValueError(f"bad offset {offset!r}")
    return epoch, int(seq)


@dataclass
class SequenceChecker:
    """Per-stream continuity: each message's seq must be the previous one + 1.

    ``gaps`` counts *missing messages* (a jump from 4 to 7 adds 2), ``duplicates`` counts
    messages at or below the last seq, ``resets`` counts epoch changes.
    """

    last: dict[str, tuple[str, int]] = field(default_factory=dict)
    checked: int = 0
    gaps: int = 0
    duplicates: int = 0
    resets: int = 0

    def check(self, stream: str, epoch: str, seq: int) -> bool:
        """Record one message; True when it continues its stream."""
        self.checked += 1
        previous = self.last.get(stream)
        self.last[stream] = (epoch, seq)
        if previous is None:
            return True
        if previous[0] != epoch:
            self.resets += 1
            return False
        if seq == previous[1] + 1:
            return True
        if seq <= previous[1]:
            self.duplicates += 1
            self.last[stream] = previous
        else:
            self.gaps += seq - previous[1] - 1
        return False


@dataclass
class HubNotification:
    channel: str
    epoch: str
    seq: int
    t_ns: int | None
    #: The node's ``data.timestamp`` (stamped when it published the message), in ms
    #: since the epoch; ``None`` when absent or not the node's ISO format.
    stamped_ms: int | None = None


def iso_ms(text: object) -> int | None:
    """``2025-01-31T12:00:00.123Z`` as ms since the epoch (``None`` if not that form)."""
    if not isinstance(text, str):
        return None
    try:
        stamp = datetime.fromisoformat(text)
    except ValueError:
        return None
    if stamp.tzinfo is None:
        return None
    return round(stamp.timestamp() * 1000)


def parse_hub_notification(payload: bytes) -> HubNotification | None:
    """Validate one hub frame; ``None`` for non-notification frames (pong, …).

    Raises:
        ValueError: not JSON, not an object, or a notification missing its fields.
    """
    frame = json.loads(payload)
    if not isinstance(frame, dict):
        raise ValueError("frame is not a JSON object")
    if frame.get("type") != "notification":
        return None
    channel, offset, data = frame.get("channel"), frame.get("offset"), frame.get("data")
    if not isinstance(channel, str) or not isinstance(offset, str) or not isinstance(data, dict):
        raise ValueError("notification without channel/offset/data")
    if not isinstance(data.get("id"), str) or not isinstance(data.get("timestamp"), str):
        raise ValueError("notification data without id/timestamp")
    epoch, seq = parse_offset(offset)
    t = data.get("t")
    return HubNotification(
        channel, epoch, seq, t if isinstance(t, int) else None, iso_ms(data["timestamp"])
    )


def parse_socketio_notification(payload: bytes) -> HubNotification | None:
    """A hub-shaped notification carried as a socket.io event, ``42["notification",{…}]``
    (the python-socketio peer of :mod:`benchmarks.peers.socketio_server`); ``None`` for
    other engine.io/socket.io packets and other events.

    Raises:
        ValueError: a malformed event, or a notification that
            :func:`parse_hub_notification` refuses.
    """
    if not payload.startswith(b"42"):
        return None
    event = json.loads(payload[2:])
    if not isinstance(event, list) or len(event) != 2 or not isinstance(event[0], str):
        raise ValueError("malformed socket.io event")
    if event[0] != "notification":
        return None
    if not isinstance(event[1], dict) or event[1].get("type") != "notification":
        raise ValueError("socket.io notification is not a hub notification object")
    return parse_hub_notification(json.dumps(event[1]).encode())


#: How sample sockets validate frames, by :attr:`SubscriberSpec.validator`; any other
#: value validates as ``"hub"``.
NOTIFICATION_PARSERS: dict[str, Callable[[bytes], HubNotification | None]] = {
    "hub": parse_hub_notification,
    "socketio-hub": parse_socketio_notification,
}


# --------------------------------------------------------------------------- subscribers


@dataclass(frozen=True)
class SubscriberSpec:
    """How a subscriber connects and when it counts as ready.

    Attributes:
        path: request target, e.g. ``/ws/notifications``.
        headers: extra request headers (``Authorization``).
        messages: text frames to send right after the upgrade (e.g. a subscribe).
        ready_marker: bytes that appear in the server frame that means "subscribed";
            ``None``: ready right after the upgrade.
        validator: ``"hub"`` (SPEC §3 notification frames) for sample sockets.
        count_marker: bytes that every notification frame of this server holds exactly
            once and no other frame holds (:class:`MarkerCounter`); ``None``: counting
            sockets walk frame headers (:class:`FrameCounter`).
    """

    host: str
    port: int
    path: str
    headers: tuple[tuple[str, str], ...] = ()
    messages: tuple[bytes, ...] = ()
    ready_marker: bytes | None = None
    validator: str = "hub"
    count_marker: bytes | None = None


def hub_subscriber_spec(host: str, port: int, token: str, channel: str) -> SubscriberSpec:
    return SubscriberSpec(
        host=host,
        port=port,
        path="/ws/notifications",
        headers=(("Authorization", f"Bearer {token}"),),
        messages=(json.dumps({"type": "subscribe", "channels": [channel]}).encode(),),
        ready_marker=b'"type":"subscribed"',
        count_marker=HUB_NOTIFICATION_MARKER,
    )


@dataclass
class WorkerConfig:
    """A subscriber worker's settings.

    Attributes:
        mode: ``"count"`` or ``"sample"``.
        counter: how counting sockets count (:func:`make_counter`): ``"auto"`` (by the
            spec's ``count_marker`` when it has one, else by frame headers),
            ``"marker"`` or ``"strict"`` (:class:`FrameCounter`).
    """

    spec: SubscriberSpec
    mode: str
    cpu: int | None = None
    read_interval_s: float = 0.2
    source_addresses: tuple[str, ...] = ("127.0.0.1",)
    nice: int = 0
    counter: str = "auto"


def make_counter(spec: SubscriberSpec, kind: str = "auto") -> FrameCounter | MarkerCounter:
    """The counter of one counting socket; ``kind`` as :attr:`WorkerConfig.counter`.

    Raises:
        ValueError: an unknown ``kind``, or ``"marker"`` for a spec without a marker.
    """
    if kind not in ("auto", "marker", "strict"):
        raise ValueError(f"unknown counter {kind!r}")
    if kind == "strict" or (kind == "auto" and spec.count_marker is None):
        return FrameCounter()
    if spec.count_marker is None:
        raise ValueError("counter='marker' needs a spec with a count_marker")
    return MarkerCounter(spec.count_marker)


CONNECTING, HANDSHAKE, SUBSCRIBING, READY, DEAD = range(5)


class _Sub:
    __slots__ = ("counter", "decoder", "fd", "inbuf", "key", "sock", "state")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.state = CONNECTING
        self.key = make_key()
        self.inbuf = b""
        self.counter: FrameCounter | MarkerCounter | None = None
        self.decoder: FrameDecoder | None = None


class SubscriberWorker:
    """The body of a subscriber process: opens sockets on command and reads them."""

    def __init__(self, config: WorkerConfig) -> None:
        self.cfg = config
        self.subs: dict[int, _Sub] = {}
        self.epoll = select.epoll()
        self.opened = 0
        self.failed = 0
        self.errors: Counter[str] = Counter()
        self.dead = 0
        self.close_codes: Counter[int] = Counter()
        # sample mode
        self.checker = SequenceChecker()
        self.sample_frames = 0
        self.sample_bad = 0
        self.phase: str | None = None
        self.latencies: dict[str, list[float]] = {}
        #: Per latency sample of a hub frame, the part before the node published it
        #: (publisher's ``data.t`` → the node's ``data.timestamp``; ms resolution).
        self.before_node: dict[str, list[float]] = {}
        self.frame_sizes: Counter[int] = Counter()
        self._src = 0
        self._dead_text = 0
        self._dead_bad = 0
        self.reads = 0
        self._recv_buf = bytearray(RECV_BYTES)  # reused by every marker-counted read

    # -- opening ---------------------------------------------------------------------
    def _new_socket(self) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        addresses = self.cfg.source_addresses
        source = addresses[self._src % len(addresses)]
        self._src += 1
        if source != "127.0.0.1" or len(addresses) > 1:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((source, 0))
        return sock

    def open(self, count: int) -> dict[str, Any]:
        """Open ``count`` connections, upgrade and subscribe them; bounded in time."""
        spec = self.cfg.spec
        pending: dict[int, _Sub] = {}
        setup = select.epoll()
        started = time.monotonic()
        to_start = count
        ok = failed = 0
        deadline = started + OPEN_TIMEOUT_S

        def fail(sub: _Sub, why: str) -> None:
            nonlocal failed
            failed += 1
            self.errors[why] += 1
            with contextlib.suppress(OSError, KeyError):
                setup.unregister(sub.fd)
            sub.sock.close()
            pending.pop(sub.fd, None)

        while (to_start or pending) and time.monotonic() < deadline:
            while to_start and len(pending) < OPEN_CONCURRENCY:
                to_start -= 1
                try:
                    sock = self._new_socket()
                    err = sock.connect_ex((spec.host, spec.port))
                except OSError as error:
                    failed += 1
                    self.errors[f"socket: {error.strerror}"] += 1
                    continue
                if err not in (0, errno.EINPROGRESS):
                    failed += 1
                    self.errors[f"connect: {os.strerror(err)}"] += 1
                    sock.close()
                    continue
                sub = _Sub(sock)
                pending[sub.fd] = sub
                setup.register(sub.fd, select.EPOLLOUT)
            for fd, _ in setup.poll(1.0):
                sub = pending.get(fd)
                if sub is None:
                    continue
                try:
                    if sub.state == CONNECTING:
                        err = sub.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                        if err:
                            fail(sub, f"connect: {os.strerror(err)}")
                            continue
                        sub.sock.send(self._upgrade_for(sub))
                        sub.state = HANDSHAKE
                        setup.modify(fd, select.EPOLLIN)
                        continue
                    data = sub.sock.recv(RECV_BYTES)
                    if not data:
                        fail(sub, "closed during setup")
                        continue
                    if self._advance(sub, data):
                        setup.unregister(fd)
                        del pending[fd]
                        self._ready(sub)
                        ok += 1
                except (OSError, ValueError) as error:
                    fail(sub, f"setup: {type(error).__name__}: {error}"[:120])
        for sub in list(pending.values()):
            fail(sub, "setup timed out")
        setup.close()
        self.opened += ok
        self.failed += failed
        return {
            "ok": ok,
            "failed": failed,
            "seconds": time.monotonic() - started,
            "errors": dict(self.errors.most_common(5)),
        }

    def _upgrade_for(self, sub: _Sub) -> bytes:
        """The upgrade request ``sub`` sends (a hook: subclasses vary it per socket)."""
        spec = self.cfg.spec
        return upgrade_request(spec.host, spec.port, spec.path, sub.key, spec.headers)

    def _advance(self, sub: _Sub, data: bytes) -> bool:
        """Handshake/subscribe state machine; True once the socket is ready."""
        spec = self.cfg.spec
        if sub.state == HANDSHAKE:
            sub.inbuf += data
            parsed = parse_upgrade_response(sub.inbuf)
            if parsed is None:
                return False
            status, headers, end = parsed
            if status != 101:
                raise ValueError(f"upgrade answered {status}")
            if headers.get("sec-websocket-accept", "").encode() != accept_for(sub.key):
                raise ValueError("bad Sec-WebSocket-Accept")
            data, sub.inbuf = sub.inbuf[end:], b""
            for message in spec.messages:
                sub.sock.send(encode_frame(message))
            sub.decoder = FrameDecoder()
            sub.state = SUBSCRIBING
            if spec.ready_marker is None:
                sub.inbuf = data  # frames already received belong to the counted stream
                return True
        assert sub.decoder is not None
        frames = sub.decoder.feed(data)
        if sub.decoder.bad:
            raise ValueError("bad frame during setup")
        for index, (opcode, payload) in enumerate(frames):
            if opcode == OP_CLOSE:
                raise ValueError(f"closed during setup: {payload[:2].hex()}")
            if spec.ready_marker is not None and spec.ready_marker in payload:
                # Frames after the marker (and the decoder's partial tail) are counted.
                rest = b"".join(encode_frame(p, op, mask=b"") for op, p in frames[index + 1 :])
                sub.inbuf = rest + sub.decoder._buf
                return True
        return False

    def _ready(self, sub: _Sub) -> None:
        sub.state = READY
        leftover, sub.inbuf = sub.inbuf, b""
        if self.cfg.mode == "count":
            sub.counter = make_counter(self.cfg.spec, self.cfg.counter)
            sub.decoder = None
        else:
            sub.decoder = FrameDecoder()
        self.subs[sub.fd] = sub
        self.epoll.register(sub.fd, select.EPOLLIN)
        if leftover:
            self._consume(sub, leftover, time.time_ns())

    # -- reading ---------------------------------------------------------------------
    def _consume(self, sub: _Sub, data: bytes, now_ns: int) -> None:
        if sub.counter is not None:
            counter = sub.counter
            counter.feed(data)
            if counter.broken:
                if counter.close_code is not None:
                    self.close_codes[counter.close_code] += 1
                self._kill(sub)
            return
        assert sub.decoder is not None
        for opcode, payload in sub.decoder.feed(data):
            if opcode == OP_CLOSE:
                self.close_codes[int.from_bytes(payload[:2], "big") if payload else 0] += 1
                self._kill(sub)
                return
            if opcode != OP_TEXT:
                continue
            self.sample_frames += 1
            if len(self.frame_sizes) < 64:
                self.frame_sizes[len(encode_frame(payload, mask=b""))] += 1
            try:
                parse = NOTIFICATION_PARSERS.get(self.cfg.spec.validator, parse_hub_notification)
                note = parse(payload)
            except (ValueError, UnicodeDecodeError):
                self.sample_bad += 1
                continue
            if note is None:
                continue
            self.checker.check(f"{sub.fd}/{note.channel}", note.epoch, note.seq)
            if self.phase is not None and note.t_ns is not None:
                self.latencies[self.phase].append((now_ns - note.t_ns) / 1e6)
                if note.stamped_ms is not None:
                    self.before_node[self.phase].append(note.stamped_ms - note.t_ns / 1e6)
        if sub.decoder.bad:
            self.sample_bad += 1
            self._kill(sub)

    def _kill(self, sub: _Sub) -> None:
        if sub.state == DEAD:
            return
        sub.state = DEAD
        self.dead += 1
        if sub.counter is not None:
            self._dead_text += sub.counter.text
            self._dead_bad += sub.counter.bad
        with contextlib.suppress(OSError, KeyError):
            self.epoll.unregister(sub.fd)
        sub.sock.close()
        self.subs.pop(sub.fd, None)

    def drain(self, timeout: float = 0.0) -> int:
        """Read every socket that has data (once each, until epoll has no more than
        :data:`MAX_EVENTS` ready); returns the number of reads."""
        reads = 0
        while True:
            events = self.epoll.poll(timeout, MAX_EVENTS)
            timeout = 0.0
            reads += self._read_events(events)
            if len(events) < MAX_EVENTS:
                self.reads += reads
                return reads

    def _read_events(self, events: list[tuple[int, int]]) -> int:
        """One read of each socket in ``events``; returns the number of reads."""
        subs = self.subs
        now_ns = time.time_ns()
        reads = 0
        for fd, _ in events:
            sub = subs.get(fd)
            if sub is None:
                continue
            counter = sub.counter
            if type(counter) is MarkerCounter:
                reads += self._read_marked(sub, counter)
            else:
                reads += self._read(sub, now_ns)
        return reads

    def _read_marked(self, sub: _Sub, counter: MarkerCounter) -> int:
        """Read ``sub`` into the reused buffer and count it: no bytes object, no header
        walk. Returns 1 for a read (EOF included), 0 when there was nothing to read."""
        buf = self._recv_buf
        try:
            n = sub.sock.recv_into(buf)
        except BlockingIOError:
            return 0
        except OSError:
            self._kill(sub)
            return 0
        if not n:
            self._kill(sub)
            return 1
        counter.feed(buf, n)
        if counter.close_code is not None:
            self.close_codes[counter.close_code] += 1
            self._kill(sub)
        return 1

    def _read(self, sub: _Sub, now_ns: int) -> int:
        """Read ``sub`` and hand the bytes to :meth:`_consume`; returns 1 for a read (EOF
        included), 0 when there was nothing to read."""
        try:
            data = sub.sock.recv(RECV_BYTES)
        except BlockingIOError:
            return 0
        except OSError:
            self._kill(sub)
            return 0
        if data:
            self._consume(sub, data, now_ns)
        else:
            self._kill(sub)
        return 1

    # -- reporting -------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        text = other = bad = nbytes = 0
        for sub in self.subs.values():
            if sub.counter is not None:
                text += sub.counter.text
                other += sub.counter.other
                bad += sub.counter.bad
                nbytes += sub.counter.bytes
        text += self._dead_text
        bad += self._dead_bad
        return {
            "t": time.monotonic(),
            "cpu_s": time.process_time(),
            "mode": self.cfg.mode,
            "reads": self.reads,
            "open": len(self.subs),
            "opened": self.opened,
            "failed": self.failed,
            "dead": self.dead,
            "close_codes": dict(self.close_codes),
            "text_frames": text if self.cfg.mode == "count" else self.sample_frames,
            "other_frames": other,
            "bytes": nbytes,
            "bad_frames": bad + self.sample_bad,
            "checked": self.checker.checked,
            "gaps": self.checker.gaps,
            "duplicates": self.checker.duplicates,
            "resets": self.checker.resets,
            "frame_sizes": dict(self.frame_sizes),
        }

    def close_all(self) -> None:
        for sub in list(self.subs.values()):
            with contextlib.suppress(OSError, KeyError):
                self.epoll.unregister(sub.fd)
            sub.sock.close()
        self.subs.clear()

    # -- the loop --------------------------------------------------------------------
    def serve(self, ctrl: multiprocessing.connection.Connection) -> None:
        count_mode = self.cfg.mode == "count"
        while True:
            if count_mode:
                # Batch reads: sleep on the control pipe, then read all ready sockets.
                has_command = ctrl.poll(self.cfg.read_interval_s)
                self.drain()
            else:
                has_command = ctrl.poll(0)
                if not has_command:
                    self.drain(0.05)
                    continue
            if not has_command:
                continue
            command, *args = ctrl.recv()
            if command == "open":
                ctrl.send(self.open(int(args[0])))
            elif command == "snap":
                self.drain()
                ctrl.send(self.snapshot())
            elif command == "phase":
                self.drain()
                self.phase = args[0]
                if self.phase is not None:
                    self.latencies[self.phase] = []
                    self.before_node[self.phase] = []
                ctrl.send(True)
            elif command == "latencies":
                ctrl.send(self.latencies)
            elif command == "before_node":
                ctrl.send(self.before_node)
            elif command == "close":
                self.close_all()
                ctrl.send(True)
            elif command == "exit":
                self.close_all()
                ctrl.send(True)
                return


def _subscriber_main(ctrl: multiprocessing.connection.Connection, config: WorkerConfig) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise_nofile()
    pin_to_cpu(config.cpu)
    if config.nice:
        with contextlib.suppress(OSError):
            os.nice(config.nice)
    if config.mode == "count" and hasattr(os, "SCHED_BATCH"):
        with contextlib.suppress(OSError):
            os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    SubscriberWorker(config).serve(ctrl)


# --------------------------------------------------------------------------- publisher


@dataclass(frozen=True)
class PublisherConfig:
    host: str
    port: int
    token: str
    channel: str
    pad: int
    connections: int = 8
    cpu: int | None = None
    path: str = "/api/v1/notifications"


class _HttpConn:
    __slots__ = ("busy", "h11", "host", "port", "scheduled_ns", "sent_ns", "sock", "status")

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.sock = socket.create_connection((host, port), timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.setblocking(False)
        self.h11 = h11.Connection(h11.CLIENT)
        self.scheduled_ns = 0
        self.sent_ns = 0
        self.status = 0
        self.busy = False


class Publisher:
    """Posts notifications over ``connections`` keep-alive HTTP/1.1 connections."""

    def __init__(self, config: PublisherConfig) -> None:
        self.cfg = config
        self.conns = [_HttpConn(config.host, config.port) for _ in range(config.connections)]
        self.selector = select.epoll()
        self.by_fd = {c.sock.fileno(): c for c in self.conns}
        for conn in self.conns:
            self.selector.register(conn.sock.fileno(), select.EPOLLIN)
        self.seq = 0
        self.pad = "x" * config.pad
        self.idle: list[_HttpConn] = []

    def _body(self, t_ns: int) -> bytes:
        self.seq += 1
        data = {"t": t_ns, "p": self.pad}
        return json.dumps({"channel": self.cfg.channel, "data": data}).encode()

    def _send(self, conn: _HttpConn, scheduled_ns: int) -> None:
        body = self._body(scheduled_ns)
        request = h11.Request(
            method="POST",
            target=self.cfg.path,
            headers=[
                ("Host", f"{conn.host}:{conn.port}"),
                ("Authorization", f"Bearer {self.cfg.token}"),
                ("Content-Type", "application/json"),
                ("Content-Length", str(len(body))),
            ],
        )
        out = conn.h11.send(request) + conn.h11.send(h11.Data(data=body))
        out += conn.h11.send(h11.EndOfMessage())
        conn.scheduled_ns = scheduled_ns
        conn.sent_ns = time.time_ns()
        conn.busy = True
        conn.sock.setblocking(True)
        conn.sock.sendall(out)
        conn.sock.setblocking(False)

    def _reopen(self, conn: _HttpConn) -> _HttpConn:
        with contextlib.suppress(KeyError, OSError):
            self.selector.unregister(conn.sock.fileno())
        self.by_fd.pop(conn.sock.fileno(), None)
        conn.sock.close()
        fresh = _HttpConn(conn.host, conn.port)
        self.conns[self.conns.index(conn)] = fresh
        if conn in self.idle:
            self.idle[self.idle.index(conn)] = fresh
        self.by_fd[fresh.sock.fileno()] = fresh
        self.selector.register(fresh.sock.fileno(), select.EPOLLIN)
        return fresh

    def _poll(self, timeout: float) -> list[tuple[_HttpConn, int, int]]:
        """Responses completed within ``timeout``: ``(connection, status, sent_ns)``; the
        connection is a fresh one when the server closed the old."""
        done: list[tuple[_HttpConn, int, int]] = []
        for fd, _ in self.selector.poll(timeout):
            conn = self.by_fd.get(fd)
            if conn is None:
                continue
            try:
                data = conn.sock.recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            conn.h11.receive_data(data)
            while True:
                try:
                    event = conn.h11.next_event()
                except h11.RemoteProtocolError:
                    event = h11.ConnectionClosed()
                if event is h11.NEED_DATA:
                    break
                if isinstance(event, h11.Response):
                    conn.status = event.status_code
                elif isinstance(event, h11.EndOfMessage):
                    sent_ns, status = conn.sent_ns, conn.status
                    conn.busy = False
                    if h11.MUST_CLOSE in (conn.h11.our_state, conn.h11.their_state):
                        conn = self._reopen(conn)
                    else:
                        conn.h11.start_next_cycle()
                    done.append((conn, status, sent_ns))
                    break
                elif isinstance(event, h11.ConnectionClosed):
                    # An idle keep-alive connection timed out: replace it silently. A busy
                    # one lost its request: report it as status 0.
                    sent_ns, busy = conn.sent_ns, conn.busy
                    fresh = self._reopen(conn)
                    if busy:
                        done.append((fresh, 0, sent_ns))
                    break
        return done

    def run(self, rate: float | None, duration_s: float, max_inflight: int) -> dict[str, Any]:
        """Publish for ``duration_s``: closed loop with ``max_inflight`` requests when
        ``rate`` is None, else open loop at ``rate``/s (``data.t`` = scheduled time)."""
        self.idle = idle = list(self.conns[:max_inflight]) if rate is None else list(self.conns)
        statuses: Counter[int] = Counter()
        done_at: list[float] = []
        request_ms: list[float] = []
        backlog_max = 0
        start = time.monotonic()
        start_ns = time.time_ns()
        end = start + duration_s
        interval_ns = int(1e9 / rate) if rate else 0
        next_i = 0
        inflight = 0
        while True:
            now = time.monotonic()
            if rate is None:
                while idle and now < end:
                    self._send(idle.pop(), time.time_ns())
                    inflight += 1
            else:
                due = min(int((now - start) * rate) + 1, int(duration_s * rate))
                backlog_max = max(backlog_max, due - next_i)
                while next_i < due and idle:
                    self._send(idle.pop(), start_ns + next_i * interval_ns)
                    next_i += 1
                    inflight += 1
            if now >= end and inflight == 0 and (rate is None or next_i >= int(duration_s * rate)):
                break
            if now > end + COMMAND_TIMEOUT_S:
                break
            wait = 0.05
            if rate is not None and next_i < int(duration_s * rate):
                wait = max(0.0, (start_ns + next_i * interval_ns - time.time_ns()) / 1e9)
            for conn, status, sent_ns in self._poll(min(wait, 0.05)):
                inflight -= 1
                statuses[status] += 1
                done_at.append(time.monotonic())
                request_ms.append((time.time_ns() - sent_ns) / 1e6)
                idle.append(conn)
        return {
            "start": start,
            "end": time.monotonic(),
            "statuses": {str(k): v for k, v in statuses.items()},
            "ok": statuses.get(202, 0),
            "done_at": done_at,
            "request_ms": request_ms,
            "backlog_max": backlog_max,
            "cpu_s": time.process_time(),
        }

    def one(self, data: dict[str, Any]) -> tuple[int, bytes]:
        """Publish ``data`` once and return ``(status, response body)``."""
        conn = self.conns[0]
        body = json.dumps({"channel": self.cfg.channel, "data": data}).encode()
        request = h11.Request(
            method="POST",
            target=self.cfg.path,
            headers=[
                ("Host", f"{conn.host}:{conn.port}"),
                ("Authorization", f"Bearer {self.cfg.token}"),
                ("Content-Type", "application/json"),
                ("Content-Length", str(len(body))),
            ],
        )
        out = conn.h11.send(request) + conn.h11.send(h11.Data(data=body))
        out += conn.h11.send(h11.EndOfMessage())
        conn.sock.setblocking(True)
        conn.sock.sendall(out)
        status, chunks = 0, []
        while True:
            event = conn.h11.next_event()
            if event is h11.NEED_DATA:
                conn.h11.receive_data(conn.sock.recv(65536))
                continue
            if isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                break
        conn.sock.setblocking(False)
        conn.h11.start_next_cycle()
        return status, b"".join(chunks)

    def serve(self, ctrl: multiprocessing.connection.Connection) -> None:
        while True:
            command, *args = ctrl.recv()
            if command == "run":
                rate, duration_s, max_inflight = args
                ctrl.send(self.run(rate, duration_s, max_inflight))
            elif command == "one":
                ctrl.send(self.one(args[0]))
            elif command == "pad":
                self.pad = "x" * int(args[0])
                ctrl.send(True)
            elif command == "exit":
                ctrl.send(True)
                return


def _publisher_main(ctrl: multiprocessing.connection.Connection, config: PublisherConfig) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    pin_to_cpu(config.cpu)
    Publisher(config).serve(ctrl)


# --------------------------------------------------------------------------- workers


class Worker:
    """A child process running ``target(ctrl, config)``, driven with command tuples."""

    _ctx = multiprocessing.get_context("fork")

    def __init__(self, target: Callable[..., None], config: Any, name: str) -> None:
        self.ctrl, child = self._ctx.Pipe()
        self.process = self._ctx.Process(
            target=target, args=(child, config), name=name, daemon=True
        )
        self.process.start()
        child.close()
        self.name = name

    @property
    def pid(self) -> int:
        assert self.process.pid is not None
        return self.process.pid

    def send(self, *command: Any) -> None:
        self.ctrl.send(command)

    def reply(self, timeout: float = COMMAND_TIMEOUT_S) -> Any:
        if not self.ctrl.poll(timeout):
            raise TimeoutError(f"{self.name}: no reply within {timeout:.0f}s")
        return self.ctrl.recv()

    def call(self, *command: Any, timeout: float = COMMAND_TIMEOUT_S) -> Any:
        self.send(*command)
        return self.reply(timeout)

    def stop(self) -> None:
        with contextlib.suppress(OSError, EOFError, TimeoutError, BrokenPipeError):
            if self.process.is_alive():
                self.call("exit", timeout=5)
        self.process.join(2)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(2)


def start_subscribers(config: WorkerConfig, name: str) -> Worker:
    return Worker(_subscriber_main, config, name)


def start_publisher(config: PublisherConfig) -> Worker:
    return Worker(_publisher_main, config, "publisher")


class SubscriberPool:
    """Counting workers plus one sample worker, all on ``cpu``."""

    def __init__(
        self,
        spec: SubscriberSpec,
        *,
        count_procs: int,
        cpu: int | None,
        read_interval_s: float,
        source_addresses: tuple[str, ...],
    ) -> None:
        self.counters = [
            start_subscribers(
                WorkerConfig(
                    spec, "count", cpu, read_interval_s, source_addresses=source_addresses
                ),
                f"count-{i}",
            )
            for i in range(count_procs)
        ]
        self.sample = start_subscribers(
            WorkerConfig(spec, "sample", cpu, source_addresses=source_addresses, nice=-10),
            "sample",
        )

    @property
    def workers(self) -> list[Worker]:
        return [*self.counters, self.sample]

    def open(self, counting: int, sample: int) -> dict[str, Any]:
        """Open ``counting`` sockets spread over the counting workers and ``sample``
        validating ones, interleaved (one sample socket after each slice of counting
        ones) so that the sample is spread over the server's subscriber order."""
        rounds = max(1, sample)
        slots = len(self.counters) * rounds
        shares = [counting // slots] * slots
        for i in range(counting - sum(shares)):
            shares[i] += 1
        results = []
        for r in range(rounds):
            for w, worker in enumerate(self.counters):
                share = shares[r * len(self.counters) + w]
                if share:
                    results.append(worker.call("open", share, timeout=OPEN_TIMEOUT_S + 10))
            if r < sample:
                results.append(self.sample.call("open", 1, timeout=OPEN_TIMEOUT_S + 10))
        errors: Counter[str] = Counter()
        for result in results:
            errors.update(result["errors"])
        return {
            "ok": sum(r["ok"] for r in results),
            "failed": sum(r["failed"] for r in results),
            "seconds": sum(r["seconds"] for r in results),
            "errors": dict(errors),
        }

    def snapshot(self) -> list[dict[str, Any]]:
        for worker in self.workers:
            worker.send("snap")
        return [worker.reply() for worker in self.workers]

    def set_phase(self, name: str | None) -> None:
        self.sample.call("phase", name)

    def latencies(self) -> dict[str, list[float]]:
        result: dict[str, list[float]] = self.sample.call("latencies")
        return result

    def close(self) -> None:
        for worker in self.workers:
            with contextlib.suppress(OSError, EOFError, TimeoutError):
                worker.call("close")

    def stop(self) -> None:
        for worker in self.workers:
            worker.stop()


# --------------------------------------------------------------------------- the node


@dataclass
class NodeProcess:
    """``hub serve`` in its own process group, pinned with ``taskset``.

    Use as a context manager; the process group is always killed on exit.
    """

    port: int
    cpu: int | None = 0
    env_overrides: dict[str, str] = field(default_factory=dict)
    data_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="hub-bench-")))
    process: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def env(self) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("HUB_", "DATABASE_", "REDIS_", "AMQP_", "RATE_LIMIT_"))
        }
        env.update(
            {
                "HUB_DATA_DIR": str(self.data_dir),
                "JWT_SECRET_KEY": "bench-secret-0123456789abcdefghijklmnopqrstuv",
                "LOG_LEVEL": "WARNING",
                "HEARTBEAT_INTERVAL": "3000",
                "HEARTBEAT_TIMEOUT": "6000",
                "RATE_LIMIT_ADMIN": "10000000/minute",
                "RATE_LIMIT_LOGIN": "10000/minute",
                "RATE_LIMIT_AUTH": "10000/minute",
                "AUTH_REQUIRE_VERIFIED": "false",
                "BCRYPT_ROUNDS": "4",
                "PYTHONUNBUFFERED": "1",
            }
        )
        env.update(self.env_overrides)
        return env

    def _hub(self, *args: str) -> str:
        result = subprocess.run(
            [sys.executable, "-m", "hub", *args],
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"hub {args[0]} failed: {result.stderr.strip()}")
        return result.stdout.strip()

    def create_user(self, email: str, password: str, *, admin: bool = False) -> str:
        flags = ["--admin"] if admin else []
        return self._hub(
            "users",
            "create",
            email,
            "--password",
            password,
            "--full-name",
            "Bench",
            *flags,
            "--verified",
        )

    def start(self) -> None:
        self.log_path = self.data_dir / "node.log"
        command = [sys.executable, "-m", "hub", "serve", "--port", str(self.port)]
        if self.cpu is not None and shutil.which("taskset"):
            command = ["taskset", "-c", str(self.cpu), *command]
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                command,
                env=self.env(),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_child_setup,
            )
        deadline = time.monotonic() + NODE_START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"node exited: {self.log_tail()}")
            try:
                with urllib.request.urlopen(self.base_url + "/health", timeout=1) as response:
                    if response.status == 200:
                        return
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(0.05)  # readiness polling of a child process (not a test)
        raise RuntimeError(f"node did not become healthy: {self.log_tail()}")

    def log_tail(self, lines: int = 20) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def login(self, email: str, password: str) -> str:
        body = json.dumps({"email": email, "password": password}).encode()
        request = urllib.request.Request(
            self.base_url + "/api/v1/auth/login",
            data=body,
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return str(json.loads(response.read())["data"]["access_token"])

    def stop(self) -> None:
        process = self.process
        if process is None:
            return
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(NODE_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(5)
        self.process = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> NodeProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (``q`` in 0..100); ``None`` for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(q / 100 * len(ordered))))
    return ordered[rank - 1]


@contextlib.contextmanager
def cleanup_on_exit(*stoppables: Callable[[], None]) -> Iterator[None]:
    """Run every ``stoppable`` on exit, even after an exception or Ctrl-C."""
    try:
        yield
    finally:
        for stop in stoppables:
            with contextlib.suppress(Exception):
                stop()


class SnapshotSource(Protocol):
    """Anything whose workers report counters as a list of snapshots."""

    def snapshot(self) -> list[dict[str, Any]]: ...


def window_rate(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> float:
    """Delivered frames/s summed over workers (each over its own snapshot interval)."""
    total = 0.0
    for a, b in zip(before, after, strict=True):
        if b["t"] > a["t"]:
            total += (b["text_frames"] - a["text_frames"]) / (b["t"] - a["t"])
    return total


def totals(snaps: list[dict[str, Any]]) -> dict[str, Any]:
    """Counters summed over workers, close codes merged."""
    keys = ("text_frames", "bad_frames", "dead", "open", "gaps", "duplicates", "resets", "checked")
    result: dict[str, Any] = {k: sum(s[k] for s in snaps) for k in keys}
    codes: dict[str, int] = {}
    for snap in snaps:
        for code, count in snap["close_codes"].items():
            codes[str(code)] = codes.get(str(code), 0) + count
    result["close_codes"] = codes
    return result


def settle_pool(
    pool: SnapshotSource, expected: int, *, timeout_s: float, still_s: float, poll_s: float = 0.25
) -> list[dict[str, Any]]:
    """Snapshot until ``expected`` frames arrived, nothing moved for ``still_s`` seconds,
    or ``timeout_s`` passed; returns the last snapshots."""
    deadline = time.monotonic() + timeout_s
    last, still_since = -1, time.monotonic()
    while True:
        snaps = pool.snapshot()
        received = sum(s["text_frames"] for s in snaps)
        now = time.monotonic()
        if received >= expected or now > deadline or now - still_since > still_s:
            return snaps
        if received != last:
            last, still_since = received, now
        time.sleep(poll_s)
