"""Which commits of an SQLite file in WAL mode have reached the disk.

The node's two files (records, blocks) each take two kinds of writes: *durable* ones, which
commit with `synchronous = FULL` (the log is synced before the commit returns), and writes
of what peers sent, which any peer holding it can send again, committed with `synchronous =
NORMAL` (the commit reaches the operating system, not the disk) and put on disk later, many
at once, by `sync`. SQLite sets `synchronous` per connection, so the writing connection is
switched before each transaction that needs the other setting.

SQLite's WAL stays consistent under `synchronous = NORMAL` through a power loss: frames carry
checksums, recovery keeps the log up to the last commit whose frames are all intact, and the
database file itself changes only at a checkpoint, after the log it copies from was synced.
So a power loss can only roll back the unsynced commits at the log's end; a `kill -9` loses
nothing (the operating system holds the writes). Syncing the log at a durable commit syncs
every frame before it too, so a durable write is never lost, nor anything written before it.

Checkpoints: the writing connection copies the log into the database inside the commit that
takes the log past its `wal_autocheckpoint` pages, which costs that commit the copy and two
disk syncs. `has_room` tells a caller whether the next small commit is sure not to be that
one, from the size of the log file alone (a file that is truncated back, by
`journal_size_limit`, whenever the log restarts after a checkpoint).

`checkpoint` makes that commit rare: it copies the log from a connection of its own, on a
thread that holds no lock of the caller's, once the log passes a smaller size
(`checkpoint_due`). SQLite lets the writer go on committing meanwhile (a passive checkpoint
copies what was committed when it began); once the log is copied in full, the writer's
next transaction starts it again from the beginning, and the file is cut back to
`journal_size_limit`.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from pathlib import Path
from typing import Final

# Passive checkpoints one `checkpoint` call makes at most while commits keep coming: each
# copies what was committed during the last one, a few frames, so the log is soon copied
# in full, and only a log copied in full starts again from its beginning (else it grows on
# towards the writer's own threshold).
CHECKPOINT_ROUNDS: Final = 3


class WalDurability:
    """The commits of one writing connection, how many of them are known to be on disk,
    and the copies of its log into the database.

    The writing thread calls `begin` before and `committed` after each write transaction;
    `sync` and `checkpoint` may be called from any other thread while it writes.
    """

    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        self._conn = conn
        self._path = path
        self._wal = f"{path}-wal"
        # Commits so far, and how many of the first of them are known to be on disk. Written
        # by the writing thread and by `sync` on another; a race between the two can only
        # leave `_synced` too low, which costs an unneeded sync, never a missed one.
        self._commits = 0
        self._synced = 0
        # Serialises `sync` and `checkpoint` calls (two may come at once) and `close`.
        self._lock = threading.Lock()
        self._closed = False
        # Whether the writing connection is in `synchronous = FULL` now (as set up).
        self._full = True
        # Bytes of log file at which a commit checkpoints (`has_room`), read once it is set up.
        self._checkpoint_bytes: int | None = None

    @property
    def unsynced(self) -> bool:
        """Whether some commit may not be on disk yet."""
        return self._synced < self._commits

    def begin(self, durable: bool) -> None:
        """Before a write transaction: set the connection's `synchronous` for it."""
        if durable != self._full:
            self._conn.execute(f"PRAGMA synchronous = {'FULL' if durable else 'NORMAL'}")
            self._full = durable

    def committed(self, durable: bool) -> int:
        """After a commit: count it; returns its number (for `is_synced`)."""
        self._commits += 1
        if durable:  # the log's sync at this commit covers every commit before it too
            self._synced = self._commits
        return self._commits

    def is_synced(self, commit: int) -> bool:
        """Whether the commit numbered `commit` is known to be on disk."""
        return commit <= self._synced

    def has_room(self, room: int) -> bool:
        """Whether the log is more than `room` bytes short of its checkpoint threshold, so
        that a commit writing less than that cannot checkpoint. The log file's size bounds
        what the log holds: frames are written from its start again after a checkpoint,
        over older ones."""
        if self._checkpoint_bytes is None:
            page_size = int(self._conn.execute("PRAGMA page_size").fetchone()[0])
            pages = int(self._conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0])
            # A frame is a page and its 24-byte header, after the log's 32-byte header; with
            # no automatic checkpoint (0 pages), no commit ever checkpoints.
            self._checkpoint_bytes = 32 + pages * (page_size + 24) if pages > 0 else 1 << 62
        return self._log_bytes() + room < self._checkpoint_bytes

    def checkpoint_due(self, due_bytes: int) -> bool:
        """Whether the log file has grown to `due_bytes`, for `checkpoint` (a restarted log's
        file is cut back below that, so a log copied in full is not due again until it grows
        again)."""
        return self._log_bytes() >= due_bytes

    def _log_bytes(self) -> int:
        try:
            return os.stat(self._wal).st_size
        except FileNotFoundError:
            return 0

    def sync(self) -> None:
        """Put every commit made so far on disk: sync the log.

        Every commit is in the log until a checkpoint copies it into the database, and a
        checkpoint syncs the database before the log starts again, so syncing the log file
        covers every commit made before this call. Does nothing once `close` has been called
        (closing the last connection checkpoints, which syncs).
        """
        with self._lock:
            upto = self._commits
            if self._closed or self._synced >= upto:
                return
            wal = os.open(self._wal, os.O_RDWR)
            try:
                os.fsync(wal)
            finally:
                os.close(wal)
            self._synced = max(self._synced, upto)

    def checkpoint(self) -> bool:
        """Copy what the log holds into the database, syncing both: passive checkpoints,
        each copying what was committed when it began, up to `CHECKPOINT_ROUNDS` of them.
        True if the whole log was copied; False if some of it is still to copy, or once
        `close` has been called. May run on any thread while the writing connection writes
        on another: it takes no lock of the writer's, and SQLite's passive checkpoint never
        blocks a writer.

        The connection is opened for the call and closed after it: one kept open between
        checkpoints was seen to keep the writer from starting the log again.
        """
        with self._lock:
            if self._closed:
                return False
            conn = sqlite3.connect(self._path, isolation_level=None)
            try:
                # The copy is synced before the log may start again (SQLite's FULL setting
                # for checkpoints), so no commit is ever only in a log that is written over.
                conn.execute("PRAGMA synchronous = FULL")
                for _ in range(CHECKPOINT_ROUNDS):
                    ((busy, logged, copied),) = conn.execute(
                        "PRAGMA wal_checkpoint(PASSIVE)"
                    ).fetchall()
                    if not busy and logged == copied:
                        return True
                return False
            finally:
                conn.close()

    def close(self) -> bool:
        """Refuse further syncs and checkpoints (after one under way); False if already
        closed."""
        with self._lock:
            if self._closed:
                return False
            self._closed = True
            return True
