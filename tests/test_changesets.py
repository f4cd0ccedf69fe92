"""Changesets and file manifests: round trips, splitting, and refusal of bad blocks."""

from __future__ import annotations

import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ostrom.crypto.cid import CID
from ostrom.errors import DecodeError, InvalidRecord, TooLarge
from ostrom.protocol import dagcbor
from ostrom.protocol.changesets import (
    MAX_BLOCK_SIZE,
    MAX_FILE_SIZE,
    BlockRef,
    Change,
    Changeset,
    Delete,
    FileManifest,
    Put,
    split_changes,
)
from ostrom.protocol.paths import MAX_PATH_LENGTH, MAX_SEGMENT_LENGTH
from tests.test_paths import paths

record_links = st.binary(min_size=32, max_size=32).map(
    lambda d: CID(bytes([1, 0x71, 0x12, 0x20]) + d)
)
raw_links = st.binary(min_size=32, max_size=32).map(lambda d: CID(bytes([1, 0x55, 0x12, 0x20]) + d))
_SIZES = st.one_of(
    st.sampled_from([0, 23, 24, 255, 256, 65535, 65536, 2**32 - 1, 2**32, MAX_FILE_SIZE]),
    st.integers(0, MAX_FILE_SIZE),
)


def changes_at(path_strategy: st.SearchStrategy[str]) -> st.SearchStrategy[Change]:
    puts = st.builds(Put, path=path_strategy, file=record_links, size=_SIZES, exec=st.booleans())
    return st.one_of(puts, st.builds(Delete, path=path_strategy))


changes = changes_at(paths)
changesets = st.lists(changes, max_size=12, unique_by=lambda change: change.path).map(
    lambda items: Changeset(tuple(sorted(items, key=lambda change: change.path)))
)
block_refs = st.builds(
    BlockRef,
    cid=raw_links,
    size=st.one_of(st.sampled_from([1, MAX_BLOCK_SIZE]), st.integers(1, MAX_BLOCK_SIZE)),
)
manifests = st.lists(block_refs, max_size=12).map(
    lambda refs: FileManifest(size=sum(ref.size for ref in refs), blocks=tuple(refs))
)

FILE = CID.of_dag_cbor(b"manifest")
RAW = CID.of_raw(b"block")


def put_map(path: Any, **overrides: Any) -> dict[str, Any]:
    return {"op": "put", "path": path, "file": FILE, "size": 1, "exec": False, **overrides}


# --- round trips --------------------------------------------------------------------------------


@settings(max_examples=80, deadline=None)
@given(changesets)
def test_changeset_round_trip(changeset: Changeset) -> None:
    data = changeset.encode()
    decoded = Changeset.decode(data)
    assert decoded == changeset
    assert decoded.encode() == data
    assert Changeset.from_value(dagcbor.decode(data)) == changeset


@settings(max_examples=100, deadline=None)
@given(manifests)
def test_manifest_round_trip(manifest: FileManifest) -> None:
    data = manifest.encode()
    decoded = FileManifest.decode(data)
    assert decoded == manifest
    assert decoded.encode() == data
    assert FileManifest.from_value(dagcbor.decode(data)) == manifest


def test_an_empty_changeset_and_an_empty_file_are_valid() -> None:
    assert Changeset.decode(Changeset(()).encode()) == Changeset(())
    assert FileManifest.decode(FileManifest(0, ()).encode()) == FileManifest(0, ())


@given(st.lists(paths, min_size=2, max_size=8, unique=True))
def test_path_order_is_utf8_byte_order(items: list[str]) -> None:
    """Section 5.4 sorts by UTF-8 bytes; a changeset in that order is accepted, others not."""
    ordered = sorted(items, key=lambda p: p.encode())
    Changeset(tuple(Delete(p) for p in ordered))
    with pytest.raises(InvalidRecord):
        Changeset(tuple(Delete(p) for p in reversed(ordered)))


# --- split_changes ------------------------------------------------------------------------------


