"""Content blocks in their own SQLite file, with what each is kept for and when it was used.

Why a file of its own: blocks are large and written once, and they are held to a durability
of their own (below), which SQLite sets per connection and transaction, not per table.

Where the bytes are: a block under `PACK_MIN_BYTES` (64 KiB: changesets, manifests, small
files) is a row of this file; a larger one (an artifact's blocks) is appended to a pack
file beside it (`ostrom.node.blockpack`), and this file keeps its place. Every block has its
index row here either way. A file of schema version 1 keeps its blocks as rows and puts new
large ones in packs.

Pages (`PAGE_SIZE`) are 16 KiB. A commit writes every page it changed to the log, whole: a
few small blocks (a contribution's changeset, manifest and file, fetched after its gossip)
change four or five pages, which with 64 KiB pages made a node following a busy project
write 2 MB/s for 20 KB/s of blocks; with 16 KiB pages it writes 0.3 MB/s, no more than with
4 KiB pages. A file keeps the page size it was created with: one made by an older Ostrom
(64 KiB pages) works as before.

Durability. The file runs in WAL mode. Two kinds of writes share it:

- *Durable* writes (the default: this node's own blocks, its contributions and imports,
  and every change of attribution or pin) commit with `synchronous = FULL`, after the packs
  are synced: the log is synced before the call returns, so after a `kill -9` or a power
  loss every block a record of this node names is still here. The node's records are
  stored after their blocks.
- *Fetched* blocks (`put(..., durable=False)`: blocks a peer sent, which any peer holding
  them can send again) commit with `synchronous = NORMAL`, and their pack writes are not
  synced: the commit reaches the operating system but not the disk. They reach it when the
  fetch ends: it calls `sync` (`ostrom.node.blocks`; for a fetch of less than 4 MiB the
  service makes that call within 5 s, shared with the fetches around it), which syncs the
  packs, then the log; while a large fetch goes on, every 16 MiB it stores
  (`NodeService.serve_syncs`); and when the log, grown by `WAL_AUTOCHECKPOINT_BYTES`
  (1 GiB), is checkpointed by the writing connection. The owner's uploads are written the
  same way (`NodeService.blocks_upload`): the durable commit of the contribution that names
  them syncs the packs and the log, and so them, before the contribution is signed.

What a crash can do (`ostrom.node.walsync` says why): a `kill -9` loses nothing; a power loss
can lose the fetched blocks committed since the last sync: they are missing again, and the
next completion of their project (run after every restart, on the first sync with a peer)
fetches them again. That includes an index row that reached the disk before its pack's
bytes did (the operating system writes the log back when it likes): on opening, a row that
names bytes past its pack's end is deleted, and pack bytes no row names are cut off. A power
loss cannot lose a durable write, nor any write before one. Whatever survives is still
checked against its CID on every read.

Checkpoints: copying the log into the database is not needed to make a fetch durable (the
synced log is), so `sync` does not copy: the copy happens when the writer's log reaches
`WAL_AUTOCHECKPOINT_BYTES`, or when the file is closed. A large block's bytes never pass
through the log (only its index row does), so a fetch of an artifact grows it by little.

Freeing: the place of an evicted block in a pack is freed (a hole, or the whole pack once
none of its blocks is left) when the commit that deleted it is on disk, by the writing
thread before its next transaction; one the process did not live to free is freed when the
file next opens.

Keeping: each block is attributed to the projects it was stored for (`block_projects`).
An attribution is *pinned* when the block is kept for that project: a project followed in
full, the changesets and manifests of any followed project, or this node's own work (its
contributions and imports, attributed to `OWN`). A block with no pinned attribution was
fetched on demand for a records-only project (a checkout) and may be evicted, least recently
used first, to make room under the storage limit. When a block was last used is a counter
(`used`): storing it, or reading it for the owner (a checkout, `block.get`), moves it to
the front. Serving a block to a peer does not: a peer must not keep a block here by asking
for it. Reads are not written at once (that would cost a transaction per read): they are
kept in memory and written with the next write, or when `TOUCH_FLUSH` have gathered, without
a sync of their own. A crash may forget them, which only makes eviction order less exact.

Counting: a block's bytes count once against the storage limit, however many projects share
it, and in full against every project it is attributed to (each project holds what it would
hold alone); bytes are counted by block size, not by pages.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from ostrom.crypto.cid import CID
from ostrom.errors import BlockMismatch, InvalidInput, QuotaExceeded, StoreCorrupt, TooLarge
from ostrom.node.blockpack import PACK_MIN_BYTES, PackFiles, packs_dir
from ostrom.node.sqlbind import in_chunks, placeholders
from ostrom.node.walsync import WalDurability
from ostrom.protocol.changesets import MAX_BLOCK_SIZE

log = logging.getLogger(__name__)

# PRAGMA user_version of the block database's schema: 2 added `block_places` (large blocks'
# bytes in pack files); a file of version 1 is brought up to 2 when opened, and its blocks
# stay where they are.
BLOCK_SCHEMA_VERSION: Final = 2
# The page size of a new block file (see the module docstring): measured at 20 daemons with
# 20 contributions a second, a relay wrote 2.1 MB/s with 64 KiB pages and 0.29 MB/s with 16
# KiB (8 KiB: 0.30, 4 KiB: 0.32-0.44); the 256 MiB artifact fetch was no slower than with 64
# KiB (`bench.artifact`, docs/BENCHMARKS.md).
PAGE_SIZE: Final = 16384
# The attribution of this node's own blocks (its uploads, contributions and imports): not a
# project CID (those are 36 bytes), so it never counts against a project's limit.
OWN: Final = b""
# Reads remembered before they are written on their own: a checkout reads tens of blocks
# per call, so this writes about once per 256 blocks read, a small cost beside reading them.
TOUCH_FLUSH: Final = 256
# The page cache of the block file, in KiB (SQLite's default is about 2 MiB): a block is
# written once and read again rarely, so cached data pages seldom serve a second read; this
# keeps the index pages a lookup walks (64 pages of 16 KiB) without holding block bytes the
# node is done with.
_CACHE_KIB: Final = 1024
# Bytes the write-ahead log may hold before the writing connection checkpoints it, inside a
# commit (SQLite takes it as pages of the file's own size). `sync` only syncs the log, so
# this is where fetched blocks are copied into the database: rarely enough that most fetches
# end without waiting on a copy (one does when the log fills during it), often enough that
# the log (disk space beside the blocks, and the wal-index every read looks up) stays within
# 1 GiB. The checkpoint also syncs the log, which bounds what a power loss can take of a
# fetch that has not ended yet.
WAL_AUTOCHECKPOINT_BYTES: Final = 1024 * 1024 * 1024
# Bytes of log file kept once a checkpoint has emptied it: the next writes reuse them instead
# of growing the file from nothing, and a log that once grew large does not stay large.
WAL_KEEP_BYTES: Final = 64 * 1024 * 1024

# Rows per multi-row INSERT (`_insert_rows`): a fetch stores 16 blocks per transaction, and
# 200 rows of up to 5 values stay far under SQLite's bound of 32,766 parameters.
INSERT_ROWS: Final = 200

_SCHEMA: Final = """
CREATE TABLE blocks (
    id INTEGER PRIMARY KEY,
    cid BLOB NOT NULL UNIQUE,
    size INTEGER NOT NULL,
    used INTEGER NOT NULL,   -- the use counter when it was last stored or read for the owner
    kept INTEGER NOT NULL    -- 1 if some attribution is pinned: never evicted
);
CREATE INDEX blocks_evictable ON blocks (used) WHERE kept = 0;
CREATE TABLE block_data (
    id INTEGER PRIMARY KEY,  -- blocks.id; apart so that bookkeeping never touches the bytes
    data BLOB NOT NULL
);
CREATE TABLE block_projects (
    project BLOB NOT NULL,   -- a project's genesis CID, or '' for this node's own blocks
    block INTEGER NOT NULL,  -- blocks.id
    pinned INTEGER NOT NULL,
    PRIMARY KEY (project, block)
) WITHOUT ROWID;
CREATE INDEX block_projects_block ON block_projects (block);
"""
# Added by version 2: where the bytes of a block kept in a pack file are (a block has a row
# here or in `block_data`, never both).
_PLACES_SCHEMA: Final = """
CREATE TABLE block_places (
    id INTEGER PRIMARY KEY,  -- blocks.id
    pack INTEGER NOT NULL,   -- the pack file's number
    offset INTEGER NOT NULL  -- where the block starts in it; its length is blocks.size
);
CREATE INDEX block_places_pack ON block_places (pack);
"""


@dataclass(frozen=True, slots=True)
class PutResult:
    """What one `put` did: blocks new to the store, and the blocks evicted to make room."""

    new: int
    evicted: int = 0
    evicted_bytes: int = 0


@dataclass(frozen=True, slots=True)
class Quota:
    """The limits a `put` is held to (0: none) and the bytes the records already use."""

    storage: int = 0
    project_storage: int = 0
    other_bytes: int = 0
    # Blocks used at or after this counter value are not evicted (a fetch's own blocks).
    protect_from: int | None = None


def blocks_path(store_path: Path) -> Path:
    """Where the blocks of the record store at `store_path` live: beside it."""
    return store_path.with_name(f"{store_path.stem}-blocks{store_path.suffix}")


class BlockDB:
    """The block database; like `Store`, serialised by its caller (no lock of its own)."""

    def __init__(self, conn: sqlite3.Connection, path: Path, packs: PackFiles) -> None:
        """Use `BlockDB.open`."""
        self._conn = conn
        self._path = path
        self._packs = packs
        # Places of deleted blocks, freed once the commit that deleted them is on disk:
        # (that commit's number, places); and those of the transaction under way.
        self._releasing: list[tuple[int, list[tuple[int, int, int]]]] = []
        self._deleting: list[tuple[int, int, int]] = []
        self._tick, self._bytes, self._count = _tallies(conn)
        # Reads for the owner not yet written: binary CID -> use counter.
        self._touched: dict[bytes, int] = {}
        self._durability = WalDurability(conn, path)
        # Inside `batch`: writes join its transaction.
        self._batch = False

    @classmethod
    def open(cls, path: Path) -> BlockDB:
        try:
            conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise InvalidInput(f"cannot open the block store at {path}: {exc}") from None
        packs: PackFiles | None = None
        try:
            _set_up(conn, path)
            packs = PackFiles.open(packs_dir(path))
            _recover_packs(conn, packs)
            return cls(conn, path, packs)
        except sqlite3.OperationalError as exc:
            _close_all(conn, packs)
            raise InvalidInput(f"cannot open the block store at {path}: {exc}") from None
        except sqlite3.DatabaseError as exc:
            _close_all(conn, packs)
            raise StoreCorrupt(f"{path} is not a readable Ostrom block store: {exc}") from None
        except OSError as exc:
            _close_all(conn, packs)
            raise InvalidInput(
                f"cannot open the block store's packs beside {path}: {exc}"
            ) from None
        except BaseException:
            _close_all(conn, packs)
            raise

    def close(self) -> None:
        """Close the file; the last connection's checkpoint syncs what `sync` had not, after
        the packs are synced. Places not yet freed are freed when the store next opens."""
        if not self._durability.close():
            return
        try:
            self._packs.sync()
            if self._touched:
                with self._write(durable=False):
                    pass
        finally:
            try:
                self._conn.close()
            finally:
                self._packs.close()

    @property
    def path(self) -> Path:
        return self._path

    @property
    def tick(self) -> int:
        """The use counter now: blocks stored or read from now on are used after it."""
        return self._tick

    def _next_tick(self) -> int:
        self._tick += 1
        return self._tick

    # --- writing -------------------------------------------------------------------------------

    def _write(self, *, durable: bool = True) -> _WriteTxn:
        return _WriteTxn(self, durable)

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Make the writes of the block one durable transaction: one commit and one sync
        instead of one each (a contribution's blocks, and their attribution to its project).
        A write that raises rolls the whole batch back."""
        try:
            with self._write(durable=True):
                self._batch = True
                try:
                    yield
                finally:
                    self._batch = False
        except BaseException:
            # The writes' counts of what is held were rolled back with them.
            _, self._bytes, self._count = _tallies(self._conn)
            raise

    @property
    def unsynced(self) -> bool:
        """Whether some commit may not be on disk yet (a fetched block's, not yet `sync`ed)."""
        return self._durability.unsynced or self._packs.unsynced

    def sync(self) -> None:
        """Put every write committed so far on disk: sync the packs, then the log
        (`WalDurability.sync`), so that a synced index row never names bytes that are not.

        May be called from any thread while the writing thread keeps writing (that thread's
        callers serialise everything else). The copy of the log into the database is left to
        the writer's checkpoint (see the module docstring).
        """
        self._packs.sync()
        self._durability.sync()

    def _release_synced(self) -> None:
        """Free the places of deleted blocks whose deletion is on disk (the writing thread
        calls this before each transaction)."""
        if not self._releasing:
            return
        done = [entry for entry in self._releasing if self._durability.is_synced(entry[0])]
        if not done:
            return
        self._releasing = self._releasing[len(done) :]  # commits are synced in order
        freed = [place for _, places in done for place in places]
        packs = list({number for number, _, _ in freed})
        sql = f"SELECT DISTINCT pack FROM block_places WHERE pack IN ({placeholders(len(packs))})"
        held = {number for (number,) in self._conn.execute(sql, packs)}
        self._packs.release(freed, set(packs) - held)

    def _flush_touched(self, conn: sqlite3.Connection) -> None:
        if self._touched:
            conn.executemany(
                "UPDATE blocks SET used = ? WHERE cid = ?",
                [(tick, raw) for raw, tick in self._touched.items()],
            )
            self._touched.clear()

    def put(
        self,
        blocks: Sequence[tuple[CID, bytes]],
        *,
        project: bytes = OWN,
        pinned: bool = True,
        quota: Quota | None = None,
        durable: bool = True,
    ) -> PutResult:
        """Verify every block against its CID, then store the batch in one transaction,
        attributed to `project` (pinned or not), within `quota`. Not `durable`: blocks
        fetched from a peer, or uploads, on disk only at the next `sync` or durable commit
        (see the module docstring).

        One bad block (`BlockMismatch`, `TooLarge`) refuses the whole batch before anything
        is written. A batch that would pass the storage limit first evicts unpinned blocks,
        least recently used first; if that cannot make room, or the batch would pass the
        project's limit, it is refused whole (`QuotaExceeded`) and nothing is evicted.
        Blocks already stored are attributed and used again, and count as not new.
        """
        unique: dict[bytes, tuple[CID, bytes]] = {}
        for cid, data in blocks:
            if len(data) > MAX_BLOCK_SIZE:
                raise TooLarge(f"block {cid} is {len(data)} bytes; the limit is {MAX_BLOCK_SIZE}")
            if not cid.matches(data):
                raise BlockMismatch(f"block {cid}: the bytes sent do not hash to this CID")
            unique.setdefault(cid.raw, (cid, data))
        if not unique:
            return PutResult(new=0)
        raws = list(unique)
        with self._write(durable=durable) as conn:
            present = self._ids(conn, raws)
            new = [raw for raw in raws if raw not in present]
            incoming = sum(len(unique[raw][1]) for raw in new)
            evicted = (0, 0)
            if quota is not None:
                self._check_project(conn, project, present, unique, quota)
                evicted = self._make_room(conn, incoming, set(present.values()), quota)
            tick = self._next_tick()
            kept = int(pinned)
            # Ids above the highest so far (this transaction is the only writer), so that
            # each table takes the batch in one statement.
            top = conn.execute("SELECT coalesce(max(id), 0) FROM blocks").fetchone()[0]
            added = {raw: top + 1 + i for i, raw in enumerate(new)}
            _insert_rows(
                conn,
                "INSERT INTO blocks (id, cid, size, used, kept) VALUES",
                [(i, raw, len(unique[raw][1]), tick, kept) for raw, i in added.items()],
            )
            packed = [raw for raw in new if len(unique[raw][1]) >= PACK_MIN_BYTES]
            places = self._packs.append([unique[raw][1] for raw in packed])
            _insert_rows(
                conn,
                "INSERT INTO block_places (id, pack, offset) VALUES",
                [
                    (added[raw], pack, offset)
                    for raw, (pack, offset) in zip(packed, places, strict=True)
                ],
            )
            _insert_rows(
                conn,
                "INSERT INTO block_data (id, data) VALUES",
                [
                    (i, unique[raw][1])
                    for raw, i in added.items()
                    if len(unique[raw][1]) < PACK_MIN_BYTES
                ],
            )
            _insert_rows(
                conn,
                "INSERT INTO block_projects (project, block, pinned) VALUES",
                [(project, i, kept) for i in (*present.values(), *added.values())],
                " ON CONFLICT (project, block) DO UPDATE SET pinned = max(pinned, excluded.pinned)",
            )
            if present:
                conn.executemany(
                    "UPDATE blocks SET used = ?, kept = max(kept, ?) WHERE id = ?",
                    [(tick, kept, i) for i in present.values()],
                )
        self._bytes += incoming - evicted[1]
        self._count += len(new) - evicted[0]
        return PutResult(new=len(new), evicted=evicted[0], evicted_bytes=evicted[1])

    def _check_project(
        self,
        conn: sqlite3.Connection,
        project: bytes,
        present: dict[bytes, int],
        unique: dict[bytes, tuple[CID, bytes]],
        quota: Quota,
    ) -> None:
        if not quota.project_storage or project == OWN:
            return
        used = self.project_bytes(project, conn)
        attributed = self._attributed(conn, project, list(present.values()))
        adding = sum(
            len(data) for raw, (_, data) in unique.items() if present.get(raw) not in attributed
        )
        if adding and used + adding > quota.project_storage:
            raise QuotaExceeded(
                f"the per-project storage limit ({quota.project_storage} bytes) is reached: "
                f"project {CID(project)} holds {used} bytes of blocks and {adding} more "
                "were offered",
                "project_storage",
            )

    def _make_room(
        self, conn: sqlite3.Connection, incoming: int, keep: set[int], quota: Quota
    ) -> tuple[int, int]:
        """Evict unpinned blocks, least recently used first, until `incoming` more bytes fit
        under the storage limit; returns (blocks, bytes) evicted."""
        if not quota.storage or not incoming:
            return 0, 0
        used = quota.other_bytes + self._bytes
        excess = used + incoming - quota.storage
        if excess <= 0:
            return 0, 0
        victims: list[int] = []
        freed = 0
        sql = "SELECT id, size FROM blocks WHERE kept = 0"
        params: tuple[int, ...] = ()
        if quota.protect_from is not None:
            sql += " AND used < ?"
            params = (quota.protect_from,)
        for block_id, size in conn.execute(sql + " ORDER BY used, id", params):
            if block_id in keep:
                continue
            victims.append(block_id)
            freed += size
            if freed >= excess:
                break
        if freed < excess:
            raise QuotaExceeded(
                f"the storage limit ({quota.storage} bytes) is reached: {used} bytes are used, "
                f"{incoming} more were offered, and evicting every block fetched on demand "
                f"would free only {freed}"
            )
        self._delete(conn, victims)
        return len(victims), freed

    def _delete(self, conn: sqlite3.Connection, ids: Sequence[int]) -> None:
        """Delete blocks; the places of those in packs are freed once this is on disk."""
        for start in range(0, len(ids), INSERT_ROWS):
            part = ids[start : start + INSERT_ROWS]
            self._deleting += conn.execute(
                "SELECT pack, offset, size FROM block_places JOIN blocks USING (id)"
                f" WHERE id IN ({placeholders(len(part))})",
                part,
            ).fetchall()
        _delete_rows(conn, ids)

    def claim(
        self, project: bytes, cids: Iterable[CID], *, pinned: bool = True, durable: bool = True
    ) -> int:
        """Attribute the stored ones of `cids` to `project` (pinned or not); returns how many
        attributions were added or newly pinned (a block a follow now needs is kept).
        `durable=False` commits without a disk sync of its own, for claims that the next
        block completion would make again if a crash lost them."""
        raws = list({cid.raw for cid in cids})
        if not raws:
            return 0
        ids = list(self._ids(self._conn, raws).values())
        if not ids:
            return 0
        rows = [(project, i, int(pinned)) for i in ids]
        with self._write(durable=durable) as conn:
            before = conn.total_changes
            conn.executemany(
                "INSERT INTO block_projects (project, block, pinned) VALUES (?, ?, ?)"
                " ON CONFLICT (project, block) DO UPDATE SET pinned = excluded.pinned"
                " WHERE pinned < excluded.pinned",
                rows,
            )
            changed = conn.total_changes - before
            if pinned and changed:
                conn.executemany(
                    "UPDATE blocks SET kept = 1 WHERE id = ? AND kept = 0", [(i,) for i in ids]
                )
        return changed

    def unpin_project(self, project: bytes) -> int:
        """Unpin every block attributed to `project` (it is no longer followed): those no
        other attribution pins may now be evicted. Returns how many blocks became evictable."""
        with self._write() as conn:
            unpinned = conn.execute(
                "UPDATE block_projects SET pinned = 0 WHERE project = ? AND pinned = 1", (project,)
            ).rowcount
            if not unpinned:
                return 0
            freed: int = conn.execute(
                "UPDATE blocks SET kept = 0 WHERE kept = 1"
                " AND id IN (SELECT block FROM block_projects WHERE project = ?)"
                " AND NOT EXISTS"
                " (SELECT 1 FROM block_projects WHERE block = blocks.id AND pinned = 1)",
                (project,),
            ).rowcount
        return freed

    # --- reading -------------------------------------------------------------------------------

    def get(self, cid: CID, *, touch: bool = False) -> bytes | None:
        """The block's bytes, checked against its CID (None if not stored). `touch`: a read
        for the owner, which makes the block recently used."""
        row = self._conn.execute(
            "SELECT data, pack, offset, size FROM blocks LEFT JOIN block_data USING (id)"
            " LEFT JOIN block_places USING (id) WHERE cid = ?",
            (cid.raw,),
        ).fetchone()
        if row is None:
            return None
        stored, pack, offset, size = row
        if stored is not None:
            data: bytes = stored
        elif pack is not None:
            data = self._packs.read(pack, offset, size)
        else:
            raise StoreCorrupt(f"block {cid}: its bytes are in neither the file nor a pack")
        if not cid.matches(data):
            raise StoreCorrupt(f"block {cid}: stored bytes do not match its CID")
        if touch:
            self._touched[cid.raw] = self._next_tick()
            if len(self._touched) >= TOUCH_FLUSH:
                with self._write(durable=False):
                    pass
        return data

    def has(self, cids: Iterable[CID]) -> set[CID]:
        by_raw = {c.raw: c for c in cids}
        return {by_raw[raw] for raw in self._ids(self._conn, list(by_raw))}

    def sizes(self, cids: Iterable[CID]) -> dict[CID, int]:
        """The size of each stored one of `cids`, from the index alone (no block is read)."""
        by_raw = {c.raw: c for c in cids}
        sizes = _column_by_cid(self._conn, "size", list(by_raw))
        return {by_raw[raw]: size for raw, size in sizes.items()}

    def projects_of(self, cids: Iterable[CID]) -> dict[CID, set[bytes]]:
        """For each stored one of `cids`, the projects it is attributed to (`OWN` included)."""
        by_raw = {c.raw: c for c in cids}
        out: dict[CID, set[bytes]] = {}
        for chunk in in_chunks(list(by_raw)):
            sql = (
                "SELECT cid, project FROM blocks LEFT JOIN block_projects ON block = id"
                f" WHERE cid IN ({placeholders(len(chunk))})"
            )
            for raw, project in self._conn.execute(sql, chunk):
                found = out.setdefault(by_raw[raw], set())
                if project is not None:
                    found.add(bytes(project))
        return out

    def project_bytes(self, project: bytes, conn: sqlite3.Connection | None = None) -> int:
        """Bytes of the blocks attributed to `project`."""
        row = (
            (conn or self._conn)
            .execute(
                "SELECT coalesce(sum(size), 0) FROM block_projects JOIN blocks ON id = block"
                " WHERE project = ?",
                (project,),
            )
            .fetchone()
        )
        return int(row[0])

    def largest_project(self) -> tuple[bytes, int] | None:
        """The project holding the most bytes of blocks, and how many (`OWN` aside)."""
        row = self._conn.execute(
            "SELECT project, sum(size) AS held FROM block_projects JOIN blocks ON id = block"
            " WHERE project != ? GROUP BY project ORDER BY held DESC LIMIT 1",
            (OWN,),
        ).fetchone()
        return None if row is None else (bytes(row[0]), int(row[1]))

    def usage(self) -> tuple[int, int]:
        """(blocks, bytes of blocks), as counted in memory."""
        return self._count, self._bytes

    def evictable_bytes(self) -> int:
        """Bytes of the blocks that may be evicted (kept for no project)."""
        return int(
            self._conn.execute(
                "SELECT coalesce(sum(size), 0) FROM blocks WHERE kept = 0"
            ).fetchone()[0]
        )

    def log_has_room(self, room: int) -> bool:
        """Whether a commit writing less than `room` bytes to the log cannot checkpoint it
        (`WalDurability.has_room`)."""
        return self._durability.has_room(room)

    def file_bytes(self) -> int:
        """Bytes of the file, of its write-ahead log and of its packs (holes not counted)."""
        paths = (self._path, Path(f"{self._path}-wal"))
        files = sum(path.stat().st_size for path in paths if path.exists())
        return files + self._packs.file_bytes()

    # --- helpers -------------------------------------------------------------------------------

    @staticmethod
    def _ids(conn: sqlite3.Connection, raws: Sequence[bytes]) -> dict[bytes, int]:
        return _column_by_cid(conn, "id", raws)

    @staticmethod
    def _attributed(conn: sqlite3.Connection, project: bytes, ids: Sequence[int]) -> set[int]:
        if not ids:
            return set()
        marks = placeholders(len(ids))
        sql = f"SELECT block FROM block_projects WHERE project = ? AND block IN ({marks})"
        return {i for (i,) in conn.execute(sql, (project, *ids))}

    def import_rows(self, rows: Sequence[tuple[bytes, bytes]]) -> None:
        """Store (binary CID, bytes) rows moved from an older store, unverified (they were
        verified when first stored) and kept (where they came from is not known)."""
        with self._write() as conn:
            tick = self._next_tick()
            for raw, data in rows:
                cursor = conn.execute(
                    "INSERT INTO blocks (cid, size, used, kept) VALUES (?, ?, ?, 1)"
                    " ON CONFLICT (cid) DO NOTHING",
                    (raw, len(data), tick),
                )
                if cursor.rowcount:
                    block_id = cursor.lastrowid
                    conn.execute(
                        "INSERT INTO block_data (id, data) VALUES (?, ?)", (block_id, data)
                    )
                    conn.execute(
                        "INSERT INTO block_projects (project, block, pinned) VALUES (?, ?, 1)",
                        (OWN, block_id),
                    )
                    self._bytes += len(data)
                    self._count += 1


