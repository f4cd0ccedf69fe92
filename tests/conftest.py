"""Shared fixtures: real daemons for end-to-end tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemons import Daemon, DaemonFactory


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[DaemonFactory]:
    """Start real `ostrom daemon` processes; all are stopped when the test ends."""
    factory = DaemonFactory(tmp_path)
    try:
        yield factory
    finally:
        factory.stop_all()


@pytest.fixture
def node(daemons: DaemonFactory) -> Daemon:
    """One running daemon on a fresh data directory."""
    return daemons.make("node")