def long_path(index: int, length: int) -> str:
    """A distinct valid path of about `length` bytes (segments kept under the limit)."""
    head = f"{index:06d}"
    rest = max(length - len(head) - 1, 1)
    segment = "s" * (MAX_SEGMENT_LENGTH - 5)
    tail = "/".join([segment] * (rest // len(segment) + 1))[:rest].strip("/") or "s"
    return f"{head}/{tail}"


def _check_split(items: list[Change]) -> list[Changeset]:
    shuffled = list(items)
    random.Random(len(items)).shuffle(shuffled)
    blocks = split_changes(shuffled)
    assert blocks == split_changes(sorted(items, key=lambda c: c.path))  # input order is irrelevant
    flattened = [change for block in blocks for change in block.changes]
    assert flattened == sorted(items, key=lambda c: c.path)
    for block in blocks:
        data = block.encode()  # raises TooLarge over MAX_BLOCK_SIZE
        assert len(data) <= MAX_BLOCK_SIZE
        assert Changeset.decode(data) == block
    for block in blocks[:-1]:
        assert len(block.encode()) > MAX_BLOCK_SIZE // 2  # blocks are filled, not scattered
    return blocks


@settings(max_examples=12, deadline=None)
@given(
    st.integers(0, 700),
    st.integers(1, MAX_PATH_LENGTH),
    st.booleans(),
    st.randoms(use_true_random=False),
)
def test_split_changes_fits_every_block_and_keeps_every_change_in_path_order(
    count: int, length: int, deletes: bool, rng: random.Random
) -> None:
    items: list[Change] = [
        Delete(long_path(i, length))
        if deletes and rng.random() < 0.5
        else Put(long_path(i, length), FILE, rng.randrange(MAX_FILE_SIZE + 1), rng.random() < 0.5)
        for i in range(count)
    ]
    _check_split(items)


@settings(max_examples=50, deadline=None)
@given(st.lists(changes, max_size=30, unique_by=lambda change: change.path))
def test_split_changes_of_a_few_changes_is_one_changeset(items: list[Change]) -> None:
    assert len(_check_split(items)) == 1


def test_split_changes_of_many_long_paths_needs_several_blocks() -> None:
    items: list[Change] = [
        Put(long_path(i, MAX_PATH_LENGTH), FILE, MAX_FILE_SIZE, True) for i in range(600)
    ]
    assert len(_check_split(items)) >= 3


def test_split_changes_refuses_a_path_twice() -> None:
    with pytest.raises(InvalidRecord):
        split_changes([Put("a", FILE, 1), Delete("b"), Delete("a")])
    with pytest.raises(InvalidRecord):
        split_changes([Delete("a"), Delete("a")])


def test_one_changeset_too_large_for_a_block_is_refused() -> None:
    too_many = Changeset(tuple(Put(long_path(i, MAX_PATH_LENGTH), FILE, 1) for i in range(300)))
    with pytest.raises(TooLarge):
        too_many.encode()
    data = dagcbor.encode({"changes": [change.to_map() for change in too_many.changes]})
    assert len(data) > MAX_BLOCK_SIZE
    with pytest.raises(TooLarge):
        Changeset.decode(data)


# --- bad changesets -----------------------------------------------------------------------------

_UNSAFE_PATHS = [
    "../x",
    "a/../../x",
    "..",
    ".",
    "/x",
    "/",
    "a//b",
    "a/./b",
    "a/",
    "",
    "a\\b",
    "a\x00b",
    "a\nb",
    "cafe\u0301",
    "x" * (MAX_SEGMENT_LENGTH + 1),
    "/".join(["x" * 100] * 41),
    1,
    None,
    b"a",
    ["a"],
]


@pytest.mark.parametrize("path", _UNSAFE_PATHS, ids=repr)
@pytest.mark.parametrize("op", ["put", "delete"])
def test_a_decoded_change_to_an_unsafe_path_is_refused(op: str, path: Any) -> None:
    change = put_map(path) if op == "put" else {"op": "delete", "path": path}
    data = dagcbor.encode({"changes": [{"op": "delete", "path": "0"}, change]})
    with pytest.raises(InvalidRecord, match="unsafe path"):
        Changeset.decode(data)


_BAD_CHANGES: dict[str, tuple[Any, type[Exception]]] = {
    "unsorted": ([put_map("b"), put_map("a")], InvalidRecord),
    "path twice": ([put_map("a"), put_map("a")], InvalidRecord),
    "put and delete of a path": ([{"op": "delete", "path": "a"}, put_map("a")], InvalidRecord),
    "unsorted beyond ASCII": ([put_map("é"), put_map("z")], InvalidRecord),
    "file is a raw block": ([put_map("a", file=RAW)], InvalidRecord),
    "file is bytes": ([put_map("a", file=FILE.raw)], InvalidRecord),
    "file is text": ([put_map("a", file=str(FILE))], InvalidRecord),
    "size -1": ([put_map("a", size=-1)], InvalidRecord),
    "size over the limit": ([put_map("a", size=MAX_FILE_SIZE + 1)], InvalidRecord),
    "size true": ([put_map("a", size=True)], InvalidRecord),
    "size text": ([put_map("a", size="1")], InvalidRecord),
    "exec 1": ([put_map("a", exec=1)], InvalidRecord),
    "exec null": ([put_map("a", exec=None)], InvalidRecord),
    "unknown op": ([{"op": "rename", "path": "a"}], DecodeError),
    "op missing": ([{"path": "a"}], DecodeError),
    "put without exec": ([{"op": "put", "path": "a", "file": FILE, "size": 1}], DecodeError),
    "put with an extra key": ([put_map("a", mode=0o644)], DecodeError),
    "delete with a file": ([{"op": "delete", "path": "a", "file": FILE}], DecodeError),
    "change is a list": ([["put", "a"]], DecodeError),
    "change is a link": ([FILE], DecodeError),
}


@pytest.mark.parametrize("name", list(_BAD_CHANGES))
def test_a_bad_change_is_refused(name: str) -> None:
    items, error = _BAD_CHANGES[name]
    data = dagcbor.encode({"changes": items})
    with pytest.raises(error):
        Changeset.decode(data)


@pytest.mark.parametrize(
    "value",
    [
        [],
        "changes",
        {},
        {"changes": {}},
        {"changes": None},
        {"changes": [], "extra": 1},
        {"Changes": []},
    ],
    ids=repr,
)
def test_a_changeset_that_is_not_a_map_of_changes_is_refused(value: Any) -> None:
    with pytest.raises(DecodeError):
        Changeset.decode(dagcbor.encode(value))


def test_boundary_sizes_of_a_put_are_accepted() -> None:
    for size in (0, MAX_FILE_SIZE):
        data = dagcbor.encode({"changes": [put_map("a", size=size, exec=True)]})
        assert Changeset.decode(data) == Changeset((Put("a", FILE, size, True),))


@pytest.mark.parametrize(
    "make",
    [
        lambda: Put("a", RAW, 1),
        lambda: Put("a", FILE, -1),
        lambda: Put("a", FILE, MAX_FILE_SIZE + 1),
        lambda: Put("a", FILE, True),
        lambda: Put("a", FILE, 1, exec=1),  # type: ignore[arg-type]
        lambda: Put("a", FILE.raw, 1),  # type: ignore[arg-type]
        lambda: Changeset((Delete("b"), Delete("a"))),
        lambda: Changeset((Delete("a"), Put("a", FILE, 1))),
    ],
)
def test_an_invalid_change_cannot_be_constructed(make: Any) -> None:
    with pytest.raises(InvalidRecord):
        make()


# --- bad manifests ------------------------------------------------------------------------------


def manifest_map(size: Any, *blocks: Any) -> dict[str, Any]:
    return {"size": size, "blocks": list(blocks)}


def ref(size: Any = 5, cid: Any = RAW) -> dict[str, Any]:
    return {"cid": cid, "size": size}


_BAD_MANIFESTS: dict[str, tuple[Any, type[Exception]]] = {
    "size below the sum": (manifest_map(9, ref(5), ref(5)), InvalidRecord),
    "size above the sum": (manifest_map(11, ref(5), ref(5)), InvalidRecord),
    "size of an empty file not 0": (manifest_map(1), InvalidRecord),
    "negative size": (manifest_map(-1), InvalidRecord),
    "size over the limit": (manifest_map(MAX_FILE_SIZE + 1, ref(5)), InvalidRecord),
    "size text": (manifest_map("5", ref(5)), InvalidRecord),
    "dag-cbor block": (manifest_map(5, ref(5, FILE)), InvalidRecord),
    "block cid as bytes": (manifest_map(5, ref(5, RAW.raw)), InvalidRecord),
    "empty block": (manifest_map(0, ref(0)), InvalidRecord),
    "block over the limit": (
        manifest_map(MAX_BLOCK_SIZE + 1, ref(MAX_BLOCK_SIZE + 1)),
        InvalidRecord,
    ),
    "block size true": (manifest_map(1, ref(True)), InvalidRecord),
    "block size negative": (manifest_map(0, ref(-1), ref(1)), InvalidRecord),
    "not a map": ([5, []], DecodeError),
    "extra key": ({**manifest_map(5, ref(5)), "name": "x"}, DecodeError),
    "blocks missing": ({"size": 0}, DecodeError),
    "blocks not a list": ({"size": 5, "blocks": ref(5)}, DecodeError),
    "block entry not a map": (manifest_map(5, [RAW, 5]), DecodeError),
    "block entry extra key": (manifest_map(5, {**ref(5), "offset": 0}), DecodeError),
    "block entry missing size": (manifest_map(5, {"cid": RAW}), DecodeError),
}


@pytest.mark.parametrize("name", list(_BAD_MANIFESTS))
def test_a_bad_manifest_is_refused(name: str) -> None:
    value, error = _BAD_MANIFESTS[name]
    with pytest.raises(error):
        FileManifest.decode(dagcbor.encode(value))


def test_manifest_bounds_are_accepted() -> None:
    manifest = FileManifest.decode(
        dagcbor.encode(manifest_map(MAX_BLOCK_SIZE + 1, ref(MAX_BLOCK_SIZE), ref(1)))
    )
    assert manifest.size == MAX_BLOCK_SIZE + 1 and [b.size for b in manifest.blocks] == [
        MAX_BLOCK_SIZE,
        1,
    ]
    # Blocks are listed in file order and may repeat.
    repeated = FileManifest.decode(dagcbor.encode(manifest_map(10, ref(5), ref(5))))
    assert repeated.blocks[0] == repeated.blocks[1]


@pytest.mark.parametrize(
    "make",
    [
        lambda: BlockRef(FILE, 1),
        lambda: BlockRef(RAW, 0),
        lambda: BlockRef(RAW, MAX_BLOCK_SIZE + 1),
        lambda: BlockRef(RAW, True),
        lambda: FileManifest(2, (BlockRef(RAW, 1),)),
        lambda: FileManifest(-1, ()),
        lambda: FileManifest(True, (BlockRef(RAW, 1),)),
        lambda: FileManifest(1, [BlockRef(RAW, 1)]),  # type: ignore[arg-type]
        lambda: FileManifest(1, ({"cid": RAW, "size": 1},)),  # type: ignore[arg-type]
    ],
)
def test_an_invalid_manifest_cannot_be_constructed(make: Any) -> None:
    with pytest.raises(InvalidRecord):
        make()


def test_a_manifest_too_large_for_a_block_is_refused() -> None:
    refs = tuple(BlockRef(CID.of_raw(i.to_bytes(4, "big")), MAX_BLOCK_SIZE) for i in range(20_000))
    manifest = FileManifest(size=MAX_BLOCK_SIZE * len(refs), blocks=refs)
    with pytest.raises(TooLarge):
        manifest.encode()
    data = dagcbor.encode(
        {"size": manifest.size, "blocks": [{"cid": r.cid, "size": r.size} for r in refs]}
    )
    assert len(data) > MAX_BLOCK_SIZE
    with pytest.raises(TooLarge):
        FileManifest.decode(data)
