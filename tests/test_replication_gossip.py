"""What the replicator does with a gossiped record whose parents are missing: it asks the peer
that sent it for a sync of the project it follows and got the record for."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from ostrom.crypto.cid import CID
from ostrom.datadir import DataDir
from ostrom.node import replication
from ostrom.node.replication import (
    GOSSIP_BLOCKS_GATHER_S,
    GOSSIP_BUSY_S,
    GOSSIP_GATHER_SPREAD,
    Replicator,
    gather_time,
    topic_of,
)
from ostrom.node.service import NodeService
from ostrom.node.store import Store
from tests.dagfactory import World, identity

ALICE, BOB = identity("alice"), identity("bob")
PEER = identity("peer").peer_id


class _NoMesh:
    """The replicator's mesh, for tests that hand it gossip directly: nothing is sent."""


@pytest.fixture
def replicator(tmp_path: Path) -> Iterator[Replicator]:
    with Store.open(tmp_path / "store.sqlite") as store:
        service = NodeService(identity("node"), store, DataDir(tmp_path))
        yield Replicator(service, _NoMesh())  # type: ignore[arg-type]


async def _gossip(replicator: Replicator, topic_project: CID, data: bytes) -> list[CID]:
    """Hand `data` to the replicator as gossip on `topic_project`'s topic, store it, and
    return the projects it then asked the sender to sync."""
    await replicator._gossip_received(topic_of(topic_project), data, PEER)
    await replicator._store_gossip([replicator._gossip_queue.receive_nowait()])
    asked = []
    while True:
        try:
            peer, project = replicator._sync_requests.receive_nowait()
        except trio.WouldBlock:
            return asked
        assert peer == PEER
        asked.append(project)


async def test_a_fork_genesis_gossiped_ahead_of_its_parents_syncs_the_followed_project(
    replicator: Replicator,
) -> None:
    world = World()
    upstream = world.genesis(ALICE, name="upstream")
    head = world.contribute(ALICE, upstream, [upstream], {"a.txt": "a"})
    fork = world.fork(BOB, upstream, [head])
    # This node follows the upstream project and holds its genesis, not yet `head`.
    await replicator.service.store_new([upstream], "sync")

    asked = await _gossip(replicator, upstream.cid, fork.data)
    # The upstream's set holds the missing head; the fork this node does not follow.
    assert asked == [upstream.cid]
    assert await replicator.service.db(lambda store: store.get_record(fork.cid)) is not None


async def test_a_record_gossiped_ahead_of_its_parents_syncs_its_own_project(
    replicator: Replicator,
) -> None:
    world = World()
    project = world.genesis(ALICE)
    first = world.contribute(ALICE, project, [project], {"a.txt": "a"})
    second = world.contribute(ALICE, project, [first], {"b.txt": "b"})
    await replicator.service.store_new([project], "sync")
    assert await _gossip(replicator, project.cid, second.data) == [project.cid]
    # With its parents here, nothing is asked for.
    await replicator.service.store_new([first], "sync")
    third = world.contribute(ALICE, project, [second], {"c.txt": "c"})
    assert await _gossip(replicator, project.cid, third.data) == []


async def test_a_gossiped_contribution_s_block_pass_gets_its_changesets_with_it(
    replicator: Replicator,
) -> None:
    world = World()
    project = world.genesis(ALICE)
    first = world.contribute(ALICE, project, [project], {"a.txt": "a"})
    await replicator.service.store_new([project], "sync")
    started: list[tuple[object, ...]] = []

    async def complete_blocks(*args: object) -> None:
        started.append(args)

    replicator._complete_blocks = complete_blocks  # type: ignore[assignment,method-assign]
    async with trio.open_nursery() as nursery:
        replicator._nursery = nursery
        assert await _gossip(replicator, project.cid, first.data) == []
    # The pass for its blocks need not read the record back to find them.
    ((on, peers, records, known),) = started
    assert (on, peers, records) == (project.cid, [PEER], [first.cid])
    assert known == {first.cid: first.body.changes}  # type: ignore[union-attr]


