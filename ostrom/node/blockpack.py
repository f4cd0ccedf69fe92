"""Large blocks' bytes in append-only pack files beside the block database.

The block database (`ostrom.node.blockdb`) keeps every block's index row; a block of
`PACK_MIN_BYTES` or more keeps its bytes here instead of in an SQLite row, at a place
(pack, offset) the index names. Why: SQLite copies a large block three times on its way to
the disk (into its pages, into the write-ahead log, later into the database), and each
buffered write takes new page-cache pages. Measured on a 256 MiB fetch, storing its blocks
in SQLite cost the storing thread about 0.66 CPU s; writing them here with `O_DIRECT` costs
about 0.02 (docs/BENCHMARKS.md, Artifacts).

Layout: a directory of numbered files (`00000001.pack`, ...). Blocks are appended to the
newest pack, each at an offset that is a multiple of `ALIGN` (the bytes between a block's
end and the next offset are zeros), and a pack that reaches `PACK_BYTES` is closed for
writing and a new one begun. Writes bypass the page cache (`O_DIRECT`) where the file
system allows it; where it refuses (tmpfs, some network file systems) they are ordinary
buffered writes, with the same layout. Reads bypass it too, where the file system allows:
a holder reads a block once per peer that asks, and a page-cache copy of it would cost a
fill and a copy per read (see `read`).

Durability is the block database's to order (its docstring says when it syncs): `sync`
puts every pack write made so far on disk, and the database calls it before any commit
that must survive a power loss. A pack write that no commit names (a crash between the
two) is cut off when the store opens (`recover`); so is an index row naming bytes past a
pack's end (a commit that reached the disk before the pack's new length did). Every read
is still checked against its CID by the caller.

Space: a block's bytes are freed when the commit that deletes its index row is on disk
(`release`): a pack that holds no block any more is deleted, and the place of a block in
a pack still in use becomes a hole (`fallocate` with `FALLOC_FL_PUNCH_HOLE`), where the
file system supports it. `recover` frees what a crash left unfreed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import mmap
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Final, cast

from ostrom.errors import StoreCorrupt

log = logging.getLogger(__name__)

# The smallest block kept in a pack: a contribution's changesets, manifests and small files
# stay SQLite rows (a row costs no alignment padding and shares pages with its neighbours,
# and a few KiB are copied cheaply), while an artifact's blocks (256 KiB by default) come
# here. At 64 KiB the padding to `ALIGN` wastes at most 6% of a block.
PACK_MIN_BYTES: Final = 64 * 1024
# Offsets and lengths of direct writes must be multiples of the device's logical block
# size; 4096 is that of every disk sold this decade, and a multiple of the older 512.
ALIGN: Final = 4096
# A pack stops taking blocks at this size: large enough that a big store has few files
# (open read handles are bounded below), small enough that a pack whose blocks were all
# evicted is a whole file deleted, also on a file system that cannot punch holes.
PACK_BYTES: Final = 256 * 1024 * 1024
# Read handles kept open at once (least recently used closed first): a store of a TiB is
# 4096 packs, far above what a process may hold, while reads mostly go to a few packs.
READ_HANDLES: Final = 64
# Bytes of a pack the kernel is asked to read ahead of a buffered read (`POSIX_FADV_WILLNEED`),
# where direct reads are refused: a peer asks for 16 blocks at a time, read in order, and
# the kernel's own read-ahead (128 KiB by default) covers less than one 256 KiB block.
# Reading back 256 MiB, 256 KiB at a time: 855-1423 MB/s with it, 545-864 without, in
# alternate runs on this machine.
READ_AHEAD_BYTES: Final = 8 * 1024 * 1024
# The buffer direct writes are copied into (it must be page-aligned, which mmap's memory
# is): a fetch stores up to 16 blocks of 256 KiB per call; larger calls are written in
# parts of this size.
WRITE_BUFFER_BYTES: Final = 4 * 1024 * 1024

_SUFFIX: Final = ".pack"
# fallocate(2) mode bits (linux/falloc.h): free a range without changing the file's size.
_FALLOC_FL_KEEP_SIZE: Final = 0x01
_FALLOC_FL_PUNCH_HOLE: Final = 0x02
_O_DIRECT: Final = getattr(os, "O_DIRECT", 0)


def aligned(size: int) -> int:
    """`size` rounded up to a multiple of `ALIGN`: the room a block of `size` bytes takes."""
    return -(-size // ALIGN) * ALIGN


def packs_dir(blocks_file: Path) -> Path:
    """Where the packs of the block database at `blocks_file` live: beside it."""
    return blocks_file.with_name(f"{blocks_file.name}.packs")


class PackFiles:
    """The pack files of one block database.

    The writing thread calls `append` (serialised by the database's caller, like every
    write); `read` is called by the same callers; `sync` may be called from any thread
    while the writer appends.
    """

    def __init__(self, directory: Path) -> None:
        """Use `PackFiles.open`."""
        self._dir = directory
        # The pack being appended to, its write handle (None until the first append after
        # opening), and where the next block goes.
        self._current = 0
        self._write_fd: int | None = None
        self._end = 0
        self._direct = _O_DIRECT != 0
        self._buffer: mmap.mmap | None = None
        # Write handles with appends not yet synced: the current pack's, and any pack
        # closed for writing since the last `sync` (closed once synced).
        self._unsynced: dict[int, int] = {}
        self._lock = threading.Lock()
        # Appends so far, and how many of the first of them `sync` has put on disk (a race
        # between the writer and `sync` can only leave the second too low).
        self._appends = 0
        self._synced_appends = 0
        self._readers: OrderedDict[int, int] = OrderedDict()
        # Whether read handles are opened with `O_DIRECT` (until the file system refuses),
        # and the page-aligned buffer direct reads land in.
        self._direct_reads = _O_DIRECT != 0
        self._read_buffer: mmap.mmap | None = None
        # Per pack read through the page cache: where the read-ahead asked for last ends.
        self._read_ahead: dict[int, int] = {}
        self._punch_supported = True

    @classmethod
    def open(cls, directory: Path) -> PackFiles:
        directory.mkdir(mode=0o700, exist_ok=True)
        packs = cls(directory)
        packs._append_to_newest()
        return packs

    def _append_to_newest(self) -> None:
        """Append after the newest pack's end (none yet: the first append begins pack 1)."""
        self._current = max(self.numbers(), default=0)
        self._end = aligned(self._path(self._current).stat().st_size) if self._current else 0

    # --- layout --------------------------------------------------------------------------------

    def _path(self, number: int) -> Path:
        return self._dir / f"{number:08d}{_SUFFIX}"

    def numbers(self) -> list[int]:
        """The numbers of the packs on disk, in order."""
        found = []
        for path in self._dir.iterdir():
            if path.suffix == _SUFFIX and path.stem.isdigit():
                found.append(int(path.stem))
        return sorted(found)

    def file_bytes(self) -> int:
        """Bytes of disk the packs take (holes not counted)."""
        total = 0
        for number in self.numbers():
            try:
                total += self._path(number).stat().st_blocks * 512
            except FileNotFoundError:
                continue  # released by another thread meanwhile
        return total

    # --- writing -------------------------------------------------------------------------------

    def append(self, blocks: Sequence[bytes]) -> list[tuple[int, int]]:
        """Write `blocks` at the end of the newest pack; returns each one's (pack, offset).
        On disk only after the next `sync`."""
        places: list[tuple[int, int]] = []
        if not blocks:
            return places  # nothing written: nothing for the next `sync` to do
        start = 0
        while start < len(blocks):
            if self._write_fd is None or self._end >= PACK_BYTES:
                self._begin_pack()
            # Blocks for one write: as many as fit the buffer and the pack (at least one).
            room = min(WRITE_BUFFER_BYTES, max(PACK_BYTES - self._end, ALIGN))
            stop, size = start, 0
            while stop < len(blocks) and (
                stop == start or size + aligned(len(blocks[stop])) <= room
            ):
                size += aligned(len(blocks[stop]))
                stop += 1
            offset = self._end
            self._write(blocks[start:stop], size, offset)
            for data in blocks[start:stop]:
                places.append((self._current, offset))
                offset += aligned(len(data))
            self._end = offset
            start = stop
        self._appends += 1
        return places

    def _begin_pack(self) -> None:
        """Open the newest pack for appending, or begin the next if there is none or it is
        full (a full pack's handle is closed by the next `sync`)."""
        if self._current == 0 or self._end >= PACK_BYTES:
            self._current += 1
            self._end = 0
        self._write_fd = self._open_for_writing(self._path(self._current))
        with self._lock:
            self._unsynced[self._current] = self._write_fd

    def _open_for_writing(self, path: Path) -> int:
        flags = os.O_WRONLY | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
        if self._direct:
            try:
                return os.open(path, flags | _O_DIRECT, 0o600)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                self._buffered_from_now(f"{path.parent} does not take direct writes")
        return os.open(path, flags, 0o600)

    def _buffered_from_now(self, why: str) -> None:
        log.info("%s: writing packs through the page cache", why)
        self._direct = False

    def _write(self, blocks: Sequence[bytes], size: int, offset: int) -> None:
        assert self._write_fd is not None
        if self._buffer is None or len(self._buffer) < size:
            self._buffer = mmap.mmap(-1, max(size, WRITE_BUFFER_BYTES))
        view = memoryview(self._buffer)
        try:
            at = 0
            for data in blocks:
                view[at : at + len(data)] = data
                padded = aligned(len(data))
                view[at + len(data) : at + padded] = bytes(padded - len(data))
                at += padded
            self._write_all(view[:size], offset)
        finally:
            view.release()

    def _write_all(self, data: memoryview, offset: int) -> None:
        assert self._write_fd is not None
        written = 0
        while written < len(data):
            try:
                n = os.pwrite(self._write_fd, data[written:], offset + written)
            except OSError as exc:
                if exc.errno != errno.EINVAL or not self._direct:
                    raise
                # Opened with O_DIRECT, refused at the write (some file systems do): go on
                # buffered with a handle of the same file.
                self._buffered_from_now(f"{self._dir} refused a direct write")
                direct_fd = self._write_fd
                self._write_fd = self._open_for_writing(self._path(self._current))
                with self._lock:
                    self._unsynced[self._current] = self._write_fd
                os.close(direct_fd)
                continue
            if n <= 0:
                raise OSError(errno.EIO, f"a write to {self._path(self._current)} wrote nothing")
            written += n

    def sync(self) -> None:
        """Put every append made so far on disk (its bytes and each pack's length)."""
        with self._lock:
            upto = self._appends
            if self._synced_appends >= upto:
                return
            for number, fd in dict(self._unsynced).items():
                os.fdatasync(fd)
                # The pack being appended to stays listed: its next append is not synced.
                if fd != self._write_fd:
                    os.close(fd)
                    del self._unsynced[number]
            self._synced_appends = max(self._synced_appends, upto)

    @property
    def unsynced(self) -> bool:
        """Whether some append may not be on disk yet."""
        return self._synced_appends < self._appends

    # --- reading -------------------------------------------------------------------------------

    def read(self, number: int, offset: int, size: int) -> bytes:
        """`size` bytes at `offset` of pack `number`; `StoreCorrupt` if they are not there.

        Direct (`O_DIRECT`) where the file system takes it: the disk's bytes land in a
        reused buffer and are copied out once. Through the page cache, the same read cost
        the kernel a fill of new cache pages and a copy: reading back 256 MiB in 256 KiB
        reads took 0.29-0.31 CPU s so, 0.06-0.08 direct (a scratch script on this machine).
        A direct read also sees a buffered write not yet on disk (the kernel writes the
        range out first)."""
        fd = self._reader(number)
        if self._direct_reads:
            try:
                return self._read_direct(number, fd, offset, size)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                # Opened with O_DIRECT, refused at the read: read through the page cache.
                log.info("%s refused a direct read: reading packs buffered", self._dir)
                self._direct_reads = False
                self._close_readers()
                fd = self._reader(number)
        return self._read_buffered(number, fd, offset, size)

    def _read_direct(self, number: int, fd: int, offset: int, size: int) -> bytes:
        length = aligned(size)
        if self._read_buffer is None or len(self._read_buffer) < length:
            if self._read_buffer is not None:
                self._read_buffer.close()
            self._read_buffer = mmap.mmap(-1, max(length, WRITE_BUFFER_BYTES))
        with memoryview(self._read_buffer) as view:
            got = os.preadv(fd, [view[:length]], offset)
            if got < size:
                raise self._short(number, offset, size)
            return bytes(view[:size])

    def _read_buffered(self, number: int, fd: int, offset: int, size: int) -> bytes:
        asked_to = self._read_ahead.get(number, 0)
        in_first_half = asked_to - READ_AHEAD_BYTES <= offset < asked_to - READ_AHEAD_BYTES // 2
        if not in_first_half and hasattr(os, "posix_fadvise"):
            # Past half of the stretch asked for last (or elsewhere): ask for the next.
            os.posix_fadvise(fd, offset, READ_AHEAD_BYTES, os.POSIX_FADV_WILLNEED)
            self._read_ahead[number] = offset + READ_AHEAD_BYTES
        data = os.pread(fd, size, offset)
        if len(data) != size:
            raise self._short(number, offset, size)
        return data

    def _short(self, number: int, offset: int, size: int) -> StoreCorrupt:
        return StoreCorrupt(
            f"pack {self._path(number)} ends before the block at {offset} ({size} bytes)"
        )

    def _reader(self, number: int) -> int:
        fd = self._readers.get(number)
        if fd is not None:
            self._readers.move_to_end(number)
            return fd
        flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)
        path = self._path(number)
        try:
            if self._direct_reads:
                try:
                    fd = os.open(path, flags | _O_DIRECT)
                except OSError as exc:
                    if exc.errno != errno.EINVAL:
                        raise
                    log.info("%s does not take direct reads: reading packs buffered", self._dir)
                    self._direct_reads = False
            if fd is None:
                fd = os.open(path, flags)
        except FileNotFoundError:
            raise StoreCorrupt(f"pack {path} is missing") from None
        self._readers[number] = fd
        if len(self._readers) > READ_HANDLES:
            oldest, oldest_fd = self._readers.popitem(last=False)
            self._read_ahead.pop(oldest, None)
            os.close(oldest_fd)
        return fd

    def _close_readers(self) -> None:
        for fd in self._readers.values():
            os.close(fd)
        self._readers.clear()
        self._read_ahead.clear()

    # --- freeing -------------------------------------------------------------------------------

    def release(self, freed: Iterable[tuple[int, int, int]], emptied: Iterable[int]) -> None:
        """Free the places (pack, offset, size) of deleted blocks, and delete the packs in
        `emptied`, which hold no block any more (the pack appends go to is only punched).
        Called by the writing thread, once the deletions are on disk."""
        gone = set(emptied) - {self._current}
        for number in gone:
            self._delete(number)
        holes: dict[int, list[tuple[int, int]]] = {}
        for number, offset, size in freed:
            if number not in gone:
                holes.setdefault(number, []).append((offset, aligned(size)))
        for number, ranges in holes.items():
            self._punch(number, ranges)

    def _delete(self, number: int) -> None:
        reader = self._readers.pop(number, None)
        self._read_ahead.pop(number, None)
        if reader is not None:
            os.close(reader)
        with self._lock:
            fd = self._unsynced.pop(number, None)
        if fd is not None:
            os.close(fd)
        self._path(number).unlink(missing_ok=True)

    def _punch(self, number: int, ranges: Sequence[tuple[int, int]]) -> None:
        """Punch holes at the (offset, length) `ranges` of pack `number`, opened once."""
        if not self._punch_supported:
            return
        try:
            fd = os.open(self._path(number), os.O_WRONLY | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            return
        try:
            for offset, length in ranges:
                if self._punch_supported:
                    self._punch_fd(fd, offset, length)
        finally:
            os.close(fd)

    def _punch_fd(self, fd: int, offset: int, length: int) -> None:
        try:
            _punch_hole(fd, offset, length)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            self._punch_supported = False
            log.info(
                "%s cannot free a range of a file: an evicted block's space returns when "
                "its whole pack is deleted",
                self._dir,
            )

    # --- opening after a crash -----------------------------------------------------------------

    def recover(self, places: Iterable[tuple[int, int, int]]) -> list[tuple[int, int]]:
        """Make the packs agree with the index: `places` are the (pack, offset, size) of every
        block the index names, in any order. Cuts each pack back to its last named block,
        deletes packs that hold none, and frees the gaps between named blocks. Returns the
        (pack, offset) of named blocks that are not all there (past their pack's end): the
        caller deletes their index rows."""
        by_pack: dict[int, list[tuple[int, int]]] = {}
        for number, offset, size in places:
            by_pack.setdefault(number, []).append((offset, size))
        on_disk = set(self.numbers())
        lost: list[tuple[int, int]] = []
        for number in sorted(on_disk | set(by_pack)):
            named = sorted(by_pack.get(number, ()))
            if number not in on_disk:
                lost += [(number, offset) for offset, _ in named]
                continue
            path = self._path(number)
            length = path.stat().st_size
            whole = [(offset, size) for offset, size in named if offset + size <= length]
            lost += [(number, offset) for offset, size in named if offset + size > length]
            if not whole:
                path.unlink()
                continue
            end = whole[-1][0] + aligned(whole[-1][1])
            fd = os.open(path, os.O_WRONLY | getattr(os, "O_CLOEXEC", 0))
            try:
                if length > end:
                    os.ftruncate(fd, end)
                at = 0
                for offset, size in whole:
                    if offset > at and self._punch_supported:
                        self._punch_fd(fd, at, offset - at)
                    at = max(at, offset + aligned(size))
                os.fdatasync(fd)
            finally:
                os.close(fd)
        self._append_to_newest()
        return lost

    def close(self) -> None:
        """Sync and close every handle."""
        self.sync()
        with self._lock:
            for fd in self._unsynced.values():
                os.close(fd)
            self._unsynced.clear()
            self._write_fd = None
        self._close_readers()
        for buffer in (self._buffer, self._read_buffer):
            if buffer is not None:
                buffer.close()
        self._buffer = self._read_buffer = None


def _load_fallocate() -> Callable[[int, int, int, int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    libc = ctypes.CDLL(name, use_errno=True)
    fallocate = getattr(libc, "fallocate", None)
    if fallocate is None:
        return None
    fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fallocate.restype = ctypes.c_int
    return cast("Callable[[int, int, int, int], int]", fallocate)


# The C library's fallocate(2), which Python's os module does not offer with a mode.
_fallocate = _load_fallocate()


def _punch_hole(fd: int, offset: int, length: int) -> None:
    """Free `length` bytes at `offset` of `fd` (they read as zeros), keeping its size."""
    if _fallocate is None:
        raise OSError(errno.ENOSYS, "fallocate is not available")
    mode = _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE
    if _fallocate(fd, mode, offset, length) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
