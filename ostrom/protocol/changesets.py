"""Changesets and file manifests: the DAG-CBOR blocks a contribution links to.

A contribution's `changes` field links to one or more changeset blocks, so that a
contribution touching thousands of files still fits in a 64 KiB record. A changeset lists
changes sorted by path, at most one per path. A `put` links to a file manifest, which lists
the raw blocks holding the file's bytes in order.

    changeset:  {"changes": [{"op": "put", "path": str, "file": CID, "size": int, "exec": bool}
                             | {"op": "delete", "path": str}, ...]}
    manifest:   {"size": int, "blocks": [{"cid": CID(raw), "size": int}, ...]}

Both are addressed by their dag-cbor CID and verified against it like any block.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final, Literal

from ostrom.crypto.cid import CID
from ostrom.errors import DecodeError, InvalidRecord, TooLarge, UnsafePath
from ostrom.protocol import dagcbor
from ostrom.protocol.paths import check_tree_path

# Every block, raw or dag-cbor, is at most 1 MiB: four default-size file blocks, and enough
# for a manifest of a 5 GiB file or a changeset of about 8,000 changes.
MAX_BLOCK_SIZE: Final = 1024 * 1024
# The largest file Ostrom tracks: 1 TiB, far beyond what a node is likely to grant.
MAX_FILE_SIZE: Final = 1 << 40


@dataclass(frozen=True, slots=True)
class Put:
    """Set `path` to the file whose manifest is `file`."""

    path: str
    file: CID
    size: int
    exec: bool = False
    op: Literal["put"] = "put"

    def __post_init__(self) -> None:
        check_tree_path(self.path)
        if not isinstance(self.file, CID) or not self.file.is_dag_cbor:
            raise InvalidRecord("a put links to a dag-cbor file manifest")
        if (
            not isinstance(self.size, int)
            or isinstance(self.size, bool)
            or not 0 <= self.size <= MAX_FILE_SIZE
        ):
            raise InvalidRecord(f"file size out of range: {self.size!r}")
        if not isinstance(self.exec, bool):
            raise InvalidRecord("exec must be a boolean")

    def to_map(self) -> dict[str, Any]:
        return {
            "op": "put",
            "path": self.path,
            "file": self.file,
            "size": self.size,
            "exec": self.exec,
        }


@dataclass(frozen=True, slots=True)
class Delete:
    """Remove `path` from the tree."""

    path: str
    op: Literal["delete"] = "delete"

    def __post_init__(self) -> None:
        check_tree_path(self.path)

    def to_map(self) -> dict[str, Any]:
        return {"op": "delete", "path": self.path}


Change = Put | Delete


@dataclass(frozen=True, slots=True)
class Changeset:
    changes: tuple[Change, ...]

    def __post_init__(self) -> None:
        paths = [change.path for change in self.changes]
        if paths != sorted(paths) or len(set(paths)) != len(paths):
            raise InvalidRecord("a changeset lists changes sorted by path, one per path")

    def encode(self) -> bytes:
        data = dagcbor.encode({"changes": [change.to_map() for change in self.changes]})
        if len(data) > MAX_BLOCK_SIZE:
            raise TooLarge(f"changeset is {len(data)} bytes; the limit is {MAX_BLOCK_SIZE}")
        return data

    @classmethod
    def decode(cls, data: bytes) -> Changeset:
        if len(data) > MAX_BLOCK_SIZE:
            raise TooLarge(f"changeset is {len(data)} bytes; the limit is {MAX_BLOCK_SIZE}")
        return cls.from_value(dagcbor.decode(data))

    @classmethod
    def from_value(cls, value: Any) -> Changeset:
        """A changeset from bytes already decoded by `dagcbor.decode`."""
        if (
            not isinstance(value, dict)
            or set(value) != {"changes"}
            or not isinstance(value["changes"], list)
        ):
            raise DecodeError("a changeset is a map with one key, changes, holding a list")
        return cls(tuple(_change_from_map(item) for item in value["changes"]))


def _change_from_map(value: object) -> Change:
    if not isinstance(value, dict):
        raise DecodeError("a change is a map")
    try:
        if value.get("op") == "put" and set(value) == {"op", "path", "file", "size", "exec"}:
            return Put(
                path=value["path"], file=value["file"], size=value["size"], exec=value["exec"]
            )
        if value.get("op") == "delete" and set(value) == {"op", "path"}:
            return Delete(path=value["path"])
    except UnsafePath as exc:
        raise InvalidRecord(f"change to an unsafe path: {exc.message}") from None
    raise DecodeError(f"not a valid change: keys {sorted(value)}")


def split_changes(changes: list[Change]) -> list[Changeset]:
    """Sort `changes` by path and split them into changesets that each fit in a block."""
    ordered = sorted(changes, key=lambda change: change.path)
    paths = [change.path for change in ordered]
    if len(set(paths)) != len(paths):
        raise InvalidRecord("a contribution changes each path at most once")
    out: list[Changeset] = []
    batch: list[Change] = []
    size = 16  # the map header and key around the list
    for change in ordered:
        # A change's encoding is its path, a 36-byte CID and about 40 bytes of keys.
        change_size = len(change.path.encode()) + 100
        if batch and size + change_size > MAX_BLOCK_SIZE:
            out.append(Changeset(tuple(batch)))
            batch, size = [], 16
        batch.append(change)
        size += change_size
    if batch or not out:
        out.append(Changeset(tuple(batch)))
    return out


@dataclass(frozen=True, slots=True)
class BlockRef:
    cid: CID
    size: int

    def __post_init__(self) -> None:
        if not isinstance(self.cid, CID) or self.cid.is_dag_cbor:
            raise InvalidRecord("a manifest lists raw blocks")
        if (
            not isinstance(self.size, int)
            or isinstance(self.size, bool)
            or not 0 < self.size <= MAX_BLOCK_SIZE
        ):
            raise InvalidRecord(f"block size out of range: {self.size!r}")


@dataclass(frozen=True, slots=True)
class FileManifest:
    """The blocks of one file, in order; `size` is their total."""

    size: int
    blocks: tuple[BlockRef, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.size, int) or isinstance(self.size, bool) or self.size < 0:
            raise InvalidRecord(f"file size must be a non-negative integer: {self.size!r}")
        if not isinstance(self.blocks, tuple) or not all(
            isinstance(b, BlockRef) for b in self.blocks
        ):
            raise InvalidRecord("a manifest's blocks are BlockRefs")
        if sum(block.size for block in self.blocks) != self.size:
            raise InvalidRecord("a manifest's size is the sum of its blocks' sizes")
        if self.size > MAX_FILE_SIZE:
            raise InvalidRecord("file too large")

    def encode(self) -> bytes:
        data = dagcbor.encode(
            {
                "size": self.size,
                "blocks": [{"cid": block.cid, "size": block.size} for block in self.blocks],
            }
        )
        if len(data) > MAX_BLOCK_SIZE:
            raise TooLarge(f"manifest is {len(data)} bytes; the limit is {MAX_BLOCK_SIZE}")
        return data

    @classmethod
    def decode(cls, data: bytes) -> FileManifest:
        if len(data) > MAX_BLOCK_SIZE:
            raise TooLarge(f"manifest is {len(data)} bytes; the limit is {MAX_BLOCK_SIZE}")
        return cls.from_value(dagcbor.decode(data))

    @classmethod
    def from_value(cls, value: Any) -> FileManifest:
        """A manifest from bytes already decoded by `dagcbor.decode`."""
        if (
            not isinstance(value, dict)
            or set(value) != {"size", "blocks"}
            or not isinstance(value["blocks"], list)
        ):
            raise DecodeError("a manifest is a map of size and blocks")
        refs: list[BlockRef] = []
        for item in value["blocks"]:
            if not isinstance(item, dict) or set(item) != {"cid", "size"}:
                raise DecodeError("a manifest block entry is a map of cid and size")
            refs.append(BlockRef(cid=item["cid"], size=item["size"]))
        return cls(size=value["size"], blocks=tuple(refs))
