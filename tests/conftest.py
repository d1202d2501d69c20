"""Fixtures shared by the test modules that run the real daemon."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest_twisted

from .test_e2e import Daemons


@pytest_twisted.async_yield_fixture
async def daemons(tmp_path: Path) -> AsyncIterator[Daemons]:
    """Daemons for one test, all stopped when it ends, passed or not."""
    running = Daemons(tmp_path)
    try:
        yield running
    finally:
        await running.stop_all()
