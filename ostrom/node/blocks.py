"""`/ostrom/blocks/1.0.0` on the node: answering peers' wants and fetching what we lack.

Serving reads the wanted blocks from the store a few at a time on one task while another
writes the frames, so the stream does not idle while the store reads.

Fetching is one `BlockFetch` for a set of CIDs, with one stream per peer. Every peer's worker
takes its next `want` from one shared queue, so a fast peer takes more and a peer that joins
late takes its share of what is left; each keeps two wants outstanding so that its peer
always has the next one queued, and a peer alone up to four (`FETCH_IN_FLIGHT_BLOCKS`).
Peers are asked in the order given, and a peer's worker starts only when the queue holds
what the running workers cannot take: more than they may ask for, or what they lack. A
small fetch (a gossiped contribution's blocks) is one want to the first peer, not one
stream to each of the peers that may hold the blocks.
Blocks go through a bounded channel to one storing task, which gathers what arrives (from
every peer, up to `STORE_BATCH_BYTES`) into one transaction while the workers keep
receiving; the store verifies each block against its CID before it writes any of a batch.
What a peer lacks goes back to the queue for the others. Everything stored stays stored, so
an interrupted fetch resumes where it stopped: the next fetch asks only for what is still
missing.

Fetched blocks are committed without waiting for the disk; the fetch asks the store to sync
once, at its end, before `run` returns (the node syncs a large fetch's blocks then, and a
small one's within seconds, with those of the fetches around it: `NodeService.blocks_sync`;
the node also syncs a large fetch's blocks every 16 MiB while it runs, so that its end does
not wait for the disk to take all of it, and the store syncs by itself as its log grows).
A power loss before then can only lose blocks, which the next completion fetches again
(see `ostrom.node.blockdb`).

While any fetch runs, Python's switch interval is shortened (`ostrom.node.gilswitch`), so
that the thread storing blocks is not held up by the network thread each time it takes
Python's lock back; the store does the same for each of its calls, a server's reads among
them. (Not for the whole of a served stream: a stream a peer keeps open between fetches may
idle for seconds.)
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Final, Protocol

import trio

from ostrom.crypto.cid import CID
from ostrom.errors import BlockMismatch, DecodeError, OstromError, PeerUnreachable, QuotaExceeded
from ostrom.node.framed import ByteStream, FramedStream, PeerSilent
from ostrom.node.gilswitch import switch_interval
from ostrom.node.sync import unwrap_single_error
from ostrom.protocol import blockwire
from ostrom.protocol.frames import encode_frame

log = logging.getLogger(__name__)

# Peers fetched from at once by one fetch: beyond a few, another peer adds connections and
# CPU work on this node without adding bandwidth.
MAX_PEERS_PER_FETCH: Final = 4
# CIDs per `want` a fetcher sends: 16 blocks are 4 MiB of 256 KiB blocks, large enough that
# a want's frame and bookkeeping cost nothing beside its blocks, small enough that the last
# wants of a fetch spread over several peers instead of waiting on one.
WANT_BLOCKS: Final = 16
# Wants a fetcher keeps outstanding on one stream: with several queued, the responder starts
# the next one as soon as it has sent the last block of the previous one. Four of 16 blocks
# keep up to 64 blocks (16 MiB of 256 KiB blocks) asked for, the largest Yamux window.
WANTS_IN_FLIGHT: Final = 4
# Of those, the wants every peer keeps outstanding whatever the others do: the one it is
# answering and the next, so that it never waits for a want. Its wants beyond these come
# out of a budget shared by the whole fetch, `FETCH_IN_FLIGHT_BLOCKS`.
MIN_WANTS_IN_FLIGHT: Final = 2
# Blocks asked for and not yet received, over every peer of a fetch, beyond each peer's
# `MIN_WANTS_IN_FLIGHT`: what one peer needs to fill the largest Yamux window. One peer
# takes all of it; several peers each keep two wants and share nothing more, so that what is
# on its way to this node stays near one window however many peers send it (three peers
# with four wants each had 48 MiB on the way at once: three full windows of buffers to
# copy, for no more bandwidth), and a slow peer holds at most two wants when the others
# finish.
FETCH_IN_FLIGHT_BLOCKS: Final = WANTS_IN_FLIGHT * WANT_BLOCKS
# Blocks received but not yet verified and stored: the bound on what a slow disk can make a
# fetch hold in memory (up to 32 MiB at the largest block size, 8 MiB at the default).
STORE_QUEUE_BLOCKS: Final = 32
# Bytes of blocks the storing task gathers into one transaction, and how long it waits for
# them after the first arrives: each commit costs about a millisecond of CPU and a few
# syncs, so 4 MiB (16 blocks of 256 KiB) per commit cost a fraction of what one or two
# blocks did; at 100 MB/s they arrive within 40 ms, and the wait ends early once every block
# still asked for has arrived. Counted in bytes, not blocks: the small blocks of gossiped
# contributions (a changeset, a manifest, a short file: a few hundred bytes each) arrive by
# the dozen, and 16 of them made a commit each 5 KiB.
STORE_BATCH_BYTES: Final = 4 * 1024 * 1024
STORE_GATHER_S: Final = 0.05
# Blocks in one such transaction at the most, however small: what one commit's index
# updates and the hashes checked before it may take, a few milliseconds.
STORE_BATCH_MAX_BLOCKS: Final = 512
# Blocks a server reads from its store per read: small enough that the first block leaves
# soon after the want arrives (a read holds at most 8 MiB), large enough that reads are few.
SERVE_READ_BLOCKS: Final = 8
# Bytes of one want's blocks a server gathers from its reads before it writes them: a want of
# small blocks (a contribution's changeset, manifest, file) goes out in one write, as each
# write costs a muxer frame, an encryption and a system call of its own; a want of large
# blocks is written read by read.
SERVE_WRITE_BYTES: Final = 256 * 1024
# Writes a server keeps ready ahead of the stream (each up to SERVE_WRITE_BYTES, or one read).
SERVE_READ_AHEAD: Final = 2


class BlockStore(Protocol):
    async def blocks_get(self, cids: Sequence[CID], peer: str | None = None) -> dict[CID, bytes]:
        """The stored ones of `cids`; for `peer`, only those it may be served."""

    async def blocks_have(self, cids: Sequence[CID]) -> set[CID]: ...

    async def blocks_put(self, blocks: Sequence[tuple[CID, bytes]]) -> int:
        """Store fetched blocks; they may reach the disk only at the next `blocks_sync`."""

    async def blocks_sync(self, fetched: int) -> None:
        """Put every block stored so far on disk: now, or within seconds if the fetch that
        ends (`fetched` bytes) and what else waits are a few KiB."""


@dataclass(slots=True)
class FetchResult:
    fetched: int = 0
    bytes: int = 0
    missing: int = 0
    # Why the fetch stopped before the end, if the store refused to take more.
    stopped: str | None = None


async def serve(stream: ByteStream, store: BlockStore, peer_id: str) -> int:
    """Answer a peer's wants until it closes the stream; returns the blocks sent.

    One task reads wants and the blocks they name from the store, `SERVE_READ_BLOCKS` at a
    time; another writes their frames, a want's small blocks in one write
    (`SERVE_WRITE_BYTES`). A malformed frame or a message other than `want` is
    `DecodeError`.
    """
    framed = FramedStream(stream, max_frame=blockwire.MAX_FRAME)
    sent = 0
    ready_send, ready_receive = trio.open_memory_channel[list[tuple[CID, bytes | None]]](
        SERVE_READ_AHEAD
    )

    async def read_wants() -> None:
        async with ready_send:
            while True:
                frame = await framed.receive()
                if frame is None:
                    return
                message = blockwire.parse(frame)
                if not isinstance(message, blockwire.Want):
                    raise DecodeError(
                        f"peer {peer_id} sent {type(message).__name__} to a block server"
                    )
                ready: list[tuple[CID, bytes | None]] = []
                ready_bytes = 0
                for start in range(0, len(message.cids), SERVE_READ_BLOCKS):
                    part = message.cids[start : start + SERVE_READ_BLOCKS]
                    found = await store.blocks_get(part, peer_id)
                    ready += [(cid, found.get(cid)) for cid in part]
                    ready_bytes += sum(len(data) for data in found.values())
                    if ready_bytes >= SERVE_WRITE_BYTES:
                        await ready_send.send(ready)
                        ready, ready_bytes = [], 0
                if ready:
                    await ready_send.send(ready)

    with unwrap_single_error():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_wants)
            async with ready_receive:
                async for part in ready_receive:
                    parts: list[bytes] = []
                    for cid, data in part:
                        if data is None:
                            parts.append(
                                encode_frame(
                                    blockwire.Missing(cid).to_wire(), max_frame=blockwire.MAX_FRAME
                                )
                            )
                        else:
                            parts.extend(blockwire.Block(cid, data).frame_parts())
                    await framed.send_encoded(parts)
                    sent += sum(data is not None for _, data in part)
    return sent


OpenStream = Callable[[str], AbstractAsyncContextManager[ByteStream]]
# Called with a peer and the reason when it broke the protocol (sent a block that does not
# match its CID, a malformed frame, an answer out of order); the caller disconnects it.
# (A worker's cancellation also ends a call made from that worker, so calls are short.)
OnMisbehaving = Callable[[str, str], Awaitable[None]]


class BlockFetch:
    """Fetching one set of CIDs from peers, some of which may join while it runs.

    `run` returns when every CID is stored or no peer can supply the rest. Its peers are
    asked in order: the next one's worker starts when CIDs wait in the queue that no running
    worker may take (up to `MAX_PEERS_PER_FETCH` workers at once). `add_peer` while it runs
    puts a peer at the end of that order.

    Each block is hashed once, on the storing task's thread: the store checks every block
    against its CID before it writes any of a batch, and refuses the batch if one does not
    match. A refused batch is then stored peer by peer, so that only the peer that sent the
    bad block loses its blocks (they are asked of the others) and is reported.
    """

    def __init__(
        self,
        open_stream: OpenStream,
        store: BlockStore,
        cids: Sequence[CID],
        on_misbehaving: OnMisbehaving | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        self._open_stream = open_stream
        self._store = store
        self._on_misbehaving = on_misbehaving
        # Called with each stored block's size (a transfer's progress).
        self._progress = progress
        # CIDs to ask for, in order; a CID a worker lacked or failed to deliver returns here.
        self._queue: deque[CID] = deque(dict.fromkeys(cids))
        # For CIDs some peer answered `missing`: the peers that lacked them.
        self._lacked_by: dict[CID, set[str]] = {}
        # CIDs asked of some peer and not yet stored (or given back), over every worker.
        self._unsettled = 0
        # Each running worker's peer, and the CIDs asked of it and not yet answered (none
        # before its stream opens, though it asks as soon as it does).
        self._asked: dict[str, int] = {}
        self._finished: set[str] = set()  # peers whose worker ended: not started again
        self._waiting: deque[str] = deque()  # peers to ask, in order, once there is work
        # Peers that sent a block the store refused, and why; their workers stop.
        self._refused: dict[str, str] = {}
        self._changed = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._fetch_scope = trio.CancelScope()
        self._store_send, self._store_receive = trio.open_memory_channel[tuple[str, CID, bytes]](
            STORE_QUEUE_BLOCKS
        )
        self.result = FetchResult()

    def add_peer(self, peer: str) -> None:
        """Fetch from `peer` too, if the fetch is running: after the peers before it, or at
        once if CIDs wait that the running workers cannot take."""
        if self._nursery is None or peer in self._asked or peer in self._finished:
            return
        if peer not in self._waiting:
            self._waiting.append(peer)
        self._grow()

    def _grow(self) -> None:
        """Start waiting peers' workers while more CIDs are queued than the running workers
        will ask for in their own two wants (`MIN_WANTS_IN_FLIGHT`): a large fetch starts
        every peer at once, a small one a single peer, and what a peer lacks goes to the
        next."""
        if self._nursery is None:
            return
        while self._queue and self._waiting and len(self._asked) < MAX_PEERS_PER_FETCH:
            own = MIN_WANTS_IN_FLIGHT * WANT_BLOCKS
            room = sum(
                own - owed
                for peer, owed in self._asked.items()
                if owed < own and self._may_take(peer)
            )
            if len(self._queue) <= room:
                return
            peer = self._waiting.popleft()
            if peer not in self._asked and peer not in self._finished:
                self._asked[peer] = 0
                self._nursery.start_soon(self._work, peer)

    def _may_take(self, peer: str) -> bool:
        """Whether some queued CID is one `peer` has not said it lacks."""
        if not self._lacked_by:
            return True
        return any(peer not in self._lacked_by.get(cid, ()) for cid in self._queue)

    async def run(self, peers: Sequence[str]) -> FetchResult:
        if self._queue:
            with switch_interval.shortened():  # for the whole fetch: it stores as it goes
                with unwrap_single_error():
                    await self._run(peers)
                if self.result.fetched:
                    await self._store.blocks_sync(self.result.bytes)
        self.result.missing = len(self._queue)
        return self.result

    async def _run(self, peers: Sequence[str]) -> None:
        async with trio.open_nursery() as nursery:
            self._fetch_scope = nursery.cancel_scope
            nursery.start_soon(self._store_arrivals)
            async with self._store_send, trio.open_nursery() as workers:
                self._nursery = workers
                self._waiting.extend(dict.fromkeys(peers))
                self._grow()
                if not self._asked:
                    self._nursery = None

    # --- the shared queue ----------------------------------------------------------------------

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _take(self, peer: str, count: int) -> list[CID]:
        """Up to `count` queued CIDs that `peer` has not said it lacks."""
        batch: list[CID] = []
        skipped: list[CID] = []
        while self._queue and len(batch) < count:
            cid = self._queue.popleft()
            if peer in self._lacked_by.get(cid, ()):
                skipped.append(cid)
            else:
                batch.append(cid)
        self._queue.extendleft(reversed(skipped))
        self._unsettled += len(batch)
        return batch

    def _give_back(self, cids: Sequence[CID]) -> None:
        """CIDs asked but not stored go back to the front of the queue."""
        self._queue.extendleft(reversed(cids))
        self._settled(len(cids))

    def _settled(self, count: int) -> None:
        self._unsettled -= count
        self._notify()
        self._grow()

    # --- workers -------------------------------------------------------------------------------

    async def _work(self, peer: str) -> None:
        asked: deque[CID] = deque()  # what this peer still owes, in the order it answers
        try:
            async with self._open_stream(peer) as stream:
                framed = FramedStream(stream, max_frame=blockwire.MAX_FRAME)
                await self._exchange(peer, framed, asked)
        except PeerSilent as exc:
            log.info("fetching blocks from %s stopped: %s", peer, exc.message)
        except (DecodeError, BlockMismatch) as exc:
            await self._misbehaving(peer, exc.message)
        except OstromError as exc:
            log.info("fetching blocks from %s stopped: %s", peer, exc.message)
        finally:
            del self._asked[peer]
            self._finished.add(peer)
            self._give_back(list(asked))
            if not self._asked:
                self._nursery = None  # the fetch is over: a peer joining now starts nothing

    def _may_ask(self, outstanding: int) -> bool:
        """Whether a peer with `outstanding` blocks still to send may be sent another want."""
        if outstanding > (WANTS_IN_FLIGHT - 1) * WANT_BLOCKS:
            return False
        if outstanding <= (MIN_WANTS_IN_FLIGHT - 1) * WANT_BLOCKS:
            return True
        return sum(self._asked.values()) + WANT_BLOCKS <= FETCH_IN_FLIGHT_BLOCKS

    async def _exchange(self, peer: str, framed: FramedStream, asked: deque[CID]) -> None:
        while True:
            if peer in self._refused:
                raise BlockMismatch(self._refused[peer])
            while self._may_ask(len(asked)):
                batch = self._take(peer, WANT_BLOCKS)
                if not batch:
                    break
                asked.extend(batch)
                self._asked[peer] = len(asked)
                await framed.send(blockwire.Want(tuple(batch)).to_wire())
            self._grow()  # what this peer may not ask for yet, another may
            if not asked:
                if self._unsettled == 0:
                    return  # nothing queued for this peer, and nothing more can come back
                await self._changed.wait()  # others may give CIDs back, or the store refuse some
                continue
            frame = await framed.receive()
            if frame is None:
                raise PeerUnreachable(f"{peer} closed the stream with {len(asked)} blocks unsent")
            # Not hashed here: the storing task verifies each block as it stores it.
            message = blockwire.parse(frame, verify=False)
            expected = asked[0]
            if isinstance(message, blockwire.Want) or message.cid != expected:
                raise DecodeError(f"peer answered out of order (expected {expected})")
            asked.popleft()
            self._asked[peer] = len(asked)
            if isinstance(message, blockwire.Missing):
                self._lacked_by.setdefault(expected, set()).add(peer)
                self._give_back([expected])
            else:
                # Without a checkpoint while the storing task has room: the frames of one
                # read come through in one step, not one step (and one wake-up) per block.
                try:
                    self._store_send.send_nowait((peer, message.cid, message.data))
                except trio.WouldBlock:
                    await self._store_send.send((peer, message.cid, message.data))

    async def _misbehaving(self, peer: str, reason: str) -> None:
        log.warning("peer %s broke the blocks protocol: %s", peer, reason)
        if self._on_misbehaving is not None:
            await self._on_misbehaving(peer, reason)

    # --- storing -------------------------------------------------------------------------------

    async def _store_arrivals(self) -> None:
        """Store blocks as they arrive: everything queued so far, in one transaction."""
        async with self._store_receive:
            async for first in self._store_receive:
                # What has arrived already, then what arrives within `STORE_GATHER_S`.
                batch = [first]
                size = self._take_arrived(batch, len(first[2]))
                with trio.move_on_after(STORE_GATHER_S):
                    while not self._batch_full(len(batch), size):
                        try:
                            arrival = await self._store_receive.receive()
                        except trio.EndOfChannel:
                            break
                        batch.append(arrival)
                        size = self._take_arrived(batch, size + len(arrival[2]))
                try:
                    await self._put(batch)
                except QuotaExceeded as exc:
                    # The owner's storage limit: nothing more can be kept, so stop asking.
                    self._give_back([cid for _, cid, _ in batch])
                    self.result.stopped = exc.message
                    self._fetch_scope.cancel()
                    return
                except BlockMismatch:
                    by_peer: dict[str, list[tuple[str, CID, bytes]]] = {}
                    for arrival in batch:
                        by_peer.setdefault(arrival[0], []).append(arrival)
                    for peer, arrivals in by_peer.items():
                        try:
                            await self._put(arrivals)
                        except BlockMismatch as exc:
                            await self._refuse(peer, arrivals, exc.message)

    def _take_arrived(self, batch: list[tuple[str, CID, bytes]], size: int) -> int:
        """Add to `batch` (of `size` bytes) what has arrived already, without a checkpoint per
        block (the frames of one read come through in one step), until it is full; returns
        its size."""
        while not self._batch_full(len(batch), size):
            try:
                arrival = self._store_receive.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                break
            batch.append(arrival)
            size += len(arrival[2])
        return size

    def _batch_full(self, blocks: int, size: int) -> bool:
        """Whether a transaction of `blocks` blocks of `size` bytes takes no more: it is large
        enough, or every block still asked for is in it."""
        return size >= STORE_BATCH_BYTES or blocks >= min(STORE_BATCH_MAX_BLOCKS, self._unsettled)

    async def _put(self, arrivals: Sequence[tuple[str, CID, bytes]]) -> None:
        await self._store.blocks_put([(cid, data) for _, cid, data in arrivals])
        self.result.fetched += len(arrivals)
        self.result.bytes += sum(len(data) for _, _, data in arrivals)
        if self._progress is not None:
            for _, _, data in arrivals:
                self._progress(len(data))
        self._settled(len(arrivals))

    async def _refuse(
        self, peer: str, arrivals: Sequence[tuple[str, CID, bytes]], reason: str
    ) -> None:
        """`peer` sent a block that does not match its CID: ask the others for its blocks,
        and stop fetching from it; its worker reports it when it next looks (or here, if it
        has ended)."""
        self._give_back([cid for _, cid, _ in arrivals])
        if peer in self._refused:
            return
        self._refused[peer] = reason
        self._finished.add(peer)
        if peer not in self._asked:
            await self._misbehaving(peer, reason)


async def fetch(
    open_stream: OpenStream,
    peers: Sequence[str],
    store: BlockStore,
    cids: Sequence[CID],
    on_misbehaving: OnMisbehaving | None = None,
    progress: Callable[[int], None] | None = None,
) -> FetchResult:
    """Fetch `cids` from `peers` at once (see `BlockFetch`)."""
    return await BlockFetch(open_stream, store, cids, on_misbehaving, progress).run(peers)
