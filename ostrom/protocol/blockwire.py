"""Messages of `/ostrom/blocks/1.0.0`: fetching blocks by CID from a peer.

The requester sends `want` frames, each naming up to `MAX_WANT` CIDs; the responder answers
every CID in order with a `block` frame (the bytes) or a `missing` frame, then waits for the
next `want` or the end of the stream. The requester verifies each block against its CID
before it keeps it; a peer that sends a block that does not match is misbehaving.

    want:     {"t": "want", "cids": [cid bytes, ...]}
    block:    {"t": "block", "cid": cid bytes, "data": bytes}
    missing:  {"t": "missing", "cid": cid bytes}

Frames use `ostrom.protocol.frames` with `MAX_FRAME` as the bound.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from ostrom.crypto.cid import CID, CID_LENGTH
from ostrom.errors import BlockMismatch, DecodeError, TooLarge
from ostrom.protocol.changesets import MAX_BLOCK_SIZE
from ostrom.protocol.frames import encode_varint

PROTOCOL: Final = "/ostrom/blocks/1.0.0"
# CIDs one `want` may name: enough to keep a stream busy for a round trip (64 x 256 KiB =
# 16 MiB in flight), few enough that a responder's work per frame stays small.
MAX_WANT: Final = 64
# The largest frame: one maximal block plus its CID and the map around it.
MAX_FRAME: Final = MAX_BLOCK_SIZE + 256


# A block message's MessagePack body up to its CID's bytes: a map of 3, "t": "block", "cid":
# and the header of a bin 8 of `CID_LENGTH` bytes; then the key that follows them.
_BLOCK_HEAD: Final = b"\x83\xa1t\xa5block\xa3cid\xc4" + CID_LENGTH.to_bytes(1, "big")
_DATA_KEY: Final = b"\xa4data"


@dataclass(frozen=True, slots=True)
class Want:
    cids: tuple[CID, ...]

    def __post_init__(self) -> None:
        if not 1 <= len(self.cids) <= MAX_WANT:
            raise DecodeError(f"a want names 1 to {MAX_WANT} CIDs")

    def to_wire(self) -> dict[str, Any]:
        return {"t": "want", "cids": [cid.raw for cid in self.cids]}


@dataclass(frozen=True, slots=True)
class Block:
    cid: CID
    data: bytes

    def to_wire(self) -> dict[str, Any]:
        return {"t": "block", "cid": self.cid.raw, "data": self.data}

    def frame_parts(self) -> list[bytes]:
        """This message's frame as pieces to write in order: the bytes of
        `encode_frame(self.to_wire(), max_frame=MAX_FRAME)`, without copying the block.

        The MessagePack body is the map's head up to the `data` key (the same bytes for
        every block but the CID's, which always has `CID_LENGTH` bytes), a bin header, and
        the block itself; MessagePack writes a bin's length in 1, 2 or 4 bytes (bin 8/16/32).
        A node serves a new contribution's small blocks to each of its followers, so this is
        built by hand rather than by packing a map each time.
        """
        size = len(self.data)
        if size < 1 << 8:
            bin_header = b"\xc4" + size.to_bytes(1, "big")
        elif size < 1 << 16:
            bin_header = b"\xc5" + size.to_bytes(2, "big")
        else:
            bin_header = b"\xc6" + size.to_bytes(4, "big")
        body_head = b"".join((_BLOCK_HEAD, self.cid.raw, _DATA_KEY, bin_header))
        length = len(body_head) + size
        if length > MAX_FRAME:
            raise TooLarge(f"frame of {length} bytes is over the limit of {MAX_FRAME}")
        return [encode_varint(length), body_head, self.data]


@dataclass(frozen=True, slots=True)
class Missing:
    cid: CID

    def to_wire(self) -> dict[str, Any]:
        return {"t": "missing", "cid": self.cid.raw}


Message = Want | Block | Missing


def _cid(value: object) -> CID:
    if not isinstance(value, bytes):
        raise DecodeError("a CID travels as bytes")
    return CID(value)


def parse(value: Any, *, verify: bool = True) -> Message:
    """A message from a decoded frame; `DecodeError` for anything else.

    A `block` is checked against its CID here, so no caller can keep unverified bytes;
    a mismatch is `BlockMismatch`, which marks the peer as misbehaving. With `verify=False`
    the check is left to the caller, which must make it before it keeps or uses the bytes
    (a fetcher whose store checks every block as it writes it hashes each block once).
    """
    if not isinstance(value, dict) or not isinstance(value.get("t"), str):
        raise DecodeError("a blocks message is a map with a type `t`")
    kind = value["t"]
    if kind == "want" and set(value) == {"t", "cids"} and isinstance(value["cids"], list):
        return Want(tuple(_cid(item) for item in value["cids"]))
    if kind == "block" and set(value) == {"t", "cid", "data"}:
        cid, data = _cid(value["cid"]), value["data"]
        if not isinstance(data, bytes) or len(data) > MAX_BLOCK_SIZE:
            raise DecodeError("block data is bytes of at most one block's size")
        if verify and not cid.matches(data):
            raise BlockMismatch(f"peer sent bytes that do not match block {cid}")
        return Block(cid, data)
    if kind == "missing" and set(value) == {"t", "cid"}:
        return Missing(_cid(value["cid"]))
    raise DecodeError(f"not a blocks message: {sorted(value)}")
