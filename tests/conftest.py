"""Shared fixtures: real daemons for end-to-end tests, and a node service on a fresh store."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from ostrom.crypto.keys import Identity
from ostrom.datadir import DataDir
from ostrom.node.service import NodeService
from ostrom.node.store import Store
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


@pytest.fixture
def service(tmp_path: Path) -> Iterator[NodeService]:
    """A node's service on a fresh store, without a mesh (a test module may define its own,
    for a node of another identity)."""
    with Store.open(tmp_path / "store.sqlite") as store:
        yield NodeService(Identity.from_seed(bytes([5]) * 32), store, DataDir(tmp_path))