class _WriteTxn:
    """One write transaction on the block database, which also writes pending reads;
    synced at its commit if `durable`."""

    def __init__(self, db: BlockDB, durable: bool) -> None:
        self._db = db
        self._durable = durable
        self._joined = False

    def __enter__(self) -> sqlite3.Connection:
        conn = self._db._conn
        self._joined = self._db._batch
        if self._joined:
            return conn  # a write inside `batch`: its transaction is the batch's
        self._db._release_synced()
        self._db._durability.begin(self._durable)
        conn.execute("BEGIN IMMEDIATE")
        self._db._flush_touched(conn)
        return conn

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        conn = self._db._conn
        if self._joined:
            return  # the batch commits, or rolls back on what this raised
        db = self._db
        deleted, db._deleting = db._deleting, []
        if exc_type is None:
            if self._durable:
                db._packs.sync()  # before the commit that names what they hold is durable
            conn.execute("COMMIT")
            commit = db._durability.committed(self._durable)
            if deleted:
                db._releasing.append((commit, deleted))
            if self._durable:
                db._release_synced()
        elif conn.in_transaction:
            conn.execute("ROLLBACK")


def _column_by_cid(
    conn: sqlite3.Connection, column: str, raws: Sequence[bytes]
) -> dict[bytes, int]:
    """`column` (an integer column of `blocks`) of each stored block among the binary CIDs
    `raws`."""
    found: dict[bytes, int] = {}
    for chunk in in_chunks(raws):
        sql = f"SELECT cid, {column} FROM blocks WHERE cid IN ({placeholders(len(chunk))})"
        found.update((bytes(raw), value) for raw, value in conn.execute(sql, chunk))
    return found


