"""Content ids: CIDv1 with a sha2-256 multihash, for records (dag-cbor) and blocks (raw).

A `CID` keeps only its binary form, which is what the store indexes and the wire carries.
The text form (multibase base32, `bafy...`) is made on demand with the standard library's
base32, which is the multibase `b` alphabet; parsing text goes through py-cid, so that every
CID we accept from a user or a file has been checked by a maintained implementation.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
from dataclasses import dataclass
from typing import Final

import cid as pycid

from ostrom.errors import DecodeError

# Multicodec codes (https://github.com/multiformats/multicodec): the only two kinds of
# content Ostrom addresses.
DAG_CBOR: Final = 0x71
RAW: Final = 0x55
# Multihash code and digest length of sha2-256, the only hash Ostrom produces or accepts.
SHA2_256: Final = 0x12
SHA2_256_LEN: Final = 32

# A CIDv1 is <version=1><codec><multihash code><digest length><digest>; every part here is a
# one-byte varint, so the binary form of our CIDs is always 4 + 32 bytes.
_PREFIX_DAG_CBOR: Final = bytes([1, DAG_CBOR, SHA2_256, SHA2_256_LEN])
_PREFIX_RAW: Final = bytes([1, RAW, SHA2_256, SHA2_256_LEN])
CID_LENGTH: Final = 4 + SHA2_256_LEN

# Characters in the text form of our CIDs: `b` and the unpadded base32 of 36 bytes.
_CANONICAL_TEXT_LENGTH: Final = 1 + (CID_LENGTH * 8 + 4) // 5

# base32 pads to a multiple of 8 characters; the text form leaves the padding out.
_PADDING: Final = "=" * (-(_CANONICAL_TEXT_LENGTH - 1) % 8)

_CODEC_NAMES: Final = {DAG_CBOR: "dag-cbor", RAW: "raw"}

# Text forms kept, most recently used: a node that reports its records (events, listings)
# names the same project and parent CIDs again and again, and base32 costs about 5 µs.
# 4,096 entries are about 0.6 MB.
_TEXT_CACHE_ENTRIES: Final = 4096


@functools.lru_cache(maxsize=_TEXT_CACHE_ENTRIES)
def _text_of(raw: bytes) -> str:
    return "b" + base64.b32encode(raw).decode("ascii").lower().rstrip("=")


@dataclass(frozen=True, slots=True, order=True)
class CID:
    """A CIDv1, sha2-256, codec dag-cbor (records, manifests) or raw (file blocks)."""

    raw: bytes

    def __post_init__(self) -> None:
        if len(self.raw) != CID_LENGTH or self.raw[:4] not in (_PREFIX_DAG_CBOR, _PREFIX_RAW):
            raise DecodeError(f"not a CIDv1 sha2-256 dag-cbor or raw CID: {self.raw[:8].hex()}...")

    @classmethod
    def of_dag_cbor(cls, data: bytes) -> CID:
        """The CID of DAG-CBOR bytes (a record or a manifest)."""
        return cls(_PREFIX_DAG_CBOR + hashlib.sha256(data).digest())

    @classmethod
    def of_raw(cls, data: bytes) -> CID:
        """The CID of a raw block of file bytes."""
        return cls(_PREFIX_RAW + hashlib.sha256(data).digest())

    @classmethod
    def parse(cls, text: str) -> CID:
        """Parse a CID from its text form; raise `DecodeError` with a reason if it is not ours.

        Our own canonical form (multibase `b`, base32 of a 36-byte CIDv1) is decoded with the
        standard library's base32, which is 20 times faster than the general parser; anything
        else (other multibases, CIDv0, foreign codecs) goes through py-cid.
        """
        text = text.strip()
        if len(text) == _CANONICAL_TEXT_LENGTH and text[0] == "b":
            try:
                raw = base64.b32decode(text[1:].upper() + _PADDING)
            except (binascii.Error, ValueError):
                raw = b""
            if raw[:4] in (_PREFIX_DAG_CBOR, _PREFIX_RAW) and len(raw) == CID_LENGTH:
                return cls(raw)
        try:
            parsed = pycid.from_string(text)
        except (ValueError, KeyError, TypeError) as exc:
            raise DecodeError(f"not a CID: {text!r} ({exc})") from None
        if parsed.version != 1:
            raise DecodeError(f"not a CIDv1: {text!r}")
        return cls(bytes(parsed.buffer))

    @property
    def codec(self) -> int:
        return self.raw[1]

    @property
    def codec_name(self) -> str:
        return _CODEC_NAMES[self.raw[1]]

    @property
    def is_dag_cbor(self) -> bool:
        return self.raw[1] == DAG_CBOR

    @property
    def digest(self) -> bytes:
        return self.raw[4:]

    def matches(self, data: bytes) -> bool:
        """True if `data` hashes to this CID."""
        return hashlib.sha256(data).digest() == self.raw[4:]

    def __str__(self) -> str:
        return _text_of(self.raw)

    def __repr__(self) -> str:
        return f"CID({self})"

    @property
    def text(self) -> str:
        return str(self)
