"""The node's store: signed records in one SQLite file, content blocks in another.

Blocks live in `ostrom.node.blockdb` (a file beside this one, see its docstring for why);
this class opens both and answers for both.

The daemon is the single owner of the store and calls this synchronous class from worker
threads under one lock: callers serialise every call, so the class holds no lock of its own
(the connection is opened with `check_same_thread=False` for that reason).

Durability: the database runs in WAL mode, and every write method is one transaction that
has committed when it returns; a `kill -9` at any moment loses nothing a method has
acknowledged and leaves no half-written batch. Every write has reached the disk when it
returns (`synchronous = FULL`) except records that peers sent (`put_rows(...,
durable=False)`: gossip and sync), which any peer holding them can send again: they reach it
at the next `sync`, which the node makes within seconds (`NodeService.serve_syncs`), or with
the next durable write. A power loss can roll back only those (`ostrom.node.walsync`); the
next sync with a peer brings them back.

Integrity: every read hashes the stored bytes and compares them with their CID; bytes that
no longer match raise `StoreCorrupt` and are never returned. Records were fully verified,
signature included, before they were stored, so a read checks the hash and decodes without
checking the signature again (that would cost an ed25519 verification per record).

CIDs are stored in their binary form. A CID's base32 text is a plain bit-by-bit rendering
of those bytes, so a text prefix fixes the leading bits of the binary CID: `resolve` turns a
prefix into a range of binary CIDs and scans the primary CID index, with no text column.

Speed: `put_records` is on the import hot path. It binds blobs as `bytearray` (CPython's
sqlite3 sends `bytes` and `None` parameters through its adapter lookup, about 0.4 us each,
and binds `bytearray` directly), uses one statement per record shape so that no column is
bound as NULL, and keeps each record's parents in a column of the record's own row rather
than in a separate table (an extra row per edge cost about 2 us per record).
"""

from __future__ import annotations

import logging
import sqlite3
import unicodedata
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Final

from ostrom.crypto.cid import CID, CID_LENGTH
from ostrom.errors import (
    Ambiguous,
    DecodeError,
    InvalidInput,
    InvalidRecord,
    NotFound,
    StoreCorrupt,
)
from ostrom.node.blockdb import OWN, BlockDB, blocks_path
from ostrom.node.ingest import ROW_CID, RecordRow, record_row
from ostrom.node.sqlbind import in_chunks, placeholders
from ostrom.node.walsync import WalDurability
from ostrom.protocol.meshes import SignedMeshRecord, decode_mesh_record
from ostrom.protocol.records import BODY_TYPES, Project, SignedRecord, decode_record

log = logging.getLogger(__name__)

