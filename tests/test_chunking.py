from __future__ import annotations

import hashlib
import os
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ostrom.crypto.cid import CID
from ostrom.errors import BlockMismatch, InvalidInput, NotFound, TooLarge
from ostrom.protocol import chunking
from ostrom.protocol.changesets import MAX_BLOCK_SIZE, BlockRef, FileManifest
from ostrom.protocol.chunking import (
    DEFAULT_BLOCK_SIZE,
    FileChunker,
    assemble,
    chunk_bytes,
)

BS = DEFAULT_BLOCK_SIZE


def _data(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


@pytest.mark.parametrize("size", [0, 1, BS - 1, BS, BS + 1, 2 * BS, 5 * 1024 * 1024 + 17])
def test_block_boundaries(size: int) -> None:
    data = _data(size)
    blocks, manifest, encoded, mcid = chunk_bytes(data)
    expected = [data[i : i + BS] for i in range(0, size, BS)]
    assert [b for _, b in blocks] == expected
    assert all(cid == CID.of_raw(b) and not cid.is_dag_cbor for cid, b in blocks)
    assert manifest.size == size
    assert [(r.cid, r.size) for r in manifest.blocks] == [(c, len(b)) for c, b in blocks]
    assert FileManifest.decode(encoded) == manifest
    assert mcid == CID.of_dag_cbor(encoded) and mcid.is_dag_cbor
    assert b"".join(assemble(manifest, dict(blocks).__getitem__)) == data


def test_empty_file_is_a_manifest_without_blocks() -> None:
    blocks, manifest, encoded, mcid = chunk_bytes(b"")
    assert blocks == []
    assert manifest == FileManifest(size=0, blocks=())
    assert list(assemble(manifest, lambda cid: b"")) == []
    # The same CID as an independent encoding: {"size": 0, "blocks": []} in canonical order.
    assert encoded == bytes.fromhex("a26473697a650066626c6f636b7380")
    assert mcid == CID.of_dag_cbor(encoded)


def test_known_block_cid() -> None:
    # The raw CID of b"hello", as `ipfs block put --cid-codec raw` computes it.
    blocks, *_ = chunk_bytes(b"hello")
    assert str(blocks[0][0]) == "bafkreibm6jg3ux5qumhcn2b3flc3tyu6dmlb4xa7u5bf44yegnrjhc4yeq"
    assert blocks[0][0].digest == hashlib.sha256(b"hello").digest()


def test_identical_content_gives_identical_cids() -> None:
    data = _data(3 * BS)
    a = chunk_bytes(data)
    b = chunk_bytes(bytes(data))
    assert a[3] == b[3]
    repeated = _data(BS, seed=7) * 3
    blocks, manifest, _, _ = chunk_bytes(repeated)
    assert len({cid for cid, _ in blocks}) == 1
    assert len(manifest.blocks) == 3
    assert chunk_bytes(data + b"x")[3] != a[3]


@settings(max_examples=60, deadline=None)
@given(
    data=st.binary(max_size=700),
    block_size=st.integers(min_value=1, max_value=64),
    cuts=st.lists(st.integers(min_value=0, max_value=700), max_size=20),
)
def test_feed_splitting_gives_the_same_result(
    data: bytes, block_size: int, cuts: list[int]
) -> None:
    expected = chunk_bytes(data, block_size)
    chunker = FileChunker(block_size)
    got = []
    start = 0
    for cut in sorted(c for c in cuts if c <= len(data)):
        got.extend(chunker.feed(data[start:cut]))
        start = cut
    got.extend(chunker.feed(data[start:]))
    rest, manifest, encoded, mcid = chunker.finish()
    got.extend(rest)
    assert got == expected[0]
    assert (manifest, encoded, mcid) == expected[1:]


def test_feed_one_byte_at_a_time() -> None:
    data = _data(1000)
    chunker = FileChunker(64)
    blocks = []
    for i in range(len(data)):
        blocks.extend(chunker.feed(data[i : i + 1]))
    rest, *_, mcid = chunker.finish()
    assert blocks + rest == chunk_bytes(data, 64)[0]
    assert mcid == chunk_bytes(data, 64)[3]


def test_chunker_holds_at_most_one_partial_block() -> None:
    chunker = FileChunker(100)
    assert chunker.feed(b"a" * 99) == []
    out = chunker.feed(b"b" * 250)
    assert [len(b) for _, b in out] == [100, 100, 100]
    assert out[0][1] == b"a" * 99 + b"b"
    rest, manifest, _, _ = chunker.finish()
    assert [len(b) for _, b in rest] == [49]
    assert manifest.size == 349


@pytest.mark.parametrize("bad", [0, -1, MAX_BLOCK_SIZE + 1, True, 1.5])
def test_bad_block_size(bad: object) -> None:
    with pytest.raises(InvalidInput):
        FileChunker(bad)  # type: ignore[arg-type]


def test_finished_chunker_refuses_more() -> None:
    chunker = FileChunker()
    chunker.finish()
    with pytest.raises(InvalidInput):
        chunker.feed(b"x")
    with pytest.raises(InvalidInput):
        chunker.finish()


def test_file_too_large_for_one_manifest(monkeypatch: pytest.MonkeyPatch) -> None:
    # The real limit is 18,724 blocks; lower it rather than hash 4.5 GiB.
    monkeypatch.setattr(chunking, "MAX_FILE_BLOCKS", 3)
    chunker = FileChunker(4)
    assert len(chunker.feed(b"x" * 12)) == 3
    with pytest.raises(TooLarge):
        chunker.feed(b"y" * 4)


def test_manifest_limit_fits_in_a_block() -> None:
    # A manifest at the limit, with the largest block CIDs and sizes, still encodes.
    refs = [(CID.of_raw(os.urandom(8)), MAX_BLOCK_SIZE)] * chunking.MAX_FILE_BLOCKS
    manifest = FileManifest(
        size=MAX_BLOCK_SIZE * len(refs),
        blocks=tuple(BlockRef(cid=c, size=s) for c, s in refs),
    )
    assert len(manifest.encode()) <= MAX_BLOCK_SIZE


def test_assemble_detects_a_tampered_block() -> None:
    data = _data(3 * 100)
    blocks, manifest, _, _ = chunk_bytes(data, 100)
    store = dict(blocks)
    second = blocks[1][0]
    tampered = bytearray(store[second])
    tampered[5] ^= 1
    store[second] = bytes(tampered)
    out = assemble(manifest, store.__getitem__)
    assert next(out) == data[:100]
    with pytest.raises(BlockMismatch, match=str(second)):
        next(out)


def test_assemble_detects_a_wrong_size() -> None:
    blocks, manifest, _, _ = chunk_bytes(b"abcdef", 3)
    store = dict(blocks)
    store[blocks[0][0]] = b"abcd"
    with pytest.raises(BlockMismatch, match="manifest says 3"):
        list(assemble(manifest, store.__getitem__))


def test_assemble_passes_missing_blocks_through() -> None:
    _, manifest, _, _ = chunk_bytes(b"abc")

    def missing(cid: CID) -> bytes:
        raise NotFound(f"no block {cid}")

    with pytest.raises(NotFound):
        list(assemble(manifest, missing))
