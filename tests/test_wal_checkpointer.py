"""Checkpoints of a log: the guard that keeps them out of brief commits
(`WalDurability.has_room`), and the log copied into the database off the writer's commits
(`WalDurability.checkpoint`, `Store.checkpoint_log`, `NodeService.serve_checkpoints`)."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import threading
from contextlib import closing
from pathlib import Path

import pytest
import trio

from ostrom.node import service as service_module
from ostrom.node.service import NodeService
from ostrom.node.store import WAL_KEEP_BYTES, Store
from ostrom.node.walsync import WalDurability
from tests.dagfactory import World, identity
from tests.test_blocks_serving import service  # noqa: F401 (the fixture)

ALICE = identity("alice")


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _log_file(tmp_path: Path, checkpoint_pages: int) -> tuple[Path, sqlite3.Connection]:
    """A file in WAL mode with 4 KiB pages, whose commits checkpoint at `checkpoint_pages`."""
    path = tmp_path / "log.sqlite"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA page_size = 4096")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute(f"PRAGMA wal_autocheckpoint = {checkpoint_pages}")
    conn.execute("PRAGMA journal_size_limit = 16384")  # a restarted log's file is cut to this
    conn.execute("CREATE TABLE t (v BLOB)")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return path, conn


def test_the_checkpointer_copies_the_log_while_the_writer_commits_and_no_commit_copies_it(
    tmp_path: Path,
) -> None:
    path, conn = _log_file(tmp_path, 100)  # 100 pages: about 400 KiB of log
    wal = WalDurability(conn, path)
    copies = restarts = 0
    for _ in range(150):
        if wal.checkpoint_due(64 * 1024):
            # The copy runs on another thread while the writer goes on committing.
            copied: list[bool] = []

            def copy(into: list[bool] = copied) -> None:
                into.append(wal.checkpoint())

            thread = threading.Thread(target=copy)
            thread.start()
            for _ in range(3):
                conn.execute("INSERT INTO t VALUES (?)", (os.urandom(3000),))
            thread.join(timeout=30)
            assert copied, "the checkpoint did not end"
            # The next poll's checkpoint: it copies what came after the last round, or
            # while the connection was open (then the log could not start again).
            assert wal.checkpoint()
            copies += 1
        before = _digest(path)
        conn.execute("INSERT INTO t VALUES (?)", (os.urandom(3000),))
        # The database file changes only when a checkpoint copies the log into it: never
        # in a commit, which finds the log well short of its own threshold.
        assert _digest(path) == before
        size = os.stat(f"{path}-wal").st_size
        assert size < 100 * 4120
        restarts += size <= 16384 + 4120  # cut back, then one frame written
    assert copies >= 3
    assert restarts >= copies  # each time, the log started again from its beginning
    wal.close()
    assert not wal.checkpoint()  # closed: nothing more
    rows = conn.execute("SELECT count(*) FROM t").fetchone()[0]
    conn.close()
    assert not Path(f"{path}-wal").exists()  # the last connection closed copied the rest
    with closing(sqlite3.connect(path)) as reopened:
        assert reopened.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert reopened.execute("SELECT count(*) FROM t").fetchone()[0] == rows == 150 + 3 * copies


def test_a_store_s_log_copied_by_its_checkpointer_restarts_and_keeps_every_record(
    tmp_path: Path,
) -> None:
    world = World()
    genesis = world.genesis(ALICE)
    records = [genesis]
    for i in range(40):
        records.append(world.contribute(ALICE, genesis, [records[-1]], {"a.txt": f"v{i}"}))
    path = tmp_path / "store.sqlite"
    with Store.open(path) as store:
        store.put_records(records[:30])
        wal = Path(f"{path}-wal")
        assert wal.stat().st_size > 0
        assert store.checkpoint_log()
        store.put_records(records[30:])  # the log starts again from its beginning
        assert wal.stat().st_size <= WAL_KEEP_BYTES
        assert len(store.project_records(genesis.cid)) == len(records)
    assert not Path(f"{path}-wal").exists()
    with Store.open(path) as store:
        assert len(store.project_records(genesis.cid)) == len(records)


async def test_the_node_checkpoints_a_due_log_on_a_worker_thread_without_the_store_lock(
    service: NodeService,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(service_module, "CHECKPOINT_POLL_S", 0.01)
    due = [False, True]
    here = threading.get_ident()
    ran: list[tuple[bool, bool]] = []  # (on the event loop's thread, store lock held)
    copied = trio.Event()
    token = trio.lowlevel.current_trio_token()

    def checkpoint_log(store: Store) -> bool:
        ran.append((threading.get_ident() == here, service._lock.locked()))
        token.run_sync_soon(copied.set)
        return True

    monkeypatch.setattr(Store, "log_checkpoint_due", lambda store: due.pop(0) if due else False)
    monkeypatch.setattr(Store, "checkpoint_log", checkpoint_log)
    async with trio.open_nursery() as nursery:
        await nursery.start(service.serve_checkpoints)
        with trio.fail_after(10):
            await copied.wait()
        nursery.cancel_scope.cancel()
    assert ran == [(False, False)]


def test_a_commit_the_log_has_room_for_never_checkpoints_and_a_restarted_log_has_room_again(
    tmp_path: Path,
) -> None:
    path, conn = _log_file(tmp_path, 40)  # 40 pages: about 160 KiB of log
    durability = WalDurability(conn, path)
    room = 3 * 4120  # each commit below writes one data page and a page of the table's tree
    had_room: list[bool] = []
    checkpointed: list[bool] = []
    for _ in range(120):
        had_room.append(durability.has_room(room))
        before = _digest(path)
        conn.execute("INSERT INTO t VALUES (?)", (os.urandom(3000),))
        # The database file changes only when a checkpoint copies the log into it.
        checkpointed.append(_digest(path) != before)
    conn.close()
    assert any(checkpointed), "the log never reached its checkpoint"
    assert not any(room and copied for room, copied in zip(had_room, checkpointed, strict=True))
    # After each checkpoint the log restarts in a file cut back to 16 KiB: room again.
    first_copy = checkpointed.index(True)
    assert had_room[first_copy + 2]
    assert had_room.count(False) < len(had_room) // 2
