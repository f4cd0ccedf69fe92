"""The sync session over an in-memory stream: convergence, ancestors, and hostile peers."""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Sequence

import pytest
import trio
import trio.testing

from ostrom.crypto.cid import CID
from ostrom.errors import OstromError, Refused
from ostrom.node import sync
from ostrom.node.framed import FramedStream
from ostrom.node.ingest import RecordRow, decode_row, record_row
from ostrom.protocol.reconcile import ReconcileIndex, Reconciler
from ostrom.protocol.records import SignedRecord, decode_record
from tests.dagfactory import World, identity

ALICE, BOB = identity("alice"), identity("bob")


class MemoryByteStream:
    """A trio memory stream shaped like a mesh stream."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self._stream = stream

    async def read(self, max_bytes: int) -> bytes:
        return bytes(await self._stream.receive_some(max_bytes))

    async def write(self, data: bytes) -> None:
        await self._stream.send_all(data)

    async def close(self) -> None:
        await self._stream.aclose()


class FakeHost:
    """A node's store reduced to what a sync session touches."""

    def __init__(self, hosted: Sequence[CID], records: Sequence[SignedRecord] = ()) -> None:
        self.hosted = set(hosted)
        self.records: dict[CID, SignedRecord] = {r.cid: r for r in records}
        self.prepared = 0

    async def sync_index(self, project: CID) -> ReconcileIndex | None:
        if project not in self.hosted:
            return None
        return ReconcileIndex.build(c.raw for c, r in self.records.items() if r.project == project)

    async def sync_records(self, cids: Sequence[CID]) -> dict[CID, bytes]:
        return {c: self.records[c].data for c in cids if c in self.records}

    async def sync_prepare(self, count: int) -> None:
        self.prepared = count

    async def sync_verify(self, items: Sequence[bytes]) -> sync.Verified:
        result = sync.Verified()
        for item in items:
            try:
                record = decode_record(item)
            except OstromError:
                result.refused += 1
                continue
            result.rows.append(record_row(record))
        return result

    async def sync_store(
        self, rows: Sequence[RecordRow], expected: Collection[bytes] = ()
    ) -> sync.IngestResult:
        result = sync.IngestResult()
        for row in rows:
            record = decode_row(row)
            if record.cid not in self.records:
                self.records[record.cid] = record
                result.stored.append(record.cid.raw)
        for raw in result.stored:
            result.missing_parents.update(
                p.raw
                for p in self.records[CID(raw)].parents
                if p not in self.records and p.raw not in expected
            )
        return result


async def _session(
    initiator: FakeHost, responder: FakeHost, project: CID
) -> tuple[sync.SyncResult, sync.SyncResult | None]:
    left, right = trio.testing.memory_stream_pair()
    served: list[sync.SyncResult | None] = []

    async def respond() -> None:
        served.append(await sync.serve(MemoryByteStream(right), responder, "initiator"))

    with trio.fail_after(20), sync.unwrap_single_error():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(respond)
            pulled = await sync.pull(MemoryByteStream(left), initiator, project, "responder")
    return pulled, served[0]


def _project(world: World, size: int) -> tuple[SignedRecord, list[SignedRecord]]:
    g = world.genesis(ALICE)
    head = g
    out = [g]
    for i in range(size):
        head = world.contribute(ALICE, g, [head], {f"f{i % 5}": f"v{i}"})
        out.append(head)
        out.append(world.validate(BOB, head))
    return g, out


async def test_both_replicas_end_with_every_record() -> None:
    world = World()
    g, records = _project(world, 40)
    a = FakeHost([g.cid], records[::2])
    b = FakeHost([g.cid], [*records[1::2], g])
    pulled, served = await _session(a, b, g.cid)
    assert set(a.records) == set(b.records) == {r.cid for r in records}
    assert pulled.received > 0 and pulled.sent > 0
    assert served is not None and served.received == pulled.sent


