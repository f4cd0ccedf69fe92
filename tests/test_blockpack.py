"""Large blocks' bytes in pack files: stored and read, synced in order, cut back after a
crash, freed when evicted, and files of the older schema read as they are."""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from ostrom.crypto.cid import CID
from ostrom.errors import StoreCorrupt
from ostrom.node import blockpack
from ostrom.node.blockdb import _SCHEMA, BlockDB, Quota
from ostrom.node.blockpack import ALIGN, PACK_MIN_BYTES, aligned, packs_dir

KIB = 1024
MIB = 1024 * KIB
PROJECT = CID.of_raw(b"a followed project").raw
LARGE = 256 * KIB
SMALL = 4 * KIB


def blk(n: int, size: int = LARGE) -> tuple[CID, bytes]:
    data = n.to_bytes(4, "big") + os.urandom(size - 4)
    return CID.of_raw(data), data


@contextmanager
def opened(path: Path) -> Iterator[BlockDB]:
    db = BlockDB.open(path)
    try:
        yield db
    finally:
        db.close()


def pack_files(path: Path) -> list[Path]:
    return sorted(packs_dir(path).glob("*.pack"))


def rows_with_bytes(db: BlockDB) -> int:
    return int(db._conn.execute("SELECT count(*) FROM block_data").fetchone()[0])


def test_large_blocks_go_to_a_pack_and_small_ones_stay_rows(tmp_path: Path) -> None:
    path = tmp_path / "blocks.sqlite"
    large, odd, small = blk(1), blk(2, PACK_MIN_BYTES + 1), blk(3, SMALL)
    with opened(path) as db:
        db.put([large, odd, small])
        assert rows_with_bytes(db) == 1
        for cid, data in (large, odd, small):
            assert db.get(cid) == data
        # Each block starts at an aligned offset: the odd-sized one is padded.
        (pack,) = pack_files(path)
        assert pack.stat().st_size == aligned(LARGE) + aligned(PACK_MIN_BYTES + 1)
        assert db.file_bytes() >= pack.stat().st_size
    with opened(path) as reopened:
        for cid, data in (large, odd, small):
            assert reopened.get(cid) == data
        assert reopened.usage() == (3, LARGE + PACK_MIN_BYTES + 1 + SMALL)


def test_a_fetched_block_waits_for_a_sync_and_an_own_commit_syncs_the_pack(
    tmp_path: Path,
) -> None:
    with opened(tmp_path / "blocks.sqlite") as db:
        db.put([blk(1)], project=PROJECT, durable=False)
        assert db._packs.unsynced and db.unsynced
        db.sync()
        assert not db._packs.unsynced and not db.unsynced
        db.put([blk(2)], project=PROJECT, durable=False)
        assert db._packs.unsynced
        db.put([blk(3, SMALL)])  # the node's own: the pack is synced before it commits
        assert not db._packs.unsynced and not db.unsynced
        # Small blocks are rows: the packs have nothing new to sync for them.
        db.put([blk(4, SMALL)], project=PROJECT, durable=False)
        assert db.unsynced and not db._packs.unsynced


def _snapshot(path: Path, to: Path) -> None:
    """Copy what the operating system holds of the block file and its packs."""
    to.mkdir()
    for f in (path, Path(f"{path}-wal")):
        if f.exists():
            shutil.copyfile(f, to / f.name)
    shutil.copytree(packs_dir(path), to / packs_dir(path).name)