async def test_a_busy_project_s_gossiped_contributions_share_one_block_pass(
    replicator: Replicator, autojump_clock: object
) -> None:
    project = CID.of_raw(b"busy project")
    a, b, c = (CID.of_raw(name) for name in (b"a", b"b", b"c"))
    passes: list[set[CID] | None] = []
    known_in_pass: list[dict[CID, tuple[CID, ...]]] = []

    async def fetch_missing(
        project: CID,
        completion: object,
        scope: set[CID] | None,
        known: dict[CID, tuple[CID, ...]],
    ) -> bool:
        passes.append(None if scope is None else set(scope))
        known_in_pass.append(dict(known))
        return False  # nothing missing

    replicator._fetch_missing_blocks = fetch_missing  # type: ignore[assignment,method-assign]
    # A lone contribution's blocks are looked for at once.
    start = trio.current_time()
    await replicator._complete_blocks(project, [PEER], [a])
    assert passes == [{a}] and trio.current_time() == start
    # Another within a few seconds: the project is busy, and what arrives while the
    # completion waits joins its first pass.
    async with trio.open_nursery() as nursery:
        nursery.start_soon(replicator._complete_blocks, project, [PEER], [b])
        await trio.sleep(0.1)
        await replicator._complete_blocks(project, [PEER], [c], {c: (a,)})
    assert passes == [{a}, {b, c}]
    # The changesets a joining contribution brought (decoded from its gossip) reach the pass.
    assert known_in_pass == [{}, {c: (a,)}]


def test_passes_gather_for_times_spread_around_the_gathering() -> None:
    times = [gather_time() for _ in range(200)]
    low = GOSSIP_BLOCKS_GATHER_S * (1 - GOSSIP_GATHER_SPREAD)
    high = GOSSIP_BLOCKS_GATHER_S * (1 + GOSSIP_GATHER_SPREAD)
    assert all(low <= t <= high for t in times)
    # Followers that got the same gossip together do not pass together: the times spread
    # over most of the range (200 draws leave a gap of a tenth of it at the ends only by a
    # chance of about 1e-9).
    assert min(times) < low + (high - low) / 10 and max(times) > high - (high - low) / 10
    assert max(times) < GOSSIP_BUSY_S  # a project stays busy from one pass to the next


async def test_what_is_gossiped_during_a_pass_gathers_for_the_next_one_a_gathering_later(
    replicator: Replicator, autojump_clock: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    gathering = 2.5
    monkeypatch.setattr(replication, "gather_time", lambda: gathering)
    project = CID.of_raw(b"busy project")
    a, b, c, d = (CID.of_raw(name) for name in (b"a", b"b", b"c", b"d"))
    passes: list[tuple[float, set[CID] | None]] = []

    async def fetch_missing(
        project: CID, completion: object, scope: set[CID] | None, known: object
    ) -> bool:
        passes.append((trio.current_time(), None if scope is None else set(scope)))
        await trio.sleep(0.2)  # the fetch
        return False  # nothing missing

    replicator._fetch_missing_blocks = fetch_missing  # type: ignore[assignment,method-assign]
    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(replicator._complete_blocks, project, [PEER], [a])
        await trio.sleep(0.1)  # during the first pass's fetch
        await replicator._complete_blocks(project, [PEER], [b])
        await trio.sleep(0.3)  # after it, while the next pass gathers
        await replicator._complete_blocks(project, [PEER], [c])
        await trio.sleep(0.3)
        await replicator._complete_blocks(project, [PEER], [d])
    assert [scope for _, scope in passes] == [{a}, {b, c, d}]
    assert [when - start for when, _ in passes] == [0, pytest.approx(gathering)]

    # A sync, which asks for the whole project, does not wait for the gathering.
    await trio.sleep(GOSSIP_BUSY_S)  # the project is quiet again
    passes.clear()
    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(replicator._complete_blocks, project, [PEER], [a])
        await trio.sleep(0.3)  # after the first pass: the project is busy, gossip gathers
        nursery.start_soon(replicator._complete_blocks, project, [PEER], [b])
        await trio.sleep(0.1)
        await replicator._complete_blocks(project, [PEER], None)
    assert [scope for _, scope in passes] == [{a}, None]
    assert [when - start for when, _ in passes] == [0, pytest.approx(0.4)]
