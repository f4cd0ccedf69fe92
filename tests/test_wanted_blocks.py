"""Which blocks a block completion looks for: the whole project's, or only those that
gossiped contributions name (`ostrom.node.blockplan.wanted_blocks`)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

from ostrom.crypto.cid import CID
from ostrom.node.blockplan import BlockWants, wanted_blocks
from ostrom.node.store import Store
from ostrom.protocol.changesets import BlockRef, FileManifest, Put
from ostrom.protocol.records import SignedRecord
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


def stored_project(store: Store, puts: dict[str, Put]) -> tuple[World, SignedRecord, SignedRecord]:
    """A project of three records in `store`: its genesis, a first contribution, and a
    second that makes `puts`; returns the world that made them, the genesis and the second."""
    world = World()
    genesis = world.genesis(ALICE)
    first = world.contribute(ALICE, genesis, [genesis], {"a.txt": "alpha"})
    second = world.contribute(ALICE, genesis, [first], dict(puts))
    store.put_records([genesis, first, second])
    return world, genesis, second


def test_one_pass_finds_each_phase_blocks_as_the_previous_phase_stores_its_own(
    store: Store,
) -> None:
    b, b_blocks = real_file("b.txt", b"beta")
    c, c_blocks = real_file("c.txt", b"gamma")
    world, genesis, second = stored_project(store, {"b.txt": b, "c.txt": c})
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


def test_a_brief_search_answers_as_the_full_one_or_declines_past_its_budget(
    store: Store,
) -> None:
    b, b_blocks = real_file("b.txt", b"beta")
    world, genesis, second = stored_project(store, {"b.txt": b})
    (changeset_cid,) = second.body.changes  # type: ignore[union-attr]
    changeset = world.changeset(changeset_cid).encode()
    manifest = b_blocks[b.file]
    record = len(second.data)
    assert store.records_size([second.cid, CID.of_raw(b"not here")]) == record

    def plan() -> BlockWants:
        return BlockWants(genesis.cid, [second.cid])

    # Within the budget: the full search's answer, phase by phase, as the blocks arrive.
    roomy, full = plan(), plan()
    assert roomy.wanted_briefly(store, "changesets", 1 << 20) == [changeset_cid]
    assert full.wanted(store, "changesets") == [changeset_cid]
    store.put_blocks([(changeset_cid, changeset)])
    assert roomy.wanted_briefly(store, "manifests", 1 << 20) == full.wanted(store, "manifests")
    store.put_blocks([(b.file, manifest)])
    files = roomy.wanted_briefly(store, "files", 1 << 20)
    assert files == full.wanted(store, "files") == [CID.of_raw(b"beta")]

    # What a call reads counts in all: the records, the changesets that name manifests,
    # the manifests that name file blocks. One byte over declines.
    assert plan().wanted_briefly(store, "changesets", record - 1) is None
    assert plan().wanted_briefly(store, "manifests", record + len(changeset) - 1) is None
    over = record + len(changeset) + len(manifest) - 1
    declined = plan()
    assert declined.wanted_briefly(store, "files", over) is None
    assert plan().wanted_briefly(store, "files", over + 1) == files
    # Declining leaves the plan usable by the full search.
    assert declined.wanted(store, "files") == files
    # Without a scope it is a walk of the history: never brief.
    assert BlockWants(genesis.cid, None).wanted_briefly(store, "changesets", 1 << 20) is None


def test_changesets_known_from_gossip_are_not_read_back_from_the_store(store: Store) -> None:
    b, b_blocks = real_file("b.txt", b"beta")
    world, genesis, second = stored_project(store, {"b.txt": b})
    (first,) = second.parents
    first_record = store.get_record(first)
    assert first_record is not None
    first_changesets = first_record.body.changes  # type: ignore[union-attr]
    (changeset_cid,) = second.body.changes  # type: ignore[union-attr]
    read: list[CID] = []
    get_records = store.get_records

    def counted(cids: Iterable[CID]) -> dict[CID, SignedRecord]:
        cids = list(cids)
        read.extend(cids)
        return get_records(cids)

    store.get_records = counted  # type: ignore[method-assign]
    known = {second.cid: second.body.changes}  # type: ignore[union-attr]
    plan = BlockWants(genesis.cid, [first, second.cid], known)
    # The same answer as a search that reads both records, reading only the other one;
    # and nothing of it counts against a brief search's budget.
    assert plan.wanted(store, "changesets") == sorted([changeset_cid, *first_changesets])
    assert read == [first]
    read.clear()
    alone = BlockWants(genesis.cid, [second.cid], known)
    assert alone.wanted_briefly(store, "changesets", 0) == [changeset_cid]
    assert read == []
    store.put_blocks([(changeset_cid, world.changeset(changeset_cid).encode())])
    assert alone.wanted(store, "manifests") == [b.file]
    store.put_blocks([(b.file, b_blocks[b.file])])
    assert alone.wanted(store, "files") == [CID.of_raw(b"beta")]
    assert read == []
