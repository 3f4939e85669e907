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


def _nginx_block(conf: str, header: str) -> str:
    """The body of the first ``header { … }`` block of the nginx config."""
    start = conf.index(header)
    depth, i = 0, conf.index("{", start)
    for j in range(i, len(conf)):
        depth += {"{": 1, "}": -1}.get(conf[j], 0)
        if depth == 0:
            return conf[i + 1 : j]
    raise AssertionError(f"unterminated block {header}")


def _seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+)(ms|s|m)?", value.strip())
    assert match, value
    scale = {"ms": 0.001, "s": 1, "m": 60, None: 1}[match.group(2)]
    return int(match.group(1)) * scale


def _size_bytes(value: str) -> int:
    match = re.fullmatch(r"(\d+)([kKmM]?)", value.strip())
    assert match, value
    return int(match.group(1)) * {"": 1, "k": 1024, "m": 1024 * 1024}[match.group(2).lower()]


def test_front_sends_websocket_upgrades_over_fresh_upstream_connections() -> None:
    """The hub sees an upgrade only as the first request of a TCP connection, so the
    WebSocket location must use an upstream group without a keepalive pool."""
    conf = (ROOT / "deploy" / "nginx.conf").read_text()
    ws = _nginx_block(conf, "location /ws/")
    upstream = re.search(r"proxy_pass\s+http://(\w+);", ws)
    assert upstream
    group = _nginx_block(conf, f"upstream {upstream.group(1)} ")
    assert "keepalive" not in group
    assert "hub-1:8000" in group and "hub-2:8000" in group
    assert re.search(r"proxy_set_header\s+Connection\s+\$connection_upgrade", ws)
    for header in ("Host", "X-Forwarded-For"):  # not inherited once a location sets any
        assert re.search(rf"proxy_set_header\s+{header}\s", ws), header


def test_front_timeouts_and_limits_leave_decisions_to_the_hub() -> None:
    from api.app import MAX_BODY_BYTES

    conf = (ROOT / "deploy" / "nginx.conf").read_text()
    ws = _nginx_block(conf, "location /ws/")
    read_timeout = re.search(r"proxy_read_timeout\s+(\S+);", ws)
    assert read_timeout
    assert _seconds(read_timeout.group(1)) > Settings.model_fields["heartbeat_timeout"].default
    body = re.search(r"client_max_body_size\s+(\S+);", conf)
    assert body and _size_bytes(body.group(1)) > MAX_BODY_BYTES, "the hub answers 413 itself"
    metrics = _nginx_block(conf, "location = /metrics")
    assert "proxy_pass" not in metrics, "metrics are not public through the front"
    rest = _nginx_block(conf, "location / ")
    assert re.search(r"proxy_set_header\s+X-Forwarded-For\s", rest)


def test_compose_stops_nodes_slower_than_their_drain() -> None:
    services = _compose()["services"]
    for name in ("hub-1", "hub-2"):
        svc = services[name]
        grace = _seconds(svc["stop_grace_period"])
        drain = float(
            svc["environment"].get(
                "SHUTDOWN_TIMEOUT_S", Settings.model_fields["shutdown_timeout_s"].default
            )
        )
        assert grace > drain + 5, f"{name}: stop_grace_period must exceed the drain"
    front = services["front"]["depends_on"]
    assert front == {
        "hub-1": {"condition": "service_healthy"},
        "hub-2": {"condition": "service_healthy"},
    }


def test_prometheus_scrapes_every_hub_node_on_its_port() -> None:
    services = _compose()["services"]
    prometheus = services["prometheus"]
    assert prometheus["profiles"] == ["monitoring"], "optional: not started by default"
    config = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    targets = {t for group in job["static_configs"] for t in group["targets"]}
    port = re.search(r"^EXPOSE\s+(\d+)", (ROOT / "Dockerfile").read_text(), re.M)
    assert port
    hubs = {name for name, svc in services.items() if svc.get("build")}
    assert targets == {f"{name}:{port.group(1)}" for name in hubs}
