"""Small public blocks this node stored or served lately, kept in memory for the next asker.

A gossiped contribution's followers all ask for its few small blocks (changeset, manifest, a
small file) within a second or two: of the node that made it, and of the relays that
fetched them first. Answered from here, each of those wants skips a read of the block file
on the store's thread, and the hand-off to that thread and back, which cost more than the
read of a few hundred bytes.

Only blocks that any peer may be served go in: blocks of a public project. A block's
attributions only grow (`ostrom.node.blockdb`), so such a block never becomes one to
withhold. Blocks stored for this node alone (uploads, which a private project's
contribution may claim later) or only for private meshes' projects are read from the store
each time, with the check of who may have them. The bytes were checked against their CID
when they were stored or read; the cache keeps them as they were.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence

from ostrom.crypto.cid import CID


class RecentBlocks:
    """Least recently used small blocks, up to `max_bytes` of them."""

    def __init__(self, *, max_bytes: int, max_block: int) -> None:
        self._max_bytes = max_bytes
        self._max_block = max_block
        self._blocks: OrderedDict[CID, bytes] = OrderedDict()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._blocks)

    @property
    def size_bytes(self) -> int:
        return self._bytes

    def add(self, blocks: Iterable[tuple[CID, bytes]]) -> None:
        """Keep those of `blocks` no larger than `max_block`, dropping the least recently
        used beyond `max_bytes`."""
        for cid, data in blocks:
            if len(data) > self._max_block:
                continue
            old = self._blocks.pop(cid, None)
            if old is not None:
                self._bytes -= len(old)
            self._blocks[cid] = data
            self._bytes += len(data)
        while self._bytes > self._max_bytes:
            _, dropped = self._blocks.popitem(last=False)
            self._bytes -= len(dropped)

    def get(self, cids: Sequence[CID]) -> dict[CID, bytes]:
        """Those of `cids` held here, now the most recently used."""
        found = {}
        for cid in cids:
            data = self._blocks.get(cid)
            if data is not None:
                self._blocks.move_to_end(cid)
                found[cid] = data
        return found
