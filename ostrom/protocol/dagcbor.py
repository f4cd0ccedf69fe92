"""Strict DAG-CBOR: the deterministic CBOR subset every Ostrom record and manifest uses.

Encoding is canonical (map keys sorted length-first then bytewise, shortest integer forms,
definite lengths). Links are CIDs under tag 42 with the leading 0x00 multibase byte that
DAG-CBOR requires. Floats, other tags, non-string map keys, undefined and integers outside
64 bits are refused.

Decoding accepts only the canonical encoding: the decoded value is encoded again, in the
order its maps' keys arrived, and must give back the same bytes, and every map's keys must
have arrived in canonical order. That refuses duplicate keys, unsorted maps, indefinite
lengths, non-minimal integers and trailing bytes, and makes every value have exactly one
encoding and so exactly one CID. (cbor2's canonical mode would sort the keys again itself,
which costs twice as much as the plain encoding; the walk that checks the data model checks
the order instead.)
"""

from __future__ import annotations

from typing import Any, Final

import cbor2

from ostrom.crypto.cid import CID
from ostrom.errors import DecodeError

# The CBOR tag DAG-CBOR assigns to links.
CID_TAG: Final = 42
# Deepest nesting any Ostrom structure uses is 4 (record > list > map > link); 16 leaves
# room for future fields while refusing hostile nesting long before cbor2's own limit.
MAX_DEPTH: Final = 16
_MAX_UINT: Final = 2**64 - 1
_MIN_NINT: Final = -(2**64)
# Decoded values the data model takes as they are: strings, byte strings, booleans and null,
# most of a record's values, so a walk passes them without a call.
_LEAVES: Final = frozenset({str, bytes, bool, type(None)})

DagValue = Any
"""A value of the DAG-CBOR data model: None, bool, int, str, bytes, CID, list, dict[str, ...]."""


def _default(encoder: Any, value: Any) -> None:
    if isinstance(value, CID):
        encoder.encode(cbor2.CBORTag(CID_TAG, b"\x00" + value.raw))
        return
    raise DecodeError(f"cannot encode {type(value).__name__} in DAG-CBOR")


# A link counts as a nesting level (it is a tag around a byte string), as decoding counts it.
_SCALARS: Final = frozenset({type(None), bool, str, bytes})


def _check(value: DagValue, depth: int) -> None:
    """Refuse anything outside the data model before it is encoded."""
    kind = type(value)
    if kind in _SCALARS:
        return
    if depth > MAX_DEPTH:
        raise DecodeError("DAG-CBOR value nested too deeply")
    if kind is CID:
        return
    if kind is int:
        if not _MIN_NINT <= value <= _MAX_UINT:
            raise DecodeError("integer outside the 64-bit range")
    elif kind is list:
        for item in value:
            _check(item, depth + 1)
    elif kind is dict:
        for key, item in value.items():
            if type(key) is not str:
                raise DecodeError("DAG-CBOR map keys are strings")
            _check(item, depth + 1)
    else:
        raise DecodeError(f"{kind.__name__} is not in the DAG-CBOR data model")


def encode(value: DagValue) -> bytes:
    """The canonical DAG-CBOR encoding of `value`."""
    _check(value, 0)
    return _encode_unchecked(value)


def encode_trusted(value: DagValue) -> bytes:
    """Encode a value already known to be in the data model (it came out of `decode`)."""
    return _encode_unchecked(value)


def _encode_unchecked(value: DagValue) -> bytes:
    try:
        return cbor2.dumps(value, canonical=True, default=_default)
    except (cbor2.CBOREncodeError, UnicodeEncodeError) as exc:
        raise DecodeError(f"cannot encode: {exc}") from None


def _from_wire(value: Any, depth: int) -> DagValue:
    """Check a decoded value against the data model, turning tag-42 links into CIDs in place,
    and check that every map's keys came in canonical order (length first, then bytewise)."""
    kind = type(value)
    if kind in _LEAVES:
        return value
    if depth > MAX_DEPTH:
        raise DecodeError("DAG-CBOR value nested too deeply")
    if kind is int:
        if not _MIN_NINT <= value <= _MAX_UINT:
            raise DecodeError("integer outside the 64-bit range")
        return value
    if kind is list:
        for index, item in enumerate(value):
            if type(item) not in _LEAVES:
                value[index] = _from_wire(item, depth + 1)
        return value
    if kind is dict:
        previous = (-1, b"")
        for key, item in value.items():
            if type(key) is not str:
                raise DecodeError("DAG-CBOR map keys are strings")
            encoded = key.encode()
            order = (len(encoded), encoded)
            if order <= previous:
                raise DecodeError("not canonical DAG-CBOR (map keys out of order)")
            previous = order
            if type(item) not in _LEAVES:
                value[key] = _from_wire(item, depth + 1)
        return value
    if kind is cbor2.CBORTag:
        if value.tag != CID_TAG:
            raise DecodeError(f"CBOR tag {value.tag} is not allowed in DAG-CBOR")
        payload = value.value
        if type(payload) is not bytes or not payload.startswith(b"\x00"):
            raise DecodeError("a DAG-CBOR link is a byte string starting with 0x00")
        return CID(payload[1:])
    raise DecodeError(f"{kind.__name__} is not in the DAG-CBOR data model")


def decode(data: bytes) -> DagValue:
    """Decode canonical DAG-CBOR; raise `DecodeError` with a reason for anything else.

    Links stay cbor2 `CBORTag`s until the canonical check has re-encoded the value (which
    cbor2 does natively for tags, not through a Python hook per link), and only then become
    `CID`s, in the same walk that checks the data model.
    """
    try:
        value = cbor2.loads(
            data,
            max_depth=MAX_DEPTH + 1,
            allow_indefinite=False,
            allow_duplicate_keys=False,
        )
    except (cbor2.CBORDecodeError, ValueError, TypeError, OverflowError) as exc:
        raise DecodeError(f"not valid CBOR: {exc}") from None
    try:
        # Keys in the order they arrived: `_from_wire` checks that order.
        same = cbor2.dumps(value) == data
    except (cbor2.CBOREncodeError, TypeError, ValueError):
        same = False  # a value cbor2 can decode but not encode is not in the data model
    result = _from_wire(value, 0)
    if not same:
        raise DecodeError("not canonical DAG-CBOR (integer form, lengths or trailing bytes)")
    return result
