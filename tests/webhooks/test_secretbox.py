"""AES-256-GCM sealing of webhook secrets (``bridge.secretbox``)."""

from __future__ import annotations

import base64
import uuid

import pytest

from bridge.secretbox import SecretBox, SecretBoxError

KEY = "k" * 32
OTHER_KEY = "o" * 32


def test_round_trip_with_fresh_nonces() -> None:
    box = SecretBox(KEY)
    row = uuid.uuid4().bytes
    first = box.seal("whsec_abc", associated=row)
    second = box.seal("whsec_abc", associated=row)
    assert first != second  # a new nonce every time
    assert first.startswith("v1.")
    assert "whsec_abc" not in first
    assert box.open(first, associated=row) == "whsec_abc"
    assert SecretBox(KEY).open(second, associated=row) == "whsec_abc"  # same key material


def test_refuses_another_key_another_row_and_tampering() -> None:
    box = SecretBox(KEY)
    row = uuid.uuid4().bytes
    sealed = box.seal("whsec_abc", associated=row)
    with pytest.raises(SecretBoxError, match="WEBHOOK_SECRET_KEY"):
        SecretBox(OTHER_KEY).open(sealed, associated=row)
    with pytest.raises(SecretBoxError):
        box.open(sealed, associated=uuid.uuid4().bytes)  # copied onto another row
    raw = bytearray(base64.urlsafe_b64decode(sealed[3:]))
    raw[-1] ^= 1
    with pytest.raises(SecretBoxError):
        box.open("v1." + base64.urlsafe_b64encode(bytes(raw)).decode(), associated=row)
    for garbage in ("", "v2.abc", "v1.!!!", "v1.YWJj"):
        with pytest.raises(SecretBoxError):
            box.open(garbage, associated=row)


def test_key_material_must_be_32_bytes() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        SecretBox("k" * 31)
    SecretBox("é" * 16)  # 32 bytes of UTF-8
