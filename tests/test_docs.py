"""User docs that are generated from code stay in step with it."""

from __future__ import annotations

from pathlib import Path

from hub.settings import settings_reference

ROOT = Path(__file__).resolve().parent.parent


def test_operations_settings_table_is_generated_from_the_model() -> None:
    text = (ROOT / "docs" / "operations.md").read_text()
    table = text.split("<!-- settings:begin -->\n", 1)[1].split("\n<!-- settings:end -->", 1)[0]
    assert table == settings_reference(), (
        "docs/operations.md is stale: regenerate the table with hub.settings.settings_reference()"
    )


def test_readme_quickstart_has_exactly_two_commands() -> None:
    text = (ROOT / "README.md").read_text()
    quickstart = text.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    assert quickstart.count("```sh") == 2
    assert "hub serve" in quickstart
    assert "scripts/test.sh" in quickstart
    assert "scripts/test.sh" in (ROOT / ".ci" / "run").read_text()
