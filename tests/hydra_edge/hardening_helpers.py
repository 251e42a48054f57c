"""Helpers of the hardening tests (a plain module: test files import it, conftest.py holds the fixtures)."""

from __future__ import annotations

from pathlib import Path


def truncate(path: Path) -> None:
    """Cuts the file to half its size, as an interrupted copy or a full disk leaves it."""
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
