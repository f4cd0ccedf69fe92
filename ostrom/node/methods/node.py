"""RPC methods about the node itself: identity, status, and the event stream."""

from __future__ import annotations

import os
import time
from typing import Any

from ostrom import __version__
from ostrom.crypto.cid import CID
from ostrom.errors import InvalidInput, Refused
from ostrom.node.methods.registry import (
    method,
)
from ostrom.node.params import Params
from ostrom.node.rpc_server import RpcConnection
from ostrom.node.service import Network, NodeService
from ostrom.node.store import Store

# --- node --------------------------------------------------------------------------------------


@method("node.id")
async def node_id(node: NodeService, params: Params, conn: RpcConnection) -> Any:
    params.done()
    return {"peer_id": node.identity.peer_id, "public_key": node.identity.public_key.hex()}


@method("node.status")
async def node_status(node: NodeService, params: Params, conn: RpcConnection) -> Any:
    params.done()
    # One trip to the store thread for both (a status poll is frequent: scripts and the
    # gossip benchmark ask several times a second).
    stats, usage = await node.db(lambda store: (store.stats(), _usage(store)))
    return {
        "version": __version__,
        "peer_id": node.identity.peer_id,
        "public_key": node.identity.public_key.hex(),
        "data_dir": str(node.data_dir.root),
        "pid": os.getpid(),
        "uptime_s": round(time.time() - node._started, 3),
        "store": {
            "projects": stats.projects,
            "records": stats.records,
            "records_by_type": dict(stats.records_by_type),
            "blocks": stats.blocks,
            "block_bytes": stats.block_bytes,
            "db_bytes": stats.db_bytes,
        },
        "subscribers": node.events.subscriber_count,
        "addresses": [] if node.network is None else node.network.addresses(),
        "peers": 0 if node.network is None else node.network.peer_count(),
        "transfers": node.transfers.running(),
        "limits": _limits_of(node, usage),
    }


_Usage = tuple[int, int, tuple[bytes, int] | None]


def _usage(store: Store) -> _Usage:
    """What the limits' view reads from the store: its size, the evictable block bytes, and
    the project holding the most block bytes."""
    return store.size_bytes(), store.blocks.evictable_bytes(), store.blocks.largest_project()


async def _limits_view(node: NodeService) -> dict[str, Any]:
    """Each limit beside what the node uses of it (0: no limit)."""
    return _limits_of(node, await node.db(_usage))


def _limits_of(node: NodeService, usage: _Usage) -> dict[str, Any]:
    used, evictable, largest = usage
    rates = node.bandwidth.view()
    return {
        "upload_rate": {"limit": node.limits.upload_rate, **rates["upload"]},
        "download_rate": {"limit": node.limits.download_rate, **rates["download"]},
        # `evictable`: bytes of blocks fetched on demand, which make room for new ones.
        "storage": {"limit": node.limits.storage, "used": used, "evictable": evictable},
        # `used`: the bytes of blocks of the project that holds the most.
        "project_storage": {
            "limit": node.limits.project_storage,
            "used": 0 if largest is None else largest[1],
            "project": None if largest is None else str(CID(largest[0])),
        },
        "max_peers": {
            "limit": node.limits.max_peers,
            "used": 0 if node.network is None else node.network.peer_count(),
        },
    }


@method("limits.get")
async def limits_get(node: NodeService, params: Params, conn: RpcConnection) -> Any:
    params.done()
    return await _limits_view(node)


@method("limits.set")
async def limits_set(node: NodeService, params: Params, conn: RpcConnection) -> Any:
    """Change limits while the node runs (until it restarts: config.toml and flags are
    read at start). Rates may be written as text (`256KiB/s`), sizes too (`8GiB`)."""
    changes: dict[str, Any] = {}
    for name in ("upload_rate", "download_rate", "storage", "project_storage", "max_peers"):
        value = params.text_or_integer(name, None)
        if value is not None:
            changes[name] = value
    params.done()
    if not changes:
        raise InvalidInput("limits.set: name at least one limit to change")
    node.set_limits(node.limits.updated(changes))
    node.events.publish({"type": "limits.changed", **node.limits.to_map()})
    return await _limits_view(node)


# --- events ------------------------------------------------------------------------------------


@method("events.subscribe")
async def events_subscribe(node: NodeService, params: Params, conn: RpcConnection) -> Any:
    """Stream events as `[2, "event", [event]]` notifications on this connection: every
    event, or those of the `types` given."""
    types = params.texts("types", None)
    params.done()
    subscription = node.events.subscribe(types)
    conn.on_close(subscription.close)

    async def forward() -> None:
        async for event in subscription:
            conn.notify("event", [event])

    conn.start_soon(forward)
    return {"subscribed": True}


def _network(node: NodeService) -> Network:
    if node.network is None:
        raise Refused("this node is not connected to the mesh")
    return node.network


@method("peers.list")
async def peers_list(node: NodeService, params: Params, conn: RpcConnection) -> Any:
    """Connected peers, their addresses, and the projects they share with this node."""
    params.done()
    return _network(node).peers()


@method("peers.connect")
async def peers_connect(node: NodeService, params: Params, conn: RpcConnection) -> Any:
    """Dial a peer by multiaddr ending in /p2p/<peer id>."""
    addr = params.text("addr")
    params.done()
    return await _network(node).connect(addr)
