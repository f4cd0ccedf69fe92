"""RPC methods of community meshes: create, invite, join, list, show, leave, admit, revoke,
and the projects the mesh's members host (`mesh.projects`, also part of `mesh.show`)."""

from __future__ import annotations

from collections import Counter
from typing import Any, Final

import trio

from ostrom.crypto.cid import CID
from ostrom.crypto.keys import parse_public_key, peer_id_of
from ostrom.errors import NotFound, OstromError
from ostrom.node.meshes import JoinedMesh
from ostrom.node.methods.registry import callers_input, method
from ostrom.node.params import Params
from ostrom.node.rpc_server import RpcConnection
from ostrom.node.service import NodeService
from ostrom.node.store import Store
from ostrom.protocol.catalogue import Host
from ostrom.protocol.meshes import MAX_BOOTSTRAP, Membership, SignedMeshRecord
from ostrom.protocol.records import Project, SignedRecord

# Bootstrap peers dialled at once when joining: all of them, as a mesh lists at most 16.
_JOIN_PARALLEL_DIALS: Final = MAX_BOOTSTRAP
# Projects `mesh.projects` lists unless asked for fewer or more, and the most it lists: a
# mesh's catalogues may name over 100,000, far more than one answer (16 MiB) should carry.
_PROJECTS_DEFAULT: Final = 1000
_PROJECTS_MAX: Final = 10_000
# Projects `mesh.show` lists: a screenful; `mesh.projects` gives the rest.
_SHOW_PROJECTS: Final = 50
# Hosts listed per project (connected ones first); `host_count` has them all.
_HOSTS_LISTED: Final = 16


def mesh_view(node: NodeService, mesh: JoinedMesh, *, detail: bool = False) -> dict[str, Any]:
    body = mesh.body
    me = node.identity.public_key
    view: dict[str, Any] = {
        "cid": str(mesh.cid),
        "name": body.name,
        "description": body.description,
        "access": body.access,
        "stewards": [peer_id_of(k) for k in body.stewards],
        "bootstrap": list(body.bootstrap),
        "steward": me in body.stewards,
        "member": mesh.members.admits(me),
    }
    if body.access == "private":
        view["members"] = len(mesh.members.stewards | mesh.members.admitted)
    if detail and body.access == "private":
        view["admitted"] = [peer_id_of(k) for k in sorted(mesh.members.admitted)]
    return view


def membership_view(record: SignedMeshRecord) -> dict[str, Any]:
    body = record.body
    assert isinstance(body, Membership)
    return {
        "cid": str(record.cid),
        "mesh": str(body.mesh),
        "action": body.action,
        "member": peer_id_of(body.member),
        "by": peer_id_of(body.author),
        "ts": body.ts,
        "note": body.note,
    }


@method("mesh.create")
async def mesh_create(node: NodeService, params: Params, conn: RpcConnection) -> Any:
    """Sign a mesh description with this node as steward, and join it. Without `bootstrap`,
    the node's own listen addresses are the mesh's bootstrap addresses."""
    name = params.text("name").strip()
    private = params.flag("private", False)
    description = params.text("description", "")
    bootstrap = params.texts("bootstrap", None)
    stewards = [parse_public_key(k) for k in params.texts("stewards", [])]
    params.done()
    if bootstrap is None:
        bootstrap = [] if node.network is None else node.network.addresses()[:MAX_BOOTSTRAP]
    with callers_input():
        mesh = await node.meshes.create(
            name,
            "private" if private else "open",
            description=description,
            bootstrap=bootstrap,
            stewards=stewards,
        )
    return mesh_view(node, mesh)


@method("mesh.invite")
async def mesh_invite(node: NodeService, params: Params, conn: RpcConnection) -> Any:
    mesh = node.meshes.resolve(params.text("mesh"))
    params.done()
    return {"mesh": str(mesh.cid), "name": mesh.body.name, "invite": node.meshes.invite(mesh.cid)}


@method("mesh.join")
async def mesh_join(node: NodeService, params: Params, conn: RpcConnection) -> Any:
    """Join the mesh an invite carries and dial its bootstrap peers (those that answer are
    listed in `connected`, the others in `unreachable` with the reason)."""
    invite = params.text("invite")
    params.done()
    mesh = await node.meshes.join(invite)
    connected: list[str] = []
    unreachable: list[dict[str, str]] = []
    network = node.network
    if network is not None:
        own = set(network.addresses())
        limiter = trio.CapacityLimiter(_JOIN_PARALLEL_DIALS)

        async def dial(addr: str) -> None:
            async with limiter:
                try:
                    peer = await network.connect(addr)
                except OstromError as exc:
                    unreachable.append({"addr": addr, "reason": exc.message})
                else:
                    connected.append(str(peer["peer_id"]))

        async with trio.open_nursery() as nursery:
            for addr in mesh.body.bootstrap:
                if addr not in own and not addr.endswith(f"/p2p/{node.identity.peer_id}"):
                    nursery.start_soon(dial, addr)
    return {**mesh_view(node, mesh), "connected": connected, "unreachable": unreachable}


