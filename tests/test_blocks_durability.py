"""Fetched blocks are committed without a disk sync; the node's own blocks are synced at once.

A power loss cannot be caused in a test, so its outcome is built by hand: what the disk is
guaranteed to hold (the block file as of the last sync) plus any part of what was written
after it (the write-ahead log cut or torn at arbitrary points). Whatever that leaves, the file
opens, passes SQLite's integrity check, and still holds every block of the node's own; a
fetched block is either there, intact, or missing (and then fetched again).
"""

from __future__ import annotations

import os
import shutil
import sqlite3
from pathlib import Path

import pytest

from ostrom.crypto.cid import CID
from ostrom.node import blockdb
from ostrom.node.blockdb import BlockDB
from tests.daemons import DaemonFactory, wait_for

KIB = 1024
MIB = 1024 * KIB
PROJECT = CID.of_raw(b"a followed project").raw


# Below `PACK_MIN_BYTES`: these blocks are rows of the file, so what a power loss leaves of
# them is what it leaves of the log (tests/test_blockpack.py has the packs' side).
ROW_BLOCK = 48 * KIB


def blk(n: int, size: int = ROW_BLOCK) -> tuple[CID, bytes]:
    data = n.to_bytes(4, "big") + os.urandom(size - 4)
    return CID.of_raw(data), data


def test_fetched_blocks_wait_for_a_sync_and_an_own_write_syncs_them_too(tmp_path: Path) -> None:
    db = BlockDB.open(tmp_path / "blocks.sqlite")
    try:
        assert not db.unsynced
        db.put([blk(1)], project=PROJECT, durable=False)
        assert db.unsynced
        db.sync()
        assert not db.unsynced
        db.put([blk(2)], project=PROJECT, durable=False)
        db.put([blk(3)])  # the node's own: its commit syncs the log, and all before it
        assert not db.unsynced
    finally:
        db.close()


def _files(path: Path) -> list[Path]:
    return [path, Path(f"{path}-wal")]


def _snapshot(path: Path, to: Path) -> None:
    """Copy what the operating system holds of the block file (as a disk might keep it)."""
    to.mkdir()
    for f in _files(path):
        if f.exists():
            shutil.copyfile(f, to / f.name)


def _log_bytes(wal: bytes) -> int:
    """How many leading bytes of a log file are its current frames: a log restarted after a
    checkpoint keeps older frames past them, which carry the previous salt."""
    page_size = int.from_bytes(wal[8:12], "big")
    end = 32
    while wal[end + 8 : end + 16] == wal[16:24]:
        end += 24 + page_size
    return end


# Where the log on disk ends after the power loss, as a fraction of what was written after
# the last sync: nothing of it, up to the middle of a frame, all but its last byte, all of it.
CUTS = {"none": 0.0, "mid-frame": 0.5, "one byte short": -1.0, "whole": 1.0}


@pytest.mark.parametrize("cut", CUTS.values(), ids=CUTS.keys())
def test_a_power_loss_after_unsynced_fetches_leaves_own_blocks_and_no_damage(
    tmp_path: Path, cut: float
) -> None:
    path = tmp_path / "live" / "blocks.sqlite"
    path.parent.mkdir()
    db = BlockDB.open(path)
    own = [blk(i) for i in range(4)]
    early = [blk(10 + i) for i in range(4)]
    late = [blk(20 + i) for i in range(12)]
    try:
        db.put(own[:2])
        db.put(early, project=PROJECT, durable=False)
        db.sync()
        db.put(own[2:])
        _snapshot(path, tmp_path / "synced")  # on disk for certain
        for i in range(0, len(late), 4):
            db.put(late[i : i + 4], project=PROJECT, durable=False)
        _snapshot(path, tmp_path / "written")  # written, not synced
    finally:
        db.close()

    # The disk after the power loss: the database file as synced (it changes only at a
    # checkpoint), and the log as far as it got past its synced part.
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    shutil.copyfile(tmp_path / "synced" / path.name, crashed / path.name)
    synced = _log_bytes((tmp_path / "synced" / f"{path.name}-wal").read_bytes())
    wal = (tmp_path / "written" / f"{path.name}-wal").read_bytes()
    assert wal[:synced] == (tmp_path / "synced" / f"{path.name}-wal").read_bytes()[:synced]
    end = (
        len(wal) - 1 if cut < 0 else synced + int((len(wal) - synced) * cut) + 1234 * (0 < cut < 1)
    )
    (crashed / f"{path.name}-wal").write_bytes(wal[:end])

    reopened = BlockDB.open(crashed / path.name)
    try:
        check = reopened._conn.execute("PRAGMA integrity_check").fetchall()
        assert check == [("ok",)]
        for cid, data in own + early:
            assert reopened.get(cid) == data
        survived = reopened.has(cid for cid, _ in late)
        # Whole commits survive, in order: none, the first of three, the first two, all.
        kept = {0.0: 0, 0.5: 4, -1.0: 8, 1.0: 12}[cut]
        assert survived == {cid for cid, _ in late[:kept]}
        for cid, data in late:
            assert reopened.get(cid) == (data if cid in survived else None)
        count, stored = reopened.usage()
        assert count == len(own) + len(early) + len(survived)
        assert stored == (len(own) + len(early) + len(survived)) * ROW_BLOCK
        # The blocks lost are simply stored again, as a fetch would.
        reopened.put([b for b in late if b[0] not in survived], project=PROJECT, durable=False)
        assert reopened.has(cid for cid, _ in late) == {cid for cid, _ in late}
    finally:
        reopened.close()


