"""Decoding and verifying records and CAR sections from outside (import, later the mesh).

These are plain functions over slices of a batch, so that `ostrom.node.verifier` can run
them in worker processes; this module imports neither trio nor SQLite.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ostrom.crypto.cid import CID
from ostrom.errors import BlockMismatch, DecodeError, OstromError, TooLarge
from ostrom.protocol import dagcbor
from ostrom.protocol.changesets import MAX_BLOCK_SIZE, Changeset, FileManifest
from ostrom.protocol.records import SignedRecord, decode_record, record_from_value


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
