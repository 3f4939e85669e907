"""The load generator's parsing pieces: frames, handshake, continuity, percentiles.

These are what every benchmark figure rests on, so they are checked against hand-built
byte streams, including every way a stream can be split across reads.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from benchmarks.loadgen import (
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    FrameCounter,
    FrameDecoder,
    SequenceChecker,
    accept_for,
    apply_mask,
    encode_frame,
    parse_hub_notification,
    parse_offset,
    parse_upgrade_response,
    percentile,
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
