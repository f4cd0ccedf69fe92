"""`/ostrom/blocks/1.0.0` on the node: answering peers' wants and fetching what we lack.

Fetching splits the wanted CIDs across the peers that can serve them, one stream per peer,
each keeping one `want` of up to 64 blocks in flight. A block is verified against its CID as
its frame is parsed and stored as it arrives, so an interrupted fetch resumes where it
stopped: the next fetch asks only for what is still missing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Final, Protocol

import trio

from ostrom.crypto.cid import CID
from ostrom.errors import BlockMismatch, DecodeError, OstromError
from ostrom.node.framed import ByteStream, FramedStream
from ostrom.protocol import blockwire

log = logging.getLogger(__name__)

# Peers fetched from at once for one batch of CIDs.
MAX_PEERS_PER_FETCH: Final = 4


class BlockStore(Protocol):
    async def blocks_get(self, cids: Sequence[CID]) -> dict[CID, bytes]: ...

    async def blocks_have(self, cids: Sequence[CID]) -> set[CID]: ...

    async def blocks_put(self, blocks: Sequence[tuple[CID, bytes]]) -> int: ...


@dataclass(slots=True)
class FetchResult:
    fetched: int = 0
    bytes: int = 0
    missing: int = 0


async def serve(stream: ByteStream, store: BlockStore, peer_id: str) -> int:
    """Answer a peer's wants until it closes the stream; returns the blocks sent."""
    framed = FramedStream(stream, max_frame=blockwire.MAX_FRAME)
    sent = 0
    while True:
        frame = await framed.receive()
        if frame is None:
            return sent
        message = blockwire.parse(frame)
        if not isinstance(message, blockwire.Want):
            raise DecodeError(f"peer {peer_id} sent {type(message).__name__} to a block server")
        found = await store.blocks_get(message.cids)
        for cid in message.cids:
            data = found.get(cid)
            if data is None:
                await framed.send(blockwire.Missing(cid).to_wire())
            else:
                await framed.send(blockwire.Block(cid, data).to_wire())
                sent += 1


async def fetch_from(
    stream: ByteStream,
    store: BlockStore,
    cids: Sequence[CID],
    progress: Callable[[int], None] | None = None,
) -> FetchResult:
    """Fetch `cids` over one stream; each block is verified, then stored as it arrives."""
    framed = FramedStream(stream, max_frame=blockwire.MAX_FRAME)
    result = FetchResult()
    for start in range(0, len(cids), blockwire.MAX_WANT):
        batch = list(cids[start : start + blockwire.MAX_WANT])
        await framed.send(blockwire.Want(tuple(batch)).to_wire())
        # Stored once per want (one transaction, one sync to disk), not once per block.
        received: list[tuple[CID, bytes]] = []
        for expected in batch:
            message = blockwire.parse(await framed.receive())
            if isinstance(message, blockwire.Want) or message.cid != expected:
                raise DecodeError(f"peer answered out of order (expected {expected})")
            if isinstance(message, blockwire.Missing):
                result.missing += 1
                continue
            received.append((message.cid, message.data))
            result.fetched += 1
            result.bytes += len(message.data)
            if progress is not None:
                progress(len(message.data))
        if received:
            await store.blocks_put(received)
    return result


async def fetch(
    open_stream: Callable[[str], AbstractAsyncContextManager[ByteStream]],
    peers: Sequence[str],
    store: BlockStore,
    cids: Sequence[CID],
    progress: Callable[[int], None] | None = None,
) -> FetchResult:
    """Fetch `cids` from several peers at once: each peer takes an equal share, and what a
    peer lacks or fails to deliver is asked of the others in a second pass."""
    total = FetchResult()
    remaining = list(cids)
    tried: set[str] = set()
    while remaining and len(tried) < len(peers):
        round_peers = [p for p in peers if p not in tried][:MAX_PEERS_PER_FETCH]
        tried.update(round_peers)
        shares = [remaining[i :: len(round_peers)] for i in range(len(round_peers))]

        async def one(peer: str, share: list[CID]) -> None:
            try:
                async with open_stream(peer) as stream:
                    result = await fetch_from(stream, store, share, progress)
            except BlockMismatch as exc:
                log.warning("peer %s sent a forged block: %s", peer, exc.message)
                return
            except OstromError as exc:
                log.info("fetching blocks from %s stopped: %s", peer, exc.message)
                return
            total.fetched += result.fetched
            total.bytes += result.bytes

        async with trio.open_nursery() as nursery:
            for peer, share in zip(round_peers, shares, strict=True):
                if share:
                    nursery.start_soon(one, peer, share)
        have = await store.blocks_have(remaining)
        remaining = [cid for cid in remaining if cid not in have]
    total.missing = len(remaining)
    return total