def test_index_rows_that_outlive_their_pack_bytes_become_missing_blocks(tmp_path: Path) -> None:
    """A power loss that kept the log's later commits but not the pack's later length (the
    log may reach the disk first): those blocks are missing, the rest intact."""
    path = tmp_path / "live" / "blocks.sqlite"
    path.parent.mkdir()
    own = [blk(i) for i in range(3)]
    early = [blk(10 + i) for i in range(3)]
    late = [blk(20 + i) for i in range(6)]
    with opened(path) as db:
        db.put(own)
        db.put(early, project=PROJECT, durable=False)
        db.sync()
        _snapshot(path, tmp_path / "synced")
        db.put(late[:3], project=PROJECT, durable=False)
        db.put(late[3:], project=PROJECT, durable=False)
        _snapshot(path, tmp_path / "written")
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    for name in (path.name, f"{path.name}-wal"):
        shutil.copyfile(tmp_path / "written" / name, crashed / name)
    packs = packs_dir(path).name
    shutil.copytree(tmp_path / "synced" / packs, crashed / packs)
    # One later append reached the disk whole: the pack ends 10 bytes into the second one.
    (pack,) = pack_files(crashed / path.name)
    with pack.open("r+b") as f:
        f.write((tmp_path / "written" / packs / pack.name).read_bytes()[: 7 * LARGE + 10])

    with opened(crashed / path.name) as reopened:
        for cid, data in own + early:
            assert reopened.get(cid) == data
        # Whole blocks within the pack survive; the one cut in two and those after are gone.
        assert reopened.has(cid for cid, _ in late) == {late[0][0]}
        assert reopened.get(late[1][0]) is None
        assert reopened.usage() == (7, 7 * LARGE)
        # The pack was cut back to its last whole block; a fetch stores the rest again.
        assert pack.stat().st_size == 7 * LARGE
        reopened.put(late, project=PROJECT, durable=False)
        for cid, data in late:
            assert reopened.get(cid) == data


def test_bytes_appended_by_a_put_that_never_committed_are_cut_off(tmp_path: Path) -> None:
    path = tmp_path / "blocks.sqlite"
    kept = blk(1)
    with opened(path) as db:
        db.put([kept])
        db._packs.append([blk(2)[1], blk(3)[1]])  # a put killed before its commit
    (pack,) = pack_files(path)
    assert pack.stat().st_size == 3 * LARGE
    with opened(path) as reopened:
        assert pack.stat().st_size == LARGE
        assert reopened.get(kept[0]) == kept[1]
        more = blk(4)
        reopened.put([more])
        assert reopened.get(more[0]) == more[1]
        assert pack.stat().st_size == 2 * LARGE


def test_damaged_pack_bytes_are_refused_on_read(tmp_path: Path) -> None:
    path = tmp_path / "blocks.sqlite"
    block = blk(1)
    with opened(path) as db:
        db.put([block])
        (pack,) = pack_files(path)
        with pack.open("r+b") as f:
            f.seek(1000)
            f.write(b"\xff" * 8)
        with pytest.raises(StoreCorrupt, match="do not match its CID"):
            db.get(block[0])


def allocated(path: Path) -> int:
    return sum(p.stat().st_blocks * 512 for p in pack_files(path))


def test_evicted_blocks_free_their_space_once_the_eviction_is_on_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Packs of four blocks: the first pack is evicted whole (deleted), the second in part
    # (a hole where its first block was).
    monkeypatch.setattr(blockpack, "PACK_BYTES", 4 * LARGE)
    path = tmp_path / "blocks.sqlite"
    old = [blk(i) for i in range(5)]
    with opened(path) as db:
        db.put(old, project=PROJECT, pinned=False, durable=False)
        assert len(pack_files(path)) == 2
        before = allocated(path)
        quota = Quota(storage=7 * LARGE)
        new = [blk(10 + i) for i in range(7)]
        db.put(new, project=PROJECT, pinned=False, quota=quota, durable=False)
        assert db.usage() == (7, 7 * LARGE)
        # Not freed before the eviction's commit is on disk: a power loss could undo it.
        assert allocated(path) == before + 7 * LARGE
        db.sync()
        db.put([blk(30, SMALL)])  # the next write frees what synced deletions left
        assert db.has(cid for cid, _ in old) == set()
        names = [p.name for p in pack_files(path)]
        assert "00000001.pack" not in names
        assert allocated(path) == 7 * LARGE  # the new blocks: three in the second pack, four after
        for cid, data in new:
            assert db.get(cid) == data


def test_a_crash_before_freeing_leaves_the_space_to_be_freed_on_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "blocks.sqlite"
    blocks = [blk(i) for i in range(6)]
    db = BlockDB.open(path)
    try:
        db.put(blocks, project=PROJECT, pinned=False)
        # Evict two in the middle, durably; the process dies before it frees their places.
        monkeypatch.setattr(db._packs, "release", lambda freed, emptied: None)
        with db._write() as conn:
            db._delete(conn, [2, 3])
    finally:
        monkeypatch.undo()
        db.close()
    full = allocated(path)
    with opened(path) as reopened:
        assert allocated(path) == full - 2 * LARGE
        for i, (cid, data) in enumerate(blocks):
            assert reopened.get(cid) == (None if i in (1, 2) else data)


