"""Fetching and serving blocks between nodes, over in-memory streams."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from ostrom.crypto.cid import CID
from ostrom.errors import BlockMismatch, DecodeError
from ostrom.node import blocks
from ostrom.node.framed import ByteStream, FramedStream
from ostrom.protocol import blockwire


class MemoryStore:
    """A block store in a dict; refuses, as the real one does, a block that does not match."""

    def __init__(self, data: Sequence[bytes] = ()) -> None:
        self.blocks = {CID.of_raw(d): d for d in data}
        self.asked: list[CID] = []  # every CID read, in order
        self.transactions = 0
        self.largest_transaction = 0  # bytes
        self.synced = 0  # blocks stored when the store was last synced
        self.synced_fetch = 0  # the bytes the fetch that asked for that sync said it stored

    async def blocks_get(self, cids: Sequence[CID], peer: str | None = None) -> dict[CID, bytes]:
        self.asked.extend(cids)
        return {c: self.blocks[c] for c in cids if c in self.blocks}

    async def blocks_have(self, cids: Sequence[CID]) -> set[CID]:
        return {c for c in cids if c in self.blocks}

    async def blocks_put(self, blocks: Sequence[tuple[CID, bytes]]) -> int:
        if any(not cid.matches(data) for cid, data in blocks):
            raise BlockMismatch("the bytes sent do not hash to this CID")
        self.transactions += 1
        self.largest_transaction = max(self.largest_transaction, sum(len(d) for _, d in blocks))
        new = [(c, d) for c, d in blocks if c not in self.blocks]
        self.blocks.update(new)
        return len(new)

    async def blocks_sync(self, fetched: int) -> None:
        self.synced = len(self.blocks)
        self.synced_fetch = fetched


class ForgingStore(MemoryStore):
    """Serves other bytes under every CID it is asked for."""

    async def blocks_get(self, cids: Sequence[CID], peer: str | None = None) -> dict[CID, bytes]:
        return {cid: b"not the block" for cid in cids}


class GatedStore(MemoryStore):
    """Serves `before` reads, then waits for `gate`."""

    def __init__(self, data: Sequence[bytes], before: int, gate: trio.Event) -> None:
        super().__init__(data)
        self.before = before
        self.gate = gate

    async def blocks_get(self, cids: Sequence[CID], peer: str | None = None) -> dict[CID, bytes]:
        if self.before <= 0:
            await self.gate.wait()
        self.before -= 1
        return await super().blocks_get(cids, peer)


class Pipe:
    """One side of an in-memory stream, as `ByteStream`."""

    def __init__(self, stream: trio.testing.StapledStream) -> None:  # type: ignore[type-arg]
        self._stream = stream

    async def read(self, max_bytes: int) -> bytes:
        return await self._stream.receive_some(max_bytes)

    async def write(self, data: bytes) -> None:
        await self._stream.send_all(data)

    async def close(self) -> None:
        await self._stream.send_eof()


class Peers:
    """Peers by name, each serving its own store; records what each served."""

    def __init__(self, nursery: trio.Nursery, stores: dict[str, MemoryStore]) -> None:
        self.nursery = nursery
        self.stores = stores
        self.sent: dict[str, int] = {}
        self.dropped: dict[str, str] = {}

    @asynccontextmanager
    async def open_stream(self, peer: str) -> AsyncIterator[ByteStream]:
        ours, theirs = trio.testing.memory_stream_pair()

        async def serve() -> None:
            try:
                sent = await blocks.serve(Pipe(theirs), self.stores[peer], "us")
            finally:
                await theirs.aclose()
            self.sent[peer] = self.sent.get(peer, 0) + sent

        self.nursery.start_soon(serve)
        try:
            yield Pipe(ours)
        finally:
            await ours.send_eof()

    async def drop(self, peer: str, reason: str) -> None:
        self.dropped[peer] = reason


def make_blocks(count: int, size: int = 1000) -> list[bytes]:
    return [os.urandom(size) for _ in range(count)]


async def test_every_block_arrives_verified_and_stored_in_few_transactions() -> None:
    data = make_blocks(3 * blocks.WANTS_IN_FLIGHT * blocks.WANT_BLOCKS + 5)
    cids = [CID.of_raw(d) for d in data]
    ours = MemoryStore()
    async with trio.open_nursery() as nursery:
        peers = Peers(nursery, {"a": MemoryStore(data)})
        result = await blocks.fetch(peers.open_stream, ["a"], ours, cids)
    assert (result.fetched, result.missing, result.bytes) == (len(data), 0, 1000 * len(data))
    assert ours.blocks == {c: d for c, d in zip(cids, data, strict=True)}
    assert ours.transactions < len(data)
    assert ours.synced == len(data)  # on disk by the time the fetch returns
    assert ours.synced_fetch == result.bytes  # a fetch this large is synced at once
    assert peers.sent == {"a": len(data)}


async def test_small_blocks_share_a_transaction_and_large_ones_are_cut_by_bytes() -> None:
    # A gossiped contribution's blocks are a few hundred bytes: a fetch of many such blocks
    # commits them together, not 16 at a time.
    small = make_blocks(200, size=300)
    ours = MemoryStore()
    async with trio.open_nursery() as nursery:
        peers = Peers(nursery, {"a": MemoryStore(small)})
        await blocks.fetch(peers.open_stream, ["a"], ours, [CID.of_raw(d) for d in small])
    assert len(ours.blocks) == 200
    assert ours.transactions <= 3
    # Blocks of 256 KiB: no transaction holds more than `STORE_BATCH_BYTES` of them.
    large = make_blocks(40, size=256 * 1024)
    ours = MemoryStore()
    async with trio.open_nursery() as nursery:
        peers = Peers(nursery, {"a": MemoryStore(large)})
        await blocks.fetch(peers.open_stream, ["a"], ours, [CID.of_raw(d) for d in large])
    assert len(ours.blocks) == 40
    assert 0 < ours.largest_transaction <= blocks.STORE_BATCH_BYTES


async def test_what_one_peer_lacks_comes_from_another() -> None:
    data = make_blocks(100)
    cids = [CID.of_raw(d) for d in data]
    ours = MemoryStore()
    async with trio.open_nursery() as nursery:
        stores = {"half": MemoryStore(data[:50]), "other-half": MemoryStore(data[50:])}
        peers = Peers(nursery, stores)
        result = await blocks.fetch(peers.open_stream, ["half", "other-half"], ours, cids)
    assert (result.fetched, result.missing) == (100, 0)
    assert set(ours.blocks) == set(cids)
    assert peers.sent == {"half": 50, "other-half": 50}


async def test_a_block_nobody_has_is_reported_missing() -> None:
    data = make_blocks(20)
    nowhere = CID.of_raw(b"nobody has this")
    ours = MemoryStore()
    async with trio.open_nursery() as nursery:
        peers = Peers(nursery, {"a": MemoryStore(data), "b": MemoryStore(data[:3])})
        cids = [CID.of_raw(d) for d in data] + [nowhere]
        result = await blocks.fetch(peers.open_stream, ["a", "b"], ours, cids)
    assert (result.fetched, result.missing) == (20, 1)
    assert nowhere not in ours.blocks


async def test_a_forged_block_is_never_stored_and_its_sender_is_dropped() -> None:
    data = make_blocks(40)
    cids = [CID.of_raw(d) for d in data]
    ours = MemoryStore()
    async with trio.open_nursery() as nursery:
        stores = {"forger": ForgingStore(), "honest": MemoryStore(data)}
        peers = Peers(nursery, stores)
        fetch = blocks.BlockFetch(peers.open_stream, ours, cids, peers.drop)
        result = await fetch.run(["forger", "honest"])
    assert list(peers.dropped) == ["forger"]
    assert "do not hash" in peers.dropped["forger"]
    assert (result.fetched, result.missing) == (40, 0)
    assert ours.blocks == {c: d for c, d in zip(cids, data, strict=True)}


async def test_an_interrupted_fetch_keeps_what_it_stored_and_resumes() -> None:
    data = make_blocks(200)
    cids = [CID.of_raw(d) for d in data]
    ours = MemoryStore()
    gate = trio.Event()
    async with trio.open_nursery() as nursery:
        peers = Peers(nursery, {"a": GatedStore(data, before=5, gate=gate)})
        nursery.start_soon(blocks.fetch, peers.open_stream, ["a"], ours, cids)
        await trio.testing.wait_all_tasks_blocked()  # the peer stalls after 5 reads
        # What arrived is stored once the storing task stops waiting for more.
        await trio.sleep(2 * blocks.STORE_GATHER_S)
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    stored = set(ours.blocks)
    assert 0 < len(stored) < len(cids)
    assert all(ours.blocks[c] == d for c, d in zip(cids, data, strict=True) if c in stored)

    server = MemoryStore(data)
    async with trio.open_nursery() as nursery:
        peers = Peers(nursery, {"a": server})
        wanted = [c for c in cids if c not in await ours.blocks_have(cids)]
        result = await blocks.fetch(peers.open_stream, ["a"], ours, wanted)
    assert result.fetched == len(cids) - len(stored)
    assert set(server.asked) == set(cids) - stored
    assert set(ours.blocks) == set(cids)


class CountingPeers(Peers):
    """`Peers` that also records the peers streams were opened to, in order."""

    def __init__(self, nursery: trio.Nursery, stores: dict[str, MemoryStore]) -> None:
        super().__init__(nursery, stores)
        self.opened: list[str] = []

    @asynccontextmanager
    async def open_stream(self, peer: str) -> AsyncIterator[ByteStream]:
        self.opened.append(peer)
        async with super().open_stream(peer) as stream:
            yield stream


async def test_a_small_fetch_asks_only_the_first_peer() -> None:
    data = make_blocks(5)
    cids = [CID.of_raw(d) for d in data]
    ours = MemoryStore()
    async with trio.open_nursery() as nursery:
        peers = CountingPeers(nursery, {name: MemoryStore(data) for name in "abcd"})
        result = await blocks.fetch(peers.open_stream, ["c", "a", "b", "d"], ours, cids)
    assert result.fetched == 5
    assert peers.opened == ["c"]
    assert set(ours.blocks) == set(cids)


async def test_what_the_first_peer_lacks_is_asked_of_the_next_in_order() -> None:
    data = make_blocks(4)
    cids = [CID.of_raw(d) for d in data]
    ours = MemoryStore()
    async with trio.open_nursery() as nursery:
        stores = {
            "relay": MemoryStore(data[:2]),
            "empty": MemoryStore(),
            "origin": MemoryStore(data),
        }
        peers = CountingPeers(nursery, stores)
        result = await blocks.fetch(peers.open_stream, ["relay", "empty", "origin"], ours, cids)
    assert result.fetched == 4 and result.missing == 0
    assert peers.opened == ["relay", "empty", "origin"]
    assert peers.sent == {"relay": 2, "empty": 0, "origin": 2}


async def test_a_large_fetch_starts_every_peer_at_once() -> None:
    data = make_blocks(blocks.MAX_PEERS_PER_FETCH * blocks.FETCH_IN_FLIGHT_BLOCKS)
    cids = [CID.of_raw(d) for d in data]
    ours = MemoryStore()
    names = [f"p{i}" for i in range(blocks.MAX_PEERS_PER_FETCH + 2)]
    async with trio.open_nursery() as nursery:
        peers = CountingPeers(nursery, {name: MemoryStore(data) for name in names})
        result = await blocks.fetch(peers.open_stream, names, ours, cids)
    assert result.fetched == len(cids)
    assert sorted(peers.opened) == names[: blocks.MAX_PEERS_PER_FETCH]
    assert all(peers.sent[name] > 0 for name in peers.opened)


async def test_a_peer_added_while_a_fetch_runs_takes_what_is_left() -> None:
    data = make_blocks(300)
    cids = [CID.of_raw(d) for d in data]
    ours = MemoryStore()
    gate = trio.Event()
    async with trio.open_nursery() as nursery:
        stores = {"slow": GatedStore(data, before=2, gate=gate), "late": MemoryStore(data)}
        peers = Peers(nursery, stores)
        fetch = blocks.BlockFetch(peers.open_stream, ours, cids)
        async with trio.open_nursery() as inner:
            inner.start_soon(fetch.run, ["slow"])
            await trio.testing.wait_all_tasks_blocked()
            fetch.add_peer("late")
            while len(ours.blocks) < len(cids) - blocks.WANTS_IN_FLIGHT * blocks.WANT_BLOCKS:
                await trio.sleep(0.01)
            gate.set()
    assert set(ours.blocks) == set(cids)
    assert peers.sent["late"] > len(cids) // 2
    assert fetch.result.missing == 0


async def test_a_stalled_peer_holds_back_only_its_two_wants_while_others_send_the_rest() -> None:
    data = make_blocks(300)
    cids = [CID.of_raw(d) for d in data]
    ours = MemoryStore()
    gate = trio.Event()
    held = blocks.MIN_WANTS_IN_FLIGHT * blocks.WANT_BLOCKS
    async with trio.open_nursery() as nursery:
        stores = {"stalled": GatedStore(data, before=0, gate=gate), "fast": MemoryStore(data)}
        peers = Peers(nursery, stores)
        fetch = blocks.BlockFetch(peers.open_stream, ours, cids)
        async with trio.open_nursery() as inner:
            inner.start_soon(fetch.run, ["stalled", "fast"])
            # Everything but what the stalled peer was asked for arrives without it (a
            # bound on the wait, not on speed: the fetch would otherwise hang here).
            with trio.fail_after(30):
                while len(ours.blocks) < len(cids) - held:
                    await trio.sleep(0.01)
            await trio.testing.wait_all_tasks_blocked()
            assert len(ours.blocks) == len(cids) - held
            gate.set()
    assert set(ours.blocks) == set(cids)
    assert peers.sent == {"stalled": held, "fast": len(cids) - held}


async def test_a_server_answers_in_order_and_says_what_it_lacks() -> None:
    data = make_blocks(3)
    cids = [CID.of_raw(d) for d in data]
    unknown = CID.of_raw(b"unknown")
    ours, theirs = trio.testing.memory_stream_pair()
    framed = FramedStream(Pipe(ours), max_frame=blockwire.MAX_FRAME)
    sent: list[int] = []

    async def serve() -> None:
        sent.append(await blocks.serve(Pipe(theirs), MemoryStore(data), "peer"))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        await framed.send(blockwire.Want((cids[2], unknown, cids[0])).to_wire())
        await framed.send(blockwire.Want((cids[1],)).to_wire())
        answers = [blockwire.parse(await framed.receive()) for _ in range(4)]
        await framed.close()
    assert sent == [3]
    assert answers == [
        blockwire.Block(cids[2], data[2]),
        blockwire.Missing(unknown),
        blockwire.Block(cids[0], data[0]),
        blockwire.Block(cids[1], data[1]),
    ]


async def test_a_server_refuses_anything_but_wants() -> None:
    data = b"a block"
    ours, theirs = trio.testing.memory_stream_pair()
    framed = FramedStream(Pipe(ours), max_frame=blockwire.MAX_FRAME)
    await framed.send(blockwire.Block(CID.of_raw(data), data).to_wire())
    with pytest.raises(DecodeError):
        await blocks.serve(Pipe(theirs), MemoryStore(), "peer")


class CountedPipe(Pipe):
    """A `Pipe` that counts its writes."""

    writes = 0

    async def write(self, data: bytes) -> None:
        self.writes += 1
        await super().write(data)


async def test_a_want_of_small_blocks_goes_out_in_one_write_and_large_ones_read_by_read() -> None:
    small = [f"small block {i}".encode() for i in range(blocks.SERVE_READ_BLOCKS * 2)]
    large = [bytes([i]) * blocks.SERVE_WRITE_BYTES for i in range(2 * blocks.SERVE_READ_BLOCKS)]
    for data, writes in ((small, 1), (large, 2)):
        cids = [CID.of_raw(d) for d in data]
        ours, theirs = trio.testing.memory_stream_pair()
        framed = FramedStream(Pipe(ours), max_frame=blockwire.MAX_FRAME)
        server = CountedPipe(theirs)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(blocks.serve, server, MemoryStore(data), "peer")
            await framed.send(blockwire.Want(tuple(cids)).to_wire())
            answers = [blockwire.parse(await framed.receive()) for _ in cids]
            await framed.close()
        assert answers == [blockwire.Block(cid, d) for cid, d in zip(cids, data, strict=True)]
        assert server.writes == writes
