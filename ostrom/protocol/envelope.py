"""The signed map that mesh records and catalogues share (docs/PROTOCOL.md 13, 13.5).

Each is one DAG-CBOR map: its fields, `type`, `v`, `author`, `ts` and `sig`, where `sig` is
the author's ed25519 signature, under the kind's own domain, of the canonical encoding of
the map without `sig`. `seal` makes one, `open_map` and `check_envelope` check what every
kind checks alike before it checks its own fields. (Project records have the same shape but
a decoder of their own, tuned for bulk imports: `ostrom.protocol.records`.)
"""

from __future__ import annotations

from typing import Any, Final

from ostrom.crypto import signing
from ostrom.crypto.keys import SIGNATURE_LENGTH, Identity
from ostrom.errors import InvalidRecord, TooLarge
from ostrom.protocol import dagcbor


def seal(
    unsigned: dict[str, Any], identity: Identity, domain: bytes, *, what: str, max_size: int
) -> tuple[bytes, bytes]:
    """Sign `unsigned` (the whole map but `sig`) as `identity`, which must be its author, and
    add the signature: returns `(sig, canonical bytes)`; `TooLarge` past `max_size`."""
    if identity.public_key != unsigned["author"]:
        raise InvalidRecord(f"a {what} is signed by its author's key")
    sig = signing.sign(identity, domain, dagcbor.encode(unsigned))
    unsigned["sig"] = sig
    data = dagcbor.encode(unsigned)
    if len(data) > max_size:
        raise TooLarge(f"{what} is {len(data)} bytes; the limit is {max_size}")
    return sig, data


def open_map(data: bytes, *, what: str, max_size: int) -> dict[Any, Any]:
    """The map `data` encodes, before anything in it is checked; `TooLarge` past
    `max_size` (checked before decoding)."""
    if len(data) > max_size:
        raise TooLarge(f"{what} is {len(data)} bytes; the limit is {max_size}")
    value = dagcbor.decode(data)
    if not isinstance(value, dict):
        raise InvalidRecord(f"a {what} is a DAG-CBOR map")
    return value


# How the `sig` entry of a canonical map starts: the key, then a 64-byte byte string header.
_SIG_ENTRY_HEAD: Final = dagcbor.encode("sig") + b"\x58\x40"
_SIG_ENTRY_LENGTH: Final = len(_SIG_ENTRY_HEAD) + SIGNATURE_LENGTH


def unsigned_bytes(data: bytes, unsigned: dict[Any, Any]) -> bytes:
    """What the signature of `data` covers (after the domain): the encoding of the map
    without `sig`, cut out of `data` rather than encoded again.

    `data` is canonical (the strict decoder refused anything else) and `unsigned` is its map
    less `sig` (as `check_envelope` leaves it), so the payload is the same bytes less the
    `sig` entry, with the map's entry count one lower. These maps have fewer than 24
    entries, so the count is the low bits of the first byte, and the `sig` entry starts
    right after the entries whose keys sort before it in canonical order (`v`, `ts`)."""
    before = [k for k in unsigned if isinstance(k, str) and (len(k), k) < (3, "sig")]
    offset = 1 + sum(len(dagcbor.encode(k)) + len(dagcbor.encode(unsigned[k])) for k in before)
    return cut_sig_entry(data, offset, "the signed map")


def cut_sig_entry(data: bytes, offset: int, what: str) -> bytes:
    """`data`, a canonical map of fewer than 24 entries whose `sig` entry starts at `offset`,
    without that entry and with its entry count one lower: the bytes the signature covers."""
    if not 0xA1 <= data[0] <= 0xB7 or data[offset : offset + len(_SIG_ENTRY_HEAD)] != (
        _SIG_ENTRY_HEAD
    ):
        raise InvalidRecord(f"{what} is not laid out as canonical DAG-CBOR")
    return bytes([data[0] - 1]) + data[1:offset] + data[offset + _SIG_ENTRY_LENGTH :]


def check_envelope(
    value: dict[Any, Any], kind: str, version: int, expected: frozenset[str]
) -> bytes:
    """Check what every signed map of `kind` has alike: its version, exactly the fields
    `expected`, and a signature of the right length, which it takes out of `value` (what
    is left is what the signature covers) and returns."""
    if type(value.get("v")) is not int or value["v"] != version:
        raise InvalidRecord(f"{kind}: unsupported version {value.get('v')!r}")
    if value.keys() != expected:
        missing, unknown = expected - value.keys(), value.keys() - expected
        parts = [f"missing fields {', '.join(sorted(missing))}"] if missing else []
        parts += [f"unknown fields {', '.join(sorted(unknown))}"] if unknown else []
        raise InvalidRecord(f"{kind}: " + "; ".join(parts))
    sig = value.pop("sig")
    if not isinstance(sig, bytes) or len(sig) != SIGNATURE_LENGTH:
        raise InvalidRecord(f"{kind}: sig must be a 64-byte ed25519 signature")
    return sig