async def test_identical_replicas_exchange_little() -> None:
    world = World()
    g, records = _project(world, 200)
    a, b = FakeHost([g.cid], records), FakeHost([g.cid], records)
    pulled, _ = await _session(a, b, g.cid)
    assert pulled.received == pulled.sent == 0
    assert pulled.bytes_in + pulled.bytes_out < 1024


async def test_missing_ancestors_from_upstream_are_fetched() -> None:
    world = World()
    up, up_records = _project(world, 5)
    fork = world.fork(BOB, up, [up_records[-2]])
    merge = world.contribute(BOB, fork, [fork, up_records[-2]], {"extra": "x"})
    # The responder has everything; the initiator only hosts the fork and knows nothing.
    a = FakeHost([fork.cid])
    b = FakeHost([fork.cid, up.cid], [*up_records, fork, merge])
    await _session(a, b, fork.cid)
    assert merge.cid in a.records and fork.cid in a.records
    assert {r.cid for r in up_records if r.type != "validation"} <= set(a.records)


async def test_a_peer_that_does_not_host_the_project_refuses() -> None:
    world = World()
    g, records = _project(world, 2)
    a, b = FakeHost([g.cid], records), FakeHost([])
    with pytest.raises(Refused, match="refused"):
        await _session(a, b, g.cid)


async def test_forged_pushes_are_strikes_and_the_peer_is_cut_off() -> None:
    world = World()
    g, records = _project(world, 10)
    tampered = [r.data[:-1] + bytes([r.data[-1] ^ 1]) for r in records[1:]]

    class Forger(FakeHost):
        async def sync_records(self, cids: Sequence[CID]) -> dict[CID, bytes]:
            return dict(zip(cids, tampered, strict=False))

    a = FakeHost([g.cid], [g])
    b = Forger([g.cid], records)
    with pytest.raises(sync.PeerMisbehaving):
        await _session(a, b, g.cid)
    assert set(a.records) == {g.cid}  # nothing forged was kept


async def test_a_peer_pushing_forgeries_is_cut_off_and_nothing_forged_is_kept() -> None:
    world = World()
    g, records = _project(world, 10)
    tampered = [r.data[:-1] + bytes([r.data[-1] ^ 1]) for r in records[1:]]

    class Pusher(FakeHost):
        async def sync_records(self, cids: Sequence[CID]) -> dict[CID, bytes]:
            return dict(zip(cids, tampered, strict=False))

    a = Pusher([g.cid], records)
    b = FakeHost([g.cid], [g])
    with pytest.raises(sync.PeerMisbehaving, match="failed verification"):
        await _session(a, b, g.cid)
    assert set(b.records) == {g.cid}


async def test_a_push_of_records_the_responder_did_not_lack_is_refused_and_not_kept() -> None:
    world = World()
    g, records = _project(world, 10)
    strangers = [world.genesis(BOB, name=f"stranger {i}") for i in range(len(records))]

    class Stuffer(FakeHost):
        async def sync_records(self, cids: Sequence[CID]) -> dict[CID, bytes]:
            return {cid: stranger.data for cid, stranger in zip(cids, strangers, strict=False)}

    a = Stuffer([g.cid], records)
    b = FakeHost([g.cid], [g])
    with pytest.raises(sync.PeerMisbehaving, match="failed verification"):
        await _session(a, b, g.cid)
    assert set(b.records) == {g.cid}


async def test_a_catch_up_of_many_wants_arrives_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    # Small wants, so that a few hundred records make many answers: each is verified while
    # later ones are read and earlier ones stored, and nothing may be lost or reordered.
    monkeypatch.setattr(sync, "MAX_WANT", 16)
    world = World()
    g, records = _project(world, 300)
    a = FakeHost([g.cid], [g])
    b = FakeHost([g.cid], records)
    pulled, _ = await _session(a, b, g.cid)
    assert set(a.records) == {r.cid for r in records}
    assert pulled.received == len(records) - 1
    assert a.prepared >= 16  # told to get ready once a full want was needed


