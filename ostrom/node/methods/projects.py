"""RPC methods that create, list and read projects: forks, log, tree, records."""

from __future__ import annotations

from typing import Any, Final

from ostrom.crypto.cid import CID
from ostrom.crypto.keys import parse_public_key, peer_id_of
from ostrom.errors import (
    DecodeError,
    InvalidInput,
    NotFound,
    Refused,
)
from ostrom.node.methods.registry import (
    DAG_TYPES,
    MAX_FORK_DEPTH,
    callers_input,
    method,
)
from ostrom.node.params import Params
from ostrom.node.rpc_server import RpcConnection
from ostrom.node.service import NodeService
from ostrom.node.store import Store
from ostrom.node.views import record_view, status_view
from ostrom.protocol.changesets import (
    Changeset,
    Put,
)
from ostrom.protocol.records import (
    Comment,
    Contribution,
    ForkOf,
    Policy,
    Project,
    SignedRecord,
    Validation,
    check_license_known,
)

# Most log entries one `project.log` answer carries unless the caller asks for fewer.
DEFAULT_LOG_LIMIT: Final = 1000


# --- projects ----------------------------------------------------------------------------------


async def _check_name_free(node: NodeService, name: str) -> None:
    existing = await node.db(lambda store: store.projects_named(name))
    if existing:
        raise Refused(
            f"a project named {name!r} already exists here ({existing[0].cid}); choose another name"
        )


@method("project.create")
async def project_create(node: NodeService, params: Params, conn: RpcConnection) -> Any:
    name = params.text("name").strip()
    license_expr = params.text("license")
    description = params.text("description", "")
    quorum = params.integer("quorum", 1, minimum=1, maximum=256)
    extra = [parse_public_key(key) for key in params.texts("maintainers", [])]
    mesh_text = params.text("mesh", None)
    params.done()
    mesh = None
    if mesh_text is not None:
        joined = node.meshes.resolve(mesh_text)
        if joined.body.access != "private":
            raise Refused(
                f"mesh {joined.body.name!r} is open: its projects are public anyway; "
                "only a private mesh keeps a project to its members"
            )
        mesh = joined.cid
    license_normal = check_license_known(license_expr)
    maintainers = tuple(sorted({node.identity.public_key, *extra}))
    if quorum > len(maintainers):
        raise Refused(
            f"quorum {quorum} needs at least {quorum} maintainers; this project would have "
            f"{len(maintainers)} (add some with --maintainer)"
        )
    await _check_name_free(node, name)
    with callers_input():
        body = Project(
            author=node.identity.public_key,
            ts=node._now(),
            name=name,
            license=license_normal,
            description=description,
            policy=Policy(maintainers=maintainers, quorum=quorum),
            mesh=mesh,
        )
    record = await node.sign_and_store(body)
    await node.follow(record.cid, "full")
    node.events.publish({"type": "project.created", "project": str(record.cid), "name": name})
    return await node.project_view(record)


@method("project.list")
async def project_list(node: NodeService, params: Params, conn: RpcConnection) -> Any:
    params.done()
    projects = await node.db(lambda store: store.projects())
    return [await node.project_view(genesis) for genesis in projects]


@method("project.show")
async def project_show(node: NodeService, params: Params, conn: RpcConnection) -> Any:
    text = params.text("project")
    params.done()
    genesis = await node.resolve_project(text)
    return await node.project_view(genesis, detail=True)