def _delete_rows(conn: sqlite3.Connection, ids: Sequence[int]) -> None:
    rows = [(i,) for i in ids]
    conn.executemany("DELETE FROM block_projects WHERE block = ?", rows)
    conn.executemany("DELETE FROM block_data WHERE id = ?", rows)
    conn.executemany("DELETE FROM block_places WHERE id = ?", rows)
    conn.executemany("DELETE FROM blocks WHERE id = ?", rows)


def _recover_packs(conn: sqlite3.Connection, packs: PackFiles) -> None:
    """Make the packs and the index agree after a crash (`PackFiles.recover`): index rows
    naming bytes a pack lost are deleted, so that those blocks are missing (a completion
    fetches them again) rather than unreadable."""
    places = conn.execute("SELECT pack, offset, size FROM block_places JOIN blocks USING (id)")
    lost = packs.recover(places)
    if not lost:
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        ids = [
            i
            for pack, offset in lost
            for (i,) in conn.execute(
                "SELECT id FROM block_places WHERE pack = ? AND offset = ?", (pack, offset)
            )
        ]
        _delete_rows(conn, ids)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    log.warning("%d blocks were cut off their pack by a crash and are missing again", len(ids))


def _close_all(conn: sqlite3.Connection, packs: PackFiles | None) -> None:
    conn.close()
    if packs is not None:
        packs.close()


