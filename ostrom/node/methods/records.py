"""RPC methods that sign new records: contributions, validations, governance, needs,
comments."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Final

from ostrom.crypto.cid import CID
from ostrom.crypto.keys import parse_public_key, peer_id_of
from ostrom.errors import (
    DecodeError,
    InvalidInput,
    InvalidRecord,
    NotFound,
    Refused,
)
from ostrom.node.blockplan import claim_merged_work
from ostrom.node.methods.registry import (
    DAG_TYPES,
    callers_input,
    method,
)
from ostrom.node.params import Params
from ostrom.node.rpc_server import RpcConnection
from ostrom.node.service import RECENT_BLOCK_MAX, NodeService
from ostrom.node.store import Store
from ostrom.node.views import record_view, status_view
from ostrom.protocol.changesets import (
    Change,
    Delete,
    FileManifest,
    Put,
    split_changes,
)
from ostrom.protocol.records import (
    Comment,
    Contribution,
    Governance,
    Need,
    Validation,
)

# --- contributions -----------------------------------------------------------------------------

# Blocks of a new contribution's files, counted in the order it names them, whose bytes are
# offered to the recent-blocks cache: a small contribution's (a few files), not a large
# import's, which the cache (1 MiB) could not hold anyway.
OFFERED_BLOCKS: Final = 64


def _changes_param(params: Params) -> list[Change]:
    changes: list[Change] = []
    for item in params.array("changes", []):
        if not isinstance(item, dict):
            raise InvalidInput("contribution.create: each change is a map")
        op = item.get("op")
        try:
            if op == "put" and set(item) <= {"op", "path", "file", "size", "exec"}:
                file = CID.parse(str(item.get("file")))
                changes.append(
                    Put(
                        path=item["path"],
                        file=file,
                        size=item["size"],
                        exec=bool(item.get("exec", False)),
                    )
                )
            elif op == "delete" and set(item) == {"op", "path"}:
                changes.append(Delete(path=item["path"]))
            else:
                raise InvalidInput(f"contribution.create: not a change: {sorted(item)}")
        except (InvalidRecord, DecodeError) as exc:
            raise InvalidInput(f"contribution.create: {exc.message}") from None
        except KeyError as exc:
            raise InvalidInput(f"contribution.create: a change lacks {exc}") from None
    return changes


def _check_puts(store: Store, puts: list[Put]) -> tuple[list[CID], dict[CID, bytes]]:
    """Every put's manifest is stored, decodes, has the declared size, and its blocks are here;
    returns the manifests and blocks, and the bytes of the small ones among the first
    `OFFERED_BLOCKS` (for `NodeService.offer_new_blocks`)."""
    named: list[CID] = []
    small: dict[CID, bytes] = {}
    for put in puts:
        data = store.get_block(put.file)
        if data is None:
            raise NotFound(f"{put.path}: manifest {put.file} was not uploaded (block.put first)")
        manifest = FileManifest.decode(data)
        if manifest.size != put.size:
            raise InvalidInput(f"{put.path}: size {put.size} but its manifest says {manifest.size}")
        blocks = [ref.cid for ref in manifest.blocks]
        present = store.has_blocks(blocks)
        missing = [cid for cid in blocks if cid not in present]
        if missing:
            raise NotFound(f"{put.path}: {len(missing)} block(s) not uploaded, e.g. {missing[0]}")
        named += [put.file, *blocks]
        if len(named) <= OFFERED_BLOCKS and len(data) <= RECENT_BLOCK_MAX:
            small[put.file] = data
            for ref in manifest.blocks:
                if ref.size <= RECENT_BLOCK_MAX and (block := store.get_block(ref.cid)):
                    small[ref.cid] = block
    return named, small


async def _resolve_many(
    node: NodeService, texts: Iterable[str], types: Sequence[str]
) -> tuple[CID, ...]:
    out = []
    for text in texts:
        out.append((await node.resolve_record(text, types)).cid)
    return tuple(sorted(set(out)))


@method("contribution.create")
async def contribution_create(node: NodeService, params: Params, conn: RpcConnection) -> Any:
    project_text = params.text("project")
    changes = _changes_param(params)
    message = params.text("message")
    resolves_text = params.texts("resolves", [])
    parents_text = params.texts("parents", [])
    params.done()
    if not message.strip():
        raise InvalidInput("a contribution needs a message (-m)")
    genesis = await node.resolve_project(project_text)
    project = genesis.cid
    resolves = await _resolve_many(node, resolves_text, ("need",))
    if parents_text:
        parents = await _resolve_many(node, parents_text, ("project", *DAG_TYPES))
    else:
        parents = await node.default_parents(project)
    with callers_input():
        changesets = split_changes(changes)
    puts = [c for c in changes if isinstance(c, Put)]
    deletes = [c.path for c in changes if isinstance(c, Delete)]
    if deletes:
        tree = await node.tree(parents)
        absent = [path for path in deletes if path not in tree.files]
        if absent:
            raise InvalidInput(f"cannot delete, not in the tree: {', '.join(absent[:5])}")
    if not changes and len(parents) < 2:
        raise InvalidInput("a contribution changes at least one path (or merges several heads)")
    encoded = [
        (CID.of_dag_cbor(data), data) for data in (cs.encode() for cs in changesets if cs.changes)
    ]

    with callers_input():
        body = Contribution(
            author=node.identity.public_key,
            ts=node._now(),
            project=project,
            parents=parents,
            changes=tuple(cid for cid, _ in encoded),
            message=message,
            resolves=resolves,
        )
    small: dict[CID, bytes] = {}

    def check_and_keep(store: Store) -> None:
        # In the record's own call to the store (each call costs a hand-off to its thread,
        # which waits for a processor on a busy node): the uploads are checked, then kept,
        # since this is the node's own work, whatever it follows, and counted as the
        # project's, with the private work it merges, before any peer hears of it (in one
        # transaction: one sync of the block file).
        named, found = _check_puts(store, puts)
        with store.blocks.batch():
            store.put_blocks(encoded)
            store.blocks.claim(project.raw, [*named, *(cid for cid, _ in encoded)])
            claim_merged_work(store, project, parents)
        small.update(found)

    record = await node.sign_and_store(body, first=check_and_keep)
    # Followers ask for the blocks once a pass gathers (seconds): memory holds them by then.
    await node.offer_new_blocks(project, [*encoded, *small.items()])
    view = await node.view_with_status(record)
    view["paths"] = len(changes)
    return view


# --- validations, governance, needs, comments --------------------------------------------------


@method("validation.create")
async def validation_create(node: NodeService, params: Params, conn: RpcConnection) -> Any:
    target_text = params.text("target")
    verdict = params.text("verdict")
    note = params.text("note", "")
    project_text = params.text("project", None)
    params.done()
    if verdict not in ("accept", "reject"):
        raise InvalidInput("verdict must be accept or reject")
    target = await node.resolve_record(target_text)
    if target.type not in DAG_TYPES:
        raise Refused(
            f"only contributions and governance records are validated, not a {target.type}"
        )
    project = (await node.resolve_project(project_text)).cid if project_text else target.project
    with callers_input():
        body = Validation(
            author=node.identity.public_key,
            ts=node._now(),
            project=project,
            target=target.cid,
            verdict=verdict,
            note=note,
        )
    record = await node.sign_and_store(body)
    view = record_view(record)
    state = await node.state(project)
    status = state.statuses.get(target.cid)
    if status is not None:
        view["target_status"] = status_view(status)
        if node.identity.public_key not in state.policy.maintainers:
            view["warning"] = (
                "you are not a maintainer of this project: your verdict is not counted"
            )
    return view


@method("governance.create")
async def governance_create(node: NodeService, params: Params, conn: RpcConnection) -> Any:
    text = params.text("project")
    action = params.text("action")
    key_text = params.text("key", None)
    quorum = params.integer("quorum", None, minimum=1, maximum=256)
    note = params.text("note", "")
    params.done()
    genesis = await node.resolve_project(text)
    state = await node.state(genesis.cid)
    policy = state.policy
    key = parse_public_key(key_text) if key_text is not None else None
    if action in ("add-maintainer", "remove-maintainer") and (key is None or quorum is not None):
        raise InvalidInput(f"{action} takes a key (hex or peer id) and no quorum")
    if action == "set-quorum" and (quorum is None or key is not None):
        raise InvalidInput("set-quorum takes a quorum and no key")
    if action == "add-maintainer" and key in policy.maintainers:
        raise Refused(f"{peer_id_of(key)} is already a maintainer")
    if action == "remove-maintainer":
        assert key is not None
        if key not in policy.maintainers:
            raise Refused(f"{peer_id_of(key)} is not a maintainer")
        if len(policy.maintainers) - 1 < policy.quorum:
            raise Refused(
                f"removing a maintainer would leave {len(policy.maintainers) - 1} for a quorum of "
                f"{policy.quorum}: lower the quorum first"
            )
    if action == "set-quorum":
        assert quorum is not None
        if quorum > len(policy.maintainers):
            raise Refused(
                f"quorum {quorum} is more than the {len(policy.maintainers)} maintainer(s): "
                "no contribution could ever be accepted"
            )
    parents = await node.default_parents(genesis.cid)
    with callers_input():
        body = Governance(
            author=node.identity.public_key,
            ts=node._now(),
            project=genesis.cid,
            parents=parents,
            action=action,
            key=key,
            quorum=quorum,
            note=note,
        )
    return await node.view_with_status(await node.sign_and_store(body))


@method("need.create")
async def need_create(node: NodeService, params: Params, conn: RpcConnection) -> Any:
    text = params.text("project")
    title = params.text("title")
    body_text = params.text("body", "")
    params.done()
    genesis = await node.resolve_project(text)
    with callers_input():
        body = Need(
            author=node.identity.public_key,
            ts=node._now(),
            project=genesis.cid,
            title=title.strip(),
            body=body_text,
        )
    return record_view(await node.sign_and_store(body))


@method("need.list")
async def need_list(node: NodeService, params: Params, conn: RpcConnection) -> Any:
    text = params.text("project")
    params.done()
    genesis = await node.resolve_project(text)
    state = await node.state(genesis.cid)

    def read(store: Store) -> list[dict[str, Any]]:
        records = store.project_records(genesis.cid, ("need", "contribution"))
        resolved_by: dict[CID, list[tuple[CID, str]]] = {}
        for r in records:
            if isinstance(r.body, Contribution):
                status = state.statuses.get(r.cid)
                for need in r.body.resolves:
                    resolved_by.setdefault(need, []).append(
                        (r.cid, status.status if status else "pending")
                    )
        out = []
        for r in sorted((r for r in records if r.type == "need"), key=lambda r: (r.ts, r.cid.raw)):
            claims = resolved_by.get(r.cid, [])
            view = record_view(r)
            view["status"] = "resolved" if any(s == "accepted" for _, s in claims) else "open"
            view["resolved_by"] = [{"record": str(cid), "status": s} for cid, s in claims]
            out.append(view)
        return out

    return await node.db(read)


@method("comment.create")
async def comment_create(node: NodeService, params: Params, conn: RpcConnection) -> Any:
    target_text = params.text("target")
    text = params.text("text")
    params.done()
    target = await node.resolve_record(target_text)
    with callers_input():
        body = Comment(
            author=node.identity.public_key,
            ts=node._now(),
            project=target.project,
            target=target.cid,
            text=text,
        )
    return record_view(await node.sign_and_store(body))
