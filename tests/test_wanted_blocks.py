"""Which blocks a block completion looks for: the whole project's, or only those that
gossiped contributions name (`ostrom.node.replication.wanted_blocks`)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from ostrom.crypto.cid import CID
from ostrom.node.replication import wanted_blocks
from ostrom.node.store import Store
from tests.dagfactory import World, identity

ALICE = identity("alice")


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store.open(tmp_path / "store.sqlite") as opened:
        yield opened


def test_a_scope_limits_the_search_to_the_blocks_its_records_name(store: Store) -> None:
    world = World()
    genesis = world.genesis(ALICE)
    old = world.contribute(ALICE, genesis, [genesis], {"a.txt": "old"})
    new = world.contribute(ALICE, genesis, [old], {"b.txt": "new"})
    store.put_records([genesis, old, new])
    project = genesis.cid
    (old_changeset,) = old.body.changes  # type: ignore[union-attr]
    (new_changeset,) = new.body.changes  # type: ignore[union-attr]

    everything = wanted_blocks(store, project, "changesets")
    assert everything == sorted([old_changeset, new_changeset])
    assert wanted_blocks(store, project, "changesets", [new.cid]) == [new_changeset]
    # Records without blocks, or not stored, name nothing to fetch.
    assert wanted_blocks(store, project, "changesets", [genesis.cid]) == []
    assert wanted_blocks(store, project, "changesets", [CID.of_raw(b"unknown")]) == []


def test_a_scoped_search_follows_its_changesets_to_their_files(store: Store) -> None:
    world = World()
    genesis = world.genesis(ALICE)
    first = world.contribute(ALICE, genesis, [genesis], {"a.txt": "alpha"})
    second = world.contribute(ALICE, genesis, [first], {"b.txt": "beta"})
    store.put_records([genesis, first, second])
    for record in (first, second):
        for link in record.body.changes:  # type: ignore[union-attr]
            store.put_blocks([(link, world.changeset(link).encode())])
    manifests = wanted_blocks(store, genesis.cid, "manifests", [second.cid])
    (change,) = world.changeset(second.body.changes[0]).changes  # type: ignore[union-attr]
    assert manifests == [change.file]  # type: ignore[union-attr]
    assert len(wanted_blocks(store, genesis.cid, "manifests")) == 2
