"""Every RPC method of the daemon, one module per area; `dispatch` routes a call."""

from __future__ import annotations

from typing import Any

from ostrom.errors import MethodNotFound
from ostrom.node.methods import meshes, node, projects, records, transfer
from ostrom.node.methods.registry import METHODS
from ostrom.node.params import Params
from ostrom.node.rpc_server import RpcConnection
from ostrom.node.service import NodeService

__all__ = ["METHODS", "dispatch", "meshes", "node", "projects", "records", "transfer"]


async def dispatch(
    service: NodeService, name: str, params: list[Any], connection: RpcConnection
) -> Any:
    """Run the RPC method `name`; unknown names get `MethodNotFound`."""
    handler = METHODS.get(name)
    if handler is None:
        raise MethodNotFound(f"no method {name!r} (see docs/RPC.md)")
    return await handler(service, Params(name, params), connection)
