"""The signed map that mesh records and catalogues share (docs/PROTOCOL.md 13, 13.5).

Each is one DAG-CBOR map: its fields, `type`, `v`, `author`, `ts` and `sig`, where `sig` is
the author's ed25519 signature, under the kind's own domain, of the canonical encoding of
the map without `sig`. `seal` makes one, `open_map` and `check_envelope` check what every
kind checks alike before it checks its own fields. (Project records have the same shape but
a decoder of their own, tuned for bulk imports: `ostrom.protocol.records`.)
"""

from __future__ import annotations

from typing import Any

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
