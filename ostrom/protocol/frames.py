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

        Frames are decoded straight from `data` (MessagePack copies what it keeps). A frame
        an earlier call left unfinished is completed with only the bytes it lacks, and only
        what follows the last complete frame is kept for the next call. (Appending each read
        to the buffer whenever a frame was left over, which is nearly always with reads of a
        few MiB, copied every byte received once more.)
        """
        out: list[Any] = []
        start = 0
        if self._buffer:
            start = self._finish_pending(data, out)
            if self._buffer:
                return out  # `data` did not finish it; the buffer holds all of `data`
        try:
            while True:
                header = self._length(data, start)
                if header is None:
                    return out
                length, used = header
                self._check(length)
                end = start + used + length
                if len(data) < end:
                    return out
                with memoryview(data) as view, view[start + used : end] as body:
                    out.append(decode_body(body))
                start = end
        finally:
            if start < len(data):
                self._buffer += memoryview(data)[start:]

    def _finish_pending(self, data: bytes, out: list[Any]) -> int:
        """Complete the buffered frame from the start of `data`: append its value to `out`
        and empty the buffer, or buffer all of `data` if that is not enough. Returns how
        many bytes of `data` it used."""
        start = 0
        header = self._length(self._buffer, 0)
        while header is None:  # the length prefix itself was cut: at most 4 bytes more
            if start == len(data):
                return start
            self._buffer.append(data[start])
            start += 1
            header = self._length(self._buffer, 0)
        length, used = header
        self._check(length)
        missing = used + length - len(self._buffer)
        if missing > len(data) - start:
            self._buffer += memoryview(data)[start:]
            return len(data)
        self._buffer += memoryview(data)[start : start + missing]
        with memoryview(self._buffer) as view, view[used:] as body:
            value = decode_body(body)
        self._buffer.clear()
        out.append(value)
        return start + missing

    def _check(self, length: int) -> None:
        if length > self._max_frame:
            raise TooLarge(f"peer announced a {length}-byte frame; the limit is {self._max_frame}")

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
