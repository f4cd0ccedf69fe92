"""/ostrom/mesh/1.0.0 between two nodes over an in-memory stream: what each side reveals,
what travels, and a peer that stalls the exchange."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from ostrom.crypto.keys import Identity
from ostrom.node.events import EventBus
from ostrom.node.framed import PeerSilent
from ostrom.node.meshes import MeshRegistry
from ostrom.node.meshsync import MeshReplicator
from ostrom.node.store import Store
from tests.dagfactory import identity
from tests.test_sync import MemoryByteStream

STEWARD, MEMBER, OUTSIDER = identity("steward"), identity("member"), identity("outsider")


def registry(who: Identity, tmp_path: Path) -> MeshRegistry:
    store = Store.open(tmp_path / f"{who.peer_id}.sqlite")

    async def db(fn: Callable[..., Any], *args: Any) -> Any:
        return fn(store, *args)

    return MeshRegistry(who, db, EventBus())


def replicator(meshes: MeshRegistry) -> MeshReplicator:
    # The mesh is not used by `exchange`; the exchange runs over the stream it is given.
    return MeshReplicator(meshes, mesh=None, bandwidth=None)  # type: ignore[arg-type]


async def test_members_get_the_admissions_and_outsiders_learn_nothing(tmp_path: Path) -> None:
    steward = registry(STEWARD, tmp_path)
    workshop = await steward.create("workshop", "private")
    await steward.set_membership(workshop.cid, MEMBER.public_key, "admit")
    invite = steward.invite(workshop.cid)
    member, outsider = registry(MEMBER, tmp_path), registry(OUTSIDER, tmp_path)
    await member.join(invite)
    await outsider.join(invite)
    assert not member.get(workshop.cid).members.admits(MEMBER.public_key)  # type: ignore[union-attr]

    for other, who, expected in ((member, MEMBER, {workshop.cid}), (outsider, OUTSIDER, set())):
        left, right = trio.testing.memory_stream_pair()
        async with trio.open_nursery() as nursery:
            ours = nursery.start_soon
            a, b = replicator(steward), replicator(other)
            ours(a.exchange, MemoryByteStream(left), who.peer_id)
            ours(b.exchange, MemoryByteStream(right), STEWARD.peer_id)
        assert a.shared_meshes(who.peer_id) == b.shared_meshes(STEWARD.peer_id)
        assert {m.cid for m in steward.joined() if m.body.name in a.shared_meshes(who.peer_id)} == (
            expected
        )
    assert member.get(workshop.cid).members.admits(MEMBER.public_key)  # type: ignore[union-attr]
    assert not outsider.get(workshop.cid).members.admits(OUTSIDER.public_key)  # type: ignore[union-attr]
    assert outsider.records_of(workshop.cid) == [workshop.description]


async def test_a_peer_that_drips_bytes_is_cut_off_in_bounded_time(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    steward = registry(STEWARD, tmp_path)
    await steward.create("town", "open")
    ours, theirs = trio.testing.memory_stream_pair()

    async def drip() -> None:
        # A frame's first byte every 20 s: never silent for the idle timeout, never done.
        for _ in range(100):
            await theirs.send_all(b"\xff")
            await trio.sleep(20)

    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(drip)
        with pytest.raises(PeerSilent):
            await replicator(steward).exchange(MemoryByteStream(ours), OUTSIDER.peer_id)
        nursery.cancel_scope.cancel()
    assert trio.current_time() - start <= 61
