"""When the blocks a fetch stored reach the disk: a large fetch's at its end, a small one's
(a gossiped contribution's few blocks) within seconds, shared with the fetches around it."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

from ostrom.crypto.cid import CID
from ostrom.crypto.keys import Identity
from ostrom.datadir import DataDir
from ostrom.node.service import BLOCK_SYNC_DELAY_S, BLOCK_SYNC_NOW_BYTES, NodeService
from ostrom.node.store import Store

ME = Identity.from_seed(bytes([7]) * 32)
PROJECT = CID.of_raw(b"a followed project")


@pytest.fixture
def service(tmp_path: Path) -> Iterator[NodeService]:
    store = Store.open(tmp_path / "store.sqlite")
    try:
        yield NodeService(ME, store, DataDir(tmp_path))
    finally:
        store.close()


def blk(size: int) -> tuple[CID, bytes]:
    data = os.urandom(size)
    return CID.of_raw(data), data


async def test_without_the_sync_task_every_fetch_end_syncs(service: NodeService) -> None:
    sink = service.block_sink(PROJECT)
    await sink.blocks_put([blk(1024)])
    assert service.store.blocks.unsynced
    await sink.blocks_sync()
    assert not service.store.blocks.unsynced


async def test_small_fetches_share_a_sync_within_the_delay(
    service: NodeService, mock_clock: trio.testing.MockClock
) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(service.serve_block_syncs)
        sink = service.block_sink(PROJECT)
        for _ in range(3):
            await sink.blocks_put([blk(4096)])
            await sink.blocks_sync()
            assert service.store.blocks.unsynced  # left to the sync task
        await trio.testing.wait_all_tasks_blocked()
        mock_clock.jump(BLOCK_SYNC_DELAY_S - 1)
        await trio.testing.wait_all_tasks_blocked()
        assert service.store.blocks.unsynced
        mock_clock.jump(1)
        for _ in range(500):  # the sync runs on a thread: wait for it, 5 s at most
            if not service.store.blocks.unsynced:
                break
            await trio.to_thread.run_sync(time.sleep, 0.01)
        assert not service.store.blocks.unsynced
        nursery.cancel_scope.cancel()


async def test_a_large_fetch_is_synced_when_it_ends(
    service: NodeService, autojump_clock: trio.testing.MockClock
) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(service.serve_block_syncs)
        sink = service.block_sink(PROJECT)
        size = 256 * 1024
        await sink.blocks_put([blk(size) for _ in range(BLOCK_SYNC_NOW_BYTES // size)])
        await sink.blocks_sync()
        assert not service.store.blocks.unsynced
        nursery.cancel_scope.cancel()
