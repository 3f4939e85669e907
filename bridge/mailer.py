"""E-mail senders: SMTP when ``SMTP_HOST`` is set, otherwise files in an outbox.

:class:`Mailer` is the interface the e-mail worker uses. Senders raise
:class:`MailerError` for a failure worth retrying; the worker decides about retries.
"""

from __future__ import annotations

import logging
import smtplib
import ssl
from email.message import EmailMessage
from pathlib import Path
from typing import Protocol

import trio

log = logging.getLogger("hub.bridge.mailer")

SMTP_TIMEOUT_S = 10.0


class MailerError(Exception):
    """Sending failed (server unreachable, refused, timed out)."""


class Mailer(Protocol):
    async def send(self, message: EmailMessage) -> None:
        """Send ``message``. Raises :class:`MailerError` on failure."""
        ...


class SmtpMailer:
    """Sends through an SMTP server with the standard library, in a worker thread.

    Args:
        host, port: the server.
        username, password: log in when both are set.
        starttls: upgrade the connection with STARTTLS before sending.

    Cancellation:
        A cancelled send stops waiting at once; the SMTP dialogue finishes (bounded by
        :data:`SMTP_TIMEOUT_S`) in its thread and its outcome is dropped, so a cancelled
        job may still have been delivered (at least once).
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        username: str | None = None,
        password: str | None = None,
        starttls: bool = False,
    ) -> None:
        self.host = host
        self.port = port
        self._username = username
        self._password = password
        self._starttls = starttls

    def _send_blocking(self, message: EmailMessage) -> None:
        try:
            with smtplib.SMTP(self.host, self.port, timeout=SMTP_TIMEOUT_S) as smtp:
                if self._starttls:
                    smtp.starttls(context=ssl.create_default_context())
                if self._username and self._password:
                    smtp.login(self._username, self._password)
                smtp.send_message(message)
        except (OSError, smtplib.SMTPException) as error:
            raise MailerError(f"smtp {self.host}:{self.port}: {type(error).__name__}") from None

    async def send(self, message: EmailMessage) -> None:
        await trio.to_thread.run_sync(self._send_blocking, message, abandon_on_cancel=True)


class OutboxMailer:
    """Writes each message as an ``.eml`` file in ``directory`` and logs one line
    (without the address) — for development and single-node setups without SMTP."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def _write(self, name: str, data: bytes) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / name
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(data)
        tmp.replace(path)
        return path

    async def send(self, message: EmailMessage) -> None:
        ident = str(message.get("Message-ID", "")).strip("<>").split("@")[0] or "message"
        name = f"{ident}.eml"
        try:
            path = await trio.to_thread.run_sync(self._write, name, message.as_bytes())
        except OSError as error:
            raise MailerError(f"outbox: {error.strerror}") from None
        log.info(
            "e-mail written to outbox",
            extra={"outbox_file": path.name, "subject": str(message.get("Subject", ""))},
        )
