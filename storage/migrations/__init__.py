"""Versioned SQL migrations, shipped as package data: ``<dialect>/NNNN_name.sql``.

A migration's version is its file name without ``.sql`` (``"0001_initial"``); they are
applied in version order and recorded in ``schema_migrations``. Files are never edited
once released: a change is a new file.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from typing import Literal

__all__ = ["Dialect", "Migration", "load_migrations"]

Dialect = Literal["sqlite", "postgresql"]


@dataclass(frozen=True, slots=True)
class Migration:
    """One migration file: ``version`` is its stem, ``sql`` its text."""

    version: str
    sql: str


def load_migrations(dialect: Dialect) -> list[Migration]:
    """All migrations of ``dialect``, sorted by version.

    Raises:
        ValueError: There is no folder for ``dialect``.
    """
    folder = resources.files(__name__).joinpath(dialect)
    if not folder.is_dir():
        raise ValueError(f"no migrations for dialect {dialect!r}")
    found = [
        Migration(entry.name.removesuffix(".sql"), entry.read_text(encoding="utf-8"))
        for entry in folder.iterdir()
        if entry.name.endswith(".sql")
    ]
    return sorted(found, key=lambda m: m.version)