async def test_a_valid_record_that_was_not_asked_for_is_refused_and_not_kept() -> None:
    world = World()
    g, records = _project(world, 10)
    stranger = world.genesis(BOB)  # well signed, but nobody asked for it

    class Volunteer(FakeHost):
        async def sync_records(self, cids: Sequence[CID]) -> dict[CID, bytes]:
            found = await super().sync_records(cids)
            return {
                cid: stranger.data if i == 0 else data
                for i, (cid, data) in enumerate(found.items())
            }

    a = FakeHost([g.cid], [g])
    b = Volunteer([g.cid], records)
    with pytest.raises(sync.PeerMisbehaving, match="not asked for"):
        await _session(a, b, g.cid)
    assert stranger.cid not in a.records


async def test_one_forged_record_among_many_is_dropped_and_the_rest_kept() -> None:
    world = World()
    g, records = _project(world, 600)
    forged = records[5].data[:-1] + bytes([records[5].data[-1] ^ 1])

    class OneForgery(FakeHost):
        async def sync_records(self, cids: Sequence[CID]) -> dict[CID, bytes]:
            found = await super().sync_records(cids)
            if records[5].cid in found:
                found[records[5].cid] = forged
            return found

    a = FakeHost([g.cid], [g])
    b = OneForgery([g.cid], records)
    pulled, _ = await _session(a, b, g.cid)
    assert pulled.refused == 1
    assert set(a.records) == {r.cid for r in records} - {records[5].cid}


async def test_a_replica_starting_from_nothing_reconciles_a_very_large_set(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 150k ids take about 84 reconciliation messages each way, more than any fixed small
    # bound. The responder claims the ids but holds none of the records: the initiator
    # learns all of them, asks, and cuts the liar off when it says it lacks them.
    pulls: list[tuple[int, int]] = []
    run = sync._Puller.run

    async def counted(puller: sync._Puller, need: Collection[bytes], have: list[CID]) -> None:
        pulls.append((len(need), puller.result.reconcile_rounds))
        await run(puller, need, have)

    monkeypatch.setattr(sync._Puller, "run", counted)
    world = World()
    g, _ = _project(world, 0)
    many = [
        CID(b"\x01\x71\x12\x20" + hashlib.sha256(i.to_bytes(4, "big")).digest())
        for i in range(150_000)
    ]

    class Claimer(FakeHost):
        async def sync_index(self, project: CID) -> ReconcileIndex | None:
            return ReconcileIndex.build([*(c.raw for c in many), g.cid.raw])

    a = FakeHost([g.cid], [g])
    b = Claimer([g.cid], [g])
    with pytest.raises(sync.PeerMisbehaving, match="then lacked them"):
        await _session(a, b, g.cid)
    [(learned, rounds)] = pulls
    assert learned == len(many) and rounds > 64
    assert set(a.records) == {g.cid}


async def test_a_peer_ending_the_session_before_answering_is_cut_off() -> None:
    world = World()
    g, records = _project(world, 10)
    left, right = trio.testing.memory_stream_pair()

    async def quitter() -> None:
        # Reconciles honestly, then says `done` instead of answering the wants.
        framed = FramedStream(MemoryByteStream(right), max_frame=sync.MAX_FRAME)
        await framed.receive()  # hello
        await framed.send({"t": "welcome"})
        index = ReconcileIndex.build(r.cid.raw for r in records)
        await sync._reconcile(
            framed, Reconciler(index, initiator=False), sync.SyncResult(g.cid, "a"), None
        )
        await framed.receive()  # the first want
        await framed.send({"t": "done"})

    with (
        trio.fail_after(20),
        pytest.raises(sync.PeerMisbehaving, match="before this side"),
        sync.unwrap_single_error(),
    ):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(quitter)
            await sync.pull(MemoryByteStream(left), FakeHost([g.cid], [g]), g.cid, "quitter")