@method("project.fork")
async def project_fork(node: NodeService, params: Params, conn: RpcConnection) -> Any:
    parent_text = params.text("project")
    name = params.text("name").strip()
    at = params.texts("at", [])
    description = params.text("description", None)
    params.done()
    parent = await node.resolve_project(parent_text)
    assert isinstance(parent.body, Project)
    if at:
        heads_list = []
        for text in at:
            record = await node.resolve_record(text, ("project", *DAG_TYPES))
            heads_list.append(record.cid)
        heads = tuple(sorted(set(heads_list)))
    else:
        heads = (await node.state(parent.cid)).accepted_heads
    await _check_name_free(node, name)
    with callers_input():
        body = Project(
            author=node.identity.public_key,
            ts=node._now(),
            name=name,
            license=parent.body.license,
            description=parent.body.description if description is None else description,
            policy=Policy(maintainers=(node.identity.public_key,), quorum=1),
            fork_of=ForkOf(project=parent.cid, heads=heads),
            # A fork of a private mesh's project stays in that mesh.
            mesh=parent.body.mesh,
        )
    record = await node.sign_and_store(body)
    await node.follow(record.cid, "full")
    node.events.publish(
        {
            "type": "project.created",
            "project": str(record.cid),
            "name": name,
            "fork_of": str(parent.cid),
        }
    )
    return await node.project_view(record)


@method("project.forks")
async def project_forks(node: NodeService, params: Params, conn: RpcConnection) -> Any:
    text = params.text("project")
    params.done()
    genesis = await node.resolve_project(text)

    def lineage(store: Store) -> dict[str, Any]:
        upstream: list[dict[str, Any]] = []
        current = genesis
        seen = {genesis.cid}
        while isinstance(current.body, Project) and current.body.fork_of is not None:
            parent_cid = current.body.fork_of.project
            if parent_cid in seen or len(upstream) >= MAX_FORK_DEPTH:
                break
            seen.add(parent_cid)
            parent = store.get_record(parent_cid)
            entry: dict[str, Any] = {
                "project": str(parent_cid),
                "at": [str(cid) for cid in current.body.fork_of.heads],
                "present": parent is not None,
            }
            if parent is None or not isinstance(parent.body, Project):
                upstream.append(entry)
                break
            entry["name"] = parent.body.name
            upstream.append(entry)
            current = parent

        def down(project: SignedRecord, depth: int) -> list[dict[str, Any]]:
            out: list[dict[str, Any]] = []
            if depth >= MAX_FORK_DEPTH:
                return out
            for fork in store.forks_of(project.cid):
                if fork.cid in seen:
                    continue
                seen.add(fork.cid)
                assert isinstance(fork.body, Project) and fork.body.fork_of is not None
                out.append(
                    {
                        "project": str(fork.cid),
                        "name": fork.body.name,
                        "author_peer_id": peer_id_of(fork.author),
                        "ts": fork.ts,
                        "at": [str(cid) for cid in fork.body.fork_of.heads],
                        "forks": down(fork, depth + 1),
                    }
                )
            return out

        assert isinstance(genesis.body, Project)
        return {
            "project": str(genesis.cid),
            "name": genesis.body.name,
            "upstream": upstream,
            "forks": down(genesis, 0),
        }

    return await node.db(lineage)


# --- reading a project's history ---------------------------------------------------------------


async def _changes_of(node: NodeService, record: SignedRecord) -> list[dict[str, Any]]:
    if not isinstance(record.body, Contribution):
        return []
    links = record.body.changes

    def read(store: Store) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for link in links:
            data = store.get_block(link)
            if data is None:
                continue
            for change in Changeset.decode(data).changes:
                if isinstance(change, Put):
                    out.append(
                        {
                            "op": "put",
                            "path": change.path,
                            "size": change.size,
                            "file": str(change.file),
                            "exec": change.exec,
                        }
                    )
                else:
                    out.append({"op": "delete", "path": change.path})
        return out

    return await node.db(read)


