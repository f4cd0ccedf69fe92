"""Stream framing: round trips, arbitrary splits, and every kind of malformed input."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ostrom.errors import DecodeError, TooLarge
from ostrom.protocol.frames import FrameReader, encode_frame, encode_varint

MAX = 4096

values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.text(max_size=40)
    | st.binary(max_size=80),
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5)
    ),
    max_leaves=20,
)


@given(st.lists(values, max_size=8), st.data())
def test_frames_round_trip_however_the_bytes_are_split(
    items: list[object], data: st.DataObject
) -> None:
    stream = b"".join(encode_frame(item, max_frame=MAX) for item in items)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    reader = FrameReader(max_frame=MAX)
    out: list[object] = []
    previous = 0
    for cut in [*cuts, len(stream)]:
        out.extend(reader.feed(stream[previous:cut]))
        previous = cut
    assert out == items
    assert reader.buffered == 0


def test_an_oversized_frame_is_refused_from_its_length_alone() -> None:
    reader = FrameReader(max_frame=MAX)
    with pytest.raises(TooLarge):
        reader.feed(encode_varint(MAX + 1))  # no body sent at all
    with pytest.raises(TooLarge):
        encode_frame(b"x" * MAX, max_frame=MAX)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\x80\x80\x80\x80\x80\x01", "too long"),
        (b"\x81\x00", "minimally"),
        (b"\x01\xc1", "MessagePack"),  # 0xc1 is never used
        (b"\x03\xd4\x01\x00", "extension"),  # fixext 1
        (b"\x03\x81\x01\x02", "MessagePack"),  # map with an int key
        (b"\x02\xa1\xff", "MessagePack"),  # invalid UTF-8 string
        (b"\x02\x01\x02", "MessagePack"),  # trailing bytes inside the frame
    ],
)
def test_malformed_frames_are_decode_errors(data: bytes, reason: str) -> None:
    with pytest.raises(DecodeError, match=reason):
        FrameReader(max_frame=MAX).feed(data)


@given(st.binary(max_size=200))
def test_arbitrary_bytes_never_raise_anything_but_typed_errors(data: bytes) -> None:
    reader = FrameReader(max_frame=MAX)
    try:
        reader.feed(data)
    except (DecodeError, TooLarge):
        return
    assert reader.buffered <= len(data)