# How a node follows a project: everything, or its records with blocks fetched on demand.
FOLLOW_MODES: Final = ("full", "records")
# PRAGMA user_version of the schema below; a store written with a newer version is refused
# rather than misread, an older one is migrated. Raise it with every schema change, and add
# the step from the previous version to _MIGRATIONS.
SCHEMA_VERSION: Final = 3
# Page cache of the store's one connection (negative = KiB). The cache fills up to this
# bound as the store is read and written and stays full, so it is resident memory of every
# busy daemon: 4 MiB keeps a node within its idle budget (the bare libp2p host + 25 MiB)
# and a soak's growth small, and holds the inner B-tree pages and recent writes. Pages past
# it come from the OS file cache: a walk of a 30k-record history took 10-30% longer than
# with 16 MiB, and a 100k-record catch-up no longer (docs/BENCHMARKS.md, the soak section).
_CACHE_KIB: Final = 4 * 1024
# Pages the record log holds before a commit checkpoints it (about 16 MB of 4 KiB pages).
# The node's checkpointer (`LOG_CHECKPOINT_DUE_BYTES`) copies the log at half that, so a
# commit only does it if the checkpointer falls behind or does not run (a store opened
# outside the daemon); `WAL_KEEP_BYTES` below stays far under it.
WAL_AUTOCHECKPOINT_PAGES: Final = 4000
# Bytes of record log file at which `checkpoint_log` is due: above `WAL_KEEP_BYTES`, so a
# restarted log is not due again at once, and half the commit's threshold, so that commits
# do not reach it. Following a busy project (20 records a second) the log grows by about
# 240 KB/s: a checkpoint every half minute. At 20 daemons (`bench.gossip`, docs/
# BENCHMARKS.md gossip step 15) checkpoints every 8 s (2 MiB) gave p99 1.05 s over 45 s of
# publishing, against 0.47-0.69 s with this (and 0.78 s with the old 4 MB threshold inside
# a commit). Why frequent copies cost so much is not known: the publishing node's own disk
# syncs were traced through the checkpoints and did not slow.
LOG_CHECKPOINT_DUE_BYTES: Final = 8 * 1024 * 1024
# Bytes of record log file kept when the log restarts after a checkpoint (SQLite keeps the
# whole file by default): well under `LOG_CHECKPOINT_DUE_BYTES`, so that the file's size tells
# `logs_have_room` that the log has room again.
WAL_KEEP_BYTES: Final = 1024 * 1024
# A commit that `logs_have_room` vouches for writes less than this to each log: a batch of
# gossiped records or a few small fetched blocks is tens of pages.
BRIEF_COMMIT_BYTES: Final = 512 * 1024
# A CID prefix shorter than this matches too much to be a deliberate reference.
MIN_PREFIX_LENGTH: Final = 4
# How many candidates an `Ambiguous` error lists.
_AMBIGUOUS_SHOWN: Final = 5
# The multibase prefix of base32 (lower case), which every CID text we show starts with.
_BASE32_PREFIX: Final = "b"
# The RFC 4648 base32 alphabet: each character carries 5 bits of the binary CID.
_BASE32_ALPHABET: Final = "abcdefghijklmnopqrstuvwxyz234567"
_BASE32_VALUE: Final = {ch: i for i, ch in enumerate(_BASE32_ALPHABET)}
_CID_BITS: Final = CID_LENGTH * 8
# Characters after the multibase prefix in a full CID text: ceil(288 / 5).
_CID_TEXT_DIGITS: Final = -(-_CID_BITS // 5)

_SCHEMA: Final = """
CREATE TABLE records (
    id INTEGER PRIMARY KEY,
    cid BLOB NOT NULL UNIQUE,
    type TEXT NOT NULL,
    project BLOB NOT NULL,   -- the genesis CID; a genesis holds its own CID
    author BLOB NOT NULL,
    ts INTEGER NOT NULL,
    parents BLOB NOT NULL,   -- the binary CIDs of `parents`, concatenated (36 bytes each)
    target BLOB,             -- validations and comments
    fork_of BLOB,            -- genesis records of forks: the parent project
    name TEXT,               -- genesis records: the project name
    data BLOB NOT NULL       -- the signed record's canonical bytes
);
CREATE INDEX records_project ON records (project, type);
CREATE INDEX records_target ON records (target) WHERE target IS NOT NULL;
CREATE INDEX records_fork_of ON records (fork_of) WHERE fork_of IS NOT NULL;
CREATE INDEX records_genesis ON records (name) WHERE type = 'project';
CREATE TABLE follows (
    project BLOB PRIMARY KEY,  -- the genesis CID; the project may not be here yet
    mode TEXT NOT NULL,        -- 'full' (records and blocks) or 'records' (blocks on demand)
    since INTEGER NOT NULL     -- ms since the epoch, when this node began to follow
);
"""

# Community meshes (schema version 2): their descriptions and membership records, and the
# meshes this node has joined.
_MESH_SCHEMA: Final = """
CREATE TABLE mesh_records (
    cid BLOB PRIMARY KEY,
    mesh BLOB NOT NULL,      -- the description's CID; a description holds its own
    type TEXT NOT NULL,      -- 'mesh' or 'membership'
    data BLOB NOT NULL       -- the signed record's canonical bytes
);
CREATE INDEX mesh_records_mesh ON mesh_records (mesh, type);
CREATE TABLE meshes_joined (
    mesh BLOB PRIMARY KEY,
    since INTEGER NOT NULL   -- ms since the epoch, when this node joined
);
"""
# Old blocks moved to the block file per transaction: 64 blocks are 16 MiB of 256 KiB blocks.
_MOVE_BLOCKS: Final = 64
# From each schema version, the script that brings a store to the next one. Versions 1 and 2
# kept blocks in a table of this file; before the step from 2, `_move_blocks` has copied
# every block to the block file.
_MIGRATIONS: Final = {1: _MESH_SCHEMA, 2: "DROP TABLE blocks;"}

# One insert per record shape, so that no row binds a NULL (see the module docstring). A
# record already stored is skipped by the conflict clause; any other violation still raises.
_ON_CID_CONFLICT: Final = " ON CONFLICT (cid) DO NOTHING"
_INSERT_PLAIN: Final = (
    "INSERT INTO records (cid, type, project, author, ts, parents, data)"
    " VALUES (?, ?, ?, ?, ?, ?, ?)" + _ON_CID_CONFLICT
)
_INSERT_TARGETED: Final = (
    "INSERT INTO records (cid, type, project, author, ts, parents, target, data)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)" + _ON_CID_CONFLICT
)
_INSERT_GENESIS: Final = (
    "INSERT INTO records (cid, type, project, author, ts, parents, fork_of, name, data)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)" + _ON_CID_CONFLICT
)
_RECORD_COLUMNS: Final = "cid, data"
_OLDEST_FIRST: Final = "ORDER BY ts, cid"


@dataclass(frozen=True, slots=True)
class StoreStats:
    """What the store holds: record counts by type, projects, blocks and bytes on disk."""

    records_by_type: dict[str, int] = field(hash=False)
    projects: int
    blocks: int
    block_bytes: int
    db_bytes: int  # the database files plus the write-ahead log

    def __post_init__(self) -> None:
        counts = [*self.records_by_type.values(), self.projects, self.blocks]
        if any(n < 0 for n in counts) or self.block_bytes < 0 or self.db_bytes < 0:
            raise InvalidInput("store statistics are never negative")

    @property
    def records(self) -> int:
        return sum(self.records_by_type.values())


def _trusted(public_key: bytes, signature: bytes, domain: bytes, payload: bytes) -> None:
    """The signature check for records read back: they were verified before being stored."""


def _checked_record_bytes(raw: bytes, data: bytes) -> tuple[CID, bytes]:
    """A stored record's CID and bytes, checked against each other (not decoded)."""
    cid = _stored_cid(raw, "record")
    data = bytes(data)
    if not cid.matches(data):
        raise StoreCorrupt(f"record {cid}: stored bytes do not match its CID")
    return cid, data


def _stored_cid(raw: bytes, kind: str) -> CID:
    try:
        return CID(raw)
    except DecodeError:
        raise StoreCorrupt(f"a stored {kind} has a malformed CID ({raw[:8].hex()}...)") from None


def _decode_stored(cid: CID, data: bytes) -> SignedRecord:
    """Check stored record bytes against their CID, then decode them without the signature."""
    if not cid.matches(data):
        raise StoreCorrupt(f"record {cid}: stored bytes do not match its CID")
    try:
        return decode_record(data, verify=_trusted)
    except (DecodeError, InvalidRecord) as exc:
        raise StoreCorrupt(f"record {cid} no longer decodes: {exc.message}") from None


def _check_types(types: Collection[str] | None) -> list[str] | None:
    if types is None:
        return None
    if isinstance(types, str):
        raise InvalidInput("types is a collection of record type names, not one string")
    unknown = sorted(set(types) - BODY_TYPES.keys())
    if unknown:
        known = ", ".join(BODY_TYPES)
        raise InvalidInput(f"unknown record type {unknown[0]!r} (known: {known})")
    return sorted(set(types))


def _prefix_range(prefix: str) -> tuple[bytes, bytes]:
    """The lowest and highest binary CID whose text starts with `prefix` (lower case, no 'b')."""
    value = 0
    for ch in prefix:
        digit = _BASE32_VALUE.get(ch)
        if digit is None:
            raise DecodeError(
                f"not a CID or CID prefix: {ch!r} is not a base32 character (a-z, 2-7)"
            )
        value = value << 5 | digit
    free = _CID_BITS - 5 * len(prefix)
    low = value << free
    high = low | ((1 << free) - 1)
    return low.to_bytes(CID_LENGTH, "big"), high.to_bytes(CID_LENGTH, "big")


class Store:
    """Signed records and content blocks, verified against their CIDs on every read.

    Not thread-safe by itself: the daemon serialises all calls (see the module docstring).
    """

    def __init__(self, conn: sqlite3.Connection, path: Path, blocks: BlockDB) -> None:
        """Use `Store.open`; this takes a connection that `open` has already set up."""
        self._conn = conn
        self._path = path
        self._closed = False
        self.blocks = blocks
        self._durability = WalDurability(conn, path)

    # --- lifecycle -----------------------------------------------------------------------------

    @classmethod
    def open(cls, path: Path) -> Store:
        """Open the store at `path` (and its block file beside it), creating the files and
        their schemas if they do not exist, migrating an older store."""
        try:
            conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise InvalidInput(f"cannot open the store at {path}: {exc}") from None
        blocks: BlockDB | None = None
        try:
            _check_version(conn)
            blocks = BlockDB.open(blocks_path(path))
            _set_up(conn, path, blocks)
        except sqlite3.OperationalError as exc:
            _close_both(conn, blocks)
            raise InvalidInput(f"cannot open the store at {path}: {exc}") from None
        except sqlite3.DatabaseError as exc:
            _close_both(conn, blocks)
            raise StoreCorrupt(f"{path} is not a readable Ostrom store: {exc}") from None
        except BaseException:
            _close_both(conn, blocks)
            raise
        return cls(conn, path, blocks)

    def close(self) -> None:
        """Close the store; closing twice is harmless."""
        if self._closed:
            return
        self._closed = True
        self._durability.close()
        try:
            self._conn.execute("PRAGMA optimize")
        finally:
            _close_both(self._conn, self.blocks)

    def __enter__(self) -> Store:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def path(self) -> Path:
        return self._path

    @contextmanager
    def _write(self, *, durable: bool = True) -> Iterator[sqlite3.Connection]:
        """One write transaction; committed (and, if `durable`, synced) when the block ends
        without error."""
        conn = self._conn
        self._durability.begin(durable)
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
            conn.execute("COMMIT")
            self._durability.committed(durable)
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    # --- records -------------------------------------------------------------------------------

    def put_records(self, records: Sequence[SignedRecord]) -> list[CID]:
        """Store verified records in one transaction; return the CIDs that were new, in order.

        Records already stored (or repeated in the batch) are skipped, so a retry is harmless.
        """
        unique: dict[bytes, SignedRecord] = {}
        for record in records:
            unique.setdefault(record.cid.raw, record)
        new = self.put_rows([record_row(record) for record in unique.values()])
        return [unique[raw].cid for raw in new]

    def logs_have_room(self) -> bool:
        """Whether a commit writing less than `BRIEF_COMMIT_BYTES` to either file's log is
        sure not to checkpoint it: then the commit costs no disk sync unless it is durable.
        `NodeService.db_brief` runs such commits on the event loop only then."""
        return self._durability.has_room(BRIEF_COMMIT_BYTES) and self.blocks.log_has_room(
            BRIEF_COMMIT_BYTES
        )

    def log_checkpoint_due(self) -> bool:
        """Whether the record log has grown enough for `checkpoint_log`."""
        return self._durability.checkpoint_due(LOG_CHECKPOINT_DUE_BYTES)

    def checkpoint_log(self) -> bool:
        """Copy the record log into the database (`WalDurability.checkpoint`): unlike
        every other method, safe to call on another thread while a call runs, without the
        callers' lock. True if the whole log was copied. A checkpoint that fails (a full
        disk) is logged and leaves the log as it was, for the next, or for the commit that
        reaches `WAL_AUTOCHECKPOINT_PAGES`, which then fails as loudly as any write."""
        try:
            return self._durability.checkpoint()
        except sqlite3.Error as exc:
            log.warning("checkpoint of the store's log at %s failed: %s", self._path, exc)
            return False

    @property
    def unsynced(self) -> bool:
        """Whether some commit of records may not be on disk yet (records from peers, not
        yet `sync`ed)."""
        return self._durability.unsynced

    def sync(self) -> None:
        """Put every record committed so far on disk (`WalDurability.sync`); may be called
        from any thread while the writing thread keeps writing."""
        self._durability.sync()

    def put_rows(self, rows: Sequence[RecordRow], *, durable: bool = True) -> list[bytes]:
        """`put_records` for records given as their rows (`ostrom.node.ingest.record_row`);
        returns the binary CIDs that were new, in order. Not `durable`: records a peer
        sent, on disk only at the next `sync` (see the module docstring)."""
        unique: dict[bytes, RecordRow] = {}
        for row in rows:
            unique.setdefault(row[ROW_CID], row)
        if not unique:
            return []
        plain: list[tuple[object, ...]] = []
        targeted: list[tuple[object, ...]] = []
        genesis: list[tuple[object, ...]] = []
        for cid, kind, project, author, ts, parents, target, fork_of, name, data in unique.values():
            head = (
                bytearray(cid),
                kind,
                bytearray(project),
                bytearray(author),
                ts,
                bytearray(parents),
            )
            if kind == Project.TYPE:
                forks = None if fork_of is None else bytearray(fork_of)
                genesis.append((*head, forks, name, bytearray(data)))
            elif target is not None:
                targeted.append((*head, bytearray(target), bytearray(data)))
            else:
                plain.append((*head, bytearray(data)))
        with self._write(durable=durable) as conn:
            # Rows get ids above the highest id so far (INTEGER PRIMARY KEY picks max + 1 and
            # this transaction is the only writer), so the rows above `top` are the new ones.
            top = conn.execute("SELECT coalesce(max(id), 0) FROM records").fetchone()[0]
            inserted = 0
            for sql, values in (
                (_INSERT_PLAIN, plain),
                (_INSERT_TARGETED, targeted),
                (_INSERT_GENESIS, genesis),
            ):
                if values:
                    inserted += conn.executemany(sql, values).rowcount
            if inserted == len(unique):  # the usual case on import: every record was new
                return list(unique)
            new = {raw for (raw,) in conn.execute("SELECT cid FROM records WHERE id > ?", (top,))}
        return [raw for raw in unique if raw in new]

    def get_record(self, cid: CID) -> SignedRecord | None:
        row = self._conn.execute("SELECT data FROM records WHERE cid = ?", (cid.raw,)).fetchone()
        return None if row is None else _decode_stored(cid, row[0])

    def records_size(self, cids: Iterable[CID]) -> int:
        """The size in bytes of the stored records among `cids`, from each row's header:
        SQLite's `length()` of a blob does not read the blob."""
        total = 0
        for chunk in in_chunks(list({c.raw for c in cids})):
            sql = f"SELECT sum(length(data)) FROM records WHERE cid IN ({placeholders(len(chunk))})"
            (found,) = self._conn.execute(sql, chunk).fetchone()
            total += found or 0
        return total

    def get_records(self, cids: Iterable[CID]) -> dict[CID, SignedRecord]:
        """The stored records among `cids`; missing ones are absent from the result."""
        wanted = list({c.raw for c in cids})
        out: dict[CID, SignedRecord] = {}
        for chunk in in_chunks(wanted):
            sql = f"SELECT {_RECORD_COLUMNS} FROM records WHERE cid IN ({placeholders(len(chunk))})"
            for raw, data in self._conn.execute(sql, chunk).fetchall():
                cid = _stored_cid(raw, "record")
                out[cid] = _decode_stored(cid, data)
        return out

    def get_record_bytes(self, cids: Iterable[CID]) -> dict[CID, bytes]:
        """The stored bytes of the records among `cids`, checked against their CIDs but not
        decoded: what a peer is sent, which it verifies itself."""
        wanted = list({c.raw for c in cids})
        out: dict[CID, bytes] = {}
        for chunk in in_chunks(wanted):
            sql = f"SELECT cid, data FROM records WHERE cid IN ({placeholders(len(chunk))})"
            for raw, data in self._conn.execute(sql, chunk).fetchall():
                cid, checked = _checked_record_bytes(raw, data)
                out[cid] = checked
        return out

    def get_record_bytes_in(
        self, cids: Iterable[CID], project: bytes
    ) -> tuple[dict[CID, bytes], dict[CID, bytes]]:
        """`get_record_bytes`, and for those of the records found that are not records of
        `project` (a binary CID), their project: what a sync responder that checks whom a
        record may go to needs, at next to no cost for the session's own records."""
        wanted = list({c.raw for c in cids})
        out: dict[CID, bytes] = {}
        others: dict[CID, bytes] = {}
        for chunk in in_chunks(wanted):
            sql = (
                "SELECT cid, data, CASE WHEN project = ? THEN NULL ELSE project END FROM records"
                f" WHERE cid IN ({placeholders(len(chunk))})"
            )
            for raw, data, other in self._conn.execute(sql, [project, *chunk]).fetchall():
                cid, checked = _checked_record_bytes(raw, data)
                out[cid] = checked
                if other is not None:
                    others[cid] = bytes(other)
        return out, others

    def has_records(self, cids: Iterable[CID]) -> set[CID]:
        """Which of `cids` are stored records (without reading or checking their bytes)."""
        by_raw = {c.raw: c for c in cids}
        return {by_raw[raw] for raw in self._present(self._conn, "records", list(by_raw))}

    def record_projects(self, cids: Iterable[CID]) -> dict[CID, CID]:
        """The project of each stored one of `cids` (a genesis is its own), from the index
        column: the records are not read."""
        by_raw = {c.raw: c for c in cids}
        out: dict[CID, CID] = {}
        for chunk in in_chunks(list(by_raw)):
            sql = f"SELECT cid, project FROM records WHERE cid IN ({placeholders(len(chunk))})"
            for raw, project in self._conn.execute(sql, chunk).fetchall():
                out[by_raw[bytes(raw)]] = _stored_cid(project, "record's project")
        return out

    def project_records(
        self, project: CID, types: Collection[str] | None = None
    ) -> list[SignedRecord]:
        """The records of `project` (its genesis too when `types` allows "project").

        Ordered by timestamp, then CID: a stable order, not a causal one.
        """
        type_list = _check_types(types)
        if type_list == []:
            return []
        sql = f"SELECT {_RECORD_COLUMNS} FROM records WHERE project = ?"
        params: list[object] = [project.raw]
        if type_list is not None:
            sql += f" AND type IN ({placeholders(len(type_list))})"
            params.extend(type_list)
        records = self._decode_rows(self._conn.execute(sql + f" {_OLDEST_FIRST}", params))
        for record in records:
            if record.project != project:
                raise StoreCorrupt(f"record {record.cid} is indexed under the wrong project")
        return records

    def project_cids(self, project: CID) -> list[CID]:
        """The CIDs of every record of `project`, sorted by their bytes, without reading them."""
        rows = self._conn.execute(
            "SELECT cid FROM records WHERE project = ? ORDER BY cid", (project.raw,)
        ).fetchall()
        return [_stored_cid(raw, "record") for (raw,) in rows]

    def records_by_target(self, target: CID) -> list[SignedRecord]:
        """The validations and comments of the record `target`, by timestamp then CID."""
        rows = self._conn.execute(
            f"SELECT {_RECORD_COLUMNS} FROM records WHERE target = ? {_OLDEST_FIRST}",
            (target.raw,),
        )
        records = self._decode_rows(rows)
        for record in records:
            if record.target != target:
                raise StoreCorrupt(f"record {record.cid} is indexed under the wrong target")
        return records

    def projects(self) -> list[SignedRecord]:
        """Every genesis record, oldest first (by timestamp, then CID)."""
        return self._genesis("", ())

    def projects_named(self, name: str) -> list[SignedRecord]:
        """The genesis records named exactly `name` (after NFC normalisation), oldest first."""
        wanted = unicodedata.normalize("NFC", name.strip())
        found = self._genesis(" AND name = ?", (wanted,))
        for record in found:
            if not isinstance(record.body, Project) or record.body.name != wanted:
                raise StoreCorrupt(f"record {record.cid} is indexed under the wrong name")
        return found

    def forks_of(self, project: CID) -> list[SignedRecord]:
        """The genesis records of the direct forks of `project`, oldest first."""
        found = self._genesis(" AND fork_of = ?", (project.raw,))
        for record in found:
            body = record.body
            if (
                not isinstance(body, Project)
                or body.fork_of is None
                or (body.fork_of.project != project)
            ):
                raise StoreCorrupt(f"record {record.cid} is indexed as a fork it is not")
        return found

    def _genesis(self, where: str, params: tuple[object, ...]) -> list[SignedRecord]:
        sql = f"SELECT {_RECORD_COLUMNS} FROM records WHERE type = 'project'{where} {_OLDEST_FIRST}"
        found = self._decode_rows(self._conn.execute(sql, params))
        for record in found:
            if not isinstance(record.body, Project):
                raise StoreCorrupt(f"record {record.cid} is indexed as a genesis but is not one")
        return found

    def resolve(self, text: str, *, types: Collection[str] | None = None) -> CID:
        """The stored record named by a full CID text or a unique prefix of one.

        A prefix needs at least `MIN_PREFIX_LENGTH` characters. `types` limits the candidates
        (e.g. `{"project"}`). Raises `NotFound`, `Ambiguous` (naming up to five candidates),
        `DecodeError` for text that cannot be part of a CID, `InvalidInput` for too short a
        prefix. A full CID that is not stored is `NotFound`: use `CID.parse` to name a
        record this store does not hold.
        """
        type_list = _check_types(types)
        wanted = text.strip()
        what = "record" if type_list is None else " or ".join(type_list)
        if len(wanted) == 1 + _CID_TEXT_DIGITS:
            cid = CID.parse(wanted)
            low = high = cid.raw
        else:
            if len(wanted) < MIN_PREFIX_LENGTH:
                raise InvalidInput(
                    f"{wanted!r} is too short to name a record: give at least "
                    f"{MIN_PREFIX_LENGTH} characters of its CID"
                )
            prefix = wanted.lower()
            if not prefix.startswith(_BASE32_PREFIX):
                raise DecodeError(
                    f"not a CID or CID prefix: {wanted!r} (record CIDs start with 'bafy')"
                )
            if len(prefix) > 1 + _CID_TEXT_DIGITS:
                raise DecodeError(f"not a CID: {wanted!r} is longer than a CID")
            low, high = _prefix_range(prefix[1:])
        sql = "SELECT cid, type FROM records WHERE cid BETWEEN ? AND ?"
        params: list[object] = [low, high]
        if type_list is not None:
            if not type_list:
                raise NotFound(f"no {what} matches {wanted!r}")
            sql += f" AND type IN ({placeholders(len(type_list))})"
            params.extend(type_list)
        sql += f" ORDER BY cid LIMIT {_AMBIGUOUS_SHOWN + 1}"
        rows = self._conn.execute(sql, params).fetchall()
        if not rows:
            raise NotFound(f"no {what} in this store matches {wanted!r}")
        if len(rows) > 1:
            shown = [f"{_stored_cid(raw, 'record')} ({kind})" for raw, kind in rows]
            more = ", and more" if len(rows) > _AMBIGUOUS_SHOWN else ""
            raise Ambiguous(
                f"{wanted!r} matches several records: "
                f"{', '.join(shown[:_AMBIGUOUS_SHOWN])}{more}; give more characters"
            )
        return _stored_cid(rows[0][0], "record")

    def project_history(
        self, project: CID, types: Collection[str] | None = None
    ) -> dict[CID, SignedRecord]:
        """The records of `project` (of `types`) and every stored record their history
        reaches: their parents' ancestry and, for a fork, the upstream records it forks at.

        This is what acceptance, tree replay, export and block completion all work over.
        """
        own = self.project_records(project, types)
        known = {record.cid for record in own}
        # Only links that leave the records already read are walked: in a project of 100k
        # records this skips reading and decoding every one of them a second time.
        edges = {parent for record in own for parent in record.parents if parent not in known}
        genesis = self.get_record(project)
        if genesis is not None:
            edges.update(genesis.parents)
        history = self.ancestors(edges, known=known)
        history.update((record.cid, record) for record in own)
        return history

    def ancestors(
        self, heads: Iterable[CID], *, known: Collection[CID] = ()
    ) -> dict[CID, SignedRecord]:
        """The stored records reachable from `heads` through `parents`, the heads included;
        the walk does not enter `known` records (the caller has them and their ancestry).

        A breadth-first walk with one batched query per `IN_CHUNK` CIDs of each generation. It
        follows each record's verified `parents` and stops at records this store does not
        hold (their parents are unknown). A fork's genesis has the heads it forked at as
        parents, so the walk crosses into the parent project.
        """
        out: dict[CID, SignedRecord] = {}

        def visit(raw: bytes, parents: bytes, data: bytes) -> Iterable[bytes]:
            cid = _stored_cid(raw, "record")
            record = out[cid] = _decode_stored(cid, data)
            return (p.raw for p in record.parents)

        self._walk(heads, "data", visit, known)
        return out

    def ancestor_cids(self, heads: Iterable[CID]) -> set[CID]:
        """The CIDs `ancestors` would return, without reading or decoding the records.

        It follows the parents column, trusting it rather than re-checking it against each
        record's bytes (which is what makes it cheaper).
        """
        found: list[bytes] = []

        def visit(raw: bytes, parents: bytes, data: bytes) -> Iterable[bytes]:
            if len(parents) % CID_LENGTH:
                raise StoreCorrupt("a stored record's parents column is not a list of CIDs")
            found.append(raw)
            return (parents[i : i + CID_LENGTH] for i in range(0, len(parents), CID_LENGTH))

        self._walk(heads, "NULL", visit)
        return {_stored_cid(raw, "record") for raw in found}

    def project_links(self, project: CID) -> list[tuple[bytes, bytes]]:
        """(binary CID, parents column) of every record of `project`, without reading the
        records: what building the project's sync set needs (`ostrom.protocol.syncset`)."""
        rows = self._conn.execute(
            "SELECT cid, parents FROM records WHERE project = ?", (project.raw,)
        ).fetchall()
        out = [(bytes(raw), bytes(parents)) for raw, parents in rows]
        if any(len(parents) % CID_LENGTH for _, parents in out):
            raise StoreCorrupt("a stored record's parents column is not a list of CIDs")
        return out

    def reach(
        self, start: Iterable[bytes], inside: Callable[[bytes], bool]
    ) -> tuple[list[bytes], set[bytes]]:
        """Walk `parents` from the binary CIDs `start` through stored records, without
        entering those `inside` accepts: returns the stored records reached (`start`'s
        included) and the CIDs reached that are not stored.

        Like `ancestor_cids` it trusts the parents column. `inside` is called from the
        calling thread; what it reads must not change during the walk.
        """
        frontier = [raw for raw in set(start) if not inside(raw)]
        seen = set(frontier)
        found: list[bytes] = []
        absent: set[bytes] = set()
        # Each pass queries only CIDs never queried before: at most one pass per record.
        while frontier:
            following: list[bytes] = []
            for chunk in in_chunks(frontier):
                sql = f"SELECT cid, parents FROM records WHERE cid IN ({placeholders(len(chunk))})"
                stored: set[bytes] = set()
                for raw, parents in self._conn.execute(sql, chunk).fetchall():
                    if len(parents) % CID_LENGTH:
                        raise StoreCorrupt("a stored record's parents column is not a list of CIDs")
                    stored.add(raw)
                    for i in range(0, len(parents), CID_LENGTH):
                        parent = bytes(parents[i : i + CID_LENGTH])
                        if parent not in seen and not inside(parent):
                            seen.add(parent)
                            following.append(parent)
                found.extend(stored)
                absent.update(raw for raw in map(bytes, chunk) if raw not in stored)
            frontier = following
        return found, absent

    def _walk(
        self,
        heads: Iterable[CID],
        data_column: str,
        visit: Callable[[bytes, bytes, bytes], Iterable[bytes]],
        known: Collection[CID] = (),
    ) -> None:
        """Call `visit(cid, parents, data)` once per stored record reachable from `heads`
        without passing through `known` records.

        `visit` returns the record's parents to walk on to.
        """
        frontier = list({c.raw for c in heads} - {c.raw for c in known})
        seen = {c.raw for c in known} | set(frontier)
        # Each pass queries only CIDs never queried before, so there are at most as many
        # passes as stored records (and a content-addressed history has no cycles anyway).
        while frontier:
            following: list[bytes] = []
            for chunk in in_chunks(frontier):
                sql = (
                    f"SELECT cid, parents, {data_column} FROM records"
                    f" WHERE cid IN ({placeholders(len(chunk))})"
                )
                for raw, parents, data in self._conn.execute(sql, chunk).fetchall():
                    for parent in visit(raw, parents, data):
                        if parent not in seen:
                            seen.add(parent)
                            following.append(parent)
            frontier = following

    def record_count(self, project: CID | None = None) -> int:
        if project is None:
            row = self._conn.execute("SELECT count(*) FROM records").fetchone()
        else:
            row = self._conn.execute(
                "SELECT count(*) FROM records WHERE project = ?", (project.raw,)
            ).fetchone()
        return int(row[0])

    # --- blocks --------------------------------------------------------------------------------

    def put_blocks(self, blocks: Sequence[tuple[CID, bytes]], project: bytes = OWN) -> int:
        """Verify every block against its CID, then store the batch in one transaction, kept
        for `project` (this node's own blocks by default: they are never evicted).

        One bad block (`BlockMismatch`, `TooLarge`) refuses the whole batch before anything
        is written. Returns how many blocks were new; blocks already stored are skipped.
        (`blocks.put` stores within limits, attributed to a project; see `BlockDB`.)
        """
        return self.blocks.put(blocks, project=project).new

    def get_block(self, cid: CID, *, touch: bool = False) -> bytes | None:
        """A block's bytes, checked against its CID; `touch`: read for the owner (see
        `BlockDB.get`)."""
        return self.blocks.get(cid, touch=touch)

    def has_blocks(self, cids: Iterable[CID]) -> set[CID]:
        """Which of `cids` are stored blocks (without reading or checking their bytes)."""
        return self.blocks.has(cids)

    # --- statistics ----------------------------------------------------------------------------

    # --- follows -------------------------------------------------------------------------

    def follow(self, project: CID, mode: str, since: int) -> None:
        """Follow `project` (or change how); `mode` is 'full' or 'records'."""
        if mode not in FOLLOW_MODES:
            raise InvalidInput(f"follow mode must be one of {', '.join(FOLLOW_MODES)}")
        with self._write() as conn:
            conn.execute(
                "INSERT INTO follows (project, mode, since) VALUES (?, ?, ?) "
                "ON CONFLICT (project) DO UPDATE SET mode = excluded.mode",
                (project.raw, mode, since),
            )

    def unfollow(self, project: CID) -> bool:
        """Stop following `project`; False if it was not followed."""
        with self._write() as conn:
            return (
                conn.execute("DELETE FROM follows WHERE project = ?", (project.raw,)).rowcount > 0
            )

    def follow_mode(self, project: CID) -> str | None:
        """How this node follows `project`, or None if it does not."""
        row = self._conn.execute("SELECT mode FROM follows WHERE project = ?", (project.raw,))
        found = row.fetchone()
        return None if found is None else str(found[0])

    def follows(self) -> dict[CID, str]:
        """Every followed project and its mode, oldest follow first."""
        rows = self._conn.execute("SELECT project, mode FROM follows ORDER BY since, project")
        return {CID(bytes(project)): mode for project, mode in rows}

    # --- community meshes ----------------------------------------------------------------------

    def put_mesh_records(self, records: Sequence[SignedMeshRecord]) -> list[CID]:
        """Store verified mesh records; return the CIDs of those that were new."""
        new: list[CID] = []
        with self._write() as conn:
            for record in records:
                cursor = conn.execute(
                    "INSERT INTO mesh_records (cid, mesh, type, data) VALUES (?, ?, ?, ?)"
                    " ON CONFLICT (cid) DO NOTHING",
                    (record.cid.raw, record.mesh.raw, record.body.TYPE, record.data),
                )
                if cursor.rowcount:
                    new.append(record.cid)
        return new

    def mesh_records(self, mesh: CID) -> list[SignedMeshRecord]:
        """A mesh's description (first, if present) and its membership records, verified."""
        rows = self._conn.execute(
            "SELECT cid, data FROM mesh_records WHERE mesh = ? ORDER BY type = 'membership', cid",
            (mesh.raw,),
        ).fetchall()
        out = []
        for raw, data in rows:
            cid = _stored_cid(raw, "mesh record")
            if not cid.matches(data):
                raise StoreCorrupt(f"mesh record {cid} does not match its CID")
            out.append(decode_mesh_record(bytes(data)))
        return out

    def join_mesh(self, mesh: CID, since: int) -> None:
        with self._write() as conn:
            conn.execute(
                "INSERT INTO meshes_joined (mesh, since) VALUES (?, ?)"
                " ON CONFLICT (mesh) DO NOTHING",
                (mesh.raw, since),
            )

    def leave_mesh(self, mesh: CID) -> bool:
        """Stop being in `mesh`; its records stay. True if this node was in it."""
        with self._write() as conn:
            return (
                conn.execute("DELETE FROM meshes_joined WHERE mesh = ?", (mesh.raw,)).rowcount > 0
            )

    def joined_meshes(self) -> list[CID]:
        """The meshes this node is in, oldest first."""
        rows = self._conn.execute("SELECT mesh FROM meshes_joined ORDER BY since, mesh")
        return [CID(bytes(raw)) for (raw,) in rows]

    def size_bytes(self) -> int:
        """Bytes the store holds: the record file's pages (free pages, which new data reuses,
        not counted) and the size of every block."""
        return self.record_bytes() + self.blocks.usage()[1]

    def record_bytes(self) -> int:
        """Bytes the record file's pages hold (free pages not counted)."""
        conn = self._conn
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        free = conn.execute("PRAGMA freelist_count").fetchone()[0]
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        return (int(pages) - int(free)) * int(page_size)

    def stats(self) -> StoreStats:
        conn = self._conn
        by_type = {
            str(kind): int(n)
            for kind, n in conn.execute("SELECT type, count(*) FROM records GROUP BY type")
        }
        blocks, block_bytes = self.blocks.usage()
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        wal = Path(f"{self._path}-wal")
        wal_bytes = wal.stat().st_size if wal.exists() else 0
        return StoreStats(
            records_by_type=by_type,
            projects=by_type.get(Project.TYPE, 0),
            blocks=int(blocks),
            block_bytes=int(block_bytes),
            db_bytes=int(pages) * int(page_size) + wal_bytes + self.blocks.file_bytes(),
        )

    # --- helpers -------------------------------------------------------------------------------

    @staticmethod
    def _present(conn: sqlite3.Connection, table: str, raws: Sequence[bytes]) -> set[bytes]:
        found: set[bytes] = set()
        for chunk in in_chunks(raws):
            sql = f"SELECT cid FROM {table} WHERE cid IN ({placeholders(len(chunk))})"
            found.update(raw for (raw,) in conn.execute(sql, chunk).fetchall())
        return found

    @staticmethod
    def _decode_rows(cursor: sqlite3.Cursor) -> list[SignedRecord]:
        # fetchall first: the statement is finished before a corrupt row can raise.
        rows: list[tuple[bytes, bytes]] = cursor.fetchall()
        return [_decode_stored(_stored_cid(raw, "record"), data) for raw, data in rows]


def _run_script(conn: sqlite3.Connection, script: str) -> None:
    """Run `script` as one transaction."""
    try:
        conn.executescript(f"BEGIN IMMEDIATE; {script} COMMIT;")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _close_both(conn: sqlite3.Connection, blocks: BlockDB | None) -> None:
    try:
        if blocks is not None:
            blocks.close()
    finally:
        conn.close()


def _check_version(conn: sqlite3.Connection) -> None:
    """Refuse a file that is not a store this Ostrom reads, before its block file is made."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise sqlite3.DatabaseError(
            f"its schema version is {version}; this Ostrom reads up to version "
            f"{SCHEMA_VERSION} (a newer Ostrom wrote it)"
        )
    if version == 0 and conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
        raise sqlite3.DatabaseError("it holds tables but no Ostrom schema version")


def _move_blocks(conn: sqlite3.Connection, blocks: BlockDB) -> None:
    """Copy the blocks of a version 1 or 2 store to the block file, a batch per transaction.

    The old table is dropped only afterwards (by the migration step), so a crash in between
    leaves every block readable and the copy resumes (copying a block twice is harmless).
    """
    last = 0
    while True:
        rows = conn.execute(
            "SELECT id, cid, data FROM blocks WHERE id > ? ORDER BY id LIMIT ?",
            (last, _MOVE_BLOCKS),
        ).fetchall()
        if not rows:
            return
        blocks.import_rows([(bytes(raw), bytes(data)) for _, raw, data in rows])
        last = rows[-1][0]


def _set_up(conn: sqlite3.Connection, path: Path, blocks: BlockDB) -> None:
    """Configure a fresh connection and create or check the schema."""
    mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        raise sqlite3.OperationalError(f"{path}: the file system does not support WAL ({mode})")
    # FULL: a WAL commit is synced before it returns, so an acknowledged write survives a
    # crash of the process or of the machine.
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute(f"PRAGMA cache_size = -{_CACHE_KIB}")
    conn.execute(f"PRAGMA wal_autocheckpoint = {WAL_AUTOCHECKPOINT_PAGES}")
    conn.execute(f"PRAGMA journal_size_limit = {WAL_KEEP_BYTES}")
    # `_check_version` has refused what this Ostrom does not read.
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version == 0:
        _run_script(conn, f"{_SCHEMA} {_MESH_SCHEMA} PRAGMA user_version = {SCHEMA_VERSION};")
        version = SCHEMA_VERSION
    while version < SCHEMA_VERSION:
        if version == 2:
            _move_blocks(conn, blocks)
        # One transaction per step: a crash leaves the store at a version it can resume from.
        _run_script(conn, f"{_MIGRATIONS[version]} PRAGMA user_version = {version + 1};")
        version += 1
