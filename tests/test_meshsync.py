"""/ostrom/mesh/1.0.0 between two nodes over an in-memory stream: what each side reveals,
what travels (membership records and catalogues), and a peer that stalls the exchange."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from ostrom.crypto.cid import CID
from ostrom.crypto.keys import Identity
from ostrom.node.events import EventBus
from ostrom.node.framed import PeerSilent
from ostrom.node.meshes import MeshRegistry
from ostrom.node.meshsync import MeshReplicator
from ostrom.node.store import Store
from ostrom.protocol.records import Policy, Project, sign
from tests.dagfactory import identity
from tests.test_sync import MemoryByteStream

STEWARD, MEMBER, OUTSIDER = identity("steward"), identity("member"), identity("outsider")


def registry(who: Identity, tmp_path: Path) -> MeshRegistry:
    store = Store.open(tmp_path / f"{who.peer_id}.sqlite")

    async def db(fn: Callable[..., Any], *args: Any) -> Any:
        return fn(store, *args)

    return MeshRegistry(who, db, EventBus())


@dataclass
class AddressOnlyMesh:
    """What `exchange` asks of the mesh: the node's own addresses, for its catalogues (the
    exchange itself runs over the stream it is given)."""

    advertised_addrs: list[str]


def addresses_of(who: Identity) -> list[str]:
    """Where `who` listens in these tests: a wildcard (which no catalogue carries), a LAN
    address and loopback, as a node advertises them."""
    port = 4000 + who.public_key[0]
    hosts = ("0.0.0.0", "127.0.0.1", "192.0.2.7")
    return [f"/ip4/{host}/tcp/{port}/p2p/{who.peer_id}" for host in hosts]


def replicator(meshes: MeshRegistry, who: Identity | None = None) -> MeshReplicator:
    mesh = AddressOnlyMesh([] if who is None else addresses_of(who))
    return MeshReplicator(meshes, mesh=mesh, bandwidth=None)  # type: ignore[arg-type]


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


# --- catalogues --------------------------------------------------------------------------------


def node(
    who: Identity, tmp_path: Path, clock: Callable[[], float] = time.time
) -> tuple[MeshRegistry, Store]:
    """A registry with its store, where a test puts the projects the node follows."""
    tmp_path.mkdir(exist_ok=True)
    store = Store.open(tmp_path / f"{who.peer_id}-catalogue.sqlite")

    async def db(fn: Callable[..., Any], *args: Any) -> Any:
        return fn(store, *args)

    return MeshRegistry(who, db, EventBus(), clock), store


def host(store: Store, who: Identity, name: str, mesh: CID | None = None) -> CID:
    """Make `who` found a project (of `mesh` if given), stored and followed by `store`."""
    body = Project(
        author=who.public_key,
        ts=1_700_000_000_000,
        name=name,
        license="MIT",
        policy=Policy((who.public_key,)),
        mesh=mesh,
    )
    record = sign(body, who)
    store.put_records([record])
    store.follow(record.cid, "full", 1)
    return record.cid


async def run_exchange(a: MeshRegistry, a_id: Identity, b: MeshRegistry, b_id: Identity) -> None:
    left, right = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(replicator(a, a_id).exchange, MemoryByteStream(left), b_id.peer_id)
        nursery.start_soon(replicator(b, b_id).exchange, MemoryByteStream(right), a_id.peer_id)


async def refresh(registry: MeshRegistry, who: Identity) -> None:
    registry.refresh_own(await registry.hosted_projects(), addresses_of(who))


def listed(registry: MeshRegistry, mesh: CID) -> dict[CID, set[bytes]]:
    return {p: {h.author for h in hosts} for p, hosts in registry.hosts(mesh).items()}


async def test_a_private_project_is_catalogued_in_its_mesh_only_and_to_members_only(
    tmp_path: Path,
) -> None:
    steward, steward_store = node(STEWARD, tmp_path)
    workshop = await steward.create("workshop", "private")
    town = await steward.create("town", "open")
    await steward.set_membership(workshop.cid, MEMBER.public_key, "admit")
    jigs = host(steward_store, STEWARD, "jigs", mesh=workshop.cid)
    benches = host(steward_store, STEWARD, "benches")
    await refresh(steward, STEWARD)
    s = STEWARD.public_key
    assert listed(steward, workshop.cid) == {jigs: {s}, benches: {s}}
    assert listed(steward, town.cid) == {benches: {s}}

    ahead = [0.0]  # seconds the member's clock is moved on by
    member, member_store = node(MEMBER, tmp_path, clock=lambda: time.time() + ahead[0])
    outsider, _ = node(OUTSIDER, tmp_path)
    for other in (member, outsider):
        await other.join(steward.invite(workshop.cid))
        await other.join(steward.invite(town.cid))
    await run_exchange(steward, STEWARD, member, MEMBER)
    await run_exchange(steward, STEWARD, outsider, OUTSIDER)
    assert listed(member, workshop.cid) == {jigs: {s}, benches: {s}}
    assert listed(member, town.cid) == {benches: {s}}
    assert listed(outsider, town.cid) == {benches: {s}}
    assert listed(outsider, workshop.cid) == {}
    # The catalogues say where the steward can be dialled: a member not connected to it
    # reaches it that way. A wildcard is no address, and loopback comes last.
    port = 4000 + STEWARD.public_key[0]
    dialable = (f"/ip4/192.0.2.7/tcp/{port}", f"/ip4/127.0.0.1/tcp/{port}")
    assert member.hosts_of(jigs) == [(s, dialable)]
    assert outsider.hosts_of(jigs) == [] and outsider.hosts_of(benches) == [(s, dialable)]

    # The member follows the private project: the steward learns it at the next exchange.
    member_store.put_records([r for r in steward_store.projects() if r.cid == jigs])
    member_store.follow(jigs, "full", 2)
    ahead[0] = 2.0  # a signer waits a second between two catalogues of one mesh
    await refresh(member, MEMBER)
    await run_exchange(steward, STEWARD, member, MEMBER)
    assert listed(steward, workshop.cid)[jigs] == {s, MEMBER.public_key}
    assert listed(steward, town.cid) == {benches: {s}}  # the member hosts nothing public

    # Revoked, the member's catalogue is gone with its membership.
    await steward.set_membership(workshop.cid, MEMBER.public_key, "revoke")
    assert listed(steward, workshop.cid)[jigs] == {s}


async def test_leaving_a_mesh_withdraws_the_catalogue(tmp_path: Path) -> None:
    steward, _ = node(STEWARD, tmp_path)
    town = await steward.create("town", "open")
    member, member_store = node(MEMBER, tmp_path)
    await member.join(steward.invite(town.cid))
    looms = host(member_store, MEMBER, "looms")
    await refresh(member, MEMBER)
    await run_exchange(steward, STEWARD, member, MEMBER)
    assert listed(steward, town.cid) == {looms: {MEMBER.public_key}}

    signed: list[Any] = []
    member.catalogue_listeners.append(signed.extend)
    await member.leave(town.cid)
    assert [c.body.projects for c in signed] == [()]
    assert steward.accept_catalogue(signed[0])
    assert listed(steward, town.cid) == {}

    # A node that missed the withdrawal learns it when the peer no longer names the mesh.
    # (The same key's next catalogue must be a second newer at least: its clock is ahead.)
    again, again_store = node(MEMBER, tmp_path / "again", clock=lambda: time.time() + 2)
    await again.join(steward.invite(town.cid))
    host(again_store, MEMBER, "looms")
    await refresh(again, MEMBER)
    await run_exchange(steward, STEWARD, again, MEMBER)
    assert listed(steward, town.cid) == {looms: {MEMBER.public_key}}
    await again.leave(town.cid)
    await run_exchange(steward, STEWARD, again, MEMBER)
    assert listed(steward, town.cid) == {}


async def test_a_node_signs_its_catalogue_again_when_its_addresses_change(tmp_path: Path) -> None:
    later = [0.0]  # seconds the node's clock is moved on by
    steward, store = node(STEWARD, tmp_path, clock=lambda: time.time() + later[0])
    town = await steward.create("town", "open")
    host(store, STEWARD, "benches")
    hosted = await steward.hosted_projects()
    assert [c.body.addrs for c in steward.refresh_own(hosted, ["/ip4/0.0.0.0/tcp/4001"])] == [()]
    later[0] = 2.0
    assert steward.refresh_own(hosted, ["/ip4/0.0.0.0/tcp/4001"]) == []  # nothing changed
    moved = steward.refresh_own(hosted, ["/ip4/192.0.2.9/tcp/4001"])
    assert [c.body.addrs for c in moved] == [("/ip4/192.0.2.9/tcp/4001",)]
    assert steward.own_catalogue(town.cid) == moved[0]
