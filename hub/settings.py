"""Node settings (SPEC §1): environment, ``.env`` and an optional YAML file; env wins.

Names are the environment variable names of the spec, lower-cased. Unknown keys in the
YAML file are an error, so a typo never passes silently.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar

from pydantic import Field, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

log = logging.getLogger("hub.settings")

#: Settings that no longer do anything, and why: still accepted (with a warning) in a
#: ``.env`` or YAML file, so that a file written for an older release keeps working.
RETIRED_SETTINGS = {
    "amqp_handoff_interval_ms": "the RabbitMQ ingest runs on the node's loop, with no "
    "thread to hand deliveries over from",
}

_RATE_RE = re.compile(r"^\s*(\d+)\s*/\s*(second|minute|hour|day)\s*$")
_PERIOD_S = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}
MIN_SECRET_BYTES = 32


@dataclass(frozen=True, slots=True)
class RateLimit:
    """``count`` requests per ``period_s`` seconds, parsed from ``"10/minute"``."""

    count: int
    period_s: int

    @classmethod
    def parse(cls, text: str) -> RateLimit:
        match = _RATE_RE.match(text)
        if not match or int(match.group(1)) < 1:
            raise ValueError(f"{text!r} is not a rate like '10/minute' (second, minute, hour, day)")
        return cls(int(match.group(1)), _PERIOD_S[match.group(2)])

    def __str__(self) -> str:
        unit = {v: k for k, v in _PERIOD_S.items()}[self.period_s]
        return f"{self.count}/{unit}"


def _split_list(value: Any) -> Any:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class Settings(BaseSettings):
    """Everything a node reads at start. See ``docs/operations.md`` for the reference."""

    model_config = SettingsConfigDict(
        env_file=".env",
        env_file_encoding="utf-8",
        case_sensitive=False,
        extra="forbid",
        validate_default=True,
    )
    yaml_file: ClassVar[Path | None] = None

    host: str = Field("127.0.0.1", description="Address to listen on.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port for HTTP and WebSocket.")
    database_url: str | None = Field(
        None, description="postgresql://… ; unset → SQLite file in HUB_DATA_DIR."
    )
    redis_url: str | None = Field(None, description="redis://… ; unset → in-process broker.")
    amqp_url: str | None = Field(None, description="amqp://… ; unset → no RabbitMQ.")
    amqp_prefetch: int = Field(
        1000, ge=1, le=65535, description="Unacked RabbitMQ messages the ingest consumer holds."
    )
    amqp_ack_batch: int = Field(
        200, ge=1, description="Ingest acks this many messages at once (at most prefetch/2)."
    )
    amqp_ack_interval_ms: float = Field(
        5.0, gt=0, le=60_000, description="Ingest flushes its acks at least this often (ms)."
    )
    amqp_reconnect_max_s: float = Field(
        10.0, gt=0, le=300, description="Cap of the RabbitMQ reconnect backoff."
    )
    amqp_dedupe_ttl_s: float = Field(
        600.0, gt=0, description="A repeated message id within this window reaches clients once."
    )
    amqp_dedupe_max_keys: int = Field(
        2_000_000, ge=1000, description="Ids the in-memory dedupe holds at most."
    )
    jwt_secret_key: str | None = Field(
        None,
        description="HS256 key, at least 32 bytes. Required with DATABASE_URL; otherwise one is "
        "generated and kept in HUB_DATA_DIR.",
    )
    smtp_host: str | None = Field(
        None, description="SMTP server; unset → e-mails go to the outbox folder."
    )
    smtp_port: int = Field(25, ge=1, le=65535, description="SMTP port.")
    smtp_username: str | None = Field(None, description="SMTP user (optional).")
    smtp_password: str | None = Field(None, description="SMTP password (optional).")
    smtp_starttls: bool = Field(False, description="Use STARTTLS with SMTP.")
    email_from: str = Field(
        "notification-hub <no-reply@localhost>", description="From: of e-mails the hub sends."
    )
    public_url: str = Field("http://127.0.0.1:8000", description="Base URL used in e-mail links.")
    log_level: str = Field("INFO", description="DEBUG, INFO, WARNING, ERROR.")
    log_format: str = Field("json", description="json or text.")
    hub_node_id: str = Field(
        default_factory=lambda: f"node-{secrets.token_hex(3)}", description="Name of this node."
    )
    hub_data_dir: Path = Field(Path("./data"), description="SQLite file, outbox, generated key.")
    allowed_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Comma-separated WebSocket origins; empty → any."
    )
    trusted_proxies: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Comma-separated CIDRs whose X-Forwarded-For is believed."
    )
    rate_limit_register: str = Field("5/minute", description="Registrations per client IP.")
    rate_limit_login: str = Field("10/minute", description="Logins per client IP.")
    rate_limit_auth: str = Field("10/minute", description="Other /auth requests per client IP.")
    rate_limit_public: str = Field("100/minute", description="Authenticated requests per user.")
    rate_limit_admin: str = Field("1000/minute", description="Admin requests per admin user.")
    auth_require_verified: bool = Field(True, description="Login needs a verified e-mail.")
    access_token_ttl_s: int = Field(3600, ge=60, description="Access token lifetime (s).")
    refresh_token_ttl_s: int = Field(7 * 86400, ge=300, description="Refresh token lifetime (s).")
    bcrypt_rounds: int = Field(12, ge=4, le=16, description="Spec: 12. Lower only in tests.")
    heartbeat_interval: float = Field(30, gt=0, description="Seconds between client pings.")
    heartbeat_timeout: float = Field(60, gt=0, description="Silence before close 4008.")
    history_size: int = Field(100, ge=0, description="Messages kept per channel for recovery.")
    history_ttl: int = Field(3600, ge=1, description="Seconds a message stays in history.")
    ws_max_channels: int = Field(
        100,
        ge=1,
        description="Channels per connection (LIMIT_EXCEEDED beyond).",
    )
    ws_max_frame_bytes: int = Field(
        64 * 1024,
        ge=1024,
        description="Largest client frame (close 1009 beyond).",
    )
    ws_send_queue_bytes: int = Field(1024 * 1024, ge=4096, description="Slow consumer → 4009.")
    ws_max_connections: int = Field(
        0,
        ge=0,
        description="WebSocket connections per node; more upgrades get HTTP 503. 0 → no cap "
        "(the open-file limit still applies, see FD_RESERVE).",
    )
    fd_reserve: int = Field(
        0,
        ge=0,
        description="File descriptors kept free for the node's own needs: WebSocket upgrades "
        "get HTTP 503 when fewer would be left. 0 → max(64, 2% of RLIMIT_NOFILE).",
    )
    ws_allow_deflate: bool = Field(
        False,
        description="Accept permessage-deflate when a client asks.",
    )
    webhook_allow_private: bool = Field(
        False,
        description="Allow webhooks to private addresses (tests only).",
    )
    webhook_secret_key: str | None = Field(
        None,
        description="Key (at least 32 bytes) that encrypts webhook secrets at rest. Unset: "
        "derived from JWT_SECRET_KEY with PostgreSQL, else generated and kept in HUB_DATA_DIR.",
    )
    webhook_retry_base_s: float = Field(
        30.0, gt=0, le=3600, description="First webhook retry delay; doubles on each retry."
    )
    webhook_timeout_s: float = Field(
        10.0, gt=0, le=60, description="Seconds one webhook attempt may take."
    )
    db_pool_size: int = Field(20, ge=1, description="PostgreSQL pool size.")
    shutdown_timeout_s: float = Field(
        8.0,
        gt=0,
        description="Grace period for in-flight requests on SIGTERM.",
    )

    @field_validator("allowed_origins", "trusted_proxies", mode="before")
    @classmethod
    def _lists(cls, value: Any) -> Any:
        return _split_list(value)

    @field_validator("trusted_proxies")
    @classmethod
    def _cidrs(cls, value: list[str]) -> list[str]:
        for item in value:
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ValueError(f"{item!r} is not an IP network") from None
        return value

    @field_validator(
        "rate_limit_register",
        "rate_limit_login",
        "rate_limit_auth",
        "rate_limit_public",
        "rate_limit_admin",
    )
    @classmethod
    def _rates(cls, value: str) -> str:
        RateLimit.parse(value)
        return value

    @field_validator("log_level")
    @classmethod
    def _level(cls, value: str) -> str:
        level = value.upper()
        if level not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise ValueError(f"{value!r} is not one of DEBUG, INFO, WARNING, ERROR")
        return level

    @field_validator("log_format")
    @classmethod
    def _format(cls, value: str) -> str:
        if value not in {"json", "text"}:
            raise ValueError("must be json or text")
        return value

    @field_validator("database_url")
    @classmethod
    def _db_url(cls, value: str | None) -> str | None:
        if value and not value.startswith(("postgresql://", "postgres://", "sqlite:")):
            raise ValueError("must start with postgresql:// (or sqlite:///PATH)")
        return value or None

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str | None) -> str | None:
        if value and not value.startswith(("redis://", "rediss://")):
            raise ValueError("must start with redis://")
        return value or None

    @field_validator("amqp_url")
    @classmethod
    def _amqp_url(cls, value: str | None) -> str | None:
        if value and not value.startswith(("amqp://", "amqps://")):
            raise ValueError("must start with amqp://")
        return value or None

    @field_validator("jwt_secret_key", "webhook_secret_key")
    @classmethod
    def _secret(cls, value: str | None) -> str | None:
        if value is not None and len(value.encode()) < MIN_SECRET_BYTES:
            raise ValueError(f"must be at least {MIN_SECRET_BYTES} bytes")
        return value

    @model_validator(mode="before")
    @classmethod
    def _retired(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        retired = [k for k in data if isinstance(k, str) and k.lower() in RETIRED_SETTINGS]
        for key in retired:
            log.warning(
                "%s is no longer used (%s); remove it", key.upper(), RETIRED_SETTINGS[key.lower()]
            )
        return {k: v for k, v in data.items() if k not in retired}

    @model_validator(mode="after")
    def _cross(self) -> Settings:
        if self.uses_postgres and not self.jwt_secret_key:
            raise ValueError("JWT_SECRET_KEY is required when DATABASE_URL is set")
        if self.heartbeat_timeout <= self.heartbeat_interval:
            raise ValueError("HEARTBEAT_TIMEOUT must be greater than HEARTBEAT_INTERVAL")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings, dotenv_settings]
        if cls.yaml_file is not None:
            sources.append(_LowerYaml(settings_cls, yaml_file=cls.yaml_file))
        return tuple(sources)

    def rate(self, name: str) -> RateLimit:
        """The parsed limit ``register``, ``login``, ``auth``, ``public`` or ``admin``."""
        return RateLimit.parse(getattr(self, f"rate_limit_{name}"))

    @property
    def sqlite_path(self) -> Path:
        if self.database_url and self.database_url.startswith("sqlite:"):
            # SQLAlchemy's convention: sqlite:///relative.db, sqlite:////absolute/path.db
            rest = self.database_url.removeprefix("sqlite:")
            rest = rest[3:] if rest.startswith("///") else rest.lstrip("/")
            return Path(rest or "hub.db").resolve()
        return self.hub_data_dir / "hub.db"

    @property
    def uses_postgres(self) -> bool:
        return bool(self.database_url and self.database_url.startswith("postgres"))

    def resolved_jwt_secret(self) -> str:
        """The configured key, or one generated once and kept in ``HUB_DATA_DIR``."""
        if self.jwt_secret_key:
            return self.jwt_secret_key
        path = self.hub_data_dir / "jwt_secret"
        if path.exists():
            return path.read_text().strip()
        self.hub_data_dir.mkdir(parents=True, exist_ok=True)
        key = secrets.token_urlsafe(48)
        path.write_text(key)
        path.chmod(0o600)
        return key

    def resolved_webhook_key(self) -> str:
        """Key material for sealing webhook secrets (``bridge.secretbox``).

        ``WEBHOOK_SECRET_KEY`` when set. Otherwise, with PostgreSQL, the JWT key (every
        node has the same one; the secret box derives its AES key with HKDF under its
        own label, so the two keys are unrelated, but rotating ``JWT_SECRET_KEY`` then
        makes stored webhook secrets unreadable: set ``WEBHOOK_SECRET_KEY`` in
        production). With SQLite, one generated once and kept in ``HUB_DATA_DIR``.
        """
        if self.webhook_secret_key:
            return self.webhook_secret_key
        if self.uses_postgres:
            return self.resolved_jwt_secret()
        path = self.hub_data_dir / "webhook_key"
        if path.exists():
            return path.read_text().strip()
        self.hub_data_dir.mkdir(parents=True, exist_ok=True)
        key = secrets.token_urlsafe(48)
        path.write_text(key)
        path.chmod(0o600)
        return key


class _LowerYaml(YamlConfigSettingsSource):
    """YAML keys may be written as in the environment (``REDIS_URL``) or lower-case."""

    def __call__(self) -> dict[str, Any]:
        data = super().__call__()
        return {str(k).lower(): v for k, v in data.items()}


def load_settings(config_file: str | Path | None = None, **overrides: Any) -> Settings:
    """Read settings; raises ``pydantic.ValidationError`` or ``OSError`` on bad input."""
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise OSError(f"config file {str(path)!r} not found")

    class _Configured(Settings):
        yaml_file: ClassVar[Path | None] = Path(config_file) if config_file else None

    return _Configured(**overrides)


def describe_error(exc: Exception) -> str:
    """One clear line for a bad setting (the CLI prints it and exits 2)."""
    errors = getattr(exc, "errors", None)
    if callable(errors):
        parts = []
        for err in errors():
            loc = ".".join(str(p) for p in err.get("loc", ())) or "settings"
            msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
            parts.append(f"{loc.upper()}: {msg}")
        return "invalid setting: " + "; ".join(parts)
    return f"invalid setting: {exc}"


def settings_reference() -> str:
    """The settings table of ``docs/operations.md``, generated from :class:`Settings`."""
    rows = ["| variable | default | description |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        if field.default_factory is not None:
            default = "(generated)" if name == "hub_node_id" else "(empty)"
        elif field.default is None:
            default = "(unset)"
        else:
            default = f"`{field.default}`"
        rows.append(f"| `{name.upper()}` | {default} | {field.description or ''} |")
    return "\n".join(rows)
