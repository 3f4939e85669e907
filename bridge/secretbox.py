"""Sealing small secrets at rest with AES-256-GCM (webhook signing secrets).

The 256-bit key is derived with HKDF-SHA256 from the configured key material
(``WEBHOOK_SECRET_KEY``, at least 32 bytes; see ``Settings.resolved_webhook_key``),
with a fixed ``info`` label, so the same material used elsewhere (the JWT key, when the
webhook key falls back to it) yields an unrelated key.

A sealed value is text: ``v1.`` + base64url(12-byte random nonce ‖ ciphertext ‖ 16-byte
tag). The caller's ``associated`` bytes (the webhook's id) are authenticated but not
stored, so a sealed secret copied onto another row does not open there.
"""

from __future__ import annotations

import base64
import binascii
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = ["MIN_KEY_BYTES", "SecretBox", "SecretBoxError"]

#: Shortest accepted key material (UTF-8 bytes; the same rule as the settings).
MIN_KEY_BYTES = 32
#: AES-256.
KEY_BYTES = 32
#: The GCM nonce size NIST recommends; random per seal.
NONCE_BYTES = 12
#: Domain separation of the derived key.
HKDF_INFO = b"notification-hub/webhook-secrets/v1"
#: Prefix of sealed values (a later format gets a new one).
VERSION_PREFIX = "v1."


class SecretBoxError(Exception):
    """A sealed value cannot be opened: corrupted, another key, or another row."""


class SecretBox:
    """Seals and opens short strings with one AES-256-GCM key.

    Args:
        key_material: at least :data:`MIN_KEY_BYTES` bytes of UTF-8 (high entropy, e.g.
            ``openssl rand -base64 32``); the AES key is HKDF-SHA256 of it.

    Raises:
        ValueError: ``key_material`` is too short.
    """

    def __init__(self, key_material: str) -> None:
        if len(key_material.encode()) < MIN_KEY_BYTES:
            raise ValueError(f"the key must be at least {MIN_KEY_BYTES} bytes")
        key = HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=HKDF_INFO).derive(
            key_material.encode()
        )
        self._aead = AESGCM(key)

    def seal(self, plaintext: str, *, associated: bytes) -> str:
        """Encrypt ``plaintext`` bound to ``associated``; a fresh nonce every call."""
        nonce = os.urandom(NONCE_BYTES)
        sealed = nonce + self._aead.encrypt(nonce, plaintext.encode(), associated)
        return VERSION_PREFIX + base64.urlsafe_b64encode(sealed).decode("ascii")

    def open(self, sealed: str, *, associated: bytes) -> str:
        """Decrypt a value made by :meth:`seal` with the same key and ``associated``.

        Raises:
            SecretBoxError: the value is malformed, was sealed with another key or
                other associated data, or was altered.
        """
        if not sealed.startswith(VERSION_PREFIX):
            raise SecretBoxError("unknown sealed-value format")
        try:
            raw = base64.urlsafe_b64decode(sealed[len(VERSION_PREFIX) :].encode("ascii"))
        except (binascii.Error, UnicodeEncodeError, ValueError):
            raise SecretBoxError("sealed value is not valid base64") from None
        if len(raw) < NONCE_BYTES + 16:
            raise SecretBoxError("sealed value is too short")
        try:
            plaintext = self._aead.decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:], associated)
        except InvalidTag:
            raise SecretBoxError(
                "sealed value does not open with this key (was WEBHOOK_SECRET_KEY changed?)"
            ) from None
        return plaintext.decode()