def _tallies(conn: sqlite3.Connection) -> tuple[int, int, int]:
    """The use counter, the bytes and the blocks held, read in one pass over the table."""
    tick, held, count = conn.execute(
        "SELECT coalesce(max(used), 0), coalesce(sum(size), 0), count(*) FROM blocks"
    ).fetchone()
    return tick, held, count


def _insert_rows(
    conn: sqlite3.Connection, head: str, rows: Sequence[tuple[object, ...]], tail: str = ""
) -> None:
    """`head` followed by a `VALUES` list of `rows` (then `tail`), `INSERT_ROWS` rows per
    statement.

    One statement per slice rather than `executemany`'s one per row: each statement
    releases Python's lock while SQLite runs it, and getting it back while the network
    thread runs Python code takes up to the interpreter's switch interval (5 ms). Per row,
    a fetch's storing thread spent most of its time waiting for that lock, not writing.
    """
    if not rows:
        return
    marks = "(" + ",".join("?" * len(rows[0])) + ")"
    for start in range(0, len(rows), INSERT_ROWS):
        part = rows[start : start + INSERT_ROWS]
        conn.execute(
            f"{head} {','.join([marks] * len(part))}{tail}",
            [value for row in part for value in row],
        )


def _set_up(conn: sqlite3.Connection, path: Path) -> None:
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version == 0:
        if conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
            raise sqlite3.DatabaseError("it holds tables but no Ostrom schema version")
        # Set before the first table is created: the page size of a database is fixed then.
        conn.execute(f"PRAGMA page_size = {PAGE_SIZE}")
    elif version > BLOCK_SCHEMA_VERSION:
        raise sqlite3.DatabaseError(
            f"its schema version is {version}; this Ostrom reads up to version "
            f"{BLOCK_SCHEMA_VERSION} (a newer Ostrom wrote it)"
        )
    conn.execute(f"PRAGMA cache_size = -{_CACHE_KIB}")
    # WAL (see the module docstring); a file an older Ostrom left with a rollback journal
    # changes over here.
    mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        raise sqlite3.OperationalError(f"{path}: the file system does not support WAL ({mode})")
    # FULL by default: a commit syncs the log before it returns, so an acknowledged write
    # survives a crash of the process or of the machine. Fetched blocks lower it per
    # transaction (`_WriteTxn`).
    conn.execute("PRAGMA synchronous = FULL")
    page_size = int(conn.execute("PRAGMA page_size").fetchone()[0])
    conn.execute(f"PRAGMA wal_autocheckpoint = {WAL_AUTOCHECKPOINT_BYTES // page_size}")
    conn.execute(f"PRAGMA journal_size_limit = {WAL_KEEP_BYTES}")
    if version == 0:
        conn.executescript(
            f"BEGIN IMMEDIATE; {_SCHEMA} {_PLACES_SCHEMA}"
            f" PRAGMA user_version = {BLOCK_SCHEMA_VERSION}; COMMIT;"
        )
    elif version == 1:
        conn.executescript(
            f"BEGIN IMMEDIATE; {_PLACES_SCHEMA} PRAGMA user_version = {BLOCK_SCHEMA_VERSION};"
            " COMMIT;"
        )
