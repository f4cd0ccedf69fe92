"""The owner's upload and download limits, applied to the bytes Ostrom's protocols move.

Every framed stream of the sync, blocks and mesh protocols reports its bytes here: a frame
is sent only once the upload bucket allows it, and after a read the reader waits until the
download bucket has paid for it (so a throttled reader stops reading, and the transport's
flow control slows the sender). The meter also keeps the totals and recent rates that
`ostrom status` shows, and publishes a `limit.reached` event when a limit starts to bite.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import trio

from ostrom.node.events import EventBus
from ostrom.node.framed import ByteStream
from ostrom.protocol.ratelimit import TokenBucket

# Seconds between two `limit.reached` events of one direction: a throttled transfer bites on
# every frame, and a subscriber needs to hear it once in a while, not a thousand times.
LIMIT_EVENT_INTERVAL_S: Final = 10.0
# Seconds over which the current rate is averaged for `ostrom status`.
RATE_WINDOW_S: Final = 5.0

Direction = Literal["upload", "download"]


@dataclass(slots=True)
class _Flow:
    bucket: TokenBucket
    total: int = 0
    # (time, total) when the current averaging window opened; None before the first byte.
    window_start: tuple[float, int] | None = None
    # Bytes per second over the last full window.
    last_rate: float = 0.0
    last_event: float = field(default=-float("inf"))


class Bandwidth:
    """Upload and download limits and counters for one node."""

    def __init__(
        self,
        events: EventBus,
        *,
        upload_rate: int = 0,
        download_rate: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._events = events
        self._clock = clock
        self._flows: dict[Direction, _Flow] = {
            "upload": _Flow(TokenBucket(upload_rate)),
            "download": _Flow(TokenBucket(download_rate)),
        }

    def set_rates(self, *, upload_rate: int, download_rate: int) -> None:
        """Change the limits at run time (0: unlimited); transfers under way follow at once."""
        now = self._clock()
        self._flows["upload"].bucket.set_rate(upload_rate, now)
        self._flows["download"].bucket.set_rate(download_rate, now)

    async def sent(self, nbytes: int) -> None:
        """Wait until `nbytes` may be sent, and count them."""
        await self._pass("upload", nbytes)

    async def received(self, nbytes: int) -> None:
        """Count `nbytes` just read, and wait until the download limit has paid for them."""
        await self._pass("download", nbytes)

    async def _pass(self, direction: Direction, nbytes: int) -> None:
        flow = self._flows[direction]
        now = self._clock()
        self._count(flow, now, nbytes)
        delay = flow.bucket.reserve(now, nbytes)
        if delay > 0:
            if now - flow.last_event >= LIMIT_EVENT_INTERVAL_S:
                flow.last_event = now
                self._events.publish(
                    {
                        "type": "limit.reached",
                        "limit": f"{direction}_rate",
                        "value": flow.bucket.rate,
                        "message": f"{direction} is held to {flow.bucket.rate} bytes/s",
                    }
                )
            await trio.sleep(delay)

    def _count(self, flow: _Flow, now: float, nbytes: int) -> None:
        if flow.window_start is None:
            flow.window_start = (now, flow.total)
        flow.total += nbytes
        started, base = flow.window_start
        if now - started >= RATE_WINDOW_S:
            flow.last_rate = (flow.total - base) / (now - started)
            flow.window_start = (now, flow.total)

    @staticmethod
    def _rate(flow: _Flow, now: float) -> float:
        if flow.window_start is None:
            return 0.0
        started, base = flow.window_start
        elapsed = now - started
        if elapsed < RATE_WINDOW_S:
            return flow.last_rate
        if elapsed >= 2 * RATE_WINDOW_S:
            return 0.0  # any byte would have closed the window: the last one moved nothing
        return (flow.total - base) / elapsed

    def view(self) -> dict[str, Any]:
        """Per direction: the limit (0: none), bytes moved since start, recent bytes/s."""
        now = self._clock()
        return {
            direction: {
                "limit": flow.bucket.rate,
                "bytes": flow.total,
                "bytes_per_s": round(self._rate(flow, now)),
            }
            for direction, flow in self._flows.items()
        }


class MeteredStream:
    """A byte stream whose reads and writes go through the node's `Bandwidth`."""

    def __init__(self, stream: ByteStream, meter: Bandwidth) -> None:
        self._stream = stream
        self._meter = meter

    async def read(self, max_bytes: int) -> bytes:
        data = await self._stream.read(max_bytes)
        if data:
            await self._meter.received(len(data))
        return data

    async def write(self, data: bytes) -> None:
        await self._meter.sent(len(data))
        await self._stream.write(data)

    async def close(self) -> None:
        await self._stream.close()
