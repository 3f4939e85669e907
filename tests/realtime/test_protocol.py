"""Unit tests of the pure protocol layer: client frames, channel rules, server frames."""

from __future__ import annotations

import json

import pytest
from wsproto.frame_protocol import FrameProtocol, Opcode

from actors import protocol, wsframes
from actors.close_codes import ErrorCode
from actors.protocol import FrameError, Ping, Refresh, Subscribe, Unsubscribe

USER = "5b0f8a4e-8c1b-4c39-9f55-1d2f3a4b5c6d"


# -- client frames ---------------------------------------------------------------------
def test_subscribe_with_since_and_id() -> None:
    frame = protocol.parse_client_frame(
        json.dumps(
            {
                "type": "subscribe",
                "id": "a1",
                "channels": ["global", "global", "public.x"],
                "since": {"global": "e:3"},
                "future_field": 1,
            }
        )
    )
    assert frame == Subscribe("a1", ("global", "public.x"), {"global": "e:3"})


def test_other_frames() -> None:
    assert protocol.parse_client_frame('{"type":"ping","id":7}') == Ping(7)
    assert protocol.parse_client_frame('{"type":"ping"}') == Ping(None)
    assert protocol.parse_client_frame(
        '{"type":"unsubscribe","channels":["global"]}'
    ) == Unsubscribe(None, ("global",))
    assert protocol.parse_client_frame('{"type":"refresh","token":"t","id":"r"}') == Refresh(
        "r", "t"
    )


@pytest.mark.parametrize(
    ("text", "echoed"),
    [
        ("not json", None),
        ('{"type": "subscribe", "channels": ["a"]', None),  # truncated
        ("[1, 2]", None),
        ('"subscribe"', None),
        ("{}", None),
        ('{"id": 3}', 3),
        ('{"type": "dance", "id": "x"}', "x"),
        ('{"type": "subscribe", "id": 1}', 1),
        ('{"type": "subscribe", "channels": "global", "id": 1}', 1),
        ('{"type": "subscribe", "channels": [], "id": 1}', 1),
        ('{"type": "subscribe", "channels": [1, 2], "id": 1}', 1),
        ('{"type": "subscribe", "channels": ["a"], "since": ["a"], "id": 1}', 1),
        ('{"type": "subscribe", "channels": ["a"], "since": {"a": 5}, "id": 1}', 1),
        ('{"type": "unsubscribe", "channels": null}', None),
        ('{"type": "refresh"}', None),
        ('{"type": "refresh", "token": ""}', None),
        ('{"type": "refresh", "token": 12}', None),
        ('{"type": "ping", "id": true}', None),
        ('{"type": "ping", "id": {"a": 1}}', None),
        ('{"type": "ping", "id": 1e400}', None),
        ("[" * 100_000, None),  # nesting deeper than the recursion limit
    ],
)
def test_bad_frames(text: str, echoed: object) -> None:
    with pytest.raises(FrameError) as caught:
        protocol.parse_client_frame(text)
    assert caught.value.frame_id == echoed


def test_channel_list_is_bounded() -> None:
    many = [f"public.{i}" for i in range(protocol.MAX_LIST_ENTRIES + 1)]
    with pytest.raises(FrameError):
        protocol.parse_client_frame(json.dumps({"type": "subscribe", "channels": many}))


def test_long_id_is_not_echoed() -> None:
    with pytest.raises(FrameError) as caught:
        protocol.parse_client_frame(json.dumps({"type": "ping", "id": "x" * 500}))
    assert caught.value.frame_id is None


def test_bad_frame_counter_window() -> None:
    counter = protocol.BadFrameCounter()
    assert not any(counter.hit(float(i) * 0.1) for i in range(protocol.BAD_FRAME_LIMIT))
    assert counter.hit(1.5)  # the 11th within 10 s
    fresh = protocol.BadFrameCounter()
    # ten per window forever is tolerated
    assert not any(fresh.hit(t * 1.01) for t in range(100))


