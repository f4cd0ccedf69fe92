"""Which blocks a block completion looks for: the whole project's, or only those that
gossiped contributions name (`ostrom.node.blockplan.wanted_blocks`)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from ostrom.crypto.cid import CID
from ostrom.node.blockplan import BlockWants, wanted_blocks
from ostrom.node.store import Store
from ostrom.protocol.changesets import BlockRef, FileManifest, Put
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


def real_file(path: str, data: bytes) -> tuple[Put, dict[CID, bytes]]:
    """A put of `data` at `path` with a real manifest, and the blocks it takes."""
    raw = CID.of_raw(data)
    manifest = FileManifest(len(data), (BlockRef(raw, len(data)),)).encode()
    put = Put(path=path, file=CID.of_dag_cbor(manifest), size=len(data))
    return put, {put.file: manifest, raw: data}


def test_one_pass_finds_each_phase_blocks_as_the_previous_phase_stores_its_own(
    store: Store,
) -> None:
    world = World()
    genesis = world.genesis(ALICE)
    first = world.contribute(ALICE, genesis, [genesis], {"a.txt": "alpha"})
    b, b_blocks = real_file("b.txt", b"beta")
    c, c_blocks = real_file("c.txt", b"gamma")
    second = world.contribute(ALICE, genesis, [first], {"b.txt": b, "c.txt": c})
    store.put_records([genesis, first, second])
    held = {**b_blocks, **c_blocks}
    plan = BlockWants(genesis.cid, [second.cid])

    (changeset_cid,) = plan.wanted(store, "changesets")
    store.put_blocks([(changeset_cid, world.changeset(changeset_cid).encode())])
    manifests = plan.wanted(store, "manifests")
    assert manifests == sorted([b.file, c.file])
    store.put_blocks([(cid, held[cid]) for cid in manifests])
    files = plan.wanted(store, "files")
    assert files == sorted(set(held) - {b.file, c.file})
    assert files == wanted_blocks(store, genesis.cid, "files", [second.cid])
    store.put_blocks([(cid, held[cid]) for cid in files])
    assert plan.wanted(store, "files") == []
