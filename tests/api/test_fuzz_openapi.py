"""``/openapi.json`` and ``/docs``, and schemathesis fuzzing every operation of a running
node from that document: no answer may be a 5xx."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.harness import RunningNode

ST = Path(sys.executable).with_name("st")
MAX_EXAMPLES = 50
FUZZ_TIMEOUT_S = 90
#: Operations that would end the fuzzer's own session; tested explicitly elsewhere.
EXCLUDED = ["/api/v1/auth/logout", "/api/v1/users/me"]


@pytest.fixture
def backend() -> str:
    """Fuzz on SQLite only: the storage contract is covered on both backends elsewhere."""
    return "sqlite"


async def test_openapi_lists_every_route_with_its_models(hub_node: RunningNode) -> None:
    response = await hub_node.client.get("/openapi.json")
    assert response.status_code == 200
    document = response.json()
    assert document["openapi"].startswith("3.")
    paths = document["paths"]
    expected = {
        ("/api/v1/auth/register", "post"),
        ("/api/v1/auth/verify-email", "post"),
        ("/api/v1/auth/verify-email", "get"),
        ("/api/v1/auth/resend-verification", "post"),
        ("/api/v1/auth/login", "post"),
        ("/api/v1/auth/refresh", "post"),
        ("/api/v1/auth/logout", "post"),
        ("/api/v1/users/me", "get"),
        ("/api/v1/users/me", "put"),
        ("/api/v1/users/me", "delete"),
        ("/api/v1/users", "get"),
        ("/health", "get"),
        ("/ready", "get"),
    }
    listed = {(path, method) for path, ops in paths.items() for method in ops}
    assert expected <= listed
    register = paths["/api/v1/auth/register"]["post"]
    schema_ref = register["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    model = document["components"]["schemas"][schema_ref.rsplit("/", 1)[-1]]
    assert set(model["required"]) == {"email", "password", "full_name", "terms_accepted"}
    assert model["additionalProperties"] is False
    assert "201" in register["responses"]
    listing = paths["/api/v1/users"]["get"]
    names = {p["name"] for p in listing["parameters"]}
    assert names == {"page", "limit", "sort", "order", "is_active", "created_after", "search"}
    assert listing["security"] == [{"bearerAuth": []}]


async def test_docs_page(hub_node: RunningNode) -> None:
    response = await hub_node.client.get("/docs")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert "/openapi.json" in response.text


@pytest.mark.slow
async def test_schemathesis_finds_no_server_error(hub_node: RunningNode, tmp_path: Path) -> None:
    admin = await hub_node.create_account(admin=True)
    args: list[Any] = [
        str(ST),
        "run",
        f"{hub_node.url}/openapi.json",
        "--checks",
        os.environ.get("HUB_FUZZ_CHECKS", "not_a_server_error"),
        "--max-examples",
        str(MAX_EXAMPLES),
        "--seed",
        "1",
        "--workers",
        "1",
        "--header",
        f"Authorization: Bearer {admin.access_token}",
        "--request-timeout",
        "10",
        "--report-dir",
        str(tmp_path),
        "--warnings",
        "off",
    ]
    for path in EXCLUDED:
        args += ["--exclude-path", path]
    env = {**os.environ, "NO_COLOR": "1", "SCHEMATHESIS_TELEMETRY": "false"}
    with trio.fail_after(FUZZ_TIMEOUT_S):
        result = await trio.run_process(
            args, capture_stdout=True, capture_stderr=True, check=False, env=env, cwd=tmp_path
        )
    output = result.stdout.decode(errors="replace") + result.stderr.decode(errors="replace")
    assert result.returncode == 0, output[-6000:]
    print(output[-400:])
