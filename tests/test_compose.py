"""The compose file and Dockerfile agree with the settings the hub reads.

No Docker engine runs where the suite runs, so these tests read the files instead.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from hub.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
SETTING_NAMES = {name.upper() for name in Settings.model_fields}


def _compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_has_the_stack_with_pinned_major_versions() -> None:
    services = _compose()["services"]
    assert services["postgres"]["image"].startswith("postgres:15")
    assert services["redis"]["image"].startswith("redis:7")
    assert services["rabbitmq"]["image"].startswith("rabbitmq:3.12-management")
    hubs = [name for name, svc in services.items() if svc.get("build")]
    assert len(hubs) == 2, "two hub nodes built from the Dockerfile"
    assert "front" in services


def test_every_hub_environment_name_is_a_setting() -> None:
    services = _compose()["services"]
    for name, svc in services.items():
        if not svc.get("build"):
            continue
        env = svc["environment"]
        unknown = set(env) - SETTING_NAMES
        assert not unknown, f"{name} sets names the hub does not read: {unknown}"
        for required in ("DATABASE_URL", "REDIS_URL", "AMQP_URL", "JWT_SECRET_KEY", "HUB_NODE_ID"):
            assert required in env, f"{name} lacks {required}"


def test_compose_urls_point_at_compose_services() -> None:
    services = _compose()["services"]
    env = services["hub-1"]["environment"]
    assert "@postgres:5432/" in env["DATABASE_URL"]
    assert env["REDIS_URL"].startswith("redis://redis:6379")
    assert "@rabbitmq:5672" in env["AMQP_URL"]
    Settings(**{k.lower(): v for k, v in env.items()})  # the values themselves validate


def test_front_routes_websocket_upgrades_to_both_nodes() -> None:
    conf = (ROOT / "deploy" / "nginx.conf").read_text()
    assert "hub-1:8000" in conf and "hub-2:8000" in conf
    assert re.search(r"proxy_set_header\s+Upgrade\s+\$http_upgrade", conf)
    assert "location /ws/" in conf


def test_dockerfile_runs_as_non_root_with_healthcheck_on_the_served_port() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^USER\s+(?!root)\w+", text, re.M)
    assert "HEALTHCHECK" in text and "/health" in text
    port = re.search(r"^EXPOSE\s+(\d+)", text, re.M)
    assert port and f'"--port", "{port.group(1)}"' in text
    for package in ("hub", "api", "actors", "storage", "bridge"):
        assert f"COPY {package} ./{package}" in text
