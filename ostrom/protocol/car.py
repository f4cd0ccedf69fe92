"""CARv1 (https://ipld.io/specs/transport/car/carv1/): blocks and their CIDs in one stream.

    car     = varint(len(header)) header section*
    header  = DAG-CBOR {"roots": [CID, ...], "version": 1}
    section = varint(len(cid) + len(data)) cid data

Varints are multiformats unsigned varints: LEB128, minimal, at most 9 bytes. Ostrom's CIDs
are always CIDv1 sha2-256, dag-cbor or raw, so a section's CID is exactly `CID_LENGTH` bytes;
a CAR holding any other kind of CID (CIDv0, another hash or codec) is refused rather than
skipped, because it cannot hold anything Ostrom stores.

The encoder writes one root or more (go-car refuses a header without roots); the reader accepts
an empty root list too, as the spec's maintainers recommend for new readers.

`CarReader` is a sans-IO push parser: feed it the bytes as they arrive, in pieces of any size,
and it returns the header and then each section as soon as it is complete. It holds at most
one section plus the unparsed rest of the last piece fed, and refuses a section longer than
`max_section` as soon as its length prefix is read, before buffering it. Every section's data
is checked against its CID.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from ostrom.crypto.cid import CID, CID_LENGTH, SHA2_256, SHA2_256_LEN
from ostrom.errors import BlockMismatch, DecodeError, InvalidInput, TooLarge
from ostrom.protocol import dagcbor
from ostrom.protocol.changesets import MAX_BLOCK_SIZE

# The multiformats unsigned-varint spec caps a varint at 9 bytes (63 bits of value).
MAX_VARINT_BYTES: Final = 9
# The largest section an Ostrom node ever writes: the largest block plus its CID.
DEFAULT_MAX_SECTION: Final = MAX_BLOCK_SIZE + CID_LENGTH
# A header with ~1,500 roots; Ostrom writes one or a few, so this only stops a hostile length.
MAX_HEADER: Final = 64 * 1024
CAR_VERSION: Final = 1


@dataclass(frozen=True, slots=True)
class CarHeader:
    """The header of a CARv1: the CIDs the archive is about."""

    roots: tuple[CID, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.roots, tuple) or not all(isinstance(r, CID) for r in self.roots):
            raise InvalidInput("CAR roots are a tuple of CIDs")


@dataclass(frozen=True, slots=True)
class CarSection:
    """One block of a CAR; constructing it checks that `data` hashes to `cid`."""

    cid: CID
    data: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.cid, CID) or not isinstance(self.data, bytes):
            raise InvalidInput("a CAR section is a CID and bytes")
        if not self.cid.matches(self.data):
            raise BlockMismatch(f"block {self.cid}: its bytes do not hash to its CID")


def encode_uvarint(value: int) -> bytes:
    """The minimal unsigned varint of `value` (0 <= value < 2**63)."""
    if not 0 <= value < 1 << (7 * MAX_VARINT_BYTES):
        raise InvalidInput(f"varint out of range: {value}")
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode_header(roots: Sequence[CID]) -> bytes:
    """The length-prefixed CARv1 header naming `roots` (at least one)."""
    if not roots:
        raise InvalidInput("a CAR names at least one root")
    for root in roots:
        if not isinstance(root, CID):
            raise InvalidInput(f"a CAR root must be a CID, not {type(root).__name__}")
    header = dagcbor.encode({"roots": list(roots), "version": CAR_VERSION})
    return encode_uvarint(len(header)) + header


def encode_section(cid: CID, data: bytes) -> bytes:
    """One length-prefixed section. The caller vouches that `data` hashes to `cid` (blocks come
    from the store, verified when stored); every reader checks it again."""
    if not isinstance(cid, CID):
        raise InvalidInput(f"a CAR section's CID must be a CID, not {type(cid).__name__}")
    return encode_uvarint(CID_LENGTH + len(data)) + cid.raw + data


# What the reader expects next.
_HEADER_LENGTH: Final = 0
_HEADER: Final = 1
_SECTION_LENGTH: Final = 2
_SECTION: Final = 3
_CLOSED: Final = 4

# The first two bytes of a CIDv0 (a bare sha2-256 multihash), to name it in an error.
_CIDV0_PREFIX: Final = bytes([SHA2_256, SHA2_256_LEN])


class CarReader:
    """Parse a CARv1 stream pushed in pieces; see the module docstring."""

    __slots__ = ("_buffer", "_max_section", "_need", "_offset", "_start", "_state")

    def __init__(self, *, max_section: int = DEFAULT_MAX_SECTION) -> None:
        if not isinstance(max_section, int) or isinstance(max_section, bool) or max_section < 1:
            raise InvalidInput(f"max_section must be a positive integer, not {max_section!r}")
        self._max_section = max_section
        self._buffer = bytearray()
        # The stream offset of the first byte of `_buffer`, for error positions.
        self._offset = 0
        self._state = _HEADER_LENGTH
        # The length of the header or section being waited for.
        self._need = 0
        # The stream offset where that header or section (its length prefix) starts; errors
        # name it, as `xxd` or `dd skip=` would find it.
        self._start = 0

    def feed(self, data: bytes) -> list[CarHeader | CarSection]:
        """Add the next bytes of the stream; return what they completed, in stream order.

        Raises `DecodeError` (with the byte offset) for a malformed stream, `TooLarge` for a
        section over `max_section` and `BlockMismatch` for data that does not match its CID.
        After an error the reader is unusable.
        """
        if self._state == _CLOSED:
            raise InvalidInput("this CAR reader is closed")
        self._buffer += data
        buffer = self._buffer
        end = len(buffer)
        pos = 0
        out: list[CarHeader | CarSection] = []
        try:
            while True:
                if self._state in (_HEADER_LENGTH, _SECTION_LENGTH):
                    read = _read_uvarint(buffer, pos, self._offset)
                    if read is None:
                        break
                    length, after = read
                    self._start = self._offset + pos
                    if self._state == _HEADER_LENGTH:
                        self._check_header_length(length, self._start)
                        self._state = _HEADER
                    else:
                        self._check_section_length(length, self._start)
                        self._state = _SECTION
                    self._need = length
                    pos = after
                elif end - pos < self._need:
                    break
                elif self._state == _HEADER:
                    out.append(_parse_header(buffer, pos, self._need, self._start))
                    pos += self._need
                    self._state = _SECTION_LENGTH
                else:
                    out.append(_parse_section(buffer, pos, self._need, self._start))
                    pos += self._need
                    self._state = _SECTION_LENGTH
        except (DecodeError, BlockMismatch, InvalidInput):
            self._state = _CLOSED
            self._buffer = bytearray()
            raise
        del buffer[:pos]
        self._offset += pos
        return out

    def close(self) -> None:
        """End the stream; raise `DecodeError` if it ended before the header or mid-section."""
        state, remaining = self._state, len(self._buffer)
        self._state = _CLOSED
        self._buffer = bytearray()
        if state == _CLOSED:
            return
        where = self._offset + remaining
        if state in (_HEADER_LENGTH, _HEADER):
            raise DecodeError(f"CAR ended at byte {where} before its header was complete")
        if state == _SECTION or remaining:
            raise DecodeError(f"CAR ended at byte {where} in the middle of a section")

    def _check_header_length(self, length: int, at: int) -> None:
        if length == 0:
            raise DecodeError(f"CAR header at byte {at} is empty")
        if length > MAX_HEADER:
            raise TooLarge(f"CAR header at byte {at} is {length} bytes; the limit is {MAX_HEADER}")

    def _check_section_length(self, length: int, at: int) -> None:
        if length > self._max_section:
            raise TooLarge(
                f"CAR section at byte {at} is {length} bytes; the limit is {self._max_section}"
            )
        if length < CID_LENGTH:
            raise DecodeError(
                f"CAR section at byte {at} is {length} bytes, too short for a CIDv1 sha2-256"
            )


def _read_uvarint(buffer: bytearray, pos: int, base: int) -> tuple[int, int] | None:
    """Read an unsigned varint at `pos`: (value, position after it), or None if incomplete."""
    value = 0
    shift = 0
    end = len(buffer)
    for i in range(pos, min(end, pos + MAX_VARINT_BYTES)):
        byte = buffer[i]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            if byte == 0 and i > pos:
                raise DecodeError(f"non-minimal varint at byte {base + pos}")
            return value, i + 1
        shift += 7
    if end - pos >= MAX_VARINT_BYTES:
        raise DecodeError(f"varint longer than {MAX_VARINT_BYTES} bytes at byte {base + pos}")
    return None


def _parse_header(buffer: bytearray, pos: int, length: int, at: int) -> CarHeader:
    try:
        value = dagcbor.decode(bytes(buffer[pos : pos + length]))
    except DecodeError as exc:
        raise DecodeError(f"CAR header at byte {at}: {exc.message}") from None
    if isinstance(value, dict) and value.get("version") != CAR_VERSION:
        raise DecodeError(
            f"CAR header at byte {at}: version {value.get('version')!r}; only CARv1 is read"
        )
    if (
        not isinstance(value, dict)
        or set(value) != {"roots", "version"}
        or not isinstance(value["roots"], list)
    ):
        raise DecodeError(f"CAR header at byte {at} is not a map of roots and version 1")
    # Every link dagcbor decodes is already a valid Ostrom CID; a list may hold other things.
    roots = value["roots"]
    if not all(isinstance(root, CID) for root in roots):
        raise DecodeError(f"CAR header at byte {at}: roots must all be CIDs")
    return CarHeader(tuple(roots))


def _parse_section(buffer: bytearray, pos: int, length: int, at: int) -> CarSection:
    cid_bytes = bytes(buffer[pos : pos + CID_LENGTH])
    try:
        cid = CID(cid_bytes)
    except DecodeError:
        kind = "a CIDv0" if cid_bytes[:2] == _CIDV0_PREFIX else "not a CIDv1 sha2-256 dag-cbor/raw"
        raise DecodeError(
            f"CAR section at byte {at}: its CID is {kind} ({cid_bytes[:4].hex()}...)"
        ) from None
    data = bytes(buffer[pos + CID_LENGTH : pos + length])
    try:
        return CarSection(cid, data)
    except BlockMismatch as exc:
        raise BlockMismatch(f"CAR section at byte {at}: {exc.message}") from None
