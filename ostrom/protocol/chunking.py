"""Splitting files into content-addressed blocks, and putting them back together.

A file is cut into fixed-size raw blocks (the last one shorter), each addressed by its CIDv1
raw sha2-256. The file itself is a `FileManifest` listing the blocks in order, addressed by
its dag-cbor CID. Fixed-size cutting means the same bytes always give the same blocks and the
same manifest CID on every node, so identical files and identical block-aligned runs of bytes
are stored once across projects and forks. An empty file is a manifest with no blocks.

`FileChunker` is push-style: feed it bytes in pieces of any size and it hands back each
block as soon as it is complete, holding at most one partial block, so a file of any size is
chunked in bounded memory. It does not deduplicate within a file: a block that repeats is
returned each time it occurs, and the store keeps it once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Final

from ostrom.crypto.cid import CID
from ostrom.errors import BlockMismatch, InvalidInput, TooLarge
from ostrom.protocol.changesets import MAX_BLOCK_SIZE, BlockRef, FileManifest

# 256 KiB, the IPFS default: large enough that per-block overhead (a CID, a manifest entry, a
# store row, a request) stays small, small enough that a Raspberry Pi holds a few in memory and
# that a download spreads across several peers at once.
DEFAULT_BLOCK_SIZE: Final = 256 * 1024

# The most bytes one manifest entry can take in DAG-CBOR: a map header (1), the key "cid" (4),
# tag 42 (2), a byte-string header (2), 0x00 plus the 36-byte CID (37), the key "size" (5) and a
# block size below 2**32 (5).
_MANIFEST_ENTRY_MAX_BYTES: Final = 56
# The manifest map's own header, "size" key and 64-bit size, "blocks" key and list header.
_MANIFEST_OVERHEAD_MAX_BYTES: Final = 32
# The most blocks a manifest can list and still fit in one block (18,724: a 4.5 GiB file at
# the default block size). Checked while feeding, so an oversized file fails early instead of
# after it has all been hashed.
MAX_FILE_BLOCKS: Final = (
    MAX_BLOCK_SIZE - _MANIFEST_OVERHEAD_MAX_BYTES
) // _MANIFEST_ENTRY_MAX_BYTES

Block = tuple[CID, bytes]
"""A raw block and its CID."""

Chunked = tuple[list[Block], FileManifest, bytes, CID]
"""The blocks of a file, its manifest, the manifest's encoding and the manifest's CID."""


class FileChunker:
    """Cut a stream of bytes into blocks; see the module docstring."""

    __slots__ = ("_block_size", "_buffer", "_finished", "_refs", "_size")

    def __init__(self, block_size: int = DEFAULT_BLOCK_SIZE) -> None:
        if (
            not isinstance(block_size, int)
            or isinstance(block_size, bool)
            or not 1 <= block_size <= MAX_BLOCK_SIZE
        ):
            raise InvalidInput(f"block size must be 1..{MAX_BLOCK_SIZE} bytes, not {block_size!r}")
        self._block_size = block_size
        self._buffer = bytearray()
        self._refs: list[BlockRef] = []
        self._size = 0
        self._finished = False

    def feed(self, data: bytes) -> list[Block]:
        """Add the next bytes of the file; return the blocks they completed, in order."""
        if self._finished:
            raise InvalidInput("this chunker has finished; start a new one for the next file")
        size = self._block_size
        buffer = self._buffer
        view = memoryview(data)
        out: list[Block] = []
        pos = 0
        if buffer:
            pos = min(size - len(buffer), len(view))
            buffer += view[:pos]
            if len(buffer) < size:
                return out
            out.append(self._emit(bytes(buffer)))
            buffer.clear()
        end = len(view)
        while end - pos >= size:
            out.append(self._emit(bytes(view[pos : pos + size])))
            pos += size
        if pos < end:
            buffer += view[pos:]
        return out

    def finish(self) -> Chunked:
        """End the file: return the last, short block if any, and the file's manifest."""
        if self._finished:
            raise InvalidInput("this chunker has already finished")
        out: list[Block] = []
        if self._buffer:
            out.append(self._emit(bytes(self._buffer)))
            self._buffer.clear()
        self._finished = True
        manifest = FileManifest(size=self._size, blocks=tuple(self._refs))
        encoded = manifest.encode()
        return out, manifest, encoded, CID.of_dag_cbor(encoded)

    def _emit(self, block: bytes) -> Block:
        if len(self._refs) >= MAX_FILE_BLOCKS:
            limit = MAX_FILE_BLOCKS * self._block_size
            raise TooLarge(
                f"file over {limit} bytes: its manifest would list more than {MAX_FILE_BLOCKS}"
                f" blocks of {self._block_size} bytes"
            )
        cid = CID.of_raw(block)
        self._refs.append(BlockRef(cid=cid, size=len(block)))
        self._size += len(block)
        return cid, block


def chunk_bytes(data: bytes, block_size: int = DEFAULT_BLOCK_SIZE) -> Chunked:
    """Chunk a whole file held in memory; the same result as feeding it to a `FileChunker`."""
    chunker = FileChunker(block_size)
    blocks = chunker.feed(data)
    rest, manifest, encoded, cid = chunker.finish()
    blocks.extend(rest)
    return blocks, manifest, encoded, cid


def assemble(manifest: FileManifest, get_block: Callable[[CID], bytes]) -> Iterator[bytes]:
    """Yield a file's bytes block by block, fetching each with `get_block`.

    Each block is checked against its CID and the size the manifest gives before it is
    yielded; a block that fails raises `BlockMismatch`, so a consumer never receives bytes
    that are not the file's. Whatever `get_block` raises (e.g. `NotFound`) passes through.
    """
    for ref in manifest.blocks:
        data = get_block(ref.cid)
        if len(data) != ref.size:
            raise BlockMismatch(
                f"block {ref.cid} is {len(data)} bytes; the manifest says {ref.size}"
            )
        if not ref.cid.matches(data):
            raise BlockMismatch(f"block {ref.cid}: its bytes do not hash to its CID")
        yield data
