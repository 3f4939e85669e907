"""Settings: sources, validation, and the one-line error with exit code 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from hub.settings import RateLimit, describe_error, load_settings

ROOT = Path(__file__).resolve().parent.parent
SPEC_ENV = (
    "DATABASE_URL",
    "REDIS_URL",
    "AMQP_URL",
    "JWT_SECRET_KEY",
    "SMTP_HOST",
    "SMTP_PORT",
    "LOG_LEVEL",
    "HUB_NODE_ID",
    "ALLOWED_ORIGINS",
    "TRUSTED_PROXIES",
    "RATE_LIMIT_REGISTER",
    "RATE_LIMIT_LOGIN",
    "RATE_LIMIT_AUTH",
    "RATE_LIMIT_PUBLIC",
    "RATE_LIMIT_ADMIN",
    "AUTH_REQUIRE_VERIFIED",
    "HEARTBEAT_INTERVAL",
    "HEARTBEAT_TIMEOUT",
    "HISTORY_SIZE",
    "HISTORY_TTL",
    "WEBHOOK_ALLOW_PRIVATE",
    "HUB_DATA_DIR",
)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    for name in SPEC_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_every_spec_setting_is_read(clean_env: Path) -> None:
    from hub.settings import Settings

    fields = {name.upper() for name in Settings.model_fields}
    assert set(SPEC_ENV) <= fields


def test_defaults_match_the_spec(clean_env: Path) -> None:
    s = load_settings()
    assert (s.database_url, s.redis_url, s.amqp_url) == (None, None, None)
    assert s.rate("register") == RateLimit(5, 60)
    assert s.rate("admin") == RateLimit(1000, 60)
    assert (s.heartbeat_interval, s.heartbeat_timeout) == (30, 60)
    assert (s.history_size, s.history_ttl) == (100, 3600)
    assert s.auth_require_verified is True and s.webhook_allow_private is False
    assert s.hub_data_dir == Path("data")


def test_yaml_file_is_read_and_env_wins(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = clean_env / "hub.yml"
    cfg.write_text("HISTORY_SIZE: 7\nheartbeat_interval: 5\nallowed_origins: a.example,b.example\n")
    monkeypatch.setenv("HISTORY_SIZE", "9")
    s = load_settings(cfg)
    assert s.history_size == 9
    assert s.heartbeat_interval == 5
    assert s.allowed_origins == ["a.example", "b.example"]


def test_dotenv_is_read(clean_env: Path) -> None:
    (clean_env / ".env").write_text("HISTORY_TTL=77\n")
    assert load_settings().history_ttl == 77


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({"JWT_SECRET_KEY": "short"}, "JWT_SECRET_KEY"),
        ({"DATABASE_URL": "postgresql://x@127.0.0.1/db"}, "JWT_SECRET_KEY is required"),
        ({"DATABASE_URL": "mysql://x"}, "DATABASE_URL"),
        ({"RATE_LIMIT_LOGIN": "ten per minute"}, "RATE_LIMIT_LOGIN"),
        ({"TRUSTED_PROXIES": "not-a-network"}, "TRUSTED_PROXIES"),
        ({"HEARTBEAT_INTERVAL": "60", "HEARTBEAT_TIMEOUT": "30"}, "HEARTBEAT_TIMEOUT"),
        ({"LOG_LEVEL": "LOUD"}, "LOG_LEVEL"),
        ({"HISTORY_SIZE": "-1"}, "HISTORY_SIZE"),
    ],
)
def test_bad_setting_is_one_clear_line(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch, env: dict[str, str], fragment: str
) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValidationError) as info:
        load_settings()
    line = describe_error(info.value)
    assert "\n" not in line and fragment in line


@pytest.mark.parametrize("where", [".env", "hub.yml"])
def test_a_retired_setting_is_ignored_with_a_warning(
    clean_env: Path, where: str, caplog: pytest.LogCaptureFixture
) -> None:
    if where == ".env":
        (clean_env / ".env").write_text("AMQP_HANDOFF_INTERVAL_MS=2\nHISTORY_TTL=77\n")
        settings = load_settings()
    else:
        (clean_env / "hub.yml").write_text("AMQP_HANDOFF_INTERVAL_MS: 2\nHISTORY_TTL: 77\n")
        settings = load_settings(clean_env / "hub.yml")
    assert settings.history_ttl == 77
    assert "AMQP_HANDOFF_INTERVAL_MS is no longer used" in caplog.text


def test_unknown_yaml_key_is_rejected(clean_env: Path) -> None:
    cfg = clean_env / "hub.yml"
    cfg.write_text("HISTORY_SIZEE: 7\n")
    with pytest.raises(ValidationError) as info:
        load_settings(cfg)
    assert "HISTORY_SIZEE" in describe_error(info.value)


@pytest.mark.parametrize(
    ("args", "env"),
    [
        (["serve"], {"JWT_SECRET_KEY": "too-short"}),
        (["migrate"], {"DATABASE_URL": "postgresql://x@127.0.0.1/db"}),
        (["serve", "--config", "missing.yml"], {}),
    ],
)
def test_cli_exits_2_with_one_line_and_no_traceback(
    clean_env: Path, args: list[str], env: dict[str, str]
) -> None:
    environ = {k: v for k, v in os.environ.items() if k not in SPEC_ENV} | env
    proc = subprocess.run(
        [sys.executable, "-m", "hub", *args],
        cwd=clean_env,
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("hub: invalid setting") or "not found" in lines[0]
    assert "Traceback" not in proc.stderr


def test_generated_secret_is_kept(clean_env: Path) -> None:
    s = load_settings(None, hub_data_dir=clean_env / "d")
    first = s.resolved_jwt_secret()
    assert len(first) >= 32
    assert load_settings(None, hub_data_dir=clean_env / "d").resolved_jwt_secret() == first


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("sqlite:////tmp/hub-x/hub.db", "/tmp/hub-x/hub.db"),
        ("sqlite:///rel/hub.db", "rel/hub.db"),
    ],
)
def test_sqlite_url_paths(clean_env: Path, url: str, expected: str) -> None:
    path = load_settings(None, database_url=url).sqlite_path
    assert path == (clean_env / expected if not expected.startswith("/") else Path(expected))
