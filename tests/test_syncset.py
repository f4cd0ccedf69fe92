"""Sync sets (ostrom/protocol/syncset.py): what a project's sync reconciles, kept as records
arrive in any order, with the store's walk and the node service that keeps them."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ostrom.crypto.cid import CID
from ostrom.datadir import DataDir
from ostrom.node.service import NodeService
from ostrom.node.store import Store
from ostrom.protocol import syncset
from ostrom.protocol.reconcile import ReconcileIndex
from ostrom.protocol.records import SignedRecord
from ostrom.protocol.syncset import SyncSet
from tests.dagfactory import World, identity

ALICE, BOB = identity("alice"), identity("bob")


def _id(n: int) -> bytes:
    return CID.of_dag_cbor(hashlib.sha256(n.to_bytes(4, "big")).digest()).raw


class Replica:
    """A store reduced to parents by id, with `Store.reach` over it."""

    def __init__(self) -> None:
        self.parents: dict[bytes, bytes] = {}

    def reach(
        self, start: Iterable[bytes], inside: Callable[[bytes], bool]
    ) -> tuple[list[bytes], set[bytes]]:
        stack = [raw for raw in set(start) if not inside(raw)]
        seen, found, absent = set(stack), [], set()
        while stack:
            raw = stack.pop()
            if raw not in self.parents:
                absent.add(raw)
                continue
            found.append(raw)
            for parent in syncset.links(self.parents[raw]):
                if parent not in seen and not inside(parent):
                    seen.add(parent)
                    stack.append(parent)
        return found, absent


def _closure(seeds: Iterable[bytes], parents: dict[bytes, bytes]) -> set[bytes]:
    out: set[bytes] = set()
    stack = list(seeds)
    while stack:
        raw = stack.pop()
        if raw in out or raw not in parents:
            continue
        out.add(raw)
        stack.extend(syncset.links(parents[raw]))
    return out


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2**32), size=st.integers(1, 60), batches=st.integers(1, 8))
def test_a_set_grown_in_any_order_is_the_set_built_from_the_end_state(
    seed: int, size: int, batches: int
) -> None:
    # Records of three projects with parents anywhere earlier (merges across projects), a
    # few naming parents that never exist, arriving shuffled in batches; the set is built
    # after a random number of batches and grown with the rest.
    rng = random.Random(seed)
    ids = [_id(n) for n in range(size)]
    phantoms = [_id(10_000 + n) for n in range(3)]
    project = {raw: rng.choice("PFQ") for raw in ids}
    edges = {}
    for i, raw in enumerate(ids):
        pool = ids[:i] + (phantoms if rng.random() < 0.1 else [])
        edges[raw] = b"".join(sorted(rng.sample(pool, min(len(pool), rng.randint(0, 3)))))
    order = list(ids)
    rng.shuffle(order)
    cuts = sorted(rng.sample(range(1, size), min(batches - 1, size - 1))) if size > 1 else []
    parts = [order[a:b] for a, b in zip([0, *cuts], [*cuts, size], strict=True)]
    built_after = rng.randint(0, len(parts))

    replica = Replica()
    grown: SyncSet | None = None
    for n, part in enumerate(parts):
        if n == built_after:
            seeds = [(raw, replica.parents[raw]) for raw in replica.parents if project[raw] == "F"]
            grown = SyncSet.build(seeds, replica.reach)
        batch = {raw: edges[raw] for raw in part}
        replica.parents.update(batch)
        if grown is not None:
            lookup = grown.admit(batch, [raw for raw in part if project[raw] == "F"])
            if lookup:
                grown.extend(*replica.reach(lookup, grown.__contains__))
    final = SyncSet.build([(raw, edges[raw]) for raw in ids if project[raw] == "F"], replica.reach)
    expected = _closure((raw for raw in ids if project[raw] == "F"), edges)
    assert set(final.index) == expected
    assert final.absent == {p for raw in expected for p in syncset.links(edges[raw])} - set(ids)
    if grown is not None:
        assert set(grown.index) == expected
        assert grown.absent == final.absent


def test_the_parents_a_set_lacks_are_remembered_up_to_a_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(syncset, "MAX_ABSENT", 4)
    sync_set = SyncSet(ReconcileIndex())
    invented = sorted(_id(100 + n) for n in range(10))
    orphan = _id(1)
    lookup = sync_set.admit({orphan: b"".join(invented)}, [orphan])
    assert lookup == set(invented)
    sync_set.extend([], lookup)
    assert orphan in sync_set and len(sync_set.absent) == 4
    assert sync_set.overflowed  # to be built again before its next use
    built = SyncSet(ReconcileIndex.build([orphan]), invented)
    assert len(built.absent) == 4 and not built.overflowed


async def test_a_set_that_overflowed_is_built_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, fork, records = _fork_world()
    with Store.open(tmp_path / "a.sqlite") as store:
        service = NodeService(identity("node"), store, DataDir(tmp_path))
        await service.store_new([fork], "gossip")
        first = await service.sync_index(fork.cid)
        monkeypatch.setattr(syncset, "MAX_ABSENT", 1)
        # Stored child first, so the chain's missing parents pass the bound.
        rest = sorted((r for r in records if r.cid != fork.cid), key=lambda r: r.ts, reverse=True)
        for record in rest:
            await service.store_new([record], "sync")
        again = await service.sync_index(fork.cid)
        assert again is not first
        assert len(again) == 26


# --- the store's walk and the service's sets ------------------------------------------------------


def _fork_world() -> tuple[SignedRecord, SignedRecord, list[SignedRecord]]:
    """An upstream chain of 20 contributions, a fork at its head, fork work merging later
    upstream work (and upstream work after that), and an unrelated project."""
    world = World()
    up = world.genesis(ALICE, name="up")
    head = up
    for i in range(20):
        head = world.contribute(ALICE, up, [head], {"README": f"v{i}"})
    fork = world.fork(BOB, up, [head])
    later = world.contribute(ALICE, up, [head], {"README": "later"})
    mine = world.contribute(BOB, fork, [fork], {"FORK": "x"})
    world.contribute(BOB, fork, [mine, later], {"README": "merged"})
    world.validate(BOB, mine)
    world.contribute(ALICE, up, [later], {"README": "not merged"})
    other = world.genesis(BOB, name="other")
    world.contribute(BOB, other, [other], {"A": "a"})
    return up, fork, list(world.records.values())


def test_the_store_walk_stops_at_members_and_reports_what_it_lacks(tmp_path: Path) -> None:
    up, _, records = _fork_world()
    upstream = [r for r in records if r.project == up.cid and r.type == "contribution"]
    with Store.open(tmp_path / "store.sqlite") as store:
        store.put_records([r for r in records if r.cid != upstream[3].cid])
        stop = {upstream[10].cid.raw}
        found, absent = store.reach([upstream[15].cid.raw], stop.__contains__)
        assert set(found) == {r.cid.raw for r in upstream[11:16]}
        assert absent == set()
        found, absent = store.reach([upstream[6].cid.raw], stop.__contains__)
        assert set(found) == {r.cid.raw for r in upstream[4:7]}
        assert absent == {upstream[3].cid.raw}


async def test_the_service_keeps_a_forks_set_whole_whatever_the_order_records_come_in(
    tmp_path: Path,
) -> None:
    _, fork, records = _fork_world()
    with Store.open(tmp_path / "a.sqlite") as store:
        service = NodeService(identity("node"), store, DataDir(tmp_path))
        await service.store_new([fork], "gossip")  # the genesis first, without its history
        index = await service.sync_index(fork.cid)
        assert index is not None and set(index) == {fork.cid.raw}
        rest = [r for r in records if r.cid != fork.cid]
        random.Random(7).shuffle(rest)
        for start in range(0, len(rest), 5):
            await service.store_new(rest[start : start + 5], "sync")
        with Store.open(tmp_path / "b.sqlite") as fresh:
            fresh.put_records(records)
            history = fresh.project_history(fork.cid)
        # The fork's four records and the 22 upstream records they reach; not the upstream
        # work after the merge, nor the other project.
        assert set(index) == {cid.raw for cid in history}
        assert len(index) == 26