def test_a_file_system_without_direct_io_gets_buffered_writes_and_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_open = os.open
    refused: list[str] = []

    def no_direct(path: str, flags: int, mode: int = 0o777) -> int:
        if flags & getattr(os, "O_DIRECT", 0):
            refused.append(str(path))
            raise OSError(errno.EINVAL, "direct I/O is not supported here")
        return real_open(path, flags, mode)

    monkeypatch.setattr(blockpack.os, "open", no_direct)
    path = tmp_path / "blocks.sqlite"
    blocks = [blk(i, LARGE + 100) for i in range(3)]
    with opened(path) as db:
        db.put(blocks, project=PROJECT, durable=False)
        db.sync()
        for cid, data in blocks:
            assert db.get(cid) == data
    # Once for writing, once for reading; each side then stays buffered.
    assert len(refused) == (2 if getattr(os, "O_DIRECT", 0) else 0)
    (pack,) = pack_files(path)
    assert pack.stat().st_size == 3 * aligned(LARGE + 100)
    assert aligned(LARGE + 100) % ALIGN == 0


def reader_flags(db: BlockDB) -> list[int]:
    return [fcntl.fcntl(fd, fcntl.F_GETFL) for fd in db._packs._readers.values()]


def test_blocks_are_read_past_the_page_cache_where_the_file_system_allows(
    tmp_path: Path,
) -> None:
    path = tmp_path / "blocks.sqlite"
    # Sizes that are not multiples of the alignment, the last one ending the pack.
    blocks = [blk(i, LARGE + 7 * i + 1) for i in range(4)]
    with opened(path) as db:
        db.put(blocks, project=PROJECT)
        for cid, data in reversed(blocks):
            assert db.get(cid) == data
        direct = getattr(os, "O_DIRECT", 0)
        assert [flags & direct for flags in reader_flags(db)] == [direct]


def test_a_direct_read_the_file_system_refuses_is_read_through_the_page_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "blocks.sqlite"
    blocks = [blk(i) for i in range(3)]
    refused: list[int] = []

    def refuse(fd: int, buffers: list[memoryview], offset: int) -> int:
        refused.append(offset)
        raise OSError(errno.EINVAL, "direct reads are not supported here")

    with opened(path) as db:
        db.put(blocks, project=PROJECT)
        monkeypatch.setattr(blockpack.os, "preadv", refuse)
        for cid, data in blocks:
            assert db.get(cid) == data
        assert len(refused) == (1 if getattr(os, "O_DIRECT", 0) else 0)
        assert all(flags & getattr(os, "O_DIRECT", 0) == 0 for flags in reader_flags(db))


def test_packs_roll_over_and_every_block_reads_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(blockpack, "PACK_BYTES", 3 * LARGE)
    path = tmp_path / "blocks.sqlite"
    blocks = [blk(i) for i in range(10)]
    with opened(path) as db:
        for i in range(0, 10, 4):  # puts that cross a pack's end
            db.put(blocks[i : i + 4], project=PROJECT, durable=False)
        db.sync()
        assert [p.stat().st_size for p in pack_files(path)] == [3 * LARGE] * 3 + [LARGE]
        for cid, data in blocks:
            assert db.get(cid) == data
    with opened(path) as reopened:
        extra = blk(99)
        reopened.put([extra])
        assert [p.stat().st_size for p in pack_files(path)][-1] == 2 * LARGE
        for cid, data in [*blocks, extra]:
            assert reopened.get(cid) == data


def test_a_file_of_the_older_schema_keeps_its_blocks_and_packs_new_ones(tmp_path: Path) -> None:
    path = tmp_path / "blocks.sqlite"
    old = blk(1)
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.executescript(f"BEGIN; {_SCHEMA} PRAGMA user_version = 1; COMMIT;")
    conn.execute("INSERT INTO blocks VALUES (1, ?, ?, 1, 1)", (old[0].raw, LARGE))
    conn.execute("INSERT INTO block_data VALUES (1, ?)", (old[1],))
    conn.execute("INSERT INTO block_projects VALUES (x'', 1, 1)")
    conn.close()
    with opened(path) as db:
        assert db._conn.execute("PRAGMA user_version").fetchone()[0] == 2
        assert db.get(old[0]) == old[1]
        new = blk(2)
        db.put([new])
        assert db.get(new[0]) == new[1]
        assert rows_with_bytes(db) == 1
        assert len(pack_files(path)) == 1
