"""Framing for Ostrom's stream protocols: an unsigned-varint length, then a MessagePack body.

A peer announces each frame's length before sending it, so a reader refuses an oversized
frame as soon as its length is known, without buffering it. Each protocol sets its own
`max_frame`. The body is one MessagePack value without extension types; binary strings stay
`bytes` and maps must have string keys.
"""

from __future__ import annotations

from typing import Any, Final

import msgpack  # type: ignore[import-untyped]

from ostrom.errors import DecodeError, TooLarge

# A length prefix longer than this many bytes is malformed: 5 varint bytes reach 32 GiB,
# far past any frame size an Ostrom protocol allows.
MAX_LENGTH_PREFIX_BYTES: Final = 5


def encode_varint(value: int) -> bytes:
    """The unsigned LEB128 encoding of `value` (the multiformats unsigned-varint)."""
    if value < 0:
        raise ValueError("varints are unsigned")
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def encode_frame(value: Any, *, max_frame: int) -> bytes:
    """One frame holding `value`; raises `TooLarge` if the body is over `max_frame` bytes."""
    body: bytes = msgpack.packb(value, use_bin_type=True)
    if len(body) > max_frame:
        raise TooLarge(f"frame of {len(body)} bytes is over the limit of {max_frame}")
    return encode_varint(len(body)) + body


def _ext_hook(code: int, data: bytes) -> Any:
    raise DecodeError(f"MessagePack extension type {code} is not allowed")


def decode_body(body: bytes | memoryview) -> Any:
    """The MessagePack value of one frame body; `DecodeError` for anything malformed."""
    try:
        return msgpack.unpackb(
            body, raw=False, use_list=True, strict_map_key=True, ext_hook=_ext_hook
        )
    except DecodeError:
        raise
    except (
        ValueError,
        TypeError,
        msgpack.ExtraData,
        msgpack.FormatError,
        msgpack.StackError,
        UnicodeDecodeError,
    ) as exc:
        raise DecodeError(f"frame body is not valid MessagePack: {exc}") from None


class FrameReader:
    """A push parser: `feed` bytes as they arrive, get back every complete frame's value.

    Memory is bounded by `max_frame` plus one read. Errors are final: after `TooLarge` or
    `DecodeError` the stream cannot be resynchronised, and the caller closes it.
    """

    def __init__(self, *, max_frame: int) -> None:
        self._max_frame = max_frame
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[Any]:
        """The values of the frames `data` completes.

        Frames are decoded straight from `data` when nothing was left over from the last
        call, else from the buffer (MessagePack copies what it keeps); only what follows the
        last complete frame is kept for the next call. Copying each read into the buffer,
        slicing out each frame and trimming the buffer per frame copied every block four
        times more.
        """
        source: bytes | bytearray
        if self._buffer:
            self._buffer += data
            source = self._buffer
        else:
            source = data
        out: list[Any] = []
        start = 0
        try:
            while True:
                header = self._length(source, start)
                if header is None:
                    return out
                length, used = header
                if length > self._max_frame:
                    raise TooLarge(
                        f"peer announced a {length}-byte frame; the limit is {self._max_frame}"
                    )
                end = start + used + length
                if len(source) < end:
                    return out
                with memoryview(source) as view, view[start + used : end] as body:
                    out.append(decode_body(body))
                start = end
        finally:
            if source is self._buffer:
                del self._buffer[:start]
            else:
                self._buffer += memoryview(data)[start:]

    @staticmethod
    def _length(source: bytes | bytearray, start: int) -> tuple[int, int] | None:
        """The length of the frame at `start` and the bytes its prefix takes, if there."""
        value = 0
        for index in range(min(len(source) - start, MAX_LENGTH_PREFIX_BYTES)):
            byte = source[start + index]
            value |= (byte & 0x7F) << (7 * index)
            if not byte & 0x80:
                if index and byte == 0:
                    raise DecodeError("frame length is not minimally encoded")
                return value, index + 1
        if len(source) - start >= MAX_LENGTH_PREFIX_BYTES:
            raise DecodeError("frame length prefix is too long")
        return None

    @property
    def buffered(self) -> int:
        """Bytes received that do not yet make a whole frame."""
        return len(self._buffer)
