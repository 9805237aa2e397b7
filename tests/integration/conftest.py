"""Fixtures the integration tests share (the session-wide ones are in tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.mirrorproc import Mirrors


@pytest.fixture
def mirrors(tmp_path: Path) -> Iterator[Mirrors]:
    """Start mirrors with ``mirrors.start(registry_url, workers, ...)``; all are stopped
    at the end of the test."""
    group = Mirrors(tmp_path)
    yield group
    group.stop()
