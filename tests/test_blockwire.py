"""The blocks protocol's messages: round trips through frames, and hostile input."""

from __future__ import annotations

import pytest

from ostrom.crypto.cid import CID
from ostrom.errors import BlockMismatch, DecodeError
from ostrom.protocol.blockwire import MAX_FRAME, MAX_WANT, Block, Missing, Want, parse
from ostrom.protocol.frames import FrameReader, encode_frame


def _through_frames(message: Want | Block | Missing) -> object:
    [value] = FrameReader(max_frame=MAX_FRAME).feed(
        encode_frame(message.to_wire(), max_frame=MAX_FRAME)
    )
    return parse(value)


def test_messages_round_trip() -> None:
    data = b"some file bytes"
    cid = CID.of_raw(data)
    for message in (Want((cid, CID.of_dag_cbor(b"m"))), Block(cid, data), Missing(cid)):
        assert _through_frames(message) == message


def test_a_block_that_does_not_match_its_cid_is_refused() -> None:
    cid = CID.of_raw(b"the real bytes")
    with pytest.raises(BlockMismatch):
        parse({"t": "block", "cid": cid.raw, "data": b"other bytes"})


def test_a_maximal_block_fits_in_a_frame() -> None:
    data = b"\x00" * (1024 * 1024)
    assert _through_frames(Block(CID.of_raw(data), data)) == Block(CID.of_raw(data), data)


@pytest.mark.parametrize(
    "value",
    [
        None,
        [],
        {"t": 1},
        {"t": "want", "cids": []},
        {"t": "want", "cids": [b"\x01" * 36] * (MAX_WANT + 1)},
        {"t": "want", "cids": ["bafy..."]},
        {"t": "want", "cids": [b"short"]},
        {"t": "block", "cid": CID.of_raw(b"x").raw},
        {"t": "block", "cid": CID.of_raw(b"x").raw, "data": "x"},
        {"t": "missing", "cid": b"\x00" * 36},
        {"t": "missing", "cid": CID.of_raw(b"x").raw, "extra": 1},
        {"t": "gimme"},
    ],
)
def test_malformed_messages_are_decode_errors(value: object) -> None:
    with pytest.raises(DecodeError):
        parse(value)


@pytest.mark.parametrize("size", [0, 1, 255, 256, 65535, 65536, 256 * 1024, 1024 * 1024])
def test_a_block_frame_in_parts_is_the_frame_of_the_message(size: int) -> None:
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    block = Block(CID.of_raw(data), data)
    parts = block.frame_parts()
    assert b"".join(parts) == encode_frame(block.to_wire(), max_frame=MAX_FRAME)
    assert parts[-1] is data  # the block is written as it is, not copied
