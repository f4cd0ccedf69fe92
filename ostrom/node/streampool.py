"""Streams kept open between short exchanges with a peer, so that the next one reuses them.

Opening a libp2p stream costs both sides a Yamux handshake, a protocol negotiation (two
messages each way), a handler task on the other side, and closing it a few frames more. A
gossiped contribution makes every follower fetch three small blocks in three passes, one
after the other (changeset, manifest, file): with a stream each, the streams cost more than
the blocks. A protocol whose server answers requests until the stream closes (the blocks
protocol does) can instead keep one open and lend it to each exchange in turn.

A stream is lent to one exchange at a time. It goes back to the pool only if the exchange
ended without an error (the exchange leaves nothing outstanding: every request answered);
otherwise it is finished. Idle streams are finished after `idle_s`, which must stay below the
server's own idle timeout so that a lent stream is never one the server has just given up.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Generic, Protocol, TypeVar

import trio


class PoolableStream(Protocol):
    @property
    def reusable(self) -> bool:
        """Neither side has closed it, nor has it failed."""

    async def finish(self) -> None: ...


S = TypeVar("S", bound=PoolableStream)


class StreamPool(Generic[S]):
    """Idle streams per peer, at most `per_peer` of each, none older than `idle_s`."""

    def __init__(
        self, open_stream: Callable[[str], Awaitable[S]], *, idle_s: float, per_peer: int
    ) -> None:
        self._open = open_stream
        self._idle_s = idle_s
        self._per_peer = per_peer
        # peer -> its idle streams and when each came back (trio time), the latest last.
        self._idle: dict[str, list[tuple[S, float]]] = {}

    @asynccontextmanager
    async def lend(self, peer: str) -> AsyncIterator[S]:
        """An idle stream to `peer`, or a new one; kept for the next exchange if this one
        ends without an error."""
        stream = self._take(peer)
        if stream is None:
            stream = await self._open(peer)
        try:
            yield stream
        except BaseException:
            await stream.finish()
            raise
        if stream.reusable and len(self._idle.get(peer, ())) < self._per_peer:
            self._idle.setdefault(peer, []).append((stream, trio.current_time()))
        else:
            await stream.finish()

    def _take(self, peer: str) -> S | None:
        idle = self._idle.get(peer)
        if not idle:
            return None
        stream, since = idle[-1]
        if since < trio.current_time() - self._idle_s or not stream.reusable:
            return None  # left for `prune` to finish, with the older ones below it
        idle.pop()
        if not idle:
            del self._idle[peer]
        return stream

    def forget(self, peer: str) -> None:
        """`peer` disconnected: its streams went with the connection."""
        self._idle.pop(peer, None)

    def idle_count(self) -> int:
        return sum(len(idle) for idle in self._idle.values())

    async def prune(self) -> None:
        """Finish the streams idle longer than `idle_s`, or no longer reusable."""
        fresh_after = trio.current_time() - self._idle_s
        stale: list[S] = []
        for peer in list(self._idle):
            keep = []
            for stream, since in self._idle[peer]:
                if since >= fresh_after and stream.reusable:
                    keep.append((stream, since))
                else:
                    stale.append(stream)
            if keep:
                self._idle[peer] = keep
            else:
                del self._idle[peer]
        for stream in stale:
            await stream.finish()

    async def run_pruning(self) -> None:
        """Prune every half `idle_s`, for ever."""
        while True:
            await trio.sleep(self._idle_s / 2)
            await self.prune()