# -- channels --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "admin", "expected"),
    [
        ("global", False, None),
        ("public.news", False, None),
        ("public.a:b-c_d.e", False, None),
        (f"user.{USER}", False, None),
        (f"user.{USER}", True, None),
        ("user.someone-else", False, ErrorCode.FORBIDDEN),
        ("user.someone-else", True, ErrorCode.FORBIDDEN),
        ("admin", False, ErrorCode.FORBIDDEN),
        ("admin", True, None),
        ("admin.alerts", False, ErrorCode.FORBIDDEN),
        ("admin.alerts", True, None),
        ("public.", False, ErrorCode.FORBIDDEN),
        ("user.", False, ErrorCode.FORBIDDEN),
        ("private", False, ErrorCode.FORBIDDEN),
        ("globalx", False, ErrorCode.FORBIDDEN),
        ("adminx", True, ErrorCode.FORBIDDEN),
        ("", False, ErrorCode.VALIDATION_ERROR),
        ("public.*", False, ErrorCode.VALIDATION_ERROR),
        ("public/../x", False, ErrorCode.VALIDATION_ERROR),
        ("public.é", False, ErrorCode.VALIDATION_ERROR),
        ("public.a b", False, ErrorCode.VALIDATION_ERROR),
        ("public." + "x" * 121, False, None),  # exactly 128
        ("public." + "x" * 122, False, ErrorCode.VALIDATION_ERROR),
        ("global\n", False, ErrorCode.VALIDATION_ERROR),
    ],
)
def test_channel_rules(name: str, admin: bool, expected: ErrorCode | None) -> None:
    assert protocol.check_subscription(name, USER, admin) == expected


@pytest.mark.parametrize(
    ("name", "known"),
    [
        ("global", True),
        ("admin", True),
        ("public.a", True),
        ("user.x", True),
        ("admin.a", True),
        ("public.", False),
        ("nope", False),
        ("bad name", False),
    ],
)
def test_known_channels_for_publishing(name: str, known: bool) -> None:
    assert protocol.is_known_channel(name) is known


# -- server frames ---------------------------------------------------------------------
def test_server_frames_are_compact_json() -> None:
    assert json.loads(protocol.welcome("c1", USER, 30.0)) == {
        "type": "welcome",
        "connection_id": "c1",
        "user_id": USER,
        "heartbeat_interval": 30,
    }
    assert json.loads(protocol.welcome("c1", USER, 0.5))["heartbeat_interval"] == 0.5
    assert json.loads(protocol.subscribed(5, ["a"], {"a": True}, {"a": "e:1"})) == {
        "type": "subscribed",
        "channels": ["a"],
        "recovered": {"a": True},
        "offsets": {"a": "e:1"},
        "id": 5,
    }
    assert json.loads(protocol.subscribed(None, [], None)) == {"type": "subscribed", "channels": []}
    assert json.loads(protocol.error(ErrorCode.FORBIDDEN, "no", "i", channel="admin")) == {
        "type": "error",
        "code": "FORBIDDEN",
        "message": "no",
        "channel": "admin",
        "id": "i",
    }
    assert b" " not in protocol.pong(None)


def test_notification_is_built_around_the_encoded_body() -> None:
    body = protocol.message_body({"id": "m", "title": "Héllo", "n": [1, 2]}, event="order.paid")
    frame = json.loads(protocol.notification("public.x", "ab:12", body))
    assert frame == {
        "type": "notification",
        "channel": "public.x",
        "offset": "ab:12",
        "data": {"id": "m", "title": "Héllo", "n": [1, 2]},
        "event": "order.paid",
    }
    assert "event" not in json.loads(protocol.notification("c", "e:1", protocol.message_body({})))


def test_message_body_refuses_nan() -> None:
    with pytest.raises(ValueError, match="JSON"):
        protocol.message_body({"x": float("nan")})


# -- frame encoding --------------------------------------------------------------------
@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65535, 65536, 70000])
def test_text_frames_parse_with_wsproto(size: int) -> None:
    payload = b"x" * size
    parser = FrameProtocol(client=True, extensions=[])
    parser.receive_bytes(wsframes.text_frame(payload))
    frames = list(parser.received_frames())
    assert len(frames) == 1
    assert frames[0].opcode is Opcode.TEXT
    assert frames[0].payload == payload.decode()
    assert frames[0].frame_finished and frames[0].message_finished


def test_close_frame_reason_is_cut_on_a_character_boundary() -> None:
    frame = wsframes.close_frame(4009, "é" * 100)
    parser = FrameProtocol(client=True, extensions=[])
    parser.receive_bytes(frame)
    (close,) = list(parser.received_frames())
    code, reason = close.payload
    assert code == 4009
    assert len(reason.encode()) <= wsframes.MAX_CLOSE_REASON_BYTES
    assert set(reason) == {"é"}
