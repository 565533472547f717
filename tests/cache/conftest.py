"""Fixtures of the cache tests (builders live in cache_builders.py)."""
from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    """Where a test's cache lives (created by the first write)."""
    return tmp_path / "cache"
