"""When what peers sent reaches the disk: a large fetch's blocks at its end, a small one's
(a gossiped contribution's few blocks) and gossiped or synced records within seconds, shared
with the writes around them; the node's own records at once."""

from __future__ import annotations

import os
import time

import trio
import trio.testing

from ostrom.crypto.cid import CID
from ostrom.node.service import (
    BLOCK_SYNC_NOW_BYTES,
    BLOCK_WRITEBACK_BYTES,
    SYNC_DELAY_S,
    BlockSink,
    NodeService,
)
from tests.dagfactory import World, identity
from tests.test_blocks_serving import contribute_file, genesis

PROJECT = CID.of_raw(b"a followed project")
ALICE = identity("alice")


def blk(size: int) -> tuple[CID, bytes]:
    data = os.urandom(size)
    return CID.of_raw(data), data


async def test_without_the_sync_task_every_fetch_end_syncs(service: NodeService) -> None:
    sink = service.block_sink(PROJECT)
    await sink.blocks_put([blk(1024)])
    assert service.store.blocks.unsynced
    await sink.blocks_sync(1024)
    assert not service.store.blocks.unsynced


async def wait_synced(service: NodeService) -> None:
    """Until the sync task's thread has synced both files, 5 s at most."""
    for _ in range(500):
        if not (service.store.unsynced or service.store.blocks.unsynced):
            return
        await trio.to_thread.run_sync(time.sleep, 0.01)


async def synced_at_the_delay_not_before(
    service: NodeService, mock_clock: trio.testing.MockClock
) -> None:
    """The blocks stored so far are still unsynced a second before `SYNC_DELAY_S` from now,
    and synced at it."""
    await trio.testing.wait_all_tasks_blocked()
    mock_clock.jump(SYNC_DELAY_S - 1)
    await trio.testing.wait_all_tasks_blocked()
    assert service.store.blocks.unsynced
    mock_clock.jump(1)
    await wait_synced(service)
    assert not service.store.blocks.unsynced


async def syncing(service: NodeService, nursery: trio.Nursery) -> BlockSink:
    """A fetch's sink on a node whose service syncs small fetches in the background."""
    await nursery.start(service.serve_syncs)
    return service.block_sink(PROJECT)


async def test_small_fetches_share_a_sync_within_the_delay(
    service: NodeService, nursery: trio.Nursery, mock_clock: trio.testing.MockClock
) -> None:
    sink = await syncing(service, nursery)
    for _ in range(3):
        await sink.blocks_put([blk(4096)])
        await sink.blocks_sync(4096)
        assert service.store.blocks.unsynced  # left to the sync task
    await synced_at_the_delay_not_before(service, mock_clock)


async def test_a_large_fetch_is_synced_when_it_ends(
    service: NodeService, nursery: trio.Nursery
) -> None:
    sink = await syncing(service, nursery)
    size = 256 * 1024
    await sink.blocks_put([blk(size) for _ in range(BLOCK_SYNC_NOW_BYTES // size)])
    await sink.blocks_sync(BLOCK_SYNC_NOW_BYTES)
    assert not service.store.blocks.unsynced


async def test_a_slow_large_fetch_is_synced_when_it_ends_though_syncs_came_between(
    service: NodeService, nursery: trio.Nursery, mock_clock: trio.testing.MockClock
) -> None:
    sink = await syncing(service, nursery)
    size = 256 * 1024
    await sink.blocks_put([blk(size) for _ in range(BLOCK_SYNC_NOW_BYTES // size)])
    await synced_at_the_delay_not_before(service, mock_clock)  # synced as it went
    await sink.blocks_put([blk(1024)])  # its last block, a few seconds later
    await sink.blocks_sync(BLOCK_SYNC_NOW_BYTES + 1024)
    assert not service.store.blocks.unsynced  # on disk when the fetch reports it is done


async def test_a_large_fetch_is_synced_as_it_goes_not_only_at_its_end(
    service: NodeService, nursery: trio.Nursery
) -> None:
    sink = await syncing(service, nursery)
    size = 256 * 1024
    batch = 16  # a fetch's storing batch
    for _ in range(BLOCK_WRITEBACK_BYTES // (batch * size) - 1):
        await sink.blocks_put([blk(size) for _ in range(batch)])
    await trio.testing.wait_all_tasks_blocked()
    assert service.store.blocks.unsynced  # not yet BLOCK_WRITEBACK_BYTES
    await sink.blocks_put([blk(size) for _ in range(batch)])
    # The fetch has not ended (no blocks_sync), and what it stored is on disk all the same.
    await wait_synced(service)
    assert not service.store.blocks.unsynced


async def test_a_slow_fetch_is_synced_within_the_delay_before_it_ends(
    service: NodeService, nursery: trio.Nursery, mock_clock: trio.testing.MockClock
) -> None:
    sink = await syncing(service, nursery)
    await sink.blocks_put([blk(64 * 1024)])  # far from BLOCK_WRITEBACK_BYTES; no blocks_sync
    await synced_at_the_delay_not_before(service, mock_clock)


async def test_records_from_peers_are_synced_at_once_without_the_sync_task(
    service: NodeService,
) -> None:
    world = World()
    genesis = world.genesis(ALICE)
    assert await service.store_new([genesis], "gossip") == [genesis.cid]
    assert not service.store.unsynced


async def test_gossiped_records_share_a_sync_and_the_nodes_own_are_synced_at_once(
    service: NodeService, nursery: trio.Nursery, mock_clock: trio.testing.MockClock
) -> None:
    await nursery.start(service.serve_syncs)
    world = World()
    genesis = world.genesis(ALICE)
    first = world.contribute(ALICE, genesis, [genesis], {"a.txt": "first"})
    await service.store_new([genesis], "gossip")
    await service.store_new([first], "sync")
    assert service.store.unsynced  # left to the sync task
    await trio.testing.wait_all_tasks_blocked()
    mock_clock.jump(SYNC_DELAY_S)
    await wait_synced(service)
    assert not service.store.unsynced

    second = world.contribute(ALICE, genesis, [first], {"a.txt": "second"})
    await service.store_new([second], "gossip")
    assert service.store.unsynced
    # A record of the node's own is on disk when it is stored, and so is what came before.
    mine = world.contribute(ALICE, genesis, [second], {"a.txt": "mine"})
    await service.store_new([mine], "local")
    assert not service.store.unsynced
    assert len(service.store.project_records(genesis.cid)) == 4


async def test_uploads_wait_for_the_contribution_that_names_them_or_the_sync_task(
    service: NodeService, nursery: trio.Nursery, mock_clock: trio.testing.MockClock
) -> None:
    await nursery.start(service.serve_syncs)
    project = genesis("pages", None)
    await service.db(lambda store: store.put_records([project]))
    await service.blocks_upload([blk(100)])
    assert service.store.blocks.unsynced  # an upload waits for what follows it
    await contribute_file(service, project, "a page")  # uploads its blocks, then names them
    assert not service.store.blocks.unsynced  # the contribution's commit synced them all

    await service.blocks_upload([blk(100)])  # an upload nothing names
    assert service.store.blocks.unsynced
    mock_clock.jump(SYNC_DELAY_S)
    await wait_synced(service)
    assert not service.store.blocks.unsynced
