"""The load generator's parsing pieces: frames, handshake, continuity, percentiles.

These are what every benchmark figure rests on, so they are checked against hand-built
byte streams, including every way a stream can be split across reads.
"""

from __future__ import annotations

import json
import random
import socket
import time
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from benchmarks.loadgen import (
    HUB_NOTIFICATION_MARKER,
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    SOCKETIO_NOTIFICATION_MARKER,
    FrameCounter,
    FrameDecoder,
    MarkerCounter,
    SequenceChecker,
    SubscriberSpec,
    SubscriberWorker,
    WorkerConfig,
    _Sub,
    accept_for,
    apply_mask,
    encode_frame,
    hub_subscriber_spec,
    make_counter,
    parse_hub_notification,
    parse_offset,
    parse_upgrade_response,
    percentile,
    trailing_close_code,
    upgrade_request,
)

SIZES = [0, 1, 125, 126, 127, 200, 65535, 65536, 70000]


def server_frame(payload: bytes, opcode: int = OP_TEXT) -> bytes:
    return encode_frame(payload, opcode, mask=b"")


def test_rfc6455_accept_value() -> None:
    assert accept_for(b"dGhlIHNhbXBsZSBub25jZQ==") == b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def test_upgrade_request_and_response() -> None:
    request = upgrade_request(
        "127.0.0.1", 8000, "/ws/notifications", b"a2V5", [("Authorization", "Bearer t")]
    )
    assert request.startswith(b"GET /ws/notifications HTTP/1.1\r\nHost: 127.0.0.1:8000\r\n")
    assert b"\r\nSec-WebSocket-Key: a2V5\r\n" in request
    assert request.endswith(b"Authorization: Bearer t\r\n\r\n")
    head = (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nSec-WebSocket-Accept: x\r\n\r\n"
    )
    assert parse_upgrade_response(head[:-2]) is None
    status, headers, end = parse_upgrade_response(head + b"\x81\x00") or (0, {}, 0)
    assert status == 101
    assert headers["sec-websocket-accept"] == "x"
    assert (head + b"\x81\x00")[end:] == b"\x81\x00"
    with pytest.raises(ValueError, match="not an HTTP response"):
        parse_upgrade_response(b"garbage\r\n\r\n")


