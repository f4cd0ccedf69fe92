"""RPC methods that move bytes in and out: blocks, raw records, CAR import and export."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Final

from ostrom.crypto.cid import CID
from ostrom.errors import (
    DecodeError,
    InvalidInput,
    NotFound,
    Refused,
    TooLarge,
)
from ostrom.node.ingest import Block, Refusal
from ostrom.node.methods.registry import (
    MAX_FORK_DEPTH,
    method,
)
from ostrom.node.params import Params
from ostrom.node.rpc_server import RpcConnection
from ostrom.node.service import NodeService
from ostrom.node.store import Store
from ostrom.protocol.changesets import (
    MAX_BLOCK_SIZE,
    Changeset,
    FileManifest,
    Put,
)
from ostrom.protocol.records import (
    Contribution,
    Project,
    SignedRecord,
)

# Bytes of blocks one `block.get` or `record.get` answer may carry: well under the RPC
# frame limit, large enough that a checkout moves tens of blocks per round trip.
MAX_GET_BYTES: Final = 8 * 1024 * 1024
# Records or sections one `record.put` / `car.import` call may carry: enough to keep the
# verification workers busy, small enough to answer within a second on a Raspberry Pi.
MAX_IMPORT_BATCH: Final = 4096
# Projects one `car.import` call may name: a CAR file of ours has one root, its project;
# a few more allow files that bundle projects, and the bound keeps each call's claims small.
MAX_IMPORT_ROOTS: Final = 16


# --- blocks ------------------------------------------------------------------------------------


def _blocks_param(params: Params) -> list[tuple[CID, bytes]]:
    raw = params.array("blocks", max_length=4096)
    out: list[tuple[CID, bytes]] = []
    total = 0
    for item in raw:
        if (
            not isinstance(item, list)
            or len(item) != 2
            or not isinstance(item[0], str)
            or not isinstance(item[1], bytes)
        ):
            raise InvalidInput("block.put: each block is [cid, bytes]")
        try:
            cid = CID.parse(item[0])
        except DecodeError as exc:
            raise InvalidInput(f"block.put: {exc.message}") from None
        total += len(item[1])
        out.append((cid, item[1]))
    if total > 64 * MAX_BLOCK_SIZE:
        raise TooLarge("block.put: too many bytes in one call")
    return out


@method("block.put")
async def block_put(node: NodeService, params: Params, conn: RpcConnection) -> Any:
    blocks = _blocks_param(params)
    params.done()
    stored = await node.blocks_upload(blocks)
    return {"stored": stored, "received": len(blocks)}


@method("block.missing")
async def block_missing(node: NodeService, params: Params, conn: RpcConnection) -> Any:
    cids = params.cids("cids")
    params.done()
    present = await node.db(lambda store: store.has_blocks(cids))
    return [str(cid) for cid in cids if cid not in present]


@method("block.get")
async def block_get(node: NodeService, params: Params, conn: RpcConnection) -> Any:
    cids = params.cids("cids")
    params.done()

    # Read for the owner (a checkout): the blocks count as recently used.
    return await node.db(
        lambda store: _answer(cids, lambda cid: store.get_block(cid, touch=True), "block")
    )


@method("block.fetch")
async def block_fetch(node: NodeService, params: Params, conn: RpcConnection) -> Any:
    """Fetch from peers those of `cids` this node lacks, for `project` (a records-only
    project's blocks, before a checkout). `block.progress` notifications report the transfer
    while it runs; blocks no peer could deliver are `NotFound`, and what did arrive stays."""
    project = (await node.resolve_project(params.text("project"))).cid
    cids = params.cids("cids")
    params.done()
    if node.network is None:
        raise Refused("this node is not connected to the mesh")

    def forward(view: dict[str, Any]) -> None:
        conn.notify("block.progress", [view])

    transfer = await node.network.fetch_blocks(project, cids, forward)
    if transfer.missing:
        raise NotFound(
            f"{transfer.missing} of {len(cids)} blocks could not be fetched from any connected "
            f"peer sharing the project; {transfer.fetched} were fetched and kept"
        )
    return {"requested": len(cids), "fetched": transfer.fetched, "bytes": transfer.bytes}


def _answer(cids: list[CID], lookup: Callable[[CID], bytes | None], kind: str) -> list[list[Any]]:
    """`[[cid, bytes], ...]` for `cids` in order, stopping once the answer would pass
    MAX_GET_BYTES (the caller asks again for the rest); a CID not here is `NotFound`."""
    out: list[list[Any]] = []
    total = 0
    for cid in cids:
        data = lookup(cid)
        if data is None:
            raise NotFound(f"{kind} {cid} is not in the store")
        total += len(data)
        if out and total > MAX_GET_BYTES:
            break
        out.append([str(cid), data])
    return out


# --- import and export -------------------------------------------------------------------------


@method("record.put")
async def record_put(node: NodeService, params: Params, conn: RpcConnection) -> Any:
    """Take in records signed by anyone: each is verified; bad ones are refused with a reason."""
    items = params.array("records", max_length=MAX_IMPORT_BATCH)
    params.done()
    if not all(isinstance(item, bytes) for item in items):
        raise InvalidInput("record.put: records are byte strings")
    return await _ingest(node, items)


async def _ingest(node: NodeService, items: Sequence[bytes]) -> dict[str, Any]:
    decoded = await node.verifier.decode_records(items)
    good = [item for item in decoded if isinstance(item, SignedRecord)]
    refused = [item for item in decoded if isinstance(item, Refusal)]
    new = await node.store_new(good, "import")
    return {
        "stored": [str(cid) for cid in new],
        "known": len(good) - len(new),
        "refused": [{"index": r.index, "code": r.code, "message": r.message} for r in refused],
    }


@method("car.import")
async def car_import(node: NodeService, params: Params, conn: RpcConnection) -> Any:
    """Sections of a CAR file: records are verified and stored, blocks checked against CIDs.

    Each bad section is refused with its reason; every good one is kept. `projects` (the
    CAR file's roots) names the projects its blocks belong to: a block kept for a private
    mesh's project is then served only to that mesh's members.
    """
    sections = params.array("sections", max_length=MAX_IMPORT_BATCH)
    projects = params.cids("projects", [])
    params.done()
    if len(projects) > MAX_IMPORT_ROOTS:
        raise InvalidInput(f"car.import: at most {MAX_IMPORT_ROOTS} projects")
    if not all(isinstance(item, list) and len(item) == 2 for item in sections):
        raise InvalidInput("car.import: each section is [cid, bytes]")
    decoded = await node.verifier.decode_sections(sections)
    records = [item for item in decoded if isinstance(item, SignedRecord)]
    blocks = [(item.cid, item.data) for item in decoded if isinstance(item, Block)]
    refused = [item for item in decoded if isinstance(item, Refusal)]

    def put(store: Store) -> int:
        # The node's own (never evicted), and attributed to each project named.
        stored = store.put_blocks(blocks)
        for project in projects:
            store.blocks.claim(project.raw, [cid for cid, _ in blocks])
        return stored

    stored_blocks = await node.db(put) if blocks else 0
    new = await node.store_new(records, "import")
    return {
        "stored": [str(cid) for cid in new],
        "known": len(records) - len(new),
        "blocks_stored": stored_blocks,
        "blocks_known": len(blocks) - stored_blocks,
        "refused": [
            {
                "index": r.index,
                "cid": None if r.cid is None else str(r.cid),
                "code": r.code,
                "message": r.message,
            }
            for r in refused
        ],
    }


@method("car.export")
async def car_export(node: NodeService, params: Params, conn: RpcConnection) -> Any:
    """What a CAR file of a project holds, in order: the client fetches and writes it."""
    text = params.text("project")
    params.done()
    genesis = await node.resolve_project(text)

    def plan(store: Store) -> dict[str, Any]:
        records = store.project_history(genesis.cid)
        # Upstream genesis records, so a fork's lineage can be shown after import.
        current = genesis
        for _ in range(MAX_FORK_DEPTH):
            if not isinstance(current.body, Project) or current.body.fork_of is None:
                break
            parent = store.get_record(current.body.fork_of.project)
            if parent is None:
                break
            records[parent.cid] = parent
            current = parent
        ordered = sorted(records.values(), key=lambda r: (r.type != "project", r.ts, r.cid.raw))
        blocks: list[CID] = []
        seen: set[CID] = set()
        for record in ordered:
            if not isinstance(record.body, Contribution):
                continue
            for link in record.body.changes:
                data = store.get_block(link)
                if data is None or link in seen:
                    continue
                seen.add(link)
                blocks.append(link)
                for change in Changeset.decode(data).changes:
                    if not isinstance(change, Put) or change.file in seen:
                        continue
                    manifest_data = store.get_block(change.file)
                    if manifest_data is None:
                        continue
                    seen.add(change.file)
                    blocks.append(change.file)
                    for ref in FileManifest.decode(manifest_data).blocks:
                        if ref.cid not in seen:
                            seen.add(ref.cid)
                            blocks.append(ref.cid)
        present = store.has_blocks(blocks)
        return {
            "roots": [str(genesis.cid)],
            "records": [str(r.cid) for r in ordered],
            "blocks": [str(cid) for cid in blocks if cid in present],
        }

    return await node.db(plan)


@method("record.get")
async def record_get(node: NodeService, params: Params, conn: RpcConnection) -> Any:
    cids = params.cids("cids")
    params.done()

    def read(store: Store) -> list[list[Any]]:
        # The bytes as stored, checked against their CIDs; the asker verifies them itself.
        return _answer(cids, store.get_record_bytes(cids).get, "record")

    return await node.db(read)
