"""Store calls made on the event loop (`NodeService.db_brief`, `db_read`): which calls.
(The guard that keeps a checkpoint off the event loop: tests/test_wal_checkpointer.py.)"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ostrom.crypto.cid import CID
from ostrom.node.blockcache import RecentBlocks
from ostrom.node.blockplan import BlockWants, merges_other_projects
from ostrom.node.replication import Replicator, _Completion
from ostrom.node.service import BRIEF_PUT_BYTES, BRIEF_READ_BYTES, BRIEF_READ_RECORDS, NodeService
from ostrom.node.store import Store
from tests.dagfactory import World, identity
from tests.test_blocks_serving import service  # noqa: F401 (the fixture)

ALICE = identity("alice")
PROJECT = CID.of_raw(b"a followed project")


def record_threads(monkeypatch: pytest.MonkeyPatch, cls: type, name: str) -> list[bool]:
    """From now on, whether each call of `cls.name` ran on the calling test's own thread."""
    here = threading.get_ident()
    seen: list[bool] = []
    original: Callable[..., Any] = getattr(cls, name)

    def recorded(self: object, *args: Any, **kwargs: Any) -> Any:
        seen.append(threading.get_ident() == here)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, name, recorded)
    return seen


async def test_gossip_and_small_fetches_and_uploads_are_stored_on_the_event_loop(
    service: NodeService,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    world = World()
    genesis = world.genesis(ALICE)
    first = world.contribute(ALICE, genesis, [genesis], {"a.txt": "first"})
    second = world.contribute(ALICE, genesis, [first], {"a.txt": "second"})
    rows = record_threads(monkeypatch, Store, "put_rows")
    await service.store_new([genesis], "gossip")
    await service.store_new([first], "sync")  # a sync's batches can be thousands of records
    await service.store_new([second], "local")  # the node's own: synced to disk at once
    assert rows == [True, False, False]

    blocks = record_threads(monkeypatch, type(service.store.blocks), "put")
    small = os.urandom(1000)
    large = os.urandom(BRIEF_PUT_BYTES + 1)
    await service.blocks_put([(CID.of_raw(small), small)], PROJECT)
    await service.blocks_put([(CID.of_raw(large), large)], PROJECT)
    assert blocks == [True, False]
    # The owner's uploads are written the same way (the contribution syncs them).
    upload, big_upload = os.urandom(500), os.urandom(BRIEF_PUT_BYTES + 1)
    await service.blocks_upload([(CID.of_raw(upload), upload)])
    await service.blocks_upload([(CID.of_raw(big_upload), big_upload)])
    assert blocks == [True, False, True, False]
    assert await service.blocks_get([CID.of_raw(small), CID.of_raw(large)]) == {
        CID.of_raw(small): small,
        CID.of_raw(large): large,
    }

    # A log near its checkpoint: the next brief call could be the one that copies it.
    monkeypatch.setattr(Store, "logs_have_room", lambda store: False)
    third = world.contribute(ALICE, genesis, [second], {"a.txt": "third"})
    await service.store_new([third], "gossip")
    assert rows[-1] is False
    assert len(service.store.project_records(genesis.cid)) == 4


async def test_a_peer_s_want_for_small_or_absent_blocks_is_answered_on_the_event_loop(
    service: NodeService,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    small = os.urandom(2000)
    large = os.urandom(BRIEF_READ_BYTES + 1)
    absent = CID.of_raw(b"a block this node has not fetched yet")
    blocks = [(CID.of_raw(small), small), (CID.of_raw(large), large)]
    await service.db(lambda store: store.put_blocks(blocks))
    monkeypatch.setattr(service, "_recent_blocks", RecentBlocks(max_bytes=0, max_block=0))
    reads = record_threads(monkeypatch, type(service.store.blocks), "get")
    lookups = record_threads(monkeypatch, type(service.store.blocks), "sizes")

    # Blocks this node lacks: answered from the index, without reading or a worker thread.
    assert await service.blocks_get([absent], "a peer") == {}
    assert (lookups, reads) == ([True], [])
    assert await service.blocks_get([absent, CID.of_raw(small)], "a peer") == {
        CID.of_raw(small): small
    }
    assert (lookups, reads) == ([True, True], [True])
    # Larger than a brief read: read (and checked) on the worker thread.
    got = await service.blocks_get([CID.of_raw(small), CID.of_raw(large), absent], "a peer")
    assert got == dict(blocks)
    assert lookups == [True, True, True]
    assert reads[1:] == [False, False]


async def test_a_sync_of_a_few_records_reads_them_on_the_event_loop(
    service: NodeService,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    world = World()
    genesis = world.genesis(ALICE)
    records = [genesis]
    for i in range(BRIEF_READ_RECORDS + 1):
        records.append(world.contribute(ALICE, genesis, [records[-1]], {"a.txt": f"v{i}"}))
    await service.db(lambda store: store.put_records(records))
    hosted = record_threads(monkeypatch, Store, "follow_mode")
    reads = record_threads(monkeypatch, Store, "get_record_bytes")

    assert await service.sync_index(genesis.cid) is not None
    few = [r.cid for r in records[1:4]]
    assert set(await service.sync_records(few)) == set(few)
    every = [r.cid for r in records[1:]]  # a catch-up's batch: the worker thread
    assert set(await service.sync_records(every)) == set(every)
    assert (hosted, reads) == ([True], [True, False])


async def test_a_gossiped_contribution_s_blocks_are_looked_for_on_the_event_loop(
    service: NodeService,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    world = World()
    genesis = world.genesis(ALICE)
    first = world.contribute(ALICE, genesis, [genesis], {"a.txt": "first"})

    def hold(store: Store) -> None:
        store.put_records([genesis, first])
        store.follow(genesis.cid, "full", 0)

    await service.db(hold)
    replicator = Replicator(service, object())  # type: ignore[arg-type]
    looked = record_threads(monkeypatch, BlockWants, "wanted")
    # No peer to fetch from: each pass ends at its first phase, the changeset missing.
    # The contributions gossip names (a scope) are looked at on the event loop, a walk of
    # the whole history on the worker thread.
    scope = {first.cid}
    assert await replicator._fetch_missing_blocks(genesis.cid, _Completion([], scope), scope)
    assert await replicator._fetch_missing_blocks(genesis.cid, _Completion([], None), None)
    assert looked == [True, False]


def test_only_a_record_naming_another_project_s_record_may_merge_private_work(
    tmp_path: Path,
) -> None:
    world = World()
    ours, theirs = world.genesis(ALICE), world.genesis(identity("bob"))
    first = world.contribute(ALICE, ours, [ours], {"a.txt": "ours"})
    other = world.contribute(identity("bob"), theirs, [theirs], {"b.txt": "theirs"})
    with Store.open(tmp_path / "store.db") as store:
        store.put_records([ours, theirs, first, other])
        assert not merges_other_projects(store, ours.cid, [first.cid])
        assert not merges_other_projects(store, ours.cid, [])
        assert merges_other_projects(store, ours.cid, [first.cid, other.cid])
