"""The in-memory store of small recent blocks (ostrom.node.blockcache)."""

from __future__ import annotations

from ostrom.crypto.cid import CID
from ostrom.node.blockcache import RecentBlocks


def block(n: int, size: int) -> tuple[CID, bytes]:
    data = n.to_bytes(4, "big") * (size // 4)
    return CID.of_raw(data), data


def test_it_keeps_the_most_recently_used_within_its_bytes() -> None:
    recent = RecentBlocks(max_bytes=1000, max_block=400)
    a, b, c = block(1, 400), block(2, 400), block(3, 400)
    recent.add([a, b])
    assert recent.get([a[0]]) == {a[0]: a[1]}  # a is now the most recently used
    recent.add([c])  # over 1000 bytes: b goes
    assert set(recent.get([a[0], b[0], c[0]])) == {a[0], c[0]}
    assert recent.size_bytes == 800 and len(recent) == 2


def test_it_skips_large_blocks_and_counts_a_block_added_twice_once() -> None:
    recent = RecentBlocks(max_bytes=1000, max_block=400)
    big, small = block(1, 800), block(2, 100)
    recent.add([big, small, small])
    assert recent.get([big[0], small[0]]) == {small[0]: small[1]}
    assert recent.size_bytes == 100
