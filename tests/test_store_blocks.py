"""The block file: blocks kept for what they were stored for, evicted least recently used
first under the storage limit, and refused past a project's limit."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from ostrom.crypto.cid import CID
from ostrom.errors import BlockMismatch, QuotaExceeded
from ostrom.node.blockdb import OWN, BlockDB, Quota
from ostrom.node.store import Store

KIB = 1024
P1 = CID.of_raw(b"project one").raw
P2 = CID.of_raw(b"project two").raw


def blk(n: int = 0, size: int = 10 * KIB) -> tuple[CID, bytes]:
    data = n.to_bytes(4, "big") + os.urandom(size - 4)
    return CID.of_raw(data), data


@pytest.fixture
def db(tmp_path: Path) -> Iterator[BlockDB]:
    d = BlockDB.open(tmp_path / "blocks.sqlite")
    try:
        yield d
    finally:
        d.close()


def held(db: BlockDB, blocks: list[tuple[CID, bytes]]) -> list[bool]:
    present = db.has(cid for cid, _ in blocks)
    return [cid in present for cid, _ in blocks]


def test_blocks_fetched_on_demand_are_evicted_least_recently_used_first(db: BlockDB) -> None:
    on_demand = [blk(i) for i in range(4)]
    for b in on_demand:
        db.put([b], project=P1, pinned=False)
    # Reading the first for the owner (a checkout) makes it the most recently used.
    assert db.get(on_demand[0][0], touch=True) == on_demand[0][1]
    quota = Quota(storage=40 * KIB)
    result = db.put([blk(9)], project=P2, pinned=False, quota=quota)
    assert (result.new, result.evicted, result.evicted_bytes) == (1, 1, 10 * KIB)
    assert held(db, on_demand) == [True, False, True, True]
    db.put([blk(10), blk(11)], project=P2, pinned=False, quota=quota)
    assert held(db, on_demand) == [True, False, False, False]
    assert db.usage()[1] == 40 * KIB


def test_pinned_and_own_blocks_are_never_evicted_and_a_batch_that_cannot_fit_is_refused(
    db: BlockDB,
) -> None:
    followed, own, on_demand = blk(1), blk(2), blk(3)
    db.put([followed], project=P1, pinned=True)
    db.put([own])
    db.put([on_demand], project=P2, pinned=False)
    quota = Quota(storage=35 * KIB)
    with pytest.raises(QuotaExceeded, match="storage limit") as refused:
        db.put([blk(4), blk(5)], project=P2, pinned=False, quota=quota)
    assert refused.value.limit == "storage"
    # Refused whole, and nothing was evicted for it.
    assert held(db, [followed, own, on_demand]) == [True, True, True]
    assert (*db.usage(), db.evictable_bytes()) == (3, 30 * KIB, 10 * KIB)
    db.put([blk(4)], project=P2, pinned=False, quota=quota)
    assert held(db, [followed, own, on_demand]) == [True, True, False]


def test_a_fetch_does_not_evict_its_own_blocks(db: BlockDB) -> None:
    older = blk(1)
    db.put([older], project=P1, pinned=False)
    since = db.tick + 1
    first = blk(2)
    quota = Quota(storage=25 * KIB, protect_from=since)
    db.put([first], project=P1, pinned=False, quota=quota)
    db.put([blk(3)], project=P1, pinned=False, quota=quota)  # evicts `older`, not `first`
    assert held(db, [older, first]) == [False, True]
    with pytest.raises(QuotaExceeded):
        db.put([blk(4)], project=P1, pinned=False, quota=quota)


def test_a_block_a_follow_needs_becomes_pinned_and_unfollowing_unpins_it(db: BlockDB) -> None:
    b = blk(1)
    db.put([b], project=P1, pinned=False)
    assert db.evictable_bytes() == 10 * KIB
    assert db.claim(P1, [b[0], blk(2)[0]]) == 1  # the stored one is kept now
    assert db.evictable_bytes() == 0
    assert db.claim(P1, [b[0]]) == 0
    db.claim(P2, [b[0]])
    db.unpin_project(P1)
    assert db.evictable_bytes() == 0  # still kept for P2
    db.unpin_project(P2)
    assert db.evictable_bytes() == 10 * KIB
    # Nothing keeps it now: it makes room for a block a full follow keeps.
    assert db.put([blk(3)], project=P2, pinned=True, quota=Quota(storage=10 * KIB)).evicted == 1
    assert held(db, [b]) == [False]
    assert db.claim(P1, [blk(4)[0]]) == 0


def test_a_claim_that_a_completion_would_make_again_waits_for_the_next_sync(
    db: BlockDB,
) -> None:
    b = blk(1)
    db.put([b], project=P1, pinned=False)
    db.sync()
    assert db.claim(P1, [b[0]], durable=False) == 1
    assert db.unsynced  # committed, on disk at the block file's next sync
    assert db.evictable_bytes() == 0
    db.sync()
    assert not db.unsynced
    assert db.claim(P2, [b[0]]) == 1
    assert not db.unsynced  # a claim is synced at its commit unless told otherwise


def test_the_project_limit_counts_each_project_s_blocks_shared_ones_included(db: BlockDB) -> None:
    shared = blk(1)
    quota = Quota(project_storage=25 * KIB)
    db.put([shared, blk(2)], project=P1, pinned=True, quota=quota)
    with pytest.raises(QuotaExceeded, match="per-project") as refused:
        db.put([blk(3)], project=P1, pinned=True, quota=quota)
    assert refused.value.limit == "project_storage"
    # The shared block counts for P2 too once P2 stores it, though the store holds it once.
    db.put([shared, blk(4)], project=P2, pinned=True, quota=quota)
    assert (db.project_bytes(P1), db.project_bytes(P2)) == (20 * KIB, 20 * KIB)
    assert db.usage()[1] == 30 * KIB
    # Storing again what a project already holds adds nothing to it.
    assert db.put([shared], project=P2, pinned=True, quota=quota).new == 0
    # This node's own work is not held to the per-project limit.
    assert db.put([blk(5)], project=OWN, quota=quota).new == 1


def test_a_bad_block_refuses_the_batch_before_any_eviction(db: BlockDB) -> None:
    victim = blk(1)
    db.put([victim], project=P1, pinned=False)
    good = blk(2)
    with pytest.raises(BlockMismatch):
        db.put([good, (good[0], b"lies")], project=P2, quota=Quota(storage=10 * KIB))
    assert held(db, [victim, good]) == [True, False]


def test_eviction_order_and_pins_survive_reopening(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    a, b, c = blk(1), blk(2), blk(3)
    with Store.open(path) as store:
        for x in (a, b, c):
            store.blocks.put([x], project=P1, pinned=False)
        store.get_block(a[0], touch=True)  # written at close
        store.put_blocks([blk(4)])  # own
    with Store.open(path) as store:
        result = store.blocks.put([blk(5)], project=P1, pinned=False, quota=Quota(storage=40 * KIB))
        assert result.evicted == 1
        assert store.has_blocks([a[0], b[0], c[0]]) == {a[0], c[0]}
        assert store.stats().blocks == 4


def test_a_batch_is_one_transaction_that_a_failure_rolls_back_whole(tmp_path: Path) -> None:
    with Store.open(tmp_path / "store.sqlite") as store:
        kept = [(CID.of_raw(b"kept %d" % i), b"kept %d" % i) for i in range(3)]
        with store.blocks.batch():
            store.put_blocks(kept[:2])
            store.blocks.claim(b"project", [cid for cid, _ in kept[:2]])
        assert not store.blocks.unsynced
        held = store.blocks.usage()
        lost = [(CID.of_raw(b"lost"), b"lost")]
        with pytest.raises(ZeroDivisionError), store.blocks.batch():
            store.put_blocks(lost)
            store.blocks.claim(b"project", [lost[0][0]])
            _ = 1 / 0  # a failure after the batch's writes
        assert not store.has_blocks([lost[0][0]])
        assert store.blocks.usage() == held
        assert store.blocks.projects_of([kept[0][0]])[kept[0][0]] >= {b"project"}