@method("project.log")
async def project_log(node: NodeService, params: Params, conn: RpcConnection) -> Any:
    text = params.text("project")
    limit = params.integer("limit", DEFAULT_LOG_LIMIT, minimum=1, maximum=1_000_000)
    params.done()
    genesis = await node.resolve_project(text)
    state = await node.state(genesis.cid)

    def read(store: Store) -> list[dict[str, Any]]:
        records = store.project_records(genesis.cid, (*DAG_TYPES, "validation", "comment"))
        dag = [r for r in records if r.type in DAG_TYPES]
        by_target: dict[CID, list[SignedRecord]] = {}
        comments: dict[CID, int] = {}
        for r in records:
            if isinstance(r.body, Validation):
                by_target.setdefault(r.body.target, []).append(r)
            elif isinstance(r.body, Comment):
                comments[r.body.target] = comments.get(r.body.target, 0) + 1
        dag.sort(key=lambda r: (r.ts, r.cid.raw), reverse=True)
        out = []
        for record in [*dag[:limit], genesis][: limit + 1]:
            view = record_view(record)
            status = state.statuses.get(record.cid)
            if status is not None:
                view.update(status_view(status))
            counted = {v.validation for v in (status.votes if status else ()) if v.validation}
            view["validations"] = [
                {**record_view(v), "counted": v.cid in counted}
                for v in sorted(by_target.get(record.cid, []), key=lambda r: (r.ts, r.cid.raw))
            ]
            view["comments"] = comments.get(record.cid, 0)
            out.append(view)
        return out

    return await node.db(read)


@method("record.show")
async def record_show(node: NodeService, params: Params, conn: RpcConnection) -> Any:
    text = params.text("record")
    params.done()
    record = await node.resolve_record(text)
    view = record_view(record)
    try:
        state = await node.state(record.project)
    except NotFound:
        state = None
    if state is not None and record.cid in state.statuses:
        view.update(status_view(state.statuses[record.cid]))
    related = await node.db(lambda store: store.records_by_target(record.cid))
    view["validations"] = [record_view(r) for r in related if r.type == "validation"]
    view["comments"] = [record_view(r) for r in related if r.type == "comment"]
    view["changes"] = await _changes_of(node, record)
    return view


@method("project.tree")
async def project_tree(node: NodeService, params: Params, conn: RpcConnection) -> Any:
    text = params.text("project")
    at_text = params.text("at", None)
    params.done()
    genesis = await node.resolve_project(text)
    if at_text is not None:
        heads: tuple[CID, ...] = (
            (await node.resolve_record(at_text, ("project", *DAG_TYPES))).cid,
        )
    else:
        heads = (await node.state(genesis.cid)).accepted_heads
    tree = await node.tree(heads)
    return {
        "project": str(genesis.cid),
        "heads": [str(cid) for cid in heads],
        "files": [
            {
                "path": entry.path,
                "size": entry.size,
                "file": str(entry.file),
                "exec": entry.exec,
                "record": str(entry.record),
            }
            for entry in tree.files.values()
        ],
        "conflicts": [
            {
                "path": c.path,
                "candidates": [str(cid) for cid in c.candidates],
                "chosen": str(c.chosen),
            }
            for c in tree.conflicts
        ],
    }


def _unseen_project(text: str) -> CID:
    """The project CID a user gave for a project this node has never seen."""
    try:
        project = CID.parse(text)
    except DecodeError:
        raise NotFound(
            f"no project {text!r} here; to follow a project this node has never seen, "
            "give its full CID"
        ) from None
    if not project.is_dag_cbor:
        raise InvalidInput(f"{text} is a block's CID, not a project's")
    return project


@method("project.follow")
async def project_follow(node: NodeService, params: Params, conn: RpcConnection) -> Any:
    """Host a project: `full` keeps its records and blocks, `records_only` fetches blocks
    when they are needed. A project not here yet is named by its full CID."""
    text = params.text("project")
    records_only = params.flag("records_only", False)
    params.done()
    try:
        project = (await node.resolve_project(text)).cid
        present = True
    except NotFound:
        project = _unseen_project(text)
        present = False
    mode = "records" if records_only else "full"
    await node.follow(project, mode)
    return {"project": str(project), "mode": mode, "present": present}


@method("project.unfollow")
async def project_unfollow(node: NodeService, params: Params, conn: RpcConnection) -> Any:
    """Stop hosting a project's new work; what is stored stays until space is reclaimed."""
    text = params.text("project")
    params.done()
    try:
        project = (await node.resolve_project(text)).cid
    except NotFound:
        project = _unseen_project(text)
    if not await node.unfollow(project):
        raise NotFound(f"this node does not follow {text}")
    return {"project": str(project), "following": False}