@method("mesh.list")
async def mesh_list(node: NodeService, params: Params, conn: RpcConnection) -> Any:
    params.done()
    return [mesh_view(node, m) for m in node.meshes.joined()]


@method("mesh.show")
async def mesh_show(node: NodeService, params: Params, conn: RpcConnection) -> Any:
    mesh = node.meshes.resolve(params.text("mesh"))
    params.done()
    listed = await projects_view(node, mesh, _SHOW_PROJECTS)
    return {
        **mesh_view(node, mesh, detail=True),
        "projects": listed["projects"],
        "projects_total": listed["total"],
    }


async def projects_view(node: NodeService, mesh: JoinedMesh, limit: int) -> dict[str, Any]:
    """The projects `mesh`'s catalogues list, most hosted first: `{projects, total}`."""
    hosts = node.meshes.hosts(mesh.cid)
    ranked = sorted(hosts.items(), key=lambda item: (-len(item[1]), item[0]))[:limit]
    wanted = [project for project, _ in ranked]

    def read(store: Store) -> tuple[dict[CID, str], dict[CID, SignedRecord]]:
        return store.follows(), store.get_records(wanted)

    follows, genesis = await node.db(read)
    network = node.network
    connected = set() if network is None else {str(p["peer_id"]) for p in network.peers()}
    me = node.identity.peer_id
    projects: list[dict[str, Any]] = []
    for project, listed in ranked:
        record = genesis.get(project)
        if record is not None and not isinstance(record.body, Project):
            record = None  # a catalogue named some other record: nothing here says its name
        peers = sorted(
            (peer_id_of(h.author) for h in listed),
            key=lambda peer: (peer != me, peer not in connected, peer),
        )
        projects.append(
            {
                "project": str(project),
                "name": (
                    record.body.name
                    if record is not None and isinstance(record.body, Project)
                    else _claimed_name(listed)
                ),
                "here": record is not None,
                "following": follows.get(project),
                "host_count": len(listed),
                "hosts": [
                    {"peer_id": peer, "connected": peer in connected, "self": peer == me}
                    for peer in peers[:_HOSTS_LISTED]
                ],
            }
        )
    projects.sort(key=lambda p: (-p["host_count"], p["name"].casefold(), p["project"]))
    return {"projects": projects, "total": len(hosts)}


def _claimed_name(listed: list[Host]) -> str:
    """The name most hosts give a project not here yet (the newest claim among equals):
    what its genesis says is known only once it is fetched."""
    counts = Counter(h.name for h in listed)
    newest = {h.name: h.ts for h in sorted(listed, key=lambda h: h.ts)}
    return max(counts, key=lambda name: (counts[name], newest[name]))


@method("mesh.projects")
async def mesh_projects(node: NodeService, params: Params, conn: RpcConnection) -> Any:
    """The projects the members of a mesh host there, as their catalogues say, most hosted
    first; follow one with `project.follow`."""
    mesh = node.meshes.resolve(params.text("mesh"))
    limit = params.integer("limit", _PROJECTS_DEFAULT, minimum=1, maximum=_PROJECTS_MAX)
    params.done()
    return {"mesh": str(mesh.cid), "name": mesh.body.name, **await projects_view(node, mesh, limit)}


@method("mesh.leave")
async def mesh_leave(node: NodeService, params: Params, conn: RpcConnection) -> Any:
    """Leave a mesh: its records stay in the store, this node stops taking part."""
    mesh = node.meshes.resolve(params.text("mesh"))
    params.done()
    if not await node.meshes.leave(mesh.cid):
        raise NotFound(f"this node is not in mesh {mesh.body.name!r}")
    return {"mesh": str(mesh.cid), "name": mesh.body.name, "joined": False}


async def _membership(node: NodeService, params: Params, action: str) -> Any:
    mesh = node.meshes.resolve(params.text("mesh"))
    member = parse_public_key(params.text("peer"))
    note = params.text("note", "")
    params.done()
    with callers_input():
        record = await node.meshes.set_membership(
            mesh.cid, member, "admit" if action == "admit" else "revoke", note
        )
    return membership_view(record)


@method("mesh.admit")
async def mesh_admit(node: NodeService, params: Params, conn: RpcConnection) -> Any:
    """A steward admits a peer (by peer id or public key) to a private mesh."""
    return await _membership(node, params, "admit")


@method("mesh.revoke")
async def mesh_revoke(node: NodeService, params: Params, conn: RpcConnection) -> Any:
    """A steward revokes a member of a private mesh."""
    return await _membership(node, params, "revoke")
