"""Decoding and verifying records and CAR sections from outside (import, the mesh).

These are plain functions over slices of a batch, so that `ostrom.node.verifier` can run
them in worker processes; this module imports neither trio nor SQLite.

A worker sends its results back pickled. A `SignedRecord` pickles as a tree of objects
(body, CIDs, links): about 12 us to pickle in the worker and 10-17 us to unpickle in the
daemon, per record. Where the daemon only stores what it receives (sync), workers send a
`RecordRow` instead, a flat tuple of what the store writes, which costs about 1 us each way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from ostrom.crypto.cid import CID
from ostrom.errors import BlockMismatch, DecodeError, OstromError, TooLarge
from ostrom.protocol import dagcbor
from ostrom.protocol.changesets import MAX_BLOCK_SIZE, Changeset, FileManifest
from ostrom.protocol.records import Project, SignedRecord, decode_record, record_from_value

# A verified record as the store writes it: (cid, type, project, author, ts, parents, target,
# fork_of, name, data). CIDs are binary; `project` is the record's own CID for a genesis;
# `parents` is the binary CIDs of its parents concatenated; `target` (validations and
# comments), `fork_of` (the parent project of a fork's genesis) and `name` (a genesis's
# project name) are None when the record has none. Only `record_row` makes these, from
# records that passed verification.
RecordRow = tuple[
    bytes, str, bytes, bytes, int, bytes, bytes | None, bytes | None, str | None, bytes
]
# Positions in a RecordRow that readers of rows use.
ROW_CID: Final = 0
ROW_TYPE: Final = 1
ROW_PROJECT: Final = 2
ROW_PARENTS: Final = 5
ROW_FORK_OF: Final = 7
ROW_DATA: Final = 9


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


def record_row(record: SignedRecord) -> RecordRow:
    """The store's row for a verified record."""
    body = record.body
    parents = record.parents
    target = record.target
    fork_of = name = None
    if isinstance(body, Project):
        name = body.name
        if body.fork_of is not None:
            fork_of = body.fork_of.project.raw
    return (
        record.cid.raw,
        body.TYPE,
        record.project.raw,
        body.author,
        body.ts,
        parents[0].raw if len(parents) == 1 else b"".join(p.raw for p in parents),
        None if target is None else target.raw,
        fork_of,
        name,
        record.data,
    )


def decode_row_slice(items: Sequence[bytes], start: int) -> list[RecordRow | Refusal]:
    """`decode_slice`, giving each good record as its store row."""
    out: list[RecordRow | Refusal] = []
    for offset, data in enumerate(items):
        try:
            out.append(record_row(decode_record(data)))
        except OstromError as exc:
            out.append(Refusal(start + offset, exc.code, exc.message))
    return out


def _trusted(public_key: bytes, signature: bytes, domain: bytes, payload: bytes) -> None:
    """The signature check for `decode_row`: the row was made from a verified record."""


def decode_row(row: RecordRow) -> SignedRecord:
    """The record a row was made from, decoded again without checking its signature: only
    for rows that `record_row` made from verified records."""
    return decode_record(row[ROW_DATA], verify=_trusted)