def test_a_torn_log_is_not_read_past_the_tear(tmp_path: Path) -> None:
    """Bytes of a later frame reached the disk, an earlier one's did not (writes reordered)."""
    path = tmp_path / "blocks.sqlite"
    db = BlockDB.open(path)
    own = blk(1)
    fetched = [blk(10 + i) for i in range(8)]
    try:
        db.put([own])
        size_before = Path(f"{path}-wal").stat().st_size
        for b in fetched:
            db.put([b], project=PROJECT, durable=False)
        _snapshot(path, tmp_path / "crashed")
    finally:
        db.close()
    crashed = tmp_path / "crashed" / path.name
    wal = bytearray(Path(f"{crashed}-wal").read_bytes())
    middle = size_before + (len(wal) - size_before) // 3
    wal[middle : middle + 70000] = bytes(70000)
    Path(f"{crashed}-wal").write_bytes(wal)
    reopened = BlockDB.open(crashed)
    try:
        assert reopened._conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert reopened.get(own[0]) == own[1]
        survived = reopened.has(cid for cid, _ in fetched)
        # The log is read up to the tear: a prefix of the fetches survives, none after it.
        assert [cid in survived for cid, _ in fetched] == sorted(
            (cid in survived for cid, _ in fetched), reverse=True
        )
        assert len(survived) < len(fetched)
        for cid, data in fetched:
            assert reopened.get(cid) in (data, None)
    finally:
        reopened.close()


def test_an_older_rollback_journal_file_is_taken_over(tmp_path: Path) -> None:
    path = tmp_path / "blocks.sqlite"
    db = BlockDB.open(path)
    kept = blk(1)
    db.put([kept])
    db.close()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA journal_mode = DELETE").fetchone()[0] == "delete"
    conn.close()
    reopened = BlockDB.open(path)
    try:
        assert reopened._conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert reopened.get(kept[0]) == kept[1]
    finally:
        reopened.close()


def test_a_file_made_with_64_kib_pages_keeps_them_and_checkpoints_at_the_same_log_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Older Ostroms made block files with 64 KiB pages; new files get `PAGE_SIZE`. The
    checkpoint threshold is a number of bytes either way, not of pages."""
    fresh = BlockDB.open(tmp_path / "new.sqlite")
    try:
        assert fresh._conn.execute("PRAGMA page_size").fetchone()[0] == blockdb.PAGE_SIZE
        autocheckpoint = fresh._conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0]
        assert autocheckpoint * blockdb.PAGE_SIZE == blockdb.WAL_AUTOCHECKPOINT_BYTES
    finally:
        fresh.close()
    path = tmp_path / "older.sqlite"
    monkeypatch.setattr(blockdb, "PAGE_SIZE", 65536)
    older = BlockDB.open(path)
    small, large = blk(1, 300), blk(2, 256 * KIB)
    older.put([small, large])
    older.close()
    monkeypatch.undo()
    reopened = BlockDB.open(path)
    try:
        assert reopened._conn.execute("PRAGMA page_size").fetchone()[0] == 65536
        assert reopened._conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 16384
        assert reopened.get(small[0]) == small[1]
        assert reopened.get(large[0]) == large[1]
        more = blk(3)
        reopened.put([more], project=PROJECT, durable=False)
        assert reopened.get(more[0]) == more[1]
        assert reopened._conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        reopened.close()


@pytest.mark.slow
def test_fetched_blocks_lost_in_a_power_loss_are_fetched_again(
    daemons: DaemonFactory, tmp_path: Path
) -> None:
    alice = daemons.make("alice")
    addr = alice.json("status")["addresses"][0]
    project = alice.json("project", "create", "shared", "--license", "CC0-1.0")["cid"]
    shared = tmp_path / "shared.bin"
    shared.write_bytes(os.urandom(3 * MIB))
    alice.json("contribute", project, str(shared), "-m", "three mebibytes")

    bob = daemons.make("bob", "--bootstrap", addr)
    own = bob.json("project", "create", "own", "--license", "CC0-1.0")["cid"]
    mine = tmp_path / "mine.bin"
    mine.write_bytes(os.urandom(MIB))
    bob.json("contribute", own, str(mine), "-m", "bob's own work")
    bob.stop()
    # The block file as a power loss right after the fetch, before its first sync, may leave
    # it: bob's own blocks (synced when stored), none of the fetched ones.
    blocks = bob.data_dir / "store-blocks.sqlite"
    _snapshot(blocks, tmp_path / "before-fetch")

    bob.start("--bootstrap", addr)
    bob.json("follow", project)
    target = alice.json("status")["store"]["block_bytes"]
    wait_for(lambda: bob.json("status")["store"]["block_bytes"] >= target + MIB, "the fetch")
    bob.kill9()
    for f in (*_files(blocks), Path(f"{blocks}-shm")):
        f.unlink(missing_ok=True)
    for f in (tmp_path / "before-fetch").iterdir():
        shutil.copyfile(f, blocks.parent / f.name)

    bob.start("--bootstrap", addr)
    # The records survived (they were synced); the blocks they name are fetched again.
    assert any(e["message"] == "three mebibytes" for e in bob.json("log", project))
    wait_for(lambda: bob.json("status")["store"]["block_bytes"] >= target + MIB, "the refetch")
    bob.json("checkout", project, str(tmp_path / "out-shared"))
    assert (tmp_path / "out-shared" / "shared.bin").read_bytes() == shared.read_bytes()
    bob.json("checkout", own, str(tmp_path / "out-own"))
    assert (tmp_path / "out-own" / "mine.bin").read_bytes() == mine.read_bytes()
