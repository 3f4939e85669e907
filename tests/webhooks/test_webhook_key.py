"""Where the key that seals webhook secrets comes from (``Settings.resolved_webhook_key``)."""

from __future__ import annotations

from pathlib import Path

import pydantic
import pytest

from tests.harness import JWT_SECRET, make_settings


def test_explicit_key_wins(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, webhook_secret_key="w" * 40)
    assert settings.resolved_webhook_key() == "w" * 40
    assert not (tmp_path / "webhook_key").exists()


def test_short_key_is_a_bad_setting(tmp_path: Path) -> None:
    with pytest.raises(pydantic.ValidationError, match=r"(?i)webhook_secret_key"):
        make_settings(tmp_path, webhook_secret_key="short")


def test_sqlite_generates_one_key_and_keeps_it(tmp_path: Path) -> None:
    first = make_settings(tmp_path).resolved_webhook_key()
    assert len(first) >= 32
    assert (tmp_path / "webhook_key").stat().st_mode & 0o777 == 0o600
    assert make_settings(tmp_path).resolved_webhook_key() == first


def test_postgres_falls_back_to_the_shared_jwt_key(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, backend="postgres")
    assert settings.resolved_webhook_key() == JWT_SECRET
    assert not (tmp_path / "webhook_key").exists()