@pytest.mark.parametrize("size", SIZES)
def test_encode_and_decode_every_length_encoding(size: int) -> None:
    payload = bytes(range(256)) * (size // 256) + bytes(range(size % 256))
    frames = FrameDecoder().feed(server_frame(payload))
    assert frames == [(OP_TEXT, payload)]
    masked = encode_frame(payload, mask=b"\x01\x02\x03\x04")
    assert masked[1] & 0x80
    header = len(masked) - size - 4
    assert apply_mask(masked[header + 4 :], b"\x01\x02\x03\x04") == payload


def test_counter_counts_frames_split_at_every_byte() -> None:
    stream = b"".join(server_frame(b"x" * size) for size in SIZES)
    stream += server_frame(b"", OP_PING) + server_frame(b"p", OP_PONG)
    for cut in range(0, len(stream), 997):
        counter = FrameCounter()
        counted = counter.feed(stream[:cut]) + counter.feed(stream[cut:])
        assert counted == len(SIZES)
        assert counter.text == len(SIZES)
        assert counter.other == 2
        assert counter.bad == 0
        assert counter.bytes == len(stream)


@given(st.lists(st.binary(max_size=300), max_size=30), st.lists(st.integers(1, 50), max_size=40))
def test_counter_and_decoder_agree_with_any_read_sizes(
    payloads: list[bytes], reads: list[int]
) -> None:
    stream = b"".join(server_frame(p) for p in payloads)
    counter, decoder, decoded = FrameCounter(), FrameDecoder(), []
    pos = 0
    for size in [*reads, len(stream)]:
        chunk, pos = stream[pos : pos + size], pos + size
        counter.feed(chunk)
        decoded += decoder.feed(chunk)
    assert counter.text == len(payloads)
    assert decoded == [(OP_TEXT, p) for p in payloads]


def test_close_frame_stops_counting_and_records_the_code() -> None:
    counter = FrameCounter()
    stream = server_frame(b"a") + server_frame((4009).to_bytes(2, "big") + b"slow", OP_CLOSE)
    assert counter.feed(stream + server_frame(b"after")) == 1
    assert counter.close_code == 4009
    assert counter.broken
    assert counter.feed(server_frame(b"more")) == 0


@pytest.mark.parametrize(
    "bad",
    [
        encode_frame(b"masked", mask=b"abcd"),  # servers never mask
        bytes((0x01, 3)) + b"abc",  # not FIN: fragmented
        bytes((0xC1, 3)) + b"abc",  # RSV1 set
        server_frame(b"bin", OP_BINARY),
        bytes((0x81, 126, 0, 5)) + b"12345",  # non-minimal 16-bit length
    ],
)
def test_bad_frames_are_counted_not_trusted(bad: bytes) -> None:
    counter = FrameCounter()
    counter.feed(server_frame(b"ok") + bad + server_frame(b"ok"))
    assert counter.bad == 1
    assert counter.text == 1


def test_decoder_rejects_masked_and_fragmented_frames() -> None:
    for bad in (encode_frame(b"x", mask=b"abcd"), bytes((0x01, 1)) + b"x"):
        decoder = FrameDecoder()
        assert decoder.feed(bad) == []
        assert decoder.bad == 1


def test_sequence_checker_counts_missing_duplicate_and_reset() -> None:
    checker = SequenceChecker()
    assert checker.check("a", "e1", 1)
    assert checker.check("a", "e1", 2)
    assert not checker.check("a", "e1", 5)  # 3 and 4 missing
    assert not checker.check("a", "e1", 5)  # duplicate
    assert not checker.check("a", "e1", 4)  # older: duplicate too
    assert checker.check("a", "e1", 6)
    assert not checker.check("a", "e2", 1)  # epoch changed
    assert checker.check("b", "e1", 10)  # streams are independent
    assert (checker.gaps, checker.duplicates, checker.resets, checker.checked) == (2, 2, 1, 8)


def test_hub_notification_parsing() -> None:
    frame = {
        "type": "notification",
        "channel": "public.bench",
        "offset": "ab12:41",
        "data": {"t": 123, "id": "m1", "timestamp": "2026-01-01T00:00:00.000Z"},
    }
    note = parse_hub_notification(json.dumps(frame).encode())
    assert note is not None
    assert (note.channel, note.epoch, note.seq, note.t_ns) == ("public.bench", "ab12", 41, 123)
    assert parse_hub_notification(b'{"type":"pong"}') is None
    for bad in (b"[]", b"{not json", json.dumps({**frame, "offset": "x"}).encode()):
        with pytest.raises(ValueError, match=r"."):
            parse_hub_notification(bad)
    no_id = {**frame, "data": {"t": 1}}
    with pytest.raises(ValueError, match="id/timestamp"):
        parse_hub_notification(json.dumps(no_id).encode())
    assert parse_offset("a:b:7") == ("a:b", 7)


def test_percentile_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile(values, 100) == 100.0
    assert percentile([5.0], 99) == 5.0
    assert percentile([], 50) is None


# --------------------------------------------------------------------------- marker counting


def hub_notification(seq: int, pad: int = 100, channel: str = "public.bench") -> bytes:
    """A hub notification frame as the hub writes it (compact JSON, ``type`` first)."""
    data = {"t": 1_700_000_000_000_000_000 + seq, "p": "x" * pad, "id": f"m{seq}"}
    data["timestamp"] = "2026-01-01T00:00:00.000Z"
    frame = {"type": "notification", "channel": channel, "offset": f"ab12cd34:{seq}"}
    return server_frame(json.dumps({**frame, "data": data}, separators=(",", ":")).encode())


def close_frame(code: int, reason: bytes = b"") -> bytes:
    return server_frame(code.to_bytes(2, "big") + reason, OP_CLOSE)


#: Frames a counting socket of the hub or the websockets peer may see besides
#: notifications: none of them may be counted.
HUB_OTHER_FRAMES = [
    server_frame(
        b'{"type":"welcome","connection_id":"9f2c","user_id":"u1","heartbeat_interval":30}'
    ),
    server_frame(
        b'{"type":"subscribed","channels":["public.bench"],"offsets":{"public.bench":"a:0"}}'
    ),
    server_frame(b'{"type":"pong","id":3}'),
    server_frame(b'{"type":"pong"}'),
    server_frame(b'{"type":"error","code":"VALIDATION_ERROR","message":"type notification?"}'),
    server_frame(b"\x88\x03\x0f\xa9", OP_PING),  # a ping payload that looks like a close
    server_frame(b"", OP_PING),
    server_frame(b"abcd", OP_PONG),
]


def marker_stream(count: int, *, others: bool = True, pad: int = 100) -> bytes:
    """``count`` hub notifications, each after one of :data:`HUB_OTHER_FRAMES`."""
    parts = []
    for seq in range(count):
        if others:
            parts.append(HUB_OTHER_FRAMES[seq % len(HUB_OTHER_FRAMES)])
        parts.append(hub_notification(seq, pad=pad))
    return b"".join(parts)


def test_marker_counter_counts_a_marker_split_at_every_position() -> None:
    stream = marker_stream(3)
    assert stream.count(HUB_NOTIFICATION_MARKER) == 3
    for cut in range(len(stream) + 1):
        counter = MarkerCounter(HUB_NOTIFICATION_MARKER)
        counted = counter.feed(stream[:cut]) + counter.feed(stream[cut:])
        assert counted == counter.text == 3, cut
        assert counter.bytes == len(stream)
        assert counter.close_code is None


def test_marker_counter_counts_byte_by_byte_reads() -> None:
    stream = marker_stream(5)
    counter = MarkerCounter(HUB_NOTIFICATION_MARKER)
    assert sum(counter.feed(stream[i : i + 1]) for i in range(len(stream))) == 5
    assert counter.text == 5
    assert counter.close_code is None


def test_marker_counter_counts_only_notifications_of_a_mixed_stream() -> None:
    for frame in HUB_OTHER_FRAMES:
        counter = MarkerCounter(HUB_NOTIFICATION_MARKER)
        assert counter.feed(frame * 3) == 0, frame
        assert not counter.broken
    stream = b"".join(HUB_OTHER_FRAMES) + hub_notification(1) + b"".join(HUB_OTHER_FRAMES)
    counter = MarkerCounter(HUB_NOTIFICATION_MARKER)
    assert counter.feed(stream) == 1
    assert (counter.text, counter.other, counter.bad, counter.close_code) == (1, 0, 0, None)


def test_marker_counter_records_the_close_code_split_at_every_position() -> None:
    before = marker_stream(2)
    stream = before + close_frame(4009, b"slow consumer")
    for cut in range(len(stream) + 1):
        counter = MarkerCounter(HUB_NOTIFICATION_MARKER)
        counter.feed(stream[:cut])
        assert counter.close_code is None or cut == len(stream), cut
        counter.feed(stream[cut:])
        assert counter.close_code == 4009, cut
        assert counter.broken
        assert counter.text == 2
    assert counter.feed(hub_notification(9)) == 0  # nothing counts after the close


@pytest.mark.parametrize(
    ("tail", "code"),
    [
        (close_frame(1000), 1000),
        (close_frame(1001, b"server shutting down"), 1001),
        (close_frame(4011, "é".encode() * 61 + b"."), 4011),  # the longest: 125 bytes
        (server_frame(b"", OP_CLOSE), None),  # no code: not recognised
        (close_frame(1005), None),  # never sent on the wire
        (close_frame(2000), None),
        (close_frame(4009, b"\xff\xfe"), None),  # reason is not UTF-8
        (close_frame(4009)[:-1], None),  # incomplete
        (close_frame(4009) + b"x", None),  # something after it: not a close
        (bytes((0x81, 126, 0x00, 0x88)) + b'{"', None),  # a 136-byte frame's header
        (bytes((0x81, 126, 0x88, 0x00)), None),
        (bytes((0x88, 0x02)) + b'{"', None),
    ],
)
def test_trailing_close_code(tail: bytes, code: int | None) -> None:
    assert trailing_close_code((hub_notification(1) + tail)[-200:]) == code


def random_frames(rng: random.Random, count: int) -> tuple[list[bytes], int, int]:
    """``count`` random server frames: ``(frames, notifications, text frames)``."""
    frames, notes, texts = [], 0, 0
    for seq in range(count):
        kind = rng.random()
        if kind < 0.7:
            pad = rng.choice([0, 1, 20, 100, rng.randrange(0, 70_000)])
            frames.append(hub_notification(seq, pad=pad))
            notes, texts = notes + 1, texts + 1
        elif kind < 0.85:
            frames.append(HUB_OTHER_FRAMES[rng.randrange(len(HUB_OTHER_FRAMES))])
            texts += frames[-1][0] == 0x81
        else:
            opcode = rng.choice([OP_PING, OP_PONG])
            frames.append(server_frame(rng.randbytes(rng.randrange(0, 126)), opcode))
    return frames, notes, texts


@pytest.mark.parametrize("seed", range(4))
def test_marker_counter_is_exact_over_a_long_random_stream(seed: int) -> None:
    rng = random.Random(seed)
    frames, notes, texts = random_frames(rng, 3000)
    stream = b"".join(frames) + close_frame(4009, b"slow consumer")
    # Reads land in a reused buffer whose stale bytes hold markers and close frames.
    junk = (HUB_NOTIFICATION_MARKER + close_frame(1000)) * 20_000
    buf = bytearray(junk[:300_000])
    marker, strict = MarkerCounter(HUB_NOTIFICATION_MARKER), FrameCounter()
    pos = 0
    while pos < len(stream):
        size = rng.choice([1, 2, 7, 22, 23, 24, 150, 4096, 65536, 262144, rng.randrange(1, 300)])
        chunk, pos = stream[pos : pos + size], pos + size
        buf[: len(chunk)] = chunk
        assert marker.close_code is None
        marker.feed(buf, len(chunk))
        strict.feed(chunk)
    assert marker.text == notes
    assert strict.text == texts
    assert marker.close_code == strict.close_code == 4009
    assert marker.bytes == strict.bytes == len(stream)


def test_marker_counter_reads_no_stale_bytes_past_the_end_of_a_reused_buffer() -> None:
    marker = HUB_NOTIFICATION_MARKER
    for k in range(1, len(marker) - 1):
        counter = MarkerCounter(marker)
        counter.feed(marker[:k])
        buf = bytearray(marker[k:] + marker)  # after the read's 1 byte: the marker's rest
        assert counter.feed(buf, 1) == 0, k
        assert counter.feed(marker[k + 1 :]) == 1, k
        assert counter.text == 1
        assert counter.bytes == len(marker)


@given(
    st.lists(st.tuples(st.booleans(), st.integers(0, 300)), max_size=40),
    st.lists(st.integers(1, 60), max_size=60),
)
def test_marker_and_strict_counters_agree_with_any_read_sizes(
    frames: list[tuple[bool, int]], reads: list[int]
) -> None:
    stream = b"".join(
        hub_notification(i, pad=pad) if note else server_frame(b'{"type":"pong"}')
        for i, (note, pad) in enumerate(frames)
    )
    marker, strict = MarkerCounter(HUB_NOTIFICATION_MARKER), FrameCounter()
    pos = 0
    for size in [*reads, len(stream)]:
        chunk, pos = stream[pos : pos + size], pos + size
        marker.feed(chunk)
        strict.feed(chunk)
    assert marker.text == sum(note for note, _ in frames)
    assert strict.text == len(frames)


def test_socketio_marker_counts_notification_events_only() -> None:
    def event(name: str, body: dict[str, object]) -> bytes:
        payload = b"42" + json.dumps([name, body], separators=(",", ":")).encode()
        return server_frame(payload)

    note = {"type": "notification", "channel": "c", "offset": "a:1", "data": {"t": 1}}
    stream = b"".join(
        [
            server_frame(b'0{"sid":"x","pingInterval":3600000}'),
            server_frame(b'40{"sid":"y"}'),
            event("subscribed", {"type": "subscribed", "channels": ["c"]}),
            event("notification", note),
            server_frame(b"2"),  # engine.io ping
            event("pong", {"type": "pong"}),
            event("notification", note),
        ]
    )
    for cut in range(len(stream) + 1):
        counter = MarkerCounter(SOCKETIO_NOTIFICATION_MARKER)
        assert counter.feed(stream[:cut]) + counter.feed(stream[cut:]) == 2, cut


@pytest.mark.parametrize("marker", [b"", b"x", b'"type":"notification"', b"abab"])
def test_markers_that_could_overlap_are_refused(marker: bytes) -> None:
    with pytest.raises(ValueError, match="marker"):
        MarkerCounter(marker)


def test_make_counter_picks_by_spec_and_config() -> None:
    marked = hub_subscriber_spec("127.0.0.1", 1, "t", "public.bench")
    plain = SubscriberSpec("127.0.0.1", 1, "/ws")
    assert type(make_counter(marked)) is MarkerCounter
    assert type(make_counter(marked, "marker")) is MarkerCounter
    assert type(make_counter(marked, "strict")) is FrameCounter
    assert type(make_counter(plain)) is FrameCounter
    with pytest.raises(ValueError, match="count_marker"):
        make_counter(plain, "marker")
    with pytest.raises(ValueError, match="unknown"):
        make_counter(marked, "fast")


# --------------------------------------------------------------------------- the worker


def ready_worker(counter: str) -> tuple[SubscriberWorker, socket.socket]:
    """A counting worker holding one ready socket; returns it and the server's end."""
    spec = hub_subscriber_spec("127.0.0.1", 1, "t", "public.bench")
    worker = SubscriberWorker(WorkerConfig(spec, "count", counter=counter))
    server, client = socket.socketpair()
    client.setblocking(False)
    sub = _Sub(client)
    worker._ready(sub)
    assert type(sub.counter) is (FrameCounter if counter == "strict" else MarkerCounter)
    return worker, server


def drain_until(worker: SubscriberWorker, done: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    """Drain until ``done(snapshot)``, for 10 s at most."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        worker.drain(0.05)
        snap = worker.snapshot()
        if done(snap):
            return snap
    raise AssertionError(f"not done: {worker.snapshot()}")


@pytest.mark.parametrize("counter", ["auto", "strict"])
def test_worker_counts_then_records_a_close_code(counter: str) -> None:
    worker, server = ready_worker(counter)
    with server:
        stream = marker_stream(40, others=False) + close_frame(4009, b"slow consumer")
        for start in range(0, len(stream), 1000):  # several reads, one per drain
            server.sendall(stream[start : start + 1000])
            worker.drain(0.05)
        snap = drain_until(worker, lambda s: s["dead"] == 1)
    assert snap["text_frames"] == 40
    assert snap["close_codes"] == {4009: 1}
    assert snap["open"] == 0
    assert snap["bytes"] == 0  # dead sockets' bytes leave the snapshot
    assert snap["bad_frames"] == 0
    worker.epoll.close()


@pytest.mark.parametrize("counter", ["auto", "strict"])
def test_worker_counts_until_eof_without_close_code(counter: str) -> None:
    worker, server = ready_worker(counter)
    server.sendall(marker_stream(25, others=False))
    snap = drain_until(worker, lambda s: s["text_frames"] == 25)
    assert snap["open"] == 1
    assert snap["bytes"] == len(marker_stream(25, others=False))
    server.close()
    snap = drain_until(worker, lambda s: s["dead"] == 1)
    assert snap["text_frames"] == 25
    assert snap["close_codes"] == {}
    worker.epoll.close()


# --------------------------------------------------------------------------- markers per server


def test_every_benchmark_spec_has_the_marker_of_its_server() -> None:
    from benchmarks.ingest_peer import peer_spec
    from benchmarks.servers import Server

    def marker_of(name: str) -> bytes | None:
        return Server(name, 1, 1, 1).spec(["public.bench"], "t").count_marker

    assert hub_subscriber_spec("h", 1, "t", "c").count_marker == HUB_NOTIFICATION_MARKER
    assert marker_of("hub") == marker_of("websockets") == HUB_NOTIFICATION_MARKER
    assert marker_of("socketio") == SOCKETIO_NOTIFICATION_MARKER
    assert peer_spec(1).count_marker == SOCKETIO_NOTIFICATION_MARKER


def test_hub_marker_is_once_in_the_hubs_notification_frame() -> None:
    from actors import protocol

    body = protocol.message_body({"t": 1, "p": "x", "note": {"type": "other"}}, "ev")
    frame = protocol.notification("public.bench", "ab12:7", body)
    assert frame.count(HUB_NOTIFICATION_MARKER) == 1


def test_websockets_peer_marker_is_once_in_its_notification_frame(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pytest.importorskip("websockets", reason="pip install -e '.[bench]'")
    from benchmarks.peers import websockets_server

    sent: list[str] = []
    monkeypatch.setattr(websockets_server, "broadcast", lambda _members, text: sent.append(text))
    peer = websockets_server.Peer(None)
    peer.subscribers["public.bench"] = {object()}  # type: ignore[arg-type]
    status, _ = peer.publish(b'{"channel":"public.bench","data":{"t":1,"p":"x"}}')
    assert status == 202
    assert [text.encode().count(HUB_NOTIFICATION_MARKER) for text in sent] == [1]


def test_socketio_marker_is_once_in_a_socketio_notification_event() -> None:
    pytest.importorskip("socketio", reason="pip install -e '.[bench]'")
    from socketio import packet

    note = {"type": "notification", "channel": "c", "offset": "a:1", "data": {"t": 1}}
    ingest = {"t": 1, "p": "x", "w": 0, "k": 0, "s": 1}
    for data in (note, ingest):
        encoded = "4" + packet.Packet(packet.EVENT, data=["notification", data]).encode()
        assert encoded.encode().count(SOCKETIO_NOTIFICATION_MARKER) == 1
        assert encoded.encode().startswith(SOCKETIO_NOTIFICATION_MARKER)
