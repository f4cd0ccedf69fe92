"""Frames over a byte stream: what the mesh protocols read and write.

`FramedStream` wraps anything with `read(max_bytes)` / `write(data)` / `close()` (a mesh
stream, or a memory stream in tests), bounds every frame and every wait, and turns the
peer's silence into an error instead of a task that waits forever.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final, Protocol

import trio

from ostrom.errors import DecodeError
from ostrom.protocol.frames import FrameReader, encode_frame

# Bytes asked of the stream per read: up to 4 MiB of what the muxer has buffered. The bytes
# are in memory already (the muxer's window holds up to 16 MiB), and py-libp2p's Yamux moves
# what is left of its buffer after each read shorter than the buffer: 256 KiB reads from a
# full window copied it over and over.
READ_SIZE: Final = 4 * 1024 * 1024
# A peer that sends nothing for this long in the middle of an exchange is gone or stalling;
# the longest legitimate pause is the other side verifying one batch.
IDLE_TIMEOUT_S: Final = 30.0


class ByteStream(Protocol):
    async def read(self, max_bytes: int) -> bytes: ...

    async def write(self, data: bytes) -> None: ...

    async def close(self) -> None: ...


class PeerSilent(DecodeError):
    """The peer sent nothing within the idle timeout."""

    code = "peer_silent"


class FramedStream:
    def __init__(
        self, stream: ByteStream, *, max_frame: int, idle_timeout: float = IDLE_TIMEOUT_S
    ) -> None:
        self._stream = stream
        self._max_frame = max_frame
        self._reader = FrameReader(max_frame=max_frame)
        self._ready: list[Any] = []
        self._idle_timeout = idle_timeout
        self._eof = False
        self.bytes_in = 0
        self.bytes_out = 0

    async def send(self, value: Any) -> None:
        data = encode_frame(value, max_frame=self._max_frame)
        self.bytes_out += len(data)
        await self._stream.write(data)

    async def send_encoded(self, parts: Sequence[bytes]) -> None:
        """Send frames already encoded (one or more, cut in any number of parts) in one
        write: the muxer then cuts full-sized frames of its own instead of ending each of
        ours with a short one, and each write has a cost of its own. The caller bounds how
        many bytes one call holds."""
        data = b"".join(parts)
        self.bytes_out += len(data)
        await self._stream.write(data)

    async def receive(self) -> Any | None:
        """The next frame's value, or None at the end of the stream.

        Raises `DecodeError`/`TooLarge` for a malformed or oversized frame, `PeerSilent` when
        the peer stalls, and `DecodeError` when the stream ends in the middle of a frame.
        """
        while not self._ready:
            if self._eof:
                return None
            with trio.move_on_after(self._idle_timeout) as scope:
                data = await self._stream.read(READ_SIZE)
            if scope.cancelled_caught:
                raise PeerSilent(f"the peer sent nothing for {self._idle_timeout:.0f} s")
            if not data:
                self._eof = True
                if self._reader.buffered:
                    raise DecodeError("the stream ended in the middle of a frame")
                return None
            self.bytes_in += len(data)
            self._ready.extend(self._reader.feed(data))
        return self._ready.pop(0)

    async def close(self) -> None:
        await self._stream.close()
