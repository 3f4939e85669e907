"""Validation of AMQP message bodies (pure functions; docs/producers.md)."""

from __future__ import annotations

import json

import pika
import pytest

from actors.ingest import MAX_MESSAGE_BYTES, InvalidMessage, parse_message


def body(**fields: object) -> bytes:
    return json.dumps(fields).encode()


def test_a_full_message() -> None:
    message = parse_message(
        body(channels=["public.a", "global", "public.a"], data={"x": 1}, event="a.b", id="m-1")
    )
    assert message.channels == ["public.a", "global"]
    assert (message.data, message.event, message.id) == ({"x": 1}, "a.b", "m-1")


def test_the_id_comes_from_the_body_then_message_id_then_a_hash() -> None:
    assert parse_message(body(channel="global", data={}, id=42)).id == "42"
    props = pika.BasicProperties(message_id="amqp-7")
    assert parse_message(body(channel="global", data={}), props).id == "amqp-7"
    derived = parse_message(body(channel="global", data={})).id
    assert derived.startswith("sha256:") and len(derived) == 7 + 32
    assert parse_message(body(channel="global", data={})).id == derived


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"", "invalid_json"),
        (b"\xff\xfe", "invalid_json"),
        (b'{"channel": "global", "data": {"x": NaN}}', "invalid_json"),
        (b"[]", "invalid_schema"),
        (body(channel="global"), "invalid_schema"),
        (body(channel="global", data=[1]), "invalid_schema"),
        (body(channel="global", channels=["global"], data={}), "invalid_schema"),
        (body(data={}), "invalid_schema"),
        (body(channels=[], data={}), "invalid_schema"),
        (body(channels=["global", 3], data={}), "invalid_schema"),
        (body(channel=5, data={}), "invalid_schema"),
        (body(channel="global", data={}, id=""), "invalid_schema"),
        (body(channel="global", data={}, id=True), "invalid_schema"),
        (body(channel="global", data={}, id="x" * 129), "invalid_schema"),
        (body(channel="global", data={}, event="has space"), "invalid_schema"),
        (body(channel="global", data={}, extra=1), "invalid_schema"),
        (body(channels=[f"public.{i}" for i in range(101)], data={}), "invalid_schema"),
        (body(channel="", data={}), "invalid_channel"),
        (body(channel="public.a b", data={}), "invalid_channel"),
        (body(channel="public." + "a" * 122, data={}), "invalid_channel"),
        (body(channel="elsewhere", data={}), "invalid_channel"),
        (body(channel="public.", data={}), "invalid_channel"),
        (body(channel="global", data={"p": "x" * MAX_MESSAGE_BYTES}), "oversize"),
    ],
)
def test_invalid_messages_carry_their_reason(raw: bytes, reason: str) -> None:
    with pytest.raises(InvalidMessage) as caught:
        parse_message(raw)
    assert caught.value.reason == reason
    assert caught.value.detail


def test_the_longest_valid_channel_name() -> None:
    name = "public." + "a" * 121
    assert len(name) == 128
    assert parse_message(body(channel=name, data={})).channels == [name]
