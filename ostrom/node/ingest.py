"""Decoding and verifying batches of records from outside (import, later the mesh).

Signature verification dominates the cost of taking in a record, and libsodium releases
the GIL while it verifies, so a batch is split across worker threads: on a 2-core machine
the two halves verify at the same time while the Python parts of decoding interleave.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeVar

import trio

from ostrom.crypto.cid import CID
from ostrom.errors import BlockMismatch, DecodeError, OstromError, TooLarge
from ostrom.protocol import dagcbor
from ostrom.protocol.changesets import MAX_BLOCK_SIZE, Changeset, FileManifest
from ostrom.protocol.records import SignedRecord, decode_record, record_from_value

# Below this many records a batch is decoded on one thread: the hand-off costs more than
# the parallel verification saves.
PARALLEL_THRESHOLD: Final = 64
# Verification threads per batch: one per core, which is what the GIL-free part can use.
WORKERS: Final = max(1, min(4, os.cpu_count() or 1))


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why the record at `index` of a batch was not taken."""

    index: int
    code: str
    message: str
    cid: CID | None = None


@dataclass(frozen=True, slots=True)
class Block:
    """A changeset, manifest or raw block from a CAR file, checked against its CID."""

    cid: CID
    data: bytes


def decode_section(cid_ref: str | bytes, data: bytes) -> SignedRecord | Block:
    """One CAR section: a verified record, or a block that is well-formed for its kind.

    A dag-cbor section is a record when its map has `type` or `sig`, a changeset when it is
    `{changes}`, a manifest when it is `{size, blocks}`; anything else is refused. Each
    section is decoded once. The CID may be given in text or binary form; bulk callers send
    the binary form, which needs no parsing.
    """
    cid = CID(cid_ref) if type(cid_ref) is bytes else CID.parse(str(cid_ref))
    if len(data) > MAX_BLOCK_SIZE:
        raise TooLarge(f"{cid}: {len(data)} bytes is over the {MAX_BLOCK_SIZE}-byte block limit")
    if not cid.matches(data):
        raise BlockMismatch(f"{cid}: the bytes do not hash to this CID")
    if not cid.is_dag_cbor:
        return Block(cid, data)
    value = dagcbor.decode(data)
    if isinstance(value, dict):
        if "type" in value or "sig" in value:
            return record_from_value(data, value)
        if set(value) == {"changes"}:
            Changeset.from_value(value)
            return Block(cid, data)
        if set(value) == {"size", "blocks"}:
            FileManifest.from_value(value)
            return Block(cid, data)
    raise DecodeError(f"{cid}: neither a record, a changeset nor a file manifest")


def decode_section_slice(
    items: Sequence[Sequence[object]], start: int
) -> list[SignedRecord | Block | Refusal]:
    out: list[SignedRecord | Block | Refusal] = []
    for offset, item in enumerate(items):
        cid_ref, data = item[0], item[1]
        try:
            if not isinstance(cid_ref, (str, bytes)) or not isinstance(data, bytes):
                raise DecodeError("a section is [cid, bytes]")
            out.append(decode_section(cid_ref, data))
        except OstromError as exc:
            cid = None
            if isinstance(cid_ref, (str, bytes)):
                try:
                    cid = CID(cid_ref) if isinstance(cid_ref, bytes) else CID.parse(cid_ref)
                except DecodeError:
                    cid = None
            out.append(Refusal(start + offset, exc.code, exc.message, cid))
    return out


def decode_slice(items: Sequence[bytes], start: int) -> list[SignedRecord | Refusal]:
    out: list[SignedRecord | Refusal] = []
    for offset, data in enumerate(items):
        try:
            out.append(decode_record(data))
        except OstromError as exc:
            out.append(Refusal(start + offset, exc.code, exc.message))
    return out


T = TypeVar("T")


async def _parallel(fn: Callable[[Sequence[Any], int], list[T]], items: Sequence[Any]) -> list[T]:
    """`fn(slice, start)` over `items` split across the worker threads, results in order."""
    if len(items) < PARALLEL_THRESHOLD or WORKERS == 1:
        return await trio.to_thread.run_sync(fn, items, 0)
    step = -(-len(items) // WORKERS)
    parts: list[list[T]] = [[] for _ in range(WORKERS)]

    async def run(slot: int) -> None:
        start = slot * step
        parts[slot] = await trio.to_thread.run_sync(fn, items[start : start + step], start)

    async with trio.open_nursery() as nursery:
        for slot in range(WORKERS):
            nursery.start_soon(run, slot)
    return [item for part in parts for item in part]


async def decode_batch(items: Sequence[bytes]) -> list[SignedRecord | Refusal]:
    """Decode and verify records in parallel; the result keeps their order."""
    return await _parallel(decode_slice, items)


async def decode_sections(
    items: Sequence[Sequence[object]],
) -> list[SignedRecord | Block | Refusal]:
    """Decode and verify CAR sections (`[cid, bytes]`) in parallel, in order."""
    return await _parallel(decode_section_slice, items)
