"""``docs/protocol.md`` shows exactly the close-code and error-code tables of the code."""

from __future__ import annotations

from pathlib import Path

import pytest

from actors.close_codes import close_codes_table, error_codes_table

DOC = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"


@pytest.mark.parametrize(
    ("marker", "table"),
    [("close-codes", close_codes_table), ("error-codes", error_codes_table)],
)
def test_protocol_doc_tables_match_the_code(marker: str, table: object) -> None:
    text = DOC.read_text()
    shown = text.split(f"<!-- {marker}:begin -->\n", 1)[1].split(f"\n<!-- {marker}:end -->", 1)[0]
    assert callable(table)
    assert shown == table(), f"docs/protocol.md is stale: regenerate it from {table.__name__}()"
